"""Flyte tasks for stage `reward_model`: trained from scratch, or refreshed from a first round's models."""

from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from flowrl.stages.reward_model import run_reward_model
from tasks.launch import stage_task
from tasks.types import StageArtifact, show_progress, stage_cache, tracker_for


@stage_task("reward_model", retries=1, cache=stage_cache("reward_model"))
def reward_model(config: FlyteFile, parent_run: str, annotations: StageArtifact) -> StageArtifact:
    cfg = load_config(config.download())
    # with reward_model.checkpoint_every set, a retried pod continues each scorer from its newest checkpoint
    result = run_reward_model(cfg, annotations.uri, resume=cfg.reward_model.checkpoint_every is not None,
                              tracker=tracker_for(cfg, parent_run), progress=show_progress())
    return StageArtifact.of(result)


@stage_task("reward_model", retries=1, cache=stage_cache("reward_model"))
def reward_model_refresh(config: FlyteFile, parent_run: str, annotations: StageArtifact,
                         init: StageArtifact) -> StageArtifact:
    """Every scorer of ``init`` trained further (reward_model.refresh_steps) on both rounds' annotations."""
    cfg = load_config(config.download())
    result = run_reward_model(cfg, annotations.uri, init_uri=init.uri,
                              resume=cfg.reward_model.checkpoint_every is not None,
                              tracker=tracker_for(cfg, parent_run), progress=show_progress())
    return StageArtifact.of(result)
