"""What a reward-model backbone must provide, whatever it is built on.

Both paradigms (pointwise and pairwise) train the same backbone: it maps a
batch of (image, prompt[, source]) to logits over the five Likert levels.
The shapes-world scorer and the Qwen2.5-VL scorer implement this.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ScoreBackbone(Protocol):
    def level_logits(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> torch.Tensor:
        """images [B, 3, H, W] in [0, 1] -> logits [B, 5] over the levels 1..5."""

    def training_loss(
        self,
        images: torch.Tensor,
        prompts: list[str],
        rationales: list[str] | None,
        labels: torch.Tensor,
        sources: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The pointwise objective on Likert ``labels`` [B] in 1..5 (plus, for
        backbones that write text, the loss on the annotated rationales)."""

    def parameters(self): ...

    def save(self, directory) -> None:
        """Write the weights (safetensors / save_pretrained) and how to rebuild them."""
