"""The artifact store against a real S3 API: moto's server on loopback (the
``s3_server`` fixture of tests/conftest.py), reached through s3fs as
production reaches S3."""

from pathlib import Path

import pytest
import torch

from flowrl.rl.trainer import Checkpoints, TrainerState
from flowrl.storage import ArtifactError, ArtifactStore, fetch, read_manifest


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
    payload = read_manifest(uri).payload
    assert payload.startswith(".payload-")  # each writer's files live under a prefix of its own
    store.fs.pipe_file(f"{store._path(uri)}/{payload}/model.bin", b"tampered")
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


def test_content_stamps_follow_an_objects_content_not_its_path(s3_server, tmp_path):
    """The Flyte cache key of a stage whose config names a file (prompt files, labels) records its
    content stamp: rewriting the object at the same key changes it, rewriting the same bytes does not."""
    import fsspec

    from flowrl.storage import content_stamp

    uri = f"{s3_server}/inputs/prompts.parquet"
    fs, _ = fsspec.core.url_to_fs(uri)
    fs.pipe_file(uri, b"first rows")
    first = content_stamp(uri)
    assert first.startswith("ETag:") and content_stamp(uri) == first
    fs.ls(f"{s3_server}/inputs", detail=True)  # this process's client now holds a listing with the old ETag
    other_writer, _ = fsspec.core.url_to_fs(uri, skip_instance_cache=True)  # another process rewrites the object
    other_writer.pipe_file(uri, b"other rows")
    assert content_stamp(uri) != first
    other_writer.pipe_file(uri, b"first rows")
    assert content_stamp(uri) == first
    assert content_stamp(f"{s3_server}/inputs") == "missing"  # a prefix is not a file
    assert content_stamp(f"{s3_server}/inputs/absent.parquet") == "missing"
    local = tmp_path / "labels.parquet"
    local.write_bytes(b"abc")
    assert content_stamp(str(local)) == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
