"""Benchmark of the reward server: throughput vs in-process, and latency hidden by the client.

Not a test: it measures, it does not assert. Run from the repository root:

    .venv/bin/python -m bench.reward_server --output results/reward_server_bench.json

By default it scores with a stand-in reward, ``tests.rewards.fake_rewards:conv_net``
(a fixed random two-layer conv net: real but small compute), because the real
reward models are not trained here; pass ``--reward module:factory`` to measure
a real one. Two numbers come out:

* throughput (images/s) for each batch size: the reward called in this process,
  vs the same reward behind the server through :class:`RewardClient`, one
  request at a time and with ``max_in_flight`` requests overlapping. The
  difference is the cost of the wire (uint8 + base64 + JSON + HTTP on loopback).
* latency hiding: a server with an injected delay D per request, and a trainer
  loop of N batches that "generates" for G seconds per batch. Timed three ways:
  generation only, sequential (generate then wait for the score), pipelined
  (submit batch i, generate batch i+1, then collect i). We report
  ``hidden_fraction = 1 - (pipelined - generation_only) / (N * D)``: the share of
  the injected latency that no longer costs wall time. With G >= D its ceiling
  is 1 - 1/N, since the last batch's score has nothing left to overlap with.
  Generation is simulated by sleeping (``sleep``) and by busy torch compute
  (``compute``), which competes with the server for the CPU.

Torch runs with ``--threads`` (default 1) threads in this process and in the
server: on a small shared machine, more intra-op threads than free cores make
a small conv net up to ~100x slower (measured on the 2-core dev box), which
would swamp what is being measured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from flowrl.machine import machine_info
from flowrl.rewards.client import RewardClient
from flowrl.rewards.server import ServerProcess, free_port, launch_server, load_reward

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REWARD = "tests.rewards.fake_rewards:conv_net"


@dataclass(frozen=True)
class ThroughputRow:
    """Images per second at one batch size."""

    batch_size: int
    in_process: float
    server_sequential: float
    server_overlapped: float


@dataclass(frozen=True)
class HidingRow:
    """One latency-hiding measurement (seconds, except the fraction)."""

    generation: str
    batches: int
    generate_s: float
    delay_s: float
    generation_only_s: float
    sequential_s: float
    pipelined_s: float
    hidden_fraction: float
    ceiling: float


def images_per_second(step: Callable[[], None], images_per_step: int, min_s: float, min_steps: int) -> float:
    """Run ``step`` (after one warm-up) for at least ``min_s`` and ``min_steps``; images/s."""
    step()
    steps, start = 0, time.perf_counter()
    while steps < min_steps or time.perf_counter() - start < min_s:
        step()
        steps += 1
    return steps * images_per_step / (time.perf_counter() - start)


def start(log_dir: Path, name: str, spec: str, threads: int, **options) -> ServerProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    server = launch_server({"bench": spec}, port=free_port(), log_path=log_dir / f"{name}.log", env=env, cwd=ROOT,
                           **options)
    try:
        server.wait_until_healthy(timeout_s=60)
    except BaseException:
        server.stop()
        raise
    return server


def measure_throughput(args: argparse.Namespace, base_url: str) -> list[ThroughputRow]:
    """In-process vs server images/s for each batch size."""
    reward = load_reward(args.reward, {})
    rows = []
    for batch in args.batch_sizes:
        images = torch.rand(batch, 3, args.image_size, args.image_size, generator=torch.Generator().manual_seed(batch))
        prompts = [f"benchmark prompt {i}" for i in range(batch)]

        def local() -> None:
            with torch.inference_mode():
                reward.score(images, prompts)

        with RewardClient(base_url, "bench", max_batch=args.max_batch, max_in_flight=1) as client:
            sequential = images_per_second(lambda: client.score(images, prompts), batch, args.min_s, args.min_steps)
        with RewardClient(base_url, "bench", max_batch=args.max_batch, max_in_flight=args.max_in_flight) as client:

            def overlapped() -> None:
                futures = [client.submit(images, prompts) for _ in range(args.max_in_flight * 2)]
                for future in futures:
                    future.result()

            overlapped_rate = images_per_second(overlapped, batch * args.max_in_flight * 2, args.min_s, 1)
        rows.append(ThroughputRow(batch, images_per_second(local, batch, args.min_s, args.min_steps),
                                  sequential, overlapped_rate))
        print(rows[-1], flush=True)
    return rows


def _generator(kind: str, seconds: float) -> Callable[[], None]:
    """A stand-in for the sampler: sleep, or keep one core busy with matmuls."""
    if kind == "sleep":
        return lambda: time.sleep(seconds)
    matrix = torch.randn(256, 256)

    def compute() -> None:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            matrix @ matrix
    return compute


def measure_hiding(args: argparse.Namespace, base_url: str, kind: str) -> HidingRow:
    """Generation only, sequential and pipelined wall times of one trainer-like loop."""
    generate = _generator(kind, args.generate_s)
    images = torch.rand(args.hiding_batch, 3, args.image_size, args.image_size)
    prompts = [f"benchmark prompt {i}" for i in range(args.hiding_batch)]
    batches = args.batches
    with RewardClient(base_url, "bench", max_batch=args.max_batch, max_in_flight=2) as client:
        client.score(images, prompts)  # warm the connection
        start = time.perf_counter()
        for _ in range(batches):
            generate()
        generation_only = time.perf_counter() - start

        start = time.perf_counter()
        for _ in range(batches):
            generate()
            client.score(images, prompts)
        sequential = time.perf_counter() - start

        start = time.perf_counter()
        previous = None
        for _ in range(batches):
            generate()
            current = client.submit(images, prompts)
            if previous is not None:
                previous.result()
            previous = current
        previous.result()
        pipelined = time.perf_counter() - start
    hidden = 1.0 - (pipelined - generation_only) / (batches * args.delay_s)
    return HidingRow(kind, batches, args.generate_s, args.delay_s, generation_only, sequential, pipelined,
                     hidden, 1.0 - 1.0 / batches)


def machine_of_this_bench() -> dict:
    return {
        **machine_info(),
        "load_average_1min": os.getloadavg()[0],
        "python": sys.version.split()[0],
        "note": "server and client share this machine; loopback HTTP",
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=ROOT / "results" / "reward_server_bench.json")
    parser.add_argument("--reward", default=DEFAULT_REWARD, help="module:factory of the reward to serve")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-in-flight", type=int, default=2)
    parser.add_argument("--min-s", type=float, default=2.0, help="minimum timing window per throughput number")
    parser.add_argument("--min-steps", type=int, default=5)
    parser.add_argument("--delay-s", type=float, default=0.2, help="injected server latency for the hiding test")
    parser.add_argument("--generate-s", type=float, default=0.2, help="simulated generation time per batch")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the in-process reward and for the server (OMP_NUM_THREADS)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--hiding-batch", type=int, default=16)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as log_dir:
        server = start(Path(log_dir), "plain", args.reward, args.threads, max_batch=args.max_batch)
        try:
            throughput = measure_throughput(args, server.base_url)
        finally:
            server.stop()
        server = start(Path(log_dir), "delayed", args.reward, args.threads, max_batch=args.max_batch, delay_s=args.delay_s)
        try:
            hiding = [measure_hiding(args, server.base_url, kind) for kind in ("sleep", "compute")]
        finally:
            server.stop()
    result = {
        "reward": args.reward,
        "reward_note": "stand-in reward from tests/rewards/fake_rewards.py unless --reward names a real one",
        "image_size": args.image_size,
        "wire": "uint8 HWC, base64 in JSON, HTTP/1.1 on loopback",
        "throughput_images_per_s": [asdict(row) for row in throughput],
        "latency_hiding": [asdict(row) for row in hiding],
        "hidden_fraction_definition": "1 - (pipelined_s - generation_only_s) / (batches * delay_s)",
        "machine": machine_of_this_bench(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["latency_hiding"], indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
