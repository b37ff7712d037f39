"""Flyte task for stage `reward_model`."""

from flytekit import Resources, task
from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from flowrl.stages.reward_model import run_reward_model
from tasks.types import GPU, StageArtifact, image


@task(container_image=image("reward_model"), requests=Resources(cpu="8", mem="64Gi", gpu="1"),
      accelerator=GPU, retries=1)
def reward_model(config: FlyteFile, annotations: StageArtifact) -> StageArtifact:
    result = run_reward_model(load_config(config.download()), annotations.uri)
    return StageArtifact.of(result)
