"""LoRA adapters (peft) on a frozen transformer, and gradient checkpointing of a trained network.

With ``model.qwen_image.lora.rank > 0`` the RL stages train low-rank adapters instead of the
transformer's weights. Every adapter lives *inside* the one base transformer (peft replaces each
targeted ``nn.Linear`` by a layer holding the frozen base weight and one ``lora_A`` / ``lora_B`` pair
per adapter), and what the algorithms see is a view of that transformer with one adapter switched on:

* the policy: :class:`AdapterView` of the trained adapter (:data:`STUDENT`); its parameters, and so the
  optimizer, the gradient reduction, the EMA and the checkpoints, are the adapter's weights alone;
* the KL reference and the base a stage scores against: the same transformer with adapters disabled
  (``AdapterView(network, None)``): no copy;
* an OPD teacher trained with LoRA on the same base weights: its adapter loaded under the teacher's
  name (:func:`load_adapter`), viewed with that adapter on: it costs its adapter only.

Resident per process, beside the base transformer in the model dtype: each adapter's weights in fp32
(``rank * (in + out)`` per targeted linear); for the trained one also their gradients and AdamW's two fp32
moments (16 bytes per adapter parameter in all). The LoRA branch computes in fp32, so each targeted
linear keeps an fp32 copy of its input for the backward (recomputed under gradient checkpointing).
docs/lora.md has the whole memory picture.

A model artifact trained with LoRA holds ``adapter/`` (peft's ``adapter_config.json`` and
``adapter_model.safetensors``, the adapter against the task's pretrained transformer) beside the
``transformer/`` every later stage loads, which is the base with the adapter merged in
(:func:`export_merged`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flowrl.models import QWEN_REFERENCE, QWEN_TRANSFORMER, CheckpointError

log = logging.getLogger(__name__)

STUDENT = "default"  # the trained adapter's name (peft's default name)
ADAPTER_DIR = "adapter"  # an artifact's adapter, beside its merged transformer/
ADAPTER_CONFIG = "adapter_config.json"  # peft's file names, so peft and diffusers load the directory as well
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# The attention projections of both streams of a Qwen-Image block (image: to_*, text: add_*_proj / to_add_out).
QWEN_IMAGE_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def lora_settings(config) -> Any | None:
    """The ``model.qwen_image.lora`` section of a :class:`~flowrl.config.FlowRLConfig` when LoRA is on
    (family qwen_image, rank > 0), else None."""
    lora = config.model.qwen_image.lora
    if config.model.family != "qwen_image" or lora is None or lora.rank == 0:
        return None
    return lora


def peft_config(settings):
    """peft's ``LoraConfig`` of a ``model.qwen_image.lora`` section (alpha null: the rank)."""
    from peft import LoraConfig

    return LoraConfig(r=settings.rank, lora_alpha=settings.alpha if settings.alpha is not None else settings.rank,
                      lora_dropout=settings.dropout, target_modules=list(settings.target_modules), bias="none",
                      init_lora_weights=True)


# --------------------------------------------------------------------------- adapters inside the transformer


def _tuner_layers(network: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in network.modules() if isinstance(m, BaseTunerLayer)]


def adapter_names(network: nn.Module) -> list[str]:
    """The adapters injected into ``network``."""
    return sorted(getattr(network, "peft_config", None) or {})


def _check_targets(network: nn.Module, targets: tuple[str, ...], key: str) -> None:
    """Each target must name (the end of) some linear layer's path, as peft matches them."""
    names = [n for n, m in network.named_modules() if isinstance(m, nn.Linear)]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            raise ValueError(f"{key}: {target!r} names no linear layer of {type(network).__name__} "
                             f"(names end like {', '.join(sorted({n.rsplit('.', 1)[-1] for n in names})[:8])}, ...)")


def _settle(network: nn.Module) -> None:
    """After adding an adapter: the trained adapter (if any) is the active one and the only one
    with gradients; every other adapter is frozen; the base stays frozen. Adapter weights in fp32."""
    from peft.tuners.tuners_utils import cast_adapter_dtype

    for name in adapter_names(network):
        cast_adapter_dtype(network, name, autocast_adapter_dtype=True)
    if STUDENT in adapter_names(network):
        for layer in _tuner_layers(network):
            layer._active_adapter, layer._disable_adapters = [STUDENT], False
    for name, param in network.named_parameters():
        param.requires_grad_(f".lora_A.{STUDENT}." in name or f".lora_B.{STUDENT}." in name)


def add_adapter(network: nn.Module, settings, seed: int, key: str = "model.qwen_image.lora") -> None:
    """Inject the trained adapter (:data:`STUDENT`) into ``network`` (a diffusers model), freshly
    initialised as peft does (``lora_B`` zero, so the policy starts exactly at the base), from
    ``seed`` and without touching torch's global random stream."""
    if STUDENT in adapter_names(network):
        raise ValueError(f"{type(network).__name__} already holds the trained adapter {STUDENT!r}")
    _check_targets(network, tuple(settings.target_modules), f"{key}.target_modules")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        network.add_adapter(peft_config(settings), STUDENT)
    _settle(network)
    trained = sum(p.numel() for p in network.parameters() if p.requires_grad)
    total = sum(p.numel() for p in network.parameters())
    log.info("LoRA rank %d on %s: %d trained of %d parameters (%.2f %%)", settings.rank,
             ", ".join(settings.target_modules), trained, total, 100.0 * trained / total)


def adapter_parameters(network: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """{peft key: parameter} of adapter ``name``: the keys of peft's saved adapters
    (``transformer_blocks.0.attn.to_q.lora_A.weight``: the module path, no adapter name)."""
    out = {}
    for path, param in network.named_parameters():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}.{name}."
            if marker in path:
                out[path.replace(marker, f".{part}.")] = param
    return out


def save_adapter(network: nn.Module, directory: str | Path, name: str = STUDENT) -> None:
    """Adapter ``name`` as peft saves one: ``adapter_config.json`` and ``adapter_model.safetensors`` (fp32)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: p.detach().float().cpu().contiguous() for k, p in adapter_parameters(network, name).items()}
    save_file(weights, directory / ADAPTER_WEIGHTS)
    network.peft_config[name].save_pretrained(str(directory))
    # peft writes the config under the adapter's own name when it is not "default": keep one layout
    written = directory / name / ADAPTER_CONFIG if name != STUDENT else directory / ADAPTER_CONFIG
    if written != directory / ADAPTER_CONFIG:
        written.replace(directory / ADAPTER_CONFIG)
        written.parent.rmdir()


def load_adapter_weights(network: nn.Module, directory: str | Path, name: str) -> None:
    """Copy a saved adapter's weights into the injected adapter ``name`` (same targets and rank)."""
    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {ADAPTER_WEIGHTS}")
    try:
        state = load_file(path)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{path}: unreadable safetensors file ({exc})") from None
    live = adapter_parameters(network, name)
    missing, unexpected = sorted(live.keys() - state.keys()), sorted(state.keys() - live.keys())
    if missing or unexpected:
        raise CheckpointError(f"{path}: the adapter does not fit adapter {name!r} of the transformer "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for key, param in live.items():
        if state[key].shape != param.shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(state[key].shape)}, the transformer's adapter "
                                  f"{tuple(param.shape)} (another rank?)")
    with torch.no_grad():
        for key, param in live.items():
            param.copy_(state[key])


def load_adapter(network: nn.Module, directory: str | Path, name: str) -> None:
    """Inject a saved adapter into ``network`` under ``name``, frozen (an OPD teacher): its own peft
    config (rank, targets), with dropout off."""
    from peft import LoraConfig

    directory = Path(directory)
    if name in adapter_names(network):
        raise ValueError(f"{type(network).__name__} already holds an adapter named {name!r}")
    if not (directory / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{directory}: no {ADAPTER_CONFIG} (not a saved LoRA adapter)")
    config = LoraConfig.from_pretrained(str(directory))
    config.lora_dropout, config.inference_mode = 0.0, True
    with warnings.catch_warnings():  # peft warns that a second adapter joins the first: that is the point
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        network.add_adapter(config, name)
    _settle(network)
    load_adapter_weights(network, directory, name)


def adapter_layout(directory: str | Path) -> dict:
    """rank, alpha and targets of a saved adapter (its ``adapter_config.json``)."""
    config = json.loads((Path(directory) / ADAPTER_CONFIG).read_text())
    return {"rank": config["r"], "alpha": config["lora_alpha"], "target_modules": sorted(config["target_modules"])}


@contextlib.contextmanager
def use_adapter(network: nn.Module, name: str | None) -> Iterator[None]:
    """Run ``network`` with only adapter ``name`` on (None: all off, the base), then restore.

    peft's own switches (``set_adapter``, ``enable_adapters``) also flip ``requires_grad`` of the
    adapters, which would touch the trained adapter in the middle of a step; this sets the two
    fields those switches set and nothing else (peft pinned in requirements/cpu.txt, tested)."""
    layers = _tuner_layers(network)
    wanted = (name is None, None if name is None else [name])
    if all(layer._disable_adapters == wanted[0] and (name is None or layer._active_adapter == wanted[1])
           for layer in layers):
        yield
        return
    saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    for layer in layers:
        layer._disable_adapters = name is None
        if name is not None:
            layer._active_adapter = [name]
    try:
        yield
    finally:
        for layer, (active, disabled) in zip(layers, saved):
            layer._active_adapter, layer._disable_adapters = active, disabled


def _at_rest(network: nn.Module, name: str | None) -> bool:
    """Whether ``network`` runs adapter ``name`` without a switch (where a recompute lands)."""
    layers = _tuner_layers(network)
    if name is None:
        return all(layer._disable_adapters for layer in layers)
    return all(not layer._disable_adapters and layer._active_adapter == [name] for layer in layers)


class _Shared:
    """Holds a module without registering it (its parameters are not the holder's); copies share it."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __deepcopy__(self, memo):
        return self


class AdapterView(nn.Module):
    """One adapter of a peft-injected diffusers transformer, as the module a model calls and a
    trainer steps: calling it runs the whole transformer with adapter ``adapter`` alone on (None:
    adapters off, the base); its parameters and ``state_dict`` are that adapter's weights only.

    Copies (the EMA's ``deepcopy``) copy the adapter weights and share the transformer. Under
    gradient checkpointing the backward recomputes blocks outside :meth:`forward`, with whatever
    adapter is on at rest: a view with gradient refuses to run unless its adapter is the resting one
    (the trained adapter is, :func:`add_adapter`)."""

    def __init__(self, network: nn.Module, adapter: str | None):
        super().__init__()
        self._shared = _Shared(network)
        self.adapter = adapter
        self.adapters = nn.ModuleDict()
        if adapter is None:
            return
        from peft.tuners.lora import LoraLayer

        for path, layer in network.named_modules():
            if isinstance(layer, LoraLayer) and adapter in layer.lora_A:
                self.adapters[path.replace(".", "-")] = nn.ModuleDict({
                    "lora_A": layer.lora_A[adapter], "lora_B": layer.lora_B[adapter],
                    "dropout": layer.lora_dropout[adapter]})
        if not len(self.adapters):
            raise ValueError(f"{type(network).__name__} holds no adapter {adapter!r} (it holds "
                             f"{adapter_names(network) or 'none'})")

    @property
    def network(self) -> nn.Module:
        return self._shared.module

    @property
    def config(self):
        return self.network.config

    @property
    def dtype(self) -> torch.dtype:
        return self.network.dtype

    @property
    def device(self) -> torch.device:
        return self.network.device

    def forward(self, *args, **kwargs):
        if torch.is_grad_enabled() and getattr(self.network, "gradient_checkpointing", False) \
                and not _at_rest(self.network, self.adapter):
            raise RuntimeError(f"adapter {self.adapter!r} is not the one at rest: gradient checkpointing would "
                               "recompute its blocks with another adapter")
        with use_adapter(self.network, self.adapter):
            return self.network(*args, **kwargs)

    def train(self, mode: bool = True) -> "AdapterView":
        super().train(mode)
        self.network.train(mode)
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.network.enable_gradient_checkpointing()


# --------------------------------------------------------------------------- export


def save_lora_policy(network: nn.Module, directory: str | Path, base_dir: str | Path) -> None:
    """A model artifact of a LoRA run: the base artifact's ``reference.json``, the trained adapter
    (``adapter/``) and the transformer with it merged (``transformer/``, what ``load_policy`` and the
    bench read). Merges in place: the network's last use."""
    if not (Path(base_dir) / QWEN_REFERENCE).is_file():
        raise CheckpointError(f"saving a LoRA policy needs the base artifact's {QWEN_REFERENCE}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / QWEN_REFERENCE).write_bytes((Path(base_dir) / QWEN_REFERENCE).read_bytes())
    save_adapter(network, directory / ADAPTER_DIR)
    export_merged(network, directory / QWEN_TRANSFORMER)


def export_merged(network: nn.Module, directory: str | Path, name: str = STUDENT) -> None:
    """Write ``network`` with adapter ``name`` merged into its base weights as a plain diffusers
    transformer (``save_pretrained``), the ``transformer/`` later stages load.

    The merge happens in place and the adapters are removed afterwards: this is the network's last
    use (a stage's final step). In a low-precision dtype the merged weights are rounded to it."""
    network.fuse_lora(adapter_names=[name])
    network.unload_lora()
    network.save_pretrained(str(directory), safe_serialization=True)


# --------------------------------------------------------------------------- gradient checkpointing

_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """``cls`` whose forward, when gradients are on, keeps only its inputs and runs again in the backward."""
    if cls not in _CHECKPOINTED:
        from torch.utils.checkpoint import checkpoint

        def forward(self, *args, **kwargs):
            if torch.is_grad_enabled():
                return checkpoint(super(new, self).forward, *args, use_reentrant=False, **kwargs)
            return super(new, self).forward(*args, **kwargs)

        new = type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward, "__module__": cls.__module__})
        _CHECKPOINTED[cls] = new
    return _CHECKPOINTED[cls]


def enable_gradient_checkpointing(module: nn.Module, key: str) -> None:
    """Recompute activations in the backward instead of keeping them: diffusers' own switch where the
    network has one (Qwen-Image: per transformer block), else every block of a ``blocks`` list (the
    shapes DiT) runs under ``torch.utils.checkpoint``. Parameter names do not change. The gradient
    is the same, the forward runs twice for the trained part."""
    network = module.network if isinstance(module, AdapterView) else module
    if hasattr(network, "enable_gradient_checkpointing"):
        network.enable_gradient_checkpointing()
        return
    blocks = getattr(network, "blocks", None)
    if not isinstance(blocks, nn.ModuleList) or not len(blocks):
        raise ValueError(f"{key}: {type(network).__name__} has neither diffusers' gradient checkpointing nor a "
                         "`blocks` list to checkpoint; set it to false")
    for block in blocks:
        block.__class__ = _checkpointed_class(type(block))
