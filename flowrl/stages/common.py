"""What every stage shares: seeding, the artifact version, commit and tracking."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from flowrl.config import FlowRLConfig
from flowrl.models import set_torch_threads
from flowrl.storage import ArtifactStore, StagingDir, artifact_version, code_version
from flowrl.tracking import Tracker, make_tracker


@dataclass(frozen=True)
class StageResult:
    """A committed stage output: where it is and which tracking run made it."""

    stage: str
    version: str
    uri: str
    run_id: str
    metrics: dict


@dataclass
class StageContext:
    """Handed to a stage body: where to write, how to log."""

    config: FlowRLConfig
    staging: Path
    tracker: Tracker
    version: str


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
    config_hash = config.section_hash(*sections)
    version = artifact_version(stage, config_hash, code_version(), inputs)
    tracker = tracker if tracker is not None else make_tracker(config)
    tags = {"flowrl.version": version, "flowrl.config_hash": config_hash, "flowrl.code_version": code_version()}
    tags.update({f"flowrl.input.{k}": v for k, v in inputs.items()})
    with tracker.stage_run(stage, config, tags=tags), StagingDir(stage) as staging:
        yield StageContext(config=config, staging=staging, tracker=tracker, version=version)


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
    run_id = ctx.tracker.run_id or ""
    uri = store.commit(
        ctx.staging, stage=stage, version=ctx.version, config_hash=ctx.config.section_hash(*sections),
        inputs=inputs, extra={"mlflow_run_id": run_id},
    )
    ctx.tracker.set_tags({"flowrl.artifact_uri": uri})
    return StageResult(stage=stage, version=ctx.version, uri=uri, run_id=run_id, metrics=metrics)


def flat_metrics(metrics: dict, prefix: str = "") -> dict[str, float]:
    """{"t2i": {"overall": 0.5}} -> {"t2i/overall": 0.5} (numbers only) for the tracker."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flat_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[f"{prefix}{key}"] = float(value)
    return flat
