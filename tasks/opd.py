"""Flyte task for stages `opd` / `opd_offpolicy`, and the switch of the optional branches.

Like GRPO, OPD runs under Flyte's Elastic plugin (``launch.opd.procs`` processes on
``launch.opd.nodes`` nodes, fixed at registration: :mod:`tasks.launch`) and a retry resumes from
the newest complete checkpoint. The teachers are frozen and share the student's device.
"""

from typing import NamedTuple

from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from tasks.launch import check_workers, stage_task
from tasks.types import StageArtifact, show_progress, stage_cache, tracker_for

Switches = NamedTuple("Switches", [("mix_rl", bool), ("offpolicy", bool)])


@stage_task("default")
def branch_switches(config: FlyteFile) -> Switches:
    """Which optional branches the config turns on (pipeline.mix_rl, pipeline.offpolicy_ablation)."""
    p = load_config(config.download()).pipeline
    return Switches(mix_rl=p.mix_rl, offpolicy=p.offpolicy_ablation)


@stage_task("default")
def skipped(stage: str) -> StageArtifact:
    """The value of a branch the config turned off: no artifact (empty uri)."""
    return StageArtifact(stage=stage, version="", uri="", mlflow_run_id="", metrics={})


@stage_task("opd", retries=2, cache=stage_cache("opd"))
def opd(
    config: FlyteFile, parent_run: str, base: StageArtifact, t2i_teacher: StageArtifact, edit_teacher: StageArtifact,
    t2i_prompts: StageArtifact, edit_prompts: StageArtifact, states: str,
) -> StageArtifact:
    from flowrl.rl.distributed import process_group
    from flowrl.stages.opd import run_opd

    with process_group():
        cfg = load_config(config.download())
        check_workers("opd", cfg)
        result = run_opd(
            cfg, base.uri,
            {"t2i_teacher": t2i_teacher.uri, "edit_teacher": edit_teacher.uri},
            {"t2i": t2i_prompts.uri, "edit": edit_prompts.uri}, states=states, resume=True, progress=show_progress(),
            tracker=tracker_for(cfg, parent_run),
        )
    return StageArtifact.of(result)
