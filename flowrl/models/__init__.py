"""Model families, chosen by name, and their checkpoints.

This is the only place that knows which families exist; everything else
holds a :class:`~flowrl.models.base.FlowModel`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flowrl.config import ConfigError, FlowRLConfig, ShapesModelConfig, from_dict
from flowrl.models.base import Condition, FlowModel

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_META = "model.json"

__all__ = [
    "Condition", "FlowModel", "CheckpointError", "create_model", "save_checkpoint", "load_checkpoint",
]


class CheckpointError(RuntimeError):
    """A checkpoint is missing, of the wrong family, or does not fit the model."""


def create_model(config: FlowRLConfig, seed: int = 0) -> FlowModel:
    """A freshly initialised trainable model. Only the shapes family: Qwen-Image
    is never trained from scratch, it is loaded with ``QwenImageModel.from_pretrained``."""
    if config.model.family != "shapes":
        raise ValueError(f"model.family {config.model.family!r} cannot be created from scratch")
    from flowrl.models.shapes_dit import ShapesFlowModel

    return ShapesFlowModel.create(
        config.model.shapes, config.world.resolution, cfg_renorm=config.sampler.cfg_renorm, seed=seed
    )


def save_checkpoint(model: FlowModel, directory: str | Path) -> None:
    """Weights as safetensors plus a small JSON describing how to rebuild the model."""
    from flowrl.models.shapes_dit import ShapesFlowModel

    if not isinstance(model, ShapesFlowModel):
        raise TypeError(f"save_checkpoint supports the shapes family, got {type(model).__name__}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.net.state_dict().items()}
    save_file(state, directory / CHECKPOINT_WEIGHTS)
    meta = {
        "family": "shapes",
        "resolution": model.net.resolution,
        "shapes": dataclasses.asdict(model.net.config),
    }
    (directory / CHECKPOINT_META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_checkpoint(
    directory: str | Path, expected_family: str | None = None, cfg_renorm: bool = False
) -> FlowModel:
    """Rebuild a model saved by :func:`save_checkpoint` (safetensors only, never pickle).

    ``cfg_renorm`` is the caller's ``sampler.cfg_renorm``: a sampling choice,
    so it is not stored with the weights.
    """
    from flowrl.models.shapes_dit import ShapesDiT, ShapesFlowModel

    directory = Path(directory)
    meta_path, weights_path = directory / CHECKPOINT_META, directory / CHECKPOINT_WEIGHTS
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{directory}: missing {path.name}")
    try:
        meta = json.loads(meta_path.read_text())
        family = meta["family"]
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({exc})") from None
    if expected_family and family != expected_family:
        raise CheckpointError(f"{directory}: checkpoint family {family!r}, expected {expected_family!r}")
    if family != "shapes":
        raise CheckpointError(f"{meta_path}: unknown model family {family!r}")
    try:
        arch = from_dict(ShapesModelConfig, meta["shapes"], "shapes.")
    except (ConfigError, KeyError) as exc:
        raise CheckpointError(f"{meta_path}: {exc}") from None
    net = ShapesDiT(arch, int(meta["resolution"]))
    try:
        state = load_file(weights_path)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({exc})") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_path}: weights do not fit the model: {exc}") from None
    net.eval()
    return ShapesFlowModel(net, cfg_renorm=cfg_renorm)


def count_parameters(model: FlowModel) -> int:
    return sum(p.numel() for p in model.parameters())


def set_torch_threads(n: int | None) -> None:
    """Cap torch's intra-op threads (None leaves torch's default)."""
    if n is not None:
        torch.set_num_threads(n)
