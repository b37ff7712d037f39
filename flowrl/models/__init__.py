"""Model families, chosen by name, and their checkpoints.

This is the only place that knows which families exist; everything else
holds a :class:`~flowrl.models.base.FlowModel`.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flowrl.config import ConfigError, FlowRLConfig, ShapesModelConfig, from_dict
from flowrl.models.base import Condition, FlowModel

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_META = "model.json"
QWEN_REFERENCE = "reference.json"  # a qwen_image model artifact: which pretrained weights it builds on
QWEN_TRANSFORMER = "transformer"  # ... and, when it was trained, its transformer (diffusers save_pretrained)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

__all__ = [
    "Condition", "FlowModel", "CheckpointError", "create_model", "save_checkpoint", "load_checkpoint",
    "load_policy", "save_policy", "trainable_module",
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
    so it is not stored with the weights. ``model.json`` is checked against its
    schema (:func:`read_checkpoint_meta`) before anything is allocated.
    """
    from flowrl.models.shapes_dit import ShapesDiT, ShapesFlowModel, shapes_parameter_count

    directory = Path(directory)
    meta_path, weights_path = directory / CHECKPOINT_META, directory / CHECKPOINT_WEIGHTS
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise CheckpointError(f"{directory}: missing {path.name}")
    arch, resolution = read_checkpoint_meta(meta_path, expected_family)
    try:
        with safe_open(str(weights_path), "pt") as handle:  # reads the header alone
            stored = sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({str(exc)[:200]})") from None
    # the model model.json asks for is built only when the file holds as many elements: a small file
    # cannot make this process allocate a large model
    needed = shapes_parameter_count(arch, resolution)
    if stored < needed:
        raise CheckpointError(f"{weights_path}: weights do not fit the model: {meta_path.name} describes "
                              f"{needed} parameters, the file holds {stored} elements")
    net = ShapesDiT(arch, resolution)
    try:
        state = load_file(weights_path)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{weights_path}: unreadable safetensors file ({str(exc)[:200]})") from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights_path}: weights do not fit the model: {exc}") from None
    net.eval()
    return ShapesFlowModel(net, cfg_renorm=cfg_renorm)


# The schema of a shapes checkpoint's model.json. It is read from an artifact, so it is untrusted: the
# ``shapes`` keys within their config bounds (flowrl.config.ShapesModelConfig), a resolution of at most
# MODEL_JSON_MAX_RESOLUTION (world.resolution is 32 or 64) and a model of at most MAX_SHAPES_PARAMETERS;
# a model.json asking for more is refused before a tensor is allocated.
MODEL_JSON_MAX_BYTES = 64 * 1024
MODEL_JSON_MAX_RESOLUTION = 256
MAX_SHAPES_PARAMETERS = 1 << 30  # 4 GiB of fp32 weights, some 500 times the shipped shapes model
_MODEL_JSON_KEYS = ("family", "resolution", "shapes")
MODEL_FAMILIES = ("shapes", "qwen_image")


def read_checkpoint_meta(meta_path: Path, expected_family: str | None = None) -> tuple[ShapesModelConfig, int]:
    """(architecture, resolution) of a shapes checkpoint's ``model.json``, validated: a JSON object with
    exactly the keys ``family`` (a known family, ``expected_family`` when given), ``resolution`` (an
    integer in 1..:data:`MODEL_JSON_MAX_RESOLUTION`) and ``shapes`` (:class:`ShapesModelConfig`, its bounds), the
    keys consistent with each other (as the config's own rules require) and the model at most
    :data:`MAX_SHAPES_PARAMETERS`; else a CheckpointError naming the file and the field."""
    from flowrl.models.shapes_dit import shapes_parameter_count

    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{meta_path}: {field}: {why}")

    size = meta_path.stat().st_size
    if size > MODEL_JSON_MAX_BYTES:
        raise CheckpointError(f"{meta_path}: {size} bytes, more than a checkpoint's metadata may hold "
                              f"({MODEL_JSON_MAX_BYTES})")
    try:
        meta = json.loads(meta_path.read_bytes())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{meta_path}: unreadable checkpoint metadata ({str(exc)[:200]})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    for key in _MODEL_JSON_KEYS:
        if key not in meta:
            raise bad(key, "required key missing")
    unknown = sorted(str(k) for k in meta if k not in _MODEL_JSON_KEYS)
    if unknown:
        raise bad(unknown[0][:80], f"unknown key (allowed: {', '.join(_MODEL_JSON_KEYS)})")
    family = meta["family"]
    if not isinstance(family, str) or family not in MODEL_FAMILIES:
        raise bad("family", f"expected one of {list(MODEL_FAMILIES)}, got {_short(family)}")
    if expected_family and family != expected_family:
        raise CheckpointError(f"{meta_path.parent}: checkpoint family {family!r}, expected {expected_family!r}")
    if family != "shapes":
        raise bad("family", f"{family!r} checkpoints are not stored as {CHECKPOINT_META}")
    resolution, limit = meta["resolution"], MODEL_JSON_MAX_RESOLUTION
    if not isinstance(resolution, int) or isinstance(resolution, bool) or not 1 <= resolution <= limit:
        raise bad("resolution", f"expected an integer in 1..{limit}, got {_short(resolution)}")
    try:
        arch = from_dict(ShapesModelConfig, meta["shapes"], "shapes.")
    except ConfigError as exc:
        raise CheckpointError(f"{meta_path}: {str(exc)[:300]}") from None
    if arch.width % arch.heads or (arch.width // arch.heads) % 4:
        raise bad("shapes.heads", f"{arch.heads} must divide shapes.width {arch.width} into heads of a multiple of 4")
    if resolution % arch.patch:
        raise bad("shapes.patch", f"{arch.patch} does not divide resolution {resolution}")
    count = shapes_parameter_count(arch, resolution)
    if count > MAX_SHAPES_PARAMETERS:
        raise CheckpointError(f"{meta_path}: describes a model of {count} parameters, more than the "
                              f"{MAX_SHAPES_PARAMETERS} a shapes checkpoint may have")
    return arch, resolution


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def count_parameters(model: FlowModel) -> int:
    return sum(p.numel() for p in model.parameters())


def set_torch_threads(n: int | None) -> None:
    """Cap torch's intra-op threads (None leaves torch's default)."""
    if n is not None:
        torch.set_num_threads(n)


# --------------------------------------------------------------------------- any family's model artifact


def trainable_module(model: FlowModel) -> torch.nn.Module:
    """The network RL trains: the shapes DiT's ``net``, Qwen-Image's ``transformer`` (its family's answer)."""
    from flowrl.models.families import family_of_model

    return family_of_model(model).trainable_module(model)


def load_policy(directory: str | Path, config: FlowRLConfig, task: str = "t2i") -> FlowModel:
    """The model of a model artifact (base, GRPO teacher, OPD student) of
    ``config.model.family``, set up for ``task``.

    Shapes: the checkpoint (one model serves both tasks). Qwen-Image: the
    pretrained pipeline of ``task`` named in ``reference.json`` (the base
    stage's record), with the artifact's own ``transformer/`` when it has one.
    The pretrained weights must still be the ones the base stage fingerprinted.
    """
    from flowrl.models.families import family_of

    try:
        family = family_of(config)
    except ConfigError:
        raise CheckpointError(f"model.family {config.model.family!r} has no loader") from None
    return family.load_policy(Path(directory), config, task)


def pretrained_path(directory: str | Path, task: str) -> str:
    """The pretrained ``task`` weights a Qwen-Image model artifact builds on (its ``reference.json``),
    checked to be the ones the base stage fingerprinted; reads no weights."""
    from flowrl.models.qwen_image import weights_fingerprint
    from flowrl.weights import local_weights

    directory = Path(directory)
    meta_path = directory / QWEN_REFERENCE
    if not meta_path.is_file():
        found = "a shapes checkpoint" if (directory / CHECKPOINT_META).is_file() else "no reference.json"
        raise CheckpointError(f"{directory}: model.family is qwen_image but the artifact holds {found}")
    try:
        reference = json.loads(meta_path.read_text())
        source = reference["pretrained"][task]
        recorded = reference["resolved"][f"pretrained.{task}"].rsplit("#", 1)[1]
    except (ValueError, KeyError, IndexError) as exc:
        raise CheckpointError(f"{meta_path}: no pretrained weights recorded for task {task!r} ({exc})") from None
    try:
        path = local_weights(source, f"{meta_path}: pretrained.{task}")
    except FileNotFoundError as exc:
        raise CheckpointError(str(exc)) from None
    if weights_fingerprint(path) != recorded:
        raise CheckpointError(
            f"{meta_path}: the weights at {path} changed since the base stage recorded them "
            f"(fingerprint {weights_fingerprint(path)}, recorded {recorded}); rerun the base stage"
        )
    return path


def check_policy(directory: str | Path, config: FlowRLConfig) -> None:
    """Fail now, without building the model, if :func:`load_policy` of either task would fail on this
    artifact for a reason its files show: shapes, a checkpoint that does not load; Qwen-Image, changed or missing
    pretrained weights of either task, or a trained ``transformer/`` without its config."""
    from flowrl.models.families import family_of

    family_of(config).check_policy(Path(directory), config)


def local_device() -> torch.device:
    """This process's GPU (LOCAL_RANK under torchrun / Elastic), or the CPU."""
    import os

    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def _artifact_transformer(directory: Path, config: FlowRLConfig) -> torch.nn.Module:
    from diffusers import QwenImageTransformer2DModel

    return QwenImageTransformer2DModel.from_pretrained(
        str(directory / QWEN_TRANSFORMER), torch_dtype=_DTYPES[config.model.qwen_image.dtype])


def trained_state(directory: str | Path, config: FlowRLConfig, task: str = "t2i") -> dict[str, torch.Tensor]:
    """The trainable network's weights of a model artifact, on the CPU, without
    building the rest of the model (Qwen-Image: the transformer alone)."""
    from flowrl.models.families import family_of

    return family_of(config).trained_state(Path(directory), config, task)


def save_policy(model: FlowModel, directory: str | Path, base_dir: str | Path | None = None) -> None:
    """Write ``model`` as a model artifact :func:`load_policy` reads: the
    shapes checkpoint, or Qwen-Image's trained transformer (safetensors via
    ``save_pretrained``) beside the base artifact's ``reference.json``."""
    from flowrl.models.families import family_of_model

    family_of_model(model).save_policy(model, Path(directory), base_dir)


def load_task_views(directory: str | Path, config: FlowRLConfig) -> dict[str, FlowModel]:
    """{"t2i": model, "edit": model}: one trainable network behind both tasks. Shapes: the
    same model twice. Qwen-Image: the artifact's T2I pipeline, and the edit pipeline its
    ``reference.json`` records (as :func:`load_policy` of ``"edit"`` loads it for GRPO and the
    bench) around the same transformer. The edit view shares the T2I pipeline's VAE, text
    encoder and tokenizer where the two weight directories hold the same files (as the
    released Qwen-Image and Qwen-Image-Edit do) and loads its own where they differ."""
    from flowrl.models.families import family_of

    return family_of(config).load_task_views(Path(directory), config)


def load_frozen_network(directory: str | Path, config: FlowRLConfig, task: str, device: str | None = None):
    """A model artifact's trainable network alone, frozen (eval, no grad), on ``device`` (default: this
    process's): a teacher placed beside the student, sharing the student's other components."""
    from flowrl.models.families import family_of

    module = family_of(config).load_frozen_network(Path(directory), config, task)
    return module.to(device or local_device()).requires_grad_(False).eval()
