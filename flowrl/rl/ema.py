"""Exponential moving average of the trained weights: the base stage's pretraining, GRPO and OPD
keep one (unsharded; under ZeRO the engine keeps :class:`flowrl.rl.engine.ShardedEMA`)."""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch


class EMA:
    """Exponential moving average of a module's trained parameters (the saved weights).

    When every parameter is trained and in fp32 (the shapes world) the average
    is a frozen copy of the whole module, ``shadow``. Otherwise only the
    trained parameters are averaged, each in fp32 (``averages``, by name):
    a module in bf16 would round a 0.999 step mostly away, and a copy of
    frozen weights (a LoRA run's base) would only repeat them. Under ZeRO the
    engine keeps a sharded EMA instead (:class:`flowrl.rl.engine.ShardedEMA`).
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        params = list(module.parameters())
        if all(p.requires_grad and p.dtype == torch.float32 for p in params):
            self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
            self.averages = None
        else:
            self.shadow = None
            self.averages = {name: p.detach().float().clone() for name, p in module.named_parameters()
                             if p.requires_grad}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        if self.shadow is not None:
            # one multi-tensor kernel for all parameters: the same lerp, bit for bit, without a Python loop
            torch._foreach_lerp_(list(self.shadow.parameters()), [p.detach() for p in module.parameters()],
                                 1.0 - self.decay)
            return
        for name, param in module.named_parameters():
            if name in self.averages:
                self.averages[name].lerp_(param.detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint stores: the shadow module's state dict, or the fp32 averages by name."""
        return self.shadow.state_dict() if self.shadow is not None else dict(self.averages)

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict`'s output, or from a full module state dict (the EMA of a
        consolidated ZeRO checkpoint: its trained parameters are the fp32 averages)."""
        if self.shadow is not None:
            self.shadow.load_state_dict(state, strict=True)
            return
        missing = sorted(set(self.averages) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} trained parameter(s): {', '.join(missing[:3])}")
        for name, average in self.averages.items():
            average.copy_(state[name])

    def weights(self, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The module's state dict with the averaged weights (in the module's dtypes)."""
        if self.shadow is not None:
            return self.shadow.state_dict()
        return {k: self.averages[k].to(v.dtype) if k in self.averages else v for k, v in module.state_dict().items()}

    @contextlib.contextmanager
    def swapped(self, module: torch.nn.Module) -> Iterator[None]:
        """``module`` holds the averaged weights inside the block, its own again after it."""
        if self.shadow is not None:
            live = {k: v.clone() for k, v in module.state_dict().items()}
            module.load_state_dict(self.shadow.state_dict())
            try:
                yield
            finally:
                module.load_state_dict(live)
            return
        params = dict(module.named_parameters())
        with torch.no_grad():
            live = {name: params[name].detach().clone() for name in self.averages}  # the trained ones only
            for name, average in self.averages.items():
                params[name].copy_(average)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in live.items():
                    params[name].copy_(value)
