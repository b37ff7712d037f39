"""What every stage shares: seeding, the artifact version, commit and tracking, progress bars and
the summary line each stage logs when it ends."""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from flowrl.config import FlowRLConfig
from flowrl.machine import machine_summary
from flowrl.models import set_torch_threads, trainable_module
from flowrl.redact import install_redaction
from flowrl.stages.registry import stage_of
from flowrl.storage import ArtifactStore, StagingDir, artifact_version, code_version
from flowrl.tracking import REGISTERED_ROLES, NullTracker, Tracker, make_tracker

log = logging.getLogger(__name__)

# committed_result's default: callers that pass no tracker register nothing
_NOT_REGISTERED = NullTracker()


@dataclass(frozen=True)
class StageResult:
    """A committed stage output: where it is and which tracking run made it.

    ``reused`` is True when the version already existed complete and the
    stage returned it without running.
    """

    stage: str
    version: str
    uri: str
    run_id: str | None
    metrics: dict
    reused: bool = False


def stage_module(stage: str) -> str:
    """The module under flowrl.stages that runs the artifacts named ``stage`` ("grpo_t2i" -> grpo), as
    the stage registry says (:func:`flowrl.stages.registry.stage_of`)."""
    return stage_of(stage).module


def stage_code_version(stage: str) -> str:
    """The code version of ``stage``: the source its module runs (see
    :func:`flowrl.storage.module_closure`), so a change elsewhere keeps its cache."""
    return code_version(stage_module(stage))


def stage_version(
    stage: str, config: FlowRLConfig, sections: tuple[str, ...], inputs: dict[str, str], code: str | None = None
) -> str:
    """The content-derived version: stage, its config sections, code, inputs."""
    return artifact_version(stage, config.section_hash(*sections), code or stage_code_version(stage), inputs)


def committed_result(
    stage: str,
    config: FlowRLConfig,
    sections: tuple[str, ...],
    inputs: dict[str, str],
    output_root: str | None = None,
    tracker: Tracker | None = _NOT_REGISTERED,
) -> StageResult | None:
    """The already complete output of this exact stage run, if there is one.

    Stages call this first, so a rerun with nothing changed costs a manifest
    read instead of the stage's work. A stage passing its ``tracker`` (None:
    the config's, as in :func:`stage_context`) has a reused model registered
    when no registry entry names it yet (a first run whose registration
    failed); rank 0 only, under torchrun.
    """
    store = ArtifactStore(output_root or config.run.artifact_root)
    version = stage_version(stage, config, sections, inputs)
    if not store.exists(stage, version):
        return None
    uri = store.uri(stage, version)
    manifest = store.read_manifest(uri)
    metrics = json.loads((store.fetch(uri) / "metrics.json").read_text())
    run_id = manifest.extra.get("mlflow_run_id")
    if stage in REGISTERED_ROLES and int(os.environ.get("RANK", "0")) == 0:
        (tracker if tracker is not None else make_tracker(config)).register_artifact(stage, config, uri, run_id)
    log_stage_summary(stage, metrics, None, uri)
    return StageResult(stage, version, uri, run_id, metrics, reused=True)


@dataclass
class StageContext:
    """Handed to a stage body: where to write, how to log."""

    config: FlowRLConfig
    staging: Path
    tracker: Tracker
    version: str
    code: str
    started: float = field(default_factory=time.perf_counter)  # when the stage's run opened (its wall time)


@contextmanager
def stage_context(
    stage: str,
    config: FlowRLConfig,
    sections: tuple[str, ...],
    inputs: dict[str, str],
    *,
    tracker: Tracker | None = None,
) -> Iterator[StageContext]:
    """Open the stage's tracking run and staging directory.

    The body writes its files into ``ctx.staging``; committing them is the
    caller's last step (:func:`commit_stage`), so a failure leaves nothing
    that looks complete.
    """
    set_torch_threads(config.run.torch_threads)
    install_redaction(excepthook=False)  # no credential of a URL in this stage's log lines, whoever logs them
    config_hash = config.section_hash(*sections)
    code = stage_code_version(stage)  # fixed at the start: edits to the source mid-run do not change it
    version = stage_version(stage, config, sections, inputs, code)
    tracker = tracker if tracker is not None else make_tracker(config)
    tags = {"flowrl.version": version, "flowrl.config_hash": config_hash, "flowrl.code_version": code,
            "flowrl.made_on": machine_summary()}
    tags.update({f"flowrl.input.{k}": v for k, v in inputs.items()})
    with tracker.stage_run(stage, config, tags=tags, sections=sections), StagingDir(stage) as staging:
        yield StageContext(config=config, staging=staging, tracker=tracker, version=version, code=code)


def commit_stage(
    ctx: StageContext,
    stage: str,
    sections: tuple[str, ...],
    inputs: dict[str, str],
    metrics: dict,
    output_root: str | None = None,
) -> StageResult:
    """Write metrics.json, upload everything, write the manifest last, tag the run."""
    (ctx.staging / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
    store = ArtifactStore(output_root or ctx.config.run.artifact_root)
    run_id = ctx.tracker.run_id
    uri = store.commit(
        ctx.staging, stage=stage, version=ctx.version, config_hash=ctx.config.section_hash(*sections),
        inputs=inputs, extra={"made_on": machine_summary(), **({"mlflow_run_id": run_id} if run_id else {})},
        code=ctx.code,
    )
    ctx.tracker.set_tags({"flowrl.artifact_uri": uri})
    log_stage_summary(stage, metrics, time.perf_counter() - ctx.started, uri)
    return StageResult(stage=stage, version=ctx.version, uri=uri, run_id=run_id, metrics=metrics)


# The metrics a user looks at first when a stage ends, by stage (flat keys as :func:`flat_metrics` writes
# them; ``*`` matches any part, ``/`` included), in the order shown. A stage's artifacts share its
# entry (grpo_t2i, grpo_edit and grpo_mixed: grpo's); keys a run lacks are left out.
HEADLINE_METRICS: dict[str, tuple[str, ...]] = {
    "base": ("t2i/alignment", "edit/accuracy", "fidelity", "parameters", "train_s", "*/num_parameters"),
    "annotate": ("t2i/pointwise_rows", "edit/pointwise_rows", "t2i/pairwise_rows", "edit/pairwise_rows",
                 "*/skipped_rows"),
    "reward_model": ("*/pointwise_alignment/spearman", "*/pointwise_alignment/pairwise_accuracy",
                     "*/pairwise/pairwise_accuracy", "skipped_rows/*"),
    "filter_prompts": ("kept", "candidates", "threshold", "heldout"),
    "grpo": ("base/*/alignment", "teacher/*/alignment", "base/*/accuracy", "teacher/*/accuracy",
             "final_train_reward", "iterations"),
    "opd": ("base/*/alignment", "student/*/alignment", "base/*/accuracy", "student/*/accuracy", "iterations"),
    "bench": ("models/*/pillars/overall",),
}
HEADLINE_LIMIT = 10  # at most this many numbers on the line


def headline_metrics(stage: str, metrics: dict) -> dict[str, float]:
    """The headline numbers of a stage's metrics (:data:`HEADLINE_METRICS`; ``stage`` an artifact name
    such as ``grpo_t2i``), at most :data:`HEADLINE_LIMIT`, each key once."""
    flat = flat_metrics(metrics)
    patterns = HEADLINE_METRICS.get(stage_of(stage).name, ())
    chosen: dict[str, float] = {}
    for pattern in patterns:
        for key in sorted(k for k in flat if fnmatch.fnmatchcase(k, pattern)):
            chosen.setdefault(key, flat[key])
    return dict(list(chosen.items())[:HEADLINE_LIMIT])


def stage_summary(stage: str, metrics: dict, wall_s: float | None, uri: str | None = None) -> str:
    """One line: the stage, its wall time (None: reused, nothing ran), its headline metrics and its artifact."""
    done = "reused" if wall_s is None else f"done in {wall_s:.0f} s"
    numbers = ", ".join(f"{key} {_number(value)}" for key, value in headline_metrics(stage, metrics).items())
    return f"stage {stage} {done}: {numbers or 'no headline metrics'}" + (f" ({uri})" if uri else "")


def _number(value: float) -> str:
    """A count as an integer, anything else with four significant digits."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.4g}"


def log_stage_summary(stage: str, metrics: dict, wall_s: float | None, uri: str | None = None) -> None:
    """Log :func:`stage_summary` at INFO, once per stage (rank 0 under torchrun). It runs after the stage
    committed its artifact: a summary that cannot be formed is logged at DEBUG, never fails the stage."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    try:
        line = stage_summary(stage, metrics, wall_s, uri)
    except Exception as exc:  # noqa: BLE001 - the stage is done; its summary line is a courtesy
        log.debug("no summary line for stage %s: %s", stage, exc)
        return
    log.info("%s", line)


def progress_bar(iterable: Iterable | None = None, *, desc: str, total: int | None = None, enabled: bool = True,
                 unit: str = "it"):
    """A tqdm bar over a stage's main loop, like the training loops' (labelled ``desc``, redrawn at most
    every 2 s); nothing when ``enabled`` is False or on a rank other than 0."""
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, unit=unit, mininterval=2.0,
                disable=not enabled or int(os.environ.get("RANK", "0")) != 0)


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """{"t2i": {"overall": 0.5}} -> {"t2i/overall": 0.5} (numbers only) for the tracker."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flat_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat


def run_trainer(trainer, tracker: Tracker, *, stage: str, iterations: int, resume: bool, progress: bool,
                stop_after: int | None):
    """The RL stages' training call: resume if asked, train, and refuse to go
    on (no artifact) when the run ended early without a stop reason, as a
    killed run would (``stop_after``, tests)."""
    if resume:
        trainer.resume()
    result = trainer.train(tracker.log_metrics, progress=progress, stop_after=stop_after)
    if trainer.state.iteration < iterations and not trainer.state.stopped:
        raise InterruptedError(f"{stage}: stopped after iteration {trainer.state.iteration} (stop_after)")
    return result


def write_history(staging: Path, state) -> None:
    """``history.json``: every iteration's metrics and every monitor evaluation of a trainer."""
    (staging / "history.json").write_text(json.dumps({"history": state.history, "monitor": state.monitor}, indent=1))


def follow_rank0(config: FlowRLConfig, store: ArtifactStore, stage: str, version: str, train) -> StageResult:
    """What a rank other than 0 does in a training stage: train beside rank 0 (which
    evaluates, commits and tracks) and return where rank 0 commits the artifact."""
    set_torch_threads(config.run.torch_threads)
    train(NullTracker())
    return StageResult(stage, version, store.uri(stage, version), None, {})


def trained_model(trainer, model, result):
    """``model`` holding the run's final weights: ZeRO-3 partitioned the trained one, so its
    engine hands a plain copy to load them into."""
    model = trainer.engine.plain_model(model)
    trainable_module(model).load_state_dict(result.module_state)
    return model


def relative_uri(uri: str) -> str:
    """A local artifact path under the working directory, relative to it (a results file names the
    repository's files, not the checkout's absolute place); anything else as given."""
    if "://" in uri and not uri.startswith("file://"):
        return uri
    try:
        return Path(uri.removeprefix("file://")).resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return uri
