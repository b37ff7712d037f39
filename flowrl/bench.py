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

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from flowrl.arena import Battle, Rating, battle_totals, fit_elo, judge_battles
from flowrl.config import BENCH_PILLARS, FlowRLConfig
from flowrl.evaluation import generate, item_seeds, to_uint8
from flowrl.models.base import FlowModel
from flowrl.shapes import judge
from flowrl.shapes.edits import make_edit_set
from flowrl.shapes.prompts import make_t2i_set
from flowrl.shapes.render import render_batch
from flowrl.shapes.splits import BENCH_VERSION

PILLARS: tuple[str, ...] = BENCH_PILLARS
ARENAS: tuple[str, ...] = ("t2i", "edit")


@dataclass(frozen=True)
class BenchSet:
    """The fixed bench items and their seeds (identical for every model).

    Shapes: drawn from the bench split of the grammar, with the judge's specs.
    Production: read from the bench prompt files (``bench.t2i_prompts`` /
    ``bench.edit_prompts``), no specs.
    """

    t2i_prompts: list[str]
    t2i_categories: list[str]
    edit_instructions: list[str]
    edit_kinds: list[str]
    t2i_seeds: list[int]
    edit_seeds: list[int]
    sources: torch.Tensor  # [M, 3, H, W] the edit sources: float in [0, 1] or uint8
    version: str  # the bench items and these settings
    t2i_specs: list | None = None  # the shapes judge's scene specs, None in production
    edit_specs: list | None = None

    def rows(self) -> list[dict]:
        """One row per item (task, category, prompt, seed) for the record."""
        rows = [{"task": "t2i", "category": c, "prompt": p, "seed": s}
                for p, c, s in zip(self.t2i_prompts, self.t2i_categories, self.t2i_seeds)]
        rows += [{"task": "edit", "category": k, "prompt": p, "seed": s}
                 for p, k, s in zip(self.edit_instructions, self.edit_kinds, self.edit_seeds)]
        return rows


def bench_set(config: FlowRLConfig) -> BenchSet:
    """The bench items of ``config.bench``: the grammar's bench split (shapes) or the bench prompt
    files (qwen_image, checked unseen by training, :func:`flowrl.prompt_files.load_bench_prompts`)."""
    b = config.bench
    from flowrl.models.families import family_of

    if family_of(config).prompt_files:
        return _file_bench_set(config)
    t2i = make_t2i_set(b.seed, b.t2i_per_category, split="bench")
    edit = make_edit_set(b.seed, b.edit_per_kind, split="bench")
    t2i_seeds, edit_seeds = item_seeds(b.seed, len(t2i), len(edit))
    sources = render_batch([e.source for e in edit], config.world.resolution)
    version = f"{BENCH_VERSION}-s{b.seed}-t{b.t2i_per_category}-e{b.edit_per_kind}"
    return BenchSet([e.prompt for e in t2i], [e.spec.category for e in t2i], [e.instruction for e in edit],
                    [e.kind for e in edit], t2i_seeds, edit_seeds, sources, version,
                    t2i_specs=[e.spec for e in t2i], edit_specs=[e.spec for e in edit])


def _file_bench_set(config: FlowRLConfig) -> BenchSet:
    from flowrl.prompt_files import load_bench_prompts

    b = config.bench
    t2i, edit = load_bench_prompts(config, "t2i"), load_bench_prompts(config, "edit")
    t2i_seeds, edit_seeds = item_seeds(b.seed, len(t2i), len(edit))
    # sources stay uint8 (a thousand 1024-pixel sources are 3 GB so, 12 GB as float)
    sources = torch.from_numpy(np.stack([_rgb(data) for data in edit["source_image"]])).permute(0, 3, 1, 2)
    version = (f"files-t{t2i.attrs['sha256'][:12]}-e{edit.attrs['sha256'][:12]}-s{b.seed}"
               f"-t{b.t2i_per_category}-e{b.edit_per_kind}")
    return BenchSet(list(t2i["prompt"]), list(t2i["category"]), list(edit["prompt"]), list(edit["category"]),
                    t2i_seeds, edit_seeds, sources.contiguous(), version)


def _rgb(data: bytes) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


@dataclass(frozen=True)
class BenchImages:
    """One model's images of the bench, uint8 [N, H, W, 3]."""

    t2i: np.ndarray
    edit: np.ndarray


def sample_bench(model_for: Callable[[str], FlowModel], bench: BenchSet, config: FlowRLConfig,
                 release: Callable[[], None] | None = None) -> BenchImages:
    """A model's images of every bench item with the deployment sampler, as uint8.

    ``model_for(task)`` builds the model as it serves ``task`` ("t2i", then "edit"): for
    Qwen-Image the base artifact's edit model is another pipeline (Qwen-Image-Edit), so
    each task's model is built, used and dropped before the next (``release`` runs after
    each: frees accelerator memory). Batches become uint8 as they are decoded."""
    bs = config.bench.batch_size
    parts = {}
    for task, prompts, seeds, sources in (("t2i", bench.t2i_prompts, bench.t2i_seeds, None),
                                          ("edit", bench.edit_instructions, bench.edit_seeds, bench.sources)):
        model = model_for(task)
        batches = [to_uint8(generate(model, prompts[i:i + bs], seeds[i:i + bs], config.sampler,
                                     sources=None if sources is None else sources[i:i + bs], batch_size=bs))
                   for i in range(0, len(prompts), bs)]
        parts[task] = np.concatenate(batches)
        del model, batches
        if release is not None:
            release()
    return BenchImages(parts["t2i"], parts["edit"])


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
        if bench.t2i_specs is None or bench.edit_specs is None:
            raise ValueError("the shapes judge scores the shapes bench only (these items have no scene specs)")
        sources = to_uint8(bench.sources)
        t2i_correct = judge.t2i_correct_batch(images.t2i, bench.t2i_specs)
        edit_correct, identity = judge.edit_scores_batch(sources, images.edit, bench.edit_specs)
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
        prompts, instructions = bench.t2i_prompts, bench.edit_instructions
        t, e = self.rewards["t2i"].components, self.rewards["edit"].components
        return ItemScores(
            t2i_correct=self._unit(t["alignment"], t2i, prompts),
            t2i_fidelity=self._unit(t["fidelity"], t2i, prompts),
            edit_correct=self._unit(e["instruction"], edit, instructions, bench.sources),
            edit_identity=self._unit(e["identity"], edit, instructions, bench.sources),
            # fidelity of an edit's output, judged by the T2I fidelity model on the output alone
            edit_fidelity=self._unit(t["fidelity"], edit, instructions),
        )


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al., 2004) of each image pair, [N, C, H, W] in [0, 1] -> [N]:
    local means, variances and covariance under a Gaussian window (valid positions only, the window
    shrunk to fit small images), ``C1 = 0.01**2``, ``C2 = 0.03**2``, averaged over positions and channels."""
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"ssim: expected two [N, C, H, W] batches of one shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    a, b = a.double(), b.double()
    size = min(window, a.shape[-2], a.shape[-1])
    size -= 1 - size % 2  # odd
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    channels = a.shape[1]
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()

    def blur(v):
        return torch.nn.functional.conv2d(v, kernel, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.flatten(1).mean(1)


class FileBenchScorer:
    """The production bench's scorer: each pillar from the source ``bench.scorers`` names for it,
    a scorer of the reward_model artifact (expected Likert level in [1, 5] mapped to [0, 1]) or,
    for identity, :func:`ssim` of output and source clipped to [0, 1]. Scores are continuous, so a
    battle's primary score decides only beyond ``tolerance``. Images are scored ``batch_size`` at a
    time from uint8, so a bench of thousands of large images never exists as floats at once."""

    def __init__(self, reward_model_uri: str, sources: dict[str, tuple[str, str]], tolerance: float,
                 batch_size: int = 16):
        from pathlib import Path

        from flowrl.config import ConfigError
        from flowrl.rewards.production import LazyVLMScorer
        from flowrl.rewards.shapes_rewards import ScorerReward
        from flowrl.storage import fetch

        local = Path(fetch(reward_model_uri))
        loaded: dict[tuple[str, str], ScorerReward] = {}
        self.scorers: dict[str, tuple[str, ScorerReward | None]] = {}
        for pillar, (task, name) in sources.items():
            if name == "ssim":
                self.scorers[pillar] = ("edit", None)
                continue
            directory = local / task / name
            if (task, name) not in loaded:
                if not (directory / "config.json").is_file():
                    have = sorted(p.name for p in (local / task).iterdir() if p.is_dir()) if (local / task).is_dir() else []
                    raise ConfigError(f"bench.scorers: {pillar}={task}/{name}: {reward_model_uri} has no such scorer "
                                      f"(its {task} scorers: {', '.join(have) or 'none'})")
                loaded[(task, name)] = ScorerReward(LazyVLMScorer(directory), f"{task}/{name}", batch_size=batch_size)
            self.scorers[pillar] = (task, loaded[(task, name)])
        self.name = "reward models (" + ", ".join(f"{p}: {'/'.join(s).lstrip('/')}" for p, s in sources.items()) + ")"
        self.primary_tolerance, self.batch_size = tolerance, batch_size

    def _unit(self, pillar: str, images: np.ndarray, prompts: list[str], sources: torch.Tensor) -> np.ndarray:
        task, reward = self.scorers[pillar]
        out = []
        for start in range(0, len(images), self.batch_size):
            stop = start + self.batch_size
            batch = torch.from_numpy(np.array(images[start:stop])).permute(0, 3, 1, 2).float() / 255
            src = None
            if task == "edit":
                src = sources[start:stop]
                src = src.float() / 255 if src.dtype == torch.uint8 else src.float()
            if reward is None:
                values = ssim(batch, src)
            else:
                low, high = reward.score_range
                values = (reward.score(batch, prompts[start:stop], src).detach().cpu().double() - low) / (high - low)
            out.append(values.cpu().double().clamp(0, 1).numpy())
        return np.concatenate(out) if out else np.zeros(0)

    @torch.no_grad()
    def __call__(self, bench: BenchSet, images: BenchImages) -> ItemScores:
        t2i, edit = bench.t2i_prompts, bench.edit_instructions
        no_sources = torch.zeros(0)
        return ItemScores(
            t2i_correct=self._unit("t2i_alignment", images.t2i, t2i, no_sources),
            t2i_fidelity=self._unit("fidelity", images.t2i, t2i, no_sources),
            edit_correct=self._unit("edit_accuracy", images.edit, edit, bench.sources),
            edit_identity=self._unit("identity", images.edit, edit, bench.sources),
            edit_fidelity=self._unit("fidelity", images.edit, edit, bench.sources),
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
    categories = np.array(bench.t2i_categories)
    for category in dict.fromkeys(categories):
        out[f"t2i_alignment/{category}"] = 100 * scores.t2i_correct[categories == category].mean()
    kinds = np.array(bench.edit_kinds)
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


# --------------------------------------------------------------------------- gains against the anchor


def paired_gain(model_scores, anchor_scores, replicates: int, confidence: float,
                rng: np.random.Generator) -> dict[str, float]:
    """The gain of a model over the anchor on the same items, with a paired bootstrap interval.

    ``delta`` is the mean per-item difference ``model - anchor``. Each replicate draws ``n`` item
    indices with replacement and applies the same draw to both models (so an item that is hard for
    both stays hard for both, and its difficulty cancels in the difference); the interval is the
    ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` percentiles of the replicates' mean
    differences. ``stderr`` is the paired standard error ``sd(differences) / sqrt(n)`` (NaN for one
    item). With ``replicates`` 0 the interval collapses to ``delta``.
    """
    model = np.asarray(model_scores, dtype=np.float64)
    anchor = np.asarray(anchor_scores, dtype=np.float64)
    if model.ndim != 1 or model.shape != anchor.shape:
        raise ValueError(f"paired_gain: expected two 1-d score arrays over the same items, got shapes "
                         f"{model.shape} and {anchor.shape}")
    if len(model) == 0:
        raise ValueError("paired_gain: no items")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"paired_gain: confidence must lie strictly between 0 and 1, got {confidence}")
    if replicates < 0:
        raise ValueError(f"paired_gain: replicates must be >= 0, got {replicates}")
    diff = model - anchor
    n = len(diff)
    delta = float(diff.mean())
    stderr = float(diff.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    if replicates == 0:
        return {"delta": delta, "ci_low": delta, "ci_high": delta, "stderr": stderr}
    drawn = rng.integers(0, n, size=(replicates, n))
    means = diff[drawn].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"delta": delta, "ci_low": float(low), "ci_high": float(high), "stderr": stderr}


def gain_items(scores: ItemScores) -> dict[str, np.ndarray]:
    """The per-item arrays whose means are the four pillars (on the 0-1 scale): fidelity runs over
    the T2I images and then the edits, as its pillar does."""
    return {
        "t2i_alignment": scores.t2i_correct,
        "edit_accuracy": scores.edit_correct,
        "identity": scores.edit_identity,
        "fidelity": np.concatenate([scores.t2i_fidelity, scores.edit_fidelity]),
    }


def bench_gains(scores: dict[str, ItemScores], anchor: str, replicates: int, confidence: float, seed: int
                ) -> dict[str, dict[str, dict[str, float]]]:
    """model -> pillar -> :func:`paired_gain` against ``anchor`` (every model but the anchor).

    Each pillar has its own generator, seeded from ``seed`` and the pillar's position, so every
    model's interval for that pillar uses the same item draws and the result does not depend on
    which models are benched or in what order."""
    if anchor not in scores:
        raise ValueError(f"bench gains: the anchor {anchor!r} has no scores (models: {', '.join(scores)})")
    base = gain_items(scores[anchor])
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, s in scores.items():
        if name == anchor:
            continue
        items = gain_items(s)
        out[name] = {pillar: paired_gain(items[pillar], base[pillar], replicates, confidence,
                                         np.random.default_rng([seed, k]))
                     for k, pillar in enumerate(PILLARS)}
    return out


def group_gains(scores: dict[str, ItemScores], bench: BenchSet, anchor: str, replicates: int, confidence: float,
                seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """model -> ``t2i_alignment/<category>`` or ``edit_accuracy/<kind>`` -> :func:`paired_gain` against
    ``anchor`` on that group's items alone (keys as in :func:`pillars`), every model but the anchor."""
    if anchor not in scores:
        raise ValueError(f"bench gains: the anchor {anchor!r} has no scores (models: {', '.join(scores)})")
    groups = []
    for prefix, field, labels in (("t2i_alignment", "t2i_correct", bench.t2i_categories),
                                  ("edit_accuracy", "edit_correct", bench.edit_kinds)):
        labels = np.asarray(labels)
        groups += [(f"{prefix}/{label}", field, labels == label) for label in dict.fromkeys(labels)]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, s in scores.items():
        if name == anchor:
            continue
        out[name] = {key: paired_gain(getattr(s, field)[mask], getattr(scores[anchor], field)[mask], replicates,
                                      confidence, np.random.default_rng([seed, len(PILLARS) + k]))
                     for k, (key, field, mask) in enumerate(groups)}
    return out


def two_task_difference(a: ItemScores, b: ItemScores, replicates: int, confidence: float,
                        rng: np.random.Generator) -> dict[str, float]:
    """Model ``a``'s two-task mean (T2I alignment and edit accuracy weighed equally, 0-1) minus ``b``'s,
    with a paired bootstrap interval: each replicate resamples the T2I items and the edit items apart
    (each task keeps its size) and applies the same draw to both models. ``stderr`` combines the two
    tasks' paired standard errors."""
    t2i = np.asarray(a.t2i_correct, np.float64) - np.asarray(b.t2i_correct, np.float64)
    edit = np.asarray(a.edit_correct, np.float64) - np.asarray(b.edit_correct, np.float64)
    if len(t2i) < 2 or len(edit) < 2:
        raise ValueError(f"two_task_difference: needs two items or more per task, got {len(t2i)} T2I and "
                         f"{len(edit)} edit items")
    delta = 0.5 * (t2i.mean() + edit.mean())
    stderr = 0.5 * np.sqrt(t2i.var(ddof=1) / len(t2i) + edit.var(ddof=1) / len(edit))
    means = 0.5 * (t2i[rng.integers(0, len(t2i), (replicates, len(t2i)))].mean(1)
                   + edit[rng.integers(0, len(edit), (replicates, len(edit)))].mean(1))
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail]) if replicates else (delta, delta)
    return {"delta": float(delta), "ci_low": float(low), "ci_high": float(high), "stderr": float(stderr)}
