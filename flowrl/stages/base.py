"""Stage `base`: the model every later stage starts from.

Shapes family: pretrain the DiT by flow matching, then score it with the
judge on the held-out sets. Qwen-Image family: nothing is trained; the given
pretrained weights are validated and referenced so later stages (and the
lineage) point at exactly them.
"""

from __future__ import annotations

import json
import logging
import time

from PIL import Image

from flowrl.config import ConfigError, FlowRLConfig
from flowrl.models import CheckpointError, count_parameters, create_model, save_checkpoint
from flowrl.models.families import family_of
from flowrl.models.qwen_image import weights_fingerprint
from flowrl.pretrain import Pretrainer
from flowrl.rl.trainer import Checkpoints
from flowrl.stages.common import (StageResult, commit_stage, committed_result, flat_metrics, run_trainer,
                                  stage_context)
from flowrl.stages.registry import stage_sections
from flowrl.storage import ArtifactStore
from flowrl.tracking import Tracker
from flowrl.weights import is_store_uri, local_weights

log = logging.getLogger(__name__)

STAGE = "base"
SECTIONS = stage_sections(STAGE)


def input_stamps(config: FlowRLConfig) -> dict[str, str]:
    """{config key: fingerprint} of the local pretrained weights directories the config names (part of
    the stage's Flyte cache key): new weights at the same path are a cache miss. A hub id is keyed by
    its text (pin a revision by giving its local snapshot path)."""
    return family_of(config).input_stamps(config)


def run_base(
    config: FlowRLConfig,
    *,
    output_root: str | None = None,
    tracker: Tracker | None = None,
    progress: bool = True,
    resume: bool = False,
    stop_after: int | None = None,
) -> StageResult:
    """Run the stage and commit its artifact; returns where it is (an
    identical earlier run's artifact is returned as is). Pretraining keeps
    checkpoints every ``base.checkpoint_every`` steps; ``resume`` continues
    from this version's newest one. ``stop_after`` ends training after that
    many steps without committing, as a kill would (tests)."""
    if family_of(config).from_pretrained:
        return _reference_pretrained(config, output_root, tracker)
    done = committed_result(STAGE, config, SECTIONS, {}, output_root)
    if done is not None:
        return done
    with stage_context(STAGE, config, SECTIONS, {}, tracker=tracker) as ctx:
        from flowrl.evaluation import evaluate_shapes

        start = time.perf_counter()
        model = create_model(config, seed=config.run.seed)
        store = ArtifactStore(output_root or config.run.artifact_root)
        trainer = Pretrainer(model, config.base, config.world.resolution, config.run.seed,
                             checkpoints=Checkpoints(store, STAGE, ctx.version),
                             config_hash=config.section_hash(*SECTIONS))
        run_trainer(trainer, ctx.tracker, stage=STAGE, iterations=config.base.steps, resume=resume,
                    progress=progress, stop_after=stop_after)
        trained = trainer.trained_model()
        train_s = time.perf_counter() - start
        log.info("base: trained in %.0f s; scoring it with the judge on the held-out sets", train_s)
        report = evaluate_shapes(trained, config)
        metrics = {
            **report.metrics,
            "parameters": count_parameters(trained),
            "train_s": round(train_s, 1),
            "eval_s": round(report.wall_s, 1),
            "wall_s": round(time.perf_counter() - start, 1),
        }
        save_checkpoint(trained, ctx.staging)
        Image.fromarray(report.grid).save(ctx.staging / "grid.png")
        ctx.tracker.log_metrics(flat_metrics(metrics))
        ctx.tracker.log_image(report.grid, "grid.png")
        return commit_stage(ctx, STAGE, SECTIONS, {}, metrics, output_root)


def _mirrored(sources: dict[str, str], keys: dict[str, str], config: FlowRLConfig,
              output_root: str | None) -> dict[str, str]:
    """With the artifacts in object storage (a cluster run), each hub id becomes the URI of its mirror
    in the store (:func:`flowrl.weights.mirror`): downloaded from the hub once per commit, then read by
    every stage and retry from the store. Local artifact roots keep the hub's own cache. ``keys``: the
    config key each task's source comes from."""
    from flowrl.storage import ArtifactStore
    from flowrl.weights import is_hub_id, mirror

    root = output_root or config.run.artifact_root
    if "://" not in root or root.startswith("file://"):
        return sources
    store = ArtifactStore(root)
    return {task: mirror(source, store, keys[task]) if is_hub_id(source) else source
            for task, source in sources.items()}


def _reference_pretrained(config: FlowRLConfig, output_root: str | None, tracker: Tracker | None) -> StageResult:
    """Validate the family's published weights and write a reference to them."""
    family = family_of(config)
    keyed = family.pretrained_sources(config)
    if not keyed:
        raise ConfigError(f"model.family: {family.name} builds on published weights but names none")
    keys = {task: key for task, (key, _) in keyed.items()}
    try:
        sources = _mirrored({task: source for task, (_, source) in keyed.items()}, keys, config, output_root)
        local = {task: local_weights(sources[task], keys[task]) for task in keys}
    except FileNotFoundError as exc:
        raise CheckpointError(str(exc)) from None
    summaries = {}
    for task, path in local.items():
        try:
            summaries[task] = family.validate_pretrained(path, task)
        except (FileNotFoundError, ValueError) as exc:
            raise CheckpointError(f"{keys[task]}: {exc}") from None
    # the weights are this stage's inputs: a changed checkpoint at the same path is a new version
    # (a mirror by its URI in the store, not by where this machine cached it)
    inputs = {f"pretrained.{task}": f"{sources[task] if is_store_uri(sources[task]) else path}#{weights_fingerprint(path)}"
              for task, path in local.items()}
    done = committed_result(STAGE, config, SECTIONS, inputs, output_root)
    if done is not None:
        return done
    with stage_context(STAGE, config, SECTIONS, inputs, tracker=tracker) as ctx:
        reference = {"family": family.name, "pretrained": sources, "resolved": inputs, "components": summaries}
        (ctx.staging / "reference.json").write_text(json.dumps(reference, indent=2, sort_keys=True, default=str))
        metrics = {
            f"{task}/{name}/num_parameters": info["num_parameters"]
            for task, summary in summaries.items()
            for name, info in summary.get("components", {}).items()
            if "num_parameters" in info
        }
        ctx.tracker.log_metrics(metrics)
        ctx.tracker.set_tags({f"flowrl.pretrained.{t}": p for t, p in sources.items()})
        return commit_stage(ctx, STAGE, SECTIONS, inputs, metrics, output_root)
