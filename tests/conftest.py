"""Shared fixtures: scenario configs pointed at temporary storage."""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, scenario: str = "smoke.yaml", **overrides) -> Path:
    """A copy of configs/<scenario> with artifacts and tracking under tmp_path.

    ``overrides`` are section -> {key: value} dicts merged into the YAML.
    """
    data = yaml.safe_load((ROOT / "configs" / scenario).read_text())
    data["run"]["artifact_root"] = str(tmp_path / "artifacts")
    data["run"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def smoke_config(tmp_path) -> Path:
    return write_config(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """An S3 API server (moto) on loopback for this test session; yields the
    URI of an empty bucket and points boto3 / s3fs / MLflow at the server
    through the environment (AWS_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL)."""
    port = _free_port()
    server = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    assert server, "moto_server is not installed next to this python (requirements/cpu.txt pins moto[server])"
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
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


@pytest.fixture(autouse=True, scope="session")
def _isolated_flyte_cache(tmp_path_factory):
    """In-process workflow runs use a Flyte local cache of this session only: entries from an
    earlier session would name artifacts (e.g. on a since-restarted S3 test server) that are gone."""
    from diskcache import Cache
    from flytekit.core.local_cache import LocalTaskCache

    saved = (getattr(LocalTaskCache, "_cache", None), LocalTaskCache._initialized)
    LocalTaskCache._cache = Cache(str(tmp_path_factory.mktemp("flyte-local-cache")))
    LocalTaskCache._initialized = True
    yield
    LocalTaskCache._cache, LocalTaskCache._initialized = saved
