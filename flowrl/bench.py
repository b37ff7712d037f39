"""The bench: pillar scores and arena battles for any set of models.

Every model samples the same bench items (from the bench split of the
grammar, :mod:`flowrl.shapes.splits`) with the same per-item seed and the
deployment sampler, so two models' images of one item differ only by the
model. A *scorer* reads each image once and gives per-item scores; the
pillars and the battles are both computed from those arrays:

- pillars, each 0-100: ``t2i_alignment`` (share of T2I images the judge finds
  exactly right, also per GenEval-like category), ``edit_accuracy`` (share of
  edits done right, also per kind), ``identity`` (mean share of the untouched
  objects kept, over all edits), ``fidelity`` (mean clean-rendering score over
  every image); ``overall`` is the plain mean of the four.
- battles: for every pair of models and every item, correctness decides,
  then the secondary score (fidelity for T2I, identity for edits) if it
  differs by more than a tolerance, else a tie (:func:`flowrl.arena.judge_outcome`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from flowrl.arena import Battle, Rating, battle_totals, fit_elo, judge_battles
from flowrl.config import FlowRLConfig
from flowrl.evaluation import generate, to_uint8
from flowrl.models.base import FlowModel
from flowrl.shapes import judge
from flowrl.shapes.edits import EditExample, make_edit_set
from flowrl.shapes.prompts import T2IExample, make_t2i_set
from flowrl.shapes.render import render_batch
from flowrl.shapes.splits import BENCH_VERSION

PILLARS: tuple[str, ...] = ("t2i_alignment", "edit_accuracy", "identity", "fidelity")
ARENAS: tuple[str, ...] = ("t2i", "edit")


@dataclass(frozen=True)
class BenchSet:
    """The fixed bench items and their seeds (identical for every model)."""

    t2i: list[T2IExample]
    edit: list[EditExample]
    t2i_seeds: list[int]
    edit_seeds: list[int]
    sources: torch.Tensor  # [M, 3, H, W] in [0, 1]: the edit sources
    version: str  # the bench partition and these settings

    def rows(self) -> list[dict]:
        """One row per item (task, category, prompt, seed) for the record."""
        rows = [{"task": "t2i", "category": e.spec.category, "prompt": e.prompt, "seed": s}
                for e, s in zip(self.t2i, self.t2i_seeds)]
        rows += [{"task": "edit", "category": e.kind, "prompt": e.instruction, "seed": s}
                 for e, s in zip(self.edit, self.edit_seeds)]
        return rows


def bench_set(config: FlowRLConfig) -> BenchSet:
    """The bench items of ``config.bench`` drawn from the bench split."""
    b = config.bench
    t2i = make_t2i_set(b.seed, b.t2i_per_category, split="bench")
    edit = make_edit_set(b.seed, b.edit_per_kind, split="bench")
    t2i_seeds = [b.seed * 1_000_003 + i for i in range(len(t2i))]
    edit_seeds = [b.seed * 1_000_003 + 500_000 + i for i in range(len(edit))]
    sources = render_batch([e.source for e in edit], config.world.resolution)
    version = f"{BENCH_VERSION}-s{b.seed}-t{b.t2i_per_category}-e{b.edit_per_kind}"
    return BenchSet(t2i, edit, t2i_seeds, edit_seeds, sources, version)


@dataclass(frozen=True)
class BenchImages:
    """One model's images of the bench, uint8 [N, H, W, 3]."""

    t2i: np.ndarray
    edit: np.ndarray


def sample_bench(model: FlowModel, bench: BenchSet, config: FlowRLConfig) -> BenchImages:
    """The model's images of every bench item with the deployment sampler."""
    bs = config.bench.batch_size
    t2i = generate(model, [e.prompt for e in bench.t2i], bench.t2i_seeds, config.sampler, batch_size=bs)
    edit = generate(model, [e.instruction for e in bench.edit], bench.edit_seeds, config.sampler,
                    sources=bench.sources, batch_size=bs)
    return BenchImages(to_uint8(t2i), to_uint8(edit))


@dataclass(frozen=True)
class ItemScores:
    """Per-item scores of one model: correctness in {0, 1}, the rest in [0, 1]."""

    t2i_correct: np.ndarray  # [N]
    t2i_fidelity: np.ndarray  # [N]
    edit_correct: np.ndarray  # [M]
    edit_identity: np.ndarray  # [M]
    edit_fidelity: np.ndarray  # [M]

    def __post_init__(self) -> None:
        for name in ("t2i_correct", "t2i_fidelity", "edit_correct", "edit_identity", "edit_fidelity"):
            values = np.asarray(getattr(self, name), dtype=np.float64)
            if values.ndim != 1 or not np.all((values >= 0) & (values <= 1)):
                raise ValueError(f"ItemScores.{name} must be a 1-d array of scores in [0, 1]")
            object.__setattr__(self, name, values)
        if len(self.t2i_correct) != len(self.t2i_fidelity):
            raise ValueError("ItemScores: t2i arrays differ in length")
        if not len(self.edit_correct) == len(self.edit_identity) == len(self.edit_fidelity):
            raise ValueError("ItemScores: edit arrays differ in length")


class ShapesJudgeScorer:
    """The shapes world's held-out judge: reads every image once. Correctness
    is 0 or 1, so any difference decides a battle (``primary_tolerance`` 0)."""

    name = "shapes_judge"
    primary_tolerance = 0.0

    def __call__(self, bench: BenchSet, images: BenchImages) -> ItemScores:
        sources = to_uint8(bench.sources)
        t2i_correct = judge.t2i_correct_batch(images.t2i, [e.spec for e in bench.t2i])
        edit_correct, identity = judge.edit_scores_batch(sources, images.edit, [e.spec for e in bench.edit])
        return ItemScores(t2i_correct, judge.fidelity_batch(images.t2i), edit_correct, identity,
                          judge.fidelity_batch(images.edit))


class RewardModelScorer:
    """Learned reward models as the bench's scorer (production, where no judge
    exists): alignment and fidelity scorers give expected Likert levels in
    [1, 5], mapped to [0, 1]; identity comes from the identity scorer. The same
    pillars and battles follow; as the scores are continuous, a battle's
    primary score decides only beyond ``tolerance``.

    ``rewards``: {"t2i": composite with ``alignment`` and ``fidelity``,
    "edit": composite with ``instruction`` and ``identity``} (the
    reward_model stage's models, :func:`flowrl.rewards.shapes_rewards.load_shapes_rewards`).
    """

    name = "reward_models"

    def __init__(self, rewards: dict, tolerance: float, batch_size: int = 256):
        for task, needed in (("t2i", ("alignment", "fidelity")), ("edit", ("instruction", "identity"))):
            missing = [n for n in needed if n not in rewards[task].components]
            if missing:
                raise ValueError(f"reward models for the bench: the {task} composite lacks {missing}")
        self.rewards, self.primary_tolerance, self.batch_size = rewards, tolerance, batch_size

    @staticmethod
    def _unit(model, images, prompts, sources=None) -> np.ndarray:
        low, high = getattr(model, "score_range", (0.0, 1.0))
        values = model.score(images, prompts, sources).detach().cpu().double().numpy()
        return np.clip((values - low) / (high - low), 0.0, 1.0)

    @torch.no_grad()
    def __call__(self, bench: BenchSet, images: BenchImages) -> ItemScores:
        t2i = torch.from_numpy(images.t2i).permute(0, 3, 1, 2).float() / 255
        edit = torch.from_numpy(images.edit).permute(0, 3, 1, 2).float() / 255
        prompts = [e.prompt for e in bench.t2i]
        instructions = [e.instruction for e in bench.edit]
        t, e = self.rewards["t2i"].components, self.rewards["edit"].components
        return ItemScores(
            t2i_correct=self._unit(t["alignment"], t2i, prompts),
            t2i_fidelity=self._unit(t["fidelity"], t2i, prompts),
            edit_correct=self._unit(e["instruction"], edit, instructions, bench.sources),
            edit_identity=self._unit(e["identity"], edit, instructions, bench.sources),
            # fidelity of an edit's output, judged by the T2I fidelity model on the output alone
            edit_fidelity=self._unit(t["fidelity"], edit, instructions),
        )


def pillars(scores: ItemScores, bench: BenchSet) -> dict[str, float]:
    """The four pillars, their breakdowns and ``overall``, each 0-100."""
    out = {
        "t2i_alignment": 100 * scores.t2i_correct.mean(),
        "edit_accuracy": 100 * scores.edit_correct.mean(),
        "identity": 100 * scores.edit_identity.mean(),
        "fidelity": 100 * np.concatenate([scores.t2i_fidelity, scores.edit_fidelity]).mean(),
    }
    out["overall"] = float(np.mean([out[p] for p in PILLARS]))
    categories = np.array([e.spec.category for e in bench.t2i])
    for category in dict.fromkeys(categories):
        out[f"t2i_alignment/{category}"] = 100 * scores.t2i_correct[categories == category].mean()
    kinds = np.array([e.kind for e in bench.edit])
    for kind in dict.fromkeys(kinds):
        out[f"edit_accuracy/{kind}"] = 100 * scores.edit_correct[kinds == kind].mean()
    return {key: round(float(value), 3) for key, value in out.items()}


def arena_battles(scores: dict[str, ItemScores], tolerance: float, primary_tolerance: float = 0.0
                  ) -> dict[str, list[Battle]]:
    """Every pair of models on every bench item, per arena."""
    return {
        "t2i": judge_battles({m: s.t2i_correct for m, s in scores.items()},
                             {m: s.t2i_fidelity for m, s in scores.items()}, tolerance, primary_tolerance),
        "edit": judge_battles({m: s.edit_correct for m, s in scores.items()},
                              {m: s.edit_identity for m, s in scores.items()}, tolerance, primary_tolerance),
    }


def arena_ratings(battles: dict[str, list[Battle]], models: list[str], config: FlowRLConfig
                  ) -> dict[str, dict[str, Rating]]:
    """Bradley-Terry Elo with bootstrap intervals, one fit per arena."""
    b = config.bench
    if b.anchor not in models:
        raise ValueError(f"bench.anchor {b.anchor!r} is not one of the benched models ({', '.join(models)})")
    return {
        arena: fit_elo(arena_list, models, b.anchor, bootstrap=b.bootstrap, confidence=b.confidence,
                       seed=config.bench.seed + k)
        for k, (arena, arena_list) in enumerate(battles.items())
    }


def win_rates(battles: list[Battle], models: list[str]) -> np.ndarray:
    """[i, j]: share of i's battles against j that i won (ties count half); NaN on the diagonal."""
    won, played = battle_totals(battles, {m: i for i, m in enumerate(models)})
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(played > 0, won / played, np.nan)
