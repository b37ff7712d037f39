"""Sharded ZeRO checkpoints, the sharded EMA and the held-out monitor, in one
plain process or under torchrun (two gloo processes).

Usage: python tests/rl/ddp_checkpoint.py OUT_DIR ZERO_STAGE  (or under torchrun).

1. ``fixed``: GRPO with EMA (decay 0.5) takes two updates on fixed global
   batches (every rank keeps its share, as in ddp_update.py), so one plain
   process takes the same ones; then the monitor runs on the EMA's weights
   and on the trained ones, and the final (EMA) weights are exported. Rank 0
   writes ``fixed.safetensors``, ``export.safetensors`` (the same weights,
   streamed by ``export_weights``) and ``fixed.json`` (the monitor's scores);
   every rank writes ``calls-<rank>.json`` (the iterations its monitor ran
   at).
2. ZERO_STAGE > 0 only: a GRPO run of three iterations with EMA, the monitor
   every iteration and a checkpoint every iteration (``store-a``); at each
   checkpoint the old full format (every parameter gathered, the moments
   assembled on every rank) is written beside it (``old-<iteration>.pt``)
   and the gathers made while the sharded checkpoint was written are
   counted. Then the same run killed after one iteration (``store-b``) and
   resumed from its checkpoint by a fresh trainer. After each run the module
   itself holds the exported (EMA) weights and the optimizer state is
   released (asserted here). Rank 0 writes
   ``runs.safetensors`` (``a.*``: the uninterrupted run's final weights,
   ``b.*``: the resumed one's) and ``runs.json``.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

from flowrl.config import GRPOConfig, LoopConfig, OptimConfig, RolloutConfig, WindowTimestepsConfig  # noqa: E402
from flowrl.rewards.base import RewardScores  # noqa: E402
from flowrl.rl.distributed import dist_info, init_from_env, shutdown  # noqa: E402
from flowrl.rl.grpo import GRPOTrainer, LocalRewards, PromptSet, settings_of  # noqa: E402
from flowrl.rl.rollout import rollout  # noqa: E402
from flowrl.rl.trainer import Checkpoints  # noqa: E402
from flowrl.storage import ArtifactStore  # noqa: E402
from tests.rl.conftest import tiny_model  # noqa: E402
from tests.rl.ddp_update import PROMPTS, _task_batch  # noqa: E402

RUN = "0123456789abcdef"  # the runs' version


class Brightness:
    def score_components(self, images, prompts, sources=None):
        total = images.mean(dim=(1, 2, 3))
        return RewardScores(total=total, components={"brightness": total})


def _monitor(cfg, calls):
    """Sample two held-out prompts with a fixed generator through the model as it is (partitioned
    under ZeRO-3); the scores are the images' mean and spread."""

    def monitor(model, iteration):
        calls.append(iteration)
        out = rollout(model, PROMPTS[:2], 1, settings_of(cfg), torch.Generator().manual_seed(11))
        return {"heldout": float(out.images.mean()), "fidelity": float(out.images.std())}

    return monitor


def _fixed(out: Path, zero: int, rank: int, world: int) -> None:
    cfg = GRPOConfig(prompts_per_iteration=4, group_size=3, rollout=RolloutConfig(num_steps=3),
                     timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=2), reward_chunks=1,
                     optim=OptimConfig(lr=1e-2, zero_stage=zero, ema_decay=0.5))
    model, calls = tiny_model(), []
    trainer = GRPOTrainer(model, model.net, None, cfg, PromptSet(PROMPTS, ["x"] * 4, None), rewards=None,
                          weights=lambda prompts: torch.ones(len(prompts), 1), monitor=_monitor(cfg, calls))
    for iteration, seed in enumerate((5, 7)):
        trainer.update({"": _task_batch(model, cfg, PROMPTS[::1 - 2 * iteration], None, rank, world, seed)},
                       iteration=iteration)
    scores = trainer._monitor_scores(2)  # on the EMA's weights
    ema, trainer.ema = trainer.ema, None
    live = trainer._monitor_scores(2)  # on the trained weights themselves
    trainer.ema = ema
    weights = trainer.final_weights()  # the EMA's, on rank 0
    trainer.export_weights(out / "export.safetensors")  # the same, streamed to a file by rank 0
    (out / f"calls-{rank}.json").write_text(json.dumps(calls))
    if rank == 0:
        save_file({k: v.contiguous() for k, v in weights.items()}, out / "fixed.safetensors")
        (out / "fixed.json").write_text(json.dumps({"ema": scores, "live": live}))
    trainer.engine.close()


class _Recording(GRPOTrainer):
    """Writes the old full format beside each checkpoint, and counts the gathers a checkpoint made."""

    out: Path
    gathers: list

    def _checkpoint(self):
        import deepspeed
        import deepspeed.utils

        counted = []
        originals = {"GatheredParameters": deepspeed.zero.GatheredParameters,
                     "safe_get_full_fp32_param": deepspeed.utils.safe_get_full_fp32_param,
                     "safe_get_full_optimizer_state": deepspeed.utils.safe_get_full_optimizer_state}

        def counting(name):
            def call(*args, **kwargs):
                counted.append(name)
                return originals[name](*args, **kwargs)
            return call

        deepspeed.zero.GatheredParameters = counting("GatheredParameters")
        deepspeed.utils.safe_get_full_fp32_param = counting("safe_get_full_fp32_param")
        deepspeed.utils.safe_get_full_optimizer_state = counting("safe_get_full_optimizer_state")
        try:
            super()._checkpoint()
        finally:
            deepspeed.zero.GatheredParameters = originals["GatheredParameters"]
            deepspeed.utils.safe_get_full_fp32_param = originals["safe_get_full_fp32_param"]
            deepspeed.utils.safe_get_full_optimizer_state = originals["safe_get_full_optimizer_state"]
        self.gathers.append(len(counted))
        weights, optimizer = self.engine.full_state_dict(), self.engine.optimizer_state()  # the old way
        if self.rank == 0:
            torch.save({"weights": weights, "optimizer": optimizer}, self.out / f"old-{self.state.iteration}.pt")


def _run(out: Path, zero: int, store: str, stop_after=None, resume=False, record=False):
    cfg = GRPOConfig(loop=LoopConfig(iterations=3, eval_every=1, checkpoint_every=1), prompts_per_iteration=2,
                     group_size=2, rollout=RolloutConfig(num_steps=2),
                     timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=1),
                     reward_chunks=1, optim=OptimConfig(lr=1e-2, zero_stage=zero, ema_decay=0.5))
    model, calls = tiny_model(), []
    rewards = LocalRewards(Brightness())
    cls = _Recording if record else GRPOTrainer
    trainer = cls(model, model.net, None, cfg, PromptSet(PROMPTS[:2], ["x", "y"], None), rewards,
                  weights=lambda prompts: torch.ones(len(prompts), 1), monitor=_monitor(cfg, calls),
                  checkpoints=Checkpoints(ArtifactStore(str(out / store)), "grpo_t2i", RUN))
    trainer.out, trainer.gathers = out, []
    skeleton_meta = all(p.device.type == "meta" for p in trainer.engine._skeleton.parameters()) \
        if trainer.engine.partitioned else None
    if resume:
        assert trainer.resume()
    try:
        result = trainer.train(progress=False, stop_after=stop_after)
    finally:
        rewards.close()
    # training over (the optimizer state released): the module itself now holds the exported weights
    settled = {}
    trainer.engine.export(None, lambda name, tensor: settled.__setitem__(name, tensor.clone()))
    assert rank_of() != 0 or (settled.keys() == result.module_state.keys()
                              and all(torch.equal(settled[k], v) for k, v in result.module_state.items()))
    assert not trainer.engine.master_flats()[0].numel()
    return result, trainer.gathers, skeleton_meta


def rank_of() -> int:
    return dist_info()[0]


def main(out: str, zero: str) -> None:
    torch.set_num_threads(1)
    init_from_env()
    rank, world = dist_info()
    out, zero = Path(out), int(zero)
    _fixed(out, zero, rank, world)
    if zero > 0:
        whole, gathers, skeleton_meta = _run(out, zero, "store-a", record=True)
        _run(out, zero, "store-b", stop_after=1)
        resumed, _, _ = _run(out, zero, "store-b", resume=True)
        if rank == 0:
            tensors = {f"a.{k}": v for k, v in whole.module_state.items()}
            tensors.update({f"b.{k}": v for k, v in resumed.module_state.items()})
            save_file({k: v.contiguous() for k, v in tensors.items()}, out / "runs.safetensors")
            (out / "runs.json").write_text(json.dumps({
                "monitor_a": whole.state.monitor, "monitor_b": resumed.state.monitor, "gathers": gathers,
                "skeleton_meta": skeleton_meta}))
        else:
            (out / f"empty-{rank}.json").write_text(json.dumps(len(whole.module_state)))
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as ddp_update.py: skip the interpreter's teardown once the group is left
