"""The one protocol every reward shares.

A reward scores a batch of generated images against their prompts (and, for
edits, the source images) and returns one number per image. Composite
rewards also expose their components, because GRPO normalises each component
within a prompt group before weighting them (docs/design.md, Math).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class RewardScores:
    """Scores of one batch: the weighted total and each named component."""

    total: torch.Tensor  # [B]
    components: dict[str, torch.Tensor]  # name -> [B]


@runtime_checkable
class RewardModel(Protocol):
    """``images`` [B, 3, H, W] float in [0, 1]; ``sources`` likewise or None."""

    def score(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One finite reward per image -> [B]."""

    def score_components(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> RewardScores:
        """The total and its named parts (a single model: one component)."""
