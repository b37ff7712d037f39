"""The artifact store: write-once versions, manifest last, checksums verified."""

import json

import pytest

from flowrl.storage import (
    MANIFEST,
    ArtifactError,
    ArtifactStore,
    artifact_version,
    input_identity,
    code_version,
    fetch,
    read_manifest,
)


def _stage_files(tmp_path, content=b"weights"):
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "model.bin").write_bytes(content)
    (staging / "sub" / "metrics.json").write_text('{"a": 1}')
    return staging


def test_commit_then_fetch_roundtrip(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    staging = _stage_files(tmp_path)
    uri = store.commit(staging, stage="base", version="v1", config_hash="h", inputs={"x": "s3://a/b"})
    assert uri == str(tmp_path / "root" / "base" / "v1")
    manifest = read_manifest(uri)
    assert manifest.stage == "base" and manifest.inputs == {"x": "s3://a/b"}
    assert set(manifest.files) == {"model.bin", "sub/metrics.json"}
    assert manifest.code_version == code_version()
    local = fetch(uri)
    assert (local / "model.bin").read_bytes() == b"weights"
    copy = fetch(uri, tmp_path / "copy")
    assert (copy / "sub" / "metrics.json").read_text() == '{"a": 1}'


def test_versions_are_write_once(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    uri = store.commit(_stage_files(tmp_path), stage="base", version="v1", config_hash="h", inputs={})
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.bin").write_bytes(b"different")
    assert store.commit(other, stage="base", version="v1", config_hash="h", inputs={}) == uri
    assert (fetch(uri) / "model.bin").read_bytes() == b"weights"


def test_incomplete_version_is_not_read(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    partial = tmp_path / "root" / "base" / "v2"
    partial.mkdir(parents=True)
    (partial / "model.bin").write_bytes(b"half")
    assert not store.exists("base", "v2")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        fetch(str(partial))


def test_checksum_mismatch_is_detected(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    uri = store.commit(_stage_files(tmp_path), stage="base", version="v1", config_hash="h", inputs={})
    (tmp_path / "root" / "base" / "v1" / "model.bin").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="checksum mismatch for model.bin"):
        fetch(uri)


def test_manifest_is_readable_by_others(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    store.commit(_stage_files(tmp_path), stage="base", version="v1", config_hash="h", inputs={})
    mode = (tmp_path / "root" / "base" / "v1" / MANIFEST).stat().st_mode & 0o777
    assert mode == 0o644


@pytest.mark.bad_input
@pytest.mark.parametrize("content", ["[1, 2]", "not json", '{"format": 1}'])
def test_malformed_manifest_is_an_artifact_error(tmp_path, content):
    store = ArtifactStore(str(tmp_path / "root"))
    uri = store.commit(_stage_files(tmp_path), stage="base", version="v1", config_hash="h", inputs={})
    (tmp_path / "root" / "base" / "v1" / MANIFEST).write_text(content)
    with pytest.raises(ArtifactError, match="unreadable manifest"):
        read_manifest(uri)


def test_old_manifest_format_is_refused(tmp_path):
    store = ArtifactStore(str(tmp_path / "root"))
    uri = store.commit(_stage_files(tmp_path), stage="base", version="v1", config_hash="h", inputs={})
    path = tmp_path / "root" / "base" / "v1" / MANIFEST
    data = json.loads(path.read_text())
    data["format"] = 0
    path.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="manifest format 0"):
        read_manifest(uri)


@pytest.mark.parametrize("stage,version", [("../x", "v"), ("base", ".."), ("base", "a/b"), ("", "v")])
def test_names_cannot_escape_the_root(tmp_path, stage, version):
    with pytest.raises(ArtifactError, match="invalid artifact"):
        ArtifactStore(str(tmp_path)).uri(stage, version)


def test_stage_may_not_write_manifest(tmp_path):
    staging = _stage_files(tmp_path)
    (staging / MANIFEST).write_text("{}")
    with pytest.raises(ArtifactError, match="may not write its own"):
        ArtifactStore(str(tmp_path / "root")).commit(staging, stage="b", version="v", config_hash="h", inputs={})


def test_version_is_content_derived():
    a = artifact_version("grpo", "cfg1", "code1", {"base": "u1", "rm": "u2"})
    assert a == artifact_version("grpo", "cfg1", "code1", {"rm": "u2", "base": "u1"})
    assert a != artifact_version("grpo", "cfg2", "code1", {"base": "u1", "rm": "u2"})
    assert a != artifact_version("grpo", "cfg1", "code1", {"base": "u9", "rm": "u2"})
    assert a != artifact_version("opd", "cfg1", "code1", {"base": "u1", "rm": "u2"})


def test_an_input_artifact_counts_by_stage_and_version_however_its_uri_is_spelled():
    version = "69d35a4d7f427cc3"

    def of(base: str, **more) -> str:
        return artifact_version("filter_prompts_t2i", "cfg", "code", {"base": base, "task": "t2i", **more})

    same = [f"artifacts/base/{version}", f"/work/main/artifacts/base/{version}/", f"s3://bucket/runs/base/{version}",
            f"file:///srv/store/base/{version}", f"./base/{version}//"]
    assert len({of(uri) for uri in same}) == 1
    assert of(f"artifacts/base/{version}") != of(f"artifacts/base/{'0' * 16}")  # another version
    assert of(f"artifacts/base/{version}") != of(f"artifacts/grpo_t2i/{version}")  # another stage
    # a checkpoint of a run is an artifact too; a file with its checksum and a plain value are kept as given
    ckpt = f"grpo_t2i.checkpoints/{version}-0000400"
    assert input_identity(f"/abs/root/{ckpt}") == input_identity(f"s3://b/{ckpt}/") == f"artifact:{ckpt}"
    for value in ("t2i", "/data/labels.parquet#abc123", f"/data/{version}.parquet", f"/data/x{version}"):
        assert input_identity(value) == value
    assert of(f"artifacts/base/{version}", labels="/a/labels.parquet#1") != of(
        f"artifacts/base/{version}", labels="/b/labels.parquet#1")


def test_stage_code_versions_follow_only_the_code_each_stage_runs():
    from flowrl.stages.common import stage_code_version, stage_module
    from flowrl.storage import module_closure

    assert stage_module("grpo_t2i") == "flowrl.stages.grpo" and stage_module("opd_offpolicy") == "flowrl.stages.opd"
    assert stage_module("filter_prompts_edit") == "flowrl.stages.filter_prompts"
    base = module_closure("flowrl.stages.base")
    assert {"flowrl.pretrain", "flowrl.shapes.splits", "flowrl.stages.common"} <= set(base)
    # the bench and the report do not invalidate trained models; config, storage, tracking and the host
    # description recorded beside results are left out (a new field in a results file retrained the base)
    assert not {"flowrl.bench", "flowrl.report", "flowrl.stages.bench", "flowrl.config", "flowrl.tracking",
                "flowrl.machine"} & set(base)
    assert {"flowrl.bench", "flowrl.report", "flowrl.evaluation"} <= set(module_closure("flowrl.stages.bench"))
    assert "flowrl.rewards.client" in module_closure("flowrl.stages.grpo")  # imports inside functions count too
    assert stage_code_version("grpo_t2i") == stage_code_version("grpo_mixed") == code_version("flowrl.stages.grpo")
    assert stage_code_version("base") != code_version()
    with pytest.raises(ValueError, match="no module"):
        stage_module("nonsense")


@pytest.mark.bad_input
@pytest.mark.parametrize("field, value", [("files", None), ("inputs", ["a"]), ("stage", ""), ("created_unix", "now"),
                                          ("files", {"model.safetensors": {"sha256": "ab"}}), ("payload", 3)])
def test_a_manifest_with_a_field_of_the_wrong_type_is_not_complete(tmp_path, field, value):
    """Found by the property test: a manifest of the right format whose fields are null or mistyped was
    read as complete; it is an ArtifactError naming the file and the field."""
    good = {"stage": "base", "version": "v1", "config_hash": "c", "code_version": "k", "inputs": {},
            "files": {}, "created_unix": 1.0, "format": 1}
    (tmp_path / "manifest.json").write_text(json.dumps({**good, field: value}))
    with pytest.raises(ArtifactError, match=rf"{tmp_path}/manifest.json: unreadable manifest: field '{field}'"):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.json").write_text(json.dumps(good))
    assert read_manifest(str(tmp_path)).stage == "base"
