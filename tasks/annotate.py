"""Flyte task for stage `annotate`."""

from flytekit import Resources, task
from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from flowrl.stages.annotate import run_annotate
from tasks.types import GPU, StageArtifact, image, stage_cache, tracker_for


@task(container_image=image("annotate"), requests=Resources(cpu="4", mem="32Gi", gpu="1"),
      accelerator=GPU, retries=1, cache=stage_cache("annotate"))
def annotate(config: FlyteFile, parent_run: str, base: StageArtifact) -> StageArtifact:
    cfg = load_config(config.download())
    result = run_annotate(cfg, base.uri, tracker=tracker_for(cfg, parent_run))
    return StageArtifact.of(result)
