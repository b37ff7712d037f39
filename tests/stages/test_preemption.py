"""Preemption: GRPO and OPD processes killed with SIGKILL at a random point and
started again with --resume end with exactly the weights and metrics of an
uninterrupted run with the same seed."""

import json
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from flowrl.config import load_config
from flowrl.storage import fetch
from tests.conftest import ROOT, write_config

ITERATIONS = 8


def _complete_checkpoints(root, stage: str) -> int:
    return len(list((root / f"{stage}.checkpoints").glob("*/manifest.json")))


def _kill_and_resume(argv: list[str], out, stage: str, seed: int) -> str:
    """Run ``flowrl ARGV --output OUT`` and SIGKILL it after a random number of complete
    checkpoints (plus a random delay); then run it again with --resume; return its artifact URI."""
    cmd = _kill(argv, out, stage, seed)
    resumed = subprocess.run(cmd + ["--resume"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return resumed.stdout.strip().splitlines()[-1]


def _kill(argv: list[str], out, stage: str, seed: int) -> list[str]:
    """The first half of :func:`_kill_and_resume`: the killed run; returns its command."""
    rng = random.Random(seed)
    after = rng.randint(1, ITERATIONS // 2 - 1)  # checkpoints every 2 iterations: kill before the last one
    cmd = [sys.executable, "-m", "flowrl.cli", *argv, "--output", str(out), "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while _complete_checkpoints(out, stage) < after:
        assert proc.poll() is None, f"finished before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.8))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not list((out / stage).glob("*/manifest.json"))  # nothing half-done looks done
    return cmd


def _same(a: str, b: str) -> None:
    wa, wb = load_file(fetch(a) / "model.safetensors"), load_file(fetch(b) / "model.safetensors")
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    ma, mb = (json.loads((fetch(u) / "metrics.json").read_text()) for u in (a, b))
    for key in ("wall_s", "train_s", "eval_s"):
        ma.pop(key, None), mb.pop(key, None)
    assert ma == mb


@pytest.fixture(scope="module")
def longer(upstream, tmp_path_factory):
    """The smoke config with 8 GRPO / OPD iterations, checkpoints every 2."""
    root = tmp_path_factory.mktemp("preempt")
    path = write_config(root, grpo={"loop": {"iterations": ITERATIONS, "checkpoint_every": 2, "eval_every": 4}},
                        opd={"loop": {"iterations": ITERATIONS, "checkpoint_every": 2, "eval_every": 4}})
    return root, path, load_config(path)


@pytest.mark.fault("GRPO run killed with SIGKILL at a random checkpoint, restarted with --resume", "resumed identically: same weights and metrics as an uninterrupted run")
@pytest.mark.parametrize("seed", [1, 2])
def test_grpo_killed_and_resumed_ends_like_an_uninterrupted_run(upstream, longer, tmp_path, seed):
    from flowrl.stages.grpo import run_grpo

    _, _, base, rm, prompts = upstream
    root, path, config = longer
    whole = run_grpo(config, "t2i", base.uri, rm.uri, prompts["t2i"].uri, output_root=str(root / "whole"),
                     progress=False)
    argv = ["grpo", "--config", str(path), "--task", "t2i", "--base", base.uri, "--reward-model", rm.uri,
            "--prompts", prompts["t2i"].uri, "--no-tracking"]
    _same(whole.uri, _kill_and_resume(argv, tmp_path / "out", "grpo_t2i", seed))


@pytest.mark.fault("OPD run killed with SIGKILL at a random checkpoint, restarted with --resume", "resumed identically: same weights and metrics as an uninterrupted run")
@pytest.mark.parametrize("seed", [3, 4])
def test_opd_killed_and_resumed_ends_like_an_uninterrupted_run(upstream, teachers, longer, tmp_path, seed):
    from flowrl.stages.opd import run_opd

    _, _, base, _, prompts = upstream
    root, path, config = longer
    uris = {t: prompts[t].uri for t in ("t2i", "edit")}
    whole = run_opd(config, base.uri, teachers, uris, output_root=str(root / "whole"), progress=False)
    argv = ["opd", "--config", str(path), "--base", base.uri, "--teacher", f"t2i_teacher={teachers['t2i_teacher']}",
            "--teacher", f"edit_teacher={teachers['edit_teacher']}", "--prompts", f"t2i={uris['t2i']}",
            f"edit={uris['edit']}", "--no-tracking"]
    _same(whole.uri, _kill_and_resume(argv, tmp_path / "out", "opd", seed))


@pytest.mark.fault("the pipeline's GRPO task killed with SIGKILL, then retried by Flyte",
                   "resumed identically: the retry continues from the last checkpoint to the uninterrupted result")
def test_a_flyte_retry_of_the_grpo_task_resumes_to_the_uninterrupted_run(upstream, longer, tmp_path):
    """The first attempt dies (SIGKILL) after a checkpoint; Flyte's retry calls the
    task again with the same inputs: it resumes and ends exactly like a run that
    was never killed."""
    from flytekit.types.file import FlyteFile

    from flowrl.stages.grpo import run_grpo
    from tasks.grpo import grpo
    from tasks.types import StageArtifact

    _, _, base, rm, prompts = upstream
    root, _, config = longer
    whole = run_grpo(config, "t2i", base.uri, rm.uri, prompts["t2i"].uri, output_root=str(root / "whole"),
                     progress=False)
    path = write_config(tmp_path, grpo={"loop": {"iterations": ITERATIONS, "checkpoint_every": 2, "eval_every": 4}})
    out = tmp_path / "artifacts"  # the config's run.artifact_root, where the task writes
    argv = ["grpo", "--config", str(path), "--task", "t2i", "--base", base.uri, "--reward-model", rm.uri,
            "--prompts", prompts["t2i"].uri, "--no-tracking"]
    _kill(argv, out, "grpo_t2i", seed=5)
    ref = lambda r: StageArtifact(stage=r.stage, version=r.version, uri=r.uri, mlflow_run_id="", metrics={})  # noqa: E731
    retried = grpo(config=FlyteFile(str(path)), parent_run="", task_name="t2i", base=ref(base), reward_model=ref(rm),
                   prompts=ref(prompts["t2i"]))
    assert retried.uri.startswith(str(out / "grpo_t2i"))
    _same(whole.uri, retried.uri)
