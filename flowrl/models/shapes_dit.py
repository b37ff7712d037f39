"""The shapes-world model family: a small pixel-space DiT.

One network for both tasks. The sequence is ``[prompt tokens | image patch
tokens | source patch tokens (edits only)]`` with joint attention over all of
it, as Qwen-Image-Edit appends the source latents to the image sequence.
Blocks are modulated (adaLN) by the time embedding plus the pooled prompt.

By default the network predicts the clean image and the velocity is derived
from it, ``v = (x_t - x0_hat) / t``: on 32x32 shapes this learned faster than
predicting v directly, while training still minimises the velocity loss.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from flowrl.config import ShapesModelConfig
from flowrl.models.base import Condition
from flowrl.sampling import flow_match_sigmas
from flowrl.shapes import vocab

# x-prediction divides by t; below this t the division is clamped (as JiT
# does), in training and sampling alike. A uniform schedule of up to 20
# steps never evaluates the model below it.
_MIN_T_FOR_X_PRED = 0.05


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of t in [0, 1] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (t.float() * 1000.0)[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def axial_rope(grid: int, head_dim: int, base: float = 100.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [grid * grid, head_dim / 2] of a 2D rotary embedding: the first
    half of each head's pairs rotates with the row, the second with the column.

    Image and source tokens of the same cell get the same rotation, so their
    attention score does not depend on where the cell is: what lets an edit
    copy an untouched cell from the source, as Qwen-Image's MSRoPE does.
    """
    pairs = head_dim // 2
    per_axis = pairs // 2
    freqs = base ** (-torch.arange(per_axis, dtype=torch.float32) / per_axis)  # [P/2]
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    angles = torch.cat(
        [rows.reshape(-1, 1).float() * freqs, cols.reshape(-1, 1).float() * freqs], dim=-1
    )  # [N, P]
    return torch.cos(angles), torch.sin(angles)


def sequence_rotations(
    cos: torch.Tensor, sin: torch.Tensor, n_text: int, n_images: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rotations of ``[text | image | source ...]``: none for the
    text tokens, the cell's (``cos``/``sin`` [N, P]) for every image block."""
    pairs, device = cos.shape[1], cos.device
    full_cos = torch.cat([torch.ones(n_text, pairs, device=device)] + [cos] * n_images)  # [L, P]
    full_sin = torch.cat([torch.zeros(n_text, pairs, device=device)] + [sin] * n_images)  # [L, P]
    return full_cos, full_sin


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x [B, T, D] over the positions where mask [B, T] is True -> [B, D]."""
    return (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x [..., L, Dh] by per-token angles (cos, sin [L, Dh/2]):
    ``(x1, x2) -> (x1 cos - x2 sin, x1 sin + x2 cos)``.

    Computed as ``x * cos' + swap(x) * sin'`` with the tables repeated per pair and the sine's sign
    folded in (``sin' = (-sin, sin)``): the same products and sums, so the same bits as the pairwise
    form, in four whole-tensor operations instead of strided halves and a stack."""
    cos2 = cos.repeat_interleave(2, dim=-1)  # [L, Dh]
    sin2 = torch.stack([-sin, sin], dim=-1).flatten(-2)  # [L, Dh]
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x2, x1) in each pair
    return x * cos2 + swapped * sin2


def shapes_parameter_count(config: ShapesModelConfig, resolution: int) -> int:
    """Parameters of ``ShapesDiT(config, resolution)``, without building it (what a checkpoint's
    ``model.json`` asks to allocate)."""
    w, p, hc = config.width, config.patch, config.head_channels
    patch_dim = 3 * p * p
    linear = lambda n_in, n_out: n_in * n_out + n_out  # noqa: E731  weight and bias
    block = linear(w, 3 * w) + linear(w, w) + linear(w, 4 * w) + linear(4 * w, w) + linear(w, 6 * w)
    return (
        2 * linear(patch_dim, w)  # patch_in, source_in
        + (resolution // p) ** 2 * w + w  # image_pos, source_type
        + (len(vocab.VOCAB) + vocab.MAX_PROMPT_TOKENS) * w  # word, text_pos
        + 2 * linear(w, w) + linear(w, w)  # time_mlp, text_pool
        + config.depth * block
        + linear(w, 2 * w) + linear(w, hc * p * p)  # out_modulation, patch_out
        + hc * 3 * 9 + 3  # conv_out
    )


class Block(nn.Module):
    """Pre-norm transformer block with adaLN shift/scale/gate modulation."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.modulation = nn.Linear(width, 6 * width)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(
        self, h: torch.Tensor, c: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        # h: [B, L, D], c: [B, D], mask: [B, 1, 1, L] (True = attend), cos/sin: [L, D/H/2]
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c))[:, None].chunk(6, -1)
        x = self.norm1(h) * (1 + scale1) + shift1
        b, length, d = x.shape
        qkv = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rope(qkv[:2], cos, sin)  # queries and keys rotated together: [B, H, L, D/H] each
        v = qkv[2]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, L, D/H]
        h = h + gate1 * self.proj(att.transpose(1, 2).reshape(b, length, d))
        x = self.norm2(h) * (1 + scale2) + shift2
        return h + gate2 * self.mlp(x)


class ShapesDiT(nn.Module):
    """The network. ``forward`` returns the velocity for states x [B, 3, H, W]."""

    def __init__(self, config: ShapesModelConfig, resolution: int):
        super().__init__()
        self.config = config
        self.resolution = resolution
        width, patch = config.width, config.patch
        self.grid = resolution // patch
        n_patches = self.grid**2
        patch_dim = 3 * patch * patch
        self.patch_in = nn.Linear(patch_dim, width)
        self.source_in = nn.Linear(patch_dim, width)
        self.image_pos = nn.Parameter(torch.randn(1, n_patches, width) * 0.02)
        self.source_type = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.word = nn.Embedding(len(vocab.VOCAB), width, padding_idx=0)
        self.text_pos = nn.Parameter(torch.randn(1, vocab.MAX_PROMPT_TOKENS, width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.text_pool = nn.Linear(width, width)
        self.blocks = nn.ModuleList(Block(width, config.heads) for _ in range(config.depth))
        self.norm_out = nn.LayerNorm(width, elementwise_affine=False)
        self.out_modulation = nn.Linear(width, 2 * width)
        self.patch_out = nn.Linear(width, config.head_channels * patch * patch)
        self.conv_out = nn.Conv2d(config.head_channels, 3, kernel_size=3, padding=1)
        cos, sin = axial_rope(self.grid, width // config.heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def _patchify(self, img: torch.Tensor) -> torch.Tensor:
        # [B, C, H, W] -> [B, N, C * p * p], patches row-major, features (channel, row, column): F.unfold's
        # layout with stride = kernel, as a view and one copy (exact, and several times faster than unfold)
        p, g = self.config.patch, self.grid
        b, c = img.shape[:2]
        return img.reshape(b, c, g, p, g, p).permute(0, 2, 4, 1, 3, 5).reshape(b, g * g, c * p * p)

    def _unpatchify(self, tokens: torch.Tensor) -> torch.Tensor:
        # [B, N, C * p * p] -> [B, C, H, W], the inverse of _patchify (F.fold's result for disjoint patches)
        p, g = self.config.patch, self.grid
        b, c = tokens.shape[0], tokens.shape[2] // (p * p)
        return tokens.reshape(b, g, g, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, g * p, g * p)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor, source: torch.Tensor | None
    ) -> torch.Tensor:
        # x: [B, 3, H, W] state, t: [B], tokens: [B, T] (0 = pad), source: [B, 3, H, W] or None
        tokens = tokens.to(x.device)
        text_mask = tokens != 0  # [B, T]
        text = self.word(tokens) + self.text_pos[:, : tokens.shape[1]]  # [B, T, D]
        pooled = masked_mean(text, text_mask)  # [B, D]
        c = self.time_mlp(timestep_embedding(t, self.config.width)) + self.text_pool(pooled)  # [B, D]
        image = self.patch_in(self._patchify(x)) + self.image_pos  # [B, N, D]
        image_mask = torch.ones(image.shape[:2], dtype=torch.bool, device=x.device)  # [B, N]
        parts, masks = [text, image], [text_mask, image_mask]
        if source is not None:
            parts.append(self.source_in(self._patchify(source)) + self.image_pos + self.source_type)
            masks.append(image_mask)
        h = torch.cat(parts, dim=1)  # [B, L, D]
        mask = torch.cat(masks, dim=1)[:, None, None, :]  # [B, 1, 1, L]
        cos, sin = sequence_rotations(self.rope_cos, self.rope_sin, tokens.shape[1], len(parts) - 1)  # [L, D/H/2]
        for block in self.blocks:
            h = block(h, c, mask, cos, sin)
        n_text = tokens.shape[1]
        h = h[:, n_text : n_text + image.shape[1]]  # image tokens only
        shift, scale = self.out_modulation(F.silu(c))[:, None].chunk(2, -1)
        out = self.patch_out(self.norm_out(h) * (1 + scale) + shift)  # [B, N, C' p p]
        # channels-last input: oneDNN's convolution skips its layout conversions (same values)
        pred = self.conv_out(self._unpatchify(out).contiguous(memory_format=torch.channels_last))  # [B, 3, H, W]
        if self.config.prediction == "v":
            return pred
        tb = t.clamp(min=_MIN_T_FOR_X_PRED)[:, None, None, None]
        return (x - pred) / tb


class ShapesFlowModel:
    """The :class:`FlowModel` adapter of the shapes family.

    Latents are the pixels mapped to [-1, 1] (no autoencoder at this size).
    """

    def __init__(self, net: ShapesDiT, cfg_renorm: bool = False):
        self.net = net
        # per-pixel renorm over the colour channels when the config asks for it
        self.cfg_renorm_dim: int | None = 1 if cfg_renorm else None

    @classmethod
    def create(cls, config: ShapesModelConfig, resolution: int, cfg_renorm: bool = False, seed: int = 0):
        torch.manual_seed(seed)
        return cls(ShapesDiT(config, resolution), cfg_renorm)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        return self.net(x, t, cond.tensors["tokens"], cond.tensors.get("source"))

    def encode_prompts(self, prompts: list[str], sources: torch.Tensor | None = None) -> Condition:
        tensors = {"tokens": vocab.tokenize(prompts, vocab.MAX_PROMPT_TOKENS)}
        if sources is not None:
            if sources.shape[0] != len(prompts):
                raise ValueError(f"{len(prompts)} prompts but {sources.shape[0]} source images")
            tensors["source"] = self.encode_images(sources)
        return Condition(tensors)

    def null_condition(self, cond: Condition) -> Condition:
        tensors = dict(cond.tensors)
        tensors["tokens"] = torch.zeros_like(cond.tensors["tokens"])
        return Condition(tensors, dict(cond.extras))

    def schedule(self, num_steps: int, shift: float = 1.0) -> torch.Tensor:
        return flow_match_sigmas(num_steps, shift=shift)

    def prepare_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randn((batch_size, *self.latent_shape()), generator=generator)

    def latent_shape(self) -> tuple[int, ...]:
        return (3, self.net.resolution, self.net.resolution)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return images * 2.0 - 1.0

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        return ((latents + 1.0) / 2.0).clamp(0.0, 1.0)

    def parameters(self):
        return self.net.parameters()

    def with_trainable(self, net: torch.nn.Module) -> "ShapesFlowModel":
        """The same adapter around another network (a reference policy, a teacher, trained weights); the
        name every family's model answers to (Qwen-Image: around another transformer)."""
        view = copy.copy(self)
        view.net = net
        return view
