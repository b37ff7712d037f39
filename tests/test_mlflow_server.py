"""A stage logging to a real MLflow tracking server, started here on loopback
with its artifact store on the S3 test server (moto), as a team would run it."""

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
from tests.conftest import write_config


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


def test_the_whole_pipeline_on_s3_tracked_by_the_server(mlflow_server, s3_server, tmp_path):
    """The smoke DAG with artifact_root on the S3 test server and tracking on the MLflow server:
    every stage commits to S3, every artifact reads back with its checksums, lineage comes from the server."""
    from flytekit.types.file import FlyteFile

    from flowrl.lineage import lineage, render, resolve
    from flowrl.storage import fetch, file_uri, read_manifest
    from flowrl.tracking import MLflowTracker
    from pipelines.post_train import post_train

    torch.set_num_threads(1)
    root = f"{s3_server}/dag"
    path = write_config(tmp_path, run={"tracking_uri": mlflow_server, "artifact_root": root, "name": "s3dag"})
    out = post_train(config=FlyteFile(str(path)))
    import s3fs

    fs = s3fs.S3FileSystem()
    manifests = fs.glob(f"{root}/*/*/manifest.json")
    stages = {m.split("/")[-3] for m in manifests}
    assert {s.split(".")[0] for s in stages if s.endswith(".checkpoints")} == {
        "grpo_t2i", "grpo_edit", "grpo_mixed", "opd", "opd_offpolicy"}  # training checkpoints are artifacts too
    assert {s for s in stages if not s.endswith(".checkpoints")} == {"base", "annotate", "reward_model", "filter_prompts_t2i", "filter_prompts_edit", "grpo_t2i",
                      "grpo_edit", "grpo_mixed", "opd", "opd_offpolicy", "bench"}
    for manifest in manifests:  # every artifact reads back whole, checksums verified
        uri = "s3://" + manifest.rsplit("/", 1)[0]
        local = fetch(uri, tmp_path / "back" / uri.split("/", 3)[-1])
        assert set(read_manifest(uri).files) <= {str(p.relative_to(local)) for p in local.rglob("*") if p.is_file()}
    assert out.student.uri.startswith(root) and out.report == file_uri(out.bench.uri, "report.html")
    client = MlflowClient(tracking_uri=mlflow_server)
    student = client.search_model_versions("name = 's3dag-student'")
    assert [v.source for v in student] == [out.student.uri]
    tracker = MLflowTracker(mlflow_server)
    tree = render(lineage(tracker, resolve(tracker, f"models:/s3dag-student/{student[0].version}")))
    base_uri = next("s3://" + m.rsplit("/", 1)[0] for m in manifests if m.split("/")[-3] == "base")
    assert "base: base run" in tree and base_uri in tree and "annotations: annotate" in tree
