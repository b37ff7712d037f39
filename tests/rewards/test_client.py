"""The async client against the real server: order, errors, retries, back-pressure, pipelining."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import torch

from flowrl.rewards.base import RewardModel
from flowrl.rewards.client import RewardClient, RewardClientError, RewardRequestRejected, RewardServerUnavailable
from flowrl.rewards.server import free_port
from tests.rewards.conftest import SERVER_MAX_BATCH, SLOW_DELAY_S, TOKEN, grid_images, start_server
from tests.rewards.fake_rewards import BrightnessReward, SourceSimilarityReward

PROMPTS = [f"a prompt of length {'x' * i}" for i in range(20)]


def test_client_is_a_reward_model_with_in_process_scores(server):
    images = grid_images(5)
    with RewardClient(server.base_url, "t2i", max_batch=SERVER_MAX_BATCH) as client:
        assert isinstance(client, RewardModel)
        remote = client.score_components(images, PROMPTS[:5])
        total = client.score(images, PROMPTS[:5])
    local = BrightnessReward().score_components(images, PROMPTS[:5])
    torch.testing.assert_close(remote.total, local.total)
    torch.testing.assert_close(total, local.total)
    assert remote.components.keys() == local.components.keys()
    torch.testing.assert_close(remote.components["prompt"], local.components["prompt"])


def test_large_batch_is_split_and_rejoined_in_order(server):
    images = grid_images(20)  # chunks of 8, 8, 4, sent concurrently
    with RewardClient(server.base_url, "t2i", max_batch=SERVER_MAX_BATCH, max_in_flight=3) as client:
        remote = client.score_components(images, PROMPTS)
    local = BrightnessReward().score_components(images, PROMPTS)
    torch.testing.assert_close(remote.total, local.total)
    torch.testing.assert_close(remote.components["brightness"], local.components["brightness"])


def test_edit_reward_with_sources(server):
    images, sources = grid_images(10), grid_images(10, seed=3)
    with RewardClient(server.base_url, "edit", max_batch=4) as client:
        remote = client.score(images, PROMPTS[:10], sources)
    torch.testing.assert_close(remote, SourceSimilarityReward().score(images, PROMPTS[:10], sources))


def test_float_images_are_quantised_to_8_bits(server):
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1  # also out of range
    with RewardClient(server.base_url, "t2i") as client:
        remote = client.score(images, PROMPTS[:3])
    quantised = images.clamp(0, 1).mul(255).round() / 255
    torch.testing.assert_close(remote, BrightnessReward().score(quantised, PROMPTS[:3]))


@pytest.mark.bad_input
def test_nan_pixels_and_bad_shapes_are_refused_before_sending(server):
    images = grid_images(2)
    images[1, 0, 0, 0] = float("nan")
    with RewardClient(server.base_url, "t2i") as client:
        with pytest.raises(ValueError, match="images: contains NaN"):
            client.submit(images, PROMPTS[:2])
        with pytest.raises(ValueError, match=r"images: expected a \[B, 3, H, W\]"):
            client.submit(grid_images(2)[:, :1], PROMPTS[:2])
        with pytest.raises(ValueError, match="prompts: 1 prompts for 2 images"):
            client.submit(grid_images(2), PROMPTS[:1])


def test_4xx_raises_at_once_with_the_servers_message(server):
    with RewardClient(server.base_url, "t2i", retries=5, backoff_s=2.0) as client:
        start = time.monotonic()
        with pytest.raises(RewardRequestRejected, match=r"HTTP 422: prompts\[1\]: empty prompt") as info:
            client.score(grid_images(2), ["fine", ""])
        assert time.monotonic() - start < 1.5, "a 4xx must not be retried"
    assert info.value.status == 422


def test_5xx_is_retried_then_reported_with_url_and_cause(server):
    with RewardClient(server.base_url, "faulty", retries=2, backoff_s=0.01) as client:
        with pytest.raises(RewardServerUnavailable, match="after 3 attempts; last cause: HTTP 500: .*non-finite") as info:
            client.score(grid_images(2), ["fine", "nan"])
    assert f"{server.base_url}/score/faulty" in str(info.value)


def test_server_that_never_comes_up_gives_a_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    with RewardClient(url, "t2i", retries=2, backoff_s=0.01) as client:
        with pytest.raises(RewardServerUnavailable, match="after 3 attempts; last cause: ClientConnectorError") as info:
            client.score(grid_images(2), PROMPTS[:2])
    assert f"{url}/score/t2i" in str(info.value)


def test_request_before_the_server_is_up_succeeds_once_it_is(tmp_path):
    port, images = free_port(), grid_images(4)
    with RewardClient(f"http://127.0.0.1:{port}", "t2i", retries=60, backoff_s=0.05, max_backoff_s=0.25) as client:
        future = client.submit(images, PROMPTS[:4])
        time.sleep(0.3)
        assert not future.done(), "nothing listens yet: the client must still be retrying"
        late = start_server(tmp_path, "late", port)
        try:
            total = future.result(timeout=30).total
        finally:
            late.stop()
    torch.testing.assert_close(total, BrightnessReward().score(images, PROMPTS[:4]))


def test_timeout_is_retried_then_reported(slow_server):
    with RewardClient(slow_server.base_url, "t2i", token=TOKEN, timeout_s=0.1, retries=1, backoff_s=0.01) as client:
        with pytest.raises(RewardServerUnavailable, match="after 2 attempts; last cause: timed out after 0.1 s"):
            client.score(grid_images(2), PROMPTS[:2])


def test_submit_waits_while_max_in_flight_batches_are_outstanding(slow_server):
    with RewardClient(slow_server.base_url, "t2i", token=TOKEN, max_in_flight=1) as client:
        start = time.monotonic()
        first = client.submit(grid_images(2), PROMPTS[:2])
        first_returned = time.monotonic() - start
        second = client.submit(grid_images(2), PROMPTS[:2])
        second_returned = time.monotonic() - start
        assert first.done(), "the second submit may only start once the first batch is done"
        second.result(timeout=10)
    assert first_returned < 0.5 * SLOW_DELAY_S <= second_returned, (first_returned, second_returned)


def test_close_cancels_outstanding_work_and_refuses_new(slow_server):
    client = RewardClient(slow_server.base_url, "t2i", token=TOKEN)
    future = client.submit(grid_images(2), PROMPTS[:2])
    client.close()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(timeout=5)
    with pytest.raises(RewardClientError, match="closed"):
        client.submit(grid_images(2), PROMPTS[:2])
    client.close()  # idempotent


def test_pipelining_hides_the_server_latency(slow_server):
    """Submit the rewards of batch i, generate batch i+1 meanwhile: the delay mostly disappears."""
    batches, generate_s = 4, SLOW_DELAY_S
    images = [grid_images(4, seed=i) for i in range(batches)]

    def generate(index: int) -> torch.Tensor:
        time.sleep(generate_s)  # stands in for the sampler; sleeping keeps the 2-core CI free
        return images[index]

    with RewardClient(slow_server.base_url, "t2i", token=TOKEN, max_in_flight=2) as client:
        start = time.monotonic()
        sequential = [client.score(generate(i), PROMPTS[:4]) for i in range(batches)]
        sequential_s = time.monotonic() - start

        start = time.monotonic()
        futures = []
        for i in range(batches):
            futures.append(client.submit(generate(i), PROMPTS[:4]))
            if i:
                futures[i - 1].result()  # the update of batch i-1 would use these now
        pipelined = [future.result().total for future in futures]
        pipelined_s = time.monotonic() - start

    torch.testing.assert_close(torch.stack(pipelined), torch.stack(sequential))
    assert pipelined_s < 0.75 * sequential_s, (
        f"pipelined {pipelined_s:.2f} s vs sequential {sequential_s:.2f} s "
        f"({batches} batches, {generate_s} s generation, {SLOW_DELAY_S} s server delay)"
    )
