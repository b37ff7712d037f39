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
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from flowrl.config import ConfigError, FlowRLConfig
from flowrl.rewards.composite import CompositeReward
from flowrl.rewards.shapes_rewards import ScorerReward
from flowrl.storage import ArtifactError, fetch

# what a scorer directory's criterion is called as a composite component, per task
_COMPONENT = {("edit", "alignment"): "instruction"}


class LazyVLMScorer:
    """A saved Qwen2.5-VL scorer, loaded on its first use: a rank that never scores
    (the monitor runs on rank 0 only) or a trainer whose rewards come from a reward
    server keeps only the composite's weights, not the models."""

    def __init__(self, directory: Path):
        if not (directory / "config.json").is_file():  # checked now, before any rollout, not at first use
            raise ArtifactError(f"{directory}: not a saved scorer (no config.json)")
        self.directory, self._scorer = directory, None

    def level_logits(self, images, prompts, sources=None):
        if self._scorer is None:
            from flowrl.models import local_device
            from flowrl.rewards.vlm import QwenVLScorer

            self._scorer = QwenVLScorer.from_pretrained(self.directory, device=local_device()).eval()
        return self._scorer.level_logits(images, prompts, sources)


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
                            categories: dict[str, str]) -> CompositeReward:
    """The ``task`` composite over the artifact's VLM scorers; ``categories``
    maps each prompt to its category for the per-category weights."""
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
    components = {name: ScorerReward(LazyVLMScorer(directories[name]), name, batch_size=8) for name in default}
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


def served_composite(config: dict, reward_model_uri: str, task: str, prompts_uri: str) -> CompositeReward:
    """Reward-server factory for the production composite (config as plain data); the categories
    come from the filter_prompts artifact ``prompts_uri`` (too many to pass on a command line)."""
    import pandas as pd

    from flowrl.config import from_dict

    local = Path(fetch(prompts_uri))
    frames = [pd.read_parquet(f) for f in (local / "prompts.parquet", local / "heldout.parquet") if f.is_file()]
    return load_production_rewards(from_dict(FlowRLConfig, config), reward_model_uri, task,
                                   prompt_categories(*frames))
