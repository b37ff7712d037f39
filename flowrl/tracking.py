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
from flowrl.storage import file_uri

# Keys never logged as params, whatever section they appear in: these names,
# or any key ending in "_" + one of them (api_token, aws_secret_access_key...).
_SECRET_NAMES = ("secret", "password", "token", "credentials", "access_key", "secret_key", "api_key")


INPUT_TAG = "flowrl.input."
INPUT_RUN_TAG = "flowrl.input_run."
# Stages whose artifact is a model worth a registry entry, and the role it is registered under.
REGISTERED_ROLES = {
    "reward_model": "reward_model", "grpo_t2i": "t2i_teacher", "grpo_edit": "edit_teacher", "grpo_mixed": "mix_rl",
    "opd": "student", "opd_offpolicy": "student_offpolicy",
}


def _dataset_files(stage: str) -> tuple[str, ...]:
    """The tables a stage's artifact holds that are logged as MLflow datasets."""
    if stage == "annotate":
        return ("pointwise.parquet", "pairwise.parquet")
    if stage.startswith("filter_prompts"):
        return ("prompts.parquet",)
    return ()


def registered_name(run_name: str, role: str) -> str:
    """The registered model of a role: ``<run.name>-<role>`` (e.g. ``shapes-student``)."""
    return f"{run_name}-{role}"


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

    def promote(self, role: str, uri: str, score: float, run_name: str, alias: str = "champion") -> bool: ...

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

    def promote(self, role, uri, score, run_name, alias="champion") -> bool:
        return False


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
        experiment_id = self._experiment_id(config.run.name)
        # lineage: the run that made each input artifact, found in MLflow itself
        for key, uri in list(all_tags.items()):
            if key.startswith(INPUT_TAG) and (producer := self.run_of_artifact(uri)) is not None:
                all_tags[INPUT_RUN_TAG + key[len(INPUT_TAG):]] = producer
        run = self.client.create_run(experiment_id, tags=all_tags)
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
        if stage in REGISTERED_ROLES:
            self._register(stage, config)
        if _dataset_files(stage):
            self._log_datasets(stage)

    def _log_datasets(self, stage: str) -> None:
        """The stage's prompt / annotation tables as MLflow datasets of its run
        (source: the artifact URI; image columns left out of the logged schema)."""
        import mlflow.data
        import pandas as pd
        from mlflow.entities import DatasetInput, InputTag

        run = self.client.get_run(self._run_id)
        uri = run.data.tags.get("flowrl.artifact_uri")
        if run.info.status != "FINISHED" or not uri:
            return
        inputs = []
        for name in _dataset_files(stage):
            source = file_uri(uri, name)
            frame = pd.read_parquet(source)
            frame = frame[[c for c in frame.columns if frame[c].dtype != object or c in ("prompt", "category")]]
            dataset = mlflow.data.from_pandas(frame, source=source,
                                              name=f"{stage}/{name.removesuffix('.parquet')}")
            inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "output")]))
        self.client.log_inputs(self._run_id, datasets=inputs)

    def start_pipeline(self, config, pipeline: str, tags: dict[str, str] | None = None) -> str:
        """Open the parent run of one pipeline execution; stage runs nest under it
        (``MLflowTracker(uri, parent_run_id=...)``). Returns its run id."""
        all_tags = {"flowrl.stage": "pipeline", "flowrl.pipeline": pipeline, "mlflow.runName": pipeline,
                    **(tags or {})}
        run = self.client.create_run(self._experiment_id(config.run.name), tags=all_tags)
        from mlflow.entities import Param

        params = [Param(k, v[:6000]) for k, v in sorted(flatten_params(config.to_dict()).items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(run.info.run_id, params=params[i : i + 100])
        return run.info.run_id

    def finish_pipeline(self, run_id: str, metrics: dict[str, float], files: list | None = None) -> None:
        """Close a pipeline run with its headline metrics and files (the bench report)."""
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[i : i + 500])
        for path in files or []:
            self.client.log_artifact(run_id, str(path), artifact_path="report")
        self.client.set_terminated(run_id, status="FINISHED")

    def run_of_artifact(self, uri: str) -> str | None:
        """The id of the finished run that committed the artifact at ``uri``, if one was tracked here."""
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        if not experiments:
            return None
        quoted = uri.replace("'", "\\'")
        runs = self.client.search_runs(
            experiments, filter_string=f"tags.`flowrl.artifact_uri` = '{quoted}' and attributes.status = 'FINISHED'",
            max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def _register(self, stage: str, config) -> None:
        """A new version of the registered model of the stage's role (``<run.name>-<role>``),
        its source the artifact URI; the run is tagged with it."""
        from mlflow.exceptions import MlflowException

        run = self.client.get_run(self._run_id)
        uri = run.data.tags.get("flowrl.artifact_uri")
        if run.info.status != "FINISHED" or not uri:
            return
        name = registered_name(config.run.name, REGISTERED_ROLES[stage])
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            self.client.create_registered_model(name, description=f"flowrl {REGISTERED_ROLES[stage]} ({stage} stage)")
        version = self.client.create_model_version(
            name, source=uri, run_id=self._run_id,
            tags={"flowrl.stage": stage, "flowrl.artifact_uri": uri,
                  "flowrl.version": run.data.tags.get("flowrl.version", "")})
        self.client.set_tag(self._run_id, "flowrl.registered_model", f"{name}/{version.version}")

    def promote(self, role: str, uri: str, score: float, run_name: str, alias: str = "champion") -> bool:
        """Point ``alias`` of ``<run_name>-<role>`` at the version whose source is ``uri``
        when ``score`` beats the current holder's (recorded on it as ``flowrl.bench_overall``);
        returns whether it moved. No registered version of ``uri``: nothing moves."""
        from mlflow.exceptions import MlflowException

        name = registered_name(run_name, role)
        try:
            versions = self.client.search_model_versions(f"name = '{name}'")
        except MlflowException:
            return False
        mine = [v for v in versions if v.source == uri]
        if not mine:
            return False
        candidate = max(mine, key=lambda v: int(v.version))
        self.client.set_model_version_tag(name, candidate.version, "flowrl.bench_overall", f"{score:.6f}")
        try:
            holder = self.client.get_model_version_by_alias(name, alias)
            best = float(holder.tags.get("flowrl.bench_overall", "-inf"))
        except MlflowException:
            holder, best = None, float("-inf")
        if holder is not None and str(holder.version) == str(candidate.version):
            return False
        if score <= best:
            return False
        self.client.set_registered_model_alias(name, alias, candidate.version)
        return True

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


class TrackingUnavailable(RuntimeError):
    """The configured MLflow tracking server cannot be reached; the message names the key and URI."""


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """For an http(s) tracking URI, fail fast (before a stage's work) when the server does not answer."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    url = tracking_uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            if response.status == 200:
                return
            problem = f"HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):  # up, but behind auth that /health also requires
            return
        problem = f"HTTP {exc.code}"
    except (OSError, ValueError) as exc:
        problem = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
    raise TrackingUnavailable(
        f"run.tracking_uri: the MLflow server at {tracking_uri} is unreachable ({problem}); start it, fix the URI, "
        "or run with --no-tracking")


def make_tracker(config: FlowRLConfig, parent_run_id: str | None = None) -> Tracker:
    """The stage's tracker; an unreachable tracking server is an error here, before the stage's work."""
    check_reachable(config.run.tracking_uri)
    return MLflowTracker(config.run.tracking_uri, parent_run_id)
