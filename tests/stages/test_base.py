"""Stage `base` on the smoke config: plain function, CLI and Flyte paths."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from flowrl.config import load_config
from flowrl.machine import machine_summary
from flowrl.models import load_checkpoint
from flowrl.stages.base import run_base
from flowrl.storage import fetch, read_manifest
from tests.conftest import ROOT, write_config

EXPECTED_FILES = {"model.safetensors", "model.json", "metrics.json", "grid.png"}


def test_base_writes_checkpoint_metrics_grid_and_tracks(smoke_config):
    config = load_config(smoke_config)
    result = run_base(config, progress=False)
    manifest = read_manifest(result.uri)
    assert set(manifest.files) == EXPECTED_FILES
    assert manifest.extra["mlflow_run_id"] == result.run_id
    assert manifest.extra["made_on"] == machine_summary()  # floats depend on the CPU: say which one
    local = fetch(result.uri)
    metrics = json.loads((local / "metrics.json").read_text())
    for key in ("t2i/alignment", "t2i/alignment/counting", "edit/accuracy", "edit/identity", "fidelity", "wall_s"):
        assert key in metrics
    run = MlflowClient(config.run.tracking_uri).get_run(result.run_id)
    assert run.data.tags["flowrl.artifact_uri"] == result.uri
    assert run.data.tags["flowrl.made_on"] == manifest.extra["made_on"]
    assert "t2i/alignment" in run.data.metrics and "train/loss" in run.data.metrics
    assert run.data.params["base.steps"] == str(config.base.steps)
    model = load_checkpoint(local, expected_family="shapes")
    assert model.net.config == config.model.shapes


def test_base_is_deterministic_and_write_once(tmp_path):
    a = run_base(load_config(write_config(tmp_path / "a")), progress=False)
    b = run_base(load_config(write_config(tmp_path / "b")), progress=False)
    assert a.version == b.version  # same config + code -> same content-derived version
    wa = load_file(fetch(a.uri) / "model.safetensors")
    wb = load_file(fetch(b.uri) / "model.safetensors")
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=0, rtol=0)
    assert json.loads((fetch(a.uri) / "metrics.json").read_text())["t2i/alignment"] == a.metrics["t2i/alignment"]


def test_rerun_reuses_the_complete_artifact(smoke_config):
    config = load_config(smoke_config)
    first = run_base(config, progress=False)
    again = run_base(config, progress=False)
    assert again.reused and not first.reused
    assert (again.uri, again.version, again.run_id) == (first.uri, first.version, first.run_id)
    assert again.metrics == json.loads(json.dumps(first.metrics))
    runs = MlflowClient(config.run.tracking_uri).search_runs(
        [MlflowClient(config.run.tracking_uri).get_experiment_by_name(config.run.name).experiment_id]
    )
    assert len(runs) == 1  # the rerun did no work and logged nothing


def test_failed_stage_leaves_nothing_complete(smoke_config, monkeypatch):
    import flowrl.evaluation

    def broken(*args, **kwargs):
        raise RuntimeError("judge crashed")

    monkeypatch.setattr(flowrl.evaluation, "evaluate_shapes", broken)
    config = load_config(smoke_config)
    try:
        run_base(config, progress=False)
    except RuntimeError:
        pass
    else:
        raise AssertionError("the failure was swallowed")
    # only the training checkpoints are complete (what --resume continues from), not the stage's artifact
    complete = list((smoke_config.parent / "artifacts").rglob("manifest.json"))
    assert complete and all(path.parent.parent.name == "base.checkpoints" for path in complete)
    client = MlflowClient(config.run.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(config.run.name).experiment_id])
    assert run.info.status == "FAILED"


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    return env


def test_cli_prints_output_location_last(tmp_path, smoke_config):
    out = tmp_path / "cli-artifacts"
    proc = subprocess.run(
        [sys.executable, "-m", "flowrl.cli", "base", "--config", str(smoke_config), "--output", str(out), "--no-progress"],
        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(str(out / "base"))
    assert (fetch(last) / "model.safetensors").is_file()


def test_cli_bad_config_is_one_line_error(tmp_path):
    bad = write_config(tmp_path, base={"lr": "fast"})
    proc = subprocess.run(
        [sys.executable, "-m", "flowrl.cli", "base", "--config", str(bad)],
        capture_output=True, text=True, cwd=ROOT, env=_env(), timeout=120,
    )
    assert proc.returncode == 2
    assert "base.lr: expected float > 0, got 'fast'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "artifacts").exists()


def test_qwen_image_base_validates_and_references_weights(tmp_path):
    from tests.models.tiny_qwen_image import build_tiny_qwen_image

    weights = tmp_path / "qwen-tiny"
    build_tiny_qwen_image(weights, task="edit")
    path = write_config(
        tmp_path, scenario="qwen_image.yaml",
        model={"family": "qwen_image", "qwen_image": {"pretrained": str(weights), "edit_pretrained": str(weights),
                                                      "height": 32, "width": 64, "dtype": "float32"}},
    )
    result = run_base(load_config(path), progress=False)
    reference = json.loads((fetch(result.uri) / "reference.json").read_text())
    assert reference["pretrained"] == {"t2i": str(weights), "edit": str(weights)}
    assert reference["components"]["edit"]["components"]["transformer"]["num_parameters"] > 0
    assert result.metrics["t2i/transformer/num_parameters"] > 0


def test_qwen_image_base_versions_follow_the_weights(tmp_path):
    from tests.models.tiny_qwen_image import build_tiny_qwen_image

    weights = tmp_path / "qwen-tiny"
    build_tiny_qwen_image(weights, task="edit")
    path = write_config(tmp_path, scenario="qwen_image.yaml",
                        model={"family": "qwen_image", "qwen_image": {"pretrained": str(weights)}})
    first = run_base(load_config(path), progress=False)
    assert run_base(load_config(path), progress=False).reused
    (weights / "transformer" / "extra-notes.json").write_text('{"changed": true}')
    changed = run_base(load_config(path), progress=False)
    assert not changed.reused and changed.version != first.version


def test_qwen_image_base_missing_local_path_names_the_key(tmp_path):
    from flowrl.models import CheckpointError

    path = write_config(tmp_path, scenario="qwen_image.yaml",
                        model={"family": "qwen_image", "qwen_image": {"pretrained": str(tmp_path / "nope")}})
    try:
        run_base(load_config(path), progress=False)
    except CheckpointError as exc:
        assert str(exc).startswith("model.qwen_image.pretrained: ") and "does not exist" in str(exc)
    else:
        raise AssertionError("a missing weights directory was accepted")


def test_qwen_image_base_names_missing_component(tmp_path):
    import shutil

    from flowrl.models import CheckpointError
    from tests.models.tiny_qwen_image import build_tiny_qwen_image

    weights = tmp_path / "qwen-tiny"
    build_tiny_qwen_image(weights, task="edit")
    shutil.rmtree(weights / "vae")
    path = write_config(tmp_path, scenario="qwen_image.yaml", model={"family": "qwen_image", "qwen_image": {"pretrained": str(weights)}})
    try:
        run_base(load_config(path), progress=False)
    except CheckpointError as exc:
        assert str(exc).startswith("model.qwen_image.pretrained: ") and "vae" in str(exc)
    else:
        raise AssertionError("a missing vae/ was accepted")
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.fault("an artifact deleted behind the Flyte cache", "failed clearly: the run names the missing output and how to refresh the cache")
def test_flyte_cache_reruns_only_what_a_config_change_touches(tmp_path, monkeypatch):
    """Nothing changed: every stage is a Flyte cache hit (no stage runs). Only the opd section
    changed (the optional branches switched off): OPD and bench run again, the optional stages are
    skipped, and nothing else runs."""
    from diskcache import Cache
    from flytekit.core.local_cache import LocalTaskCache
    from flytekit.types.file import FlyteFile

    from pipelines.post_train import post_train

    monkeypatch.setattr(LocalTaskCache, "_cache", Cache(str(tmp_path / "flyte-cache")), raising=False)
    monkeypatch.setattr(LocalTaskCache, "_initialized", True)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def stage_runs_of_last_pipeline() -> list[str]:
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  order_by=["attributes.start_time DESC"])
        parent = next(r for r in runs if r.data.tags.get("flowrl.stage") == "pipeline").info.run_id
        return sorted(r.data.tags["flowrl.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent)

    path = write_config(tmp_path)
    first = post_train(config=FlyteFile(str(path)))
    assert len(stage_runs_of_last_pipeline()) == 11
    again = post_train(config=FlyteFile(str(path)))
    assert stage_runs_of_last_pipeline() == []  # all cached
    assert again.student.uri == first.student.uri and again.report == first.report
    # an artifact deleted behind the cache's back: every stage is still a cache hit, but the run
    # does not report it as done; it names the missing output and how to refresh the cache
    moved = Path(first.student.uri).with_name("moved-away")
    Path(first.student.uri).rename(moved)
    with pytest.raises(Exception, match=r"(?s)do not exist or are incomplete: opd \(.*--overwrite-cache"):
        post_train(config=FlyteFile(str(path)))
    moved.rename(first.student.uri)
    # the opd section changed (its seed) and both optional branches switched off: OPD and the bench (a new
    # student) run again, Mix-RL and off-policy OPD are skipped, GRPO and everything upstream are cached
    write_config(tmp_path, opd={"seed": 405}, pipeline={"mix_rl": False, "offpolicy_ablation": False})
    changed = post_train(config=FlyteFile(str(path)))
    assert stage_runs_of_last_pipeline() == ["bench", "opd"]
    assert changed.student.uri != first.student.uri and changed.t2i_teacher.uri == first.t2i_teacher.uri
    assert changed.mix_rl.uri == "" and changed.student_offpolicy.uri == ""
    assert set(changed.bench.metrics) >= {"models/base/pillars/overall", "models/student/pillars/overall"}
    assert not any(k.startswith(("models/mix_rl", "models/student_offpolicy")) for k in changed.bench.metrics)


def test_flyte_cache_keys_follow_the_content_of_the_files_a_config_names(tmp_path):
    """New human labels written over the same paths: the stages that read them (annotate, and the bench,
    which checks its prompts against them) get new cache keys; a stage that does not read them keeps its."""
    from flytekit.types.file import FlyteFile

    from tasks.types import stage_config_key

    labels = {k: tmp_path / f"{k}.parquet" for k in ("pointwise", "pairwise")}
    for path in labels.values():
        path.write_bytes(b"first labels")
    config = write_config(tmp_path, annotate={f"{k}_path": str(p) for k, p in labels.items()})

    def keys():
        return {m: stage_config_key(m, FlyteFile(str(config))) for m in ("annotate", "reward_model", "bench")}

    before = keys()
    assert keys() == before
    labels["pairwise"].write_bytes(b"other labels")
    after = keys()
    assert after["annotate"] != before["annotate"] and after["bench"] != before["bench"]
    assert after["reward_model"] == before["reward_model"]
