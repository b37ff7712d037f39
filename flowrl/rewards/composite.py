"""Composite rewards: named reward models combined with per-category weights.

The paper composes one reward per task (T2I: alignment, quality, fidelity;
edit: instruction following, identity preservation) and weights the parts by
prompt category. The composition here is the plain weighted sum; GRPO does
not use that sum directly but normalises each component within a prompt group
first, ``A_i = sum_k w_k(category) (R_k,i - mean_k) / (std_k + eps)``
(docs/design.md, Math), which is why :meth:`CompositeReward.weight_matrix`
hands out the per-row weights and ``score_components`` the raw parts.
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
    """

    components: Mapping[str, RewardModel]
    weights: Mapping[str, Mapping[str, float]]
    categorize: Callable[[str], str]
    default_weights: Mapping[str, float]
    _rows: Mapping[str, tuple[float, ...]] = field(init=False, repr=False)
    _default_row: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.components:
            raise ValueError("a composite reward needs at least one component")
        for name, model in self.components.items():
            if not isinstance(model, RewardModel):
                raise TypeError(f"reward component {name!r} ({type(model).__name__}) lacks score / score_components")
        names = tuple(self.components)
        rows = {category: _weight_row(f"weights[{category!r}]", row, names) for category, row in self.weights.items()}
        # Private copies so the frozen object cannot change under a caller's dict.
        object.__setattr__(self, "components", MappingProxyType(dict(self.components)))
        frozen_weights = {category: MappingProxyType(dict(row)) for category, row in self.weights.items()}
        object.__setattr__(self, "weights", MappingProxyType(frozen_weights))
        object.__setattr__(self, "default_weights", MappingProxyType(dict(self.default_weights)))
        object.__setattr__(self, "_rows", MappingProxyType(rows))
        object.__setattr__(self, "_default_row", _weight_row("default_weights", self.default_weights, names))

    @property
    def component_names(self) -> tuple[str, ...]:
        """Component names in the column order of ``weight_matrix``."""
        return tuple(self.components)

    def weight_matrix(self, prompts: list[str]) -> torch.Tensor:
        """[B, K] float32: row i holds the weights of ``categorize(prompts[i])``, in component order."""
        rows = [self._rows.get(self.categorize(prompt), self._default_row) for prompt in prompts]
        return torch.tensor(rows, dtype=torch.float32).reshape(len(prompts), len(self.components))

    def score_components(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> RewardScores:
        """Run each component once; total [B] = per-row weighted sum of the components [B]."""
        batch = images.shape[0]
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts for {batch} images")
        # Weights first, so an unparseable prompt fails before any model runs.
        weights = self.weight_matrix(prompts).to(images.device)  # [B, K]
        scores = {
            name: _checked_scores(name, model.score(images, prompts, sources), batch, images.device)
            for name, model in self.components.items()
        }
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
