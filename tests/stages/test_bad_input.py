"""Bad input through the `flowrl` command line: each case exits with status 2
and a one-line message naming the key, file, row or field, with no traceback,
and commits nothing. Function-level cases of the same kinds live beside the
code they check (test_config, test_storage, rewards/test_annotations,
rewards/test_server)."""

import json
import shutil

import pandas as pd
import pytest
import yaml

from flowrl.cli import main
from flowrl.storage import ArtifactStore, fetch
from tests.conftest import ROOT

pytestmark = pytest.mark.bad_input


def _config(tmp_path, text: str | None = None, **sections) -> str:
    path = tmp_path / "bad.yaml"
    if text is not None:
        path.write_text(text)
    else:
        data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
        data["run"]["artifact_root"] = str(tmp_path / "artifacts")
        data["run"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
        for key, value in sections.items():
            data[key] = value
        path.write_text(yaml.safe_dump(data))
    return str(path)


def _fails(capsys, argv: list[str], *needles: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, f"exit status {rc}: {err}"
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    return err


CONFIG_CASES = [
    ("unknown key", {"base": {"lrr": 1.0}}, "base.lrr"),
    ("wrong type", {"base": {"lr": "fast"}}, "base.lr"),
    ("out of range", {"grpo": {"group_size": 0}}, "grpo.group_size"),
    ("section not a mapping", {"grpo": [1, 2]}, "grpo"),
    ("unknown choice", {"grpo": {"rollout": {"cfg_mode": "sometimes"}}}, "grpo.rollout.cfg_mode"),
    ("unknown family", {"model": {"family": "sdxl"}}, "model.family"),
    ("bad bench scorer", {"bench": {"scorer": "vibes"}}, "bench.scorer"),
    ("empty anchor", {"bench": {"anchor": ""}}, "bench.anchor"),
]


@pytest.mark.parametrize("name,sections,needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_values(tmp_path, capsys, name, sections, needle):
    path = _config(tmp_path, **sections)
    _fails(capsys, ["base", "--config", path], path, needle)
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("text,needle", [("", "empty"), ("run: [unclosed", "invalid YAML"), ("- a\n- b\n", "expected a mapping")],
                         ids=["empty file", "invalid YAML", "not a mapping"])
def test_bad_config_files(tmp_path, capsys, text, needle):
    path = _config(tmp_path, text)
    _fails(capsys, ["validate", "--config", path], needle)


@pytest.mark.parametrize("override,needles", [
    ("base.lrr=1.0", ("--set base.lrr=1.0", "base.lrr: unknown key")),
    ("base.lr=fast", ("--set base.lr=fast", "base.lr")),
    ("baselr", ("--set 'baselr'", "expected KEY=VALUE")),
    ("base..lr=1", ("--set 'base..lr=1'", "dotted KEY")),
    ("annotate.degradations=[noise, tint]", ("annotate.degradations[1]",)),
], ids=["unknown key", "wrong type", "no value", "empty key part", "unknown degradation"])
def test_bad_overrides_on_the_command_line(tmp_path, capsys, override, needles):
    path = _config(tmp_path)
    _fails(capsys, ["base", "--config", path, "--set", override], *needles)
    assert not (tmp_path / "artifacts").exists()


def test_missing_config_file(tmp_path, capsys):
    _fails(capsys, ["validate", "--config", str(tmp_path / "nope.yaml")], "nope.yaml", "not found")


def test_plan_without_gpus(tmp_path, capsys):
    """A production plan with no GPU to run on is refused before any estimate."""
    _fails(capsys, ["plan", "--config", str(ROOT / "configs" / "shapes.yaml"), "--gpus", "0", "--gpu-mem", "80"],
           "--gpus")
    _fails(capsys, ["plan", "--config", str(ROOT / "configs" / "shapes.yaml"), "--gpus", "8", "--gpu-mem", "0"],
           "--gpu-mem")


def test_missing_artifact(tmp_path, capsys):
    path = _config(tmp_path)
    missing = str(tmp_path / "nowhere" / "base" / "v1")
    _fails(capsys, ["annotate", "--config", path, "--base", missing], missing, "manifest.json")
    assert not (tmp_path / "artifacts").exists()


def _copy_artifact(uri: str, root, stage: str, edit) -> str:
    """Commit a copy of an artifact, its files changed by ``edit(directory)`` first (a well-formed
    artifact with bad content)."""
    staging = root / "staging"
    shutil.copytree(fetch(uri), staging)
    (staging / "manifest.json").unlink()
    edit(staging)
    return ArtifactStore(str(root / "store")).commit(staging, stage=stage, version="bad", config_hash="x", inputs={})


def test_checkpoint_of_another_family(upstream, tmp_path, capsys):
    _, _, base, _, _ = upstream

    def other_family(d):
        meta = json.loads((d / "model.json").read_text())
        (d / "model.json").write_text(json.dumps({**meta, "family": "qwen_image"}))

    uri = _copy_artifact(base.uri, tmp_path, "base", other_family)
    _fails(capsys, ["annotate", "--config", _config(tmp_path), "--base", uri], "family 'qwen_image'")


def test_checkpoint_of_another_shape(upstream, tmp_path, capsys):
    _, _, base, _, _ = upstream

    def wider(d):
        meta = json.loads((d / "model.json").read_text())
        meta["shapes"]["width"] = meta["shapes"]["width"] * 2
        (d / "model.json").write_text(json.dumps(meta))

    uri = _copy_artifact(base.uri, tmp_path, "base", wider)
    _fails(capsys, ["annotate", "--config", _config(tmp_path), "--base", uri], "model.safetensors",
           "weights do not fit")


def test_truncated_checkpoint_fails_its_checksum(upstream, tmp_path, capsys):
    _, _, base, _, _ = upstream
    uri = _copy_artifact(base.uri, tmp_path, "base", lambda d: None)
    weights = tmp_path / "store" / "base" / "bad" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _fails(capsys, ["annotate", "--config", _config(tmp_path), "--base", uri], "model.safetensors", "checksum")


def test_manifest_of_an_older_format(upstream, tmp_path, capsys):
    _, _, base, _, _ = upstream
    uri = _copy_artifact(base.uri, tmp_path, "base", lambda d: None)
    manifest = tmp_path / "store" / "base" / "bad" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "format": 0}))
    _fails(capsys, ["annotate", "--config", _config(tmp_path), "--base", uri], "manifest format 0")


def test_a_reward_model_artifact_is_not_a_checkpoint(upstream, tmp_path, capsys):
    _, _, _, rm, _ = upstream
    _fails(capsys, ["annotate", "--config", _config(tmp_path), "--base", rm.uri], "model.json")


@pytest.mark.parametrize("flag_values,needle", [
    (["--model", "base"], "--model: expected NAME=URI"),
    (["--model", "base=/a", "--model", "base=/b"], "'base' given twice"),
    (["--model", "../up=/a", "--model", "base=/b"], "model name '../up'"),
    (["--model", "only=/a"], "at least two models"),
], ids=["no uri", "twice", "path in name", "one model"])
def test_bad_bench_models(tmp_path, capsys, flag_values, needle):
    _fails(capsys, ["bench", "--config", _config(tmp_path), *flag_values], needle)
    assert not (tmp_path / "artifacts").exists()


@pytest.mark.parametrize("rows,needle", [
    ([{"arena": "t2i", "prompt": "a circle", "model_a": "base", "model_b": "x", "winner": "maybe"}],
     "votes row 0: winner"),
    ([{"arena": "video", "prompt": "a circle", "model_a": "base", "model_b": "x", "winner": "a"}],
     "votes row 0: arena"),
    ([{"arena": "t2i", "prompt": "", "model_a": "base", "model_b": "x", "winner": "a"}], "votes row 0: prompt"),
    ([{"arena": "t2i", "prompt": "a circle", "model_a": "base", "model_b": "ghost", "winner": "a"}],
     "model_b 'ghost'"),
], ids=["winner", "arena", "empty prompt", "unknown model"])
def test_bad_human_votes(upstream, tmp_path, capsys, rows, needle):
    _, _, base, _, _ = upstream
    votes = tmp_path / "votes.parquet"
    pd.DataFrame(rows).to_parquet(votes)
    _fails(capsys, ["bench", "--config", _config(tmp_path), "--model", f"base={base.uri}", "--model",
                    f"x={base.uri}", "--votes", str(votes)], str(votes), needle)
    assert not (tmp_path / "artifacts").exists()


def test_opd_needs_both_prompt_sets(upstream, tmp_path, capsys):
    _, _, base, _, prompts = upstream
    _fails(capsys, ["opd", "--config", _config(tmp_path), "--base", base.uri, "--teacher", f"t={base.uri}",
                    "--prompts", f"t2i={prompts['t2i'].uri}", f"image={prompts['edit'].uri}"], "--prompts")


def test_lineage_of_an_unknown_reference(tmp_path, capsys):
    _fails(capsys, ["lineage", "models:/nobody/7", "--config", _config(tmp_path)], "models:/nobody/7")


def test_judge_reserved_name(upstream, tmp_path, capsys):
    _, _, base, _, _ = upstream
    _fails(capsys, ["judge", "--config", _config(tmp_path), "--model", f"meta={base.uri}", "--results",
                    str(tmp_path / "r.json")], "'meta' is reserved")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.fault("MLflow server unreachable at start", "failed clearly before any work")
def test_mlflow_unreachable_at_start_is_a_clear_error_before_any_work(tmp_path, capsys):
    import socket
    import time

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = write_config_with(tmp_path, run={"tracking_uri": f"http://127.0.0.1:{port}"})
    start = time.perf_counter()
    _fails(capsys, ["base", "--config", path], "run.tracking_uri", f"http://127.0.0.1:{port}", "unreachable")
    assert time.perf_counter() - start < 30
    assert not list((tmp_path / "artifacts").glob("base/*/manifest.json"))


def write_config_with(tmp_path, **sections) -> str:
    from tests.conftest import write_config

    return str(write_config(tmp_path, **sections))
