"""The shapes-world reward-model backbone: a small image + prompt scorer.

Patch tokens of the image attend jointly with the prompt tokens; for edits,
tokens of the source image join them, each carrying its cell of the source
and what changed there (output minus source), at the same rotary position
as the image's cell, as in the generator. The mean and the max of the image
tokens go through a head to logits over the five Likert levels (the max lets
a single local flaw, such as a stray blob, through). It trains on CPU in
minutes.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from flowrl.models.shapes_dit import Block, axial_rope, masked_mean, sequence_rotations
from flowrl.rewards.losses import LEVELS, pointwise_loss
from flowrl.shapes import vocab

WEIGHTS, META = "scorer.safetensors", "scorer.json"


@dataclass(frozen=True)
class ScorerArch:
    width: int = 64
    depth: int = 3
    heads: int = 4
    patch: int = 8
    stem: int = 0  # channels of a convolutional stem before the patches (0: none, pixels only)


class ShapesScorer(nn.Module):
    """``level_logits(images, prompts, sources)`` -> [B, 5] (the ScoreBackbone protocol)."""

    def __init__(self, arch: ScorerArch, resolution: int):
        super().__init__()
        self.arch, self.resolution = arch, resolution
        width, patch = arch.width, arch.patch
        grid = resolution // patch
        # a small convolutional stem gives each patch local texture and colour features (noise, blur, a colour
        # cast) that one linear map of its pixels into `width` numbers cannot keep
        self.stem = None if not arch.stem else nn.Sequential(
            nn.Conv2d(3, arch.stem, 3, padding=1), nn.GELU(), nn.Conv2d(arch.stem, arch.stem, 3, padding=1), nn.GELU())
        self.image_in = nn.Linear((3 + arch.stem) * patch * patch, width)
        self.source_in = nn.Linear(2 * 3 * patch * patch, width)  # source patch and its change
        self.image_pos = nn.Parameter(torch.randn(1, grid * grid, width) * 0.02)
        self.word = nn.Embedding(len(vocab.VOCAB), width, padding_idx=0)
        self.text_pos = nn.Parameter(torch.randn(1, vocab.MAX_PROMPT_TOKENS, width) * 0.02)
        self.blocks = nn.ModuleList(Block(width, arch.heads) for _ in range(arch.depth))
        for block in self.blocks:  # start with open gates: a scorer has no identity to preserve
            nn.init.normal_(block.modulation.weight, std=0.02)
        # mean and max over the image tokens: the max lets one local flaw (a stray blob) through
        self.head = nn.Sequential(nn.LayerNorm(2 * width), nn.Linear(2 * width, LEVELS))
        cos, sin = axial_rope(grid, width // arch.heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _patches(self, images: torch.Tensor) -> torch.Tensor:
        # [B, 3, H, W] in [0, 1] -> [B, N, 3 p p] in [-1, 1]
        p = self.arch.patch
        return F.unfold(images * 2 - 1, kernel_size=p, stride=p).transpose(1, 2)

    def _image_patches(self, images: torch.Tensor) -> torch.Tensor:
        """The scored image's patches: its pixels and, with a stem, the stem's features at every pixel."""
        if self.stem is None:
            return self._patches(images)
        x = images * 2 - 1
        p = self.arch.patch
        return F.unfold(torch.cat([x, self.stem(x)], dim=1), kernel_size=p, stride=p).transpose(1, 2)

    def level_logits(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> torch.Tensor:
        tokens = vocab.tokenize(prompts, vocab.MAX_PROMPT_TOKENS).to(images.device)  # [B, T]
        text_mask = tokens != 0
        text = self.word(tokens) + self.text_pos  # [B, T, D]
        pooled = masked_mean(text, text_mask)  # [B, D]
        image = self.image_in(self._image_patches(images)) + self.image_pos  # [B, N, D]
        parts, n_images = [text, image], 1
        if sources is not None:
            # each source token also sees what changed in its cell: the cell-wise difference is
            # the direct evidence of an edit (and of drift where nothing should have changed)
            src = self._patches(sources)
            parts.append(self.source_in(torch.cat([src, self._patches(images) - src], dim=-1)) + self.image_pos)
            n_images = 2
        h = torch.cat(parts, dim=1)  # [B, L, D]
        ones = torch.ones(image.shape[:2], dtype=torch.bool, device=images.device)
        mask = torch.cat([text_mask] + [ones] * n_images, dim=1)[:, None, None, :]  # [B, 1, 1, L]
        cos, sin = sequence_rotations(self.rope_cos, self.rope_sin, tokens.shape[1], n_images)  # [L, P]
        for block in self.blocks:
            h = block(h, pooled, mask, cos, sin)
        n_text = tokens.shape[1]
        image_tokens = h[:, n_text : n_text + image.shape[1]]
        pooled = torch.cat([image_tokens.mean(dim=1), image_tokens.amax(dim=1)], dim=-1)  # [B, 2D]
        return self.head(pooled)  # [B, 5]

    def training_loss(
        self,
        images: torch.Tensor,
        prompts: list[str],
        rationales: list[str] | None,
        labels: torch.Tensor,
        sources: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Cross-entropy on the levels; this scorer writes no text, so rationales are unused."""
        return pointwise_loss(self.level_logits(images, prompts, sources), labels)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / WEIGHTS)
        meta = {"backbone": "shapes", "resolution": self.resolution, "arch": dataclasses.asdict(self.arch)}
        (directory / META).write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, directory: str | Path) -> "ShapesScorer":
        directory = Path(directory)
        meta = json.loads((directory / META).read_text())
        scorer = cls(ScorerArch(**meta["arch"]), int(meta["resolution"]))
        scorer.load_state_dict(load_file(directory / WEIGHTS), strict=True)
        return scorer.eval()
