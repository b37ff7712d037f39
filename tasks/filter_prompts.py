"""Flyte task for stage `filter_prompts` (one per task)."""

from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from flowrl.stages.filter_prompts import run_filter_prompts
from tasks.launch import stage_task
from tasks.types import StageArtifact, show_progress, stage_cache, tracker_for


@stage_task("filter_prompts", retries=1, cache=stage_cache("filter_prompts"))
def filter_prompts(
    config: FlyteFile, parent_run: str, task_name: str, base: StageArtifact, reward_model: StageArtifact
) -> StageArtifact:
    cfg = load_config(config.download())
    result = run_filter_prompts(cfg, task_name, base.uri, reward_model.uri, tracker=tracker_for(cfg, parent_run),
                                progress=show_progress())
    return StageArtifact.of(result)
