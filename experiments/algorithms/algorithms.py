"""RL algorithms side by side on the shapes world, each on the same wall-clock budget.

Not a test: it measures, it does not assert. Every variant trains from the same base, reward models and
curated prompts with the config's keys (``--config``, default configs/shapes.yaml) except the ``grpo`` keys
its entry in ``VARIANTS`` names, and stops once its iterations have taken ``--budget-s`` seconds of training
(``grpo.loop.time_budget_s``; the held-out monitor's evaluations are not counted). The monitor (the judge on
the held-out monitor prompts) runs every ``--eval-every`` iterations, so each run leaves a curve of judge
score against training seconds; the stage then judges base and trained policy on the evaluation split.

Two steps, from the repository root (``make results/algorithms_shapes.json`` runs both on the chain of
configs/shapes.yaml in artifacts/):

    .venv/bin/python -m experiments.algorithms.algorithms run --task t2i --base URI --reward-model URI \\
        --prompts URI --budget-s 360 --variants grpo dance_sde --output experiments/algorithms/results/runs.json
    .venv/bin/python -m experiments.algorithms.algorithms summarize \\
        --runs experiments/algorithms/results/runs.json --output results/algorithms_shapes.json

``run`` adds its variants to the task's table in ``--output`` (several runners may share the file);
``summarize`` writes the results file (``variants``: name -> task -> {judge_gain, judge_gain_stderr,
reward_gain, hacking_gap, fidelity_delta, wall_s, wall_to_0_10_s, wall_to_0_15_s}) and its plot beside it.

What the numbers mean:

* ``judge_gain``: the judge's headline (T2I alignment, edit accuracy) of the trained policy minus the base's,
  on the evaluation split; ``judge_gain_stderr`` its standard error, sqrt(se_base^2 + se_trained^2) (the two
  scores' own standard errors over the split's items, taken as independent; a paired one, smaller when the two
  models tend to get the same items right, would need the per-item scores).
* ``reward_gain``: the mean training reward over the last 10 iterations minus that over the first 10 (each
  variant's own samples: an ODE sampler's rewards, as DiffusionNFT's, sit at another level than an SDE's, so
  compare the gains, not the levels).
* ``hacking_gap``: how far the held-out monitor score ended below its best while the training reward ended
  above its value at that best (0 when either did not happen).
* ``fidelity_delta``: the judge's fidelity (palette and texture) of the trained policy minus the base's.
* ``wall_s``: seconds of training the run took (the budget, overshot by at most one iteration).
* ``wall_to_0_10_s`` / ``wall_to_0_15_s``: training seconds to the first monitor evaluation at +0.10 / +0.15
  over the run's iteration-0 monitor score, or null; ``best_monitor_gain`` says how far it got.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

from flowrl.config import load_config
from flowrl.machine import machine_info
from flowrl.stages.grpo import HEADLINE, SECTIONS as GRPO_SECTIONS, run_grpo
from flowrl.tracking import NullTracker
from experiments.grpo_ablations.grpo_ablations import _merge, with_grpo

ROOT = Path(__file__).resolve().parents[2]
# name -> the grpo keys it changes (nested as the section is). ``grpo`` is the recipe's algorithm as
# configs/shapes.yaml runs it (Flow-SDE over the whole schedule, K = 2 steps trained from its first half).
VARIANTS: dict[str, dict] = {
    "grpo": {},
    # DanceGRPO's SDE: a constant noise scale a instead of a sqrt(t / (1 - t))
    "dance_sde": {"rollout": {"dynamics": "dance"}},
    # coefficient-preserving sampling: each step keeps the signal and noise coefficients of the schedule
    "cps": {"rollout": {"dynamics": "cps"}},
    # MixGRPO: SDE on a window of 2 steps that slides from the noisiest toward the clean end (one step every
    # 15 iterations), ODE (second-order multistep) elsewhere; the trained steps are the window's
    "mixgrpo": {"rollout": {"sde_steps": 2, "sde_slide_every": 15, "ode_solver": "ab2"}},
    # GRPO-Guard: the ratio normalised per step (centred, step noise divided out) before the clip
    "grpo_guard": {"ratio_norm": True},
    # DiffusionNFT: forward-process training on the clean samples of an ODE sampler, no log-probs
    "nft": {"algorithm": "nft"},
}
TARGETS = (0.10, 0.15)


def _gain_to(monitor: list[dict], target: float) -> float | None:
    """Training seconds at the first monitor entry ``target`` above the first one (iteration 0), or None."""
    start = monitor[0]["heldout"]
    for entry in monitor:
        if entry["heldout"] - start >= target - 1e-12:
            return round(float(entry["train_s"]), 1)
    return None


def hacking_gap(monitor: list[dict], history_rewards: list[float]) -> float:
    """How far the held-out score ended below its best while the training reward ended above its value
    there (the 10-iteration mean the monitor records; at iteration 0, before any training reward, the mean
    of the first 10 iterations' rewards: the base's own level); 0 when either did not happen."""
    def reward_at(entry: dict) -> float | None:
        if entry["train_reward"] is None and entry["iteration"] == 0 and history_rewards:
            return sum(history_rewards[:10]) / len(history_rewards[:10])
        return entry["train_reward"]

    best = max(monitor, key=lambda e: e["heldout"])
    last = monitor[-1]
    if best is last or reward_at(best) is None or reward_at(last) is None:
        return 0.0
    fell = best["heldout"] - last["heldout"]
    rose = reward_at(last) - reward_at(best)
    return round(float(fell), 4) if fell > 0 and rose > 0 else 0.0


def monitor_curve(monitor: list[dict], history: list[dict]) -> list[dict]:
    """The monitor entries with ``train_s``, the training seconds (the iterations' own, as the budget counts
    them) spent before each evaluation."""
    spent = [0.0]
    for h in history:
        spent.append(spent[-1] + h["time/iteration_s"])
    return [{"train_s": round(spent[e["iteration"]], 2),
             **{k: e[k] for k in ("iteration", "heldout", "train_reward", "fidelity") if k in e}} for e in monitor]


def summary_of(entry: dict, task: str) -> dict:
    """The results file's keys for one run (see the module docstring)."""
    head = HEADLINE[task]
    base, trained = entry["base"], entry["judge"]
    se = math.sqrt(base.get(f"{head}_stderr", 0.0) ** 2 + trained.get(f"{head}_stderr", 0.0) ** 2)
    rewards = entry["train_rewards"]
    monitor = entry["monitor"]
    return {
        "judge_gain": round(trained[head] - base[head], 4),
        "judge_gain_stderr": round(se, 4),
        "reward_gain": round(sum(rewards[-10:]) / len(rewards[-10:]) - sum(rewards[:10]) / len(rewards[:10]), 4),
        "hacking_gap": hacking_gap(monitor, rewards),
        "fidelity_delta": round(trained["fidelity"] - base["fidelity"], 4),
        "wall_s": entry["train_s"],
        "wall_to_0_10_s": _gain_to(monitor, 0.10),
        "wall_to_0_15_s": _gain_to(monitor, 0.15),
        "best_monitor_gain": round(max(e["heldout"] for e in monitor) - monitor[0]["heldout"], 4),
        "iterations": entry["iterations"],
    }


def _relative(uri: str) -> str:
    """An artifact path relative to the repository where it lies under it (results files hold no checkout path)."""
    try:
        return str(Path(uri).resolve().relative_to(ROOT))
    except ValueError:
        return uri


def run(args) -> dict:
    config = load_config(args.config)
    config = dataclasses.replace(config, run=dataclasses.replace(config.run, torch_threads=args.threads))
    names = args.variants or list(VARIANTS)
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: {unknown} are not variants ({', '.join(VARIANTS)})")
    table, base = {}, {}
    for name in names:
        keys = {**VARIANTS[name], "loop": {"iterations": args.max_iterations, "eval_every": args.eval_every,
                                           "checkpoint_every": args.max_iterations,
                                           "time_budget_s": args.budget_s}}
        variant = with_grpo(config, keys)
        result = run_grpo(variant, args.task, args.base, args.reward_model, args.prompts,
                          output_root=args.artifacts, tracker=NullTracker(), progress=False)
        m = result.metrics
        base = m["base"]
        history = json.loads((Path(result.uri) / "history.json").read_text())["history"]
        rewards = [h["train/reward"] for h in history]
        table[name] = {
            "grpo": VARIANTS[name],
            "base": m["base"],
            "judge": m["teacher"],
            "train_rewards": rewards,
            "monitor": monitor_curve(m["monitor"], history),
            "iterations": m["iterations"],
            "stopped_early": m["stopped_early"],
            # the loop's own clock (iterations only), what the budget is measured in
            "train_s": round(sum(h["time/iteration_s"] for h in history), 1),
            "stage_train_s": m["train_s"],  # the training call, monitor evaluations included
            "wall_s": m["wall_s"],
            "artifact": _relative(result.uri),
        }
        print(json.dumps({name: summary_of(table[name], args.task)}), flush=True)
    payload = {
        "task": args.task,
        "config_hash": config.section_hash(*GRPO_SECTIONS),
        "budget_s": args.budget_s,
        "threads": args.threads,
        "command": " ".join(["python -m experiments.algorithms.algorithms",
                             *(_relative(a) if a.startswith("/") else a for a in sys.argv[1:])]),
        "base": base,
        "inputs": {"base": _relative(args.base), "reward_model": _relative(args.reward_model),
                   "prompts": _relative(args.prompts)},
        "variants": table,
        "machine": machine_info(),
    }
    _merge(Path(args.output), args.task, payload)
    return payload


def plot(runs: dict, path: Path) -> None:
    """Held-out monitor score against training seconds, one line per variant, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = [t for t in ("t2i", "edit") if t in runs]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for name, entry in runs[task]["variants"].items():
            mon = entry["monitor"]
            ax.plot([e["train_s"] for e in mon], [e["heldout"] for e in mon], "o-", ms=3, label=name)
        start = min(e["monitor"][0]["heldout"] for e in runs[task]["variants"].values())
        for target in TARGETS:
            ax.axhline(start + target, color="0.7", lw=0.8, ls="--")
        ax.set_xlabel("training seconds (2 CPU cores shared by two runs, one thread each)")
        ax.set_ylabel(f"judge {HEADLINE[task]} (held-out monitor prompts)")
        ax.set_title(f"{task}: {runs[task]['budget_s']:g} s budget per variant")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summarize(args) -> dict:
    runs = json.loads(Path(args.runs).read_text())
    variants: dict[str, dict] = {}
    for task in ("t2i", "edit"):
        for name, entry in runs.get(task, {}).get("variants", {}).items():
            variants.setdefault(name, {})[task] = summary_of(entry, task)
    out = Path(args.output)
    payload = {
        "variants": variants,
        "budget_s": {t: runs[t]["budget_s"] for t in runs},
        "inputs": {t: runs[t]["inputs"] for t in runs},
        "config_hash": {t: runs[t]["config_hash"] for t in runs},
        "machine": {t: runs[t]["machine"] for t in runs},
        "runs": _relative(args.runs),
        "plot": _relative(str(out.with_suffix(".png"))),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, out.with_suffix(".png"))
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    tmp.replace(out)
    print(table_markdown(variants))
    return payload


def table_markdown(variants: dict) -> str:
    """The results as a markdown table (one row per variant and task)."""
    def fmt(v, spec="+.3f"):
        return "-" if v is None else format(v, spec)

    lines = ["| variant | task | judge gain (se) | reward gain | hacking gap | fidelity | s to +0.10 | s to +0.15 | "
             "iterations |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, by_task in variants.items():
        for task, s in by_task.items():
            lines.append(f"| {name} | {task} | {s['judge_gain']:+.3f} ({s['judge_gain_stderr']:.3f}) | "
                         f"{s['reward_gain']:+.3f} | {s['hacking_gap']:.3f} | {s['fidelity_delta']:+.3f} | "
                         f"{fmt(s['wall_to_0_10_s'], '.0f')} | {fmt(s['wall_to_0_15_s'], '.0f')} | "
                         f"{s['iterations']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train variants on one task and add them to a runs file")
    r.add_argument("--task", required=True, choices=("t2i", "edit"))
    r.add_argument("--base", required=True)
    r.add_argument("--reward-model", required=True)
    r.add_argument("--prompts", required=True)
    r.add_argument("--config", default=str(ROOT / "configs" / "shapes.yaml"))
    r.add_argument("--variants", nargs="+", default=None)
    r.add_argument("--budget-s", type=float, required=True, help="seconds of training per variant")
    r.add_argument("--eval-every", type=int, default=10, help="monitor every N iterations")
    r.add_argument("--max-iterations", type=int, default=5000, help="iterations if the budget is not reached")
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--artifacts", default="artifacts")
    r.add_argument("--output", required=True)
    s = sub.add_parser("summarize", help="the results file and its plot from a runs file")
    s.add_argument("--runs", required=True)
    s.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    if args.command == "run":
        if not (args.budget_s > 0 and math.isfinite(args.budget_s)):
            raise SystemExit(f"--budget-s: a positive number of seconds, got {args.budget_s}")
        return run(args)
    return summarize(args)


if __name__ == "__main__":
    main()
