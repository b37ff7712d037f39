"""The artifact store against a real S3 API: moto's server on loopback, in a
subprocess started here, reached through s3fs as production reaches S3."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowrl.rl.trainer import Checkpoints, TrainerState
from flowrl.storage import ArtifactError, ArtifactStore, fetch, read_manifest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    port = _free_port()
    server = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    assert server, "moto_server is not installed next to this python (requirements/cpu.txt pins moto[server])"
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("flowrl-test")
        yield "s3://flowrl-test"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _staging(tmp_path: Path) -> Path:
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "model.bin").write_bytes(b"weights" * 100)
    (staging / "sub" / "metrics.json").write_text('{"a": 1}')
    return staging


def test_commit_and_fetch_through_s3_with_checksums(s3_server, tmp_path):
    store = ArtifactStore(f"{s3_server}/run1")
    uri = store.commit(_staging(tmp_path), stage="base", version="v1", config_hash="h", inputs={"x": "y"})
    assert uri == f"{s3_server}/run1/base/v1"
    manifest = read_manifest(uri)
    assert set(manifest.files) == {"model.bin", "sub/metrics.json"}
    local = fetch(uri, tmp_path / "down")  # a fresh client from the URI alone, as a later stage would
    assert (local / "model.bin").read_bytes() == b"weights" * 100
    assert store.exists("base", "v1")


def test_a_version_without_its_manifest_is_never_complete(s3_server, tmp_path):
    store = ArtifactStore(f"{s3_server}/run2")
    uri = store.commit(_staging(tmp_path), stage="base", version="v1", config_hash="h", inputs={})
    store.fs.rm(f"{store._path(uri)}/manifest.json")  # as if the writer died before the manifest
    store.fs.invalidate_cache()
    assert not store.exists("base", "v1")
    with pytest.raises(ArtifactError, match="incomplete"):
        fetch(uri, tmp_path / "down")


def test_a_corrupted_object_fails_the_checksum(s3_server, tmp_path):
    store = ArtifactStore(f"{s3_server}/run3")
    uri = store.commit(_staging(tmp_path), stage="base", version="v1", config_hash="h", inputs={})
    store.fs.pipe_file(f"{store._path(uri)}/model.bin", b"tampered")
    with pytest.raises(ArtifactError, match="checksum mismatch for model.bin"):
        fetch(uri, tmp_path / "down")


def test_checkpoints_resume_from_s3(s3_server):
    store = ArtifactStore(f"{s3_server}/run4")
    ckpts = Checkpoints(store, "grpo_t2i", "abc")
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    ckpts.save(TrainerState(iteration=2), net, opt, None, "h")
    ckpts.save(TrainerState(iteration=4), net, opt, None, "h")
    assert ckpts.latest() == f"{s3_server}/run4/grpo_t2i.checkpoints/abc-0000004"
    fresh = torch.nn.Linear(2, 2)
    state = ckpts.load(ckpts.latest(), fresh, torch.optim.AdamW(fresh.parameters()), None)
    assert state.iteration == 4 and torch.equal(fresh.weight, net.weight)
