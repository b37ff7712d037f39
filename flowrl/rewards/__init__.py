"""Reward models: one protocol, learned scorers, composites, and a server."""

from flowrl.rewards.base import RewardModel, RewardScores
from flowrl.rewards.composite import CompositeReward, shapes_category
from flowrl.rewards.identity import FaceIdentityScorer, ShapesIdentityScorer, TorchFaceEmbedder

__all__ = [
    "CompositeReward", "FaceIdentityScorer", "RewardModel", "RewardScores",
    "ShapesIdentityScorer", "TorchFaceEmbedder", "shapes_category",
]
