"""Stage `annotate`: the annotation datasets the reward models learn from.

Shapes world: candidates per fresh prompt (base-model samples plus clean,
perturbed and degraded renderings) labelled by simulated annotators.
Production brings its own human labels in the same schema (see
:mod:`flowrl.rewards.annotations`); this stage is where they would be
validated and versioned.

A second round (``pipeline.annotation_rounds: 2``) shows the same annotators
samples of the first round's RL policies on fresh prompts, so the refreshed
reward models learn the faults RL drifts into (colour casts, texture), which
no base sample shows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from flowrl.config import ConfigError, FlowRLConfig, PolicyRoundConfig
from flowrl.evaluation import generate, to_uint8
from flowrl.models import load_checkpoint
from flowrl.models.families import family_of
from flowrl.rewards.shapes_annotators import Annotator, annotator_pool
from flowrl.rewards.shapes_dataset import Candidates, add_model_samples, annotate, draw_candidates
from flowrl.stages.common import StageResult, commit_stage, committed_result, progress_bar, stage_context
from flowrl.stages.registry import stage_sections
from flowrl.shapes.render import to_tensor
from flowrl.rewards.annotations import load_annotations
from flowrl.storage import ArtifactError, content_stamps, fetch, read_manifest, sha256_file
from flowrl.tracking import Tracker

STAGE = "annotate"
SECTIONS = stage_sections(STAGE)


def input_stamps(config: FlowRLConfig) -> dict[str, str]:
    """{config key: content stamp} of the files this stage reads besides artifacts (the human labels):
    part of its Flyte cache key (tasks/types.py)."""
    a = config.annotate
    paths = {f"annotate.{k}_path": p for k, p in (("pointwise", a.pointwise_path), ("pairwise", a.pairwise_path))}
    return content_stamps(paths)


def sample_seeds(seed: int, task: str, count: int) -> list[int]:
    """The sampling seeds of a task's ``count`` model-sample rows (prompts in order, ``k`` rows each)."""
    offset = ("t2i", "edit").index(task)
    return [seed * 1_000_003 + offset * 500_000 + j for j in range(count)]


def _model_samples(models: dict, candidates: list[Candidates], config: FlowRLConfig, k: int, seed: int,
                   progress: bool = False) -> list[list[np.ndarray]]:
    """``k`` deployment-sampler images per prompt, in order, each from the model of its task
    (``models``: {task: model}). Sampled one ``eval.batch_size`` batch per :func:`generate` call (its
    batches, each image on its own seed, :func:`sample_seeds`), so the bar moves per batch and the
    images are those of one call over all rows."""
    batch = config.eval.batch_size
    samples: list[list[np.ndarray]] = [[] for _ in candidates]
    rows_of = {task: [i for i, c in enumerate(candidates) if c.task == task for _ in range(k)]
               for task in ("t2i", "edit")}
    bar = progress_bar(desc="annotate: model samples", total=sum(len(r) for r in rows_of.values()), enabled=progress,
                       unit="img")
    with bar:
        for task in ("t2i", "edit"):
            rows = rows_of[task]
            if not rows:
                continue
            seeds = sample_seeds(seed, task, len(rows))
            sources = to_tensor(np.stack([candidates[i].source for i in rows])) if task == "edit" else None
            for start in range(0, len(rows), batch):
                part = slice(start, start + batch)
                images = generate(
                    models[task], [candidates[i].prompt for i in rows[part]], seeds[part], config.sampler,
                    sources=None if sources is None else sources[part], batch_size=batch,
                )
                for i, image in zip(rows[part], to_uint8(images)):
                    samples[i].append(image)
                bar.update(len(rows[part]))
    return samples


def first_round_config(config: FlowRLConfig) -> FlowRLConfig:
    """``config`` as the first round sees it: ``annotate.policy_round`` at its default, which the hash
    leaves out, so the first round's version does not depend on the second round's settings."""
    return dataclasses.replace(config, annotate=dataclasses.replace(config.annotate,
                                                                    policy_round=PolicyRoundConfig()))


def run_annotate(
    config: FlowRLConfig,
    base_uri: str,
    *,
    previous_uri: str | None = None,
    policy_uris: dict[str, str] | None = None,
    output_root: str | None = None,
    tracker: Tracker | None = None,
    progress: bool = True,
) -> StageResult:
    """Build (or, with ``annotate.pointwise_path``, import) the annotation datasets and commit them;
    ``progress``: bars over the model samples and the labelled candidates. With ``previous_uri`` (the
    first round's artifact) and ``policy_uris`` ({"t2i": URI, "edit": URI}, the first round's GRPO
    artifacts): the second round, whose artifact holds the first round's rows and new ones labelled on
    the policies' samples (:func:`_policy_round`)."""
    if previous_uri is not None or policy_uris is not None:
        return _policy_round(config, base_uri, previous_uri, policy_uris, output_root, tracker, progress)
    config = first_round_config(config)
    a = config.annotate
    if a.pointwise_path is not None:
        return _import_labels(config, base_uri, output_root, tracker)
    inputs = {"base": base_uri}
    done = committed_result(STAGE, config, SECTIONS, inputs, output_root)
    if done is not None:
        return done
    model = load_checkpoint(fetch(base_uri), expected_family="shapes", cfg_renorm=config.sampler.cfg_renorm)
    with stage_context(STAGE, config, SECTIONS, inputs, tracker=tracker) as ctx:
        a = config.annotate
        rng = np.random.default_rng([config.run.seed, a.seed])
        candidates = draw_candidates(rng, a.t2i_per_category, a.edit_per_kind, config.world.resolution,
                                     a.degradations)
        if a.model_samples:
            samples = _model_samples({"t2i": model, "edit": model}, candidates, config, a.model_samples, a.seed,
                                     progress)
            candidates = add_model_samples(candidates, samples)
        pool = annotator_pool(rng, a.annotators, a.bias_std, (a.noise_min, a.noise_max))
        # the annotators read the candidates in order, once: the bar counts them as they go
        with progress_bar(candidates, desc="annotate: labels", enabled=progress, unit="prompt") as labelled:
            pointwise, pairwise = annotate(labelled, pool, rng, a.labels_per_image, a.pairs_per_prompt)
        pointwise.to_parquet(ctx.staging / "pointwise.parquet")
        pairwise.to_parquet(ctx.staging / "pairwise.parquet")
        metrics = _summary(pointwise, pairwise)
        ctx.tracker.log_metrics(metrics)
        return commit_stage(ctx, STAGE, SECTIONS, inputs, metrics, output_root)


def first_round_pool(config: FlowRLConfig) -> list[Annotator]:
    """The first round's simulated annotators: its generator replayed (the candidates are drawn, then
    the pool), so a later round is labelled by the same people."""
    a = config.annotate
    rng = np.random.default_rng([config.run.seed, a.seed])
    draw_candidates(rng, a.t2i_per_category, a.edit_per_kind, config.world.resolution, a.degradations)
    return annotator_pool(rng, a.annotators, a.bias_std, (a.noise_min, a.noise_max))


def _check_policy_round(config: FlowRLConfig, base_uri: str, previous_uri: str | None,
                        policy_uris: dict[str, str] | None) -> None:
    """Everything the second round needs, checked before any model loads: errors name the input."""
    if previous_uri is None or policy_uris is None:
        raise ConfigError("annotate: the second round needs both the first round's artifact (--previous) and the "
                          "round-1 policies (--policies t2i=URI edit=URI)")
    if set(policy_uris) != {"t2i", "edit"}:
        raise ConfigError(f"annotate --policies: expected exactly t2i=URI edit=URI, got {sorted(policy_uris)}")
    if not family_of(config).has_judge or config.annotate.pointwise_path is not None:
        raise ConfigError("annotate: a second round labels the policies' samples with the shapes world's simulated "
                          "annotators; with human labels (annotate.pointwise_path) or another model family, label "
                          "the samples yourself and set pipeline.annotation_rounds: 1")
    read_manifest(base_uri)  # ArtifactError naming the URI when it does not exist or is incomplete
    previous = read_manifest(previous_uri)
    if previous.stage != STAGE:
        raise ArtifactError(f"annotate --previous {previous_uri}: an artifact of stage {previous.stage}, where an "
                            f"annotate artifact was expected")
    for task, uri in policy_uris.items():
        made_by = read_manifest(uri).stage
        if made_by not in (f"grpo_{task}", "grpo_mixed"):
            raise ArtifactError(f"annotate --policies {task}={uri}: an artifact of stage {made_by}, where a "
                                f"grpo_{task} (or grpo_mixed) artifact was expected")


def _policy_round(config: FlowRLConfig, base_uri: str, previous_uri: str | None, policy_uris: dict[str, str] | None,
                  output_root: str | None, tracker: Tracker | None, progress: bool) -> StageResult:
    """The second annotation round: fresh prompts (``annotate.policy_round``), each shown with
    ``model_samples`` samples of its task's round-1 policy (and, by config, the rendered candidates of
    the first round's kind), labelled by the first round's annotators. The artifact holds the first
    round's rows (``round`` 1) and the new ones (``round`` 2, ids and groups prefixed ``r2-``)."""
    _check_policy_round(config, base_uri, previous_uri, policy_uris)
    inputs = {"base": base_uri, "previous": previous_uri, **{f"policy_{t}": policy_uris[t] for t in ("t2i", "edit")}}
    done = committed_result(STAGE, config, SECTIONS, inputs, output_root)
    if done is not None:
        return done
    old = fetch(previous_uri)
    frames = {kind: pd.read_parquet(old / f"{kind}.parquet") for kind in ("pointwise", "pairwise")}
    models = {task: load_checkpoint(fetch(uri), expected_family="shapes", cfg_renorm=config.sampler.cfg_renorm)
              for task, uri in policy_uris.items()}
    with stage_context(STAGE, config, SECTIONS, inputs, tracker=tracker) as ctx:
        a, r = config.annotate, config.annotate.policy_round
        pool = first_round_pool(config)
        rng = np.random.default_rng([config.run.seed, r.seed])
        candidates = draw_candidates(rng, r.t2i_per_category, r.edit_per_kind, config.world.resolution,
                                     a.degradations if r.degradations is None else r.degradations)
        if not r.rendered:
            candidates = [dataclasses.replace(c, images=[]) for c in candidates]
        rendered = len(candidates[0].images)
        candidates = add_model_samples(candidates, _model_samples(models, candidates, config, r.model_samples,
                                                                  r.seed, progress))
        with progress_bar(candidates, desc="annotate: labels (round 2)", enabled=progress, unit="prompt") as labelled:
            new = dict(zip(("pointwise", "pairwise"),
                           annotate(labelled, pool, rng, a.labels_per_image, a.pairs_per_prompt)))
        for kind, frame in new.items():
            frame["id"] = "r2-" + frame["id"]
            frame["group"] = "r2-" + frame["group"]
            frame["round"] = 2
            earlier = frames[kind]
            if "round" not in earlier.columns:
                earlier = earlier.assign(round=1)
            pd.concat([earlier, frame], ignore_index=True).to_parquet(ctx.staging / f"{kind}.parquet")
        merged = {k: pd.read_parquet(ctx.staging / f"{k}.parquet") for k in ("pointwise", "pairwise")}
        metrics = _summary(merged["pointwise"], merged["pairwise"])
        metrics.update(_policy_summary(new["pointwise"], rendered))
        ctx.tracker.log_metrics(metrics)
        return commit_stage(ctx, STAGE, SECTIONS, inputs, metrics, output_root)


def _policy_summary(points: pd.DataFrame, rendered: int) -> dict[str, float]:
    """The second round's rows, and the annotators' mean labels of the policies' samples (the
    candidates past the first ``rendered`` of each prompt) per task."""
    metrics: dict[str, float] = {}
    image_index = points["id"].str.split("-").str[3].astype(int)  # r2-TASK-GROUP-IMAGE-ANNOTATOR
    for task, rows in points.groupby("task"):
        metrics[f"round2/{task}/pointwise_rows"] = float(len(rows))
        policy = rows[image_index[rows.index] >= rendered]
        for column in ("alignment", "quality", "fidelity"):
            metrics[f"round2/{task}/policy_mean_{column}"] = float(policy[column].mean())
    return metrics


def _import_labels(
    config: FlowRLConfig, base_uri: str, output_root: str | None, tracker: Tracker | None
) -> StageResult:
    """Validate human labels given as parquet files and version them (the
    production path): bad rows fail the stage or are skipped, by config. The labels are versioned
    against ``base_uri``, so that artifact must exist (its manifest is read, no weights)."""
    read_manifest(base_uri)  # ArtifactError naming the URI when it does not exist or is incomplete
    a = config.annotate
    paths = {"pointwise": str(a.pointwise_path), "pairwise": str(a.pairwise_path)}
    frames = {kind: load_annotations(path, kind, a.on_bad_row) for kind, path in paths.items()}
    inputs = {"base": base_uri, **{f"labels.{k}": f"{p}#{sha256_file(p)[:16]}" for k, p in paths.items()}}
    done = committed_result(STAGE, config, SECTIONS, inputs, output_root)
    if done is not None:
        return done
    with stage_context(STAGE, config, SECTIONS, inputs, tracker=tracker) as ctx:
        for kind, (frame, _) in frames.items():
            frame.to_parquet(ctx.staging / f"{kind}.parquet")
        metrics = _summary(frames["pointwise"][0], frames["pairwise"][0])
        metrics.update({f"{kind}/skipped_rows": float(r.rows - r.kept) for kind, (_, r) in frames.items()})
        ctx.tracker.log_metrics(metrics)
        return commit_stage(ctx, STAGE, SECTIONS, inputs, metrics, output_root)


def _summary(pointwise, pairwise) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for task, rows in pointwise.groupby("task"):
        metrics[f"{task}/pointwise_rows"] = float(len(rows))
        for column in ("alignment", "quality", "fidelity"):
            metrics[f"{task}/mean_{column}"] = float(rows[column].mean())
    for task, rows in pairwise.groupby("task"):
        metrics[f"{task}/pairwise_rows"] = float(len(rows))
        metrics[f"{task}/tie_rate"] = float((rows["preference"] == "tie").mean())
    return metrics
