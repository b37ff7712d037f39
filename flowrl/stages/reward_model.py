"""Stage `reward_model`: train the reward models on the annotation datasets.

Per task, one pointwise scorer per configured Likert criterion (reward =
expected level) and, for comparison, one pairwise (Bradley-Terry) scorer on
the preference pairs. Metrics on held-out annotation groups (new images of
prompts seen in training) and on unseen prompts: Spearman correlation of the
reward with the annotators' mean label per image and ordering accuracy on
their preferences, each beside the ceiling a perfect scorer of those noisy
labels reaches; in the shapes world the same against the judge's latent
scores (``judge_*``), for evaluation only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from typing import Callable

import numpy as np
import pandas as pd
import torch

from flowrl.config import ConfigError, FlowRLConfig, RewardModelConfig
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
    is_unseen_prompt,
    label_spearman_ceiling,
    spearman,
    spearman_ceiling,
    split_annotations,
)
from flowrl.shapes.edits import parse_edit
from flowrl.shapes import perturb
from flowrl.shapes.prompts import T2I_CATEGORIES, parse_t2i, sample_t2i
from flowrl.shapes.render import render_scene, to_tensor
from flowrl.shapes.splits import bench_texts
from flowrl.rl.trainer import Checkpoints
from flowrl.stages.common import StageResult, commit_stage, committed_result, flat_metrics, stage_context
from flowrl.stages.registry import stage_sections
from flowrl.storage import ArtifactError, ArtifactStore, fetch, read_manifest
from flowrl.tracking import Tracker

STAGE = "reward_model"
SECTIONS = stage_sections(STAGE)
_JUDGE_AS_ANNOTATOR = Annotator("judge", bias=0.0, noise=0.0)


def _judge_latents(frame: pd.DataFrame, image_column: str) -> list[Latents]:
    """The judge's latents of each row's image (held-out evaluation only). Every scorer of a task is
    evaluated on the same held-out rows, so the latents of one set of rows are computed once and kept
    (a few, keyed by a digest of the rows' images, sources and prompts)."""
    digest = hashlib.sha256()
    for column in (image_column, "source_image", "prompt"):
        for value in frame[column]:
            digest.update(b"\0" if value is None else value if isinstance(value, bytes) else str(value).encode())
    key = digest.hexdigest()
    if key not in _LATENTS:
        images = np.stack([decode_png(b) for b in frame[image_column]])
        if frame["task"].iloc[0] == "t2i":
            latents = latents_for(images, [parse_t2i(p) for p in frame["prompt"]])
        else:
            sources = np.stack([decode_png(b) for b in frame["source_image"]])
            latents = latents_for(images, [parse_edit(p) for p in frame["prompt"]], sources)
        while len(_LATENTS) >= _LATENTS_KEPT:
            _LATENTS.pop(next(iter(_LATENTS)))
        _LATENTS[key] = latents
    return _LATENTS[key]


_LATENTS: dict[str, list[Latents]] = {}
_LATENTS_KEPT = 8  # a task's held-out and unseen images and pairs (a and b), with room to spare


CAST_PROBE_SCENES = 96


@torch.no_grad()
def colour_cast_probe(scorer: ScoreBackbone, resolution: int, scenes: int = CAST_PROBE_SCENES,
                      seed: int = 0) -> dict[str, float]:
    """Whether ``scorer`` sees an off-palette colour cast (what RL policies drift into): on ``scenes``
    correct renders of fresh T2I prompts, every category in turn, the share whose copy with a cast of
    8-40 levels scores below the clean render, and the mean gap clean - cast (expected levels)."""
    scorer.eval()
    rng = np.random.default_rng([seed, scenes])
    examples = [sample_t2i(rng, T2I_CATEGORIES[i % len(T2I_CATEGORIES)]) for i in range(scenes)]
    clean = np.stack([render_scene(e.scene, resolution) for e in examples])
    cast = np.stack([perturb.color_cast(image, rng, distance=float(rng.uniform(8.0, 40.0))) for image in clean])
    prompts = [e.prompt for e in examples]
    on_clean = rewards_of(scorer, to_tensor(clean), prompts, None)
    on_cast = rewards_of(scorer, to_tensor(cast), prompts, None)
    return {"scenes": float(scenes), "cast_below_clean": float((on_cast < on_clean).float().mean()),
            "mean_gap": float((on_clean - on_cast).mean())}


def _item_keys(frame: pd.DataFrame) -> pd.Series:
    """One key per scored item: its prompt, image and source (the same picture under two prompts, such
    as an identical render for "a circle" and "a red circle", is two items with their own labels)."""
    def digest(value) -> str:
        return hashlib.sha256(value).hexdigest()[:32] if isinstance(value, (bytes, bytearray)) else ""

    return (frame["prompt"].astype(str) + "\0" + frame["image"].map(digest) + "\0"
            + frame["source_image"].map(digest))


def _unique_items(points: pd.DataFrame, criterion: str) -> tuple[pd.DataFrame, np.ndarray, list[list[float]]]:
    """(one row per item, its mean ``criterion`` label, all its labels), items in first-seen order."""
    keys = _item_keys(points)
    unique = points.loc[~keys.duplicated()].reset_index(drop=True)
    grouped = points[criterion].groupby(keys, sort=False)
    order = keys.drop_duplicates()
    return unique, grouped.mean().reindex(order).to_numpy(), grouped.apply(list).reindex(order).tolist()


def _reference(points: pd.DataFrame, pairs: pd.DataFrame, criterion: str, judge: bool):
    """What the held-out rewards are compared with, per unique image and per
    pair: the judge (shapes world) or, without one, the human labels (mean
    level per image, the annotated preference)."""
    unique, mean_labels, _ = _unique_items(points, criterion)
    if judge:
        scores = np.array([getattr(lat, criterion) for lat in _judge_latents(unique, "image")])
        lat_a, lat_b = _judge_latents(pairs, "image_a"), _judge_latents(pairs, "image_b")
        rng = np.random.default_rng(0)
        prefs = [PREFERENCE_VALUE[_JUDGE_AS_ANNOTATOR.prefer(a, b, rng)] for a, b in zip(lat_a, lat_b)]
    else:
        scores = mean_labels
        prefs = [PREFERENCE_VALUE[p] for p in pairs["preference"]]
    return unique, scores, torch.tensor(prefs)


def _label_ceiling(labels: list[list[float]], mean_labels: np.ndarray, judge_scores: np.ndarray | None) -> float:
    """The Spearman a perfect scorer reaches with the mean labels: with a judge, that of the judge's latent
    score (every annotator's expected level rises with it, so it ranks images as their expected label
    does); without one, estimated from two annotators' agreement on the same image."""
    if judge_scores is not None:
        return spearman(torch.from_numpy(judge_scores), mean_labels)
    try:
        return label_spearman_ceiling(labels)
    except ValueError:  # one label per image: the agreement cannot be estimated
        return float("nan")


@torch.no_grad()
def _evaluate(
    scorer: ScoreBackbone, points: pd.DataFrame, pairs: pd.DataFrame, criterion: str, judge: bool
) -> dict[str, float]:
    """Spearman with the annotators' mean ``criterion`` label per image and ordering accuracy on their
    preferences, each beside its ceiling; in the shapes world also the same against the judge
    (``judge_*``), which the annotators' labels estimate with noise."""
    scorer.eval()
    unique, mean_labels, labels = _unique_items(points, criterion)
    data = PointwiseData.from_frame(unique, criterion)
    rewards = rewards_of(scorer, data.images, data.prompts, data.sources)
    pair_data = PairwiseData.from_frame(pairs)
    reward_a = rewards_of(scorer, pair_data.images_a, pair_data.prompts, pair_data.sources)
    reward_b = rewards_of(scorer, pair_data.images_b, pair_data.prompts, pair_data.sources)
    out = {"reference": "labels", "spearman": spearman(rewards, mean_labels)}
    judge_out: dict[str, float] = {}
    judge_scores = None
    if judge:
        _, judge_scores, judged = _reference(points, pairs, criterion, judge=True)
        judge_out = {
            "judge_spearman": spearman(rewards, judge_scores),
            "judge_spearman_ceiling": spearman_ceiling(judge_scores),
            "judge_pairwise_accuracy": ordering_accuracy(reward_a, reward_b, judged),
        }
    out["spearman_ceiling"] = _label_ceiling(labels, mean_labels, judge_scores)
    labelled = torch.tensor([PREFERENCE_VALUE[p] for p in pairs["preference"]])
    out["pairwise_accuracy"] = ordering_accuracy(reward_a, reward_b, labelled) if (labelled != 0.5).any() \
        else float("nan")
    return {**out, **judge_out, "heldout_images": float(len(unique)), "heldout_pairs": float(len(pairs))}


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
    return ShapesScorer(ScorerArch(width=r.width, depth=r.depth, heads=r.heads, stem=r.stem), config.world.resolution)


def _init_scorer(config: FlowRLConfig, task: str, criterion: str, name: str, init_dir) -> ScoreBackbone:
    """The first round's scorer ``task/name`` of the ``init`` artifact (``init_dir``), set up to train on."""
    r = config.reward_model
    directory = init_dir / task / name
    if r.backbone == "vlm":
        from flowrl.rewards.vlm import CRITERIA, QwenVLScorer

        criterion_name = _VLM_CRITERIA.get((task, criterion), criterion)
        return QwenVLScorer.from_pretrained(str(directory), criterion=criterion_name,
                                            criterion_description=CRITERIA[criterion_name],
                                            rationale=r.vlm_rationale).train()
    scorer = ShapesScorer.load(directory)
    wanted = ScorerArch(width=r.width, depth=r.depth, heads=r.heads, stem=r.stem)
    if scorer.arch != wanted or scorer.resolution != config.world.resolution:
        raise ConfigError(f"reward_model --init: the scorer {directory} is {scorer.arch} at resolution "
                          f"{scorer.resolution}, the config asks for {wanted} at world.resolution "
                          f"{config.world.resolution} (reward_model.width / depth / heads)")
    return scorer.train()


def _scorer_names(config: FlowRLConfig, task: str) -> list[tuple[str, str]]:
    """(directory, criterion) of every scorer the stage trains for ``task``, in training order."""
    r = config.reward_model
    criteria = r.t2i_criteria if task == "t2i" else r.edit_criteria
    return [(f"pointwise_{c}", c) for c in criteria] + ([("pairwise", "alignment")] if r.pairwise else [])


def _check_init(config: FlowRLConfig, init_uri: str):
    """The local copy of the ``init`` artifact, checked before any training: a reward_model artifact
    holding every scorer this config trains (ArtifactError naming what is wrong)."""
    made_by = read_manifest(init_uri).stage
    if made_by != STAGE:
        raise ArtifactError(f"reward_model --init {init_uri}: an artifact of stage {made_by}, where a reward_model "
                            "artifact was expected")
    local = fetch(init_uri)
    missing = [f"{task}/{name}" for task in ("t2i", "edit") for name, _ in _scorer_names(config, task)
               if not (local / task / name).is_dir()]
    if missing:
        raise ArtifactError(f"reward_model --init {init_uri}: no scorer {', '.join(missing)} to start from (the "
                            "config trains them; the init artifact was made with other criteria)")
    return local


def first_round_config(config: FlowRLConfig) -> FlowRLConfig:
    """``config`` as a reward model trained from scratch sees it: ``reward_model.refresh_steps`` at its
    default, which the hash leaves out, so that model's version does not depend on it."""
    default = RewardModelConfig().refresh_steps
    return dataclasses.replace(config, reward_model=dataclasses.replace(config.reward_model, refresh_steps=default))


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
                            config_hash=config.section_hash(*SECTIONS), name=name, pass_generator=True)
    if resume:
        trainer.resume()
    trainer.train(log, progress=progress)


def _training_texts(task: str, split, unseen_fraction: float, seed: int) -> Callable[[str], bool]:
    """Which prompt texts an augmented training row may carry: none that the split rule holds out for
    the unseen-prompt metrics (decided by the rule itself, so a text no annotation has yet, which a later
    round may add, is refused too), none held out with all its groups, none of the bench's share of the
    grammar (no stage trains on those)."""
    held = set(split.heldout["prompt"]) - set(split.train["prompt"])
    bench = {text for texts in bench_texts(task).values() for text in texts}
    return lambda text: (text not in held and text not in bench
                         and not is_unseen_prompt(text, unseen_fraction, seed))


def _train_task(ctx, config: FlowRLConfig, task: str, points: pd.DataFrame, pairs: pd.DataFrame,
                output_root: str | None = None, resume: bool = False, progress: bool = False,
                init_dir=None) -> dict:
    """Train (or with ``init_dir``, refresh for ``reward_model.refresh_steps`` steps from the first
    round's weights) and evaluate every scorer of ``task``."""
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
    allowed = _training_texts(task, split_p, r.unseen_prompt_fraction, seed)
    log = lambda metrics, step: ctx.tracker.log_metrics({f"{task}/{k}": v for k, v in metrics.items()}, step)
    metrics: dict = {"split": {name: {"pointwise": len(getattr(split_p, name)), "pairwise": len(getattr(split_q, name))}
                               for name in ("train", "heldout", "unseen")}}
    def start_of(name: str, criterion: str) -> ScoreBackbone:
        if init_dir is not None:
            return _init_scorer(config, task, criterion, name, init_dir)
        return _new_scorer(config, task, criterion, seed)

    def fit(scorer, step_loss, n_rows: int, steps: int, name: str) -> None:
        steps = r.refresh_steps if init_dir is not None else steps
        if steps:  # a refresh of 0 steps keeps the first round's weights
            _fit(ctx, config, scorer, step_loss, n_rows, steps, f"{task}/{name}", log, output_root, resume, progress)

    for criterion in criteria:
        start = time.perf_counter()
        scorer = start_of(f"pointwise_{criterion}", criterion)
        data = PointwiseData.from_frame(split_p.train, criterion)
        steps = r.steps if criterion == "alignment" else r.easy_steps
        fit(scorer, lambda idx, gen: pointwise_step_loss(scorer, data, idx, gen, r.augment, allowed),
            len(data.prompts), steps, f"pointwise_{criterion}")
        scorer.save(ctx.staging / task / f"pointwise_{criterion}")
        metrics[f"pointwise_{criterion}"] = {**_held_out_metrics(scorer, split_p, split_q, criterion, judge),
                                             "train_s": round(time.perf_counter() - start, 1)}
        if judge and task == "t2i":
            metrics[f"pointwise_{criterion}"]["colour_cast_probe"] = colour_cast_probe(
                scorer, config.world.resolution)
    if r.pairwise:
        start = time.perf_counter()
        scorer = start_of("pairwise", "alignment")
        data = PairwiseData.from_frame(split_q.train)
        fit(scorer, lambda idx, gen: pairwise_step_loss(scorer, data, idx), len(data.prompts), r.steps, "pairwise")
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
    init_uri: str | None = None,
    resume: bool = False,
    progress: bool = True,
) -> StageResult:
    """Train and evaluate every reward model and commit them; ``resume`` (with
    ``reward_model.checkpoint_every`` set) continues each scorer's training from
    its newest checkpoint. ``progress``: one bar per scorer, named after it.
    ``init_uri``: a reward_model artifact each scorer starts from instead of fresh weights, trained
    ``reward_model.refresh_steps`` steps (the refresh after a second annotation round); the held-out
    and unseen splits follow the same rule, so the first round's held-out rows stay held out."""
    if config.reward_model.augment and family_of(config).prompt_files:
        raise ConfigError(f"reward_model.augment: {list(config.reward_model.augment)} rewrites prompts of the shapes "
                          "grammar; this model family's prompts come from files")
    inputs = {"annotations": annotations_uri}
    if init_uri is None:
        config = first_round_config(config)
        init_dir = None
    else:
        init_dir = _check_init(config, init_uri)
        inputs["init"] = init_uri
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
            metrics[task] = _train_task(ctx, config, task, points, pairs, output_root, resume, progress, init_dir)
        ctx.tracker.log_metrics(flat_metrics(metrics))
        return commit_stage(ctx, STAGE, SECTIONS, inputs, metrics, output_root)
