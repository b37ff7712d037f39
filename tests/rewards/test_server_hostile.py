"""Hostile requests against real reward servers: oversized and bomb bodies, client mistakes
that reach a real composite reward, and values echoed back in errors.

Two servers on loopback: ``tight`` serves a real shapes edit composite (an untrained
scorer plus the identity scorer) at ``--image-size 32x32``, with the body cap left at its
default (the largest legitimate request); ``roomy`` serves the fake rewards at any image
size under an explicit cap. Every case here got a 500, a hang or an unbounded answer
before the server bounded its input.
"""

from __future__ import annotations

import base64
import http.client as http_client
import json
import select
import socket
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from flowrl.rewards.composite import CompositeReward, shapes_category
from flowrl.rewards.identity import ShapesIdentityScorer
from flowrl.rewards.server import (
    MAX_DETAIL_CHARS,
    MAX_JSON_DEPTH,
    MAX_JSON_VALUES,
    MAX_PROMPT_CHARS,
    ServerProcess,
    free_port,
    launch_server,
    main,
    request_body_limit,
)
from flowrl.rewards.shapes_rewards import ScorerReward
from flowrl.rewards.shapes_scorer import ScorerArch, ShapesScorer
from tests.rewards.conftest import FAKES, ROOT, grid_images, http, server_env

RESOLUTION = 32
TIGHT_MAX_BATCH = 4
ROOMY_CAP = 8 * 2**20
EDIT_PROMPTS = ["remove the red square", "make the blue circle green"]


def shapes_edit_composite() -> CompositeReward:
    """The shapes edit composite as ``load_shapes_rewards`` builds it, with an untrained scorer."""
    torch.manual_seed(0)
    scorer = ShapesScorer(ScorerArch(width=32, depth=1, heads=2), RESOLUTION).eval()
    return CompositeReward(
        components={"instruction": ScorerReward(scorer, "instruction"), "identity": ShapesIdentityScorer()},
        weights={}, categorize=shapes_category, default_weights={"instruction": 1.0, "identity": 1.0},
    )


@dataclass(frozen=True)
class Servers:
    tight: ServerProcess
    roomy: ServerProcess


@pytest.fixture(scope="module")
def servers(tmp_path_factory) -> Iterator[Servers]:
    logs = tmp_path_factory.mktemp("hostile-server-logs")
    common = dict(env=server_env(), cwd=ROOT)
    started = []
    try:
        started.append(launch_server(
            {"edit": f"{__name__}:shapes_edit_composite", "t2i": f"{FAKES}:brightness", "any": f"{FAKES}:faulty"},
            port=free_port(), log_path=logs / "tight.log", max_batch=TIGHT_MAX_BATCH,
            image_size=(RESOLUTION, RESOLUTION), **common,
        ))
        started.append(launch_server(
            {"t2i": f"{FAKES}:brightness", "edit": f"{FAKES}:source_similarity"},
            port=free_port(), log_path=logs / "roomy.log", max_batch=8, max_body_bytes=ROOMY_CAP, **common,
        ))
        for server in started:
            server.wait_until_healthy()
        yield Servers(tight=started[0], roomy=started[1])
    finally:
        for server in started:
            server.stop()


def wire(batch: int, size: int = RESOLUTION, seed: int = 0) -> dict:
    pixels = (grid_images(batch, size, seed) * 255).round().byte().permute(0, 2, 3, 1).contiguous().numpy()
    return {"shape": list(pixels.shape), "dtype": "uint8", "data": base64.b64encode(pixels.tobytes()).decode()}


def edit_body(**changes) -> dict:
    return {"prompts": list(EDIT_PROMPTS), "images": wire(2), "sources": wire(2, seed=1)} | changes


def peak_rss_bytes(server: ServerProcess) -> int:
    """The server process's peak resident memory so far (VmHWM)."""
    with open(f"/proc/{server.process.pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


def _connect(server: ServerProcess) -> socket.socket:
    url = urllib.parse.urlsplit(server.base_url)
    return socket.create_connection((url.hostname, url.port), timeout=10)


def _answer(sock: socket.socket) -> tuple[int, dict]:
    response = http_client.HTTPResponse(sock)
    response.begin()
    return response.status, json.loads(response.read())


def test_a_declared_oversized_body_is_refused_before_it_is_sent(servers):
    """Content-Length over the cap: 413 after 64 KiB of a declared 1 GiB (it used to wait for all of it)."""
    with _connect(servers.roomy) as sock:
        sock.sendall(b"POST /score/t2i HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % 2**30 + b" " * 65536)
        status, reply = _answer(sock)
    assert status == 413, reply
    assert reply["detail"] == f"body: {2**30} bytes exceed this server's limit of {ROOMY_CAP} (--max-body-bytes)"


def test_a_streamed_oversized_body_is_refused_once_past_the_cap(servers):
    """Chunked, no length: the server answers 413 while the client is still sending."""
    chunk = b" " * 2**16
    frame = b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    sent = 0
    with _connect(servers.roomy) as sock:
        sock.sendall(b"POST /score/t2i HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        while sent < 4 * ROOMY_CAP:
            readable, writable, _ = select.select([sock], [sock], [], 10)
            if readable:
                break
            try:
                sock.sendall(frame)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        status, reply = _answer(sock)
    assert status == 413, reply
    assert "more than this server's limit" in reply["detail"]
    assert sent < 4 * ROOMY_CAP  # it did not read on to the end


def test_deep_nesting_is_a_400_not_a_recursion_error(servers):
    nested = f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels"
    for body, detail in [
        (b"[" * 100_000 + b"]" * 100_000, f"body: more than {MAX_JSON_VALUES} JSON values"),  # refused unparsed
        (b'{"a":' * 50_000 + b"1" + b"}" * 50_000, nested),  # parsed until Python's recursion limit
        (b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1), nested),  # parsed, then measured
    ]:
        status, reply = http(servers.roomy.base_url, "/score/t2i", body)
        assert status == 400, reply
        assert reply["detail"] == detail


def test_json_value_bombs_are_refused_before_they_are_built(servers):
    """A few MiB of tiny JSON values would be hundreds of MiB of Python objects (and as many
    pydantic errors); both are refused without the server's peak memory moving much."""
    before = peak_rss_bytes(servers.roomy)
    lists = b"[" + b"[]," * (MAX_JSON_VALUES + 10) + b"[]]"
    status, reply = http(servers.roomy.base_url, "/score/t2i", lists)
    assert status == 400, reply
    assert reply["detail"] == f"body: more than {MAX_JSON_VALUES} JSON values"
    many_prompts = b'{"prompts": [' + b"0," * (MAX_JSON_VALUES - 10) + b'0], "images": null}'
    status, reply = http(servers.roomy.base_url, "/score/t2i", many_prompts)
    assert status == 413, reply
    assert reply["detail"] == f"prompts: {MAX_JSON_VALUES - 9} prompts exceed this server's max_batch 8"
    assert peak_rss_bytes(servers.roomy) - before < 48 * 2**20


def test_the_default_cap_admits_the_largest_legitimate_request_and_nothing_bigger(servers):
    health = http(servers.tight.base_url, "/health")[1]
    limit = request_body_limit(TIGHT_MAX_BATCH, (RESOLUTION, RESOLUTION))
    assert health["max_body_bytes"] == limit and health["image_size"] == [RESOLUTION, RESOLUTION]
    # the worst escaping: each astral character is two \uXXXX escapes, 12 bytes
    prompts = ["\U0001f7e5" * MAX_PROMPT_CHARS] * TIGHT_MAX_BATCH
    largest = json.dumps({"prompts": prompts, "images": wire(TIGHT_MAX_BATCH),
                          "sources": wire(TIGHT_MAX_BATCH, seed=1)}).encode()
    assert 0.99 * limit < len(largest) <= limit  # sized from it, not far above
    status, reply = http(servers.tight.base_url, "/score/any", largest)
    assert status == 200, reply
    status, reply = http(servers.tight.base_url, "/score/any", largest + b" " * (limit - len(largest) + 1))
    assert status == 413, reply


def test_a_real_edit_composite_still_scores_as_in_process(servers):
    status, reply = http(servers.tight.base_url, "/score/edit", edit_body())
    assert status == 200, reply
    expected = shapes_edit_composite().score_components(
        grid_images(2, RESOLUTION), EDIT_PROMPTS, grid_images(2, RESOLUTION, seed=1))
    np.testing.assert_allclose(reply["scores"], expected.total.numpy(), rtol=1e-5)
    assert set(reply["components"]) == {"instruction", "identity"}
    assert http(servers.tight.base_url, "/health")[1]["rewards"]["edit"] == {"sources": "required"}


HUGE = 10**200
COMPOSITE_MISTAKES = {
    # name: (reward, body, status, the whole detail or its start)
    "edit without sources": ("edit", edit_body(sources=None), 422, "sources: reward 'edit' needs the source images"),
    "unparseable prompt": ("edit", edit_body(prompts=["paint it all purple", EDIT_PROMPTS[1]]), 422,
                           "prompts[0]: reward 'edit' cannot use this prompt: 'paint it all purple' is neither"),
    "NUL byte": ("edit", edit_body(prompts=["remove the red\x00 square", EDIT_PROMPTS[1]]), 422,
                 "prompts[0]: a control character U+0000 at position 14"),
    "escape character": ("t2i", {"prompts": ["a red \x1b[31mcircle"], "images": wire(1)}, 422,
                         "prompts[0]: a control character U+001B at position 6"),
    "lone surrogate": ("t2i", {"prompts": ["a red circle \ud800"], "images": wire(1)}, 422,
                       "prompts[0]: a lone surrogate U+D800 at position 13"),
    "overlong prompt": ("t2i", {"prompts": ["a" * (MAX_PROMPT_CHARS + 1)], "images": wire(1)}, 422,
                        f"prompts[0]: {MAX_PROMPT_CHARS + 1} characters, more than {MAX_PROMPT_CHARS}"),
    "wrong image size": ("edit", edit_body(images=wire(2, size=16)), 422,
                         "images.shape: this server scores 32 x 32 images ([B, 32, 32, 3]), got [2, 16, 16, 3]"),
    "wrong source size": ("edit", edit_body(sources=wire(2, size=64)), 422,
                          "sources.shape: this server scores 32 x 32 images"),
    "astronomical shape": ("edit", edit_body(images={"shape": [1, HUGE, HUGE, 3], "dtype": "uint8", "data": ""}),
                           422, "images.shape: this server scores 32 x 32 images"),
    "shape of bools": ("t2i", {"prompts": ["x"], "images": {"shape": [True, 32, 32, 3], "dtype": "uint8",
                                                            "data": ""}}, 422, "images.shape[0]: Input should be"),
    "sources a string": ("edit", edit_body(sources="abc"), 422, "sources: Input should be"),
    "data a number": ("t2i", {"prompts": ["x"], "images": {"shape": [1, 32, 32, 3], "dtype": "uint8", "data": 7}},
                      422, "images.data: Input should be a valid string"),
    "unknown image field": ("t2i", {"prompts": ["x"], "images": wire(1) | {"stride": 1}}, 422,
                            "images.stride: unknown field; allowed: ['shape', 'dtype', 'data']"),
    "empty field name": ("t2i", {"prompts": ["x"], "images": wire(1), "": 1}, 422,
                         "body['']: unknown field; allowed: ['prompts', 'images', 'sources']"),
    "too many prompts": ("t2i", {"prompts": ["x"] * 5, "images": wire(1)}, 413,
                         "prompts: 5 prompts exceed this server's max_batch 4"),
    "unknown reward": ("aesthetic", edit_body(), 404, "reward: unknown reward 'aesthetic'"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(COMPOSITE_MISTAKES))
def test_client_mistakes_are_a_4xx_naming_the_field(servers, case):
    reward, body, status, detail = COMPOSITE_MISTAKES[case]
    got, reply = http(servers.tight.base_url, f"/score/{reward}", body)
    assert got == status, reply
    assert reply["detail"].startswith(detail), reply["detail"]
    assert http(servers.tight.base_url, "/score/edit", edit_body())[0] == 200


@pytest.mark.bad_input
def test_an_astronomical_shape_without_an_image_size_is_a_422(servers):
    body = {"prompts": ["x"], "images": {"shape": [1, HUGE, HUGE, 3], "dtype": "uint8", "data": "AAAA"}}
    status, reply = http(servers.roomy.base_url, "/score/t2i", body)
    assert status == 422, reply
    assert reply["detail"].startswith("images.data: base64 length 4 does not encode 3000"), reply["detail"]


MEGA = "a" * 2**20
ECHOES = {
    "1 MiB prompt": ({"prompts": [MEGA], "images": wire(1)}, 422),
    "1 MiB dtype": ({"prompts": ["x"], "images": wire(1) | {"dtype": MEGA}}, 422),
    "1 MiB field name": ({"prompts": ["x"], "images": wire(1), MEGA: 1}, 422),
    "1 MiB image field name": ({"prompts": ["x"], "images": wire(1) | {MEGA: 1}}, 422),
    "1 MiB shape entry": ({"prompts": ["x"], "images": wire(1) | {"shape": [1, 32, 32, MEGA]}}, 422),
    "1 MiB of bad base64": ({"prompts": ["x"], "images": {"shape": [1, 512, 512, 3], "dtype": "uint8",
                                                          "data": "!" * (4 * 512 * 512)}}, 422),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(ECHOES))
def test_errors_never_echo_a_huge_value(servers, case):
    body, status = ECHOES[case]
    got, reply = http(servers.roomy.base_url, "/score/t2i", body)
    assert got == status, reply
    assert len(reply["detail"]) <= MAX_DETAIL_CHARS + 50, len(reply["detail"])
    assert "a" * 300 not in reply["detail"] and "!" * 300 not in reply["detail"]


def test_a_long_reward_name_is_not_echoed_in_full(servers):
    status, reply = http(servers.roomy.base_url, "/score/" + "x" * 5000, {"prompts": ["x"]})
    assert status == 404, reply
    assert len(reply["detail"]) < 400, reply["detail"]


def test_command_line_refuses_a_bad_image_size():
    with pytest.raises(SystemExit):
        main(["--port", "1", "--reward", f"t2i={FAKES}:brightness", "--image-size", "32"])
