"""Experiment tracking behind a small interface.

Stages log through :class:`Tracker`; :class:`MLflowTracker` is the real one
(a local sqlite store by default, an MLflow server in production) and
:class:`NullTracker` is for callers that want no tracking. The library never
reaches MLflow except through this module. docs/tracking.md says what a run
records and how lineage is read back.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np

from flowrl.config import FlowRLConfig
from flowrl.redact import is_secret_key, redact_url
from flowrl.redact import redact as redact_values
from flowrl.storage import file_uri

log = logging.getLogger(__name__)

# Keys never logged as params, whatever section they appear in: flowrl.redact.SECRET_NAMES (password,
# api_token, aws_secret_access_key...). The credentials of URLs (scheme://user:password@host, ?token=...)
# are masked in every param, tag and error message, whatever key holds them (flowrl.redact).
redact = redact_url  # text -> text with URL credentials masked

# MLflow's own convention: the tracking URI from the environment when nothing else names one.
TRACKING_ENV = "MLFLOW_TRACKING_URI"
# MLflow's variables for a tracking server's basic auth, read by its client on every request.
_USERNAME_ENV, _PASSWORD_ENV = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Set in a container image (with the image's tag) to record which image a run ran in.
IMAGE_ENV = "FLOWRL_IMAGE_TAG"

INPUT_TAG = "flowrl.input."
INPUT_RUN_TAG = "flowrl.input_run."
EXECUTION_TAG = "flowrl.flyte.execution_id"
FAILED_STAGE_TAG = "flowrl.failed_stage"
FAILED_RUN_TAG = "flowrl.failed_run"
# The folder of a registered stage's run holding ``artifact.json`` (the artifact's URI and manifest):
# the model version's source where the registry cannot take the artifact's URI itself.
MODEL_REFERENCE_DIR = "flowrl_model"
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


def resolve_tracking_uri(configured: str | None) -> str:
    """The tracking URI a run uses: ``run.tracking_uri`` when the config sets one (explicit
    config wins), else ``$MLFLOW_TRACKING_URI``, else the local ``sqlite:///mlflow.db``."""
    if configured and configured.strip():
        return configured.strip()
    return os.environ.get(TRACKING_ENV, "").strip() or DEFAULT_TRACKING_URI


def _param_value(value: Any) -> str:
    return redact(json.dumps(value) if isinstance(value, (list, tuple)) else str(value))


def flatten_params(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config -> {"base.lr": "0.001", ...}, without secret-looking keys
    and with the credentials of URLs redacted."""
    flat: dict[str, str] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if is_secret_key(key):
            continue
        if isinstance(value, dict):
            flat.update(flatten_params(value, path + "."))
        else:
            flat[path] = _param_value(value)
    return flat


def section_params(data: dict[str, Any], sections: tuple[str, ...] | list[str]) -> dict[str, str]:
    """The params of the named config sections only (``"grpo"``, or one key such as ``"run.seed"``)."""
    flat: dict[str, str] = {}
    for name in sections:
        value: Any = data
        for part in name.split("."):
            if not isinstance(value, dict) or part not in value:
                raise KeyError(f"config section {name!r}: no such key in the config")
            value = value[part]
        if any(is_secret_key(part) for part in name.split(".")):
            continue
        if isinstance(value, dict):
            flat.update(flatten_params(value, name + "."))
        else:
            flat[name] = _param_value(value)
    return flat


def _git(root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


@functools.lru_cache(maxsize=1)
def source_tags() -> dict[str, str]:
    """What identifies the code a run ran: the hash of the library's source (always; the same in a
    container image as in the checkout), the git commit (``mlflow.source.git.commit``) and whether
    tracked files differ from it when the code is a git checkout, and the image tag when the
    environment names one (``FLOWRL_IMAGE_TAG``)."""
    from flowrl.storage import code_version

    tags = {"flowrl.source.code_digest": code_version()}
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists() and (commit := _git(root, "rev-parse", "HEAD")):
        tags["mlflow.source.git.commit"] = commit
        status = _git(root, "status", "--porcelain", "--untracked-files=no")
        if status is not None:
            tags["flowrl.source.git.dirty"] = "true" if status else "false"
    if image := os.environ.get(IMAGE_ENV, "").strip():
        tags["flowrl.source.image"] = image
    return tags


def _file_input(value: str) -> tuple[str, str] | None:
    """(path, checksum) of an input given as ``<path>#<sha256 prefix>`` (a label or prompt file)."""
    match = re.fullmatch(r"(?P<path>.+)#(?P<sha>[0-9a-f]{8,64})", value)
    return (match["path"], match["sha"]) if match else None


def _source_of(uri: str):
    """MLflow's dataset source for ``uri``. A local path or ``file://`` URI is named as MLflow's
    ``local`` source outright: left to MLflow to resolve, it matches the local source registered for
    both spellings and MLflow warns that the source is ambiguous. Other schemes (s3, gs, http...)
    have one source each, which MLflow resolves."""
    from urllib.parse import urlsplit

    from mlflow.data.dataset_source_registry import get_dataset_source_from_json, resolve_dataset_source

    if urlsplit(uri).scheme in ("", "file"):
        return get_dataset_source_from_json(json.dumps({"uri": uri}), "local")
    return resolve_dataset_source(uri)


def _dataset_source(uri: str) -> tuple[str, str]:
    """(source_type, source JSON) of a dataset at ``uri``, as MLflow's dataset sources write them."""
    source = _source_of(uri)
    return source._get_source_type(), redact(source.to_json())


def _column_type(dtype) -> str | None:
    """The MLflow column type of a pandas / numpy dtype (32-bit MLflow ``integer`` for the integers it
    holds, else ``long``), or None for a kind MLflow has no column type for."""
    kind, size = getattr(dtype, "kind", "O"), getattr(dtype, "itemsize", 8)
    if kind in "iu":
        return "integer" if size < 4 or (kind == "i" and size == 4) else "long"
    if kind == "f":
        return "float" if size <= 4 else "double"
    return {"b": "boolean", "O": "string", "U": "string", "M": "datetime"}.get(kind)


def declared_schema(frame) -> dict:
    """The MLflow column schema of a table the stage wrote, declared from its dtypes: every column
    is required (a stage writes no missing values), integers stay integers. (MLflow's own inference
    warns on every integer column that it could not hold a missing value.) A column of another kind
    is left out of the schema."""
    from mlflow.types import ColSpec, DataType, Schema

    columns = []
    for name, dtype in frame.dtypes.items():
        kind = _column_type(dtype)
        if kind is None:
            log.debug("column %s (%s): left out of the logged schema", name, dtype)
            continue
        columns.append(ColSpec(DataType[kind], str(name), required=True))
    return {"mlflow_colspec": Schema(columns).to_dict()}


def input_dataset(name: str, value: str):
    """The MLflow dataset of one input of a stage, or None when the value names no data (a task
    name, a hub id): a flowrl artifact (name ``<stage>@<version>``, digest of its files' checksums,
    profile its file count and bytes) or a file given with its checksum."""
    from mlflow.entities import Dataset

    from flowrl.storage import ArtifactError, read_manifest

    if (file := _file_input(value)) is not None:
        source_type, source = _dataset_source(file[0])
        return Dataset(name=name, digest=file[1][:32], source_type=source_type, source=source)
    if "/" not in value:
        return None
    try:
        manifest = read_manifest(value)
    except (ArtifactError, OSError, ValueError) as exc:
        log.debug("input %s=%s: not logged as a dataset (%s)", name, value, exc)
        return None
    files = sorted((path, str(meta.get("sha256", ""))) for path, meta in manifest.files.items())
    digest = hashlib.sha256(json.dumps(files).encode()).hexdigest()[:32]
    profile = {"files": len(files), "bytes": sum(int(m.get("bytes", 0)) for m in manifest.files.values()),
               "stage": manifest.stage, "version": manifest.version}
    source_type, source = _dataset_source(value)
    return Dataset(name=f"{manifest.stage}@{manifest.version}", digest=digest, source_type=source_type,
                   source=source, profile=json.dumps(profile))


class Tracker(Protocol):
    """What a stage may log. ``stage_run`` scopes one run (one per stage)."""

    def stage_run(
        self, stage: str, config: FlowRLConfig, tags: dict[str, str] | None = None,
        sections: tuple[str, ...] | None = None,
    ) -> Any: ...

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...

    def log_image(self, image: np.ndarray, name: str) -> None: ...

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None: ...

    def set_tags(self, tags: dict[str, str]) -> None: ...

    def promote(self, role: str, uri: str, score: float, run_name: str, alias: str = "champion") -> bool: ...

    def register_artifact(
        self, stage: str, config: FlowRLConfig, uri: str, run_id: str | None = None
    ) -> str | None: ...

    @property
    def run_id(self) -> str | None: ...


class NullTracker:
    """Tracks nothing (plain function calls, some tests)."""

    run_id = None

    @contextmanager
    def stage_run(self, stage, config, tags=None, sections=None) -> Iterator["NullTracker"]:
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

    def register_artifact(self, stage, config, uri, run_id=None) -> str | None:
        return None


class MLflowTracker:
    """One MLflow run per stage, in the experiment named after ``run.name``.

    ``parent_run_id`` nests the stage run under a pipeline run; a stage run that fails ends that
    pipeline run FAILED too (a retry of the same stage opens it again). ``tags`` go on every run it
    opens (e.g. the Flyte execution id), beside :func:`source_tags`. An empty ``tracking_uri``
    means ``$MLFLOW_TRACKING_URI`` (:func:`resolve_tracking_uri`); its ``user:password@``, if any,
    goes to MLflow's basic-auth variables and ``self.tracking_uri`` is the URI without it.
    """

    def __init__(self, tracking_uri: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None):
        from mlflow.tracking import MlflowClient  # heavy import: only when tracking

        self.tracking_uri = _credentials_to_env(_resolve_sqlite(resolve_tracking_uri(tracking_uri)))
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        self.parent_run_id = parent_run_id
        self.run_tags = {**source_tags(), **{k: v for k, v in (tags or {}).items() if v}}
        self._run_id: str | None = None

    @property
    def run_id(self) -> str | None:
        return self._run_id

    @property
    def remote(self) -> bool:
        """Whether the store is a tracking server (which validates model version sources)."""
        return self.tracking_uri.startswith(("http://", "https://", "databricks"))

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp:
            return exp.experiment_id
        return self.client.create_experiment(name, artifact_location=_default_artifact_location(self.tracking_uri, name))

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    @contextmanager
    def stage_run(self, stage, config, tags=None, sections=None) -> Iterator["MLflowTracker"]:
        """One stage's run: its config ``sections`` as params (all of the config when None), its
        inputs (``flowrl.input.<name>`` tags) as dataset inputs and tagged with the runs that made
        them; ended FINISHED, or FAILED (with its parent) when the body raises. A registered role's
        artifact is registered once the run has finished."""
        all_tags = {**self.run_tags, "flowrl.stage": stage, "mlflow.runName": stage, **(tags or {})}
        if self.parent_run_id:
            all_tags["mlflow.parentRunId"] = self.parent_run_id
            self._reopen_parent(stage)
        experiment_id = self._experiment_id(config.run.name)
        # lineage: the run that made each input artifact, found in MLflow itself
        inputs = {key[len(INPUT_TAG):]: uri for key, uri in all_tags.items() if key.startswith(INPUT_TAG)}
        for name, uri in inputs.items():
            if (producer := self.run_of_artifact(uri)) is not None:
                all_tags[INPUT_RUN_TAG + name] = producer
        run = self.client.create_run(experiment_id, tags={k: redact(str(v)) for k, v in all_tags.items()})
        self._run_id = run.info.run_id
        data = config.to_dict()
        self._log_params(self._run_id, flatten_params(data) if sections is None else section_params(data, sections))
        self._log_input_datasets(inputs)
        status = "FAILED"
        try:
            yield self
            status = "FINISHED"
        finally:
            self.client.set_terminated(self._run_id, status=status)
            if status == "FAILED":
                self._fail_parent(stage)
        if stage in REGISTERED_ROLES:
            self._register(stage, config, self._run_id)
        if _dataset_files(stage):
            self._log_datasets(stage)

    def _reopen_parent(self, stage: str) -> None:
        """A retry of the stage that failed the pipeline run: the pipeline is running again."""
        parent = self.client.get_run(self.parent_run_id)
        if parent.info.status == "FAILED" and parent.data.tags.get(FAILED_STAGE_TAG) == stage:
            self.client.update_run(self.parent_run_id, status="RUNNING")
            for key in (FAILED_STAGE_TAG, FAILED_RUN_TAG):
                self.client.delete_tag(self.parent_run_id, key)

    def _fail_parent(self, stage: str) -> None:
        """End the pipeline run FAILED when one of its stages failed (nothing else will end it:
        the pipeline's last step never runs). Never masks the stage's own error."""
        if not self.parent_run_id:
            return
        try:
            parent = self.client.get_run(self.parent_run_id)
            if parent.info.status != "RUNNING":
                return
            self.client.set_tag(self.parent_run_id, FAILED_STAGE_TAG, stage)
            self.client.set_tag(self.parent_run_id, FAILED_RUN_TAG, self._run_id)
            self.client.set_terminated(self.parent_run_id, status="FAILED")
        except Exception as exc:  # noqa: BLE001 - the stage's exception is the one to report
            log.warning("could not end the pipeline run %s FAILED: %s", self.parent_run_id, exc)

    def _log_input_datasets(self, inputs: dict[str, str]) -> None:
        """Each input of the stage that names data (an artifact, a checked file) as a dataset input
        of its run, context ``input``, tagged with the input's name."""
        from mlflow.entities import DatasetInput, InputTag

        entries = []
        for name, value in sorted(inputs.items()):
            dataset = input_dataset(name, value)
            if dataset is not None:
                entries.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", "input"),
                                                           InputTag("flowrl.input", name)]))
        if entries:
            self.client.log_inputs(self._run_id, datasets=entries)

    def _log_datasets(self, stage: str) -> None:
        """The stage's prompt / annotation tables as MLflow datasets of its run
        (source: the artifact URI; image columns left out of the logged schema)."""
        import pandas as pd
        from mlflow.entities import Dataset, DatasetInput, InputTag

        from flowrl.storage import read_manifest

        run = self.client.get_run(self._run_id)
        uri = run.data.tags.get("flowrl.artifact_uri")
        if run.info.status != "FINISHED" or not uri:
            return
        inputs = []
        checksums = {path: str(meta.get("sha256", "")) for path, meta in read_manifest(uri).files.items()}
        for name in _dataset_files(stage):
            source = file_uri(uri, name)
            frame = pd.read_parquet(source)
            frame = frame[[c for c in frame.columns if frame[c].dtype != object or c in ("prompt", "category")]]
            # the source named (not guessed from the path), the schema declared (not inferred), the digest
            # the file's checksum in the manifest: MLflow's own pandas dataset warns on each of the three
            source_type, source_json = _dataset_source(source)
            entity = Dataset(name=f"{stage}/{name.removesuffix('.parquet')}", digest=checksums.get(name, "")[:32],
                             source_type=source_type, source=source_json, schema=json.dumps(declared_schema(frame)),
                             profile=json.dumps({"num_rows": len(frame), "num_elements": int(frame.size)}))
            inputs.append(DatasetInput(entity, tags=[InputTag("mlflow.data.context", "output")]))
        self.client.log_inputs(self._run_id, datasets=inputs)

    def start_pipeline(self, config, pipeline: str, tags: dict[str, str] | None = None) -> str:
        """Open the parent run of one pipeline execution; stage runs nest under it
        (``MLflowTracker(uri, parent_run_id=...)``). Returns its run id."""
        all_tags = {**self.run_tags, "flowrl.stage": "pipeline", "flowrl.pipeline": pipeline,
                    "mlflow.runName": pipeline, **(tags or {})}
        run = self.client.create_run(self._experiment_id(config.run.name),
                                     tags={k: redact(str(v)) for k, v in all_tags.items()})
        self._log_params(run.info.run_id, flatten_params(config.to_dict()))
        return run.info.run_id

    def finish_pipeline(self, run_id: str, metrics: dict[str, float], files: list | None = None) -> None:
        """Close a pipeline run with its headline metrics and files (the bench report)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 500):
            self.client.log_batch(run_id, metrics=batch[i : i + 500])
        for path in files or []:
            self.client.log_artifact(run_id, str(path), artifact_path="report")
        self.client.set_terminated(run_id, status="FINISHED")

    def end_open_runs(self, experiment: str, execution_id: str, status: str = "FAILED") -> list[str]:
        """End every run of one Flyte execution (tag ``flowrl.flyte.execution_id``) still RUNNING in
        ``experiment``: what a workflow's failure handler calls, so that stages aborted with the
        pipeline are not left RUNNING. Returns the ids of the runs it ended."""
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None or not execution_id:
            return []
        quoted = execution_id.replace("'", "\\'")
        runs = self.client.search_runs(
            [exp.experiment_id], max_results=1000,
            filter_string=f"tags.`{EXECUTION_TAG}` = '{quoted}' and attributes.status = 'RUNNING'")
        for run in runs:
            self.client.set_terminated(run.info.run_id, status=status)
        return [run.info.run_id for run in runs]

    def run_of_artifact(self, uri: str) -> str | None:
        """The id of the finished run that committed the artifact at ``uri``, if one was tracked here."""
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        if not experiments:
            return None
        quoted = redact(uri).replace("'", "\\'")  # tags hold URIs without their credentials
        runs = self.client.search_runs(
            experiments, filter_string=f"tags.`flowrl.artifact_uri` = '{quoted}' and attributes.status = 'FINISHED'",
            max_results=1, order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def _versions_of(self, name: str, uri: str) -> list:
        """The versions of registered model ``name`` whose artifact is ``uri``."""
        from mlflow.exceptions import MlflowException

        quoted = name.replace("'", "\\'")
        try:
            versions = self.client.search_model_versions(f"name = '{quoted}'")
        except MlflowException:
            return []
        return [v for v in versions if v.tags.get("flowrl.artifact_uri", v.source) == redact(uri)]

    def _model_source(self, run_id: str, uri: str) -> str:
        """The model version's source: the artifact's own URI where the registry takes it (object
        storage; any path in a local store); for a local artifact tracked by a server, which refuses
        paths outside the run's artifacts, the reference logged in the run (``runs:/<run>/flowrl_model``)."""
        if ("://" in uri and not uri.startswith("file://")) or not self.remote:
            return uri
        return f"runs:/{run_id}/{MODEL_REFERENCE_DIR}"

    def _log_model_reference(self, run_id: str, uri: str) -> None:
        """``flowrl_model/artifact.json`` in the run: the artifact's URI and manifest (files, checksums,
        inputs), so the run's own artifacts say where the model is and what it holds."""
        from flowrl.storage import ArtifactError, read_manifest

        if any(a.path.endswith("artifact.json") for a in self.client.list_artifacts(run_id, MODEL_REFERENCE_DIR)):
            return
        try:
            manifest = asdict(read_manifest(uri))
            manifest = redact_values(manifest)
        except ArtifactError as exc:  # the URI alone still says where the model is
            log.warning("model reference of run %s: %s", run_id, exc)
            manifest = None
        reference = {"uri": redact(uri), "manifest": manifest}
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "artifact.json"
            path.write_text(json.dumps(reference, indent=1, sort_keys=True))
            self.client.log_artifact(run_id, str(path), artifact_path=MODEL_REFERENCE_DIR)

    def _register(self, stage: str, config, run_id: str) -> str | None:
        """A new version of the registered model of the stage's role (``<run.name>-<role>``) for the
        artifact run ``run_id`` committed, unless one already names that artifact; the run is tagged
        with it. Returns ``NAME/VERSION``."""
        from mlflow.exceptions import MlflowException

        run = self.client.get_run(run_id)
        uri = run.data.tags.get("flowrl.artifact_uri")
        if run.info.status != "FINISHED" or not uri:
            return None
        name = registered_name(config.run.name, REGISTERED_ROLES[stage])
        if existing := self._versions_of(name, uri):
            version = min(existing, key=lambda v: int(v.version)).version
        else:
            try:
                self.client.get_registered_model(name)
            except MlflowException:
                self.client.create_registered_model(
                    name, description=f"flowrl {REGISTERED_ROLES[stage]} ({stage} stage)")
            self._log_model_reference(run_id, uri)
            version = self.client.create_model_version(
                name, source=redact(self._model_source(run_id, uri)), run_id=run_id,
                tags={"flowrl.stage": stage, "flowrl.artifact_uri": redact(uri),
                      "flowrl.version": run.data.tags.get("flowrl.version", "")}).version
        entry = f"{name}/{version}"
        if run.data.tags.get("flowrl.registered_model") != entry:
            self.client.set_tag(run_id, "flowrl.registered_model", entry)
        return entry

    def register_artifact(self, stage: str, config, uri: str, run_id: str | None = None) -> str | None:
        """Register a complete artifact a stage reused (nothing ran) unless a version already names it:
        a first run whose registration failed is registered on the rerun, and never twice. The version's
        run is ``run_id`` (the manifest's) when it is the tracked run that committed ``uri``, else any
        such run here, else a new FINISHED run recording the reuse. Returns ``NAME/VERSION`` (None:
        not a registered role)."""
        from mlflow.exceptions import MlflowException

        if stage not in REGISTERED_ROLES:
            return None
        name = registered_name(config.run.name, REGISTERED_ROLES[stage])
        if existing := self._versions_of(name, uri):
            return f"{name}/{min(existing, key=lambda v: int(v.version)).version}"
        producer = None
        if run_id:
            try:
                run = self.client.get_run(run_id)
                if run.info.status == "FINISHED" and run.data.tags.get("flowrl.artifact_uri") == redact(uri):
                    producer = run_id
            except MlflowException:  # made against another tracking store
                pass
        producer = producer or self.run_of_artifact(uri) or self._record_reuse(stage, config, uri)
        return self._register(stage, config, producer)

    def _record_reuse(self, stage: str, config, uri: str) -> str:
        """A FINISHED run for an artifact no run here committed (made untracked or against another
        store): its stage, URI and inputs (from the manifest, so lineage reaches them)."""
        from flowrl.storage import read_manifest

        manifest = read_manifest(uri)
        tags = {**self.run_tags, "flowrl.stage": stage, "mlflow.runName": stage, "flowrl.artifact_uri": uri,
                "flowrl.version": manifest.version, "flowrl.reused": "true",
                **{INPUT_TAG + k: v for k, v in manifest.inputs.items()}}
        for name, value in manifest.inputs.items():
            if (producer := self.run_of_artifact(value)) is not None:
                tags[INPUT_RUN_TAG + name] = producer
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = self.client.create_run(self._experiment_id(config.run.name),
                                     tags={k: redact(str(v)) for k, v in tags.items()})
        self.client.set_terminated(run.info.run_id, status="FINISHED")
        return run.info.run_id

    def model_version(self, ref: str):
        """The registered model version ``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` names
        (LookupError naming the reference when there is none)."""
        from mlflow.exceptions import MlflowException

        match = re.fullmatch(r"models:/(?P<name>[^/@]+)(?:/(?P<version>\d+)|@(?P<alias>[\w-]+))", ref)
        if match is None:
            raise LookupError(f"{ref}: not a registered model reference (models:/NAME/VERSION or models:/NAME@ALIAS)")
        try:
            if match["alias"]:
                return self.client.get_model_version_by_alias(match["name"], match["alias"])
            return self.client.get_model_version(match["name"], match["version"])
        except MlflowException as exc:
            raise LookupError(f"{ref}: no such model version in {redact(self.tracking_uri)} "
                              f"({exc.error_code})") from None

    def promote(self, role: str, uri: str, score: float, run_name: str, alias: str = "champion") -> bool:
        """Point ``alias`` of ``<run_name>-<role>`` at the version of the artifact ``uri``
        when ``score`` beats the current holder's (recorded on it as ``flowrl.bench_overall``);
        returns whether it moved. No registered version of ``uri``: nothing moves."""
        from mlflow.exceptions import MlflowException

        name = registered_name(run_name, role)
        mine = self._versions_of(name, uri)
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

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        self.client.log_batch(self._run_id, metrics=batch)

    def log_image(self, image, name) -> None:
        self.client.log_image(self._run_id, image, artifact_file=name)

    def log_artifact(self, path, subdir=None) -> None:
        self.client.log_artifact(self._run_id, str(path), artifact_path=subdir)

    def set_tags(self, tags) -> None:
        for key, value in tags.items():
            self.client.set_tag(self._run_id, key, redact(str(value)))


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


def _split_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(``url`` without its ``user:password@``, the user, the password), percent-decoded."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    user, _, password = parts.netloc.rpartition("@")[0].partition(":")
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2])), unquote(user), unquote(password)


def _without_userinfo(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without its ``user:password@`` and the HTTP basic-auth header that carries them instead
    (urllib would take the userinfo for part of the host name)."""
    import base64

    bare, user, password = _split_userinfo(url)
    if user is None:
        return url, {}
    return bare, {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def _credentials_to_env(uri: str) -> str:
    """An http(s) tracking URI without its ``user:password@``, which go to MLflow's own basic-auth
    variables (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD) instead: MLflow prints its tracking
    URI ("View run ... at") and puts it in its errors, never those variables."""
    if not uri.startswith(("http://", "https://")):
        return uri
    bare, user, password = _split_userinfo(uri)
    if user is None:
        return uri
    os.environ[_USERNAME_ENV], os.environ[_PASSWORD_ENV] = user, password or ""
    log.info("run.tracking_uri: the user and password in the URI are handed to MLflow as %s / %s",
             _USERNAME_ENV, _PASSWORD_ENV)
    return bare


def check_reachable(tracking_uri: str, timeout_s: float = 5.0) -> None:
    """For an http(s) tracking URI, fail fast (before a stage's work) when the server does not answer."""
    tracking_uri = resolve_tracking_uri(tracking_uri)
    if not tracking_uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    url, headers = _without_userinfo(tracking_uri.rstrip("/") + "/health")
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout_s) as response:
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
        f"run.tracking_uri: the MLflow server at {redact(tracking_uri)} is unreachable ({redact(problem)}); start it, "
        "fix the URI, or run with --no-tracking")


def make_tracker(config: FlowRLConfig, parent_run_id: str | None = None,
                 flyte_execution_id: str | None = None) -> Tracker:
    """The stage's tracker; an unreachable tracking server is an error here, before the stage's work.
    ``flyte_execution_id`` (a plain string the Flyte task hands in) tags every run it opens."""
    uri = resolve_tracking_uri(config.run.tracking_uri)
    check_reachable(uri)
    tags = {EXECUTION_TAG: flyte_execution_id} if flyte_execution_id else None
    return MLflowTracker(uri, parent_run_id, tags=tags)
