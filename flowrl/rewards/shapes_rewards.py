"""A trained scorer seen as a reward (:class:`ScorerReward`), and the shapes world's entry points
to the composite rewards, which :mod:`flowrl.rewards.registry` builds for every family from
``config.rewards``: T2I the pointwise alignment, quality and fidelity scorers, edit the pointwise
instruction-following scorer and the identity-preservation embedding scorer.
"""

from __future__ import annotations

import torch

from flowrl.config import FlowRLConfig
from flowrl.rewards.backbone import ScoreBackbone
from flowrl.rewards.base import RewardScores
from flowrl.rewards.composite import CompositeReward
from flowrl.rewards.training import rewards_of


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


def load_shapes_rewards(config: FlowRLConfig, reward_model_uri: str) -> dict[str, CompositeReward]:
    """{"t2i": ..., "edit": ...}: both tasks' composites of ``config.rewards`` over one fetch of the
    artifact (:func:`flowrl.rewards.registry.load_task_rewards`), for callers that score both."""
    from flowrl.rewards.registry import load_task_rewards

    return load_task_rewards(config, reward_model_uri)


def served_composite(config: dict, reward_model_uri: str, task: str) -> CompositeReward:
    """Reward-server factory, kept for its import path: :func:`flowrl.rewards.registry.served_composite`."""
    from flowrl.rewards.registry import served_composite as served

    return served(config, reward_model_uri, task)
