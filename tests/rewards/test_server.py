"""The reward server over real HTTP: round trips, every refusal, the token."""

from __future__ import annotations

import base64

import numpy as np
import pytest

from flowrl.rewards.composite import CompositeReward
from flowrl.rewards.server import DEFAULT_MAX_BODY_BYTES, create_app, load_reward, main
from tests.rewards.conftest import SERVER_MAX_BATCH, TOKEN, grid_images, http
from tests.rewards.fake_rewards import BrightnessReward, SourceSimilarityReward, brightness


def wire(pixels: np.ndarray) -> dict:
    return {"shape": list(pixels.shape), "dtype": str(pixels.dtype), "data": base64.b64encode(pixels.tobytes()).decode()}


def pixels(batch: int = 2, size: int = 8, seed: int = 0) -> np.ndarray:
    return (grid_images(batch, size, seed) * 255).round().byte().permute(0, 2, 3, 1).contiguous().numpy()


def good_body(batch: int = 2) -> dict:
    return {"prompts": [f"prompt number {i}" for i in range(batch)], "images": wire(pixels(batch))}


def test_health_lists_rewards_and_their_source_policy(server):
    status, body = http(server.base_url, "/health")
    assert status == 200
    assert body["rewards"] == {"t2i": {"sources": "forbidden"}, "edit": {"sources": "required"},
                               "faulty": {"sources": "optional"}}
    assert body["max_batch"] == SERVER_MAX_BATCH
    assert body["max_body_bytes"] == DEFAULT_MAX_BODY_BYTES and body["image_size"] is None


def test_scores_equal_in_process_scores(server):
    body = good_body(batch=5)
    status, reply = http(server.base_url, "/score/t2i", body)
    assert status == 200, reply
    images = grid_images(5)
    expected = BrightnessReward().score_components(images, body["prompts"])
    np.testing.assert_allclose(reply["scores"], expected.total.numpy(), rtol=1e-6)
    assert set(reply["components"]) == {"brightness", "prompt"}
    np.testing.assert_allclose(reply["components"]["brightness"], expected.components["brightness"].numpy(), rtol=1e-6)


def test_edit_reward_scores_against_sources(server):
    body = good_body(batch=3) | {"sources": wire(pixels(3, seed=1))}
    status, reply = http(server.base_url, "/score/edit", body)
    assert status == 200, reply
    expected = SourceSimilarityReward().score(grid_images(3), body["prompts"], grid_images(3, seed=1))
    np.testing.assert_allclose(reply["scores"], expected.numpy(), rtol=1e-6)


def _set(path: str, value):
    """A mutation of the good body: set a dotted field (or delete it when value is ...)."""

    def mutate(body: dict) -> dict:
        *parents, leaf = path.split(".")
        node = body
        for key in parents:
            node = node[key]
        if value is Ellipsis:
            del node[leaf]
        else:
            node[leaf] = value(body) if callable(value) else value
        return body

    return mutate


FLOAT_PIXELS = np.full((2, 8, 8, 3), np.nan, dtype=np.float32)
BAD_REQUESTS = {
    # name: (reward, body or mutation of the good body, status, text the message must contain)
    "malformed json": ("t2i", b'{"prompts": [', 400, "body: malformed JSON"),
    "json NaN constant": ("t2i", b'{"prompts": NaN}', 400, "body: malformed JSON"),
    "body not an object": ("t2i", b"[1, 2]", 422, "body:"),
    "missing prompts": ("t2i", _set("prompts", ...), 422, "prompts: Field required"),
    "missing images": ("t2i", _set("images", ...), 422, "images: Field required"),
    "missing shape": ("t2i", _set("images.shape", ...), 422, "images.shape: Field required"),
    "prompts not a list": ("t2i", _set("prompts", "a prompt"), 422, "prompts:"),
    "prompt not a string": ("t2i", _set("prompts", ["ok", 3]), 422, "prompts[1]:"),
    "unknown field": ("t2i", _set("extra", 1), 422, "extra: unknown field; allowed: ['prompts', 'images', 'sources']"),
    "shape of wrong rank": ("t2i", _set("images.shape", [2, 8, 24]), 422, "images.shape: expected [B, H, W, 3]"),
    "channels first": ("t2i", _set("images.shape", [2, 3, 8, 8]), 422, "images.shape: expected [B, H, W, 3]"),
    "float pixels": ("t2i", _set("images", wire(FLOAT_PIXELS)), 422, "images.dtype: only 'uint8'"),
    "too few bytes": ("t2i", _set("images.data", wire(pixels(1))["data"]), 422, "images.data:"),
    "not base64": ("t2i", _set("images.data", lambda b: "!" * len(b["images"]["data"])), 422, "images.data: not valid"),
    "batch size 0": ("t2i", {"prompts": [], "images": {"shape": [0, 8, 8, 3], "dtype": "uint8", "data": ""}},
                     422, "images.shape: every size must be >= 1"),
    "negative size": ("t2i", _set("images.shape", [2, -8, -8, 3]), 422, "images.shape: every size"),
    "batch over max_batch": ("t2i", good_body(SERVER_MAX_BATCH + 1), 413,
                             "prompts: 9 prompts exceed this server's max_batch 8"),
    "images batch over max_batch": ("t2i", _set("images", wire(pixels(SERVER_MAX_BATCH + 1))), 413,
                                    "images.shape: batch of 9 exceeds"),
    "blank prompt": ("t2i", _set("prompts", ["fine", "   "]), 422, "prompts[1]: empty prompt"),
    "prompt count mismatch": ("t2i", _set("prompts", ["only one"]), 422, "prompts: 1 prompts for 2 images"),
    "sources to a t2i reward": ("t2i", _set("sources", wire(pixels(2))), 422, "sources: reward 't2i' takes no"),
    "sources missing for edit": ("edit", good_body(), 422, "sources: reward 'edit' needs"),
    "sources batch mismatch": ("edit", _set("sources", wire(pixels(3))), 422, "sources.shape: 3 sources for 2"),
    "float sources": ("edit", _set("sources", wire(FLOAT_PIXELS)), 422, "sources.dtype: only 'uint8'"),
    "unknown reward": ("aesthetics", good_body(), 404, "unknown reward 'aesthetics'"),
}


@pytest.mark.bad_input
@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_is_refused_with_the_field_and_server_keeps_serving(server, case):
    reward, body, status, message = BAD_REQUESTS[case]
    body = body(good_body()) if callable(body) else body
    got_status, reply = http(server.base_url, f"/score/{reward}", body)
    assert got_status == status, reply
    assert message in reply["detail"], reply["detail"]
    assert http(server.base_url, "/health")[0] == 200


@pytest.mark.parametrize(
    "prompt, message",
    [
        ("nan please", "non-finite scores at indices [1]"),
        ("inf please", "non-finite component 'extra' at indices [1]"),
        ("big please", "scores outside [0.0, 1.0] at indices [1]"),
        ("boom", "failed: RuntimeError: the reward model fell over"),
    ],
)
def test_misbehaving_reward_is_a_500_never_a_number(server, prompt, message):
    body = good_body() | {"prompts": ["fine", prompt]}
    status, reply = http(server.base_url, "/score/faulty", body)
    assert status == 500
    assert message in reply["detail"], reply["detail"]
    assert http(server.base_url, "/score/faulty", good_body())[0] == 200


@pytest.mark.bad_input
@pytest.mark.parametrize("token, status", [(None, 401), ("wrong-token", 401), (TOKEN, 200)])
def test_bearer_token(slow_server, token, status):
    got_status, reply = http(slow_server.base_url, "/score/t2i", good_body(), token=token)
    assert got_status == status, reply
    if status == 401:
        assert "bearer token" in reply["detail"]
    assert http(slow_server.base_url, "/health")[0] == 200


def test_create_app_refuses_bad_settings():
    with pytest.raises(ValueError, match="URL path segment"):
        create_app({"t2i/x": brightness()}, max_batch=4)
    with pytest.raises(ValueError, match="max_batch"):
        create_app({"t2i": brightness()}, max_batch=0)
    with pytest.raises(TypeError, match="RewardModel"):
        create_app({"t2i": object()}, max_batch=4)
    with pytest.raises(ValueError, match="image_size"):
        create_app({"t2i": brightness()}, max_batch=4, image_size=(0, 8))
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app({"t2i": brightness()}, max_batch=4, max_body_bytes=0)
    mixed = CompositeReward(components={"b": brightness(), "s": SourceSimilarityReward()}, weights={},
                            categorize=lambda prompt: "", default_weights={"b": 1.0})
    with pytest.raises(ValueError, match="some components need source images and others refuse them"):
        create_app({"mixed": mixed}, max_batch=4)


def test_command_line_refuses_bad_specs_and_an_unset_token_variable(monkeypatch):
    monkeypatch.delenv("FLOWRL_UNSET_TOKEN", raising=False)
    with pytest.raises(SystemExit, match="FLOWRL_UNSET_TOKEN.*unset or empty"):
        main(["--port", "1", "--reward", "t2i=tests.rewards.fake_rewards:brightness", "--token-env", "FLOWRL_UNSET_TOKEN"])
    with pytest.raises(SystemExit, match="expected NAME=VALUE"):
        main(["--port", "1", "--reward", "tests.rewards.fake_rewards:brightness"])
    with pytest.raises(ValueError, match="must look like 'package.module:factory'"):
        load_reward("tests.rewards.fake_rewards.brightness", {})
    assert load_reward("tests.rewards.fake_rewards:brightness", {"prompt_weight": 0.5}).prompt_weight == 0.5
