"""Stage `filter_prompts`: prompt range filtering for one task.

For each candidate prompt the base model samples a group of
``filter.group_size`` with GRPO's rollout sampler (``grpo.rollout``); the
task's composite reward scores it; prompts whose intra-group reward range
(max - min) clears the threshold are kept. A group whose rewards barely
differ gives GRPO almost no signal (its advantages are noise), so filtering
spends the rollout budget where there is something to learn.

Candidates: the shapes grammar, or for ``qwen_image`` the task's prompt file
(:mod:`flowrl.prompt_files`), less its held-out share, written unscored as
``heldout.parquet`` for GRPO's monitor and before/after evaluation.

Outputs: ``prompts.parquet`` (every candidate with its group statistics and a
``kept`` flag; GRPO reads the kept rows), ``ranges.png`` (histogram of ranges
with the threshold), and metrics: kept fraction per category and the
calibration scales GRPO may apply (``grpo.calibrate``):

    scale_c = headroom_c / mean_c'(headroom_c'),  headroom_c = 5 - mean level of
    the first (alignment / instruction) component over category c's samples,

so categories the reward model already rates near the top level get smaller
advantages and weak ones larger, with the mean scale 1.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from flowrl.config import FlowRLConfig
from flowrl.plots import new_figure, png_of
from flowrl.config import ConfigError
from flowrl.models.families import family_of
from flowrl.prompt_files import decode_sources, heldout_mask, load_prompt_file
from flowrl.rewards.annotations import png_bytes
from flowrl.rewards.composite import CompositeReward
from flowrl.rewards.registry import load_rewards
from flowrl.rl.rollout import rollout, rollout_settings
from flowrl.stages.policy import place_text_encoders
from flowrl.stages.registry import stage_sections
from flowrl.rl.trainer import seeded_generator
from flowrl.shapes.edits import EDIT_KINDS, sample_edit
from flowrl.shapes.prompts import T2I_CATEGORIES, sample_t2i
from flowrl.shapes.render import render_scene
from flowrl.stages.common import (StageResult, commit_stage, committed_result, flat_metrics, progress_bar,
                                  stage_context)
from flowrl.storage import ArtifactError, content_stamps, fetch, read_manifest
from flowrl.tracking import Tracker

STAGE = "filter_prompts"
HELDOUT_FILE = "heldout.parquet"
SECTIONS = stage_sections(STAGE)


def input_stamps(config: FlowRLConfig) -> dict[str, str]:
    """{config key: content stamp} of the files this stage reads besides artifacts (the prompt files):
    part of its Flyte cache key (tasks/types.py)."""
    paths = {f"filter.{t}_prompts": getattr(config.filter, f"{t}_prompts") for t in ("t2i", "edit")}
    return content_stamps(paths)


def candidate_prompts(config: FlowRLConfig, task: str) -> pd.DataFrame:
    """Distinct candidate prompts (T2I texts; edits: instruction + source)."""
    f = config.filter
    rng = np.random.default_rng([config.run.seed, f.seed])
    rows = []
    if task == "t2i":
        seen = set()
        for category in T2I_CATEGORIES:
            for _ in range(f.t2i_per_category):
                example = sample_t2i(rng, category)
                if example.prompt not in seen:
                    seen.add(example.prompt)
                    rows.append({"prompt": example.prompt, "category": category, "source_image": None})
    else:
        for kind in EDIT_KINDS:
            for _ in range(f.edit_per_kind):
                example = sample_edit(rng, kind)
                source = render_scene(example.source, config.world.resolution)
                rows.append({"prompt": example.instruction, "category": kind, "source_image": png_bytes(source)})
    return pd.DataFrame(rows)


@torch.no_grad()
def group_statistics(model, reward: CompositeReward, frame: pd.DataFrame, config: FlowRLConfig,
                     progress: bool = False, desc: str = STAGE) -> pd.DataFrame:
    """Sample a group per prompt and add its reward statistics to the frame; ``progress``: a bar
    (labelled ``desc``) over the candidate prompts as their batches are scored."""
    f = config.filter
    settings = rollout_settings(config.grpo.rollout)  # GRPO's rollout sampler: the spread GRPO will see
    sources = decode_sources(frame)
    per_batch = max(1, f.batch_size // f.group_size)
    totals, firsts = [], []
    with progress_bar(desc=desc, total=len(frame), enabled=progress, unit="prompt") as bar:
        for b, start in enumerate(range(0, len(frame), per_batch)):
            stop = min(start + per_batch, len(frame))
            src = None if sources is None else sources[start:stop]
            ro = rollout(model, list(frame["prompt"][start:stop]), f.group_size, settings,
                         seeded_generator(f.seed, b), src)
            scores = reward.score_components(ro.images, ro.prompts, ro.sources)
            totals.append(scores.total.reshape(-1, f.group_size))
            firsts.append(next(iter(scores.components.values())).reshape(-1, f.group_size))
            bar.update(stop - start)
    total, first = (torch.cat(parts).float().cpu().numpy() for parts in (totals, firsts))
    out = frame.copy()
    out["reward_mean"] = total.mean(axis=1)
    out["reward_std"] = total.std(axis=1)
    out["reward_range"] = total.max(axis=1) - total.min(axis=1)
    out["first_component_mean"] = first.mean(axis=1)
    return out


def range_threshold(ranges: np.ndarray, mode: str, threshold: float) -> float:
    """The minimum range kept: ``threshold`` itself, or its quantile of the ranges."""
    if mode == "absolute":
        return float(threshold)
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"filter.threshold: a quantile must be in [0, 1), got {threshold}")
    return float(np.quantile(ranges, threshold))


def category_thresholds(frame: pd.DataFrame, mode: str, threshold: float, scope: str = "all") -> dict[str, float]:
    """{category: minimum range kept}: one cut for all (scope ``all``, or absolute mode), or, for a
    quantile with scope ``category``, that quantile of each category's own ranges."""
    categories = sorted(frame["category"].unique())
    if mode == "quantile" and scope == "category":
        return {c: range_threshold(frame.loc[frame["category"] == c, "reward_range"].to_numpy(), mode, threshold)
                for c in categories}
    cut = range_threshold(frame["reward_range"].to_numpy(), mode, threshold)
    return dict.fromkeys(categories, cut)


def calibration(frame: pd.DataFrame, top_level: float = 5.0) -> dict[str, float]:
    """Per-category advantage scales from the reward model's headroom (module docstring)."""
    headroom = (top_level - frame.groupby("category")["first_component_mean"].mean()).clip(lower=1e-3)
    return {str(k): float(v) for k, v in (headroom / headroom.mean()).items()}


def _histogram_png(frame: pd.DataFrame, cuts: dict[str, float], task: str) -> bytes:
    fig, ax = new_figure(6, 3.5)
    ranges = frame["reward_range"].to_numpy()
    bins = np.linspace(ranges.min(), ranges.max() + 1e-9, 41)
    kept = frame["kept"].to_numpy()
    ax.hist([ranges[kept], ranges[~kept]], bins=bins, stacked=True, color=["#4c72b0", "#c8c8c8"],
            label=["kept", "dropped"])
    if len(set(cuts.values())) == 1:
        cut = next(iter(cuts.values()))
        ax.axvline(cut, color="#c44e52", linestyle="--", label=f"threshold {cut:.3f}")
    ax.set_xlabel("intra-group reward range (max - min)")
    ax.set_ylabel("prompts")
    scope = "" if len(set(cuts.values())) == 1 else " (threshold per category)"
    ax.set_title(f"{task}: reward range per candidate prompt{scope}")
    ax.legend()
    return png_of(fig)


def run_filter_prompts(
    config: FlowRLConfig,
    task: str,
    base_uri: str,
    reward_model_uri: str,
    *,
    output_root: str | None = None,
    tracker: Tracker | None = None,
    progress: bool = True,
) -> StageResult:
    """Score every candidate prompt's group of base-model samples with the task's composite reward and keep
    the prompts whose rewards spread. The candidates are the shapes grammar's, or for a family with prompt
    files the file's rows less a held-out share, written beside the curated set as ``heldout.parquet``.
    ``progress``: a bar over the candidates."""
    if task not in ("t2i", "edit"):
        raise ValueError(f"task must be t2i or edit, got {task!r}")
    family = family_of(config)
    inputs = {"base": base_uri, "reward_model": reward_model_uri, "task": task}
    candidates = heldout = categories = None
    if family.prompt_files:  # every row checked before any model loads
        candidates, heldout, inputs["prompts"] = _prompt_file_candidates(config, task)
        categories = {p: c for rows in (candidates, heldout) for p, c in zip(rows["prompt"], rows["category"])}
    stage = f"{STAGE}_{task}"
    done = committed_result(stage, config, SECTIONS, inputs, output_root)
    if done is not None:
        return done
    model = family.load_policy(fetch(base_uri), config, task)
    place_text_encoders(config, [model])  # where the text encoder runs, as in GRPO
    # the scorers on the task's GPUs after the policy's (launch.filter_prompts.gpus > 1), else beside it
    reward = load_rewards(config, reward_model_uri, task, categories=categories,
                          spread=torch.cuda.is_available() and torch.cuda.device_count() > 1, first_device=1)
    with stage_context(stage, config, SECTIONS, inputs, tracker=tracker) as ctx:
        frame = group_statistics(model, reward, candidate_prompts(config, task) if candidates is None else candidates,
                                 config, progress, desc=stage)
        return _cut_and_commit(ctx, config, task, frame, stage, inputs, output_root, heldout=heldout)


def _cut_and_commit(ctx, config: FlowRLConfig, task: str, frame: pd.DataFrame, stage: str, inputs: dict,
                    output_root: str | None, heldout: pd.DataFrame | None = None) -> StageResult:
    """Apply the range threshold to the scored candidates, write the outputs, commit."""
    cuts = category_thresholds(frame, config.filter.threshold_mode, config.filter.threshold,
                               config.filter.threshold_scope)
    frame["kept"] = frame["reward_range"] >= frame["category"].map(cuts)
    if not frame["kept"].any():
        raise ConfigError(
            f"filter.threshold = {config.filter.threshold} ({config.filter.threshold_mode}) keeps no {task} "
            f"prompt: the largest range is {frame['reward_range'].max():.4f}"
        )
    frame["task"] = task
    frame.to_parquet(ctx.staging / "prompts.parquet")
    (ctx.staging / "ranges.png").write_bytes(_histogram_png(frame, cuts, task))
    kept = frame.groupby("category")["kept"].mean()
    metrics = {
        "candidates": len(frame),
        "kept": int(frame["kept"].sum()),
        "threshold": cuts[next(iter(cuts))] if len(set(cuts.values())) == 1 else cuts,
        "kept_fraction": {str(k): float(v) for k, v in kept.items()},
        "mean_range": {str(k): float(v) for k, v in frame.groupby("category")["reward_range"].mean().items()},
        "calibration": calibration(frame),
    }
    if heldout is not None:
        heldout.assign(task=task).to_parquet(ctx.staging / HELDOUT_FILE)
        metrics["heldout"] = len(heldout)
    ctx.tracker.log_metrics(flat_metrics(metrics))
    return commit_stage(ctx, stage, SECTIONS, inputs, metrics, output_root)


def _prompt_file_candidates(config: FlowRLConfig, task: str) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """(the prompt file's candidate rows, its held-out share, the file's stamp as a stage input)
    (flowrl/prompt_files.py): every row is checked here."""
    key = f"filter.{task}_prompts"
    path = getattr(config.filter, f"{task}_prompts")
    if not path:
        raise ConfigError(f"{key}: required when model.family is {config.model.family} (the candidate prompt file)")
    rows = load_prompt_file(path, task, key, family_of(config).image_size(config))
    heldout = heldout_mask(rows, config.filter.heldout_fraction, config.run.seed)
    return (rows[~heldout].reset_index(drop=True), rows[heldout].reset_index(drop=True),
            f"{path}#{rows.attrs['sha256'][:16]}")


def check_prompt_tasks(uris: dict[str, str]) -> None:
    """Each task's prompts are a filter_prompts artifact of that task, by its manifest; read before
    any work (edit prompts carry source images that T2I ones lack: a mix-up fails only when the
    first rollout is scored)."""
    for task, uri in uris.items():
        stage = read_manifest(uri).stage
        if stage != f"{STAGE}_{task}":
            raise ArtifactError(f"{uri}: a {stage} artifact where the {task} prompts ({STAGE}_{task}) belong")


def load_prompt_set(uri: str) -> pd.DataFrame:
    """The kept rows of a filter_prompts artifact."""
    frame = pd.read_parquet(fetch(uri) / "prompts.parquet")
    return frame[frame["kept"]].reset_index(drop=True)


def load_heldout_set(uri: str) -> pd.DataFrame:
    """The held-out rows of a production filter_prompts artifact (prompt file share never trained on)."""
    path = fetch(uri) / HELDOUT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{uri}: no {HELDOUT_FILE} (a shapes-world filter artifact has none: its held-out "
                                "sets come from the grammar)")
    return pd.read_parquet(path)
