"""The MLflow tracker against a real (sqlite) tracking store."""

import numpy as np
from mlflow.tracking import MlflowClient

from flowrl.config import FlowRLConfig, from_dict
from flowrl.tracking import MLflowTracker, flatten_params


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
