"""The shapes world's composite rewards, built from a reward_model artifact.

T2I: the pointwise alignment, quality and fidelity scorers. Edit: the
pointwise instruction-following scorer and the identity-preservation
embedding scorer. Weights per prompt category come from ``config.rewards``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from flowrl.config import FlowRLConfig
from flowrl.rewards.backbone import ScoreBackbone
from flowrl.rewards.base import RewardScores
from flowrl.rewards.composite import CompositeReward, shapes_category
from flowrl.rewards.identity import ShapesIdentityScorer
from flowrl.rewards.shapes_scorer import ShapesScorer
from flowrl.rewards.training import rewards_of
from flowrl.storage import ArtifactError, fetch


class ScorerReward:
    """A trained scorer seen as a reward: the expected Likert level in [1, 5]."""

    score_range = (1.0, 5.0)

    def __init__(self, backbone: ScoreBackbone, name: str, batch_size: int = 256):
        self.backbone, self.name, self.batch_size = backbone, name, batch_size

    def score(self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None) -> torch.Tensor:
        return rewards_of(self.backbone, images, prompts, sources, self.batch_size)

    def score_components(self, images, prompts, sources=None) -> RewardScores:
        total = self.score(images, prompts, sources)
        return RewardScores(total=total, components={self.name: total})


def _rows(default, overrides) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    by_category = {
        f.name: dataclasses.asdict(getattr(overrides, f.name))
        for f in dataclasses.fields(overrides)
        if getattr(overrides, f.name) is not None
    }
    return dataclasses.asdict(default), by_category


def load_shapes_rewards(config: FlowRLConfig, reward_model_uri: str) -> dict[str, CompositeReward]:
    """{"t2i": ..., "edit": ...} composite rewards over the artifact's scorers."""
    local = Path(fetch(reward_model_uri))

    def load(task: str, name: str) -> ScorerReward:
        directory = local / task / f"pointwise_{name}"
        if not directory.is_dir():
            raise ArtifactError(
                f"{reward_model_uri}: no {task} pointwise {name} model (add {name!r} to "
                f"reward_model.{task}_criteria and rerun the stage)"
            )
        return ScorerReward(ShapesScorer.load(directory), name)

    t2i_default, t2i_rows = _rows(config.rewards.t2i, config.rewards.t2i_categories)
    edit_default, edit_rows = _rows(config.rewards.edit, config.rewards.edit_kinds)
    t2i = CompositeReward(
        components={name: load("t2i", name) for name in ("alignment", "quality", "fidelity")},
        weights=t2i_rows, categorize=shapes_category, default_weights=t2i_default,
    )
    edit = CompositeReward(
        components={"instruction": load("edit", "alignment"), "identity": ShapesIdentityScorer()},
        weights=edit_rows, categorize=shapes_category, default_weights=edit_default,
    )
    return {"t2i": t2i, "edit": edit}


def served_composite(config: dict, reward_model_uri: str, task: str) -> CompositeReward:
    """Reward-server factory: the task's composite from a config given as plain
    data (``FlowRLConfig.to_dict()``), e.g.
    ``--reward t2i=flowrl.rewards.shapes_rewards:served_composite --reward-kwargs t2i='{...}'``."""
    from flowrl.config import FlowRLConfig, from_dict

    return load_shapes_rewards(from_dict(FlowRLConfig, config), reward_model_uri)[task]
