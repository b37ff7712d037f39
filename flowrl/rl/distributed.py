"""Data-parallel training helpers (torchrun / Flyte Elastic; gloo on CPU, nccl on GPU).

Each rank samples and scores its own share of an iteration's prompt groups
(a group never spans ranks, so the group-normalised advantages need no
communication); the trainer's engine (:mod:`flowrl.rl.engine`: DDP or
DeepSpeed ZeRO) averages the gradients, which with equal shares is the
gradient of the global mean loss: the same update as one process on the
whole batch.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
import torch.distributed as dist



def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return True


@contextlib.contextmanager
def process_group():
    """Join torchrun's process group for the block (when launched by it) and
    leave it cleanly afterwards, whatever happens inside. Yields this process's
    (rank, world size): after the block the group is gone and `dist_info()`
    answers (0, 1) on every rank, so whatever only rank 0 should do afterwards
    (print the artifact URI, write a results file) keys on this value."""
    init_from_env()
    try:
        yield dist_info()
    finally:
        shutdown()


def mean_across_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Average each metric over the ranks (identity in one process)."""
    _, world = dist_info()
    if world == 1 or not metrics:
        return metrics
    keys = sorted(metrics)
    values = torch.tensor([metrics[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    return {k: float(v) / world for k, v in zip(keys, values)}


def broadcast(obj):
    """Rank 0's ``obj`` on every rank."""
    _, world = dist_info()
    if world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if dist_info()[1] > 1:
        dist.barrier()


def destroy() -> None:
    """Destroy the default process group, through DeepSpeed when it has used it (DeepSpeed keeps
    its own handles on the group, which must go with it, or a later group in this process would
    meet stale ones)."""
    deepspeed_comm = sys.modules.get("deepspeed.comm.comm")
    if deepspeed_comm is not None and getattr(deepspeed_comm, "cdb", None) is not None:
        deepspeed_comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def shutdown() -> None:
    """Leave the process group cleanly (gloo's threads must stop before the interpreter exits)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        destroy()
