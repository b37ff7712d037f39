"""Scorer types by name, and the one function that builds a task's composite reward from the config.

``config.rewards.<task>`` lists the composite's components (:class:`flowrl.config.RewardComponent`):
a name, a scorer type, a weight, per-category weights and optionally a ``gate`` (another component of
the same task whose score, mapped onto [0, 1], multiplies this one's: see
:mod:`flowrl.rewards.composite`). The scorer type is a name in this module's
registry; each type builds one component's reward model from the reward_model artifact. Every model
family goes through :func:`load_rewards`; what differs between them is which scorer types exist for
it and how its prompts are put into categories.

Registered here:

- ``learned``: the artifact's pointwise scorer of the component's criterion
  (``<task>/pointwise_<criterion>``), loaded in the model ``reward_model.backbone`` trained:
  ``shapes`` a :class:`~flowrl.rewards.shapes_scorer.ShapesScorer` loaded now, on the CPU;
  ``vlm`` a :class:`~flowrl.rewards.production.LazyVLMScorer` loaded at its first use, on the
  device it is given (or the process's GPU). Any family.
- ``identity``: :class:`~flowrl.rewards.identity.ShapesIdentityScorer`, how well an edit keeps the
  objects its instruction leaves alone; the shapes family only (the face-identity scorer for photos
  needs a face-embedding model this repository does not ship).

- ``jpeg_compressibility``: rule-based, :class:`~flowrl.rewards.rules.JpegCompressibility` (DDPO's
  compressibility: the negated JPEG size in kilobytes); any family, no artifact. The shipped configs do
  not use it; the shapes world's exact judge stays held out, for evaluation only.

Adding a type is a function decorated with ``@register_scorer(name)`` that takes a :class:`ScorerRequest`
and returns a reward model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from flowrl.config import REWARD_TASKS, ConfigError, FlowRLConfig, RewardComponent, shown_value
from flowrl.rewards.base import RewardModel
from flowrl.rewards.composite import CompositeReward, shapes_category
from flowrl.storage import ArtifactError, fetch

__all__ = [
    "ScorerRequest", "ScorerType", "check_rewards", "load_rewards", "load_task_rewards", "model_scorer_count",
    "register_scorer", "scorer_type", "scorer_types", "served_composite",
]

log = logging.getLogger(__name__)


class _Artifact:
    """The reward_model artifact, fetched on the first request and then shared (one download per load)."""

    def __init__(self, uri: str):
        self.uri, self._local = uri, None

    def local(self) -> Path:
        if self._local is None:
            self._local = Path(fetch(self.uri))
        return self._local


@dataclass(frozen=True)
class ScorerRequest:
    """What a scorer type is given to build one component."""

    component: RewardComponent
    key: str  # the component's config key, e.g. rewards.edit[1], for error messages
    task: str  # t2i or edit
    config: FlowRLConfig
    reward_model_uri: str
    device: str | None  # where a model scorer goes (types registered with takes_device); None: its own choice
    _artifact: _Artifact

    def artifact(self) -> Path:
        """The local copy of the reward_model artifact (fetched on the first call of a load)."""
        return self._artifact.local()


@dataclass(frozen=True)
class ScorerType:
    """A registered scorer type: ``build(request)`` makes the component's reward model. ``families``:
    the model families it exists for (None: every one); ``takes_device``: it loads a model that
    ``spread`` places on a GPU; ``takes_criterion``: a component of this type may name a criterion;
    ``check(component, key, task, config)``: its config rules, run when a config is loaded."""

    name: str
    build: Callable[[ScorerRequest], RewardModel]
    families: tuple[str, ...] | None = None
    takes_device: bool = False
    takes_criterion: bool = False
    check: Callable[[RewardComponent, str, str, FlowRLConfig], None] | None = None


_SCORERS: dict[str, ScorerType] = {}


def register_scorer(name: str, *, families: Sequence[str] | None = None, takes_device: bool = False,
                    takes_criterion: bool = False,
                    check: Callable[[RewardComponent, str, str, FlowRLConfig], None] | None = None):
    """Decorator: register the decorated ``build(request) -> reward model`` as scorer type ``name``
    (the value of a component's ``scorer`` key). A name registers once."""

    def register(build: Callable[[ScorerRequest], RewardModel]) -> Callable[[ScorerRequest], RewardModel]:
        if name in _SCORERS:
            raise ValueError(f"scorer type {name!r} is registered twice")
        _SCORERS[name] = ScorerType(name, build, None if families is None else tuple(families), takes_device,
                                    takes_criterion, check)
        return build

    return register


def scorer_types() -> tuple[str, ...]:
    """The registered scorer types' names, in registration order."""
    return tuple(_SCORERS)


def scorer_type(name: str, key: str = "scorer") -> ScorerType:
    """The scorer type registered as ``name``; a ConfigError naming ``key`` when there is none."""
    try:
        return _SCORERS[name]
    except KeyError:
        raise ConfigError(f"{key}: unknown scorer type {shown_value(name)} (registered: {', '.join(_SCORERS)})") \
            from None


def check_rewards(config: FlowRLConfig) -> None:
    """Each reward component's scorer type is registered, exists for ``model.family``, and accepts the
    component (its own rules); run by :func:`flowrl.config.check_consistency`."""
    family = config.model.family
    for task in REWARD_TASKS:
        for i, component in enumerate(getattr(config.rewards, task)):
            key = f"rewards.{task}[{i}]"
            kind = scorer_type(component.scorer, f"{key}.scorer")
            if kind.families is not None and family not in kind.families:
                raise ConfigError(f"{key}.scorer: the {kind.name} scorer has no model for model.family {family} "
                                  f"(it has one for {', '.join(kind.families)}); drop component "
                                  f"{component.name!r} or use another scorer type")
            if component.criterion is not None and not kind.takes_criterion:
                raise ConfigError(f"{key}.criterion: the {kind.name} scorer takes no criterion (got "
                                  f"{component.criterion!r}); leave it out")
            if kind.check is not None:
                kind.check(component, key, task, config)
        _check_grammar_categories(config, task)


def _check_grammar_categories(config: FlowRLConfig, task: str) -> None:
    """A family without prompt files takes its categories from the shapes grammar: per-category weights
    must name one of them (prompt files' categories are checked when the filter reads the file)."""
    from flowrl.models.families import family_of

    if family_of(config).prompt_files:
        return
    from flowrl.shapes.edits import EDIT_KINDS
    from flowrl.shapes.prompts import T2I_CATEGORIES

    known = T2I_CATEGORIES if task == "t2i" else EDIT_KINDS
    unknown = sorted(set(config.rewards.weights(task)[1]) - set(known))
    if unknown:
        raise ConfigError(f"rewards.{task}: weights for category {unknown[0]!r}, which no {task} prompt has "
                          f"(categories: {', '.join(known)})")


def model_scorer_count(config: FlowRLConfig, task: str) -> int:
    """How many model scorers (components of a type registered with ``takes_device``) the ``task``
    composite loads: what the memory planner sizes."""
    return sum(1 for i, c in enumerate(getattr(config.rewards, task))
               if scorer_type(c.scorer, f"rewards.{task}[{i}].scorer").takes_device)


# --------------------------------------------------------------------------- building composites


def _categorizer(config: FlowRLConfig, task: str, categories: dict[str, str] | None) -> Callable[[str], str]:
    """How the composite names a prompt's category: a lookup in ``categories`` (prompts outside it get the
    default weights), or without one the shapes grammar's parse. The configured categories are checked
    against the categories there are."""
    from flowrl.models.families import family_of

    named = {category for category in config.rewards.weights(task)[1]}
    if categories is None:
        if family_of(config).prompt_files:
            raise ValueError(f"load_rewards: model.family {config.model.family} reads its prompts from prompt "
                             "files; pass categories ({prompt: category}) for the per-category weights")
        from flowrl.shapes.edits import EDIT_KINDS
        from flowrl.shapes.prompts import T2I_CATEGORIES

        known = T2I_CATEGORIES if task == "t2i" else EDIT_KINDS
        unknown = sorted(named - set(known))
        if unknown:
            raise ConfigError(f"rewards.{task}: weights for category {unknown[0]!r}, which no {task} prompt has "
                              f"(categories: {', '.join(known)})")
        return shapes_category
    table = dict(categories)
    missing = sorted(named - set(table.values()))
    if missing:  # the filter may have dropped every prompt of a category: said, not refused
        log.warning("rewards.%s: weights for categories no prompt here has: %s", task, ", ".join(missing))
    return lambda prompt: table.get(prompt, "")


def _build(config: FlowRLConfig, artifact: _Artifact, task: str, categories: dict[str, str] | None,
           spread: bool, first_device: int) -> CompositeReward:
    if task not in REWARD_TASKS:
        raise ValueError(f"load_rewards: task must be one of {REWARD_TASKS}, got {task!r}")
    check_rewards(config)
    components = getattr(config.rewards, task)
    categorize = _categorizer(config, task, categories)
    default, by_category = config.rewards.weights(task)
    kinds = [scorer_type(c.scorer, f"rewards.{task}[{i}].scorer") for i, c in enumerate(components)]
    placed = [i for i, kind in enumerate(kinds) if kind.takes_device]
    if spread:
        from flowrl.rewards.production import scorer_devices

        devices = dict(zip(placed, scorer_devices(len(placed), torch.cuda.device_count(), first_device)))
    else:
        devices = {}
    built = {}
    for i, (component, kind) in enumerate(zip(components, kinds)):
        request = ScorerRequest(component, f"rewards.{task}[{i}]", task, config, artifact.uri, devices.get(i),
                                artifact)
        built[component.name] = kind.build(request)
    return CompositeReward(components=built, weights=by_category, categorize=categorize, default_weights=default,
                           gates=config.rewards.gates(task))


def load_rewards(config: FlowRLConfig, reward_model_uri: str, task: str, *, categories: dict[str, str] | None = None,
                 spread: bool = False, first_device: int = 0) -> CompositeReward:
    """The ``task`` composite of ``config.rewards.<task>``, its components built in order from the
    reward_model artifact at ``reward_model_uri`` (fetched once, when a component first needs it).

    ``categories``: {prompt: category} for the per-category weights (families whose prompts come from
    prompt files; prompts outside it get the default weights); None: the shapes grammar's categories.
    ``spread``: the model scorers go round-robin over the visible GPUs from ``first_device`` on (a reward
    server on GPUs of its own; the filter's GPUs after the policy's) instead of each onto the process's
    GPU when it loads."""
    return _build(config, _Artifact(reward_model_uri), task, categories, spread, first_device)


def load_task_rewards(config: FlowRLConfig, reward_model_uri: str, tasks: Sequence[str] = REWARD_TASKS, *,
                      categories: dict[str, str] | None = None) -> dict[str, CompositeReward]:
    """{task: :func:`load_rewards` composite} for several tasks over one fetch of the artifact, built in
    the order of ``tasks``."""
    artifact = _Artifact(reward_model_uri)
    return {task: _build(config, artifact, task, categories, False, 0) for task in tasks}


def served_composite(config: dict, reward_model_uri: str, task: str, prompts_uri: str | None = None,
                     spread: bool = False) -> CompositeReward:
    """Reward-server factory (flowrl/rewards/server.py) of every family: the ``task`` composite from a
    config given as plain data (``FlowRLConfig.to_dict()``). ``prompts_uri``: a filter_prompts artifact
    whose prompt categories (curated and held out) the per-category weights use, for families with prompt
    files (too many to pass on a command line). ``spread``: a server on GPUs of its own places the model
    scorers round-robin over them."""
    from flowrl.config import from_dict

    categories = None
    if prompts_uri is not None:
        import pandas as pd

        from flowrl.rewards.production import prompt_categories

        local = Path(fetch(prompts_uri))
        frames = [pd.read_parquet(f) for f in (local / "prompts.parquet", local / "heldout.parquet") if f.is_file()]
        categories = prompt_categories(*frames)
    return load_rewards(from_dict(FlowRLConfig, config), reward_model_uri, task, categories=categories, spread=spread)


# --------------------------------------------------------------------------- the built-in scorer types


def _criterion(component: RewardComponent) -> str:
    return component.criterion or component.name


def _check_learned(component: RewardComponent, key: str, task: str, config: FlowRLConfig) -> None:
    """A learned component's criterion is one the reward_model stage trains for the task."""
    criterion = _criterion(component)
    trained = getattr(config.reward_model, f"{task}_criteria")
    if criterion not in trained:
        named = f"criterion {criterion!r}" if component.criterion else f"name {criterion!r} (its criterion)"
        raise ConfigError(f"{key}: a learned scorer of {named}, which reward_model.{task}_criteria "
                          f"({', '.join(trained) or 'none'}) does not train; add it there, set {key}.criterion, "
                          "or drop the component")


def _shapes_backbone(directory: Path, name: str, device: str | None) -> RewardModel:
    from flowrl.rewards.shapes_rewards import ScorerReward
    from flowrl.rewards.shapes_scorer import ShapesScorer

    return ScorerReward(ShapesScorer.load(directory), name)  # small: on the CPU, batches of 256


def _vlm_backbone(directory: Path, name: str, device: str | None) -> RewardModel:
    from flowrl.rewards.production import LazyVLMScorer
    from flowrl.rewards.shapes_rewards import ScorerReward

    return ScorerReward(LazyVLMScorer(directory, device=device), name, batch_size=8)


# reward_model.backbone -> how a learned scorer of that backbone is loaded as a component
LEARNED_BACKBONES: dict[str, Callable[[Path, str, str | None], RewardModel]] = {
    "shapes": _shapes_backbone,
    "vlm": _vlm_backbone,
}


@register_scorer("learned", takes_device=True, takes_criterion=True, check=_check_learned)
def learned_scorer(request: ScorerRequest) -> RewardModel:
    """The artifact's ``<task>/pointwise_<criterion>`` scorer as a reward (its expected Likert level)."""
    criterion, task = _criterion(request.component), request.task
    directory = request.artifact() / task / f"pointwise_{criterion}"
    if not directory.is_dir():
        raise ArtifactError(f"{request.reward_model_uri}: no {task} pointwise {criterion} model for {request.key} "
                            f"(add {criterion!r} to reward_model.{task}_criteria and rerun the stage)")
    backbone = request.config.reward_model.backbone
    try:
        load = LEARNED_BACKBONES[backbone]
    except KeyError:
        raise ConfigError(f"reward_model.backbone: no learned-scorer loader for {backbone!r} "
                          f"({', '.join(LEARNED_BACKBONES)})") from None
    return load(directory, request.component.name, request.device)


def _check_identity(component: RewardComponent, key: str, task: str, config: FlowRLConfig) -> None:
    if task != "edit":
        raise ConfigError(f"{key}.scorer: the identity scorer compares an edit with its source; {task} prompts "
                          "have none (use it under rewards.edit)")


@register_scorer("identity", families=("shapes",), check=_check_identity)
def identity_scorer(request: ScorerRequest) -> RewardModel:
    """Identity preservation of the shapes world's edits (no artifact needed)."""
    from flowrl.rewards.identity import ShapesIdentityScorer

    return ShapesIdentityScorer()


@register_scorer("jpeg_compressibility")
def jpeg_compressibility_scorer(request: ScorerRequest) -> RewardModel:
    """Rule-based: the negated JPEG size of the image in kilobytes (DDPO's compressibility reward); any
    family, either task, no artifact."""
    from flowrl.rewards.rules import JpegCompressibility

    return JpegCompressibility(request.component.name)
