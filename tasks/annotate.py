"""Flyte task for stage `annotate`."""

from flytekit import Resources, task
from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from flowrl.stages.annotate import run_annotate
from tasks.types import GPU, StageArtifact, image


@task(container_image=image("annotate"), requests=Resources(cpu="4", mem="32Gi", gpu="1"),
      accelerator=GPU, retries=1)
def annotate(config: FlyteFile, base: StageArtifact) -> StageArtifact:
    result = run_annotate(load_config(config.download()), base.uri)
    return StageArtifact.of(result)
