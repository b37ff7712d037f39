"""Flyte tasks for stages `grpo_t2i` / `grpo_edit` and `grpo_mixed` (the Mix-RL baseline).

Runs under Flyte's Elastic plugin (torchrun inside the pod):
``FLOWRL_GRPO_PROCS`` processes per node, one per GPU, DDP across them (see
:mod:`flowrl.rl.distributed`). A retry resumes from the run's newest
complete checkpoint in the artifact store, so a preempted pod loses at most
``grpo.checkpoint_every`` iterations.
"""

import os

from flytekit import task
from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from tasks.types import GPU, StageArtifact, elastic, image, stage_cache, tracker_for, training_requests

PROCS = int(os.environ.get("FLOWRL_GRPO_PROCS", "1"))  # per node: one per GPU
NODES = int(os.environ.get("FLOWRL_GRPO_NODES", "1"))  # > 1: a PyTorchJob across nodes


@task(
    task_config=elastic(NODES, PROCS),
    shared_memory=True,  # /dev/shm as a memory-backed volume, for the workers' DataLoader and NCCL
    container_image=image("grpo"),
    requests=training_requests("grpo", PROCS),
    accelerator=GPU,
    retries=2,
    cache=stage_cache("grpo"),
)
def grpo(
    config: FlyteFile, parent_run: str, task_name: str, base: StageArtifact, reward_model: StageArtifact,
    prompts: StageArtifact,
) -> StageArtifact:
    from flowrl.rl.distributed import process_group
    from flowrl.stages.grpo import run_grpo

    with process_group():
        cfg = load_config(config.download())
        result = run_grpo(cfg, task_name, base.uri, reward_model.uri, prompts.uri, resume=True, progress=False,
                          tracker=tracker_for(cfg, parent_run))
    return StageArtifact.of(result)


@task(
    task_config=elastic(NODES, PROCS),
    shared_memory=True,  # /dev/shm as a memory-backed volume, for the workers' DataLoader and NCCL
    container_image=image("grpo"),
    requests=training_requests("grpo", PROCS),
    accelerator=GPU,
    retries=2,
    cache=stage_cache("grpo"),
)
def grpo_mixed(
    config: FlyteFile, parent_run: str, base: StageArtifact, reward_model: StageArtifact, t2i_prompts: StageArtifact,
    edit_prompts: StageArtifact,
) -> StageArtifact:
    """Mix-RL: one GRPO run on both prompt sets, each scored by its own task's reward."""
    from flowrl.rl.distributed import process_group
    from flowrl.stages.grpo import run_grpo

    with process_group():
        cfg = load_config(config.download())
        result = run_grpo(cfg, "mixed", base.uri, reward_model.uri, {"t2i": t2i_prompts.uri, "edit": edit_prompts.uri},
                          resume=True, progress=False, tracker=tracker_for(cfg, parent_run))
    return StageArtifact.of(result)

