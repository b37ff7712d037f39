"""The bench report: ``report.md``, a self-contained ``report.html`` and PNGs.

Everything is rendered from one :class:`ReportData`: the pillar table with
deltas against the anchor (base) model, each model's gain over the anchor with
a paired bootstrap interval over bench items (per pillar, and per T2I category
and edit kind with its standard error), the Elo ratings per arena with their
intervals (a table and a bar chart with error bars; a model that won or lost
every battle against some opponent is marked, its rating being set by the
fit's prior), the head-to-head win rates, the training curves of the RL and
distillation runs whose artifacts carry a ``history.json`` (and, per RL run,
its training reward beside the held-out judge: the hacking gap; a run trained
in rounds shows them all, the refresh of its reward models marked), and image
grids of the same prompts and seeds across models, overall and per T2I
category and edit kind. The HTML embeds its images as data URIs, so it can be mailed
or attached to a tracking run as one file.
"""

from __future__ import annotations

import base64
import html
import math
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flowrl.arena import Rating
from flowrl.bench import ARENAS, PILLARS
from flowrl.plots import new_figure, png_of

PILLAR_TITLES = {
    "overall": "Overall",
    "t2i_alignment": "T2I alignment",
    "edit_accuracy": "Edit accuracy",
    "identity": "Identity",
    "fidelity": "Fidelity",
}
ARENA_TITLES = {"t2i": "T2I arena", "edit": "Edit arena"}
OUTCOME_TEXT = {"won_all": "won all", "lost_all": "lost all"}
FLAG_MARK = "\u2020"  # the dagger beside a rating set by the prior
ABOVE, BELOW = "\u25b2", "\u25bc"  # an interval entirely above / below zero
_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


@dataclass
class Grid:
    """One image grid: a column per item (its prompt or instruction), a row per model (same seeds in
    every row), a source row first for edits; ``marks`` (model -> [K] bool) frames the scorer's verdict."""

    columns: list[str]
    rows: dict[str, np.ndarray]
    sources: np.ndarray | None = None
    marks: dict[str, np.ndarray] | None = None


@dataclass
class ReportData:
    """What the report shows; ``models`` fixes the order of every table and chart."""

    title: str
    models: list[str]
    anchor: str
    pillars: dict[str, dict[str, float]]  # model -> pillar -> 0-100 (plus breakdowns)
    ratings: dict[str, dict[str, Rating]]  # arena -> model -> rating
    win_rates: dict[str, np.ndarray]  # arena -> [i, j] share of i's battles against j won
    battles: dict[str, int]  # arena -> number of battles
    t2i_grid: tuple[list[str], dict[str, np.ndarray]]  # (prompts, model -> [K, H, W, 3] uint8)
    edit_grid: tuple[list[str], np.ndarray, dict[str, np.ndarray]]  # (instructions, sources, model -> images)
    # model -> {"history": [...], "monitor": [...]}, and for a run trained in rounds "rounds" (:func:`chain_rounds`)
    histories: dict[str, dict] = field(default_factory=dict)
    # "t2i" / "edit" -> model -> [K] bool: whether the scorer judged each grid image correct (framed green / red)
    grid_marks: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # lines shown under the title (how it was measured)
    # model -> pillar -> {"delta", "ci_low", "ci_high", "stderr"} against the anchor, 0-1 scale
    # (flowrl.bench.bench_gains); model -> "t2i_alignment/<category>" | "edit_accuracy/<kind>" -> the same
    gains: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    group_gains: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    confidence: float = 0.95  # coverage of the gains' intervals
    # arena -> [{"model", "opponent", "outcome": won_all | lost_all, "battles"}] (flowrl.arena.arena_flags)
    arena_flags: dict[str, list[dict]] = field(default_factory=dict)
    # "t2i" / "edit" -> category or kind -> its grid
    category_grids: dict[str, dict[str, Grid]] = field(default_factory=dict)


# --------------------------------------------------------------------------- figures


def elo_png(data: ReportData) -> bytes:
    """Elo per arena: a horizontal bar per model from the anchor's 1000 to its
    rating (so a bar's length is the gain or loss against the anchor), with the
    95 % interval as error bars and the rating written at the end."""
    fig, axes = new_figure(10, 0.55 * len(data.models) + 1.6)
    fig.clear()
    axes = fig.subplots(1, len(ARENAS), sharey=True)
    for ax, arena in zip(axes, ARENAS):
        ratings = data.ratings[arena]
        y = np.arange(len(data.models))[::-1]
        points = np.array([ratings[m].rating for m in data.models])
        lows = np.array([ratings[m].ci_low for m in data.models])
        highs = np.array([ratings[m].ci_high for m in data.models])
        colors = [_COLORS[i % len(_COLORS)] for i in range(len(data.models))]
        ax.barh(y, points - 1000, left=1000, color=colors, alpha=0.85, xerr=[points - lows, highs - points],
                capsize=4, error_kw={"elinewidth": 1.2, "ecolor": "#222"})
        span = max(40.0, float(highs.max() - lows.min()))
        for yy, p, lo, hi in zip(y, points, lows, highs):
            label = f"{p:.0f}" if abs(p - 1000) < 0.5 else f"{p:.0f} ({p - 1000:+.0f})"
            if p >= 1000:
                ax.text(hi + 0.02 * span, yy, label, va="center", ha="left", fontsize=9)
            else:
                ax.text(lo - 0.02 * span, yy, label, va="center", ha="right", fontsize=9)
        ax.axvline(1000, color="#444", lw=0.9)
        ax.set_yticks(y, data.models)
        ax.set_title(f"{ARENA_TITLES[arena]} ({data.battles[arena]} battles)")
        ax.set_xlabel(f"Elo ({data.anchor} = 1000); whiskers: 95 % bootstrap interval")
        ax.set_xlim(min(1000.0, lows.min()) - 0.25 * span, max(1000.0, highs.max()) + 0.25 * span)
    return png_of(fig)


def _smooth(values: list[float], window: int = 10) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=np.float64)
    if len(values) < window:
        return np.arange(1, len(values) + 1), values
    return np.arange(window, len(values) + 1), np.convolve(values, np.ones(window) / window, mode="valid")


def chain_rounds(rounds: list[dict]) -> dict:
    """One history of a run trained in rounds from each round's ``history.json`` ({"history": [one row per
    iteration], "monitor": [{"iteration", ...}]}), oldest first. Every round counts its iterations from 0,
    so a round's rows follow the earlier rounds' and its monitor iterations are shifted by their iteration
    count; ``"rounds": [{"round": 1, "start": 0}, {"round": 2, "start": N}, ...]`` records where each round
    began. A later round's monitor keeps its iteration-0 point (the same policy as the previous round's
    last one, scored again): a judge that moved between the two shows. One round: its history unchanged."""
    if len(rounds) == 1:
        return rounds[0]
    history, monitor, starts = [], [], []
    for entry in rounds:
        start = len(history)
        starts.append({"round": len(starts) + 1, "start": start})
        history.extend(entry.get("history") or [])
        monitor.extend({**point, "iteration": point["iteration"] + start} for point in entry.get("monitor") or [])
    return {"history": history, "monitor": monitor, "rounds": starts}


def round_starts(entry: dict) -> list[int]:
    """The iteration at which each round of a history began: [0] for a run of one round."""
    return [r["start"] for r in entry.get("rounds") or []] or [0]


REFRESH_LABEL = "reward models refreshed"


def _mark_rounds(ax, starts: list[int], color: str = "#666", label: bool = True) -> None:
    """A dashed vertical line where each round after the first began (the reward models were retrained
    there); with ``label``, the legend names them once."""
    for k, start in enumerate(starts[1:]):
        ax.axvline(start, color=color, ls="--", lw=0.9, label=REFRESH_LABEL if label and k == 0 else "_nolegend_")


def curves_png(data: ReportData) -> bytes | None:
    """GRPO training reward, OPD loss, and the held-out judge score of every run with a history. A run
    trained in rounds (:func:`chain_rounds`) has its reward smoothed within each round, never across the
    refresh of its reward models (a dashed line), each round at its own reward models' level
    (:func:`reward_segments` with ``chained=False``)."""
    from matplotlib.ticker import MaxNLocator

    if not data.histories:
        return None
    fig, _ = new_figure(13, 3.8)
    fig.clear()
    axes = fig.subplots(1, 3)
    for i, model in enumerate(data.models):
        if model not in data.histories:
            continue
        color = _COLORS[i % len(_COLORS)]
        history, monitor = data.histories[model].get("history", []), data.histories[model].get("monitor", [])
        if history and "train/reward" in history[0]:  # a GRPO run
            starts = round_starts(data.histories[model])
            for k, (x, mean) in enumerate(reward_segments(history, starts, chained=False)):
                axes[0].plot(x, mean, color=color, label=model if k == 0 else "_nolegend_")
            _mark_rounds(axes[0], starts, color, label=False)
        elif history and "train/loss" in history[0]:  # an OPD run
            axes[1].plot(*_smooth([h["train/loss"] for h in history]), color=color, label=model)
        if monitor:
            axes[2].plot([m["iteration"] for m in monitor], [m["heldout"] for m in monitor], "o-", ms=3,
                         color=color, label=model)
    titles = ("GRPO: training reward (10-it mean)", "OPD: velocity-matching loss (10-it mean)",
              "Held-out judge score during training")
    for ax, title in zip(axes, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax.lines:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no run of this kind given", ha="center", va="center", transform=ax.transAxes,
                    color="#888")
            ax.set_xticks([]), ax.set_yticks([])
    axes[2].set_ylabel("held-out judge score (0-1)", fontsize=9)
    if axes[1].lines:
        axes[1].set_yscale("log")
    return png_of(fig)


def rl_runs(data: ReportData) -> list[str]:
    """The benched models whose history is an RL run's (a training reward) with held-out monitor scores."""
    out = []
    for model in data.models:
        h = data.histories.get(model) or {}
        history, monitor = h.get("history") or [], h.get("monitor") or []
        if any("train/reward" in row for row in history) and any(m.get("heldout") is not None for m in monitor):
            out.append(model)
    return out


def _align_zero(left, right) -> None:
    """Give two y-axes of one panel their zero at the same height, so two changes since the start
    read against one baseline."""
    limits = []
    for ax in (left, right):
        lo, hi = ax.get_ylim()
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi - lo <= 0:
            lo, hi = -1.0, 1.0
        limits.append((-lo, hi))
    share = min(max(neg / (neg + pos) for neg, pos in limits), 0.9)  # the zero's height from below
    share = max(share, 0.1)
    for ax, (neg, pos) in zip((left, right), limits):
        if neg / (neg + pos) < share:
            neg = share / (1 - share) * pos
        else:
            pos = neg * (1 - share) / share
        ax.set_ylim(-neg, pos)


def reward_segments(history: list[dict], starts: list[int], window: int = 10,
                    chained: bool = True) -> list[tuple[np.ndarray, np.ndarray]]:
    """The training reward during a run, one (iteration, reward) curve per round (``starts``:
    :func:`round_starts`). A round's reward comes from that round's reward models, whose scale differs
    from the last round's, so each round is smoothed on its own (``window``-iteration mean, never across
    a refresh). ``chained``: each round drawn as its change since its own first mean, shifted to begin
    where the previous round's curve ended; else each round's means as they are. x: the iteration after
    which each mean ends. Rounds without a reward are left out."""
    out: list[tuple[np.ndarray, np.ndarray]] = []
    level = 0.0
    for start, end in zip(starts, [*starts[1:], len(history)]):
        rewards = [row["train/reward"] for row in history[start:end] if "train/reward" in row]
        if not rewards:
            continue
        x, smooth = _smooth(rewards, window)
        if not chained:
            out.append((x + start, smooth))
            continue
        change = smooth - smooth[0] + level
        out.append((x + start, change))
        level = float(change[-1])
    return out


def reward_judge_png(data: ReportData) -> bytes | None:
    """Per RL run, one panel: its training reward (10-iteration mean, change since the first such
    mean, right axis) against the held-out judge score and fidelity (change since iteration 0, left
    axis), both against iteration, zeros aligned. A reward that climbs while the judge stays flat or
    fidelity falls is the hacking gap. A run trained in rounds (:func:`chain_rounds`) shows all of
    them: a dashed line where the reward models were refreshed, the reward's change per round, each
    round's curve continuing from where the previous one ended (its scale is its own reward models';
    :func:`reward_segments`), the judge and fidelity one series since iteration 0 of the first round.
    For a family without a judge the held-out series is a reward model's score instead, and that reward
    model is itself retrained at the refresh: across the dashed line the series compares two scorers,
    so read its change within each round. None when no benched model is an RL run with a monitor."""
    from matplotlib.ticker import MaxNLocator

    runs = rl_runs(data)
    if not runs:
        return None
    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)
    fig, _ = new_figure(4.6 * cols, 3.4 * rows)
    fig.clear()
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax, model in zip(axes, runs):
        history, monitor = data.histories[model]["history"], data.histories[model]["monitor"]
        starts = round_starts(data.histories[model])
        segments = reward_segments(history, starts)
        right = ax.twinx()
        for k, (x, change) in enumerate(segments):
            right.plot(x, change, color="#4c72b0", label="training reward (right)" if k == 0 else "_nolegend_")
        _mark_rounds(ax, starts)
        right.set_ylabel("reward change" + (", per round" if len(starts) > 1 else ""), fontsize=8, color="#4c72b0")
        points = [m for m in monitor if m.get("heldout") is not None]
        its = [m["iteration"] for m in points]
        ax.plot(its, [m["heldout"] - points[0]["heldout"] for m in points], "o-", ms=3, color="#c44e52",
                label="held-out judge (left)")
        with_fidelity = [m for m in points if m.get("fidelity") is not None]
        if with_fidelity:
            ax.plot([m["iteration"] for m in with_fidelity],
                    [m["fidelity"] - with_fidelity[0]["fidelity"] for m in with_fidelity], "s--", ms=2.5,
                    color="#55a868", label="held-out fidelity (left)")
        ax.axhline(0.0, color="#888", lw=0.7)
        ax.set_ylabel("judge change since it. 0", fontsize=8)
        ax.set_xlabel("iteration", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        _align_zero(ax, right)
        judge_gain = points[-1]["heldout"] - points[0]["heldout"]
        ax.set_title(f"{model}: reward {segments[-1][1][-1]:+.3g}, judge {judge_gain:+.3f}", fontsize=9)
        handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        labels = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
        right.legend(handles, labels, fontsize=7, loc="upper left", framealpha=0.8)  # the top axes: drawn last
    for ax in axes[len(runs):]:
        ax.set_visible(False)
    return png_of(fig)


def _wrap(text: str, width: int = 16) -> str:
    return "\n".join(textwrap.wrap(text, width)) or text


MARK_COLORS = {True: "#1a9850", False: "#d73027"}  # frame of an image judged correct / not


def grid_png(columns: list[str], rows: dict[str, np.ndarray], sources: np.ndarray | None = None,
             marks: dict[str, np.ndarray] | None = None) -> bytes:
    """Rows of images (one row per model, a source row first for edits),
    one column per prompt (same seed in every row), labelled. ``marks``
    (model -> [K] bool) frames each of a model's images green when it was
    judged correct and red when not."""
    marks = marks or {}
    labelled = ([("source", sources)] if sources is not None else []) + list(rows.items())
    n_rows, n_cols = len(labelled), len(columns)
    fig, _ = new_figure(1.45 * n_cols + 1.4, 1.45 * n_rows + 0.9)
    fig.clear()
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False))
    for r, (label, images) in enumerate(labelled):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(images[c], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if label in marks and label != "source":
                for spine in ax.spines.values():
                    spine.set_color(MARK_COLORS[bool(marks[label][c])])
                    spine.set_linewidth(3)
            if r == 0:
                ax.set_title(_wrap(columns[c]), fontsize=8)
            if c == 0:
                ax.set_ylabel(label, fontsize=9, rotation=0, ha="right", va="center")
    return png_of(fig)


# --------------------------------------------------------------------------- tables


def _delta(value: float, anchor: float) -> str:
    return f"{value - anchor:+.1f}"


def pillar_rows(data: ReportData) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the pillar table: each score with its delta against the anchor."""
    keys = ("overall", *PILLARS)
    header = ["model", *(PILLAR_TITLES[k] for k in keys)]
    base = data.pillars[data.anchor]
    rows = []
    for model in data.models:
        p = data.pillars[model]
        cells = [f"{p[k]:.1f}" if model == data.anchor else f"{p[k]:.1f} ({_delta(p[k], base[k])})" for k in keys]
        rows.append([model, *cells])
    return header, rows


def breakdown_rows(data: ReportData, prefix: str) -> tuple[list[str], list[list[str]]]:
    """Per category (T2I) or per kind (edit) of one pillar."""
    keys = [k for k in data.pillars[data.models[0]] if k.startswith(prefix + "/")]
    header = ["model", *(k.split("/", 1)[1] for k in keys)]
    rows = [[m, *(f"{data.pillars[m][k]:.1f}" for k in keys)] for m in data.models]
    return header, rows


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def gain_cell(gain: dict[str, float]) -> str:
    """``+0.084 [+0.031, +0.139]``, then a mark when the whole interval is above (or below) zero."""
    cell = f"{_signed(gain['delta'])} [{_signed(gain['ci_low'])}, {_signed(gain['ci_high'])}]"
    if gain["ci_low"] > 0:
        return f"{cell} {ABOVE}"
    if gain["ci_high"] < 0:
        return f"{cell} {BELOW}"
    return cell


def gain_rows(data: ReportData) -> tuple[list[str], list[list[str]]]:
    """Per model (the anchor left out), per pillar: its gain over the anchor with the paired interval."""
    header = ["model", *(PILLAR_TITLES[k] for k in PILLARS)]
    rows = [[m, *(gain_cell(data.gains[m][k]) if k in data.gains[m] else "-" for k in PILLARS)]
            for m in data.models if m in data.gains]
    return header, rows


def _stderr_cell(gain: dict[str, float]) -> str:
    """``+0.050 ± 0.030``, marked when the delta is below zero by more than its standard error."""
    stderr = gain.get("stderr")
    if stderr is None or not math.isfinite(stderr):
        return f"{_signed(gain['delta'])} \u00b1 n/a"
    cell = f"{_signed(gain['delta'])} \u00b1 {stderr:.3f}"
    return f"{cell} {BELOW}" if gain["delta"] < -stderr else cell


def group_gain_rows(data: ReportData, prefix: str) -> tuple[list[str], list[list[str]]]:
    """Per model (the anchor left out), per T2I category (``t2i_alignment``) or edit kind
    (``edit_accuracy``): its gain over the anchor with the paired standard error."""
    models = [m for m in data.models if m in data.group_gains]
    keys = list(dict.fromkeys(k for m in models for k in data.group_gains[m] if k.startswith(prefix + "/")))
    header = ["model", *(k.split("/", 1)[1] for k in keys)]
    rows = [[m, *(_stderr_cell(data.group_gains[m][k]) if k in data.group_gains[m] else "-" for k in keys)]
            for m in models]
    return header, rows


def _flagged(data: ReportData, arena: str) -> set[str]:
    return {f["model"] for f in data.arena_flags.get(arena, [])}


def elo_rows(data: ReportData) -> tuple[list[str], list[list[str]]]:
    """Elo per model and arena; a rating set by the prior (:func:`flag_notes`) carries a dagger."""
    header = ["model", *(f"{ARENA_TITLES[a]} Elo [95 % interval]" for a in ARENAS)]
    rows = []
    for model in data.models:
        cells = []
        for arena in ARENAS:
            r = data.ratings[arena][model]
            mark = f" {FLAG_MARK}" if model in _flagged(data, arena) else ""
            cells.append(f"{r.rating:.0f} [{r.ci_low:.0f}, {r.ci_high:.0f}]{mark}")
        rows.append([model, *cells])
    return header, rows


def flag_notes(data: ReportData) -> list[str]:
    """One line per arena with flagged models: who won or lost all of their battles against whom."""
    lines = []
    for arena in ARENAS:
        flags = data.arena_flags.get(arena, [])
        if not flags:
            continue
        by_model: dict[str, list[str]] = {}
        for f in flags:
            by_model.setdefault(f["model"], []).append(
                f"{OUTCOME_TEXT[f['outcome']]} {f['battles']} battles against {f['opponent']}")
        parts = "; ".join(f"{model}: {', '.join(texts)}" for model, texts in by_model.items())
        lines.append(f"{FLAG_MARK} {ARENA_TITLES[arena]}: rating set by the prior, its interval too narrow: {parts}.")
    return lines


def win_rate_rows(data: ReportData, arena: str) -> tuple[list[str], list[list[str]]]:
    rates = data.win_rates[arena]
    header = ["row beats column", *data.models]
    rows = [[a, *("-" if math.isnan(rates[i, j]) else f"{100 * rates[i, j]:.0f} %" for j in range(len(data.models)))]
            for i, a in enumerate(data.models)]
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --------------------------------------------------------------------------- the recipe's claims

# (teacher, its task's pillar); the student must keep RETAINED of each teacher's gain on that pillar
RECIPE_TEACHERS = (("t2i_teacher", "t2i_alignment"), ("edit_teacher", "edit_accuracy"))
RECIPE_STUDENT = "student"
MIN_GAIN, MAX_LOSS, RETAINED = 0.10, 0.02, 0.9


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def recipe_checks(data: ReportData) -> list[dict]:
    """The recipe's claims, each checked on this bench's own numbers: every teacher gains at least
    MIN_GAIN on its task's pillar with its interval above 0 and loses at most MAX_LOSS of fidelity (the
    edit teacher also of identity, and no edit kind below the anchor by more than its standard error);
    the student keeps RETAINED of each teacher's gain and rates above the anchor in both arenas (the
    lower end of its Elo interval). One dict per claim: claim, measured, target, met. Claims about
    models the bench did not score are left out."""
    checks: list[dict] = []
    gains = data.gains

    def gain_text(g: dict) -> str:
        return f"{g['delta']:+.3f} [{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]"

    for teacher, pillar in RECIPE_TEACHERS:
        if teacher not in gains:
            continue
        g = gains[teacher][pillar]
        checks.append({"claim": f"{teacher}: {pillar} gain, interval above 0", "measured": gain_text(g),
                       "target": f">= {MIN_GAIN:+.2f}, low end > 0",
                       "met": g["delta"] >= MIN_GAIN and g["ci_low"] > 0})
        kept = ("fidelity", "identity") if teacher == "edit_teacher" else ("fidelity",)
        for name in kept:
            g = gains[teacher][name]
            checks.append({"claim": f"{teacher}: {name} kept", "measured": f"{g['delta']:+.3f}",
                           "target": f">= {-MAX_LOSS:+.2f}", "met": g["delta"] >= -MAX_LOSS})
        if teacher == "edit_teacher" and teacher in data.group_gains:
            kinds = {k.split("/", 1)[1]: v for k, v in data.group_gains[teacher].items()
                     if k.startswith("edit_accuracy/")}
            below = [k for k, v in kinds.items() if _finite(v.get("stderr")) and v["delta"] < -v["stderr"]]
            checks.append({"claim": f"{teacher}: no edit kind below {data.anchor} by more than its standard error",
                           "measured": ", ".join(f"{k} {v['delta']:+.2f}" for k, v in kinds.items()),
                           "target": "none below", "met": not below})
    if RECIPE_STUDENT in gains:
        for teacher, pillar in RECIPE_TEACHERS:
            if teacher not in gains:
                continue
            teacher_gain, student_gain = gains[teacher][pillar]["delta"], gains[RECIPE_STUDENT][pillar]["delta"]
            share = student_gain / teacher_gain if teacher_gain > 0 else float("nan")
            checks.append({"claim": f"{RECIPE_STUDENT}: share of {teacher}'s {pillar} gain",
                           "measured": f"{student_gain:+.3f} of {teacher_gain:+.3f} ({share:.0%})"
                           if share == share else f"{student_gain:+.3f} of {teacher_gain:+.3f}",
                           "target": f">= {RETAINED:.0%}", "met": bool(share == share and share >= RETAINED)})
        for arena, ratings in data.ratings.items():
            if RECIPE_STUDENT not in ratings or data.anchor not in ratings:
                continue
            r, a = ratings[RECIPE_STUDENT], ratings[data.anchor]
            checks.append({"claim": f"{RECIPE_STUDENT}: {ARENA_TITLES.get(arena, arena)} Elo above {data.anchor}",
                           "measured": f"{r.rating:.0f} [{r.ci_low:.0f}, {r.ci_high:.0f}]",
                           "target": f"low end > {a.rating:.0f}",
                           "met": r.ci_low > a.rating})
    return checks


def recipe_rows(data: ReportData) -> tuple[list[str], list[list[str]]]:
    rows = [[c["claim"], c["measured"], c["target"], "yes" if c["met"] else "NO"] for c in recipe_checks(data)]
    return ["claim", "measured", "target", "met"], rows


# --------------------------------------------------------------------------- documents


def _sections(data: ReportData) -> list[tuple[str, str, object]]:
    """(kind, title, payload) in reading order; kinds: text, table, image."""
    out: list[tuple[str, str, object]] = []
    out.append(("text", "", (
        f"Pillars are 0-100 (higher is better); the value in parentheses is the difference to `{data.anchor}`. "
        "Overall is the mean of the four pillars. Elo comes from one Bradley-Terry fit per arena over all "
        f"battles (400/ln 10 scale, `{data.anchor}` pinned at 1000, ties half a win each way), with 95 % "
        "intervals from a bootstrap over battles.")))
    out.append(("table", "Pillars", pillar_rows(data)))
    if data.gains:
        level = f"{100 * data.confidence:g} %"
        out.append(("table", f"Gains over {data.anchor} (paired bootstrap {level} intervals over bench items)",
                    gain_rows(data)))
        out.append(("text", "", (
            f"Each pillar on the 0-1 scale (the table above divided by 100): the mean per-item difference to "
            f"`{data.anchor}` on the same items and seeds, and its {level} interval from resampling the items, "
            f"the same draw for both models. {ABOVE}: the whole interval above 0; {BELOW}: below 0.")))
    checks = recipe_rows(data)
    if checks[1]:
        out.append(("table", "The recipe's claims on this bench", checks))
    out.append(("table", "T2I alignment by category", breakdown_rows(data, "t2i_alignment")))
    out.append(("table", "Edit accuracy by kind", breakdown_rows(data, "edit_accuracy")))
    if data.group_gains:
        out.append(("table", f"T2I alignment gain over {data.anchor} by category (\u00b1 paired standard error)",
                    group_gain_rows(data, "t2i_alignment")))
        out.append(("table", f"Edit accuracy gain over {data.anchor} by kind (\u00b1 paired standard error)",
                    group_gain_rows(data, "edit_accuracy")))
        out.append(("text", "", f"0-1 scale. {BELOW}: below `{data.anchor}` by more than its standard error."))
    out.append(("table", "Arena ratings", elo_rows(data)))
    for line in flag_notes(data):
        out.append(("text", "", line))
    out.append(("image", "Elo per arena", "elo.png"))
    for arena in ARENAS:
        out.append(("table", f"{ARENA_TITLES[arena]}: head-to-head win rate", win_rate_rows(data, arena)))
    if data.histories:
        out.append(("image", "Training curves", "curves.png"))
    if rl_runs(data):
        out.append(("image", "Reward vs judge during training", "rl_curves.png"))
    framed = " (frame: green = judged correct, red = not)"
    out.append(("image", "T2I: same prompts and seeds across models" + (framed if "t2i" in data.grid_marks else ""),
                "grid_t2i.png"))
    out.append(("image", "Edits: source, then each model's result" + (framed if "edit" in data.grid_marks else ""),
                "grid_edit.png"))
    for task, label in (("t2i", "T2I, category"), ("edit", "Edits, kind")):
        for group, name in grid_files(data, task).items():
            grid = data.category_grids[task][group]
            title = f"{label} {group}: same prompts and seeds across models"
            out.append(("image", title + (framed if grid.marks else ""), name))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-").lower() or "group"


def grid_files(data: ReportData, task: str) -> dict[str, str]:
    """{category or kind: PNG file name} of a task's per-group grids, names unique and file-safe."""
    names: dict[str, str] = {}
    for group in data.category_grids.get(task, {}):
        stem = f"grid_{task}_{_slug(group)}"
        name, k = f"{stem}.png", 2
        while name in names.values():
            name, k = f"{stem}-{k}.png", k + 1
        names[group] = name
    return names


def render_markdown(data: ReportData) -> str:
    lines = [f"# {data.title}", ""]
    lines += [f"- {note}" for note in data.notes] + ([""] if data.notes else [])
    for kind, title, payload in _sections(data):
        if title:
            lines += [f"## {title}", ""]
        if kind == "text":
            lines += [str(payload), ""]
        elif kind == "table":
            lines += [markdown_table(*payload), ""]
        else:
            lines += [f"![{title}]({payload})", ""]
    return "\n".join(lines)


_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2rem auto; max-width: 1100px;
       color: #222; line-height: 1.45; padding: 0 1rem; }
h1 { font-size: 1.6rem; border-bottom: 2px solid #4c72b0; padding-bottom: .3rem; }
h2 { font-size: 1.15rem; margin-top: 2rem; color: #333; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .3rem .6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; font-weight: 600; }
thead th { background: #eef2f8; }
tbody tr:nth-child(even) { background: #fafafa; }
img { max-width: 100%; border: 1px solid #ddd; }
ul.notes { color: #555; font-size: .9rem; }
code { background: #f2f2f2; padding: 0 .2rem; }
"""


def render_html(data: ReportData, images: dict[str, bytes]) -> str:
    """One self-contained page: ``images`` (file name -> PNG bytes) are embedded."""
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(data.title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(data.title)}</h1>"]
    if data.notes:
        parts.append("<ul class='notes'>" + "".join(f"<li>{html.escape(n)}</li>" for n in data.notes) + "</ul>")
    for kind, title, payload in _sections(data):
        if title:
            parts.append(f"<h2>{html.escape(title)}</h2>")
        if kind == "text":
            text = html.escape(str(payload))
            parts.append("<p>")
            for i, chunk in enumerate(text.split("`")):
                parts.append(f"<code>{chunk}</code>" if i % 2 else chunk)
            parts.append("</p>")
        elif kind == "table":
            parts.append(html_table(*payload))
        else:
            encoded = base64.b64encode(images[str(payload)]).decode()
            parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{encoded}'>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(data: ReportData, directory: str | Path) -> list[Path]:
    """report.md, report.html and the PNGs into ``directory``; returns the paths written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    prompts, t2i_rows = data.t2i_grid
    instructions, sources, edit_rows = data.edit_grid
    images = {
        "elo.png": elo_png(data),
        "grid_t2i.png": grid_png(prompts, t2i_rows, marks=data.grid_marks.get("t2i")),
        "grid_edit.png": grid_png(instructions, edit_rows, sources, marks=data.grid_marks.get("edit")),
    }
    for task in ("t2i", "edit"):
        for group, name in grid_files(data, task).items():
            grid = data.category_grids[task][group]
            images[name] = grid_png(grid.columns, grid.rows, grid.sources, marks=grid.marks)
    curves = curves_png(data)
    if curves is not None:
        images["curves.png"] = curves
    rl_curves = reward_judge_png(data)
    if rl_curves is not None:
        images["rl_curves.png"] = rl_curves
    written = []
    for name, png in images.items():
        (directory / name).write_bytes(png)
        written.append(directory / name)
    (directory / "report.md").write_text(render_markdown(data))
    (directory / "report.html").write_text(render_html(data, images))
    return written + [directory / "report.md", directory / "report.html"]
