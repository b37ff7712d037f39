"""Distributed = single process (docs/design.md, Invariants): two gloo processes
under torchrun take the same GRPO / OPD update as one process on the same batch,
through DDP and through DeepSpeed ZeRO (stages 2 and 3, DeepSpeed's CPU accelerator)."""

import fnmatch
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flowrl.rewards.server import free_port
from tests.conftest import ROOT

SCRIPT = ROOT / "tests" / "rl" / "ddp_update.py"


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _run(out, mode, zero=0, processes=1):
    args = [str(SCRIPT), str(out), mode, str(zero)]
    if processes == 1:
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=_env(), cwd=ROOT,
                              timeout=300)
    for attempt in range(2 if processes > 1 else 0):  # the port was free when picked; another process may take it
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_addr",
             "127.0.0.1", "--master_port", str(free_port()), *args],
            capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300,
        )
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The one-process update of each mode, run once per module: the one-process side is plain PyTorch
    whatever ZeRO stage the two-process side takes, so the cases of one mode compare against one run."""
    done = {}

    def update(mode):
        if mode not in done:
            done[mode] = _run(tmp_path_factory.mktemp(f"single-{mode}") / "one.safetensors", mode)
        return done[mode]

    return update


def _assert_same_update(a, b):
    from tests.rl.conftest import tiny_model

    start = tiny_model().net.state_dict()
    assert any(not torch.allclose(a[k], start[k]) for k in a if k in start)  # the update did something
    for key in a:
        # the gradients tightly; the weights to 1 % of one Adam step (lr 1e-3): Adam's m / sqrt(v)
        # turns float noise in an all-but-zero gradient entry into a visible part of a step
        if key.startswith("sq."):  # Adam's second moment: squares of those same gradients
            torch.testing.assert_close(a[key], b[key], atol=1e-10, rtol=1e-3)
            continue
        atol = 1e-6 if key.startswith("grad.") else 1e-5
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5)


@pytest.mark.parametrize("mode, zero", [("single", 0), ("subset", 0), ("mixed", 0), ("opd", 0), ("variants", 0),
                                        ("single", 3), ("mixed", 2), ("opd", 3), ("ptx", 0), ("ptx", 3)])
def test_two_processes_take_the_single_process_update(tmp_path, single_process, mode, zero):
    """GRPO on one task, on one task training only the blocks' qkv weights (grpo.trainable), on two
    tasks at once (Mix-RL: a backward per task, reduced on the last), GRPO with the pretraining mix (each rank
    its share of one batch, grpo.ptx_coef), and one OPD iteration (the
    student's trajectories, both tasks); zero 0 is DDP, 2 and 3 DeepSpeed ZeRO, against plain PyTorch
    in one process."""
    single = single_process(mode)
    double = _run(tmp_path / "two.safetensors", mode, zero, processes=2)
    # ZeRO steps flat partitions: a parameter no batch reached (the source branch in T2I) has zero
    # moments there and none in plain AdamW; both leave it where it was
    _assert_same_update(single, double)
    if mode == "subset":  # DDP reduces the trained parameters' gradients only; the frozen ones stay put
        from tests.rl.conftest import tiny_model
        from tests.rl.ddp_update import SUBSET

        start = tiny_model().net.state_dict()
        trained = {k for k in start if any(fnmatch.fnmatchcase(k, p) for p in SUBSET)}
        assert trained and {k[len("grad."):] for k in double if k.startswith("grad.")} == trained
        for key in start.keys() - trained:
            assert torch.equal(double[key], start[key]), key
        assert all(not torch.equal(double[k], start[k]) for k in trained)


@pytest.mark.parametrize("zero", [2, 3])
def test_zero_checkpoint_state_resumes_the_same_run(tmp_path, single_process, zero):
    """Under ZeRO the engine assembles full weights and AdamW moments from the ranks' partitions
    (the checkpoint format of every engine); a trainer on fresh weights that loads them takes
    exactly the next update of the run they came from, and both equal plain PyTorch's."""
    plain = single_process("resume")
    sharded = _run(tmp_path / "two.safetensors", "resume", zero, processes=2)
    for tensors in (plain, sharded):
        for key in (k for k in tensors if k.startswith("a.")):
            assert torch.equal(tensors[key], tensors["b" + key[1:]]), key
    strip = lambda tensors: {k[2:]: v for k, v in tensors.items() if k.startswith("a.")}  # noqa: E731
    _assert_same_update(strip(plain), strip(sharded))
