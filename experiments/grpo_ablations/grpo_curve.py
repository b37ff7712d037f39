"""Gain over time of one GRPO run: the judge on the full held-out sets at every checkpoint.

Not a test: it measures, it does not assert. The GRPO issue asks for +0.20 T2I
alignment; docs/design.md (The shapes world) says that if this needs more than the 10-minute
budget, reach it and report the gain-over-time curve. The run's own held-out
monitor (10 prompts per category every ``grpo.loop.eval_every`` iterations) is too
noisy to read a curve from, so this judges the base and each complete
checkpoint of the run (``<stage>.checkpoints/<version>-<iteration>``) with the
deployment sampler on the same held-out sets as the stage's final evaluation
(``evaluate_shapes``). Run from the repository root:

    .venv/bin/python -m experiments.grpo_ablations.grpo_curve --run artifacts/grpo_t2i/<version> \\
        --base artifacts/base/<version> --output experiments/grpo_ablations/results/grpo_curve.json

Training time at a checkpoint is the sum of the run's ``time/iteration_s`` up to
it (rollouts, rewards and updates; the monitor's evaluations are not counted).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safetensors.torch import load_file

from flowrl.config import load_config
from flowrl.evaluation import evaluate_shapes
from flowrl.machine import machine_info
from flowrl.models import load_policy, set_torch_threads, trainable_module
from flowrl.plots import new_figure, png_of
from flowrl.stages.grpo import HEADLINE
from flowrl.rl.trainer import Checkpoints
from flowrl.storage import ArtifactStore, fetch, input_identity, read_manifest

KEPT = ("fidelity", "t2i/alignment", "edit/accuracy", "edit/identity")


def checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """[(iteration, directory)] of the run's complete checkpoints, oldest first."""
    manifest = read_manifest(str(run_dir))
    found = Checkpoints(ArtifactStore(str(run_dir.parent.parent)), manifest.stage, manifest.version).complete()
    if not found:
        raise SystemExit(f"{run_dir}: no complete checkpoint of {manifest.stage} {manifest.version}")
    return [(iteration, Path(fetch(uri))) for iteration, uri in found]


def judged(metrics: dict) -> dict:
    return {k: round(float(v), 4) for k, v in metrics.items()
            if k in KEPT or k.startswith(("t2i/alignment/", "edit/accuracy/"))}


def measure(config_path: str, run: str, base: str, threads: int | None) -> dict:
    config = load_config(config_path)
    set_torch_threads(threads if threads is not None else config.run.torch_threads)
    run_dir, stage = Path(run), read_manifest(run).stage
    task = stage.removeprefix("grpo_")
    headline = HEADLINE[task]
    steps = json.loads((run_dir / "history.json").read_text())["history"]
    elapsed = [0.0]
    for row in steps:
        elapsed.append(elapsed[-1] + float(row["time/iteration_s"]))
    model = load_policy(base, config, task)
    start = time.perf_counter()
    points = [{"iteration": 0, "train_s": 0.0, **judged(evaluate_shapes(model, config).metrics)}]
    net = trainable_module(model)
    for iteration, path in checkpoints(run_dir):
        net.load_state_dict(load_file(path / "model.safetensors"))
        point = {"iteration": iteration, "train_s": round(elapsed[min(iteration, len(elapsed) - 1)], 1),
                 **judged(evaluate_shapes(model, config).metrics)}
        points.append(point)
        print(json.dumps({k: point[k] for k in ("iteration", "train_s", headline, "fidelity")}), flush=True)
    first = points[0]
    for point in points:
        point["headline_delta"] = round(point[headline] - first[headline], 4)
        point["fidelity_delta"] = round(point["fidelity"] - first["fidelity"], 4)
    return {"run": run, "base": base, "task": task, "headline": headline, "points": points,
            "eval_s": round(time.perf_counter() - start, 1)}


def plot(result: dict, target: float, fidelity_bound: float) -> bytes:
    points = result["points"]
    minutes = [p["train_s"] / 60 for p in points]
    fig, ax = new_figure(7, 4)
    ax.plot(minutes, [p["headline_delta"] for p in points], "o-", label=f"{result['headline']} - base")
    ax.plot(minutes, [p["fidelity_delta"] for p in points], "s--", label="fidelity - base")
    ax.axhline(target, color="tab:green", lw=1, ls=":", label=f"target +{target:.2f}")
    ax.axhline(-fidelity_bound, color="tab:red", lw=1, ls=":", label=f"fidelity bound -{fidelity_bound:.2f}")
    ax.axhline(0, color="black", lw=0.5)
    for p, x in zip(points, minutes):
        ax.annotate(str(p["iteration"]), (x, p["headline_delta"]), textcoords="offset points", xytext=(0, 6),
                    ha="center", fontsize=7)
    ax.set_xlabel("training time on this machine (minutes; labels: iteration)")
    ax.set_ylabel("judge, held-out sets: change from base")
    ax.set_title("GRPO gain over time")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    return png_of(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes.yaml")
    parser.add_argument("--run", required=True, help="a GRPO stage's artifact directory")
    parser.add_argument("--base", required=True, help="the base stage's artifact the run started from")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--target", type=float, default=0.20, help="the headline gain the issue asks for")
    parser.add_argument("--fidelity-bound", type=float, default=0.02)
    parser.add_argument("--output", required=True, help="results JSON; the PNG is written beside it")
    args = parser.parse_args(argv)
    inputs = read_manifest(args.run).inputs
    if inputs.get("base") is not None and input_identity(inputs["base"]) != input_identity(args.base):
        raise SystemExit(f"--base {args.base}: the run {args.run} started from {inputs['base']}")
    result = measure(args.config, args.run, args.base, args.threads)
    result["machine"] = machine_info()
    result["command"] = " ".join(["python -m experiments.grpo_ablations.grpo_curve", *(argv if argv is not None else [])])
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".png").write_bytes(plot(result, args.target, args.fidelity_bound))
    out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
