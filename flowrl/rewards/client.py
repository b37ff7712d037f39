"""Client of the reward server: asynchronous underneath, synchronous to the trainer.

The trainer is plain synchronous code, but it should not wait for rewards: it
submits the images of batch i and generates batch i+1 while the server scores.
So the client runs its own asyncio loop (aiohttp) in a background thread, and
:meth:`RewardClient.submit` returns a ``concurrent.futures.Future`` at once.
``max_in_flight`` bounds the submitted, unfinished batches: one more
``submit`` blocks until a slot frees, which is the back-pressure that keeps a
fast generator from queueing unbounded work. The client also satisfies the
:class:`~flowrl.rewards.base.RewardModel` protocol (``score`` is submit + wait),
so a remote reward drops in where a local one was.

Images travel as uint8 (see the schema in :mod:`flowrl.rewards.server`): the
client clamps the float images to [0, 1] and rounds them to 1/255 steps, so
the server scores exactly what an 8-bit image file would hold. NaN or inf
pixels are refused here, before anything is sent, rather than silently clamped.

Connection errors, timeouts and 5xx answers are retried with exponential
backoff; a 4xx is the caller's mistake and raises :class:`RewardRequestRejected`
at once with the server's message.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import math
import threading
from dataclasses import dataclass

import aiohttp
import numpy as np
import torch

from flowrl.rewards.base import RewardScores


class RewardClientError(RuntimeError):
    """Any failure to get scores from the reward server."""


class RewardRequestRejected(RewardClientError):
    """The server refused the request (4xx): retrying would not help."""

    def __init__(self, url: str, status: int, detail: str) -> None:
        super().__init__(f"{url} rejected the request with HTTP {status}: {detail}")
        self.url = url
        self.status = status
        self.detail = detail


class RewardServerUnavailable(RewardClientError):
    """No good answer after every retry (connection errors, timeouts, 5xx)."""


@dataclass(frozen=True)
class ClientSettings:
    """Where to send requests and how patiently; every field is a constructor argument."""

    base_url: str  # e.g. http://127.0.0.1:8000
    reward: str  # the reward's name on the server ("t2i", "edit")
    token: str | None  # bearer token, when the server requires one
    timeout_s: float  # per HTTP attempt, connect to last byte
    retries: int  # extra attempts after the first one
    backoff_s: float  # wait before retry k is backoff_s * 2**(k-1) ...
    max_backoff_s: float  # ... but never longer than this
    max_batch: int  # larger submissions are split into chunks of this size
    max_in_flight: int  # submitted, unfinished batches (and concurrent HTTP requests)

    @property
    def score_url(self) -> str:
        return f"{self.base_url.rstrip('/')}/score/{self.reward}"


@dataclass(frozen=True)
class Chunk:
    """One HTTP request's worth of a submitted batch."""

    body: bytes
    size: int


def quantize(images: torch.Tensor, field: str = "images") -> np.ndarray:
    """[B, 3, H, W] float in [0, 1] -> uint8 [B, H, W, 3], the wire layout; refuses NaN/inf."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{field}: expected a [B, 3, H, W] tensor, got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{field}: expected float pixels in [0, 1], got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError(f"{field}: empty batch")
    pixels = images.detach().to("cpu", torch.float32)
    if not torch.isfinite(pixels).all():
        raise ValueError(f"{field}: contains NaN or inf pixels")
    pixels = pixels.clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def _wire_array(pixels: np.ndarray) -> dict:
    return {"shape": list(pixels.shape), "dtype": "uint8", "data": base64.b64encode(pixels.tobytes()).decode("ascii")}


def encode_chunks(
    images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None, max_batch: int
) -> list[Chunk]:
    """Validate a submission and cut it into request bodies of at most ``max_batch`` images."""
    pixels = quantize(images, "images")
    batch = pixels.shape[0]
    if len(prompts) != batch:
        raise ValueError(f"prompts: {len(prompts)} prompts for {batch} images")
    source_pixels = None if sources is None else quantize(sources, "sources")
    if source_pixels is not None and source_pixels.shape[0] != batch:
        raise ValueError(f"sources: {source_pixels.shape[0]} sources for {batch} images")
    chunks = []
    for start in range(0, batch, max_batch):
        stop = min(start + max_batch, batch)
        body = {"prompts": list(prompts[start:stop]), "images": _wire_array(pixels[start:stop])}
        if source_pixels is not None:
            body["sources"] = _wire_array(source_pixels[start:stop])
        chunks.append(Chunk(body=json.dumps(body).encode(), size=stop - start))
    return chunks


def _finite_list(url: str, label: str, values: object, size: int) -> list[float]:
    ok = isinstance(values, list) and len(values) == size
    if not ok or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
        raise RewardClientError(f"{url}: malformed reply, {label} is not {size} finite numbers")
    return values


def parse_reply(url: str, text: str, size: int) -> RewardScores:
    """A 200 body -> RewardScores for one chunk, checked again on this side."""
    try:
        reply = json.loads(text)
    except ValueError as exc:
        raise RewardClientError(f"{url}: reply is not JSON ({exc})") from exc
    if not isinstance(reply, dict) or not isinstance(reply.get("components"), dict):
        raise RewardClientError(f"{url}: malformed reply, expected 'scores' and 'components'")
    total = torch.tensor(_finite_list(url, "scores", reply.get("scores"), size), dtype=torch.float32)
    components = {
        name: torch.tensor(_finite_list(url, f"components.{name}", values, size), dtype=torch.float32)
        for name, values in reply["components"].items()
    }
    return RewardScores(total=total, components=components)


def join_scores(url: str, parts: list[RewardScores]) -> RewardScores:
    """Chunk results, in submission order -> one RewardScores."""
    names = list(parts[0].components)
    if any(list(part.components) != names for part in parts):
        raise RewardClientError(f"{url}: chunks of one batch came back with different components")
    return RewardScores(
        total=torch.cat([part.total for part in parts]),
        components={name: torch.cat([part.components[name] for part in parts]) for name in names},
    )


def _error_detail(text: str) -> str:
    try:
        return str(json.loads(text)["detail"])
    except (ValueError, KeyError, TypeError):
        return text[:500] or "(empty body)"


class RewardClient:
    """A remote reward: ``submit`` returns a Future; ``score`` / ``score_components`` wait for it."""

    def __init__(
        self,
        base_url: str,
        reward: str,
        *,
        token: str | None = None,
        timeout_s: float = 60.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        max_backoff_s: float = 10.0,
        max_batch: int = 64,
        max_in_flight: int = 2,
    ) -> None:
        if timeout_s <= 0 or retries < 0 or backoff_s < 0 or max_batch < 1 or max_in_flight < 1:
            raise ValueError("need timeout_s > 0, retries >= 0, backoff_s >= 0, max_batch >= 1, max_in_flight >= 1")
        self.settings = ClientSettings(
            base_url=base_url, reward=reward, token=token, timeout_s=timeout_s, retries=retries,
            backoff_s=backoff_s, max_backoff_s=max_backoff_s, max_batch=max_batch, max_in_flight=max_in_flight,
        )
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._state_lock = threading.Lock()  # orders submit against close
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"reward-client-{reward}", daemon=True)
        self._thread.start()
        self._session, self._requests = self._call(self._open())

    async def _open(self) -> tuple[aiohttp.ClientSession, asyncio.Semaphore]:
        headers = {"Content-Type": "application/json"}
        if self.settings.token is not None:
            headers["Authorization"] = f"Bearer {self.settings.token}"
        session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s),
            connector=aiohttp.TCPConnector(limit=self.settings.max_in_flight),
        )
        return session, asyncio.Semaphore(self.settings.max_in_flight)

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def submit(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> concurrent.futures.Future[RewardScores]:
        """Start scoring; blocks only while ``max_in_flight`` batches are outstanding."""
        chunks = encode_chunks(images, prompts, sources, self.settings.max_batch)
        self._slots.acquire()
        with self._state_lock:
            if self._closed:
                self._slots.release()
                raise RewardClientError("RewardClient is closed")
            future = asyncio.run_coroutine_threadsafe(self._score_chunks(chunks), self._loop)
        future.add_done_callback(lambda _: self._slots.release())
        return future

    def score_components(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> RewardScores:
        """Blocking score with components (float32, CPU), as a local RewardModel gives."""
        return self.submit(images, prompts, sources).result()

    def score(self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None) -> torch.Tensor:
        """Blocking total score -> [B] float32 on CPU."""
        return self.score_components(images, prompts, sources).total

    def health(self) -> dict:
        """The server's /health answer (one attempt; raises on any failure)."""
        return self._call(self._get_health())

    async def _get_health(self) -> dict:
        async with self._session.get(f"{self.settings.base_url.rstrip('/')}/health") as response:
            response.raise_for_status()
            return await response.json()

    async def _score_chunks(self, chunks: list[Chunk]) -> RewardScores:
        tasks = [asyncio.ensure_future(self._post(chunk)) for chunk in chunks]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            raise
        return join_scores(self.settings.score_url, parts)

    async def _post(self, chunk: Chunk) -> RewardScores:
        """One chunk, with retries on connection errors, timeouts and 5xx."""
        settings, url = self.settings, self.settings.score_url
        causes = []
        for attempt in range(settings.retries + 1):
            if attempt:
                await asyncio.sleep(min(settings.backoff_s * 2 ** (attempt - 1), settings.max_backoff_s))
            try:
                async with self._requests, self._session.post(url, data=chunk.body) as response:
                    status, text = response.status, await response.text()
            except TimeoutError:
                causes.append(f"timed out after {settings.timeout_s} s")
                continue
            except aiohttp.ClientError as exc:
                causes.append(f"{type(exc).__name__}: {exc}")
                continue
            if status == 200:
                return parse_reply(url, text, chunk.size)
            if status < 500:
                raise RewardRequestRejected(url, status, _error_detail(text))
            causes.append(f"HTTP {status}: {_error_detail(text)}")
        raise RewardServerUnavailable(
            f"{url}: no successful answer after {settings.retries + 1} attempts; last cause: {causes[-1]}"
        )

    def close(self) -> None:
        """Cancel what is still outstanding, close the HTTP session, stop the loop thread."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    async def _shutdown(self) -> None:
        pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._session.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
