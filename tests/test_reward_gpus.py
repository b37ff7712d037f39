"""grpo.reward_gpus: one reward sidecar per node on GPUs of its own. Its environment and the URL
every rank of the node scores through (pure functions, a real two-process gloo group), how
GRPO's reward backend starts it, the config rules, and the GPUs the registered Flyte task asks
for. CPU only: the GPU placement is checked as the environment and devices handed over."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest

from flowrl.config import ConfigError, load_config
from flowrl.rewards import server
from flowrl.rewards.server import free_port, node_server_url, node_sidecar, sidecar_env
from tests.conftest import ROOT

SMOKE = ROOT / "configs" / "smoke.yaml"


# --------------------------------------------------------------------------- the sidecar's environment


def test_the_sidecar_sees_the_gpus_after_the_training_processes_and_no_local_rank():
    env = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "4", "PATH": "/bin"}
    out = sidecar_env(env, procs=4, gpus=2)
    assert out == {"LOCAL_WORLD_SIZE": "4", "PATH": "/bin", "CUDA_VISIBLE_DEVICES": "4,5"}
    assert env["LOCAL_RANK"] == "0"  # the caller's mapping is left alone
    assert sidecar_env({}, procs=1, gpus=1, device_count=2)["CUDA_VISIBLE_DEVICES"] == "1"
    # a node that already narrows its GPUs: positions in that list
    narrowed = sidecar_env({"CUDA_VISIBLE_DEVICES": "GPU-a, GPU-b,GPU-c,GPU-d"}, procs=2, gpus=2)
    assert narrowed["CUDA_VISIBLE_DEVICES"] == "GPU-c,GPU-d"


@pytest.mark.parametrize("env, count, message", [
    ({}, 5, r"grpo.reward_gpus: 2 GPU\(s\) .* 4 training process\(es\) need 6 GPUs, and this node has 5"),
    ({"CUDA_VISIBLE_DEVICES": "0,1,2,3,4"}, None, r"need 6 GPUs, and this node has 5 \(CUDA_VISIBLE_DEVICES=0,1"),
])
def test_a_node_without_room_for_the_sidecar_is_refused(env, count, message):
    with pytest.raises(ValueError, match=message):
        sidecar_env(env, procs=4, gpus=2, device_count=count)


def test_each_rank_takes_the_url_of_its_own_hosts_local_rank_0():
    gathered = [("a", 0, "http://127.0.0.1:1"), ("a", 1, None), ("b", 0, "http://127.0.0.1:2"), ("b", 1, None)]
    assert node_server_url(gathered, "a") == "http://127.0.0.1:1"
    assert node_server_url(gathered, "b") == "http://127.0.0.1:2"
    assert node_server_url([("a", 0, None), ("a", 1, None)], "a") is None  # it did not start
    with pytest.raises(RuntimeError, match="expected one local rank 0 on host c, found 0"):
        node_server_url(gathered, "c")


@dataclass
class _Started:
    base_url: str
    stopped: bool = False

    def stop(self):
        self.stopped = True


def test_one_process_uses_the_server_it_started(monkeypatch):
    started = _Started("http://127.0.0.1:7")
    assert node_sidecar(lambda: started, local_rank=0) == ("http://127.0.0.1:7", started)
    with pytest.raises(RuntimeError, match="expected one local rank 0"):  # no local rank 0 to start one
        node_sidecar(lambda: pytest.fail("only local rank 0 starts the server"), local_rank=1)
    monkeypatch.setattr(server.socket, "gethostname", lambda: "node-a")

    def broken():
        raise OSError("no port")

    with pytest.raises(OSError, match="no port"):  # the starter's own error, not a lost URL
        node_sidecar(broken, local_rank=0)


_WORKER = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from flowrl.rewards.server import node_sidecar

    rank, port = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)

    class Started:
        base_url = "http://127.0.0.1:4242"
        def stop(self): pass

    def broken():
        raise OSError("port taken")

    out = {}
    url, started = node_sidecar(lambda: Started(), local_rank=rank)  # one host: local rank = rank
    out["url"], out["started"] = url, started is not None
    try:
        node_sidecar(broken, local_rank=rank)
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    dist.destroy_process_group()
    print(json.dumps(out))
""")


def test_two_ranks_of_a_node_share_the_server_local_rank_0_started(tmp_path):
    """A real gloo group of two processes on one host: rank 0 starts, both get its URL; when the
    start fails, rank 0 raises its error and rank 1 a clear one instead of hanging in a collective."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(script), str(rank), port], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT) for rank in (0, 1)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outputs]
    first, second = (json.loads(out.strip().splitlines()[-1]) for out, _ in outputs)
    assert first["url"] == second["url"] == "http://127.0.0.1:4242"
    assert (first["started"], second["started"]) == (True, False)
    assert first["error"] == "OSError: port taken"
    assert second["error"].startswith("RuntimeError: grpo.reward_gpus: the reward sidecar of host")


# --------------------------------------------------------------------------- GRPO's reward backend


@pytest.fixture
def launches(monkeypatch):
    """launch_server recorded instead of run: (keyword arguments, the env it got) per call."""
    calls = []

    def launch(rewards, **kwargs):
        calls.append(kwargs)
        return _Healthy(f"http://127.0.0.1:{kwargs['port']}")

    monkeypatch.setattr(server, "launch_server", launch)
    return calls


@dataclass
class _Healthy(_Started):
    def wait_until_healthy(self, timeout_s: float):
        return {"status": "ok"}


def _qwen_config(**grpo):
    config = load_config(SMOKE)
    model = dataclasses.replace(config.model, family="qwen_image")
    return dataclasses.replace(config, model=model, grpo=dataclasses.replace(config.grpo, reward_backend="server",
                                                                            **grpo))


def test_reward_gpus_starts_one_sidecar_per_node_spread_over_its_own_gpus(launches, monkeypatch):
    from flowrl.stages.grpo import _reward_backend

    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    client, sidecar = _reward_backend(_qwen_config(reward_gpus=2), "t2i", None, "rm-uri", "prompts-uri")
    client.close()
    (call,) = launches
    assert call["env"]["CUDA_VISIBLE_DEVICES"] == "4,5" and "LOCAL_RANK" not in call["env"]
    assert call["reward_kwargs"]["t2i"]["spread"] is True
    assert client.settings.base_url == sidecar.base_url == f"http://127.0.0.1:{call['port']}"
    # another local rank of the node starts nothing (and alone, without a group, finds no server)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(RuntimeError, match="expected one local rank 0"):
        _reward_backend(_qwen_config(reward_gpus=2), "t2i", None, "rm-uri", "prompts-uri")
    assert len(launches) == 1


def test_without_reward_gpus_every_rank_starts_its_own_sidecar_as_before(launches, monkeypatch):
    from flowrl.stages.grpo import _reward_backend

    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    client, sidecar = _reward_backend(_qwen_config(), "t2i", None, "rm-uri", "prompts-uri")
    client.close()
    (call,) = launches
    assert call["env"]["LOCAL_RANK"] == "3" and "CUDA_VISIBLE_DEVICES" not in call["env"]
    assert "spread" not in call["reward_kwargs"]["t2i"] and sidecar is not None


# --------------------------------------------------------------------------- config and the Flyte task


@pytest.mark.parametrize("overrides, message", [
    (["grpo.reward_gpus=2"], "grpo.reward_gpus: 2 GPUs .*got reward_backend inprocess, reward_url null"),
    (["grpo.reward_gpus=1", "grpo.reward_backend=server", "grpo.reward_url=http://rm:1"], "reward_url http://rm:1"),
    (["grpo.reward_gpus=1", "grpo.reward_backend=server", "launch.grpo.gpus=0"], "launch.grpo.gpus is 0"),
    (["grpo.reward_gpus=-1"], "grpo.reward_gpus"),
])
def test_reward_gpus_without_a_sidecar_to_put_there_is_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SMOKE, overrides)


def test_the_grpo_task_asks_for_the_sidecars_gpus_and_starts_procs_workers():
    import tasks.grpo
    from tasks.launch import Registration, build_task

    config = load_config(SMOKE, ["grpo.reward_backend=server", "grpo.reward_gpus=2", "launch.grpo.procs=4",
                                 "launch.grpo.nodes=2", "launch.opd.procs=4"])
    registration = Registration(config)
    launch = registration.task_launch("grpo")
    assert (launch.gpus, launch.procs, launch.nodes) == (6, 4, 2)
    built = build_task(tasks.grpo.grpo.task_function, "grpo", launch, {})
    assert built.resources.requests.gpu == "6"
    assert (built.task_config.nproc_per_node, built.task_config.nnodes) == (4, 2)
    assert registration.task_launch("opd").gpus == 4  # only GRPO has a reward sidecar
    plain = Registration(load_config(SMOKE, ["grpo.reward_backend=server", "launch.grpo.procs=4"]))
    assert plain.task_launch("grpo").gpus == 4
