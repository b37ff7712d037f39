"""RL algorithms as registered trainers on the shared loop.

An algorithm is a :class:`~flowrl.rl.trainer.LoopTrainer` subclass (its ``step`` is one iteration; the loop,
checkpoints, resume, the monitor and the engine are shared) registered under a name with
``@register_algorithm(name, kind=...)``. The stages build their trainer through :func:`algorithm`, from the
name the config gives (``grpo.algorithm``, ``opd.algorithm``), so adding an algorithm is one new module and
its registration; nothing else changes.

Kinds, and the constructor each kind's stage calls:

- ``reward``: learns from rewards on prompts (the stages ``grpo_t2i``, ``grpo_edit`` and, when
  ``multitask``, ``grpo_mixed`` for Mix-RL): ``Trainer(model, module, reference, grpo_config, prompts,
  rewards, weights, monitor=, checkpoints=, config_hash=, category_scale=)`` as
  :class:`~flowrl.rl.grpo.GRPOTrainer` takes them.
- ``distill``: learns from teachers (the stage ``opd``): ``Trainer(model, module, teachers, opd_config,
  prompts, routes, task_fractions, guidance_scale=, shift=, monitor=, checkpoints=, config_hash=,
  task_models=)`` as :class:`~flowrl.rl.opd.OPDTrainer` takes them.

Registered today: ``grpo`` (reward, multitask: GRPO and, on both tasks at once, Mix-RL), ``opd`` (distill) and
``nft`` (reward, one task at a time: DiffusionNFT, forward-process RL on the clean samples, :mod:`flowrl.rl.nft`).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, TypeVar

from flowrl.config import ConfigError

__all__ = ["Algorithm", "KINDS", "register_algorithm", "algorithm", "algorithm_names"]

KINDS = ("reward", "distill")
#: the modules whose trainers register the built-in algorithms (imported on the first lookup)
BUILTIN = ("flowrl.rl.grpo", "flowrl.rl.opd", "flowrl.rl.nft")
_KEYS = {"reward": "grpo.algorithm", "distill": "opd.algorithm"}
_REGISTRY: dict[str, "Algorithm"] = {}
T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Algorithm:
    """A registered trainer: ``kind`` says which stages can run it, ``multitask`` whether it trains
    both tasks at once (Mix-RL)."""

    name: str
    kind: str
    trainer: type
    multitask: bool = False


def register_algorithm(name: str, *, kind: str, multitask: bool = False) -> Callable[[T], T]:
    """Class decorator: register the decorated LoopTrainer subclass as algorithm ``name`` of ``kind``."""
    from flowrl.rl.trainer import LoopTrainer

    if kind not in KINDS:
        raise ValueError(f"register_algorithm({name!r}): kind must be one of {KINDS}, got {kind!r}")

    def register(cls: T) -> T:
        if not (isinstance(cls, type) and issubclass(cls, LoopTrainer)):
            raise TypeError(f"register_algorithm({name!r}): {cls!r} is not a LoopTrainer subclass")
        if name in _REGISTRY and _REGISTRY[name].trainer is not cls:
            raise ValueError(f"algorithm {name!r} is registered twice ({_REGISTRY[name].trainer.__name__}, "
                             f"{cls.__name__})")
        _REGISTRY[name] = Algorithm(name, kind, cls, multitask)
        return cls

    return register


def _builtin() -> None:
    for module in BUILTIN:
        importlib.import_module(module)


def algorithm_names(kind: str | None = None) -> tuple[str, ...]:
    """The registered algorithms (of ``kind``), in registration order."""
    _builtin()
    return tuple(n for n, a in _REGISTRY.items() if kind is None or a.kind == kind)


def algorithm(name: str, kind: str, *, multitask: bool = False) -> Algorithm:
    """The algorithm ``name``, which must be of ``kind`` (and train both tasks at once when ``multitask``);
    a ConfigError naming the config key otherwise."""
    _builtin()
    key = _KEYS[kind]
    found = _REGISTRY.get(name)
    shown = repr(name) if len(repr(name)) <= 80 else f"{repr(name)[:60]}... ({len(name)} characters)"
    if found is None or found.kind != kind:
        what = "is not a registered algorithm" if found is None else f"is a {found.kind} algorithm"
        raise ConfigError(f"{key}: {shown} {what} (the {kind} algorithms: {', '.join(algorithm_names(kind))})")
    if multitask and not found.multitask:
        raise ConfigError(f"{key}: {shown} trains one task at a time; Mix-RL (grpo --task mixed, pipeline.mix_rl) "
                          "needs a multitask algorithm")
    return found
