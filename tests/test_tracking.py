"""The MLflow tracker against a real (sqlite) tracking store."""

import json
import subprocess

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from flowrl import tracking
from flowrl.config import FlowRLConfig, from_dict
from flowrl.tracking import (
    DEFAULT_TRACKING_URI, TRACKING_ENV, MLflowTracker, NullTracker, flatten_params, make_tracker, redact,
    resolve_tracking_uri, section_params,
)
from tests.conftest import ROOT


def test_flatten_params_drops_secrets():
    flat = flatten_params({"a": {"b": 1, "api_token": "x", "c": (1, 2)}, "password": "p"})
    assert flat == {"a.b": "1", "a.c": "[1, 2]"}


def test_stage_run_logs_config_metrics_images(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = from_dict(FlowRLConfig, {"run": {"name": "track-test"}, "base": {"lr": 0.005}})
    tracker = MLflowTracker(uri)
    with tracker.stage_run("base", config, tags={"flowrl.version": "v1"}) as t:
        t.log_metrics({"loss": 1.5}, step=0)
        t.log_metrics({"loss": 0.5}, step=1)
        t.log_image(np.zeros((8, 8, 3), dtype=np.uint8), "grid.png")
        t.set_tags({"flowrl.artifact_uri": "/x/base/v1"})
        run_id = t.run_id
    run = MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["base.lr"] == "0.005"
    assert run.data.tags["flowrl.stage"] == "base" and run.data.tags["flowrl.version"] == "v1"
    assert run.data.tags["flowrl.artifact_uri"] == "/x/base/v1"
    history = MlflowClient(uri).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(0, 1.5), (1, 0.5)]
    artifacts = [a.path for a in MlflowClient(uri).list_artifacts(run_id)]
    assert "grid.png" in artifacts
    assert (tmp_path / "mlartifacts").is_dir()


def test_failed_stage_marks_run_failed(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MLflowTracker(uri)
    try:
        with tracker.stage_run("base", FlowRLConfig()):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert MlflowClient(uri).get_run(tracker.run_id).info.status == "FAILED"


def test_nested_under_parent(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = MLflowTracker(uri)
    with parent.stage_run("pipeline", FlowRLConfig()):
        child = MLflowTracker(uri, parent_run_id=parent.run_id)
        with child.stage_run("base", FlowRLConfig()):
            pass
    assert MlflowClient(uri).get_run(child.run_id).data.tags["mlflow.parentRunId"] == parent.run_id


def _stage(tracker, stage, config, uri, inputs=None):
    tags = {f"flowrl.input.{k}": v for k, v in (inputs or {}).items()}
    with tracker.stage_run(stage, config, tags=tags) as t:
        t.set_tags({"flowrl.artifact_uri": uri})
        return t.run_id


def test_inputs_are_tagged_with_the_runs_that_made_them_and_models_are_registered(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = from_dict(FlowRLConfig, {"run": {"name": "lin"}})
    tracker = MLflowTracker(uri)
    base = _stage(tracker, "base", config, "/a/base/1")
    rm = _stage(tracker, "reward_model", config, "/a/reward_model/1", {"base": "/a/base/1", "other": "/elsewhere"})
    client = MlflowClient(uri)
    tags = client.get_run(rm).data.tags
    assert tags["flowrl.input_run.base"] == base and "flowrl.input_run.other" not in tags  # untracked input
    assert tags["flowrl.registered_model"] == "lin-reward_model/1"
    version = client.get_model_version("lin-reward_model", "1")
    assert version.source == "/a/reward_model/1" and version.run_id == rm
    assert "flowrl.registered_model" not in client.get_run(base).data.tags  # base is not a registered role
    _stage(tracker, "reward_model", config, "/a/reward_model/2")
    assert client.get_model_version("lin-reward_model", "2").source == "/a/reward_model/2"


def test_champion_alias_moves_only_to_a_better_student(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = from_dict(FlowRLConfig, {"run": {"name": "ch"}})
    tracker = MLflowTracker(uri)
    for k in (1, 2, 3):
        _stage(tracker, "opd", config, f"/a/opd/{k}")
    client = MlflowClient(uri)
    assert tracker.promote("student", "/a/opd/1", 50.0, "ch") is True
    assert str(client.get_model_version_by_alias("ch-student", "champion").version) == "1"
    assert tracker.promote("student", "/a/opd/2", 49.0, "ch") is False  # worse: stays
    assert str(client.get_model_version_by_alias("ch-student", "champion").version) == "1"
    assert tracker.promote("student", "/a/opd/3", 51.5, "ch") is True
    assert str(client.get_model_version_by_alias("ch-student", "champion").version) == "3"
    assert client.get_model_version("ch-student", "2").tags["flowrl.bench_overall"] == "49.000000"
    assert tracker.promote("student", "/not/registered", 99.0, "ch") is False


# ------------------------------------------------------------------ issue #30 item 7


def commit_artifact(root, stage, config, inputs=None, run_id=None, files=None):
    """A small complete artifact of ``stage`` at the version the stage itself would compute
    (so ``committed_result`` finds it), made by run ``run_id`` (None: untracked), holding
    metrics.json, weights.bin and ``files`` ({name: bytes}). Returns its URI."""
    import importlib

    from flowrl.stages.common import stage_module, stage_version
    from flowrl.storage import ArtifactStore, StagingDir

    sections = importlib.import_module(stage_module(stage)).SECTIONS
    inputs = inputs or {}
    with StagingDir(stage) as staging:
        (staging / "metrics.json").write_text(json.dumps({"loss": 0.25}))
        (staging / "weights.bin").write_bytes(b"\x01\x02" * 64)
        for name, data in (files or {}).items():
            (staging / name).write_bytes(data)
        return ArtifactStore(root).commit(
            staging, stage=stage, version=stage_version(stage, config, sections, inputs),
            config_hash=config.section_hash(*sections), inputs=inputs,
            extra={"mlflow_run_id": run_id} if run_id else {})


def test_secrets_in_values_are_redacted_and_sections_select_params():
    flat = flatten_params({"run": {"tracking_uri": "http://alice:s3cret@mlflow:5000", "name": "x"},
                           "hosts": ["https://bob:pw@a.example/p", "s3://bucket/key"]})
    assert flat == {"run.tracking_uri": "http://***@mlflow:5000", "run.name": "x",
                    "hosts": '["https://***@a.example/p", "s3://bucket/key"]'}
    assert redact("see http://u:p@h/x and ftp://h/y") == "see http://***@h/x and ftp://h/y"
    data = FlowRLConfig().to_dict()
    params = section_params(data, ("run.seed", "reward_model"))
    assert params["run.seed"] == "0" and "reward_model.steps" in params
    assert all(k == "run.seed" or k.startswith("reward_model.") for k in params)
    with pytest.raises(KeyError, match="run.nope"):
        section_params(data, ("run.nope",))


def test_tracking_uri_from_the_environment_when_the_config_leaves_it_empty(tmp_path, monkeypatch):
    env_db = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.delenv(TRACKING_ENV, raising=False)
    assert resolve_tracking_uri("") == DEFAULT_TRACKING_URI == "sqlite:///mlflow.db"
    monkeypatch.setenv(TRACKING_ENV, env_db)
    assert resolve_tracking_uri("") == env_db
    assert resolve_tracking_uri("http://explicit:5000") == "http://explicit:5000"  # explicit config wins
    unset = from_dict(FlowRLConfig, {"run": {"name": "envrun"}})  # run.tracking_uri left out
    assert unset.run.tracking_uri == ""
    tracker = make_tracker(unset)
    with tracker.stage_run("base", unset):
        pass
    assert MlflowClient(env_db).get_run(tracker.run_id).info.status == "FINISHED"
    explicit_db = f"sqlite:///{tmp_path / 'explicit.db'}"
    explicit = from_dict(FlowRLConfig, {"run": {"name": "envrun", "tracking_uri": explicit_db}})
    assert make_tracker(explicit).tracking_uri == explicit_db


def test_runs_record_the_code_version_and_the_flyte_execution(tmp_path, monkeypatch):
    from flowrl.storage import code_version

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = from_dict(FlowRLConfig, {"run": {"name": "src", "tracking_uri": uri}})
    tracking.source_tags.cache_clear()  # computed once per process: here, now
    tracker = make_tracker(config, flyte_execution_id="flowrl:development:a1b2c3")
    with tracker.stage_run("base", config):
        pass
    pipeline = tracker.start_pipeline(config, "post_train")
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    for run_id in (tracker.run_id, pipeline):
        tags = MlflowClient(uri).get_run(run_id).data.tags
        assert tags["flowrl.flyte.execution_id"] == "flowrl:development:a1b2c3"
        assert tags["flowrl.source.code_digest"] == code_version()
        if (ROOT / ".git").exists():
            assert tags["mlflow.source.git.commit"] == head.stdout.strip()
            assert tags["flowrl.source.git.dirty"] in ("true", "false")
    # in a pod without .git (no commit to be had): the code digest and the image's tag instead
    monkeypatch.setattr(tracking, "_git", lambda root, *args: None)
    monkeypatch.setenv("FLOWRL_IMAGE_TAG", "registry/flowrl-base:0.3-abc")
    tracking.source_tags.cache_clear()
    try:
        tags = tracking.source_tags()
    finally:
        tracking.source_tags.cache_clear()
    assert "mlflow.source.git.commit" not in tags
    assert tags["flowrl.source.image"] == "registry/flowrl-base:0.3-abc" and tags["flowrl.source.code_digest"]


def test_a_failed_stage_ends_the_pipeline_run_failed_and_its_retry_reopens_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = from_dict(FlowRLConfig, {"run": {"name": "fail", "tracking_uri": uri}})
    client = MlflowClient(uri)
    pipeline = MLflowTracker(uri).start_pipeline(config, "post_train")
    done = MLflowTracker(uri, parent_run_id=pipeline)
    with done.stage_run("base", config):
        pass
    failing = MLflowTracker(uri, parent_run_id=pipeline)
    with pytest.raises(RuntimeError, match="out of memory"):
        with failing.stage_run("grpo_t2i", config):
            raise RuntimeError("out of memory")
    assert client.get_run(failing.run_id).info.status == "FAILED"
    parent = client.get_run(pipeline)
    assert parent.info.status == "FAILED"
    assert parent.data.tags["flowrl.failed_stage"] == "grpo_t2i"
    assert parent.data.tags["flowrl.failed_run"] == failing.run_id
    assert client.get_run(done.run_id).info.status == "FINISHED"
    # another stage starting under the failed pipeline does not reopen it; a retry of the failed one does
    other = MLflowTracker(uri, parent_run_id=pipeline)
    with other.stage_run("grpo_edit", config):
        assert client.get_run(pipeline).info.status == "FAILED"
    retry = MLflowTracker(uri, parent_run_id=pipeline)
    with retry.stage_run("grpo_t2i", config):
        assert client.get_run(pipeline).info.status == "RUNNING"
    assert "flowrl.failed_stage" not in client.get_run(pipeline).data.tags
    retry.finish_pipeline(pipeline, {"overall": 1.0})
    assert client.get_run(pipeline).info.status == "FINISHED"


def test_open_runs_of_a_flyte_execution_are_ended(tmp_path):
    """What a workflow failure handler calls: aborted stages never reached their own ``finally``."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = from_dict(FlowRLConfig, {"run": {"name": "abort", "tracking_uri": uri}})
    tracker = MLflowTracker(uri, tags={"flowrl.flyte.execution_id": "p:d:abc"})
    pipeline = tracker.start_pipeline(config, "post_train")
    client = MlflowClient(uri)
    aborted = client.create_run(client.get_experiment_by_name("abort").experiment_id,
                                tags={"flowrl.flyte.execution_id": "p:d:abc", "mlflow.parentRunId": pipeline})
    elsewhere = MLflowTracker(uri, tags={"flowrl.flyte.execution_id": "p:d:other"}).start_pipeline(config, "post_train")
    ended = tracker.end_open_runs("abort", "p:d:abc")
    assert sorted(ended) == sorted([pipeline, aborted.info.run_id])
    assert {client.get_run(r).info.status for r in ended} == {"FAILED"}
    assert client.get_run(elsewhere).info.status == "RUNNING"
    assert tracker.end_open_runs("abort", "p:d:abc") == [] and tracker.end_open_runs("none", "p:d:abc") == []


def test_a_stage_run_logs_its_sections_and_its_inputs_as_datasets(tmp_path):
    from flowrl.stages.reward_model import SECTIONS
    from flowrl.storage import read_manifest

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = from_dict(FlowRLConfig, {"run": {"name": "ds", "tracking_uri": uri}})
    root = str(tmp_path / "artifacts")
    annotations = commit_artifact(root, "annotate", config)
    labels = tmp_path / "labels.parquet"
    labels.write_bytes(b"not really parquet")
    tracker = MLflowTracker(uri)
    inputs = {"annotations": annotations, "labels": f"{labels}#0123456789abcdef", "task": "t2i"}
    with tracker.stage_run("reward_model", config, tags={f"flowrl.input.{k}": v for k, v in inputs.items()},
                           sections=SECTIONS):
        pass
    run = MlflowClient(uri).get_run(tracker.run_id)
    assert set(run.data.params) == set(section_params(config.to_dict(), SECTIONS))
    assert "grpo.optim.lr" not in run.data.params and "reward_model.steps" in run.data.params
    logged = {next(t.value for t in d.tags if t.key == "flowrl.input"): d.dataset for d in run.inputs.dataset_inputs}
    assert set(logged) == {"annotations", "labels"}  # "t2i" names no data
    manifest = read_manifest(annotations)
    assert logged["annotations"].name == f"annotate@{manifest.version}"
    assert json.loads(logged["annotations"].source)["uri"] == annotations
    assert json.loads(logged["annotations"].profile) == {"files": 2, "bytes": len(json.dumps({"loss": 0.25})) + 128,
                                                         "stage": "annotate", "version": manifest.version}
    assert logged["labels"].digest == "0123456789abcdef" and json.loads(logged["labels"].source)["uri"] == str(labels)


def test_a_reused_model_is_registered_once(tmp_path):
    """A model artifact whose first run never registered it (made untracked here, or its registration
    failed) is registered when a rerun reuses it, once however often it is reused."""
    from flowrl.stages.common import committed_result
    from flowrl.stages.reward_model import SECTIONS

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = from_dict(FlowRLConfig, {"run": {"name": "reuse", "tracking_uri": uri}})
    root = str(tmp_path / "artifacts")
    annotations = commit_artifact(root, "annotate", config)
    tracker = MLflowTracker(uri)
    annotate_run = _stage(tracker, "base", config, annotations)  # (an annotate run would log its tables)
    inputs = {"annotations": annotations}
    model = commit_artifact(root, "reward_model", config, inputs)  # untracked: no run, no version
    client = MlflowClient(uri)
    assert committed_result("reward_model", config, SECTIONS, inputs, root) is not None  # no tracker: nothing
    assert client.search_registered_models() == []
    for _ in range(2):
        done = committed_result("reward_model", config, SECTIONS, inputs, root, tracker=MLflowTracker(uri))
        assert done.reused and done.uri == model
    versions = client.search_model_versions("name = 'reuse-reward_model'")
    assert len(versions) == 1 and versions[0].tags["flowrl.artifact_uri"] == model
    run = client.get_run(versions[0].run_id)  # a run recording the reuse, its lineage from the manifest
    assert run.data.tags["flowrl.reused"] == "true" and run.data.tags["flowrl.artifact_uri"] == model
    assert run.data.tags["flowrl.input_run.annotations"] == annotate_run
    assert run.data.tags["flowrl.registered_model"] == "reuse-reward_model/1"
    # a tracked run whose registration never happened: the version goes to that run
    other = from_dict(FlowRLConfig, {"run": {"name": "reuse2", "tracking_uri": uri}, "reward_model": {"steps": 3}})
    made = client.create_run(client.get_experiment_by_name("reuse").experiment_id)
    second = commit_artifact(root, "reward_model", other, inputs, run_id=made.info.run_id)
    client.set_tag(made.info.run_id, "flowrl.artifact_uri", second)
    client.set_terminated(made.info.run_id)
    committed_result("reward_model", other, SECTIONS, inputs, root, tracker=None)  # None: the config's tracker
    committed_result("reward_model", other, SECTIONS, inputs, root, tracker=None)
    versions = client.search_model_versions("name = 'reuse2-reward_model'")
    assert [(v.run_id, v.tags["flowrl.artifact_uri"]) for v in versions] == [(made.info.run_id, second)]
    # --no-tracking: nothing registered
    third = from_dict(FlowRLConfig, {"run": {"name": "reuse3", "tracking_uri": uri}, "reward_model": {"steps": 4}})
    commit_artifact(root, "reward_model", third, inputs)
    committed_result("reward_model", third, SECTIONS, inputs, root, tracker=NullTracker())
    assert client.search_model_versions("name = 'reuse3-reward_model'") == []


def test_a_flyte_task_hands_its_execution_id_to_the_tracker(tmp_path, monkeypatch):
    """tasks.types.tracker_for reads the execution id from Flyte's context (the library never imports
    flytekit); a local run's placeholder id (local:local:local) is not recorded."""
    from types import SimpleNamespace

    import flytekit

    from tasks.types import tracker_for

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = from_dict(FlowRLConfig, {"run": {"name": "flyte", "tracking_uri": uri}})
    for project, domain, name, expected in (("flowrl", "production", "f3k2", "flowrl:production:f3k2"),
                                            ("local", "local", "local", None)):
        execution = SimpleNamespace(project=project, domain=domain, name=name)
        monkeypatch.setattr(flytekit, "current_context", lambda: SimpleNamespace(execution_id=execution))
        tracker = tracker_for(config, "")
        with tracker.stage_run("base", config):
            pass
        assert MlflowClient(uri).get_run(tracker.run_id).data.tags.get("flowrl.flyte.execution_id") == expected


def test_the_workflows_failure_handler_ends_the_executions_open_runs(tmp_path, monkeypatch):
    """pipelines/post_train.py's on_failure task: a stage pod killed with the workflow never ended its run."""
    import yaml
    from flytekit.types.file import FlyteFile

    import pipelines.post_train  # noqa: F401 - the workflow names the handler
    import tasks.base
    from tasks.base import fail_pipeline_run

    assert pipelines.post_train.post_train.on_failure.name == fail_pipeline_run.name
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"run": {"name": "killed", "tracking_uri": uri}}))
    tracker = MLflowTracker(uri, tags={"flowrl.flyte.execution_id": "p:d:run1"})
    pipeline = tracker.start_pipeline(from_dict(FlowRLConfig, {"run": {"name": "killed", "tracking_uri": uri}}),
                                      "post_train")
    monkeypatch.setattr(tasks.base, "flyte_execution_id", lambda: "p:d:run1")
    fail_pipeline_run(config=FlyteFile(str(path)), err=None)
    assert MlflowClient(uri).get_run(pipeline).info.status == "FAILED"
