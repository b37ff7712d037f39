"""Composite rewards: named reward models combined with per-category weights.

The paper composes one reward per task (T2I: alignment, quality, fidelity;
edit: instruction following, identity preservation) and weights the parts by
prompt category. The composition here is the plain weighted sum; GRPO does
not use that sum directly but normalises each component within a prompt group
first, ``A_i = sum_k w_k(category) (R_k,i - mean_k) / (std_k + eps)``
(docs/design.md, Math), which is why :meth:`CompositeReward.weight_matrix`
hands out the per-row weights and ``score_components`` the raw parts.

Gates. A component may be gated by another component of the same composite
(``gates = {gated: gate}``, the config's ``gate`` key): its score is multiplied
row by row by the gate's score mapped onto [0, 1] (:func:`gate_factor`). The
product is an extra column ``<gated>_gated`` appended after the components; it
carries the gated component's weights, while the raw column stays (weight 0)
so the tracker sees both. The shapes edit reward gates identity by the
instruction score: without the gate, returning the source unchanged earns full
identity reward whatever the instruction asked, a reward a policy learns to
collect; with it, keeping the rest of the scene pays only as far as the
instruction was carried out.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from flowrl.rewards.base import RewardModel, RewardScores
from flowrl.shapes.edits import parse_edit
from flowrl.shapes.prompts import parse_t2i


def _weight_row(where: str, weights: Mapping[str, float], names: tuple[str, ...]) -> tuple[float, ...]:
    """One category's weights in component order; a component left out weighs 0.

    ValueError, naming ``where`` and the component, for an unknown component,
    a weight that is not a finite number >= 0, or a row that is all zero (a
    category whose reward is constant gives GRPO no signal: surely a mistake).
    """
    for name, weight in weights.items():
        if name not in names:
            raise ValueError(f"{where}: weight for unknown component {name!r}; components are {list(names)}")
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise ValueError(f"{where}: weight of {name!r} must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{where}: weight of {name!r} must be finite and >= 0, got {weight!r}")
    row = tuple(float(weights.get(name, 0.0)) for name in names)
    if not any(row):
        raise ValueError(f"{where}: every weight is zero; give at least one component a positive weight")
    return row


def gate_factor(scores: torch.Tensor, score_range: tuple[float, float]) -> torch.Tensor:
    """A gate component's scores [B] as factors in [0, 1]: 0 up to the middle of its range, then rising
    linearly to 1 at the top, ``(score - mid) / (high - mid)`` clipped.

    A learned Likert scorer (range (1, 5)) gives ``(level - 3) / 2``: an instruction the scorer thinks was
    not carried out (level 3 or less) shuts the gated component off, a sure "done" (level 5) passes it
    whole. Below the middle the factor is flat on purpose: in a GRPO group where no sample carried the
    instruction out, a factor that still rose with the gate's score would keep paying the samples that
    changed least (an unchanged copy of the source first) for the identity they preserve.
    """
    low, high = (float(v) for v in score_range)
    if not (math.isfinite(low) and math.isfinite(high) and high > low):
        raise ValueError(f"a gate's score_range must be finite with high > low, got {score_range!r}")
    mid = (low + high) / 2
    return ((scores - mid) / (high - mid)).clamp(0.0, 1.0)


def gated_name(name: str) -> str:
    """The column under which component ``name``'s gated score is weighted and logged."""
    return f"{name}_gated"


def _checked_gates(gates: Mapping[str, str], components: Mapping[str, object]) -> dict[str, tuple[float, float]]:
    """{gate: its score range} after checking ``gates`` ({gated component: gate component}): both name
    components, a component does not gate itself, a gate is not gated, the gated column's name is free,
    and the gate's model declares a finite ``score_range``."""
    ranges = {}
    for gated, gate in gates.items():
        where = f"gates[{gated!r}]"
        for name in (gated, gate):
            if name not in components:
                raise ValueError(f"{where}: unknown component {name!r}; components are {list(components)}")
        if gated == gate:
            raise ValueError(f"{where}: a component cannot gate itself")
        if gate in gates:
            raise ValueError(f"{where}: gate {gate!r} is gated itself; gates do not chain")
        if gated_name(gated) in components:
            raise ValueError(f"{where}: column {gated_name(gated)!r} is already a component's name")
        score_range = getattr(components[gate], "score_range", None)
        if score_range is None:
            raise ValueError(f"{where}: gate {gate!r} ({type(components[gate]).__name__}) declares no score_range, "
                             "so its scores cannot be mapped onto [0, 1]")
        try:
            gate_factor(torch.zeros(1), score_range)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{where}: gate {gate!r}: {error}") from None
        ranges[gate] = tuple(float(v) for v in score_range)
    return ranges


def _checked_scores(name: str, scores: object, batch: int, device: torch.device) -> torch.Tensor:
    """A component's [B] float scores, or an error naming the component."""
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"reward component {name!r} returned {type(scores).__name__}, expected a [{batch}] tensor")
    if scores.shape != (batch,):
        raise ValueError(f"reward component {name!r} returned shape {tuple(scores.shape)}, expected ({batch},)")
    finite = torch.isfinite(scores)
    if not finite.all():
        rows = (~finite).nonzero()[:, 0].tolist()
        raise ValueError(f"reward component {name!r} returned non-finite scores at rows {rows}")
    return scores.to(device=device, dtype=torch.float32)


@dataclass(frozen=True)
class CompositeReward:
    """A RewardModel whose total is the per-row weighted sum of its components.

    ``categorize(prompt)`` names each row's category; ``weights[category]``
    maps component names to weights, categories missing from ``weights`` use
    ``default_weights``, and a component missing from a row's weights weighs
    0 (it is still computed and logged). Weights are checked once, here.

    ``gates``: {gated component: gate component} (module docstring). The
    columns (``component_names``, ``weight_matrix``, the logged components)
    are the components in order, then ``<gated>_gated`` per gate in the order
    of ``gates``; a gated component's weight moves to its gated column.
    """

    components: Mapping[str, RewardModel]
    weights: Mapping[str, Mapping[str, float]]
    categorize: Callable[[str], str]
    default_weights: Mapping[str, float]
    gates: Mapping[str, str] = field(default_factory=dict)
    _rows: Mapping[str, tuple[float, ...]] = field(init=False, repr=False)
    _default_row: tuple[float, ...] = field(init=False, repr=False)
    _gate_ranges: Mapping[str, tuple[float, float]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.components:
            raise ValueError("a composite reward needs at least one component")
        for name, model in self.components.items():
            if not isinstance(model, RewardModel):
                raise TypeError(f"reward component {name!r} ({type(model).__name__}) lacks score / score_components")
        names = tuple(self.components)
        gates = dict(self.gates)
        ranges = _checked_gates(gates, self.components)

        def columns(where: str, weights: Mapping[str, float]) -> tuple[float, ...]:
            row = dict(zip(names, _weight_row(where, weights, names)))
            gated = tuple(row[name] for name in gates)
            for name in gates:
                row[name] = 0.0  # the raw score is logged, its weight moves to the gated column
            return tuple(row.values()) + gated

        rows = {category: columns(f"weights[{category!r}]", row) for category, row in self.weights.items()}
        # Private copies so the frozen object cannot change under a caller's dict.
        object.__setattr__(self, "components", MappingProxyType(dict(self.components)))
        frozen_weights = {category: MappingProxyType(dict(row)) for category, row in self.weights.items()}
        object.__setattr__(self, "weights", MappingProxyType(frozen_weights))
        object.__setattr__(self, "default_weights", MappingProxyType(dict(self.default_weights)))
        object.__setattr__(self, "gates", MappingProxyType(gates))
        object.__setattr__(self, "_gate_ranges", MappingProxyType(ranges))
        object.__setattr__(self, "_rows", MappingProxyType(rows))
        object.__setattr__(self, "_default_row", columns("default_weights", self.default_weights))

    @property
    def component_names(self) -> tuple[str, ...]:
        """Column names in the order of ``weight_matrix``: the components, then each gated column."""
        return tuple(self.components) + tuple(gated_name(name) for name in self.gates)

    def weight_matrix(self, prompts: list[str]) -> torch.Tensor:
        """[B, K] float32: row i holds the weights of ``categorize(prompts[i])``, in column order."""
        rows = [self._rows.get(self.categorize(prompt), self._default_row) for prompt in prompts]
        return torch.tensor(rows, dtype=torch.float32).reshape(len(prompts), len(self.component_names))

    def score_components(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> RewardScores:
        """Run each component once; total [B] = per-row weighted sum of the columns [B] (the components'
        raw scores, then each gated score)."""
        batch = images.shape[0]
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} images")
        # Weights first, so an unparseable prompt fails before any model runs.
        weights = self.weight_matrix(prompts).to(images.device)  # [B, K]
        scores = {
            name: _checked_scores(name, model.score(images, prompts, sources), batch, images.device)
            for name, model in self.components.items()
        }
        for name, gate in self.gates.items():
            scores[gated_name(name)] = scores[name] * gate_factor(scores[gate], self._gate_ranges[gate])
        stacked = torch.stack(list(scores.values()), dim=1)  # [B, K]
        total = (weights * stacked).sum(dim=1)  # [B]
        return RewardScores(total=total, components=scores)

    def score(self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None) -> torch.Tensor:
        """[B] the weighted total."""
        return self.score_components(images, prompts, sources).total


def shapes_category(prompt: str) -> str:
    """The category of a shapes-world prompt: its T2I category, or the edit kind of an instruction."""
    try:
        return parse_t2i(prompt).category
    except ValueError:
        pass
    try:
        return parse_edit(prompt).kind
    except ValueError:
        raise ValueError(f"{prompt!r} is neither a shapes T2I prompt nor a shapes edit instruction") from None
