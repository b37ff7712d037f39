"""Reward-model math as small pure functions (tensors in, tensors out).

A scorer backbone outputs logits over the five Likert levels 1..5.
Pointwise training is cross-entropy on the annotated level and the reward is
the expected level; pairwise training is Bradley-Terry on the two images'
rewards, ties counting half a win each way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LEVELS = 5


def expected_score(level_logits: torch.Tensor) -> torch.Tensor:
    """[B, 5] logits -> [B] expected level in [1, 5]."""
    levels = torch.arange(1, LEVELS + 1, dtype=level_logits.dtype, device=level_logits.device)  # [5]
    return (level_logits.softmax(dim=-1) * levels).sum(dim=-1)  # [B]


def pointwise_loss(level_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on Likert labels in 1..5; [B, 5], [B] -> scalar."""
    return F.cross_entropy(level_logits, labels.long() - 1)


def bradley_terry_loss(
    reward_a: torch.Tensor, reward_b: torch.Tensor, preference: torch.Tensor
) -> torch.Tensor:
    """-[p log s(r_a - r_b) + (1 - p) log s(r_b - r_a)] averaged; ``preference``
    [B] is 1 when a is preferred, 0 when b is, 0.5 for a tie."""
    margin = reward_a - reward_b  # [B]
    return -(preference * F.logsigmoid(margin) + (1 - preference) * F.logsigmoid(-margin)).mean()
