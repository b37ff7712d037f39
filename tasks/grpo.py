"""Flyte tasks for stages `grpo_t2i` / `grpo_edit` (one run, or two rounds around a second annotation
round) and `grpo_mixed` (the Mix-RL baseline).

Run under Flyte's Elastic plugin: ``launch.grpo.procs`` worker processes per node (one per GPU) on
``launch.grpo.nodes`` nodes, DDP or ZeRO across them (see :mod:`flowrl.rl.distributed`). Both are
read from the config at registration and serialized into the task (:mod:`tasks.launch`). A retry
resumes from the run's newest complete checkpoint in the artifact store, so a preempted pod loses at
most ``grpo.loop.checkpoint_every`` iterations.
"""

from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from tasks.launch import check_workers, stage_task
from tasks.types import StageArtifact, show_progress, stage_cache, tracker_for


@stage_task("grpo", retries=2, cache=stage_cache("grpo"))
def grpo(
    config: FlyteFile, parent_run: str, task_name: str, base: StageArtifact, reward_model: StageArtifact,
    prompts: StageArtifact, rl_round: int = 0,
) -> StageArtifact:
    """``rl_round`` 0: the whole loop; 1: the first round of two (grpo.round1_iterations iterations)."""
    from flowrl.rl.distributed import process_group
    from flowrl.stages.grpo import run_grpo

    with process_group():
        cfg = load_config(config.download())
        check_workers("grpo", cfg)
        result = run_grpo(cfg, task_name, base.uri, reward_model.uri, prompts.uri, resume=True,
                          progress=show_progress(), tracker=tracker_for(cfg, parent_run), rl_round=rl_round or None)
    return StageArtifact.of(result)


@stage_task("grpo", retries=2, cache=stage_cache("grpo"))
def grpo_continued(
    config: FlyteFile, parent_run: str, task_name: str, base: StageArtifact, reward_model: StageArtifact,
    prompts: StageArtifact, init: StageArtifact,
) -> StageArtifact:
    """The second GRPO round: the policy starts from ``init`` (the first round's artifact), the KL reference
    stays the base, and the refreshed ``reward_model`` scores the remaining iterations."""
    from flowrl.rl.distributed import process_group
    from flowrl.stages.grpo import run_grpo

    with process_group():
        cfg = load_config(config.download())
        check_workers("grpo", cfg)
        result = run_grpo(cfg, task_name, base.uri, reward_model.uri, prompts.uri, resume=True,
                          progress=show_progress(), tracker=tracker_for(cfg, parent_run), init_uri=init.uri,
                          rl_round=2)
    return StageArtifact.of(result)


@stage_task("grpo", retries=2, cache=stage_cache("grpo"))
def grpo_mixed(
    config: FlyteFile, parent_run: str, base: StageArtifact, reward_model: StageArtifact, t2i_prompts: StageArtifact,
    edit_prompts: StageArtifact,
) -> StageArtifact:
    """Mix-RL: one GRPO run on both prompt sets, each scored by its own task's reward."""
    from flowrl.rl.distributed import process_group
    from flowrl.stages.grpo import run_grpo

    with process_group():
        cfg = load_config(config.download())
        check_workers("grpo", cfg)
        result = run_grpo(cfg, "mixed", base.uri, reward_model.uri, {"t2i": t2i_prompts.uri, "edit": edit_prompts.uri},
                          resume=True, progress=show_progress(), tracker=tracker_for(cfg, parent_run))
    return StageArtifact.of(result)
