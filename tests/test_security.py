"""Security: only safetensors / weights-only loading, no secret in anything
tracked, no path out of the artifact root."""

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT, write_config


class _Payload:
    """Unpickling this runs code: it writes a marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def test_a_planted_pickle_never_runs(tmp_path):
    from flowrl.models import CheckpointError, load_checkpoint, save_checkpoint
    from flowrl.rl.trainer import Checkpoints, TrainerState
    from flowrl.storage import ArtifactStore
    from tests.rl.conftest import tiny_model

    marker = tmp_path / "marker"
    # a model checkpoint whose weights file is a pickle
    model = tiny_model()
    save_checkpoint(model, tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(tmp_path / "ckpt")
    # a training checkpoint whose optimizer file carries the payload: torch.load(weights_only=True) refuses it
    store = ArtifactStore(str(tmp_path / "store"))
    checkpoints = Checkpoints(store, "grpo_t2i", "v1")
    optimizer = torch.optim.AdamW(model.net.parameters())
    uri = checkpoints.save(TrainerState(), model.net, optimizer, None, "h")
    local = Path(uri)
    (local / "trainer.pt").write_bytes(pickle.dumps({"optimizer": _Payload(str(marker))}))
    manifest = json.loads((local / "manifest.json").read_text())
    from flowrl.storage import sha256_file

    manifest["files"]["trainer.pt"] = {"sha256": sha256_file(local / "trainer.pt"),
                                       "bytes": (local / "trainer.pt").stat().st_size}
    (local / "manifest.json").write_text(json.dumps(manifest))  # an attacker who can also rewrite the manifest
    with pytest.raises(CheckpointError, match=r"trainer\.pt: refused"):  # one line, and the payload never runs
        checkpoints.load(uri, model.net, optimizer, None)
    assert not marker.exists()


def test_the_library_loads_no_pickle():
    """Every torch.load call in the library is weights-only; nothing calls pickle.load(s) or np.load with pickles."""
    import ast

    offenders = []
    for path in (ROOT / "flowrl").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if (func == "torch.load" and keywords.get("weights_only") != "True") or func in (
                    "pickle.load", "pickle.loads", "cloudpickle.loads") or keywords.get("allow_pickle") == "True":
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


SECRET = "s3cr3t-VALUE-8d1f"


def test_no_secret_reaches_mlflow(tmp_path, monkeypatch):
    """Credentials in the environment and secret-named config values never appear in params, tags,
    metrics or artifacts of a stage's run."""
    from flowrl.config import load_config
    from flowrl.stages.base import run_base

    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "MLFLOW_TRACKING_TOKEN", "FLOWRL_REWARD_TOKEN",
                 "HF_TOKEN"):
        monkeypatch.setenv(name, SECRET)
    torch.set_num_threads(1)
    config = load_config(write_config(tmp_path))
    result = run_base(config, progress=False)
    client = MlflowClient(config.run.tracking_uri)
    run = client.get_run(result.run_id)
    texts = [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(list(run.data.metrics))]
    root = Path(config.run.tracking_uri.removeprefix("sqlite:///")).parent
    for path in list((root / "mlartifacts").rglob("*")) + list(Path(result.uri).rglob("*")):
        if path.is_file():
            texts.append(path.read_bytes().decode("latin-1"))
    texts.append((root / "mlflow.db").read_bytes().decode("latin-1"))
    assert not [t[:80] for t in texts if SECRET in t]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET  # it was there to leak


def test_stage_and_version_names_cannot_leave_the_root(tmp_path):
    from flowrl.storage import ArtifactError, ArtifactStore

    store = ArtifactStore(str(tmp_path / "root"))
    staging = tmp_path / "s"
    staging.mkdir()
    (staging / "f.txt").write_text("x")
    for stage, version in (("../base", "v"), ("base", "../../etc"), ("base/..", "v"), ("/abs", "v")):
        with pytest.raises((ArtifactError, ValueError)):
            store.commit(staging, stage=stage, version=version, config_hash="h", inputs={})
    assert not (tmp_path / "etc").exists() and not (tmp_path / "base").exists()


def test_reward_server_binds_to_loopback_by_default():
    from flowrl.rewards.server import DEFAULT_HOST, build_parser

    assert DEFAULT_HOST == "127.0.0.1"
    assert build_parser().parse_args(["--port", "1", "--reward", "t2i=m:f"]).host == "127.0.0.1"
