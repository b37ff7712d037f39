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
