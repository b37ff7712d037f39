"""Flyte task for stage `filter_prompts` (one per task)."""

from flytekit import Resources, task
from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from flowrl.stages.filter_prompts import run_filter_prompts
from tasks.types import GPU, StageArtifact, image


@task(container_image=image("filter_prompts"), requests=Resources(cpu="4", mem="32Gi", gpu="1"),
      accelerator=GPU, retries=1)
def filter_prompts(config: FlyteFile, task_name: str, base: StageArtifact, reward_model: StageArtifact) -> StageArtifact:
    result = run_filter_prompts(load_config(config.download()), task_name, base.uri, reward_model.uri)
    return StageArtifact.of(result)
