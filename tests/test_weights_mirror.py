"""Pretrained weights fetched from the hub once per commit (flowrl/weights.py), against a real S3 API
(moto on loopback) and a stand-in hub that serves tiny Qwen-Image weights and counts downloads."""

import json
import shutil
from pathlib import Path

import pytest

from flowrl.config import load_config
from flowrl.models import load_policy
from flowrl.stages.base import run_base
from flowrl.storage import ArtifactStore, fetch
from flowrl.weights import STAGE, local_weights, mirror, mirror_version
from tests.conftest import write_config
from tests.models.tiny_qwen_image import build_tiny_qwen_image

COMMITS = {"acme/tiny-qwen": "a" * 40, "acme/tiny-qwen-edit": "b" * 40}


class FakeHub:
    """model_info / snapshot_download of huggingface_hub for two repositories, counting downloads."""

    def __init__(self, repos: dict[str, Path]):
        self.repos, self.downloads = repos, []

    def model_info(self, repo_id, revision=None):
        if repo_id not in self.repos:
            raise RuntimeError(f"404: {repo_id}")
        return type("Info", (), {"sha": COMMITS[repo_id]})()

    def snapshot_download(self, repo_id, revision=None, local_dir=None, **_):
        assert revision == COMMITS[repo_id], "the mirror downloads the resolved commit"
        self.downloads.append(repo_id)
        shutil.copytree(self.repos[repo_id], local_dir, dirs_exist_ok=True)
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True)  # the client's bookkeeping
        return local_dir


@pytest.fixture(scope="module")
def tiny_repos(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {"acme/tiny-qwen": build_tiny_qwen_image(root / "t2i", task="t2i"),
            "acme/tiny-qwen-edit": build_tiny_qwen_image(root / "edit", task="edit")}


@pytest.fixture
def hub(monkeypatch, tiny_repos, tmp_path):
    import huggingface_hub

    fake = FakeHub(tiny_repos)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda self, repo_id, revision=None: fake.model_info(
        repo_id, revision))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setenv("FLOWRL_WEIGHTS_CACHE", str(tmp_path / "pod-cache"))
    return fake


def _config(tmp_path, root: str):
    path = write_config(
        tmp_path, scenario="qwen_image.yaml",
        run={"artifact_root": root, "torch_threads": 1},
        model={"family": "qwen_image", "qwen_image": {"pretrained": "acme/tiny-qwen",
                                                      "edit_pretrained": "acme/tiny-qwen-edit", "height": 32,
                                                      "width": 32, "dtype": "float32"}})
    return load_config(path)


def test_mirror_downloads_each_commit_once(s3_server, hub, tmp_path):
    store = ArtifactStore(f"{s3_server}/mirror-once")
    uri = mirror("acme/tiny-qwen", store, "model.qwen_image.pretrained")
    assert uri == store.uri(STAGE, mirror_version("acme/tiny-qwen", COMMITS["acme/tiny-qwen"]))
    assert mirror("acme/tiny-qwen", store, "model.qwen_image.pretrained") == uri
    assert hub.downloads == ["acme/tiny-qwen"]
    files = set(store.read_manifest(uri).files)
    assert "transformer/config.json" in files and not any(f.startswith(".cache") for f in files)
    with pytest.raises(FileNotFoundError, match=r"model.qwen_image.pretrained: cannot resolve 'acme/nope'"):
        mirror("acme/nope", store, "model.qwen_image.pretrained")


def test_cluster_base_stage_mirrors_and_later_pods_read_the_store(s3_server, hub, tmp_path, monkeypatch):
    """A base stage on object storage mirrors both repositories and records their URIs; its rerun and
    any later pod (an empty local cache) read the mirror from the store and never the hub again."""
    config = _config(tmp_path, f"{s3_server}/cluster")
    first = run_base(config, progress=False)
    assert sorted(hub.downloads) == sorted(COMMITS)
    reference = json.loads((fetch(first.uri, tmp_path / "ref") / "reference.json").read_text())
    for task, repo in (("t2i", "acme/tiny-qwen"), ("edit", "acme/tiny-qwen-edit")):
        assert reference["pretrained"][task] == f"{s3_server}/cluster/{STAGE}/{mirror_version(repo, COMMITS[repo])}"
    again = run_base(config, progress=False)  # a retry or rerun: the same artifact, no download
    assert again.uri == first.uri and len(hub.downloads) == 2
    monkeypatch.setenv("FLOWRL_WEIGHTS_CACHE", str(tmp_path / "another-pod"))
    monkeypatch.setattr(hub, "snapshot_download", None)  # any hub download now fails the test
    model = load_policy(fetch(first.uri, tmp_path / "base"), config, "edit")
    assert model.task == "edit"
    assert (tmp_path / "another-pod").is_dir()


def test_local_weights_refuses_an_artifact_that_is_not_a_mirror(s3_server, tmp_path):
    store = ArtifactStore(f"{s3_server}/not-a-mirror")
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "x.txt").write_text("x")
    uri = store.commit(tmp_path / "s", stage="base", version="v1", config_hash="h", inputs={})
    with pytest.raises(FileNotFoundError, match="model.qwen_image.pretrained: .* stage base, not a weights mirror"):
        local_weights(uri, "model.qwen_image.pretrained")


def test_a_local_artifact_root_keeps_the_hub_cache(hub, tmp_path):
    """On a workstation (local artifacts) nothing is mirrored into the artifact root."""
    from flowrl.stages.base import _mirrored

    config = _config(tmp_path, str(tmp_path / "artifacts"))
    sources = {"t2i": "acme/tiny-qwen"}
    assert _mirrored(sources, {"t2i": "pretrained"}, config, None) == sources
    assert hub.downloads == []
