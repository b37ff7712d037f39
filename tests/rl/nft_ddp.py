"""One DiffusionNFT update on a fixed global batch, in one process or under torchrun.

Usage: python tests/rl/nft_ddp.py OUT.safetensors  (or under torchrun).
Every rank samples the same clean images for all prompts, scores them and takes its share of the prompt
groups (with its global row offset, which seeds each sample's noisings); the sampling policy is moved off the
policy first, and a KL term to a reference model is on, so every part of the loss reaches the gradient. Rank 0
writes the updated weights and AdamW's first moment (the all-reduced gradient, ``grad.*``).
"""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

from flowrl.config import GRPOConfig, NFTConfig, OptimConfig, RolloutConfig  # noqa: E402
from flowrl.rewards.base import RewardScores  # noqa: E402
from flowrl.rl.distributed import dist_info, init_from_env, shutdown  # noqa: E402
from flowrl.rl.grpo import PromptSet  # noqa: E402
from flowrl.rl.nft import NFTBatch, NFTTrainer  # noqa: E402
from flowrl.rl.objectives import group_advantages  # noqa: E402
from tests.rl.conftest import tiny_model  # noqa: E402

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a red square above a blue circle"]
GROUP = 3


def main(out: str) -> None:
    torch.set_num_threads(1)
    init_from_env()
    rank, world = dist_info()
    cfg = GRPOConfig(algorithm="nft", prompts_per_iteration=4, group_size=GROUP, rollout=RolloutConfig(num_steps=3),
                     reward_chunks=1, kl_coef=0.1, optim=OptimConfig(lr=1e-3),
                     nft=NFTConfig(timesteps_per_sample=2, beta=0.5))
    model = tiny_model()
    trainer = NFTTrainer(model, model.net, tiny_model(seed=1), cfg, PromptSet(PROMPTS, ["x"] * 4, None),
                         rewards=None, weights=None)
    trainer.old.decay = 0.5  # theta_old halfway to another network's weights: v_old differs from v
    trainer.old.update(tiny_model(seed=2).net)
    cond, latents, images = trainer._sample(PROMPTS, None, torch.Generator().manual_seed(5))
    reward = images.mean(dim=(1, 2, 3))  # brighter is better: any deterministic reward will do
    group_ids = torch.arange(len(PROMPTS)).repeat_interleave(GROUP)
    adv = group_advantages(reward[:, None], torch.ones(len(reward), 1), group_ids)
    share = len(PROMPTS) // world * GROUP
    rows = torch.arange(rank * share, (rank + 1) * share)
    prompts = [p for p in PROMPTS for _ in range(GROUP)]
    batch = NFTBatch([prompts[i] for i in rows.tolist()], group_ids[rows], cond.index(rows), latents[rows],
                     RewardScores(reward[rows], {"r": reward[rows]}), adv[rows], first_row=rank * share)
    trainer.update(batch, iteration=0)
    names = [n for n, _ in model.net.named_parameters()]
    tensors = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
    tensors.update({f"grad.{names[i]}": entry["exp_avg"] / 0.1
                    for i, entry in trainer.engine.optimizer_state()["state"].items()})
    if rank == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
    # as tests/rl/ddp_update.py: the update is written and the group left; skip the interpreter's teardown,
    # where a gloo thread outliving the group has aborted a rank under load
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
