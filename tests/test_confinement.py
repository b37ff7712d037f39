"""Artifact paths are confined: a crafted manifest (locally or on S3) cannot make fetch, file_uri,
read_manifest, the checkpoint loaders or a stage read or write outside its artifact, and the
config's name-like keys that become paths are refused at load when they could leave their
directory (issue 31, item 1)."""

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load_config, safe_name
from flowrl.storage import MANIFEST, ArtifactError, ArtifactStore, fetch, file_uri, read_manifest, unsafe_relpath
from tests.conftest import ROOT, write_config

# --------------------------------------------------------------------------- the two rules


@pytest.mark.parametrize("value", ["model.bin", "sub/metrics.json", ".payload-0123abcd/a/b.safetensors",
                                   "transformer/diffusion_pytorch_model-00001-of-00002.safetensors", "a..b", "x" * 255])
def test_a_safe_relative_path_is_accepted(value):
    assert unsafe_relpath(value) is None


@pytest.mark.parametrize("value, why", [
    ("", "empty"), ("../x", "'..' segment"), ("a/../../x", "'..' segment"), ("..", "'..' segment"),
    ("./x", "'.' segment"), ("/etc/passwd", "absolute"), ("a\\..\\..\\x", "backslash"), ("a//b", "empty path"),
    ("a/", "empty path"), ("a\x00b", "NUL"), ("a\nb", "control"), ("x" * 256, "segment longer"),
    ("a/" * 600, "longer than 1024"), ("a::s3://bucket/key", "chained"), (3, "expected a string"),
])
def test_an_unsafe_relative_path_is_refused_with_its_reason(value, why):
    assert why in unsafe_relpath(value)


def test_a_single_name_has_no_slash():
    assert unsafe_relpath("base", single=True) is None
    assert "one name" in unsafe_relpath("base/v1", single=True)


@pytest.mark.parametrize("value", ["shapes", "qwen-image-rl", "t2i_teacher", "pointwise_fidelity", "v1.2", "_x"])
def test_a_safe_name_is_accepted(value):
    assert safe_name(value, "run.name") == value


@pytest.mark.parametrize("value", ["../x", "a/b", ".hidden", "-flag", "a b", "", "a\n", "x" * 129, "a\\b", None, 3])
def test_an_unsafe_name_is_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"^opd\.routes\[1\]: .* is not a safe name"):
        safe_name(value, "opd.routes[1]")


# --------------------------------------------------------------------------- local artifacts


def _staging(tmp_path: Path, content: bytes = b"weights") -> Path:
    staging = tmp_path / "staging"
    (staging / "sub").mkdir(parents=True)
    (staging / "model.bin").write_bytes(content)
    (staging / "sub" / "metrics.json").write_text('{"a": 1}')
    return staging


def _edit_manifest(store: ArtifactStore, uri: str, edit) -> None:
    """Rewrite the manifest at ``uri`` (any store) as an attacker who can write it would."""
    path = f"{store._path(uri)}/{MANIFEST}"
    data = json.loads(store.fs.cat_file(path))
    edit(data)
    store.fs.pipe_file(path, json.dumps(data).encode())
    store.fs.invalidate_cache()


def _entry(content: bytes) -> dict:
    return {"sha256": hashlib.sha256(content).hexdigest(), "bytes": len(content)}


def _files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.mark.parametrize("field, value", [
    ("files", {"../../../secret.bin": _entry(b"SECRET")}),
    ("files", {"/etc/hostname": _entry(b"x")}),
    ("files", {"sub\\..\\..\\..\\secret.bin": _entry(b"x")}),
    ("files", {"a//b": _entry(b"x")}),
    ("files", {"a\x00b": _entry(b"x")}),
    ("files", {"x" * 2000: _entry(b"x")}),
    ("payload", "../../../jail"),
    ("payload", "/tmp"),
    ("payload", ".."),
    ("stage", "../../x"),
    ("version", "../x"),
])
def test_a_manifest_naming_a_path_out_of_its_artifact_is_refused(tmp_path, field, value):
    jail = tmp_path / "jail"
    store = ArtifactStore(str(jail / "store"))
    uri = store.commit(_staging(tmp_path), stage="base", version="v1", config_hash="h", inputs={})
    (jail / "secret.bin").write_bytes(b"SECRET")
    _edit_manifest(store, uri, lambda m: m.__setitem__(field, value))
    before = _files_under(tmp_path)
    expected = rf"^{uri}/{MANIFEST}: unreadable manifest: field '{field}': .* is not a safe"
    for read in (lambda: read_manifest(uri), lambda: fetch(uri), lambda: fetch(uri, jail / "down"),
                 lambda: file_uri(uri, "model.bin"), lambda: store.fetch(uri)):
        with pytest.raises(ArtifactError, match=expected):
            read()
    assert not store.exists("base", "v1")  # not a complete version either
    assert _files_under(tmp_path) == before  # nothing was written anywhere


def test_a_crafted_manifest_cannot_read_a_file_beside_the_artifact(tmp_path):
    """Before: the file's checksum matched, fetch returned it and file_uri pointed at it."""
    store = ArtifactStore(str(tmp_path / "store"))
    uri = store.commit(_staging(tmp_path), stage="base", version="v1", config_hash="h", inputs={})
    (tmp_path / "secret.bin").write_bytes(b"SECRET")
    _edit_manifest(store, uri, lambda m: m["files"].__setitem__("../../../secret.bin", _entry(b"SECRET")))
    with pytest.raises(ArtifactError, match=r"field 'files': file name '\.\./\.\./\.\./secret\.bin'"):
        fetch(uri)
    with pytest.raises(ArtifactError, match=r"not a safe relative path \(a '\.\.' segment\)"):
        file_uri(uri, "../../../secret.bin")


def _symlink_or_skip(link: Path, target: Path) -> None:
    try:
        os.symlink(target, link)
    except OSError:  # pragma: no cover - filesystems without symbolic links
        pytest.skip("no symbolic links here")


def test_a_symbolic_link_inside_a_local_artifact_does_not_lead_out(tmp_path):
    """Defence in depth: the names are safe, but the file at one is a link to outside the artifact."""
    store = ArtifactStore(str(tmp_path / "store"))
    uri = store.commit(_staging(tmp_path), stage="base", version="v1", config_hash="h", inputs={})
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"weights")  # the same bytes: the checksum alone would not notice
    (Path(uri) / "model.bin").unlink()
    _symlink_or_skip(Path(uri) / "model.bin", outside)
    for read in (lambda: fetch(uri), lambda: fetch(uri, verify=False), lambda: file_uri(uri, "model.bin"),
                 lambda: fetch(uri, tmp_path / "copy")):
        with pytest.raises(ArtifactError, match=rf"^{uri}: file 'model.bin' resolves to .*outside the artifact"):
            read()


def test_a_payload_directory_linked_out_of_the_artifact_is_refused(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    uri = store.commit(_staging(tmp_path), stage="base", version="v1", config_hash="h", inputs={})
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "sub").mkdir(parents=True)
    (elsewhere / "model.bin").write_bytes(b"weights")
    (elsewhere / "sub" / "metrics.json").write_text('{"a": 1}')
    _symlink_or_skip(Path(uri) / "p", elsewhere)
    _edit_manifest(store, uri, lambda m: m.__setitem__("payload", "p"))
    with pytest.raises(ArtifactError, match=rf"^{uri}: payload 'p' resolves to .*outside the artifact"):
        fetch(uri)
    with pytest.raises(ArtifactError, match="outside the artifact"):
        file_uri(uri, "model.bin")


def test_fetch_does_not_write_through_a_link_in_its_target_directory(tmp_path):
    """A download target holding a link out (a reused directory): nothing is written through it."""
    store = ArtifactStore(str(tmp_path / "store"))
    uri = store.commit(_staging(tmp_path), stage="base", version="v1", config_hash="h", inputs={})
    down, elsewhere = tmp_path / "down", tmp_path / "elsewhere"
    down.mkdir()
    elsewhere.mkdir()
    _symlink_or_skip(down / "sub", elsewhere)
    with pytest.raises(ArtifactError, match="file 'sub/metrics.json' resolves to .*outside the artifact"):
        fetch(uri, down)
    assert list(elsewhere.iterdir()) == []


def test_a_stage_cannot_commit_a_file_name_no_manifest_could_hold(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    staging = _staging(tmp_path)
    (staging / "a\nb").write_text("x")
    with pytest.raises(ArtifactError, match=r"file name 'a\\nb' is not a safe relative path"):
        store.commit(staging, stage="base", version="v1", config_hash="h", inputs={})
    assert not store.exists("base", "v1")


def _model_artifact(tmp_path: Path, store: ArtifactStore, version: str, seed: int) -> str:
    from flowrl.models import save_checkpoint
    from tests.rl.conftest import tiny_model

    staging = tmp_path / f"model-{seed}"
    save_checkpoint(tiny_model(seed), staging)
    return store.commit(staging, stage="base", version=version, config_hash="h", inputs={})


def test_a_crafted_model_artifact_cannot_load_weights_from_elsewhere(tmp_path):
    """The base artifact's manifest points its payload at another model's directory (checksums and
    all): fetch and so load_checkpoint refuse it instead of loading the other weights."""
    from flowrl.models import load_checkpoint, save_checkpoint
    from tests.rl.conftest import tiny_model

    store = ArtifactStore(str(tmp_path / "store"))
    uri = _model_artifact(tmp_path, store, "0000000000000001", seed=0)
    evil = tmp_path / "evil"
    save_checkpoint(tiny_model(7), evil)
    _edit_manifest(store, uri, lambda m: m.__setitem__("payload", "../../../evil"))
    with pytest.raises(ArtifactError, match="field 'payload': '../../../evil' is not a safe relative path"):
        load_checkpoint(fetch(uri))


def test_a_training_checkpoint_with_a_crafted_manifest_is_not_loaded(tmp_path):
    from flowrl.rl.trainer import Checkpoints, TrainerState

    store = ArtifactStore(str(tmp_path / "store"))
    checkpoints = Checkpoints(store, "grpo_t2i", "0123456789abcdef")
    net = torch.nn.Linear(2, 2)
    uri = checkpoints.save(TrainerState(iteration=1), net, torch.optim.AdamW(net.parameters()), None, "h")
    other = torch.nn.Linear(2, 2)
    with torch.no_grad():
        other.weight.fill_(7.0)
    elsewhere = tmp_path / "elsewhere"
    Checkpoints(ArtifactStore(str(elsewhere)), "x", "y").save(
        TrainerState(iteration=9), other, torch.optim.AdamW(other.parameters()), None, "h")
    planted = next(elsewhere.rglob(MANIFEST)).parent
    rel = os.path.relpath(planted, uri)  # ../../../elsewhere/x.checkpoints/y-0000009
    _edit_manifest(store, uri, lambda m: m.__setitem__("payload", rel))
    fresh = torch.nn.Linear(2, 2)
    before = fresh.weight.detach().clone()
    with pytest.raises(ArtifactError, match="field 'payload'"):
        checkpoints.load(uri, fresh, torch.optim.AdamW(fresh.parameters()), None)
    assert torch.equal(fresh.weight, before)
    assert checkpoints.latest() is None  # not a complete checkpoint either: a resume starts fresh


def test_a_stage_refuses_a_crafted_input_before_any_work(tmp_path):
    """annotate on a base artifact whose manifest points outside it: a clear ArtifactError, no output."""
    from flowrl.stages.annotate import run_annotate

    config = load_config(write_config(tmp_path / "run"))
    store = ArtifactStore(config.run.artifact_root)
    uri = _model_artifact(tmp_path, store, "0000000000000002", seed=0)
    from flowrl.models import save_checkpoint
    from tests.rl.conftest import tiny_model

    save_checkpoint(tiny_model(3), tmp_path / "evil")
    _edit_manifest(store, uri, lambda m: m.__setitem__("payload", os.path.relpath(tmp_path / "evil", uri)))
    with pytest.raises(ArtifactError, match=rf"^{uri}/{MANIFEST}: unreadable manifest: field 'payload'"):
        run_annotate(config, uri)
    assert sorted(p.name for p in Path(config.run.artifact_root).iterdir() if p.name != ".partial") == ["base"]


# --------------------------------------------------------------------------- object storage


def _s3_artifact(s3_server: str, tmp_path: Path, prefix: str) -> tuple[ArtifactStore, str]:
    store = ArtifactStore(f"{s3_server}/{prefix}")
    return store, store.commit(_staging(tmp_path), stage="base", version="v1", config_hash="h", inputs={})


def test_fetching_a_crafted_manifest_from_s3_writes_nothing_outside_the_target(s3_server, tmp_path):
    """Before: the object named ``<payload>/../../../escaped.bin`` was downloaded to
    ``<local_dir>/../../../escaped.bin``, outside the directory the caller gave."""
    store, uri = _s3_artifact(s3_server, tmp_path, "confine1")
    manifest = read_manifest(uri)
    for rel in ("../../../escaped.bin", str(tmp_path / "absolute.bin")):
        store.fs.pipe_file(f"{store._path(uri)}/{manifest.payload}/{rel}".replace("//", "/"), b"PLANTED")
        _edit_manifest(store, uri, lambda m, rel=rel: m.__setitem__("files", {rel: _entry(b"PLANTED")}))
        jail = tmp_path / "jail"
        with pytest.raises(ArtifactError, match=rf"^{uri}/{MANIFEST}: unreadable manifest: field 'files'"):
            fetch(uri, jail / "a" / "down")
        assert not (tmp_path / "escaped.bin").exists() and not (tmp_path / "absolute.bin").exists()
        assert not jail.exists()


def test_an_s3_payload_cannot_point_at_another_artifact(s3_server, tmp_path):
    store, uri = _s3_artifact(s3_server, tmp_path, "confine2")
    other = ArtifactStore(f"{s3_server}/confine2").commit(_staging(tmp_path / "o", b"other weights"), stage="base",
                                                           version="v2", config_hash="h", inputs={})
    theirs = read_manifest(other)
    _edit_manifest(store, uri, lambda m: m.update(payload=f"../v2/{theirs.payload}", files=theirs.files))
    for read in (lambda: fetch(uri, tmp_path / "down"), lambda: file_uri(uri, "model.bin"), lambda: read_manifest(uri)):
        with pytest.raises(ArtifactError, match=r"field 'payload': '\.\./v2/\.payload-"):
            read()
    assert not (tmp_path / "down").exists()


def test_an_s3_checkpoint_with_a_crafted_manifest_is_not_loaded(s3_server, tmp_path):
    from flowrl.rl.trainer import Checkpoints, TrainerState

    store = ArtifactStore(f"{s3_server}/confine3")
    checkpoints = Checkpoints(store, "grpo_t2i", "0123456789abcdef")
    net = torch.nn.Linear(2, 2)
    uri = checkpoints.save(TrainerState(iteration=1), net, torch.optim.AdamW(net.parameters()), None, "h")
    _edit_manifest(store, uri, lambda m: m["files"].__setitem__("../../../../../x.safetensors", _entry(b"x")))
    fresh = torch.nn.Linear(2, 2)
    with pytest.raises(ArtifactError, match="field 'files'"):
        checkpoints.load(uri, fresh, torch.optim.AdamW(fresh.parameters()), None)


# --------------------------------------------------------------------------- config keys that become paths


@pytest.mark.parametrize("override, key", [
    ("run.name=../../x", "run.name"),
    ("run.name=/abs", "run.name"),
    ("opd.routes=[t2i=t2i_teacher, edit=../../edit_teacher]", r"opd.routes\[1\]"),
    ("opd.teacher_devices=[../t2i_teacher=cpu]", r"opd.teacher_devices\[0\]"),
    ("grpo.monitor_reward=../../pairwise", "grpo.monitor_reward"),
    ("bench.anchor=../base", "bench.anchor"),
])
def test_a_name_key_with_a_path_in_it_is_refused_at_load(tmp_path, override, key):
    path = write_config(tmp_path)
    with pytest.raises(ConfigError, match=rf"^{key}: .* is not a safe name"):
        load_config(path, [override])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]  # no store, no tracking database


def test_a_bench_scorer_directory_with_a_path_in_it_is_refused(tmp_path):
    scorers = "[t2i_alignment=t2i/.., edit_accuracy=edit/pairwise, fidelity=t2i/pointwise_fidelity, identity=ssim]"
    with pytest.raises(ConfigError, match=r"^bench\.scorers\[0\]: '\.\.' is not a safe name"):
        load_config(ROOT / "configs" / "qwen_image.yaml", [f"bench.scorers={scorers}"])


@pytest.mark.parametrize("scenario", ["shapes.yaml", "smoke.yaml", "qwen_image.yaml"])
def test_the_shipped_scenarios_use_safe_names(scenario):
    load_config(ROOT / "configs" / scenario)
