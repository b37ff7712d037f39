"""The model protocol every algorithm in flowrl talks to.

A model family (the shapes-world DiT, Qwen-Image, ...) lives in one adapter
file that implements :class:`FlowModel`. Samplers, GRPO and OPD only use the
methods below and never branch on the family.

Conventions (SD3 / Qwen-Image / diffusers FlowMatchEulerDiscreteScheduler):
``x_t = (1 - t) x_0 + t * eps``, the model predicts the velocity
``v = eps - x_0``, and sampling runs from t = 1 (noise) to t = 0 (data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class Condition:
    """Everything a model needs to condition one batch on, already encoded.

    ``tensors`` holds the family-specific tensors (prompt embeddings, masks,
    source-image latents for edits, ...), each with the batch as its first
    dimension so conditions can be concatenated and indexed. ``extras`` holds
    batch-independent values (image sizes, ...).
    """

    tensors: dict[str, torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def cat(self, other: "Condition") -> "Condition":
        """Stack two conditions along the batch (used by batched CFG)."""
        if self.tensors.keys() != other.tensors.keys():
            raise ValueError(
                f"cannot concatenate conditions with keys {sorted(self.tensors)} "
                f"and {sorted(other.tensors)}"
            )
        return Condition(
            {k: torch.cat([v, other.tensors[k]], dim=0) for k, v in self.tensors.items()},
            dict(self.extras),
        )

    def index(self, idx: torch.Tensor | slice) -> "Condition":
        return Condition({k: v[idx] for k, v in self.tensors.items()}, dict(self.extras))

    def to(self, device: torch.device | str) -> "Condition":
        return Condition({k: v.to(device) for k, v in self.tensors.items()}, dict(self.extras))


@runtime_checkable
class FlowModel(Protocol):
    """A flow-matching image model seen through the eyes of the algorithms."""

    #: Dimension along which CFG rescales the guided velocity to the
    #: conditional norm (None = plain CFG). Qwen-Image: -1 (packed channels).
    cfg_renorm_dim: int | None

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Predicted velocity for states ``x`` [B, *latent] at times ``t`` [B] in [0, 1]."""

    def encode_prompts(
        self, prompts: list[str], sources: torch.Tensor | None = None
    ) -> Condition:
        """Conditional inputs for a batch of prompts (and edit source images [B, 3, H, W] in [0, 1])."""

    def null_condition(self, cond: Condition) -> Condition:
        """The unconditional (empty prompt) counterpart of ``cond`` for CFG,
        with tensors of the same shapes so both run in one batched forward.

        For edits the source image stays: only the text is dropped, as in
        Qwen-Image-Edit's negative branch.
        """

    def schedule(self, num_steps: int, shift: float = 1.0) -> torch.Tensor:
        """The N + 1 sigmas (1 -> 0) this family samples with; families with a
        resolution-dependent shift (Qwen-Image) ignore ``shift``."""

    def prepare_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial noise [B, *latent] drawn the way the family's reference
        pipeline draws it, so a seed gives the same image as there."""

    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent, without the batch dimension."""

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> latents [B, *latent]."""

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, *latent] -> images [B, 3, H, W] in [0, 1]."""


def unwrap_network(net: torch.nn.Module) -> torch.nn.Module:
    """The network behind its wrappers: DDP or DeepSpeed (``module``) and a LoRA adapter view (``network``,
    :mod:`flowrl.models.lora`), however deeply nested."""
    while True:
        inner = getattr(net, "network", None)
        inner = inner if isinstance(inner, torch.nn.Module) else getattr(net, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return net
        net = inner
