"""Flyte tasks for config validation and stage `base`."""

from typing import Optional

from flytekit.types.error import FlyteError
from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from flowrl.models.families import family_of
from flowrl.stages.base import run_base
from tasks.launch import stage_task
from tasks.types import (STAGE_MODULES, StageArtifact, StageConfigs, flyte_execution_id, show_progress, stage_cache,
                         tracker_for)


@stage_task("default")
def validate_config(config: FlyteFile) -> StageConfigs:
    """Fail the workflow on a bad config before any stage starts; hand each stage
    the config under its own cache hash (its sections, see tasks.types)."""
    loaded = load_config(config.download())
    if family_of(loaded).prompt_files:  # the prompt files are read hours later: check them now
        from flowrl.prompt_files import check_prompt_files

        check_prompt_files(loaded)
    return StageConfigs(**{module: config for module in STAGE_MODULES})


@stage_task("default", retries=2)
def start_pipeline_run(config: FlyteFile) -> str:
    """Open the MLflow run of this pipeline execution; every stage's run nests under it. It is tagged
    like the stage runs (code version, Flyte execution id); a failing stage ends it FAILED."""
    loaded = load_config(config.download())
    return tracker_for(loaded, "").start_pipeline(loaded, "post_train")


@stage_task("default", retries=2)
def fail_pipeline_run(config: FlyteFile, err: Optional[FlyteError] = None) -> None:
    """The workflow's failure handler: every MLflow run of this execution still RUNNING (the pipeline's,
    and stages whose pods were killed with the workflow) ends FAILED."""
    from flowrl.tracking import MLflowTracker

    loaded = load_config(config.download())
    execution = flyte_execution_id()
    if execution is None:  # a local run: its stages end their own runs FAILED as they raise
        return
    ended = MLflowTracker(loaded.run.tracking_uri).end_open_runs(loaded.run.name, execution)
    print(f"ended {len(ended)} MLflow run(s) of {execution} as FAILED ({err.message if err else 'no error given'})")


@stage_task("base", retries=1, cache=stage_cache("base"))
def base(config: FlyteFile, parent_run: str) -> StageArtifact:
    cfg = load_config(config.download())
    # a retried pod continues from the newest complete checkpoint (base.checkpoint_every)
    # its headline metrics are logged by the stage as it ends (flowrl.stages.common.log_stage_summary)
    result = run_base(cfg, resume=True, tracker=tracker_for(cfg, parent_run), progress=show_progress())
    return StageArtifact.of(result)
