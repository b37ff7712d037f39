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
      -> 200 {"status": "ok", "max_batch": 64, "max_body_bytes": ..., "image_size": [H, W] or null,
              "rewards": {"t2i": {"sources": "forbidden"}, ...}}

``data`` is standard base64 (RFC 4648, padded) of the B*H*W*3 pixel bytes in
C order (batch, row, column, RGB). Only ``uint8`` is accepted: it is what a
decoded image is, it is 4x smaller than float32, and every byte is a pixel
value in 0..255, so NaN or out-of-range pixels cannot be sent at all. The
reward sees ``pixels / 255`` as a [B, 3, H, W] float tensor. A prompt is at
most ``MAX_PROMPT_CHARS`` characters with no control character (other than
tab, newline, carriage return) and no lone surrogate. With ``--image-size HxW``
every image and source must be H x W; without it, any size the body cap allows.

Errors are ``{"detail": "<field>: <what is wrong>"}``, at most
``MAX_DETAIL_CHARS`` long with echoed values cut to ``MAX_ECHO_CHARS``:
400 a body that is not JSON, is nested deeper than ``MAX_JSON_DEPTH`` or holds
more than ``MAX_JSON_VALUES`` values, 401 missing or wrong token, 404 unknown
reward, 413 a body over the byte cap (refused from its Content-Length, or as
soon as the stream passes the cap, before it is all read) or a batch larger
than ``max_batch``, 422 an invalid field (missing, wrong type, shape, size,
dtype, byte count, blank, overlong or control-character prompt, a prompt the
reward cannot categorise, prompt/image count mismatch, sources given to a
reward that takes none or missing where required), 500 the reward raised or
returned a non-finite or out-of-range score. ``/health`` needs no token and
reports the limits. ``/openapi.json`` describes all of it, request body included.

The byte cap (``--max-body-bytes``) defaults to the largest legitimate request
when ``--image-size`` is given (``max_batch`` images and as many sources at
that size, plus ``max_batch`` prompts of the longest allowed length at the
worst JSON escaping; :func:`request_body_limit`), else to
``DEFAULT_MAX_BODY_BYTES``.

A reward may declare optional attributes that the server enforces:
``uses_sources: bool`` (True: sources required; False: refused; absent: either;
a reward with ``components`` and no declaration of its own needs sources when
any component does, and refuses them when every component does),
``score_range: tuple[float, float]`` (totals outside it are a 500) and
``categorize(prompt)`` (a composite's: the server calls it on every prompt
before scoring, and a ValueError there is a 422 naming the prompt).

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
import logging
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi import Path as PathParam
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from flowrl.rewards.base import RewardModel, RewardScores

logger = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")

DEFAULT_MAX_BODY_BYTES = 64 * 2**20  # the cap when the image size is not known
MAX_PROMPT_CHARS = 10_000  # far above any real prompt; bounds tokenizer work and the body cap
MAX_JSON_DEPTH = 16  # a valid body nests 3 deep (body -> images -> shape)
MAX_JSON_VALUES = 100_000  # a valid body holds max_batch prompts and a dozen other values
MAX_ECHO_CHARS = 200  # a value quoted back in an error message is cut to this
MAX_DETAIL_CHARS = 1000  # and a whole error message to this
_JSON_CHARS_PER_PROMPT_CHAR = 12  # worst case: an astral character escaped as two \uXXXX
_BODY_OVERHEAD_BYTES = 4096  # keys, shapes, dtype, punctuation, whitespace
_BAD_PROMPT_CHAR = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
_PROMPT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"  # the JSON-schema form (surrogates: see the text)
_BASE64_PATTERN = r"^[A-Za-z0-9+/]*={0,2}$"


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
    max_body_bytes: int
    image_size: tuple[int, int] | None  # (H, W) every image and source must have, or None: any


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


class ScoreResponse(BaseModel):
    """A 200 answer of ``POST /score/{reward}`` (documentation: the handler builds it as a dict)."""

    scores: list[float]
    components: dict[str, list[float]]


class HealthResponse(BaseModel):
    """The answer of ``GET /health``: the limits a client must respect, and each reward's source policy."""

    status: str
    max_batch: int
    max_body_bytes: int
    image_size: list[int] | None
    rewards: dict[str, dict[str, str]]


class ErrorResponse(BaseModel):
    """Every refusal: ``"<field>: <what is wrong>"``."""

    detail: str


def request_body_limit(max_batch: int, image_size: tuple[int, int]) -> int:
    """Bytes of the largest legitimate ``/score`` body: ``max_batch`` images and as many
    sources of ``image_size`` (H, W) in base64, and ``max_batch`` prompts of
    ``MAX_PROMPT_CHARS`` at the worst JSON escaping."""
    height, width = image_size
    pixels = max_batch * height * width * 3
    base64_bytes = 4 * -(-pixels // 3)
    prompt_bytes = max_batch * (MAX_PROMPT_CHARS * _JSON_CHARS_PER_PROMPT_CHAR + 4)
    return 2 * base64_bytes + prompt_bytes + _BODY_OVERHEAD_BYTES


def _declared_sources(model: object) -> SourcePolicy:
    if hasattr(model, "uses_sources"):
        return SourcePolicy.REQUIRED if model.uses_sources else SourcePolicy.FORBIDDEN
    parts = getattr(model, "components", None)
    if not isinstance(parts, Mapping) or not parts:
        return SourcePolicy.OPTIONAL
    policies = {_declared_sources(part) for part in parts.values()}
    if {SourcePolicy.REQUIRED, SourcePolicy.FORBIDDEN} <= policies:
        raise ValueError(f"{type(model).__name__}: some components need source images and others refuse them")
    if SourcePolicy.REQUIRED in policies:
        return SourcePolicy.REQUIRED
    return SourcePolicy.FORBIDDEN if policies == {SourcePolicy.FORBIDDEN} else SourcePolicy.OPTIONAL


def serve_reward(model: RewardModel) -> ServedReward:
    """Read the optional ``uses_sources`` / ``score_range`` declarations of a reward."""
    if not isinstance(model, RewardModel):
        raise TypeError(f"{type(model).__name__} does not implement RewardModel (score, score_components)")
    score_range = None
    if hasattr(model, "score_range"):
        low, high = model.score_range
        score_range = (float(low), float(high))
    return ServedReward(model=model, sources=_declared_sources(model), score_range=score_range, lock=threading.Lock())


def shown(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` for an error message, cut to ``limit`` characters (a client's value may be huge)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _clip(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... (cut from {len(text)} characters)"


def _field_error(status: int, field: str, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=f"{_clip(field, MAX_ECHO_CHARS)}: {message}")


def _reject_json_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _depth(data: object) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, level)
            if level > MAX_JSON_DEPTH:
                break
            stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _load_json(body: bytes) -> object:
    """Bytes -> JSON value; 400 for anything that is not JSON or that is JSON built to exhaust us."""
    # Every JSON value after a container's first follows a comma, so this bounds the values
    # json.loads would build: 64 MiB of "[],[],..." would otherwise be gigabytes of Python lists.
    values = body.count(b",") + body.count(b"[") + body.count(b"{") + 1
    if values > MAX_JSON_VALUES:
        raise _field_error(400, "body", f"more than {MAX_JSON_VALUES} JSON values")
    try:
        data = json.loads(body, parse_constant=_reject_json_constant)
    except RecursionError as exc:
        raise _field_error(400, "body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise _field_error(400, "body", f"malformed JSON ({_clip(str(exc), MAX_ECHO_CHARS)})") from exc
    if _depth(data) > MAX_JSON_DEPTH:
        raise _field_error(400, "body", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return data


_ARRAY_FIELDS = ("shape", "dtype", "data")


def _check_sizes(data: object, max_batch: int | None) -> None:
    """Refuse oversized containers before pydantic, which reports one error per bad item."""
    if not isinstance(data, dict):
        return
    prompts = data.get("prompts")
    if isinstance(prompts, list) and max_batch is not None and len(prompts) > max_batch:
        raise _field_error(413, "prompts", f"{len(prompts)} prompts exceed this server's max_batch {max_batch}")
    for prefix, node, allowed in (("", data, tuple(ScoreRequest.model_fields)),
                                  ("images.", data.get("images"), _ARRAY_FIELDS),
                                  ("sources.", data.get("sources"), _ARRAY_FIELDS)):
        if not isinstance(node, dict):
            continue
        unknown = [key for key in node if key not in allowed]
        if unknown:
            key, more = unknown[0], f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            parent = prefix.rstrip(".") or "body"
            field = f"{prefix}{key}" if _NAME_PATTERN.match(key) else f"{parent}[{shown(key, 60)}]"
            raise _field_error(422, field, f"unknown field{more}; allowed: {list(allowed)}")
        shape = node.get("shape") if prefix else None
        if isinstance(shape, list) and len(shape) != 4:
            raise _field_error(422, f"{prefix}shape",
                               f"expected [B, H, W, 3] (rank 4, RGB last), got rank {len(shape)}")


def parse_request(body: bytes, max_batch: int | None = None) -> ScoreRequest:
    """Bytes -> validated request model; 400 for bad JSON, 413 more prompts than ``max_batch``
    (None: no limit), 422 naming the bad field."""
    data = _load_json(body)
    _check_sizes(data, max_batch)
    try:
        return ScoreRequest.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_input=False, include_url=False):
            field = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error["loc"]).lstrip(".")
            problems.append(f"{_clip(field, MAX_ECHO_CHARS) or 'body'}: {error['msg']}")
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise HTTPException(status_code=422, detail="; ".join(problems[:5]) + more) from exc


def decode_batch(
    payload: ImageBatchPayload, field: str, max_batch: int, image_size: tuple[int, int] | None = None
) -> torch.Tensor:
    """Wire array -> [B, 3, H, W] float in [0, 1], checking dtype, shape, size and byte count."""
    if payload.dtype != "uint8":
        raise _field_error(
            422, f"{field}.dtype",
            f"only 'uint8' pixels are accepted, got {shown(payload.dtype)} (uint8 cannot hold NaN)",
        )
    shape = payload.shape
    if len(shape) != 4 or shape[3] != 3:
        raise _field_error(422, f"{field}.shape", f"expected [B, H, W, 3] (rank 4, RGB last), got {shown(shape)}")
    if any(size < 1 for size in shape):
        raise _field_error(422, f"{field}.shape",
                           f"every size must be >= 1 (batch size 0 is empty), got {shown(shape)}")
    if shape[0] > max_batch:
        raise _field_error(413, f"{field}.shape", f"batch of {shape[0]} exceeds this server's max_batch {max_batch}")
    if image_size is not None and tuple(shape[1:3]) != image_size:
        raise _field_error(422, f"{field}.shape", f"this server scores {image_size[0]} x {image_size[1]} images "
                                                  f"([B, {image_size[0]}, {image_size[1]}, 3]), got {shown(shape)}")
    expected = math.prod(shape)
    if len(payload.data) != 4 * -(-expected // 3):  # checked before decoding: no huge allocation
        raise _field_error(422, f"{field}.data", f"base64 length {len(payload.data)} does not encode "
                                                 f"{shown(expected, 40)} bytes")
    try:
        raw = base64.b64decode(payload.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise _field_error(422, f"{field}.data", f"not valid base64 ({exc})") from exc
    if len(raw) != expected:
        raise _field_error(422, f"{field}.data", f"{len(raw)} bytes for shape {shape} (needs {expected})")
    pixels = torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy())
    return pixels.permute(0, 3, 1, 2).float().div_(255.0).contiguous()


def check_prompts(prompts: list[str], batch: int) -> None:
    """One non-blank prompt per image, each of bounded length and free of control characters."""
    if len(prompts) != batch:
        raise _field_error(422, "prompts", f"{len(prompts)} prompts for {batch} images")
    for index, prompt in enumerate(prompts):
        if not prompt.strip():
            raise _field_error(422, f"prompts[{index}]", "empty prompt")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise _field_error(422, f"prompts[{index}]", f"{len(prompt)} characters, more than {MAX_PROMPT_CHARS}")
        bad = _BAD_PROMPT_CHAR.search(prompt)
        if bad:
            kind = "a lone surrogate" if "\ud800" <= bad.group() <= "\udfff" else "a control character"
            raise _field_error(422, f"prompts[{index}]",
                               f"{kind} U+{ord(bad.group()):04X} at position {bad.start()}")


def categorize_prompts(served: ServedReward, name: str, prompts: list[str]) -> None:
    """Prompts a composite cannot categorise (``categorize`` raises ValueError) are the client's mistake."""
    categorize = getattr(served.model, "categorize", None)
    if not callable(categorize):
        return
    for index, prompt in enumerate(prompts):
        try:
            categorize(prompt)
        except ValueError as exc:
            raise _field_error(422, f"prompts[{index}]",
                               f"reward {name!r} cannot use this prompt: {_clip(str(exc), MAX_ECHO_CHARS)}") from exc


def decode_sources(
    request: ScoreRequest, served: ServedReward, name: str, batch: int, max_batch: int,
    image_size: tuple[int, int] | None = None,
) -> torch.Tensor | None:
    """The source batch, enforcing the reward's declared source policy."""
    if request.sources is None:
        if served.sources is SourcePolicy.REQUIRED:
            raise _field_error(422, "sources", f"reward {name!r} needs the source images")
        return None
    if served.sources is SourcePolicy.FORBIDDEN:
        raise _field_error(422, "sources", f"reward {name!r} takes no source images")
    sources = decode_batch(request.sources, "sources", max_batch, image_size)
    if sources.shape[0] != batch:
        raise _field_error(422, "sources.shape", f"{sources.shape[0]} sources for {batch} images")
    return sources


def prepare_inputs(
    raw: bytes, served: ServedReward, name: str, max_batch: int, image_size: tuple[int, int] | None = None
) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """Request bytes -> (prompts, images, sources) ready for the reward, or the 4xx that says why not."""
    request = parse_request(raw, max_batch)
    images = decode_batch(request.images, "images", max_batch, image_size)
    check_prompts(request.prompts, images.shape[0])
    sources = decode_sources(request, served, name, images.shape[0], max_batch, image_size)
    categorize_prompts(served, name, request.prompts)
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


async def read_body(request: Request, limit: int) -> bytearray:
    """The request body, refused with a 413 from its declared length or as soon as the stream
    passes ``limit`` bytes, so an oversized body is never held in memory."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise _field_error(413, "body", f"{int(declared)} bytes exceed this server's limit of {limit} "
                                        "(--max-body-bytes)")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _field_error(413, "body", f"more than this server's limit of {limit} bytes (--max-body-bytes)")
    return body


def _image_schema(settings: ServerSettings, what: str) -> dict:
    batch = {"type": "integer", "minimum": 1, "maximum": settings.max_batch}
    if settings.image_size is None:
        side = {"type": "integer", "minimum": 1}
        height = width = side
    else:
        height, width = ({"type": "integer", "const": size} for size in settings.image_size)
    return {
        "type": "object",
        "description": f"{what}: uint8 pixels, [B, H, W, 3] in C order, base64 of the B*H*W*3 bytes",
        "required": ["shape", "dtype", "data"],
        "additionalProperties": False,
        "properties": {
            "shape": {"type": "array", "prefixItems": [batch, height, width, {"type": "integer", "const": 3}],
                      "items": False, "minItems": 4, "maxItems": 4},
            "dtype": {"type": "string", "enum": ["uint8"]},
            "data": {"type": "string", "pattern": _BASE64_PATTERN, "contentEncoding": "base64"},
        },
    }


def _example_body(settings: ServerSettings, policy: SourcePolicy) -> dict:
    """A valid request of one 8 x 8 (or the server's size) mid-grey image (and source, where the
    reward needs one), for the schema's examples."""
    height, width = settings.image_size or (8, 8)
    array = {"shape": [1, height, width, 3], "dtype": "uint8",
             "data": base64.b64encode(bytes([128]) * (height * width * 3)).decode("ascii")}
    body = {"prompts": ["a red circle"], "images": array}
    if policy is SourcePolicy.REQUIRED:
        body["sources"] = array
    return body


def request_schema(settings: ServerSettings) -> dict:
    """The JSON schema of a ``/score`` body under these settings (see the module docstring)."""
    prompt = {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS, "pattern": _PROMPT_PATTERN,
              "description": "not blank; no control character but tab, newline, carriage return; no lone surrogate"}
    return {
        "type": "object",
        "required": ["prompts", "images"],
        "additionalProperties": False,
        "properties": {
            "prompts": {"type": "array", "items": prompt, "minItems": 1, "maxItems": settings.max_batch,
                        "description": "one prompt per image"},
            "images": _image_schema(settings, "the images to score"),
            "sources": {"anyOf": [_image_schema(settings, "the edit's source images, one per image"),
                                  {"type": "null"}]},
        },
    }


def _score_docs(settings: ServerSettings, served: dict[str, ServedReward]) -> dict:
    """The OpenAPI ``responses`` and request body of ``POST /score/{name}`` (route keyword arguments)."""
    statuses = {
        400: "the body is not JSON, or is nested too deeply or holds too many values",
        404: "no reward of that name on this server",
        413: f"the body is over {settings.max_body_bytes} bytes, or the batch over max_batch {settings.max_batch}",
        422: "a field is missing, of the wrong type, or invalid; the detail names it",
        500: "the reward failed or returned a non-finite or out-of-range score",
    }
    if settings.token is not None:
        statuses[401] = "missing or wrong bearer token"
    responses = {status: {"model": ErrorResponse, "description": text} for status, text in statuses.items()}
    responses[200] = {"model": ScoreResponse, "description": "one score per image, and each component"}
    examples = {name: {"summary": f"a valid request for {name!r}", "value": _example_body(settings, entry.sources)}
                for name, entry in served.items()}
    body = {"schema": request_schema(settings), "examples": examples}
    return {"responses": responses,
            "openapi_extra": {"requestBody": {"required": True, "content": {"application/json": body}}}}


def _server_settings(
    rewards: dict[str, RewardModel], max_batch: int, token: str | None, delay_s: float,
    max_body_bytes: int | None, image_size: tuple[int, int] | None,
) -> ServerSettings:
    """Checked settings, with the body cap defaulted (see the module docstring)."""
    if not rewards:
        raise ValueError("create_app needs at least one reward")
    for name in rewards:
        if not _NAME_PATTERN.match(name):
            raise ValueError(f"reward name {name!r} must match {_NAME_PATTERN.pattern} (it is a URL path segment)")
    if max_batch < 1 or delay_s < 0 or token == "":
        raise ValueError(f"need max_batch >= 1, delay_s >= 0 and a non-empty token, got {max_batch}, {delay_s}")
    if image_size is not None:
        image_size = tuple(int(size) for size in image_size)
        if len(image_size) != 2 or min(image_size) < 1:
            raise ValueError(f"image_size must be (height, width) >= 1, got {image_size}")
    if max_body_bytes is None:
        max_body_bytes = DEFAULT_MAX_BODY_BYTES if image_size is None else request_body_limit(max_batch, image_size)
    if max_body_bytes < 1:
        raise ValueError(f"max_body_bytes must be >= 1, got {max_body_bytes}")
    return ServerSettings(max_batch=max_batch, token=token, delay_s=delay_s, max_body_bytes=max_body_bytes,
                          image_size=image_size)


def _install_error_handlers(app: FastAPI) -> None:
    """Every error a JSON ``{"detail": ...}`` of bounded length, an unexpected one included."""

    @app.exception_handler(StarletteHTTPException)
    async def refused(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": _clip(str(exc.detail))}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception) -> JSONResponse:
        logger.error("reward server: %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": _clip(f"server error: {type(exc).__name__}: {exc}")}, status_code=500)


def _install_openapi(app: FastAPI, settings: ServerSettings) -> None:
    """FastAPI's schema, plus the bearer scheme on ``/score`` when the server has a token."""

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            if settings.token is not None:
                schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
                schemes["bearer"] = {"type": "http", "scheme": "bearer"}
                schema["paths"]["/score/{name}"]["post"]["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def create_app(
    rewards: dict[str, RewardModel], *, max_batch: int, token: str | None = None, delay_s: float = 0.0,
    max_body_bytes: int | None = None, image_size: tuple[int, int] | None = None,
) -> FastAPI:
    """A FastAPI app serving ``rewards`` (name -> model, loaded once by the caller).

    ``image_size`` (H, W): the size every image and source must have (None: any);
    ``max_body_bytes``: the request body cap (None: see the module docstring)."""
    settings = _server_settings(rewards, max_batch, token, delay_s, max_body_bytes, image_size)
    served = {name: serve_reward(model) for name, model in rewards.items()}
    app = FastAPI(title="flowrl reward server", version="1")
    _install_error_handlers(app)

    @app.get("/health", response_model=None,
             responses={200: {"model": HealthResponse, "description": "the server's limits and rewards"}})
    def health() -> dict:
        listing = {name: {"sources": entry.sources.value} for name, entry in served.items()}
        size = None if settings.image_size is None else list(settings.image_size)
        return {"status": "ok", "max_batch": settings.max_batch, "max_body_bytes": settings.max_body_bytes,
                "image_size": size, "rewards": listing}

    @app.post("/score/{name}", response_model=None, **_score_docs(settings, served))
    async def score(
        request: Request,
        name: str = PathParam(description="the reward's name", json_schema_extra={"enum": sorted(served)}),
    ) -> dict:
        if settings.token is not None:
            _check_token(request, settings.token)
        if name not in served:
            raise HTTPException(404, f"reward: unknown reward {shown(name)}; this server has {sorted(served)}")
        entry = served[name]
        raw = await read_body(request, settings.max_body_bytes)
        # JSON and base64 of a large batch take a while: off the event loop, so /health stays responsive.
        prompts, images, sources = await run_in_threadpool(
            prepare_inputs, raw, entry, name, settings.max_batch, settings.image_size
        )
        del raw
        await asyncio.sleep(settings.delay_s)
        try:
            scores = await run_in_threadpool(_score_locked, entry, images, prompts, sources)
        except Exception as exc:  # any model failure is a 500 with its cause, and the server keeps serving
            raise HTTPException(500, f"reward {name!r} failed: {type(exc).__name__}: {_clip(str(exc), 500)}") from exc
        return encode_scores(name, entry, scores, len(prompts))

    _install_openapi(app, settings)
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


def _image_size(text: str) -> tuple[int, int]:
    height, sep, width = text.lower().partition("x")
    if not sep or not height.isdigit() or not width.isdigit() or int(height) < 1 or int(width) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEIGHTxWIDTH, e.g. 1024x1024")
    return int(height), int(width)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m flowrl.rewards.server``."""
    parser = argparse.ArgumentParser(prog="python -m flowrl.rewards.server", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=DEFAULT_HOST, help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reward", action="append", required=True, metavar="NAME=module:factory")
    parser.add_argument("--reward-kwargs", action="append", default=[], metavar="NAME=JSON",
                        help="keyword arguments for NAME's factory, as a JSON object")
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--image-size", type=_image_size, metavar="HxW",
                        help="the size every image and source must have (default: any the body cap allows)")
    parser.add_argument("--max-body-bytes", type=int, metavar="N",
                        help="request body cap (default: the largest legitimate request at --image-size and "
                             f"--max-batch, or {DEFAULT_MAX_BODY_BYTES} without --image-size)")
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
    app = create_app(rewards, max_batch=args.max_batch, token=token, delay_s=args.delay_s,
                     max_body_bytes=args.max_body_bytes, image_size=args.image_size)
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
    image_size: tuple[int, int] | None = None,
    max_body_bytes: int | None = None,
) -> ServerProcess:
    """Start ``python -m flowrl.rewards.server`` without waiting; ``rewards`` is name -> spec,
    ``reward_kwargs`` name -> the factory's keyword arguments (JSON-serialisable);
    ``image_size`` (H, W) and ``max_body_bytes`` as ``--image-size`` / ``--max-body-bytes``."""
    command = [sys.executable, "-m", "flowrl.rewards.server", "--host", host, "--port", str(port)]
    command += ["--max-batch", str(max_batch), "--delay-s", str(delay_s)]
    if image_size is not None:
        command += ["--image-size", f"{image_size[0]}x{image_size[1]}"]
    if max_body_bytes is not None:
        command += ["--max-body-bytes", str(max_body_bytes)]
    for name, spec in rewards.items():
        command += ["--reward", f"{name}={spec}"]
    for name, kwargs in (reward_kwargs or {}).items():
        command += ["--reward-kwargs", f"{name}={json.dumps(kwargs)}"]
    if token_env is not None:
        command += ["--token-env", token_env]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    return ServerProcess(process=process, base_url=f"http://{host}:{port}", log_path=log_path)


# --------------------------------------------------------------------------- one sidecar per node


def sidecar_env(env: Mapping[str, str], procs: int, gpus: int, device_count: int | None = None) -> dict[str, str]:
    """The environment of a node's reward sidecar on ``gpus`` GPUs of its own: those after the GPUs of
    the node's ``procs`` training processes (indices procs .. procs + gpus - 1 of the node's GPUs, or of
    the CUDA_VISIBLE_DEVICES list when the node already narrows it), and no LOCAL_RANK, which would
    place the server's models on a training rank's GPU. ``device_count``, when known, is how many GPUs
    the node has."""
    if procs < 1 or gpus < 1:
        raise ValueError(f"sidecar_env: procs and gpus must be >= 1, got {procs} and {gpus}")
    visible = env.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else None
    have = len(ids) if ids is not None else device_count
    if have is not None and have < procs + gpus:
        raise ValueError(
            f"grpo.reward_gpus: {gpus} GPU(s) for the reward sidecar after the node's {procs} training "
            f"process(es) need {procs + gpus} GPUs, and this node has {have}"
            + (f" (CUDA_VISIBLE_DEVICES={visible})" if ids is not None else "")
        )
    chosen = [ids[i] if ids is not None else str(i) for i in range(procs, procs + gpus)]
    out = {k: v for k, v in env.items() if k != "LOCAL_RANK"}
    out["CUDA_VISIBLE_DEVICES"] = ",".join(chosen)
    return out


def node_server_url(gathered: list[tuple[str, int, str | None]], host: str) -> str | None:
    """Among every rank's (host name, local rank, URL of the server it started or None), the URL of
    ``host``'s node server: the one its local rank 0 started (None: it did not start)."""
    urls = [url for h, local_rank, url in gathered if h == host and local_rank == 0]
    if len(urls) != 1:
        raise RuntimeError(f"grpo.reward_gpus: expected one local rank 0 on host {host}, found {len(urls)} among "
                           f"{sorted({(h, r) for h, r, _ in gathered})} (is LOCAL_RANK set by torchrun?)")
    return urls[0]


def _gather_object(entry: object) -> list:
    """Every rank's ``entry`` in rank order over the default process group; [entry] without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [entry]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, entry)
    return gathered


def node_sidecar(start: Callable[[], ServerProcess], local_rank: int) -> tuple[str, ServerProcess | None]:
    """One reward server per node: local rank 0 calls ``start`` (which returns a healthy
    :class:`ServerProcess` or raises) and every rank gets that server's URL, gathered over the process
    group with each rank's host name (one process: its own). Returns (URL, the server on the rank that
    started it, else None). A failed start still takes part in the gather, so the node's other ranks
    fail with a clear error instead of waiting for the collective to time out."""
    server, error = None, None
    if local_rank == 0:
        try:
            server = start()
        except Exception as exc:  # re-raised below, after the other ranks have heard of it
            error = exc
    host = socket.gethostname()
    try:
        url = node_server_url(_gather_object((host, local_rank, server.base_url if server else None)), host)
    except BaseException:
        if server is not None:
            server.stop()
        raise
    if error is not None:
        raise error
    if url is None:
        raise RuntimeError(f"grpo.reward_gpus: the reward sidecar of host {host} did not start; the error is in "
                           "the log of its local rank 0")
    return url, server


if __name__ == "__main__":
    main()
