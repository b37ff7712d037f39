"""Can the T2I reward tell GRPO which samples of a group are right, per category?

Not a test: it measures, it does not assert. GRPO learns only from groups in
which some samples are right and some wrong, and only if the composite reward
ranks the right ones higher. For train-split prompts of every category this
samples a group per prompt from the base with the GRPO rollout sampler (its
steps, noise level and CFG), scores the images with the composite T2I reward
and with the held-out judge, and reports per category: how often a sample is
right, how many groups are mixed (some right, some wrong), and within the
mixed groups the probability that the reward ranks a right sample above a
wrong one (AUC, ties half) and that the group's top-rewarded sample is right.
Run from the repository root:

    .venv/bin/python -m experiments.t2i_reward_probe.t2i_reward_probe --base artifacts/base/<version> \\
        --reward-model artifacts/reward_model/<version> --output experiments/t2i_reward_probe/results/t2i_reward_probe.json
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from experiments import provenance, write_result
from flowrl.config import load_config
from flowrl.evaluation import to_uint8
from flowrl.models import load_policy, set_torch_threads
from flowrl.rewards.shapes_rewards import load_shapes_rewards
from flowrl.rl.rollout import RolloutSettings, rollout
from flowrl.rl.trainer import seeded_generator
from flowrl.shapes import judge
from flowrl.shapes.prompts import make_t2i_set


def ranking_auc(right: np.ndarray, wrong: np.ndarray) -> float:
    """P(a right sample's reward > a wrong one's), ties counted half."""
    diff = right[:, None] - wrong[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def summarise(groups: list[tuple[np.ndarray, np.ndarray]]) -> dict:
    """groups: (judge verdicts [G] bool, rewards [G]) of one category's prompts."""
    mixed = [(ok, r) for ok, r in groups if 0 < ok.sum() < len(ok)]
    out = {"groups": len(groups), "p_right": round(float(np.mean([ok.mean() for ok, _ in groups])), 3),
           "mixed_groups": len(mixed), "auc_in_mixed": None, "top_is_right_in_mixed": None}
    if mixed:
        out["auc_in_mixed"] = round(float(np.mean([ranking_auc(r[ok], r[~ok]) for ok, r in mixed])), 3)
        out["top_is_right_in_mixed"] = round(float(np.mean([ok[np.argmax(r)] for ok, r in mixed])), 3)
    return out


@torch.no_grad()
def probe(config_path: str, base: str, reward_model: str, per_category: int, group_size: int, seed: int,
          threads: int | None = None) -> dict:
    config = load_config(config_path)
    set_torch_threads(threads if threads is not None else config.run.torch_threads)
    model = load_policy(base, config, "t2i")
    reward = load_shapes_rewards(config, reward_model)["t2i"]
    r = config.grpo.rollout
    settings = RolloutSettings(r.num_steps, r.noise_level, r.guidance_scale, r.cfg_mode)
    examples = make_t2i_set(seed, per_category, split="train")
    by_category: dict[str, list] = {}
    per_batch = 16
    for b, start in enumerate(range(0, len(examples), per_batch)):
        chunk = examples[start:start + per_batch]
        ro = rollout(model, [e.prompt for e in chunk], group_size, settings, seeded_generator(seed, b))
        total = reward.score_components(ro.images, ro.prompts, None).total.float().numpy()
        right = judge.t2i_correct_batch(to_uint8(ro.images), [e.spec for e in chunk for _ in range(group_size)])
        for i, e in enumerate(chunk):
            rows = slice(i * group_size, (i + 1) * group_size)
            by_category.setdefault(e.spec.category, []).append((np.asarray(right[rows], bool), total[rows]))
    return {category: summarise(groups) for category, groups in by_category.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes.yaml")
    parser.add_argument("--base", required=True, help="the base stage's artifact")
    parser.add_argument("--reward-model", required=True, help="the reward_model stage's artifact")
    parser.add_argument("--per-category", type=int, default=48)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=77)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: run.torch_threads)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args(argv)
    result = {
        "categories": probe(args.config, args.base, args.reward_model, args.per_category, args.group_size,
                            args.seed, args.threads),
        "inputs": {"base": args.base, "reward_model": args.reward_model},
        "per_category": args.per_category, "group_size": args.group_size, "seed": args.seed,
        **provenance("experiments.t2i_reward_probe.t2i_reward_probe", argv),
    }
    for category, row in result["categories"].items():
        print(category, row, flush=True)
    if args.output:
        write_result(args.output, result)
    return result


if __name__ == "__main__":
    main()
