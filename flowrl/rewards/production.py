"""Production rewards: the lazily loaded VLM scorers, where they run, and the held-out monitor.

The composites themselves are built by :func:`flowrl.rewards.registry.load_rewards` from
``config.rewards`` (a ``learned`` component of a ``vlm`` reward model is a :class:`LazyVLMScorer`);
:func:`load_production_rewards` and :func:`served_composite` are that function under their earlier
names. Prompts carry free-form categories (the prompt files'), so the composite looks each prompt up
in the table the filter stage wrote; prompts outside it get the default weights.

Where the scorers run: each loads on first use, in :data:`SCORER_DTYPE`, on
the process's GPU (:func:`flowrl.models.local_device`) unless it is given a
device; a reward server on several GPUs of its own spreads them over those
(:func:`scorer_devices`). A scorer used now and then (the held-out monitor,
the final evaluation) is wrapped in :class:`ReleasedAfterScoring`, which drops
its model after every call.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch

from flowrl.config import ConfigError, FlowRLConfig
from flowrl.rewards.composite import CompositeReward
from flowrl.rewards.shapes_rewards import ScorerReward
from flowrl.storage import ArtifactError, fetch

# The dtype the stages load the VLM scorers in (flowrl.planner.scorer_dtype reads it): bfloat16 halves
# the fp32 footprint (a Qwen2.5-VL-7B scorer: 15.5 GiB instead of 31); the five level logits are read in
# float32 (QwenVLScorer.answer_logits), so the softmax of the expected level is an fp32 one.
SCORER_DTYPE = "bfloat16"


class LazyVLMScorer:
    """A saved Qwen2.5-VL scorer, loaded on its first use: a rank that never scores
    (the monitor runs on rank 0 only) or a trainer whose rewards come from a reward
    server keeps only the composite's weights, not the models.

    ``dtype`` (a torch dtype name) is what the weights load in; ``device`` None: this
    process's GPU (or the CPU) at load time. :meth:`release` drops the model again; the
    next use loads it afresh from ``directory``."""

    def __init__(self, directory: Path, *, dtype: str = SCORER_DTYPE, device: str | None = None):
        if not (directory / "config.json").is_file():  # checked now, before any rollout, not at first use
            raise ArtifactError(f"{directory}: not a saved scorer (no config.json)")
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"LazyVLMScorer: {dtype!r} is not a torch dtype name (e.g. bfloat16, float32)")
        self.directory, self.dtype, self.device, self._scorer = directory, dtype, device, None

    @property
    def loaded(self) -> bool:
        """Whether the model is in memory now."""
        return self._scorer is not None

    def level_logits(self, images, prompts, sources=None):
        if self._scorer is None:
            from flowrl.models import local_device
            from flowrl.rewards.vlm import QwenVLScorer

            self._scorer = QwenVLScorer.from_pretrained(self.directory, dtype=getattr(torch, self.dtype),
                                                        device=self.device or local_device()).eval()
        return self._scorer.level_logits(images, prompts, sources)

    def release(self) -> None:
        """Drop the model and hand its GPU memory back to the device (no-op when not loaded)."""
        if self._scorer is None:
            return
        on_gpu = self._scorer.device.type == "cuda"
        self._scorer = None
        gc.collect()  # the model's tensors go now, not at some later collection
        if on_gpu:
            torch.cuda.empty_cache()


def release(reward: object) -> None:
    """Release the lazily loaded scorer behind ``reward`` (a :class:`ScorerReward`); anything else is left."""
    release_backbone = getattr(getattr(reward, "backbone", None), "release", None)
    if release_backbone is not None:
        release_backbone()


class ReleasedAfterScoring:
    """``reward`` (a :class:`ScorerReward` over a :class:`LazyVLMScorer`) whose model is dropped after
    every :meth:`score` call, raised or not: the held-out monitor and the final evaluation load each
    scorer for the call only, so one is on the GPU at a time and none while the policy trains."""

    def __init__(self, reward: ScorerReward):
        self.reward = reward
        self.name, self.score_range = reward.name, reward.score_range

    def score(self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None) -> torch.Tensor:
        try:
            return self.reward.score(images, prompts, sources)
        finally:
            release(self.reward)


def scorer_devices(count: int, device_count: int, first: int = 0) -> list[str]:
    """Devices of ``count`` scorers spread round-robin over GPUs ``first`` .. ``device_count - 1`` (scorer i
    on ``cuda:(first + i % (device_count - first))``; ``first`` > 0 leaves the GPUs before it to the policy,
    and when there are no others they share them all); all on the CPU when there is no GPU."""
    if count < 0 or device_count < 0 or first < 0:
        raise ValueError(f"scorer_devices: counts must be >= 0, got {count} scorers, {device_count} devices, "
                         f"first {first}")
    if device_count == 0:
        return ["cpu"] * count
    if first >= device_count:
        first = 0
    return [f"cuda:{first + i % (device_count - first)}" for i in range(count)]


def load_production_rewards(config: FlowRLConfig, reward_model_uri: str, task: str,
                            categories: dict[str, str], *, spread: bool = False,
                            first_device: int = 0) -> CompositeReward:
    """:func:`flowrl.rewards.registry.load_rewards` with the prompts' ``categories`` (its earlier name)."""
    from flowrl.rewards.registry import load_rewards

    return load_rewards(config, reward_model_uri, task, categories=categories, spread=spread,
                        first_device=first_device)


def load_monitor_scorer(reward_model_uri: str, task: str, name: str, composite: CompositeReward) -> ScorerReward:
    """The held-out reward model of the hacking monitor: the artifact's ``<task>/<name>`` scorer,
    which must not be one the composite trains on."""
    local = Path(fetch(reward_model_uri))
    directory = local / task / name
    if not directory.is_dir():
        have = sorted(p.name for p in (local / task).iterdir() if p.is_dir()) if (local / task).is_dir() else []
        raise ConfigError(f"grpo.monitor_reward: {reward_model_uri} has no {task} scorer {name!r} (it has {have})")
    trained_on = {(d.parent.name, d.name) for d in map(_scorer_directory, composite.components.values()) if d}
    if (task, name) in trained_on:
        raise ConfigError(f"grpo.monitor_reward: {name!r} is part of the {task} composite GRPO trains on; a monitor "
                          "that the policy optimises cannot see hacking (use pairwise, or an unweighted criterion)")
    return ScorerReward(LazyVLMScorer(directory), name, batch_size=8)


def prompt_categories(*frames) -> dict[str, str]:
    """{prompt: category} over prompt frames (curated and held-out sets)."""
    return {p: c for frame in frames for p, c in zip(frame["prompt"], frame["category"])}


def _scorer_directory(reward: object) -> Path | None:
    """The saved scorer directory behind a composite component (None for a scorer without one)."""
    directory = getattr(getattr(reward, "backbone", None), "directory", None)
    return Path(directory) if directory is not None else None


def served_composite(config: dict, reward_model_uri: str, task: str, prompts_uri: str,
                     spread: bool = False) -> CompositeReward:
    """Reward-server factory, kept for its import path: :func:`flowrl.rewards.registry.served_composite`."""
    from flowrl.rewards.registry import served_composite as served

    return served(config, reward_model_uri, task, prompts_uri, spread=spread)
