"""The study's points as one results file and one figure (see reward_data_scaling.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from experiments import provenance
from experiments.reward_data_scaling.reward_data_scaling import SCORERS, percentile_interval
from flowrl.config import load_config
from flowrl.rewards.training import is_unseen_prompt, spearman
from flowrl.shapes.splits import bench_texts, grammar

AXES = ("texts", "groups")
PER_ITEM = ("rewards", "labels", "prompts")  # kept in the points, not repeated in the summary


def grammar_training_texts(task: str, unseen_fraction: float, seed: int) -> int:
    """How many texts of ``task``'s grammar a reward model may train on: outside the bench's share and the
    unseen prompts. More annotation cannot bring a scorer more texts than this."""
    reserved = {text for texts in bench_texts(task).values() for text in texts}
    return sum(1 for texts in grammar(task).values() for text in texts
               if text not in reserved and not is_unseen_prompt(text, unseen_fraction, seed))


def per_doubling(amounts: list[float], values: list[float]) -> float | None:
    """The least-squares slope of ``values`` on log2(``amounts``): the change per doubling of the data."""
    if len(set(amounts)) < 2:
        return None
    x = np.log2(np.asarray(amounts, float))
    return float(np.polyfit(x, np.asarray(values, float), 1)[0])


def unseen_items(whole: dict, scorer: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The whole data's unseen items for ``scorer``: (rewards, mean labels, prompts)."""
    items = whole["scorers"][scorer]["unseen"]
    return tuple(np.asarray(items[k]) for k in ("rewards", "labels", "prompts"))


def slope_interval(points: list[dict], whole: dict, axis: str, scorer: str, seed: int = 0) -> dict:
    """A 95 % bootstrap interval of the unseen-prompt slope per doubling: the unseen prompts resampled with
    replacement (each with all its items), the same draw for every share (their items are the same), the
    Spearman of each share on the draw and the slope through them."""
    _, labels, prompts = unseen_items(whole, scorer)
    chosen = sorted((p for p in points if p["axis"] in (axis, "whole")), key=lambda p: p["fraction"])
    task = scorer.split("/")[0]
    kept = [p["training"][task][axis] for p in chosen]
    rewards = [torch.tensor(p["scorers"][scorer]["unseen"]["rewards"]) for p in chosen]
    return percentile_interval(
        prompts, lambda idx: per_doubling(kept, [spearman(r[idx], labels[idx]) for r in rewards]), seed)


def per_prompt(whole: dict, scorer: str) -> dict:
    """Per unseen prompt of the whole data: its category, items, the Spearman within it, and the mean label and
    mean reward (a gap between them is a calibration error across prompts, which the pooled Spearman pays for)."""
    task = scorer.split("/")[0]
    category_of = {text: category for category, texts in grammar(task).items() for text in texts}
    rewards, labels, prompts = unseen_items(whole, scorer)
    out = {}
    for prompt in np.unique(prompts):
        m = prompts == prompt
        out[str(prompt)] = {"category": category_of.get(str(prompt)), "items": int(m.sum()),
                            "spearman": spearman(torch.from_numpy(rewards[m]), labels[m]),
                            "mean_label": float(labels[m].mean()), "mean_reward": float(rewards[m].mean())}
    return out


def calibrated_per_prompt(whole: dict, scorer: str) -> float:
    """The pooled unseen-prompt Spearman of the whole data had each prompt's rewards been shifted to its mean
    label (a diagnostic that reads the labels: what calibration across prompts costs the pooled number)."""
    rewards, labels, prompts = unseen_items(whole, scorer)
    shifted = rewards.copy()
    for prompt in np.unique(prompts):
        m = prompts == prompt
        shifted[m] += labels[m].mean() - rewards[m].mean()
    return spearman(torch.from_numpy(shifted), labels)


def series(points: list[dict], axis: str, scorer: str) -> list[dict]:
    """The points of ``axis`` and the whole, by share, as one scorer's rows."""
    task = scorer.split("/")[0]
    chosen = sorted((p for p in points if p["axis"] in (axis, "whole")), key=lambda p: p["fraction"])
    return [{"fraction": p["fraction"], "texts": p["training"][task]["texts"], "groups": p["training"][task]["groups"],
             "unseen": {k: v for k, v in p["scorers"][scorer]["unseen"].items() if k not in PER_ITEM},
             "heldout": p["scorers"][scorer]["heldout"]} for p in chosen]


def summarize(paths: list[str], figure: str, config_path: str, argv: list[str] | None) -> dict:
    points = [json.loads(Path(p).read_text()) for p in paths]
    wholes = [p for p in points if p["axis"] == "whole"]
    if len(wholes) != 1:
        raise ValueError(f"--points: expected one whole point (measure --reward-model), got {len(wholes)}")
    whole = wholes[0]
    config = load_config(config_path)
    scorers: dict = {}
    for task, criterion in SCORERS:
        name = f"{task}/{criterion}"
        row = whole["scorers"][name]
        out = {"whole_unseen_spearman": row["unseen"]["spearman"], "ceiling": row["ceiling"], "target": row["target"],
               "missed_by": row["target"] - row["unseen"]["spearman"], "unseen_prompts": per_prompt(whole, name),
               "unseen_calibrated_per_prompt": calibrated_per_prompt(whole, name), "axes": {}}
        for axis in AXES:
            rows = series(points, axis, name)
            # per doubling of what the share kept (texts or groups: the nominal share rounds up per category or text)
            kept = [r[axis] for r in rows]
            slope = per_doubling(kept, [r["unseen"]["spearman"] for r in rows])
            out["axes"][axis] = {
                "points": rows, "unseen_per_doubling": slope,
                "unseen_per_doubling_interval": slope_interval(points, whole, axis, name),
                "heldout_per_doubling": per_doubling(kept, [r["heldout"]["spearman"] for r in rows]),
                # at this slope, how many doublings of the axis would reach the target (None: it does not rise)
                "doublings_to_target": (out["missed_by"] / slope) if slope and slope > 0 else None,
            }
        scorers[name] = out
    texts = {task: {"trained_on": whole["training"][task]["of_texts"],
                    "grammar_allows": grammar_training_texts(task, config.reward_model.unseen_prompt_fraction,
                                                             config.run.seed)} for task in ("t2i", "edit")}
    draw(scorers, figure)
    return {"scorers": scorers, "training_texts": texts, "figure": figure,
            "points": {Path(p).name: {"axis": q["axis"], "fraction": q["fraction"], "reward_model": q["reward_model"],
                                      "machine": q["machine"]} for p, q in zip(paths, points)},
            **provenance("experiments.reward_data_scaling.reward_data_scaling", argv)}


def draw(scorers: dict, path: str) -> None:
    """One panel per scorer: the unseen-prompt Spearman (95 % intervals) against the share of the training data
    along each axis, the held-out groups dashed (the whole's held-out groups: along ``texts`` those of a dropped
    text are of a prompt the share did not train on), the target and the ceiling as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scorers), figsize=(4.2 * len(scorers), 3.6), sharey=True)
    colours = {"texts": "tab:blue", "groups": "tab:orange"}
    for ax, (name, row) in zip(axes, scorers.items()):
        for axis, data in row["axes"].items():
            x = [p["fraction"] for p in data["points"]]
            y = [p["unseen"]["spearman"] for p in data["points"]]
            err = [[v - p["unseen"]["ci_low"] for v, p in zip(y, data["points"])],
                   [p["unseen"]["ci_high"] - v for v, p in zip(y, data["points"])]]
            offset = 1.03 if axis == "groups" else 1.0  # side by side at the same share
            ax.errorbar([v * offset for v in x], y, yerr=err, marker="o", capsize=3, color=colours[axis],
                        label=f"unseen prompts, share of {axis}")
            ax.plot(x, [p["heldout"]["spearman"] for p in data["points"]], ls="--", marker=".", color=colours[axis],
                    alpha=0.6, label=f"held-out groups ({axis}; dashed)")
        ax.axhline(row["target"], color="tab:green", lw=1, label="issue 35 target")
        ax.axhline(row["ceiling"], color="grey", lw=1, ls=":", label="ceiling (annotator noise)")
        ax.set_xscale("log", base=2)
        ax.set_xticks([0.125, 0.25, 0.5, 1.0], ["1/8", "1/4", "1/2", "all"])
        ax.set_title(name)
        ax.set_xlabel("share of the annotated training data")
    axes[0].set_ylabel("Spearman with the annotators' mean label")
    axes[1].legend(fontsize=7, loc="lower center")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

