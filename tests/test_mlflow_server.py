"""A stage logging to a real MLflow tracking server, started here on loopback
with its artifact store on the S3 test server (moto), as a team would run it."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch
from mlflow.tracking import MlflowClient

from flowrl.config import load_config
from flowrl.stages.base import run_base
from tests.conftest import ROOT, user_env, write_config


@pytest.fixture(scope="module")
def mlflow_server(s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("mlflow", path=os.path.dirname(sys.executable))
    proc = subprocess.Popen(
        [exe, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", f"{s3_server}/mlflow-artifacts", "--serve-artifacts"],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, env=dict(os.environ),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("mlflow server did not start:\n" + (root / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_stage_logs_params_metrics_and_images_to_the_server(mlflow_server, s3_server, tmp_path):
    torch.set_num_threads(1)
    config = load_config(write_config(tmp_path, run={"tracking_uri": mlflow_server}))
    result = run_base(config, progress=False)
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["base.lr"] == str(config.base.lr)
    assert run.data.tags["flowrl.stage"] == "base" and run.data.tags.get("flowrl.artifact_uri") == result.uri
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
        "grpo_t2i", "grpo_edit", "grpo_mixed", "opd", "opd_offpolicy"}  # training checkpoints are artifacts too
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
    assert "models/student/pillars/overall" in pipeline[0].data.metrics
    assert "report/report.html" in {a.path for a in client.list_artifacts(pipeline[0].info.run_id, "report")}
    filtered = next(r for r in stage_runs if r.data.tags["flowrl.stage"] == "filter_prompts_t2i")
    assert [d.dataset.name for d in filtered.inputs.dataset_inputs] == ["filter_prompts_t2i/prompts"]
    # the registered student and its lineage back to the base
    student = client.search_model_versions("name = 's3dag-student'")
    assert [v.source for v in student] == uris["opd"]
    tracker = MLflowTracker(mlflow_server)
    tree = render(lineage(tracker, resolve(tracker, f"models:/s3dag-student/{student[0].version}")))
    assert "base: base run" in tree and uris["base"][0] in tree and "annotations: annotate" in tree
