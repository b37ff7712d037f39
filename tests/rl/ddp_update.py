"""One GRPO update on a fixed global batch, in one process or under torchrun.

Usage: python tests/rl/ddp_update.py OUT.safetensors [single|subset|mixed|opd|resume] [ZERO_STAGE]  (or under
torchrun).
Every rank builds the same rollouts and advantages for the whole batch,
keeps its share of the prompt groups and takes the update; rank 0 writes the
updated weights. ``subset``: as ``single`` with only the blocks' qkv weights
trained (``grpo.trainable``, the rest frozen). ``mixed``: two tasks at once
(T2I and edit, Mix-RL), whose conditions differ, so the update accumulates
one backward per task. ``opd``:
one OPD iteration (both tasks, states from the student's own trajectories).
``resume``: one GRPO update, then the engine's checkpoint state (full
weights, AdamW state) is loaded into a second trainer on a fresh model, and
both take the same second update (rank 0 writes both: ``a.*`` and ``b.*``).
ZERO_STAGE 1-3 steps through DeepSpeed ZeRO instead of plain PyTorch / DDP.
"""

import dataclasses
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

from flowrl.config import GRPOConfig, OptimConfig, RolloutConfig, TimestepsConfig, WindowTimestepsConfig  # noqa: E402
from flowrl.rl.distributed import dist_info, init_from_env, shutdown  # noqa: E402
from flowrl.rl.grpo import GRPOTrainer, IterationOutput, PromptSet, settings_of  # noqa: E402
from flowrl.rl.objectives import group_advantages  # noqa: E402
from flowrl.rl.rollout import rollout  # noqa: E402
from flowrl.rewards.base import RewardScores  # noqa: E402
from tests.rl.conftest import tiny_model  # noqa: E402

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a red square above a blue circle"]
EDITS = ["make the red circle blue", "remove the blue square", "add a green triangle", "move the circle left"]
GROUP = 3
SUBSET = ("blocks.*.qkv.*",)  # the ``subset`` mode's grpo.trainable


def _task_batch(model, cfg, prompts, sources, rank, world, seed):
    full = rollout(model, prompts, GROUP, settings_of(cfg), torch.Generator().manual_seed(seed), sources)
    reward = full.images.mean(dim=(1, 2, 3))  # brighter is better: any deterministic reward will do
    adv = group_advantages(reward[:, None], torch.ones(len(reward), 1), full.group_ids)
    share = len(prompts) // world * GROUP
    rows = torch.arange(rank * share, (rank + 1) * share)
    return IterationOutput(full.select(rows), RewardScores(reward[rows], {"r": reward[rows]}), adv[rows], [])


def main(out: str, mode: str = "single", zero_stage: str = "0") -> None:
    torch.set_num_threads(1)
    init_from_env()
    rank, world = dist_info()
    cfg = GRPOConfig(prompts_per_iteration=4, group_size=GROUP, rollout=RolloutConfig(num_steps=3),
                     timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=2), reward_chunks=1,
                     optim=OptimConfig(lr=1e-3, zero_stage=int(zero_stage)),
                     trainable=SUBSET if mode == "subset" else ())
    if mode == "variants":  # the algorithm variants at once: CPS on a sliding SDE window, AB2 outside it,
        # GRPO-Guard's ratio, two epochs (the second compares against the rollouts' kept means)
        cfg = dataclasses.replace(
            cfg, rollout=RolloutConfig(num_steps=3, dynamics="cps", noise_level=0.9, sde_steps=2,
                                       sde_slide_every=1, ode_solver="ab2"),
            timesteps=WindowTimestepsConfig(per_trajectory=1), ratio_norm=True, epochs=2)
    if mode == "ptx":  # the pretraining mix: each rank its share of one batch, reduced with the RL gradient
        cfg = dataclasses.replace(cfg, ptx_coef=0.5, ptx_batch_size=8)
    model = tiny_model()
    if mode == "opd":
        from flowrl.config import OPDConfig
        from flowrl.rl.opd import OPDTrainer

        sources = torch.rand(len(EDITS), 3, 32, 32, generator=torch.Generator().manual_seed(9))
        trainer = OPDTrainer(model, model.net, {"t": tiny_model(seed=1)},
                             OPDConfig(prompts_per_iteration=8, num_steps=3,
                                       timesteps=TimestepsConfig(per_trajectory=2),
                                       optim=OptimConfig(lr=1e-3, zero_stage=int(zero_stage))),
                             {"t2i": PromptSet(PROMPTS, ["x"] * 4, None), "edit": PromptSet(EDITS, ["y"] * 4, sources)},
                             {"t2i": "t", "edit": "t"}, {"t2i": 0.5, "edit": 0.5}, guidance_scale=3.0)
        trainer.step(0)
    elif mode == "resume":
        _resume(out, cfg, rank, world)
        shutdown()
        return
    else:
        trainer = _grpo_update(model, cfg, mode, rank, world)
    # the weights, and Adam's first moment: (1 - beta1) x the (all-reduced) gradient after one step
    tensors = _engine_tensors(trainer, model)
    if rank == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    shutdown()


def _engine_tensors(trainer, model, prefix=""):
    """Weights and AdamW moments in the engines' common checkpoint format (assembled from the
    ranks' partitions under ZeRO: every rank must call it)."""
    weights, optimizer = trainer.engine.full_state_dict(), trainer.engine.optimizer_state()
    names = [n for n, _ in model.net.named_parameters()]
    tensors = {prefix + k: v for k, v in weights.items()}
    tensors.update({f"{prefix}grad.{names[i]}": entry["exp_avg"] / 0.1 for i, entry in optimizer["state"].items()})
    tensors.update({f"{prefix}sq.{names[i]}": entry["exp_avg_sq"] for i, entry in optimizer["state"].items()})
    return tensors


def _resume(out, cfg, rank, world):
    weights = lambda prompts: torch.ones(len(prompts), 1)  # noqa: E731
    first, second = tiny_model(), tiny_model(seed=3)  # the second's own weights are all overwritten
    a = GRPOTrainer(first, first.net, None, cfg, PromptSet(PROMPTS, ["x"] * 4, None), rewards=None, weights=weights)
    a.update({"": _task_batch(first, cfg, PROMPTS, None, rank, world, 5)}, iteration=0)
    b = GRPOTrainer(second, second.net, None, cfg, PromptSet(PROMPTS, ["x"] * 4, None), rewards=None,
                    weights=weights)
    b.engine.load_full_state_dict(a.engine.full_state_dict())
    b.engine.load_optimizer_state(a.engine.optimizer_state())
    batch = {"": _task_batch(first, cfg, PROMPTS[::-1], None, rank, world, 7)}
    a.update(batch, iteration=1)
    b.update(batch, iteration=1)
    tensors = {**_engine_tensors(a, first, "a."), **_engine_tensors(b, second, "b.")}
    if rank == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, out)


def _grpo_update(model, cfg, mode, rank, world):
    weights = lambda prompts: torch.ones(len(prompts), 1)  # noqa: E731
    if mode == "mixed":
        sources = torch.rand(len(EDITS), 3, 32, 32, generator=torch.Generator().manual_seed(9))
        trainer = GRPOTrainer(model, model.net, None, cfg,
                              {"t2i": PromptSet(PROMPTS, ["x"] * 4, None), "edit": PromptSet(EDITS, ["y"] * 4, sources)},
                              rewards={"t2i": None, "edit": None}, weights={"t2i": weights, "edit": weights})
        batch = {"t2i": _task_batch(model, cfg, PROMPTS, None, rank, world, 5),
                 "edit": _task_batch(model, cfg, EDITS, sources, rank, world, 6)}
    else:
        from flowrl.pretrain import supervised_loss

        def supervised(model_, iteration, minibatch, rank_, world_):
            return supervised_loss(model_, cfg.ptx_batch_size, 0.5, 0.1, 32, 7, iteration, minibatch, rank_, world_)

        trainer = GRPOTrainer(model, model.net, None, cfg, PromptSet(PROMPTS, ["x"] * 4, None), rewards=None,
                              weights=weights, supervised=supervised)
        batch = {"": _task_batch(model, cfg, PROMPTS, None, rank, world, 5)}
    trainer.update(batch, iteration=0)
    return trainer


if __name__ == "__main__":
    main(*sys.argv[1:])
    # The update is written and the group left (shutdown() above). Skip the interpreter's teardown:
    # once in CI, under load, rank 1 of a mixed DDP run died there with "terminate called without an
    # active exception" after rank 0 had saved the correct update (most likely a gloo thread outliving the
    # group; not reproduced here). The CLI under torchrun still exits normally and may meet the same abort.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
