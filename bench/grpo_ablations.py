"""GRPO ablations on the shapes world: one GRPO run per variant, one table.

Not a test: it measures, it does not assert. From the repository root:

    .venv/bin/python -m bench.grpo_ablations --task t2i --base URI --reward-model URI \\
        --prompts URI --output results/grpo_ablations.json

Variants change only the ``grpo`` keys named below against the config's
values (``--config``, default configs/shapes.yaml); every other key, the
prompts and the seed stay the same:

* ``cfg_hybrid`` (the config as is; hybrid CFG is the default), ``cfg_both``,
  ``cfg_none``: which velocity the rollouts follow and the objective sees;
* ``timesteps_all``: train on all N steps instead of K early ones (the
  reward-hacking question: does the training reward rise while the judge
  falls?).

``--set KEY=VALUE`` (repeatable) overrides a grpo key for every variant, and
``--variants`` picks a subset. Each run writes a normal grpo artifact under
``--artifacts``; the table holds, per variant, the judge's score on the
held-out evaluation set (headline and per category), fidelity, the final
training reward, the monitor curve, the early-stop reason if any, and wall
time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
from pathlib import Path

import yaml

from flowrl.config import FlowRLConfig, from_dict, load_config
from flowrl.stages.grpo import HEADLINE, run_grpo
from flowrl.tracking import NullTracker

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "cfg_hybrid": {},
    "cfg_both": {"cfg_mode": "both"},
    "cfg_none": {"cfg_mode": "none"},
    "timesteps_all": {"timesteps": "all"},
}


def _parse_sets(values: list[str]) -> dict:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects KEY=VALUE, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def with_grpo(config: FlowRLConfig, overrides: dict) -> FlowRLConfig:
    """``config`` with grpo keys replaced, validated like a config file."""
    merged = {**dataclasses.asdict(config.grpo), **overrides}
    grpo = from_dict(type(config.grpo), merged, "grpo.")
    return dataclasses.replace(config, grpo=grpo)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=("t2i", "edit"))
    parser.add_argument("--base", required=True)
    parser.add_argument("--reward-model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes.yaml"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--output", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: run.torch_threads)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.threads is not None:
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, torch_threads=args.threads))
    common = _parse_sets(args.set)
    table, base_metrics = {}, {}
    for name in args.variants:
        variant = with_grpo(config, {**common, **VARIANTS[name]})
        result = run_grpo(variant, args.task, args.base, args.reward_model, args.prompts,
                          output_root=args.artifacts, tracker=NullTracker(), progress=False)
        m = result.metrics
        base_metrics = m["base"]
        table[name] = {
            "grpo": {**common, **VARIANTS[name]},
            "judge": m["teacher"],
            "headline_delta": m["teacher"][HEADLINE[args.task]] - m["base"][HEADLINE[args.task]],
            "fidelity_delta": m["teacher"]["fidelity"] - m["base"]["fidelity"],
            "final_train_reward": m["final_train_reward"],
            "monitor": [(e["iteration"], e["heldout"], e["train_reward"]) for e in m["monitor"]],
            "hacking_warnings": [e["iteration"] for e in m["monitor"] if "hacking" in e],
            "stopped_early": m["stopped_early"],
            "wall_s": m["wall_s"],
            "artifact": result.uri,
        }
        print(json.dumps({name: table[name]}, indent=1), flush=True)
    payload = {
        "task": args.task,
        "config_hash": config.section_hash("run.seed", "world", "sampler", "eval", "grpo", "rewards"),
        "command": " ".join(["python -m bench.grpo_ablations", *(argv if argv is not None else sys.argv[1:])]),
        "base": base_metrics,
        "inputs": {"base": args.base, "reward_model": args.reward_model, "prompts": args.prompts},
        "variants": table,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
    }
    if args.output:
        _merge(Path(args.output), args.task, payload)
    return payload


def _merge(path: Path, task: str, payload: dict) -> None:
    """Add this run's variants to the task's table in ``path`` (several runners
    may share one file: the read-modify-write holds an exclusive lock)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = json.loads(path.read_text()) if path.is_file() else {}
        entry = previous.get(task)
        if entry is not None and entry.get("inputs") == payload["inputs"]:
            entry["variants"].update(payload["variants"])
        else:
            previous[task] = payload
        path.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
