"""The policy an RL stage trains, set up the same way for every model family.

:func:`trainable_policy` turns a loaded model into what the trainers need: the network the engine trains
(the family's trainable module, or with LoRA an adapter view of it), the KL reference, the base to score
the result against, and how the result is written as a model artifact. The family answers what differs
(which module trains, how a model is rebuilt around another copy of it, how artifacts are saved).
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch

from flowrl.config import FlowRLConfig
from flowrl.models.base import Condition, FlowModel
from flowrl.models.families import ModelFamily, family_of
from flowrl.models.lora import STUDENT, AdapterView, add_adapter, lora_settings, save_lora_policy
from flowrl.rl.engine import trainable_attr

__all__ = ["Policy", "trainable_policy", "place_text_encoders", "frozen_copy", "OffloadedModel",
           "offloaded_reference"]


def frozen_copy(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """A frozen (eval, no grad) copy of ``module`` on ``device``, made one tensor at a time: the
    module's own device never holds a second copy of its weights."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        moved = tensor.detach().to(device, copy=True)
        memo[id(tensor)] = torch.nn.Parameter(moved, requires_grad=False) if isinstance(
            tensor, torch.nn.Parameter) else moved
    return copy.deepcopy(module, memo).to(device).requires_grad_(False).eval()


class OffloadedModel:
    """A frozen model whose network lives on another device (the CPU): inputs move there, velocities
    come back to the caller's device. Only what the GRPO objective calls (:meth:`velocity`)."""

    def __init__(self, model: FlowModel, device: str | torch.device):
        self.model, self.device = model, torch.device(device)
        self.cfg_renorm_dim = model.cfg_renorm_dim

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        return self.model.velocity(x.to(self.device), t.to(self.device), cond.to(self.device)).to(x.device)


def offloaded_reference(model: FlowModel, module: torch.nn.Module, device: str) -> OffloadedModel:
    """The frozen KL reference of full-parameter training with ``grpo.reference_device: cpu``: a copy of
    the starting weights of ``module`` (``model``'s trained network) made on ``device``, run there."""
    view = copy.copy(model)
    setattr(view, trainable_attr(model, module), frozen_copy(module, device))
    return OffloadedModel(view, device)


def place_text_encoders(config: FlowRLConfig, models) -> None:
    """``model.qwen_image.text_encoder_device``: cpu moves each view's text encoder off the accelerator;
    offload keeps it in host memory and has each prompt encoding run it on the accelerator."""
    movable = [m for m in models if hasattr(m, "move_text_encoder")]  # Qwen-Image's key; others have none
    where = config.model.qwen_image.text_encoder_device if movable else "same"
    if where != "same":
        for model in movable:
            model.move_text_encoder("cpu", offload=where == "offload")


@dataclass
class Policy:
    """A model set up for training. ``model`` is what the trainer samples and trains (its network is
    ``module``); with LoRA, ``network`` holds the adapters and ``base_view`` is the model with them off."""

    family: ModelFamily
    source: FlowModel  # the model as loaded
    model: FlowModel
    module: torch.nn.Module
    network: torch.nn.Module | None = None
    base_view: FlowModel | None = None

    @property
    def lora(self) -> bool:
        return self.network is not None

    def views(self, views: dict[str, FlowModel]) -> dict[str, FlowModel]:
        """The task views of the loaded model (``views``, sharing its network) around the trained network:
        the loaded one's view is :attr:`model` itself."""
        return {t: self.model if view is self.source else self.family.with_trainable(view, self.module)
                for t, view in views.items()}

    def reference(self, reference_device: str) -> FlowModel | OffloadedModel:
        """The frozen KL reference: with LoRA the base (adapters off, no copy); else a frozen copy of the
        starting network, on this device (``same``) or run on another one."""
        if self.lora:
            return self.base_view
        if reference_device == "same":
            return self.family.with_trainable(self.model, copy.deepcopy(self.module).requires_grad_(False).eval())
        return offloaded_reference(self.model, self.module, reference_device)

    def save(self, trained: FlowModel, directory: Path, base_dir: Path) -> None:
        """The trained model as a model artifact (with LoRA: the adapter and the merged network; the
        adapters are merged in place, so this is the network's last use)."""
        if self.lora:
            save_lora_policy(self.network, directory, base_dir)
        else:
            self.family.save_policy(trained, directory, base_dir)

    def base_model(self, trained: FlowModel, base_dir: Path, config: FlowRLConfig, task: str) -> FlowModel:
        """The base, to score on the same prompts and seeds: with LoRA the adapters-off view; else the
        base's weights loaded back into the trained network (no second copy: call after :meth:`save`)."""
        if self.lora:
            return self.base_view
        self.family.trainable_module(trained).load_state_dict(self.family.trained_state(base_dir, config, task))
        return trained


def trainable_policy(config: FlowRLConfig, model: FlowModel, seed: int, views: dict | None = None) -> Policy:
    """``model`` set up for training: with LoRA (``model.qwen_image.lora``) a fresh adapter (seeded by
    ``seed``) on its network trains, otherwise the whole network. ``views`` ({task: model} sharing the
    network) are the other task views of the same model (OPD)."""
    family = family_of(config)
    place_text_encoders(config, list(views.values()) if views else [model])
    settings = lora_settings(config)
    if settings is None:
        return Policy(family, model, model, family.trainable_module(model))
    network = family.trainable_module(model)
    add_adapter(network, settings, seed=seed)
    module = AdapterView(network, STUDENT)
    return Policy(family, model, family.with_trainable(model, module), module, network,
                  family.with_trainable(model, AdapterView(network, None)))
