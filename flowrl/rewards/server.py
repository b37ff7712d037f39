"""HTTP reward server: load reward models once, score batches for remote trainers.

Reward models (a VLM scorer, a face-embedding model) are large and slow to
load; GRPO runs for T2I and edit share them, and scoring should overlap with
generation. So the rewards live in one long-running process and trainers talk
to it through :class:`flowrl.rewards.client.RewardClient`.

HTTP schema (JSON in, JSON out)::

    POST /score/{reward}
      Authorization: Bearer <token>        only when the server has a token
      {
        "prompts": ["a red circle", ...],  B non-blank strings
        "images":  {"shape": [B, H, W, 3], "dtype": "uint8", "data": "<base64>"},
        "sources": {"shape": [B, H2, W2, 3], "dtype": "uint8", "data": "<base64>"}
                   or null / absent        the edit's source images
      }
      -> 200 {"scores": [B floats], "components": {"<name>": [B floats], ...}}

    GET /health
      -> 200 {"status": "ok", "max_batch": 64,
              "rewards": {"t2i": {"sources": "forbidden"}, ...}}

``data`` is standard base64 (RFC 4648, padded) of the B*H*W*3 pixel bytes in
C order (batch, row, column, RGB). Only ``uint8`` is accepted: it is what a
decoded image is, it is 4x smaller than float32, and every byte is a pixel
value in 0..255, so NaN or out-of-range pixels cannot be sent at all. The
reward sees ``pixels / 255`` as a [B, 3, H, W] float tensor.

Errors are ``{"detail": "<field>: <what is wrong>"}``: 400 malformed JSON,
401 missing or wrong token, 404 unknown reward, 413 batch larger than
``max_batch``, 422 an invalid field (missing, wrong type, shape, dtype, byte
count, blank prompt, prompt/image count mismatch, sources given to a reward
that takes none or missing where required), 500 the reward raised or returned
a non-finite or out-of-range score. ``/health`` needs no token.

A reward may declare two optional attributes that the server enforces:
``uses_sources: bool`` (True: sources required; False: refused; absent: either)
and ``score_range: tuple[float, float]`` (totals outside it are a 500).

Run it with ``python -m flowrl.rewards.server --port N --reward NAME=module:factory``
(see ``--help``); it binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import hmac
import importlib
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool

from flowrl.rewards.base import RewardModel, RewardScores

DEFAULT_HOST = "127.0.0.1"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")


class SourcePolicy(str, Enum):
    """Whether a reward needs the edit's source images."""

    REQUIRED = "required"
    FORBIDDEN = "forbidden"
    OPTIONAL = "optional"


@dataclass(frozen=True)
class ServedReward:
    """A loaded reward plus what the server enforces around it."""

    model: RewardModel
    sources: SourcePolicy
    score_range: tuple[float, float] | None
    lock: threading.Lock  # one scoring call per model at a time: models need not be thread-safe


@dataclass(frozen=True)
class ServerSettings:
    """Per-server knobs; ``delay_s`` is injected latency for tests and benchmarks."""

    max_batch: int
    token: str | None
    delay_s: float


class ImageBatchPayload(BaseModel):
    """A uint8 [B, H, W, 3] array on the wire (see the module docstring)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    shape: list[int]
    dtype: str
    data: str


class ScoreRequest(BaseModel):
    """The body of ``POST /score/{reward}``."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)
    prompts: list[str]
    images: ImageBatchPayload
    sources: ImageBatchPayload | None = None


def serve_reward(model: RewardModel) -> ServedReward:
    """Read the optional ``uses_sources`` / ``score_range`` declarations of a reward."""
    if not isinstance(model, RewardModel):
        raise TypeError(f"{type(model).__name__} does not implement RewardModel (score, score_components)")
    policy = SourcePolicy.OPTIONAL
    if hasattr(model, "uses_sources"):
        policy = SourcePolicy.REQUIRED if model.uses_sources else SourcePolicy.FORBIDDEN
    score_range = None
    if hasattr(model, "score_range"):
        low, high = model.score_range
        score_range = (float(low), float(high))
    return ServedReward(model=model, sources=policy, score_range=score_range, lock=threading.Lock())


def _field_error(status: int, field: str, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=f"{field}: {message}")


def _reject_json_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def parse_request(body: bytes) -> ScoreRequest:
    """Bytes -> validated request model; 400 for bad JSON, 422 naming the bad field."""
    try:
        data = json.loads(body, parse_constant=_reject_json_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _field_error(400, "body", f"malformed JSON ({exc})") from exc
    try:
        return ScoreRequest.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
            problems.append(f"{field or 'body'}: {error['msg']}")
        raise HTTPException(status_code=422, detail="; ".join(problems)) from exc


def decode_batch(payload: ImageBatchPayload, field: str, max_batch: int) -> torch.Tensor:
    """Wire array -> [B, 3, H, W] float in [0, 1], checking dtype, shape and byte count."""
    if payload.dtype != "uint8":
        raise _field_error(
            422, f"{field}.dtype", f"only 'uint8' pixels are accepted, got {payload.dtype!r} (uint8 cannot hold NaN)"
        )
    shape = payload.shape
    if len(shape) != 4 or shape[3] != 3:
        raise _field_error(422, f"{field}.shape", f"expected [B, H, W, 3] (rank 4, RGB last), got {shape}")
    if any(size < 1 for size in shape):
        raise _field_error(422, f"{field}.shape", f"every size must be >= 1 (batch size 0 is empty), got {shape}")
    if shape[0] > max_batch:
        raise _field_error(413, f"{field}.shape", f"batch of {shape[0]} exceeds this server's max_batch {max_batch}")
    expected = math.prod(shape)
    if len(payload.data) != 4 * math.ceil(expected / 3):  # checked before decoding: no huge allocation
        raise _field_error(422, f"{field}.data", f"base64 length {len(payload.data)} does not encode {expected} bytes")
    try:
        raw = base64.b64decode(payload.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _field_error(422, f"{field}.data", f"not valid base64 ({exc})") from exc
    if len(raw) != expected:
        raise _field_error(422, f"{field}.data", f"{len(raw)} bytes for shape {shape} (needs {expected})")
    pixels = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy())
    return pixels.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def check_prompts(prompts: list[str], batch: int) -> None:
    """One non-blank prompt per image."""
    if len(prompts) != batch:
        raise _field_error(422, "prompts", f"{len(prompts)} prompts for {batch} images")
    for index, prompt in enumerate(prompts):
        if not prompt.strip():
            raise _field_error(422, f"prompts[{index}]", "empty prompt")


def decode_sources(
    request: ScoreRequest, served: ServedReward, name: str, batch: int, max_batch: int
) -> torch.Tensor | None:
    """The source batch, enforcing the reward's declared source policy."""
    if request.sources is None:
        if served.sources is SourcePolicy.REQUIRED:
            raise _field_error(422, "sources", f"reward {name!r} needs the source images")
        return None
    if served.sources is SourcePolicy.FORBIDDEN:
        raise _field_error(422, "sources", f"reward {name!r} takes no source images")
    sources = decode_batch(request.sources, "sources", max_batch)
    if sources.shape[0] != batch:
        raise _field_error(422, "sources.shape", f"{sources.shape[0]} sources for {batch} images")
    return sources


def prepare_inputs(
    raw: bytes, served: ServedReward, name: str, max_batch: int
) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """Request bytes -> (prompts, images, sources) ready for the reward, or the 4xx that says why not."""
    request = parse_request(raw)
    images = decode_batch(request.images, "images", max_batch)
    check_prompts(request.prompts, images.shape[0])
    sources = decode_sources(request, served, name, images.shape[0], max_batch)
    return request.prompts, images, sources


def _values(name: str, label: str, tensor: torch.Tensor, batch: int) -> list[float]:
    """One reward output -> finite floats, or a 500 that says what was wrong."""
    values = torch.as_tensor(tensor).detach().to("cpu", torch.float64)
    if tuple(values.shape) != (batch,):
        raise HTTPException(500, f"reward {name!r} returned {label} of shape {list(values.shape)}, expected [{batch}]")
    bad = torch.nonzero(~torch.isfinite(values)).flatten().tolist()
    if bad:
        raise HTTPException(500, f"reward {name!r} returned non-finite {label} at indices {bad}")
    return values.tolist()


def encode_scores(name: str, served: ServedReward, scores: RewardScores, batch: int) -> dict:
    """RewardScores -> response body; never lets NaN, inf or out-of-range totals through."""
    if not isinstance(scores, RewardScores):
        raise HTTPException(500, f"reward {name!r} returned {type(scores).__name__}, not RewardScores")
    total = _values(name, "scores", scores.total, batch)
    if served.score_range is not None:
        low, high = served.score_range
        outside = [i for i, value in enumerate(total) if not low <= value <= high]
        if outside:
            raise HTTPException(500, f"reward {name!r} returned scores outside [{low}, {high}] at indices {outside}")
    components = {key: _values(name, f"component {key!r}", value, batch) for key, value in scores.components.items()}
    return {"scores": total, "components": components}


def _score_locked(served: ServedReward, images, prompts, sources) -> RewardScores:
    with served.lock, torch.inference_mode():
        return served.model.score_components(images, prompts, sources)


def _check_token(request: Request, token: str) -> None:
    header = request.headers.get("authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "authorization: missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})


def create_app(
    rewards: dict[str, RewardModel], *, max_batch: int, token: str | None = None, delay_s: float = 0.0
) -> FastAPI:
    """A FastAPI app serving ``rewards`` (name -> model, loaded once by the caller)."""
    if not rewards:
        raise ValueError("create_app needs at least one reward")
    for name in rewards:
        if not _NAME_PATTERN.match(name):
            raise ValueError(f"reward name {name!r} must match {_NAME_PATTERN.pattern} (it is a URL path segment)")
    if max_batch < 1 or delay_s < 0 or token == "":
        raise ValueError(f"need max_batch >= 1, delay_s >= 0 and a non-empty token, got {max_batch}, {delay_s}")
    settings = ServerSettings(max_batch=max_batch, token=token, delay_s=delay_s)
    served = {name: serve_reward(model) for name, model in rewards.items()}
    app = FastAPI(title="flowrl reward server")

    @app.get("/health")
    def health() -> dict:
        listing = {name: {"sources": entry.sources.value} for name, entry in served.items()}
        return {"status": "ok", "max_batch": settings.max_batch, "rewards": listing}

    @app.post("/score/{name}")
    async def score(name: str, request: Request) -> dict:
        if settings.token is not None:
            _check_token(request, settings.token)
        if name not in served:
            raise HTTPException(404, f"reward: unknown reward {name!r}; this server has {sorted(served)}")
        entry = served[name]
        raw = await request.body()
        # JSON and base64 of a large batch take a while: off the event loop, so /health stays responsive.
        prompts, images, sources = await run_in_threadpool(prepare_inputs, raw, entry, name, settings.max_batch)
        await asyncio.sleep(settings.delay_s)
        try:
            scores = await run_in_threadpool(_score_locked, entry, images, prompts, sources)
        except Exception as exc:  # any model failure is a 500 with its cause, and the server keeps serving
            raise HTTPException(500, f"reward {name!r} failed: {type(exc).__name__}: {exc}") from exc
        return encode_scores(name, entry, scores, len(prompts))

    return app


def load_reward(spec: str, kwargs: dict) -> RewardModel:
    """``module.path:factory`` -> the reward it returns when called with ``kwargs``."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"reward spec {spec!r} must look like 'package.module:factory'")
    factory = getattr(importlib.import_module(module_name), attribute)
    model = factory(**kwargs)
    if not isinstance(model, RewardModel):
        raise TypeError(f"{spec} returned {type(model).__name__}, which is not a RewardModel")
    return model


def _pairs(values: list[str], option: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise SystemExit(f"{option} {value!r}: expected NAME=VALUE")
        pairs[name] = rest
    return pairs


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flowrl.rewards.server``."""
    parser = argparse.ArgumentParser(prog="python -m flowrl.rewards.server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=DEFAULT_HOST, help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reward", action="append", required=True, metavar="NAME=module:factory")
    parser.add_argument("--reward-kwargs", action="append", default=[], metavar="NAME=JSON",
                        help="keyword arguments for NAME's factory, as a JSON object")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--token-env", metavar="VAR", help="require 'Authorization: Bearer $VAR' on /score")
    parser.add_argument("--delay-s", type=float, default=0.0, help="injected latency per request (tests, benchmarks)")
    parser.add_argument("--log-level", default="warning")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Load the rewards named on the command line, then serve them with uvicorn."""
    import uvicorn

    args = build_parser().parse_args(argv)
    specs = _pairs(args.reward, "--reward")
    kwargs = {name: json.loads(text) for name, text in _pairs(args.reward_kwargs, "--reward-kwargs").items()}
    unknown = set(kwargs) - set(specs)
    if unknown:
        raise SystemExit(f"--reward-kwargs for rewards not given with --reward: {sorted(unknown)}")
    token = None
    if args.token_env:
        token = os.environ.get(args.token_env, "")
        if not token:
            raise SystemExit(f"--token-env {args.token_env}: that environment variable is unset or empty")
    rewards = {name: load_reward(spec, kwargs.get(name, {})) for name, spec in specs.items()}
    app = create_app(rewards, max_batch=args.max_batch, token=token, delay_s=args.delay_s)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)


@dataclass(frozen=True)
class ServerProcess:
    """A reward server running as a child process (tests, benchmarks, sidecars)."""

    process: subprocess.Popen
    base_url: str
    log_path: Path

    def wait_until_healthy(self, timeout_s: float = 30.0) -> dict:
        """Poll /health until it answers; fail early, with the log, if the process died."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"reward server exited with {self.process.returncode}:\n{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/health", timeout=1.0) as response:
                    return json.loads(response.read())
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.05)
        raise TimeoutError(f"reward server at {self.base_url} not healthy after {timeout_s} s:\n{self._log_tail()}")

    def stop(self, timeout_s: float = 5.0) -> None:
        """Terminate, then kill if it does not exit in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else "(no log)"


def free_port(host: str = DEFAULT_HOST) -> int:
    """A port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def launch_server(
    rewards: dict[str, str],
    *,
    port: int,
    log_path: Path,
    host: str = DEFAULT_HOST,
    max_batch: int = 64,
    delay_s: float = 0.0,
    token_env: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    reward_kwargs: dict[str, dict] | None = None,
) -> ServerProcess:
    """Start ``python -m flowrl.rewards.server`` without waiting; ``rewards`` is name -> spec,
    ``reward_kwargs`` name -> the factory's keyword arguments (JSON-serialisable)."""
    command = [sys.executable, "-m", "flowrl.rewards.server", "--host", host, "--port", str(port)]
    command += ["--max-batch", str(max_batch), "--delay-s", str(delay_s)]
    for name, spec in rewards.items():
        command += ["--reward", f"{name}={spec}"]
    for name, kwargs in (reward_kwargs or {}).items():
        command += ["--reward-kwargs", f"{name}={json.dumps(kwargs)}"]
    if token_env is not None:
        command += ["--token-env", token_env]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    return ServerProcess(process=process, base_url=f"http://{host}:{port}", log_path=log_path)


if __name__ == "__main__":
    main()
