"""One GRPO update on a fixed global batch, in one process or under torchrun.

Usage: python tests/rl/ddp_update.py OUT.safetensors  (or under torchrun).
Every rank builds the same rollouts and advantages for the whole batch,
keeps its share of the prompt groups and takes the update; rank 0 writes the
updated weights.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from safetensors.torch import save_file  # noqa: E402

from flowrl.config import GRPOConfig  # noqa: E402
from flowrl.rl.distributed import dist_info, init_from_env, shutdown  # noqa: E402
from flowrl.rl.grpo import GRPOTrainer, IterationOutput, PromptSet, settings_of  # noqa: E402
from flowrl.rl.objectives import group_advantages  # noqa: E402
from flowrl.rl.rollout import rollout  # noqa: E402
from flowrl.rewards.base import RewardScores  # noqa: E402
from tests.rl.conftest import tiny_model  # noqa: E402

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a red square above a blue circle"]
GROUP = 3


def main(out: str) -> None:
    torch.set_num_threads(1)
    init_from_env()
    rank, world = dist_info()
    cfg = GRPOConfig(prompts_per_iteration=4, group_size=GROUP, num_steps=3, timestep_fraction=1.0,
                     timesteps_per_trajectory=2, reward_chunks=1, lr=1e-3)
    model = tiny_model()
    trainer = GRPOTrainer(model, model.net, None, cfg, PromptSet(PROMPTS, ["x"] * 4, None), rewards=None,
                          weights=lambda prompts: torch.ones(len(prompts), 1))
    full = rollout(model, PROMPTS, GROUP, settings_of(cfg), torch.Generator().manual_seed(5))
    reward = full.images.mean(dim=(1, 2, 3))  # brighter is better: any deterministic reward will do
    adv = group_advantages(reward[:, None], torch.ones(len(reward), 1), full.group_ids)
    share = len(PROMPTS) // world * GROUP
    rows = torch.arange(rank * share, (rank + 1) * share)
    local = IterationOutput(full.select(rows), RewardScores(reward[rows], {"r": reward[rows]}), adv[rows], [])
    trainer.update(local, iteration=0)
    if rank == 0:
        # the weights, and Adam's first moment: (1 - beta1) x the (all-reduced) gradient after one step
        names = {id(p): n for n, p in model.net.named_parameters()}
        moments = {f"grad.{names[id(p)]}": trainer.optimizer.state[p]["exp_avg"] / 0.1
                   for p in model.net.parameters() if p in trainer.optimizer.state}
        tensors = {**model.net.state_dict(), **moments}
        save_file({k: v.contiguous() for k, v in tensors.items()}, out)
    shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
