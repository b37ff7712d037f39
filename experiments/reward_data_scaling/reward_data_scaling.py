"""Where do the reward models stop on prompts they were not trained on, and is it texts or images they lack?

Not a test: it measures, it does not assert. Issue 35 asks the T2I alignment, T2I quality and edit instruction
scorers for a Spearman >= 0.8 (or 90 % of the annotators' ceiling) on prompts no scorer trained on; the default run
reaches 0.46-0.62. This study trains the first round's reward models (the `reward_model` stage as it is, with
configs/shapes.yaml) on nested shares of the annotated training rows, along two axes: ``texts`` keeps per category
the share of its training texts with the lowest hash draw (every share holds the smaller ones; every category keeps
a text), with all their images; ``groups`` keeps every text with the share of its groups (a prompt instance and its
annotated images). The unseen prompts and the held-out groups stay the same rows in every share. Per share and
scorer it reports the Spearman with the annotators' mean label on the unseen prompts with a 95 % bootstrap interval
over those prompts (each resampled prompt brings all its items), the same on the held-out groups of seen prompts
(resampling groups), and the ceiling. The whole is the default run's own `reward_model` artifact, scored the same
way. Run from the repository root (or `make experiments/reward_data_scaling/results/reward_data_scaling.json`):

    .venv/bin/python -m experiments.reward_data_scaling.reward_data_scaling measure --annotations ANN \\
        --axis texts --fraction 0.25 --threads 1 --output experiments/reward_data_scaling/results/points/texts-0.25.json
    .venv/bin/python -m experiments.reward_data_scaling.reward_data_scaling measure --annotations ANN \\
        --reward-model RM --output experiments/reward_data_scaling/results/points/whole.json
    .venv/bin/python -m experiments.reward_data_scaling.reward_data_scaling summarize --points POINTS... \\
        --output experiments/reward_data_scaling/results/reward_data_scaling.json \\
        --figure experiments/reward_data_scaling/results/reward_data_scaling.png
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from experiments import provenance, write_result
from flowrl.config import load_config
from flowrl.models import set_torch_threads
from flowrl.rewards.shapes_scorer import ShapesScorer
from flowrl.rewards.training import PointwiseData, rewards_of, spearman, split_annotations
from flowrl.stages.reward_model import _unique_items, run_reward_model
from flowrl.stages.common import relative_uri
from flowrl.storage import ArtifactStore, fetch, read_manifest

# the scorers issue 35's item 1 names: (task, criterion)
SCORERS = (("t2i", "alignment"), ("t2i", "quality"), ("edit", "alignment"))
TARGET, CEILING_SHARE, CEILING_BELOW = 0.8, 0.9, 0.89
BOOTSTRAP = 1000


def target_of(ceiling: float) -> float:
    """Item 1's target: 0.8, or 90 % of the ceiling where the ceiling is below 0.89."""
    return CEILING_SHARE * ceiling if ceiling < CEILING_BELOW else TARGET


def _draw(seed: int, text: str) -> float:
    digest = hashlib.sha256(f"reward_data_scaling:{seed}:{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _lowest(keys, fraction: float, seed: int) -> list[str]:
    """The ceil(``fraction`` x n) of ``keys`` with the lowest draw (nested in ``fraction``; at least one)."""
    ranked = sorted(set(keys), key=lambda k: (_draw(seed, k), k))
    return ranked[:max(1, math.ceil(fraction * len(ranked)))]


def kept_training_rows(train: pd.DataFrame, axis: str, fraction: float, seed: int) -> pd.Series:
    """Which training rows a share keeps, as a mask of ``train``. ``texts``: per category, the lowest-draw share
    of its texts with every group of theirs; ``groups``: every text, each with the lowest-draw share of its
    groups (the annotated images of one prompt instance)."""
    if axis == "texts":
        kept = {t for _, texts in train.groupby("category")["prompt"] for t in _lowest(texts.astype(str), fraction, seed)}
        return train["prompt"].astype(str).isin(kept)
    if axis == "groups":
        kept = {g for _, groups in train.groupby("prompt")["group"] for g in _lowest(groups.astype(str), fraction, seed)}
        return train["group"].astype(str).isin(kept)
    raise ValueError(f"axis must be 'texts' or 'groups', got {axis!r}")


def subset_frames(points: pd.DataFrame, pairs: pd.DataFrame, axis: str, fraction: float, heldout_fraction: float,
                  unseen_fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """The annotation rows a share keeps: every row of an unseen prompt or a held-out group, and the share of the
    training rows (:func:`kept_training_rows`, decided on the pointwise rows; a pairwise row goes with its group).
    The stage's split rule then splits the kept rows as it split the whole. Also, per task, the training texts
    and groups kept and of how many."""
    keep_points, keep_pairs, counts = [], [], {}
    for task in ("t2i", "edit"):
        p, q = points[points.task == task], pairs[pairs.task == task]
        split = split_annotations(p.reset_index(drop=True), heldout_fraction, unseen_fraction, seed)
        train = split.train[kept_training_rows(split.train, axis, fraction, seed).to_numpy()]
        counts[task] = {"texts": int(train["prompt"].nunique()), "of_texts": int(split.train["prompt"].nunique()),
                        "groups": int(train["group"].nunique()), "of_groups": int(split.train["group"].nunique())}
        keep = set(train["group"]) | set(split.heldout["group"]) | set(split.unseen["group"])
        keep_points.append(p[p["group"].isin(keep)])
        keep_pairs.append(q[q["group"].isin(keep)])
    return pd.concat(keep_points), pd.concat(keep_pairs), counts


def commit_subset(points: pd.DataFrame, pairs: pd.DataFrame, annotations_uri: str, axis: str, fraction: float,
                  root: str) -> str:
    """A share's rows of the annotate artifact ``annotations_uri``, committed under ``root`` as an annotate artifact
    of its own."""
    parent = annotations_uri.rstrip("/").rsplit("/", 1)[-1]
    with tempfile.TemporaryDirectory() as tmp:
        points.to_parquet(Path(tmp) / "pointwise.parquet")
        pairs.to_parquet(Path(tmp) / "pairwise.parquet")
        return ArtifactStore(root).commit(tmp, stage="annotate", version=f"{axis}-{fraction:g}-{parent}",
                                          config_hash="reward_data_scaling", inputs={"annotations": annotations_uri})


@torch.no_grad()
def scorer_rows(reward_model_uri: str, points: pd.DataFrame, config, seed: int = 0, items: bool = False) -> dict:
    """Per scorer of SCORERS: the unseen-prompt and held-out Spearman with the mean labels, each with a 95 %
    bootstrap interval over prompts (unseen) or groups (held out), and the reward of every unseen item (rounded to
    1e-5 levels: the summary's intervals resample them, paired across shares). With ``items``, also each unseen
    item's mean label and prompt (the same in every share). ``points``: the pointwise rows it trained on."""
    r = config.reward_model
    models = fetch(reward_model_uri)
    out = {}
    for task, criterion in SCORERS:
        split = split_annotations(points[points.task == task].reset_index(drop=True), r.heldout_fraction,
                                  r.unseen_prompt_fraction, config.run.seed)
        scorer = ShapesScorer.load(models / task / f"pointwise_{criterion}")
        row = {}
        for name, frame, unit in (("unseen", split.unseen, "prompt"), ("heldout", split.heldout, "group")):
            unique, mean_labels, _ = _unique_items(frame, criterion)
            data = PointwiseData.from_frame(unique, criterion)
            rewards = rewards_of(scorer, data.images, data.prompts, data.sources).float().numpy()
            row[name] = {"spearman": spearman(torch.from_numpy(rewards), mean_labels),
                         **bootstrap(rewards, mean_labels, unique[unit].astype(str).to_numpy(), seed),
                         "items": len(unique), "units": int(unique[unit].nunique())}
            if name == "unseen":
                row[name]["rewards"] = [round(float(v), 5) for v in rewards]
                if items:
                    row[name]["labels"] = [float(v) for v in mean_labels]
                    row[name]["prompts"] = unique[unit].astype(str).tolist()
        out[f"{task}/{criterion}"] = row
    return out


def percentile_interval(units: np.ndarray, statistic, seed: int) -> dict:
    """The 2.5 and 97.5 percentiles of ``statistic(idx)`` over BOOTSTRAP resamples of the units (prompts or
    groups) with replacement, ``idx`` holding every item of each drawn unit."""
    names = np.unique(units)
    members = [np.flatnonzero(units == n) for n in names]
    rng = np.random.default_rng(seed)
    values = [statistic(np.concatenate([members[i] for i in rng.integers(0, len(names), len(names))]))
              for _ in range(BOOTSTRAP)]
    low, high = np.nanpercentile(values, [2.5, 97.5])
    return {"ci_low": float(low), "ci_high": float(high)}


def bootstrap(rewards: np.ndarray, labels: np.ndarray, units: np.ndarray, seed: int) -> dict:
    """The Spearman's 95 % interval over resamples of the units, each bringing all its items."""
    return percentile_interval(units, lambda idx: spearman(torch.from_numpy(rewards[idx]), labels[idx]), seed)


def measure(args) -> dict:
    overrides = [f"run.torch_threads={args.threads}"] if args.threads else []
    config = load_config(args.config, overrides)
    set_torch_threads(config.run.torch_threads)
    r = config.reward_model
    local = fetch(args.annotations)
    points, pairs = (pd.read_parquet(local / f"{kind}.parquet") for kind in ("pointwise", "pairwise"))
    whole = args.reward_model is not None  # the default run's reward models on every training row
    axis, fraction = ("whole", 1.0) if whole else (args.axis, args.fraction)
    points, pairs, counts = subset_frames(points, pairs, "texts" if whole else axis, fraction, r.heldout_fraction,
                                          r.unseen_prompt_fraction, config.run.seed)
    if whole:
        annotations, reward_model = args.annotations, args.reward_model
    else:
        annotations = commit_subset(points, pairs, args.annotations, axis, fraction, args.root)
        reward_model = run_reward_model(config, annotations, output_root=args.root, progress=False).uri
    stage_metrics = json.loads((fetch(reward_model) / "metrics.json").read_text())
    manifest = read_manifest(reward_model)
    rows = scorer_rows(reward_model, points, config, items=whole)
    for task, criterion in SCORERS:
        stage = stage_metrics[task][f"pointwise_{criterion}"]
        row = rows[f"{task}/{criterion}"]
        row["ceiling"] = stage["unseen_prompt_spearman_ceiling"]
        row["target"] = target_of(row["ceiling"])
        row["stage_unseen_spearman"] = stage["unseen_prompt_spearman"]
        row["train_s"] = stage["train_s"]
    words = [relative_uri(w) if w.startswith("/") else w for w in (args.argv if args.argv is not None else sys.argv[1:])]
    return {"axis": axis, "fraction": fraction, "annotations": relative_uri(annotations),
            "reward_model": relative_uri(reward_model), "config_hash": manifest.config_hash,
            "code_version": manifest.code_version, "training": counts,
            "split_rows": {task: stage_metrics[task]["split"] for task in ("t2i", "edit")},
            "scorers": rows, **provenance("experiments.reward_data_scaling.reward_data_scaling", words)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="train (or read) one share's reward models and score them")
    m.add_argument("--config", default="configs/shapes.yaml")
    m.add_argument("--annotations", required=True, help="the annotate stage's artifact")
    group = m.add_mutually_exclusive_group(required=True)
    group.add_argument("--fraction", type=float, help="share of the training texts or groups, in (0, 1)")
    group.add_argument("--reward-model", help="the whole share: the default run's reward_model artifact")
    m.add_argument("--axis", choices=("texts", "groups"), default="texts",
                   help="what a share keeps a part of: the training texts (with all their groups) or every text's groups")
    m.add_argument("--root", default="artifacts/reward_data_scaling", help="artifact root of the shares")
    m.add_argument("--threads", type=int, default=None, help="torch threads (default: run.torch_threads)")
    m.add_argument("--output", required=True)
    s = sub.add_parser("summarize", help="the points as one file and a figure")
    s.add_argument("--config", default="configs/shapes.yaml", help="the config the points were measured with")
    s.add_argument("--points", nargs="+", required=True)
    s.add_argument("--output", required=True)
    s.add_argument("--figure", required=True)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "measure":
        if args.fraction is not None and not 0.0 < args.fraction < 1.0:
            parser.error(f"--fraction {args.fraction}: a share in (0, 1); the whole is --reward-model")
        result = measure(args)
    else:
        from experiments.reward_data_scaling.summary import summarize

        result = summarize(args.points, args.figure, args.config, argv)
    write_result(args.output, result)
    return result


if __name__ == "__main__":
    main()
