"""Sharded ZeRO checkpoints, the sharded fp32 EMA and the monitor without a
rank-0 copy (docs/checkpoints.md), with two gloo processes under torchrun
(tests/rl/ddp_checkpoint.py) against one plain process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from flowrl.rewards.server import free_port
from tests.conftest import ROOT

SCRIPT = ROOT / "tests" / "rl" / "ddp_checkpoint.py"


def _launch(out: Path, zero: int, processes: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    args = [str(SCRIPT), str(out), str(zero)]
    if processes == 1:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    for _ in range(2 if processes > 1 else 0):  # the port was free when picked; another process may take it
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
             "127.0.0.1", "--master_port", str(free_port()), *args],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> Path:
    return _launch(tmp_path_factory.mktemp("plain"), 0, 1)


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def zero_run(request, tmp_path_factory) -> tuple[int, Path]:
    return request.param, _launch(tmp_path_factory.mktemp(f"zero{request.param}"), request.param, 2)


def _checkpoints(out: Path) -> list[Path]:
    found = sorted((out / "store-a" / "grpo_t2i.checkpoints").glob("*-000000?"))
    assert [int(p.name[-7:]) for p in found] == [1, 2, 3]
    return found


def _final(out: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in load_file(out / "runs.safetensors").items() if k.startswith(prefix)}


def test_a_killed_zero_run_resumes_from_its_shards_to_the_uninterrupted_weights(zero_run):
    """Killed after iteration 1 and resumed (each rank loading its own shard: fp32 masters, moments,
    EMA), the run ends on the uninterrupted run's final (EMA) weights bit for bit, with the same
    monitor readings."""
    _, out = zero_run
    whole, resumed = _final(out, "a."), _final(out, "b.")
    assert whole.keys() == resumed.keys() and whole
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    runs = json.loads((out / "runs.json").read_text())
    assert runs["monitor_a"] == runs["monitor_b"] and len(runs["monitor_a"]) == 4


def test_each_rank_writes_only_its_own_partitions(zero_run):
    """No gather while a checkpoint is written; each rank file holds about half of the trained
    elements in each of its four fp32 kinds (masters, two moments, EMA), nothing whole; the
    training-dtype weights are not stored at all."""
    _, out = zero_run
    assert json.loads((out / "runs.json").read_text())["gathers"] == [0, 0, 0]
    for checkpoint in _checkpoints(out):
        names = {p.name for p in checkpoint.iterdir()}
        assert names == {"manifest.json", "sharded.json", "trainer.pt", "state.json",
                         "rank-00000-of-00002.safetensors", "rank-00001-of-00002.safetensors"}
        layout = json.loads((checkpoint / "sharded.json").read_text())
        trained = sum(math.prod(p["shape"]) for p in layout["params"] if p["trained"])
        for rank in (0, 1):
            with safe_open(str(checkpoint / f"rank-0000{rank}-of-00002.safetensors"), "pt") as handle:
                sizes = {k: math.prod(handle.get_slice(k).get_shape()) for k in handle.keys()}
            for kind in ("fp32", "exp_avg", "exp_avg_sq", "ema"):
                held = sum(n for k, n in sizes.items() if k.startswith(f"{kind}."))
                assert trained / 2 <= held <= trained / 2 + 64, (kind, held, trained)  # half, plus padding
            assert not [k for k in sizes if k.startswith("frozen.")]  # every parameter is trained here
            assert bool([k for k in sizes if k.startswith("buffer.")]) == (rank == 0) or not layout["buffers"]


def test_consolidation_gives_the_old_full_format_bit_for_bit(zero_run):
    """The offline consolidation of every checkpoint equals what the old per-rank assembly
    (every parameter gathered, every moment assembled) produced at the same point of the same run;
    the last one's EMA is the run's final exported weights."""
    from flowrl.rl.shards import consolidate

    _, out = zero_run
    for checkpoint in _checkpoints(out):
        full = consolidate(checkpoint)
        old = torch.load(out / f"old-{int(checkpoint.name[-7:])}.pt", weights_only=True)
        assert full.weights.keys() == old["weights"].keys()
        assert all(torch.equal(full.weights[k], old["weights"][k]) for k in old["weights"])
        assert full.optimizer["param_groups"] == old["optimizer"]["param_groups"]
        state, old_state = full.optimizer["state"], old["optimizer"]["state"]
        assert state.keys() == old_state.keys() and state
        for i, entry in old_state.items():
            assert all(torch.equal(state[i][key], entry[key]) for key in ("step", "exp_avg", "exp_avg_sq"))
    final = _final(out, "a.")
    assert all(torch.equal(full.ema[k], final[k]) for k in final)


def test_zero_ema_and_monitor_match_one_plain_process(zero_run, plain):
    """After the same two updates, the sharded fp32 EMA exports the weights one plain process's EMA
    holds, and the monitor (on the EMA's weights) reads what the plain one reads; under ZeRO-3 both
    ranks sample through the partitioned module (rank 0 keeps no copy of the model), under ZeRO-2
    rank 0 alone."""
    zero, out = zero_run
    ours, theirs = load_file(out / "fixed.safetensors"), load_file(plain / "fixed.safetensors")
    assert ours.keys() == theirs.keys()
    for directory, weights in ((out, ours), (plain, theirs)):  # export_weights streams the same tensors
        streamed = load_file(directory / "export.safetensors")
        assert streamed.keys() == weights.keys() and all(torch.equal(streamed[k], v) for k, v in weights.items())
    for key in theirs:  # sharded and whole sums round apart: up to 2.8e-5 on one weight of 6144 (Intel Xeon)
        torch.testing.assert_close(ours[key], theirs[key], atol=5e-5, rtol=1e-4)
        assert (ours[key] - theirs[key]).abs().mean() <= 2e-6, key  # and the bulk much closer
    scores, plain_scores = (json.loads((d / "fixed.json").read_text()) for d in (out, plain))
    for which in ("ema", "live"):
        for key, value in plain_scores[which].items():
            assert scores[which][key] == pytest.approx(value, rel=1e-5)
    assert scores["ema"] != scores["live"]  # the monitor did see the EMA's weights
    calls = [json.loads((out / f"calls-{rank}.json").read_text()) for rank in (0, 1)]
    assert calls[0] == [2, 2] and calls[1] == ([2, 2] if zero == 3 else [])
    runs = json.loads((out / "runs.json").read_text())
    assert runs["skeleton_meta"] is (True if zero == 3 else None)
    assert json.loads((out / "empty-1.json").read_text()) == 0  # rank 1 holds no exported weights


def test_consolidate_command_commits_a_full_checkpoint_any_engine_loads(zero_run, tmp_path, capsys):
    """`flowrl consolidate URI --output ROOT` commits the full format under ROOT (same stage and
    version); one plain process loads it, or the sharded checkpoint itself (assembled in memory);
    a ZeRO engine on another number of ranks refuses the shards, naming the command."""
    from flowrl.cli import main
    from flowrl.rl.ema import EMA
    from flowrl.rl.engine import TorchEngine
    from flowrl.rl.shards import consolidate
    from flowrl.rl.trainer import Checkpoints
    from flowrl.storage import ArtifactStore, read_manifest
    from tests.rl.conftest import tiny_model

    zero, out = zero_run
    sharded = _checkpoints(out)[-1]
    assert main(["consolidate", str(sharded), "--output", str(tmp_path / "full")]) == 0
    uri = capsys.readouterr().out.strip().splitlines()[-1]
    assert uri == str(tmp_path / "full" / "grpo_t2i.checkpoints" / sharded.name)
    assert read_manifest(uri).inputs["sharded"] == str(sharded)
    assert not (Path(uri) / "sharded.json").exists() and (Path(uri) / "model.safetensors").is_file()
    expected = consolidate(sharded)
    for source in (uri, str(sharded)):  # the full format, and the shards assembled in this process
        model = tiny_model(seed=5)
        engine, ema = TorchEngine(model.net, lr=1.0, weight_decay=0.0, grad_clip=1.0), EMA(model.net, 0.5)
        state = Checkpoints(ArtifactStore(str(tmp_path)), "grpo_t2i", "x").load_into(source, engine, ema)
        assert state.iteration == 3
        assert all(torch.equal(v, expected.weights[k]) for k, v in model.net.state_dict().items())
        assert all(torch.equal(v, expected.ema[k]) for k, v in ema.state_dict().items())
        assert engine.optimizer.param_groups[0]["lr"] == expected.optimizer["param_groups"][0]["lr"] != 1.0
    assert main(["consolidate", str(sharded), "--output", str(out / "store-a")]) == 2
    assert "needs another artifact root" in capsys.readouterr().err
    if zero == 2:  # one process under ZeRO-2 is not the two ranks that wrote the shards
        from flowrl.rl.engine import ZeroEngine
        from flowrl.rl.shards import ShardError

        model = tiny_model()
        engine = ZeroEngine(model.net, lr=1e-2, weight_decay=0.0, grad_clip=1.0, zero_stage=2, model=model)
        try:
            with pytest.raises(ShardError, match=r"written by 2 ranks under ZeRO-2, this run has 1.*flowrl consolidate"):
                Checkpoints(ArtifactStore(str(tmp_path)), "grpo_t2i", "x").load_into(str(sharded), engine, None)
        finally:
            engine.close()
