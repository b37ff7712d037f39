"""Flyte task for stage `filter_prompts` (one per task)."""

from flytekit import Resources, task
from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from flowrl.stages.filter_prompts import run_filter_prompts
from tasks.types import GPU, StageArtifact, image, stage_cache, tracker_for


@task(container_image=image("filter_prompts"), requests=Resources(cpu="4", mem="32Gi", gpu="1"),
      accelerator=GPU, retries=1, cache=stage_cache("filter_prompts"))
def filter_prompts(
    config: FlyteFile, parent_run: str, task_name: str, base: StageArtifact, reward_model: StageArtifact
) -> StageArtifact:
    cfg = load_config(config.download())
    result = run_filter_prompts(cfg, task_name, base.uri, reward_model.uri, tracker=tracker_for(cfg, parent_run))
    return StageArtifact.of(result)
