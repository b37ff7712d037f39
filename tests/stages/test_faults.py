"""Faults during GRPO: the reward server killed (restarted in time, or gone
for good) and non-finite rewards. In every case the newest checkpoint stays
intact and no final artifact of a failed run is visible."""

import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from flowrl.config import load_config
from flowrl.rewards.server import free_port, launch_server
from flowrl.rl.trainer import TrainingStopped
from flowrl.storage import fetch, read_manifest
from tests.conftest import ROOT, write_config

ITERATIONS = 6


def _checkpoints(root) -> list:
    return sorted((root / "grpo_t2i.checkpoints").glob("*/manifest.json"))


def _serve(config_path, rm_uri: str, port: int, log_path):
    config = load_config(config_path)
    server = launch_server(
        {"t2i": "flowrl.rewards.shapes_rewards:served_composite"}, port=port, log_path=log_path,
        reward_kwargs={"t2i": {"config": config.to_dict(), "reward_model_uri": rm_uri, "task": "t2i"}},
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    server.wait_until_healthy(timeout_s=120)
    return server


def _grpo(path, upstream, out):
    _, _, base, rm, prompts = upstream
    cmd = [sys.executable, "-m", "flowrl.cli", "grpo", "--config", str(path), "--task", "t2i", "--base", base.uri,
           "--reward-model", rm.uri, "--prompts", prompts["t2i"].uri, "--no-tracking", "--no-progress",
           "--output", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoints(proc, out, n: int) -> None:
    deadline = time.time() + 600
    while len(_checkpoints(out)) < n:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)


def _config(tmp_path, port: int, timeout_s: float, retries: int):
    return write_config(tmp_path, grpo={
        "loop": {"iterations": ITERATIONS, "checkpoint_every": 2, "eval_every": ITERATIONS}, "reward_backend": "server",
        "reward_url": f"http://127.0.0.1:{port}", "reward_timeout_s": timeout_s, "reward_retries": retries,
    })


def _kill_server_after_first_checkpoint(upstream, tmp_path, timeout_s: float, retries: int):
    """Serve the reward, start GRPO through it, SIGKILL the server once the
    first checkpoint is complete; returns (config path, port, killed server, out, GRPO process)."""
    port = free_port()
    path = _config(tmp_path, port, timeout_s, retries)
    server = _serve(path, upstream[3].uri, port, tmp_path / "server.log")
    out = tmp_path / "out"
    proc = _grpo(path, upstream, out)
    try:
        _wait_for_checkpoints(proc, out, 1)
    except BaseException:
        proc.kill()
        raise
    finally:
        server.process.send_signal(signal.SIGKILL)
        server.process.wait()
    return path, port, server, out, proc


@pytest.mark.fault("reward server SIGKILLed during GRPO, never back", "failed clearly within the retry budget; the last checkpoint intact")
def test_reward_server_gone_for_good_fails_the_step_clearly_in_bounded_time(upstream, tmp_path):
    """The server is SIGKILLed after the first checkpoint and never returns:
    the run exits 1 within the retry budget, naming the iteration and the last
    good checkpoint, which still loads; the stage's artifact never appears."""
    timeout_s, retries = 2.0, 2
    _, _, server, out, proc = _kill_server_after_first_checkpoint(upstream, tmp_path, timeout_s, retries)
    killed = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=300)
        waited = time.monotonic() - killed
    finally:
        proc.kill()
        server.stop()
    assert proc.returncode == 1, stderr[-3000:]
    message = stderr.strip().splitlines()[-1]
    assert message.startswith("flowrl grpo: error: ") and "Traceback" not in stderr
    assert "stopped at iteration" in message and f"{retries + 1} attempts" in message
    # retry budget: (retries + 1) attempts, each refused at once or cut at timeout_s, plus backoffs
    # 0.5 + 1 s, plus the iteration's own sampling and the process exit
    assert waited < (retries + 1) * timeout_s + 1.5 + 60
    last = _checkpoints(out)[-1].parent
    assert last.name in message
    assert load_file(fetch(str(last)) / "model.safetensors")  # manifest present, checksums verified
    assert not list((out / "grpo_t2i").glob("*/manifest.json"))


@pytest.mark.fault("reward server SIGKILLed during GRPO, restarted on its port", "lost nothing: the client reconnects and the run completes")
def test_reward_server_restarted_within_the_retries_lets_the_run_finish(upstream, tmp_path):
    """The server is SIGKILLed mid-run and started again on the same port a few
    seconds later: the client's retries reconnect and the run completes."""
    path, port, server, out, proc = _kill_server_after_first_checkpoint(upstream, tmp_path, 5.0, 6)
    try:
        time.sleep(3.0)
        server = _serve(path, upstream[3].uri, port, tmp_path / "server2.log")
        stdout, stderr = proc.communicate(timeout=600)
    finally:
        proc.kill()
        server.stop()
    assert proc.returncode == 0, stderr[-3000:]
    uri = stdout.strip().splitlines()[-1]
    assert (fetch(uri) / "manifest.json").is_file()  # 4 of its 6 iterations were scored by the second server


@pytest.mark.fault("NaN or inf in the rewards or the loss", "failed clearly naming the iteration; the last checkpoint intact")
def test_non_finite_rewards_stop_the_run_naming_the_step_and_the_last_checkpoint(upstream, tmp_path, monkeypatch):
    """A reward that turns NaN at the 4th iteration: the trainer stops before
    writing anything of that iteration; the checkpoint of iteration 2 is intact."""
    import flowrl.stages.grpo as stage
    from flowrl.rl.grpo import LocalRewards

    class PoisonedAt(LocalRewards):
        calls = 0

        def submit(self, images, prompts, sources=None):
            future = super().submit(images, prompts, sources)
            PoisonedAt.calls += 1
            if PoisonedAt.calls <= 3 * stage_cfg.reward_chunks:
                return future
            scores = future.result()
            scores.total[0] = float("nan")
            done = type(future)()
            done.set_result(scores)
            return done

    path = write_config(tmp_path, grpo={"loop": {"iterations": ITERATIONS, "checkpoint_every": 2,
                                                         "eval_every": ITERATIONS}})
    config = load_config(path)
    stage_cfg = config.grpo
    monkeypatch.setattr(stage, "LocalRewards", PoisonedAt)
    _, _, base, rm, prompts = upstream
    with pytest.raises(TrainingStopped) as err:
        stage.run_grpo(config, "t2i", base.uri, rm.uri, prompts["t2i"].uri, output_root=str(tmp_path / "out"),
                       progress=False)
    message = str(err.value)
    assert "stopped at iteration 4 of 6" in message and "non-finite" in message and "train/reward=nan" in message
    last = _checkpoints(tmp_path / "out")[-1].parent
    assert last.name.endswith("-0000002") and str(last) in message
    assert load_file(fetch(str(last)) / "model.safetensors")  # checksums verified
    assert not list((tmp_path / "out" / "grpo_t2i").glob("*/manifest.json"))


@pytest.mark.fault("S3 endpoint cut mid-upload, back within the retry budget", "lost nothing: the upload is retried and the version completes")
def test_a_stage_rides_out_an_s3_outage_during_its_upload(upstream, s3_server, tmp_path, monkeypatch):
    """A real stage (prompt filtering) publishing to S3 through a proxy that is
    cut right after its first uploaded file and restored 4 s later: the
    upload is retried and the stage's artifact is complete."""
    import threading

    import s3fs

    from flowrl.stages.filter_prompts import run_filter_prompts
    from tests.conftest import TcpProxy

    _, config, base, rm, _ = upstream
    proxy = TcpProxy(int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("FLOWRL_STORAGE_RETRY_S", "90")
    s3fs.S3FileSystem.clear_instance_cache()
    real, uploads = s3fs.S3FileSystem.put_file, []

    def put_file(self, lpath, rpath, **kwargs):
        result = real(self, lpath, rpath, **kwargs)
        uploads.append(rpath)
        if len(uploads) == 1:
            proxy.stop()
            threading.Timer(4.0, proxy.start).start()
        return result

    monkeypatch.setattr(s3fs.S3FileSystem, "put_file", put_file)
    try:
        result = run_filter_prompts(config, "t2i", base.uri, rm.uri, output_root=f"{s3_server}/stage-outage")
    finally:
        proxy.stop()
        s3fs.S3FileSystem.clear_instance_cache()
    assert len(uploads) >= 2 and result.uri.startswith(f"{s3_server}/stage-outage/filter_prompts_t2i/")
    monkeypatch.undo()
    s3fs.S3FileSystem.clear_instance_cache()
    local = fetch(result.uri, tmp_path / "down")  # straight from the server: complete, checksums right
    manifest = read_manifest(result.uri)
    assert len(manifest.files) >= 2 and all((local / rel).is_file() for rel in manifest.files)
