"""Real reward servers in subprocesses on free loopback ports, shared by the tests."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from flowrl.rewards.server import ServerProcess, free_port, launch_server

ROOT = Path(__file__).resolve().parents[2]
FAKES = "tests.rewards.fake_rewards"
SPECS = {"t2i": f"{FAKES}:brightness", "edit": f"{FAKES}:source_similarity", "faulty": f"{FAKES}:faulty"}
TOKEN_ENV = "FLOWRL_TEST_REWARD_TOKEN"
TOKEN = "test-token-1234"
SERVER_MAX_BATCH = 8
SLOW_DELAY_S = 0.3


def server_env() -> dict[str, str]:
    """The child's environment: one torch thread (2-core CI), the token, the repo importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env[TOKEN_ENV] = TOKEN
    return env


def start_server(log_dir: Path, name: str, port: int, **options) -> ServerProcess:
    """Launch without waiting; the caller waits (so several can start in parallel)."""
    return launch_server(
        SPECS, port=port, log_path=log_dir / f"{name}.log", max_batch=SERVER_MAX_BATCH,
        env=server_env(), cwd=ROOT, **options,
    )


@dataclass(frozen=True)
class Servers:
    plain: ServerProcess  # no token, no delay
    slow: ServerProcess  # token TOKEN and SLOW_DELAY_S per request


@pytest.fixture(scope="session")
def servers(tmp_path_factory) -> Iterator[Servers]:
    log_dir = tmp_path_factory.mktemp("reward-server-logs")
    started = []
    try:
        started.append(start_server(log_dir, "plain", free_port()))
        started.append(start_server(log_dir, "slow", free_port(), delay_s=SLOW_DELAY_S, token_env=TOKEN_ENV))
        for server in started:
            server.wait_until_healthy()
        yield Servers(plain=started[0], slow=started[1])
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="session")
def server(servers) -> ServerProcess:
    return servers.plain


@pytest.fixture(scope="session")
def slow_server(servers) -> ServerProcess:
    return servers.slow


def grid_images(batch: int, size: int = 8, seed: int = 0) -> torch.Tensor:
    """[B, 3, H, W] on the 1/255 grid, so the uint8 wire format is lossless."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), generator=generator).float() / 255.0


def http(base_url: str, path: str, body: bytes | dict | None = None, token: str | None = None) -> tuple[int, dict]:
    """One raw request (POST when ``body`` is given) -> (status, JSON body)."""
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(base_url + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
