"""Flyte tasks for stage `annotate` (both annotation rounds) and the switch between one and two rounds."""

from typing import NamedTuple

from flytekit.types.file import FlyteFile

from flowrl.config import ConfigError, load_config
from flowrl.stages.annotate import run_annotate
from tasks.launch import stage_task
from tasks.types import StageArtifact, show_progress, stage_cache, tracker_for

Rounds = NamedTuple("Rounds", [("two", bool), ("first_grpo_round", int)])


@stage_task("default")
def annotation_rounds(config: FlyteFile) -> Rounds:
    """Whether the pipeline runs a second annotation round (pipeline.annotation_rounds), and the ``rl_round``
    of the first GRPO run (0: the whole loop; 1: its first grpo.round1_iterations). A split the loop cannot
    take fails here, before any stage runs."""
    cfg = load_config(config.download())
    two = cfg.pipeline.annotation_rounds == 2
    if two and cfg.grpo.round1_iterations >= cfg.grpo.loop.iterations:
        raise ConfigError(f"grpo.round1_iterations = {cfg.grpo.round1_iterations} must be below "
                          f"grpo.loop.iterations = {cfg.grpo.loop.iterations} with pipeline.annotation_rounds: 2")
    return Rounds(two=two, first_grpo_round=1 if two else 0)


@stage_task("default")
def passed_on(artifact: StageArtifact) -> StageArtifact:
    """The value of a round the config left out: the artifact of the round before, unchanged."""
    return artifact


@stage_task("annotate", retries=1, cache=stage_cache("annotate"))
def annotate(config: FlyteFile, parent_run: str, base: StageArtifact) -> StageArtifact:
    cfg = load_config(config.download())
    result = run_annotate(cfg, base.uri, tracker=tracker_for(cfg, parent_run), progress=show_progress())
    return StageArtifact.of(result)


@stage_task("annotate", retries=1, cache=stage_cache("annotate"))
def annotate_policies(config: FlyteFile, parent_run: str, base: StageArtifact, previous: StageArtifact,
                      t2i_policy: StageArtifact, edit_policy: StageArtifact) -> StageArtifact:
    """The second annotation round: the first round's rows plus labels of the round-1 policies' samples."""
    cfg = load_config(config.download())
    result = run_annotate(cfg, base.uri, previous_uri=previous.uri,
                          policy_uris={"t2i": t2i_policy.uri, "edit": edit_policy.uri},
                          tracker=tracker_for(cfg, parent_run), progress=show_progress())
    return StageArtifact.of(result)
