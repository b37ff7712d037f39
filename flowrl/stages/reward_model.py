"""Stage `reward_model`: train the reward models on the annotation datasets.

Per task, one pointwise scorer per configured Likert criterion (reward =
expected level) and, for comparison, one pairwise (Bradley-Terry) scorer on
the preference pairs. Metrics on held-out annotation groups (new images of
prompts seen in training) and on unseen prompts: ordering accuracy on the
judge's preference between two images of the same prompt, and Spearman
correlation of the reward with the judge's latent score (shapes world; with
human labels, with the mean label and the annotated preference).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from flowrl.config import ConfigError, FlowRLConfig
from flowrl.models.families import family_of
from flowrl.rewards.annotations import AnnotationError, decode_png, load_annotations
from flowrl.rewards.backbone import ScoreBackbone
from flowrl.rewards.shapes_annotators import Annotator, Latents, latents_for
from flowrl.rewards.shapes_scorer import ScorerArch, ShapesScorer
from flowrl.rewards.training import (
    PREFERENCE_VALUE,
    PairwiseData,
    PointwiseData,
    ScorerTrainer,
    ordering_accuracy,
    pairwise_step_loss,
    pointwise_step_loss,
    rewards_of,
    spearman,
    spearman_ceiling,
    split_annotations,
)
from flowrl.shapes.edits import parse_edit
from flowrl.shapes.prompts import parse_t2i
from flowrl.rl.trainer import Checkpoints
from flowrl.stages.common import StageResult, commit_stage, committed_result, flat_metrics, stage_context
from flowrl.stages.registry import stage_sections
from flowrl.storage import ArtifactStore, fetch
from flowrl.tracking import Tracker

STAGE = "reward_model"
SECTIONS = stage_sections(STAGE)
_JUDGE_AS_ANNOTATOR = Annotator("judge", bias=0.0, noise=0.0)


def _judge_latents(frame: pd.DataFrame, image_column: str) -> list[Latents]:
    """The judge's latents of each row's image (held-out evaluation only)."""
    images = np.stack([decode_png(b) for b in frame[image_column]])
    if frame["task"].iloc[0] == "t2i":
        return latents_for(images, [parse_t2i(p) for p in frame["prompt"]])
    sources = np.stack([decode_png(b) for b in frame["source_image"]])
    return latents_for(images, [parse_edit(p) for p in frame["prompt"]], sources)


def _reference(points: pd.DataFrame, pairs: pd.DataFrame, criterion: str, judge: bool):
    """What the held-out rewards are compared with, per unique image and per
    pair: the judge (shapes world) or, without one, the human labels (mean
    level per image, the annotated preference)."""
    unique = points.drop_duplicates("image").reset_index(drop=True)
    if judge:
        scores = np.array([getattr(lat, criterion) for lat in _judge_latents(unique, "image")])
        lat_a, lat_b = _judge_latents(pairs, "image_a"), _judge_latents(pairs, "image_b")
        rng = np.random.default_rng(0)
        prefs = [PREFERENCE_VALUE[_JUDGE_AS_ANNOTATOR.prefer(a, b, rng)] for a, b in zip(lat_a, lat_b)]
    else:
        scores = points.groupby("image", sort=False)[criterion].mean().reindex(unique["image"]).to_numpy()
        prefs = [PREFERENCE_VALUE[p] for p in pairs["preference"]]
    return unique, scores, torch.tensor(prefs)


@torch.no_grad()
def _evaluate(
    scorer: ScoreBackbone, points: pd.DataFrame, pairs: pd.DataFrame, criterion: str, judge: bool
) -> dict[str, float]:
    """Spearman with the reference ``criterion`` score; ordering accuracy on the reference preferences."""
    scorer.eval()
    unique, reference_scores, judged = _reference(points, pairs, criterion, judge)
    data = PointwiseData.from_frame(unique, criterion)
    rewards = rewards_of(scorer, data.images, data.prompts, data.sources)
    pair_data = PairwiseData.from_frame(pairs)
    reward_a = rewards_of(scorer, pair_data.images_a, pair_data.prompts, pair_data.sources)
    reward_b = rewards_of(scorer, pair_data.images_b, pair_data.prompts, pair_data.sources)
    return {
        "reference": "judge" if judge else "labels",
        "spearman": spearman(rewards, reference_scores),
        "spearman_ceiling": spearman_ceiling(reference_scores),
        "pairwise_accuracy": ordering_accuracy(reward_a, reward_b, judged),
        "heldout_images": float(len(unique)),
        "heldout_pairs": float(len(pairs)),
    }


# the VLM scorer's name for what the shapes annotations call "alignment" on edits
_VLM_CRITERIA = {("edit", "alignment"): "instruction_following"}


def _new_scorer(config: FlowRLConfig, task: str, criterion: str, seed: int) -> ScoreBackbone:
    """A fresh shapes scorer, or the pretrained VLM set up for ``criterion``."""
    r = config.reward_model
    torch.manual_seed(seed)
    if r.backbone == "vlm":
        from flowrl.rewards.vlm import CRITERIA, QwenVLScorer

        name = _VLM_CRITERIA.get((task, criterion), criterion)
        scorer = QwenVLScorer.from_pretrained(
            str(r.vlm_pretrained), criterion=name, criterion_description=CRITERIA[name], rationale=r.vlm_rationale
        )
        return scorer.train()
    return ShapesScorer(ScorerArch(width=r.width, depth=r.depth, heads=r.heads), config.world.resolution)


def _held_out_metrics(scorer, split_p, split_q, criterion: str, judge: bool) -> dict:
    """Metrics on the held-out groups, and (prefixed ``unseen_prompt_``) on the
    prompts no training row has, when there are any."""
    metrics = _evaluate(scorer, split_p.heldout, split_q.heldout, criterion, judge)
    if len(split_p.unseen) and len(split_q.unseen):
        unseen = _evaluate(scorer, split_p.unseen, split_q.unseen, criterion, judge)
        metrics.update({f"unseen_prompt_{k}": v for k, v in unseen.items() if k != "reference"})
    return metrics


def _fit(ctx, config: FlowRLConfig, scorer: ScoreBackbone, step_loss, n_rows: int, steps: int, name: str, log,
         output_root: str | None, resume: bool, progress: bool = False) -> None:
    """Train ``scorer`` on the shared loop with the reward_model section's optimizer settings; with
    ``checkpoint_every`` set, each scorer (``name``) checkpoints as a run of its own, and ``resume``
    continues it from its newest checkpoint (a finished one is loaded as it is). ``progress``: the
    loop's bar, labelled ``name``."""
    r = config.reward_model
    checkpoints = None
    if r.checkpoint_every is not None:
        store = ArtifactStore(output_root or config.run.artifact_root)
        checkpoints = Checkpoints(store, STAGE, f"{ctx.version}-{name.replace('/', '-')}")
    trainer = ScorerTrainer(scorer, step_loss, n_rows, steps=steps, batch_size=r.batch_size, lr=r.lr,
                            seed=config.run.seed, weight_decay=r.weight_decay, grad_clip=r.grad_clip,
                            checkpoints=checkpoints, checkpoint_every=r.checkpoint_every,
                            config_hash=config.section_hash(*SECTIONS), name=name)
    if resume:
        trainer.resume()
    trainer.train(log, progress=progress)


def _train_task(ctx, config: FlowRLConfig, task: str, points: pd.DataFrame, pairs: pd.DataFrame,
                output_root: str | None = None, resume: bool = False, progress: bool = False) -> dict:
    r = config.reward_model
    seed = config.run.seed
    split_p = split_annotations(points[points.task == task].reset_index(drop=True),
                                r.heldout_fraction, r.unseen_prompt_fraction, seed)
    split_q = split_annotations(pairs[pairs.task == task].reset_index(drop=True),
                                r.heldout_fraction, r.unseen_prompt_fraction, seed)
    if split_p.heldout.empty or split_q.heldout.empty or split_p.train.empty or split_q.train.empty:
        raise ConfigError(
            f"reward_model.heldout_fraction = {r.heldout_fraction}: the {task} annotations "
            f"({len(split_p.train) + len(split_p.heldout)} pointwise, {len(split_q.train) + len(split_q.heldout)} "
            "pairwise rows outside the unseen prompts) leave an empty training or held-out split; "
            "annotate more prompts or change the fraction"
        )
    criteria = r.t2i_criteria if task == "t2i" else r.edit_criteria
    judge = family_of(config).has_judge  # only the shapes world has a judge
    log = lambda metrics, step: ctx.tracker.log_metrics({f"{task}/{k}": v for k, v in metrics.items()}, step)
    metrics: dict = {"split": {name: {"pointwise": len(getattr(split_p, name)), "pairwise": len(getattr(split_q, name))}
                               for name in ("train", "heldout", "unseen")}}
    for criterion in criteria:
        start = time.perf_counter()
        scorer = _new_scorer(config, task, criterion, seed)
        data = PointwiseData.from_frame(split_p.train, criterion)
        steps = r.steps if criterion == "alignment" else r.easy_steps
        _fit(ctx, config, scorer, lambda idx: pointwise_step_loss(scorer, data, idx), len(data.prompts), steps,
             f"{task}/pointwise_{criterion}", log, output_root, resume, progress)
        scorer.save(ctx.staging / task / f"pointwise_{criterion}")
        metrics[f"pointwise_{criterion}"] = {**_held_out_metrics(scorer, split_p, split_q, criterion, judge),
                                             "train_s": round(time.perf_counter() - start, 1)}
    if r.pairwise:
        start = time.perf_counter()
        scorer = _new_scorer(config, task, "alignment", seed)
        data = PairwiseData.from_frame(split_q.train)
        _fit(ctx, config, scorer, lambda idx: pairwise_step_loss(scorer, data, idx), len(data.prompts), r.steps,
             f"{task}/pairwise", log, output_root, resume, progress)
        scorer.save(ctx.staging / task / "pairwise")
        metrics["pairwise"] = {**_held_out_metrics(scorer, split_p, split_q, "alignment", judge),
                               "train_s": round(time.perf_counter() - start, 1)}
    return metrics


def run_reward_model(
    config: FlowRLConfig,
    annotations_uri: str,
    *,
    output_root: str | None = None,
    tracker: Tracker | None = None,
    resume: bool = False,
    progress: bool = True,
) -> StageResult:
    """Train and evaluate every reward model and commit them; ``resume`` (with
    ``reward_model.checkpoint_every`` set) continues each scorer's training from
    its newest checkpoint. ``progress``: one bar per scorer, named after it."""
    inputs = {"annotations": annotations_uri}
    done = committed_result(STAGE, config, SECTIONS, inputs, output_root, tracker)
    if done is not None:
        return done
    local = fetch(annotations_uri)
    policy = config.reward_model.on_bad_row
    points, point_report = load_annotations(local / "pointwise.parquet", "pointwise", policy)
    pairs, pair_report = load_annotations(local / "pairwise.parquet", "pairwise", policy)
    for name, frame in (("pointwise", points), ("pairwise", pairs)):  # both tasks are trained: each needs rows
        for task in ("t2i", "edit"):
            if not (frame["task"] == task).any():
                raise AnnotationError(f"{annotations_uri}: {name}.parquet has 0 usable {task} rows; the reward "
                                      f"models of both tasks are trained from it")
    with stage_context(STAGE, config, SECTIONS, inputs, tracker=tracker) as ctx:
        metrics: dict = {
            "skipped_rows": {"pointwise": point_report.rows - point_report.kept,
                             "pairwise": pair_report.rows - pair_report.kept},
        }
        for task in ("t2i", "edit"):
            metrics[task] = _train_task(ctx, config, task, points, pairs, output_root, resume, progress)
        ctx.tracker.log_metrics(flat_metrics(metrics))
        return commit_stage(ctx, STAGE, SECTIONS, inputs, metrics, output_root)
