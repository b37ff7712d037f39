"""Rule-based rewards: computed from the image by a fixed rule, with no model and no artifact.

:class:`JpegCompressibility` is DDPO's compressibility reward: the negated size, in kilobytes, of the image
saved as a JPEG at a fixed quality. It pays for flat, simple images and against noise and texture; DDPO
used it (and its negation, incompressibility) as a reward any image model can be trained on, whose
optimum is easy to see. Registered as the scorer type ``jpeg_compressibility``
(flowrl/rewards/registry.py).
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from flowrl.rewards.base import RewardScores

__all__ = ["JpegCompressibility", "jpeg_kilobytes"]


def jpeg_kilobytes(image: np.ndarray, quality: int = 95) -> float:
    """Size in kilobytes (1000 bytes) of one [H, W, 3] uint8 image saved as a baseline JPEG at ``quality``."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


class JpegCompressibility:
    """Reward = -(JPEG kilobytes of the image at ``quality``): higher for images that compress better.
    ``sign`` -1 gives incompressibility. Deterministic; runs on the CPU."""

    def __init__(self, name: str = "compressibility", quality: int = 95, sign: float = 1.0):
        if not 1 <= quality <= 95:
            raise ValueError(f"JPEG quality must be in 1..95, got {quality}")
        self.name, self.quality, self.sign = name, quality, sign  # unbounded below: no score_range

    def score(self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None) -> torch.Tensor:
        from flowrl.evaluation import to_uint8

        sizes = [jpeg_kilobytes(image, self.quality) for image in to_uint8(images)]
        return -self.sign * torch.tensor(sizes, dtype=torch.float32)

    def score_components(self, images, prompts, sources=None) -> RewardScores:
        total = self.score(images, prompts, sources)
        return RewardScores(total=total, components={self.name: total})
