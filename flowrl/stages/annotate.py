"""Stage `annotate`: the annotation datasets the reward models learn from.

Shapes world: candidates per fresh prompt (base-model samples plus clean,
perturbed and degraded renderings) labelled by simulated annotators.
Production brings its own human labels in the same schema (see
:mod:`flowrl.rewards.annotations`); this stage is where they would be
validated and versioned.
"""

from __future__ import annotations

import numpy as np

from flowrl.config import FlowRLConfig
from flowrl.evaluation import generate, to_uint8
from flowrl.models import load_checkpoint
from flowrl.rewards.shapes_annotators import annotator_pool
from flowrl.rewards.shapes_dataset import Candidates, add_model_samples, annotate, draw_candidates
from flowrl.stages.common import StageResult, commit_stage, committed_result, progress_bar, stage_context
from flowrl.stages.registry import stage_sections
from flowrl.shapes.render import to_tensor
from flowrl.rewards.annotations import load_annotations
from flowrl.storage import content_stamps, fetch, read_manifest, sha256_file
from flowrl.tracking import Tracker

STAGE = "annotate"
SECTIONS = stage_sections(STAGE)


def input_stamps(config: FlowRLConfig) -> dict[str, str]:
    """{config key: content stamp} of the files this stage reads besides artifacts (the human labels):
    part of its Flyte cache key (tasks/types.py)."""
    a = config.annotate
    paths = {f"annotate.{k}_path": p for k, p in (("pointwise", a.pointwise_path), ("pairwise", a.pairwise_path))}
    return content_stamps(paths)


def _model_samples(model, candidates: list[Candidates], config: FlowRLConfig,
                   progress: bool = False) -> list[list[np.ndarray]]:
    """``annotate.model_samples`` deployment-sampler images per prompt, in order. Sampled one
    ``eval.batch_size`` batch per :func:`generate` call (its batches, each image on its own seed),
    so the bar moves per batch and the images are those of one call over all rows."""
    k, batch = config.annotate.model_samples, config.eval.batch_size
    samples: list[list[np.ndarray]] = [[] for _ in candidates]
    rows_of = {task: [i for i, c in enumerate(candidates) if c.task == task for _ in range(k)]
               for task in ("t2i", "edit")}
    bar = progress_bar(desc="annotate: model samples", total=sum(len(r) for r in rows_of.values()), enabled=progress,
                       unit="img")
    with bar:
        for offset, task in enumerate(("t2i", "edit")):
            rows = rows_of[task]
            if not rows:
                continue
            seeds = [config.annotate.seed * 1_000_003 + offset * 500_000 + j for j in range(len(rows))]
            sources = to_tensor(np.stack([candidates[i].source for i in rows])) if task == "edit" else None
            for start in range(0, len(rows), batch):
                part = slice(start, start + batch)
                images = generate(
                    model, [candidates[i].prompt for i in rows[part]], seeds[part], config.sampler,
                    sources=None if sources is None else sources[part], batch_size=batch,
                )
                for i, image in zip(rows[part], to_uint8(images)):
                    samples[i].append(image)
                bar.update(len(rows[part]))
    return samples


def run_annotate(
    config: FlowRLConfig,
    base_uri: str,
    *,
    output_root: str | None = None,
    tracker: Tracker | None = None,
    progress: bool = True,
) -> StageResult:
    """Build (or, with ``annotate.pointwise_path``, import) the annotation datasets and commit them;
    ``progress``: bars over the model samples and the labelled candidates."""
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
            candidates = add_model_samples(candidates, _model_samples(model, candidates, config, progress))
        pool = annotator_pool(rng, a.annotators, a.bias_std, (a.noise_min, a.noise_max))
        # the annotators read the candidates in order, once: the bar counts them as they go
        with progress_bar(candidates, desc="annotate: labels", enabled=progress, unit="prompt") as labelled:
            pointwise, pairwise = annotate(labelled, pool, rng, a.labels_per_image, a.pairs_per_prompt)
        pointwise.to_parquet(ctx.staging / "pointwise.parquet")
        pairwise.to_parquet(ctx.staging / "pairwise.parquet")
        metrics = _summary(pointwise, pairwise)
        ctx.tracker.log_metrics(metrics)
        return commit_stage(ctx, STAGE, SECTIONS, inputs, metrics, output_root)


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
