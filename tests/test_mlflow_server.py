"""A stage logging to a real MLflow tracking server, started here on loopback
with its artifact store on the S3 test server (moto), as a team would run it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from flowrl.config import load_config
from flowrl.stages.base import run_base
from tests.conftest import ROOT, mlflow_server_at, user_env, write_config


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    with mlflow_server_at(root, f"{s3_server}/mlflow-artifacts") as url:
        yield url


def test_a_stage_logs_params_metrics_and_images_to_the_server(mlflow_server, s3_server, tmp_path):
    torch.set_num_threads(1)
    config = load_config(write_config(tmp_path, run={"tracking_uri": mlflow_server}))
    result = run_base(config, progress=False)
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["base.lr"] == str(config.base.lr)
    assert run.data.tags["flowrl.stage"] == "base" and run.data.tags.get("flowrl.artifact_uri") == result.uri
    from flowrl.stages.base import SECTIONS

    # its own config sections only, and the code it ran
    assert all(any(k == s or k.startswith(s + ".") for s in SECTIONS) for k in run.data.params), run.data.params
    assert not any(k.startswith(("grpo.", "opd.", "bench.")) for k in run.data.params)
    assert run.data.tags["flowrl.source.code_digest"]
    if (ROOT / ".git").exists():
        assert len(run.data.tags["mlflow.source.git.commit"]) == 40
    assert "t2i/alignment" in run.data.metrics
    names = [a.path for a in client.list_artifacts(result.run_id)]
    assert "grid.png" in names
    # the image went through the server into the S3 bucket
    import s3fs

    fs = s3fs.S3FileSystem()
    stored = fs.find(f"{s3_server}/mlflow-artifacts")
    assert any(path.endswith(f"{result.run_id}/artifacts/grid.png") for path in stored), stored[:5]


def test_pyflyte_runs_the_whole_pipeline_on_s3_tracked_by_the_server(mlflow_server, s3_server, tmp_path):
    """What a team runs, here on one machine: `pyflyte run pipelines/post_train.py post_train --config ...` on
    the smoke config (both optional branches on), artifact_root on the S3 test server, tracking on the MLflow
    server. Every stage commits to S3 once and reads back with its checksums; the workflow prints the
    models, their metrics and the report; runs, the registered student and its lineage come from the server."""
    import s3fs

    from flowrl.lineage import lineage, render, resolve
    from flowrl.storage import fetch, file_uri, read_manifest
    from flowrl.tracking import MLflowTracker

    root = f"{s3_server}/dag"
    path = write_config(tmp_path, run={"tracking_uri": mlflow_server, "artifact_root": root, "name": "s3dag"})
    pyflyte = os.path.join(os.path.dirname(sys.executable), "pyflyte")
    proc = subprocess.run(
        [pyflyte, "run", "pipelines/post_train.py", "post_train", "--config", str(path)],
        capture_output=True, text=True, cwd=ROOT, timeout=900,
        env=user_env(HOME=str(tmp_path / "home")),  # Flyte's local cache (~/.flyte) of this run only
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()  # the objects were written by the pyflyte process
    manifests = fs.glob(f"{root}/*/*/manifest.json")
    uris = {}
    for manifest in manifests:
        uris.setdefault(manifest.split("/")[-3], []).append("s3://" + manifest.rsplit("/", 1)[0])
    stages = ("base", "annotate", "reward_model", "filter_prompts_t2i", "filter_prompts_edit", "grpo_t2i", "grpo_edit",
              "opd", "opd_offpolicy", "grpo_mixed", "bench")
    assert {s.split(".")[0] for s in uris if s.endswith(".checkpoints")} == {
        "base", "grpo_t2i", "grpo_edit", "grpo_mixed", "opd", "opd_offpolicy"}  # training checkpoints are artifacts too
    assert {s for s in uris if not s.endswith(".checkpoints")} == set(stages)
    assert all(len(uris[stage]) == 1 for stage in stages), uris  # each stage ran and committed once
    for uri in (u for versions in uris.values() for u in versions):  # every artifact reads back whole, checked
        local = fetch(uri, tmp_path / "back" / uri.split("/", 3)[-1])
        assert set(read_manifest(uri).files) <= {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    # the workflow's output: the models, the teachers' and the student's metrics, and the report (for `make run`)
    for stage in ("grpo_t2i", "grpo_edit", "opd", "opd_offpolicy", "grpo_mixed"):
        assert uris[stage][0] in proc.stdout, stage
    assert "base/t2i/alignment" in proc.stdout and "teacher/edit/accuracy" in proc.stdout
    assert "student/edit/accuracy" in proc.stdout
    bench = fetch(uris["bench"][0], tmp_path / "bench")
    assert set(json.loads((bench / "bench.json").read_text())["models"]) == {
        "base", "t2i_teacher", "edit_teacher", "mix_rl", "student", "student_offpolicy"}
    assert file_uri(uris["bench"][0], "report.html") in proc.stdout
    # runs on the server: one pipeline run, one child run per stage
    client = MlflowClient(tracking_uri=mlflow_server)
    # this run's experiment only: the server is shared with the module's other tests, whose runs it keeps
    runs = client.search_runs([client.get_experiment_by_name("s3dag").experiment_id])
    pipeline = [r for r in runs if r.data.tags.get("flowrl.stage") == "pipeline"]
    assert len(pipeline) == 1 and pipeline[0].info.status == "FINISHED"
    stage_runs = [r for r in runs if r.data.tags.get("flowrl.stage") != "pipeline"]
    assert sorted(r.data.tags["flowrl.stage"] for r in stage_runs) == sorted(stages)
    assert all(r.data.tags.get("mlflow.parentRunId") == pipeline[0].info.run_id for r in stage_runs)
    # every run names the code it ran; a local execution has no Flyte execution id to record
    assert len({r.data.tags["flowrl.source.code_digest"] for r in runs}) == 1
    if (ROOT / ".git").exists():
        assert all(len(r.data.tags["mlflow.source.git.commit"]) == 40 for r in runs)
    assert not any("flowrl.flyte.execution_id" in r.data.tags for r in runs)
    assert "models/student/pillars/overall" in pipeline[0].data.metrics
    assert "report/report.html" in {a.path for a in client.list_artifacts(pipeline[0].info.run_id, "report")}
    filtered = next(r for r in stage_runs if r.data.tags["flowrl.stage"] == "filter_prompts_t2i")
    outputs = [d for d in filtered.inputs.dataset_inputs if {t.key: t.value for t in d.tags}.get(
        "mlflow.data.context") == "output"]
    assert [d.dataset.name for d in outputs] == ["filter_prompts_t2i/prompts"]
    read = {json.loads(d.dataset.source)["uri"] for d in filtered.inputs.dataset_inputs} - {
        json.loads(d.dataset.source)["uri"] for d in outputs}
    assert read == {uris["base"][0], uris["reward_model"][0]}  # the artifacts it read, as its inputs
    # the registered student and its lineage back to the base
    student = client.search_model_versions("name = 's3dag-student'")
    assert [v.source for v in student] == uris["opd"]
    tracker = MLflowTracker(mlflow_server)
    tree = render(lineage(tracker, resolve(tracker, f"models:/s3dag-student/{student[0].version}")))
    assert "base: base run" in tree and uris["base"][0] in tree and "annotations: annotate" in tree


def _parquet(rows: dict) -> bytes:
    import io

    import pandas as pd

    buffer = io.BytesIO()
    pd.DataFrame(rows).to_parquet(buffer)
    return buffer.getvalue()


def _annotations(root, config, tracker):
    """An annotate artifact (two small tables) committed by a tracked annotate run."""
    from tests.test_tracking import commit_artifact

    tables = {name: _parquet({"prompt": ["a red circle"], "category": ["color"], "label": [1.0]})
              for name in ("pointwise.parquet", "pairwise.parquet")}
    uri = commit_artifact(root, "annotate", config, files=tables)
    with tracker.stage_run("annotate", config) as run:
        run.set_tags({"flowrl.artifact_uri": uri})
    return uri


@pytest.mark.parametrize("where", ["local", "s3"])
def test_models_register_with_a_local_and_an_s3_artifact_root(mlflow_server, s3_server, tmp_path, where):
    """A local artifact is a path the server refuses as a model version source (it can only check
    paths inside a run's own artifacts): the version's source is the reference logged in the run,
    runs:/<run>/flowrl_model. An S3 artifact is its own source, so models:/ downloads the model."""
    import mlflow.artifacts

    from flowrl.stages.reward_model import SECTIONS
    from flowrl.tracking import MLflowTracker
    from tests.test_tracking import commit_artifact

    root = str(tmp_path / "artifacts") if where == "local" else f"{s3_server}/roots-{tmp_path.name}"
    config = load_config(write_config(tmp_path, run={"tracking_uri": mlflow_server, "artifact_root": root,
                                                     "name": f"reg-{where}"}))
    tracker = MLflowTracker(mlflow_server)
    annotations = _annotations(root, config, tracker)
    model = commit_artifact(root, "reward_model", config, {"annotations": annotations})
    with tracker.stage_run("reward_model", config, tags={"flowrl.input.annotations": annotations},
                           sections=SECTIONS) as run:
        run.set_tags({"flowrl.artifact_uri": model})
    client = MlflowClient(tracking_uri=mlflow_server)
    [version] = client.search_model_versions(f"name = 'reg-{where}-reward_model'")
    assert version.run_id == tracker.run_id and version.tags["flowrl.artifact_uri"] == model
    assert client.get_run(tracker.run_id).data.tags["flowrl.registered_model"] == f"reg-{where}-reward_model/1"
    download = tmp_path / "download"
    location = client.get_model_version_download_uri(f"reg-{where}-reward_model", "1")
    got = mlflow.artifacts.download_artifacts(location, dst_path=str(download), tracking_uri=mlflow_server)
    if where == "local":
        assert version.source == f"runs:/{tracker.run_id}/flowrl_model"
        reference = json.loads((Path(got) / "artifact.json").read_text())
        assert reference["uri"] == model and "weights.bin" in reference["manifest"]["files"]
    else:
        assert version.source == model  # the artifact itself, manifest and payload
        assert (Path(got) / "manifest.json").is_file()
        assert [p.read_bytes() for p in Path(got).rglob("weights.bin")] == [b"\x01\x02" * 64]
    # the input it read, as a dataset input of the run; the annotate run's tables as its outputs
    inputs = client.get_run(tracker.run_id).inputs.dataset_inputs
    assert [json.loads(d.dataset.source)["uri"] for d in inputs] == [annotations]


def test_a_rerun_registers_a_reused_model_once_and_lineage_follows_an_alias(mlflow_server, tmp_path, monkeypatch):
    """The defect of issue #30: with a local artifact root the server refused the model version
    (``Invalid model version source``) and the rerun, reusing the artifact, never registered it."""
    from mlflow.exceptions import MlflowException

    from flowrl.stages.common import committed_result
    from flowrl.stages.reward_model import SECTIONS
    from flowrl.tracking import MLflowTracker
    from tests.test_tracking import commit_artifact

    root = str(tmp_path / "artifacts")
    config = load_config(write_config(tmp_path, run={"tracking_uri": mlflow_server, "artifact_root": root,
                                                     "name": "rerun"}))
    tracker = MLflowTracker(mlflow_server)
    annotations = _annotations(root, config, tracker)
    annotate_run = tracker.run_id
    inputs = {"annotations": annotations}
    # the first run, registering as the old code did (the local path as the source): refused
    first = MLflowTracker(mlflow_server)
    monkeypatch.setattr(MLflowTracker, "_model_source", lambda self, run_id, uri: uri)
    with pytest.raises(MlflowException, match="Invalid model version source"):
        with first.stage_run("reward_model", config, tags={"flowrl.input.annotations": annotations}) as run:
            model = commit_artifact(root, "reward_model", config, inputs, run_id=run.run_id)
            run.set_tags({"flowrl.artifact_uri": model})
    monkeypatch.undo()
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(first.run_id).info.status == "FINISHED"
    assert client.search_model_versions("name = 'rerun-reward_model'") == []
    # the reruns reuse the artifact: registered once, with the run that made it
    for _ in range(2):
        done = committed_result("reward_model", config, SECTIONS, inputs, root, tracker=MLflowTracker(mlflow_server))
        assert done.reused and done.uri == model
    [version] = client.search_model_versions("name = 'rerun-reward_model'")
    assert version.run_id == first.run_id and version.source == f"runs:/{first.run_id}/flowrl_model"
    client.set_registered_model_alias("rerun-reward_model", "champion", version.version)
    # `flowrl lineage models:/NAME@ALIAS`, the server named by MLFLOW_TRACKING_URI alone
    proc = subprocess.run([sys.executable, "-m", "flowrl.cli", "lineage", "models:/rerun-reward_model@champion"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=user_env(MLFLOW_TRACKING_URI=mlflow_server))
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == f"models:/rerun-reward_model@champion: rerun-reward_model version 1, run {first.run_id}"
    assert lines[1].startswith(f"reward_model [rerun-reward_model/1] run {first.run_id}") and model in lines[1]
    assert lines[2] == f"`-- annotations: annotate run {annotate_run}  {annotations}"
    proc = subprocess.run([sys.executable, "-m", "flowrl.cli", "lineage", "models:/rerun-reward_model@nobody"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=user_env(MLFLOW_TRACKING_URI=mlflow_server))
    assert proc.returncode == 2 and "models:/rerun-reward_model@nobody: no such model version" in proc.stderr


def test_a_failed_stage_ends_its_run_and_the_pipeline_run_failed_on_the_server(mlflow_server, tmp_path):
    from flowrl.tracking import MLflowTracker

    config = load_config(write_config(tmp_path, run={"tracking_uri": mlflow_server, "name": "failing"}))
    pipeline = MLflowTracker(mlflow_server).start_pipeline(config, "post_train")
    stage = MLflowTracker(mlflow_server, parent_run_id=pipeline)
    with pytest.raises(ValueError, match="bad rows"):
        with stage.stage_run("reward_model", config):
            raise ValueError("bad rows")
    client = MlflowClient(tracking_uri=mlflow_server)
    assert client.get_run(stage.run_id).info.status == "FAILED"
    parent = client.get_run(pipeline)
    assert parent.info.status == "FAILED" and parent.data.tags["flowrl.failed_stage"] == "reward_model"
