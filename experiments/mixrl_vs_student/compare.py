"""Mix-RL against the OPD student on one budget: the experiment config, and the summary of its bench.

``config`` writes configs/shapes.yaml with the workflow's two ablation branches switched on
(``pipeline.mix_rl``: one GRPO run on both tasks' prompts, as many groups per iteration as the two
teachers together; ``pipeline.offpolicy_ablation``: OPD on the teachers' own trajectories). Every other
section is the default run's, so the stages they share are the default run's artifacts.

``summarize`` reads the bench of all six models and writes the comparison the study reports: each
model's two-task mean (T2I alignment and edit accuracy weighed equally) and the paired bootstrap
intervals of the differences student - mix_rl, student_offpolicy - mix_rl and student -
student_offpolicy, with a verdict that says which way each fell (an interval that holds 0 is a tie).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from flowrl.config import load_config

SWITCHES = {"mix_rl": True, "offpolicy_ablation": True}
CONTRASTS = (("student", "mix_rl"), ("student_offpolicy", "mix_rl"), ("student", "student_offpolicy"))


def write_config(base: Path, output: Path) -> None:
    """``base`` with the ablation switches on, checked by the loader before it is written."""
    data = yaml.safe_load(base.read_text())
    data.setdefault("pipeline", {}).update(SWITCHES)
    output.parent.mkdir(parents=True, exist_ok=True)
    text = f"# written by experiments/mixrl_vs_student/compare.py from {base}: the ablation branches on\n" + \
        yaml.safe_dump(data, sort_keys=False)
    output.write_text(text)
    load_config(output)  # a key the loader refuses fails here, not an hour into the run


def _difference(two_task: dict, a: str, b: str) -> dict:
    """``a - b`` from the bench's pairwise differences, whichever order the bench listed them in."""
    diffs = two_task["differences"]
    if f"{a}-{b}" in diffs:
        return dict(diffs[f"{a}-{b}"])
    if f"{b}-{a}" in diffs:
        d = diffs[f"{b}-{a}"]
        return {"delta": -d["delta"], "ci_low": -d["ci_high"], "ci_high": -d["ci_low"], "stderr": d["stderr"]}
    raise KeyError(f"the bench compared no pair {a!r} / {b!r} (it has {', '.join(sorted(diffs))})")


def verdict(a: str, b: str, d: dict) -> str:
    if d["ci_low"] > 0:
        return f"{a} above {b}: {d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
    if d["ci_high"] < 0:
        return f"{a} below {b}: {d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
    return f"{a} and {b} not told apart: {d['delta']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def summary(bench_results: dict) -> dict:
    """The study's table from a ``flowrl bench --results`` file of the six models."""
    metrics = bench_results["metrics"]
    two_task = metrics["two_task"]
    out = {"two_task_mean": {m: two_task["means"][m] for m in ("base", "student", "student_offpolicy", "mix_rl")},
           "contrasts": {}, "verdicts": []}
    for a, b in CONTRASTS:
        d = _difference(two_task, a, b)
        out["contrasts"][f"{a}-{b}"] = d
        out["verdicts"].append(verdict(a, b, d))
    out["gains"] = {m: metrics["gains"][m] for m in ("student", "student_offpolicy", "mix_rl")}
    out["confidence"] = metrics["gains_bootstrap"]["confidence"]
    out["bench_version"] = metrics["bench_version"]
    for key in ("command", "code_version", "config_hash", "machine"):
        out[key] = bench_results[key]
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("config", help="write the experiment config")
    c.add_argument("--base", type=Path, default=Path("configs/shapes.yaml"))
    c.add_argument("--output", type=Path, required=True)
    s = sub.add_parser("summarize", help="the comparison from the bench of all six models")
    s.add_argument("--bench", type=Path, required=True)
    s.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "config":
        write_config(args.base, args.output)
    else:
        result = summary(json.loads(args.bench.read_text()))
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print("\n".join(result["verdicts"]))


if __name__ == "__main__":
    main()
