"""Flyte task for stage `annotate`."""

from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from flowrl.stages.annotate import run_annotate
from tasks.launch import stage_task
from tasks.types import StageArtifact, show_progress, stage_cache, tracker_for


@stage_task("annotate", retries=1, cache=stage_cache("annotate"))
def annotate(config: FlyteFile, parent_run: str, base: StageArtifact) -> StageArtifact:
    cfg = load_config(config.download())
    result = run_annotate(cfg, base.uri, tracker=tracker_for(cfg, parent_run), progress=show_progress())
    return StageArtifact.of(result)
