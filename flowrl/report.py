"""The bench report: ``report.md``, a self-contained ``report.html`` and PNGs.

Everything is rendered from one :class:`ReportData`: the pillar table with
deltas against the anchor (base) model, the Elo ratings per arena with their
intervals (a table and a bar chart with error bars), the head-to-head win
rates, the training curves of the RL and distillation runs whose artifacts
carry a ``history.json``, and image grids of the same prompts and seeds
across models. The HTML embeds its images as data URIs, so it can be mailed
or attached to a tracking run as one file.
"""

from __future__ import annotations

import base64
import html
import math
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
_COLORS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")


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
    histories: dict[str, dict] = field(default_factory=dict)  # model -> {"history": [...], "monitor": [...]}
    # "t2i" / "edit" -> model -> [K] bool: whether the scorer judged each grid image correct (framed green / red)
    grid_marks: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # lines shown under the title (how it was measured)


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


def curves_png(data: ReportData) -> bytes | None:
    """GRPO training reward, OPD loss, and the held-out judge score of every run with a history."""
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
            axes[0].plot(*_smooth([h["train/reward"] for h in history]), color=color, label=model)
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


def elo_rows(data: ReportData) -> tuple[list[str], list[list[str]]]:
    header = ["model", *(f"{ARENA_TITLES[a]} Elo [95 % interval]" for a in ARENAS)]
    rows = []
    for model in data.models:
        cells = []
        for arena in ARENAS:
            r = data.ratings[arena][model]
            cells.append(f"{r.rating:.0f} [{r.ci_low:.0f}, {r.ci_high:.0f}]")
        rows.append([model, *cells])
    return header, rows


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
    out.append(("table", "T2I alignment by category", breakdown_rows(data, "t2i_alignment")))
    out.append(("table", "Edit accuracy by kind", breakdown_rows(data, "edit_accuracy")))
    out.append(("table", "Arena ratings", elo_rows(data)))
    out.append(("image", "Elo per arena", "elo.png"))
    for arena in ARENAS:
        out.append(("table", f"{ARENA_TITLES[arena]}: head-to-head win rate", win_rate_rows(data, arena)))
    if data.histories:
        out.append(("image", "Training curves", "curves.png"))
    framed = " (frame: green = judged correct, red = not)"
    out.append(("image", "T2I: same prompts and seeds across models" + (framed if "t2i" in data.grid_marks else ""),
                "grid_t2i.png"))
    out.append(("image", "Edits: source, then each model's result" + (framed if "edit" in data.grid_marks else ""),
                "grid_edit.png"))
    return out


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
            for i, chunk in enumerate(text.split("`")):
                parts.append(f"<code>{chunk}</code>" if i % 2 else chunk)
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
    curves = curves_png(data)
    if curves is not None:
        images["curves.png"] = curves
    written = []
    for name, png in images.items():
        (directory / name).write_bytes(png)
        written.append(directory / name)
    (directory / "report.md").write_text(render_markdown(data))
    (directory / "report.html").write_text(render_html(data, images))
    return written + [directory / "report.md", directory / "report.html"]
