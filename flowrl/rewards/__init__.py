"""Reward models: one protocol, learned scorers, composites, and a server."""

from flowrl.rewards.base import RewardModel, RewardScores

__all__ = ["RewardModel", "RewardScores"]
