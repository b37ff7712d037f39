"""Does the edit reward prefer doing nothing on instructions no stage trained on?

Not a test: it measures, it does not assert. Run from the repository root,
with the reward-model artifact of the shapes run:

    .venv/bin/python -m experiments.edit_reward_probe.edit_reward_probe --reward-model artifacts/reward_model/<version> \\
        --output experiments/edit_reward_probe/results/edit_reward_probe.json

For edit instructions of the train split and of the bench split (the texts
the bench holds out), the GRPO edit reward (``rewards.edit`` of the config:
the learned instruction scorer plus the identity term) scores two outputs per
item: the ideal one (the target scene, rendered) and a no-op (the source
image returned unchanged). A reward that generalises to unseen texts scores
the ideal output above the no-op on both splits.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from flowrl.machine import machine_info
from flowrl.config import load_config
from flowrl.rewards.shapes_rewards import load_shapes_rewards
from flowrl.shapes.edits import make_edit_set
from flowrl.shapes.render import render_batch


def probe(config_path: str, reward_model: str, per_kind: int, seed: int) -> dict:
    config = load_config(config_path)
    reward = load_shapes_rewards(config, reward_model)["edit"]
    out: dict = {}
    for split in ("train", "bench"):
        items = make_edit_set(seed, per_kind, split=split)
        sources = render_batch([e.source for e in items], config.world.resolution)
        ideal = render_batch([e.target for e in items], config.world.resolution)
        prompts = [e.instruction for e in items]
        with torch.no_grad():
            r_ideal = reward.score(ideal, prompts, sources=sources).numpy()
            r_noop = reward.score(sources, prompts, sources=sources).numpy()
        kinds = np.array([e.kind for e in items])
        out[split] = {
            kind: {"items": int((kinds == kind).sum()), "ideal": round(float(r_ideal[kinds == kind].mean()), 3),
                   "noop": round(float(r_noop[kinds == kind].mean()), 3),
                   "noop_at_least_ideal": round(float((r_noop >= r_ideal)[kinds == kind].mean()), 3)}
            for kind in dict.fromkeys(kinds)
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes.yaml")
    parser.add_argument("--reward-model", required=True, help="the reward_model stage's artifact (path or URI)")
    parser.add_argument("--per-kind", type=int, default=50)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output", default="experiments/edit_reward_probe/results/edit_reward_probe.json")
    args = parser.parse_args(argv)
    result = {
        "config": args.config, "reward_model": args.reward_model, "per_kind": args.per_kind, "seed": args.seed,
        "splits": probe(args.config, args.reward_model, args.per_kind, args.seed),
        "machine": {**machine_info(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for split, kinds in result["splits"].items():
        for kind, row in kinds.items():
            print(f"{split:5s} {kind:8s} ideal {row['ideal']:.3f}  no-op {row['noop']:.3f}  "
                  f"no-op >= ideal {100 * row['noop_at_least_ideal']:.0f} %")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
