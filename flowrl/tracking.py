"""Experiment tracking behind a small interface.

Stages log through :class:`Tracker`; :class:`MLflowTracker` is the real one
(a local sqlite store by default, an MLflow server in production) and
:class:`NullTracker` is for callers that want no tracking. The library never
reaches MLflow except through this module.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from flowrl.config import FlowRLConfig

# Keys never logged as params, whatever section they appear in: these names,
# or any key ending in "_" + one of them (api_token, aws_secret_access_key...).
_SECRET_NAMES = ("secret", "password", "token", "credentials", "access_key", "secret_key", "api_key")


def _is_secret(key: str) -> bool:
    key = key.lower()
    return any(key == name or key.endswith("_" + name) for name in _SECRET_NAMES)


def flatten_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"base.lr": "0.001", ...}, without secret-looking keys."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if _is_secret(key):
            continue
        if isinstance(value, dict):
            flat.update(flatten_params(value, path + "."))
        else:
            flat[path] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


class Tracker(Protocol):
    """What a stage may log. ``stage_run`` scopes one run (one per stage)."""

    def stage_run(
        self, stage: str, config: FlowRLConfig, tags: dict[str, str] | None = None
    ) -> Any: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_image(self, image: np.ndarray, name: str) -> None: ...

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    @property
    def run_id(self) -> str | None: ...


class NullTracker:
    """Tracks nothing (plain function calls, some tests)."""

    run_id = None

    @contextmanager
    def stage_run(self, stage, config, tags=None) -> Iterator["NullTracker"]:
        yield self

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_image(self, image, name) -> None:
        pass

    def log_artifact(self, path, subdir=None) -> None:
        pass

    def set_tags(self, tags) -> None:
        pass


class MLflowTracker:
    """One MLflow run per stage, in the experiment named after ``run.name``.

    ``parent_run_id`` nests the stage run under a pipeline run.
    """

    def __init__(self, tracking_uri: str, parent_run_id: str | None = None):
        from mlflow.tracking import MlflowClient  # heavy import: only when tracking

        self.tracking_uri = _resolve_sqlite(tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.parent_run_id = parent_run_id
        self._run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp:
            return exp.experiment_id
        return self.client.create_experiment(name, artifact_location=_default_artifact_location(self.tracking_uri, name))

    @contextmanager
    def stage_run(self, stage, config, tags=None) -> Iterator["MLflowTracker"]:
        all_tags = {"flowrl.stage": stage, "mlflow.runName": stage, **(tags or {})}
        if self.parent_run_id:
            all_tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self._experiment_id(config.run.name), tags=all_tags)
        self._run_id = run.info.run_id
        from mlflow.entities import Param

        params = flatten_params(config.to_dict())
        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(self._run_id, params=items[i : i + 100])
        status = "FAILED"
        try:
            yield self
            status = "FINISHED"
        finally:
            self.client.set_terminated(self._run_id, status=status)

    def log_metrics(self, metrics, step=None) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self._run_id, metrics=batch)

    def log_image(self, image, name) -> None:
        self.client.log_image(self._run_id, image, artifact_file=name)

    def log_artifact(self, path, subdir=None) -> None:
        self.client.log_artifact(self._run_id, str(path), artifact_path=subdir)

    def set_tags(self, tags) -> None:
        for key, value in tags.items():
            self.client.set_tag(self._run_id, key, value)


def _resolve_sqlite(uri: str) -> str:
    """Make a relative sqlite path absolute so every process finds the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        return prefix + os.path.abspath(uri[len(prefix):])
    return uri


def _default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """Beside a local sqlite store, keep artifacts in ``mlartifacts/`` next to
    the database file (instead of whatever the working directory is)."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    root = Path(tracking_uri[len(prefix):]).parent / "mlartifacts" / experiment
    return root.as_uri()


def make_tracker(config: FlowRLConfig, parent_run_id: str | None = None) -> Tracker:
    return MLflowTracker(config.run.tracking_uri, parent_run_id)
