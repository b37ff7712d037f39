"""Storage faults: the object store going away in the middle of an upload, and
several processes publishing the same version at once. A version is complete
(its manifest present, every checksum right) or invisible; never half."""

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import s3fs

from flowrl.storage import ArtifactError, ArtifactStore, fetch, read_manifest, with_retries
from tests.conftest import ROOT, TcpProxy


def _staging(path: Path, tag: str, n_files: int = 4) -> Path:
    for i in range(n_files):
        (path / f"part{i}.bin").parent.mkdir(parents=True, exist_ok=True)
        (path / f"part{i}.bin").write_bytes(os.urandom(1 << 16))
    (path / "metrics.json").write_text(json.dumps({"writer": tag, "wall_s": time.time()}))
    return path


@pytest.fixture
def proxy():
    port = int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])
    proxy = TcpProxy(port).start()
    yield proxy
    proxy.stop()


def _through(proxy: TcpProxy, root: str, retry_s: float) -> ArtifactStore:
    return ArtifactStore(root, storage_options={"client_kwargs": {"endpoint_url": proxy.url}, "skip_instance_cache": True},
                         retry_s=retry_s)


def _outage_after_first_upload(store: ArtifactStore, proxy: TcpProxy, outage_s: float | None) -> list[str]:
    """Cut the proxy right after the first file lands; bring it back after ``outage_s`` (None: never)."""
    real, uploads = store.fs.put_file, []

    def put_file(lpath, rpath, **kwargs):
        result = real(lpath, rpath, **kwargs)
        uploads.append(rpath)
        if len(uploads) == 1:
            proxy.stop()
            if outage_s is not None:
                threading.Timer(outage_s, proxy.start).start()
        return result

    store.fs.put_file = put_file
    return uploads


def test_with_retries_backs_off_then_names_what_failed():
    waits, calls = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "ok"

    assert with_retries("x", flaky, budget_s=60, sleep=waits.append) == "ok"
    assert waits == [0.5, 1.0]
    with pytest.raises(ArtifactError, match=r"s3://b/v: upload of a.bin: failed after \d+ attempts.*ConnectionRefused"):
        with_retries("s3://b/v: upload of a.bin", lambda: (_ for _ in ()).throw(ConnectionRefusedError("no")), 0.1)
    with pytest.raises(PermissionError):  # the store said no: not retried
        with_retries("x", lambda: (_ for _ in ()).throw(PermissionError("denied")), 60, sleep=waits.append)


@pytest.mark.fault("S3 endpoint cut mid-upload, back within the retry budget", "lost nothing: the upload is retried and the version completes")
def test_s3_outage_mid_upload_is_retried_and_the_version_completes(s3_server, proxy, tmp_path):
    store = _through(proxy, f"{s3_server}/outage1", retry_s=90)
    uploads = _outage_after_first_upload(store, proxy, outage_s=4.0)
    start = time.monotonic()
    uri = store.commit(_staging(tmp_path / "s", "a"), stage="base", version="v1", config_hash="h", inputs={})
    assert time.monotonic() - start >= 4.0  # it did wait out the outage
    assert len(uploads) == 5
    local = fetch(uri, tmp_path / "down")  # directly from the server, checksums verified
    assert json.loads((local / "metrics.json").read_text())["writer"] == "a"


@pytest.mark.fault("S3 endpoint down past the retry budget", "failed clearly: nothing published; a later run publishes a fresh, complete version")
def test_s3_outage_past_the_retry_budget_fails_clearly_and_publishes_nothing(s3_server, proxy, tmp_path):
    root = f"{s3_server}/outage2"
    store = _through(proxy, root, retry_s=3)
    _outage_after_first_upload(store, proxy, outage_s=None)
    with pytest.raises(ArtifactError, match=r"outage2/base/v1: upload of .*nothing published: no manifest.*failed after"):
        store.commit(_staging(tmp_path / "s", "a"), stage="base", version="v1", config_hash="h", inputs={})
    direct = ArtifactStore(root)
    direct.fs.invalidate_cache()
    assert not direct.exists("base", "v1")
    leftover = [p for p in direct.fs.find(f"{direct._root_path}/base/v1") if "/.payload-" in p]
    assert leftover  # the first file did land, under the failed writer's own prefix
    # the store is back: a later run publishes a fresh version that names none of the leftover files
    proxy.start()
    uri = _through(proxy, root, retry_s=30).commit(_staging(tmp_path / "t", "b"), stage="base", version="v1",
                                                   config_hash="h", inputs={})
    manifest = read_manifest(uri)
    assert all(f"/{manifest.payload}/" not in p for p in leftover)
    assert json.loads((fetch(uri, tmp_path / "down") / "metrics.json").read_text())["writer"] == "b"


_WRITER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    from flowrl.storage import ArtifactStore
    root, staging, start_at = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
    time.sleep(max(0.0, start_at - time.time()))
    print(ArtifactStore(root).commit(staging, stage="grpo_t2i", version="same", config_hash="h", inputs={}))
""")


def _race(root: str, tmp_path: Path, writers: int = 4) -> tuple[str, list[str]]:
    stagings = [_staging(tmp_path / f"w{i}", f"writer{i}", n_files=8) for i in range(writers)]
    start_at = time.time() + 3.0  # every process imported and waiting: they commit at the same instant
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, root, str(s), str(start_at)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in stagings]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    uris = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(uris) == 1
    return uris.pop(), [f"writer{i}" for i in range(writers)]


@pytest.mark.fault("four processes publish the same artifact version at once (local disk, S3)", "lost nothing: one wins; all end with the same complete artifact")
def test_concurrent_writers_of_one_local_version_end_with_one_complete_artifact(tmp_path):
    uri, tags = _race(str(tmp_path / "store"), tmp_path)
    local = fetch(uri)  # checksums of every file against the one manifest
    winner = json.loads((local / "metrics.json").read_text())["writer"]
    assert winner in tags
    assert sorted(p.name for p in local.iterdir()) == sorted(["manifest.json", "metrics.json"] + [f"part{i}.bin" for i in range(8)])
    assert not any((tmp_path / "store" / ".partial").rglob("*.bin"))  # the losers' copies are gone


@pytest.mark.fault("four processes publish the same artifact version at once (local disk, S3)", "lost nothing: one wins; all end with the same complete artifact")
def test_concurrent_writers_of_one_s3_version_end_with_one_complete_artifact(s3_server, tmp_path):
    root = f"{s3_server}/race"
    uri, tags = _race(root, tmp_path)
    local = fetch(uri, tmp_path / "down")
    assert json.loads((local / "metrics.json").read_text())["writer"] in tags
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    payloads = {p.split("/.payload-")[1].split("/")[0] for p in fs.find(f"{root[5:]}/grpo_t2i/same") if "/.payload-" in p}
    assert payloads == {read_manifest(uri).payload.removeprefix(".payload-")}  # the losers removed theirs
