"""Production composite rewards, built from a reward_model artifact of VLM scorers.

The components are the task's pointwise scorers in the artifact (directories
``<task>/pointwise_<criterion>``): T2I ``alignment``, ``quality``,
``fidelity``; edit ``instruction`` (the edit alignment scorer) and any other
edit criterion under its own name. Weights come from ``config.rewards`` as in
the shapes world; a component the config names with a positive weight but the
artifact lacks is an error, a weight of 0 drops it.

Prompts carry free-form categories (the prompt files'), so the composite's
``categorize`` looks each prompt up in the table the filter stage wrote;
prompts outside it get the default weights.

Where the scorers run: each loads on first use, in :data:`SCORER_DTYPE`, on
the process's GPU (:func:`flowrl.models.local_device`) unless it is given a
device; a reward server on several GPUs of its own spreads them over those
(:func:`scorer_devices`). A scorer used now and then (the held-out monitor,
the final evaluation) is wrapped in :class:`ReleasedAfterScoring`, which drops
its model after every call.
"""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import torch

from flowrl.config import ConfigError, FlowRLConfig
from flowrl.rewards.composite import CompositeReward
from flowrl.rewards.shapes_rewards import ScorerReward
from flowrl.storage import ArtifactError, fetch

# what a scorer directory's criterion is called as a composite component, per task
_COMPONENT = {("edit", "alignment"): "instruction"}


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


def scorer_directories(local: Path, task: str) -> dict[str, Path]:
    """{component name: directory} of the task's pointwise scorers in an artifact."""
    found = {}
    for directory in sorted((local / task).glob("pointwise_*")):
        criterion = directory.name.removeprefix("pointwise_")
        found[_COMPONENT.get((task, criterion), criterion)] = directory
    return found


def _weights(section: object, key: str, present: set[str]) -> dict[str, float]:
    weights = dataclasses.asdict(section)
    for name, weight in weights.items():
        if weight > 0 and name not in present:
            raise ConfigError(
                f"{key}.{name}: weight {weight} but the reward_model artifact has no {name} scorer for this task "
                f"(it has {sorted(present)}); set the weight to 0 or train that criterion"
            )
    return {name: w for name, w in weights.items() if name in present}


def load_production_rewards(config: FlowRLConfig, reward_model_uri: str, task: str,
                            categories: dict[str, str], *, spread: bool = False,
                            first_device: int = 0) -> CompositeReward:
    """The ``task`` composite over the artifact's VLM scorers; ``categories``
    maps each prompt to its category for the per-category weights. ``spread``:
    the scorers go round-robin over the visible GPUs from ``first_device`` on (a
    reward server on GPUs of its own; the filter's GPUs after the policy's)
    instead of each onto the process's GPU."""
    if config.reward_model.backbone != "vlm":
        raise ConfigError("reward_model.backbone: the qwen_image family scores with the vlm backbone")
    local = Path(fetch(reward_model_uri))
    directories = scorer_directories(local, task)
    if not directories:
        raise ArtifactError(f"{reward_model_uri}: no {task} pointwise scorer (reward_model.{task}_criteria)")
    r = config.rewards
    default_section, overrides, key = (r.t2i, r.t2i_categories, "rewards.t2i") if task == "t2i" else (
        r.edit, r.edit_kinds, "rewards.edit")
    default = _weights(default_section, key, set(directories))
    by_category = {
        f.name: _weights(getattr(overrides, f.name), f"{key}_{'categories' if task == 't2i' else 'kinds'}.{f.name}",
                         set(directories))
        for f in dataclasses.fields(overrides) if getattr(overrides, f.name) is not None
    }
    devices = scorer_devices(len(default), torch.cuda.device_count(), first_device) if spread \
        else [None] * len(default)
    components = {name: ScorerReward(LazyVLMScorer(directories[name], device=device), name, batch_size=8)
                  for name, device in zip(default, devices)}
    table = dict(categories)
    return CompositeReward(components=components, weights=by_category, categorize=lambda p: table.get(p, ""),
                           default_weights=default)


def load_monitor_scorer(reward_model_uri: str, task: str, name: str, composite: CompositeReward) -> ScorerReward:
    """The held-out reward model of the hacking monitor: the artifact's ``<task>/<name>`` scorer,
    which must not be one the composite trains on."""
    local = Path(fetch(reward_model_uri))
    directory = local / task / name
    if not directory.is_dir():
        have = sorted(p.name for p in (local / task).iterdir() if p.is_dir()) if (local / task).is_dir() else []
        raise ConfigError(f"grpo.monitor_reward: {reward_model_uri} has no {task} scorer {name!r} (it has {have})")
    trained_on = {d.name for n, d in scorer_directories(local, task).items() if n in composite.component_names}
    if name in trained_on:
        raise ConfigError(f"grpo.monitor_reward: {name!r} is part of the {task} composite GRPO trains on; a monitor "
                          "that the policy optimises cannot see hacking (use pairwise, or an unweighted criterion)")
    return ScorerReward(LazyVLMScorer(directory), name, batch_size=8)


def prompt_categories(*frames) -> dict[str, str]:
    """{prompt: category} over prompt frames (curated and held-out sets)."""
    return {p: c for frame in frames for p, c in zip(frame["prompt"], frame["category"])}


def served_composite(config: dict, reward_model_uri: str, task: str, prompts_uri: str,
                     spread: bool = False) -> CompositeReward:
    """Reward-server factory for the production composite (config as plain data); the categories
    come from the filter_prompts artifact ``prompts_uri`` (too many to pass on a command line).
    ``spread``: a server on GPUs of its own places the scorers round-robin over them."""
    import pandas as pd

    from flowrl.config import from_dict

    local = Path(fetch(prompts_uri))
    frames = [pd.read_parquet(f) for f in (local / "prompts.parquet", local / "heldout.parquet") if f.is_file()]
    return load_production_rewards(from_dict(FlowRLConfig, config), reward_model_uri, task,
                                   prompt_categories(*frames), spread=spread)
