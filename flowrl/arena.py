"""Arena ratings: Elo from a Bradley-Terry maximum-likelihood fit over all battles.

A battle is (model_a, model_b, outcome) with outcome 1 when a wins, 0 when
b wins and 0.5 for a tie (half a win each way). Under Bradley-Terry,
``P(a beats b) = sigmoid(s_a - s_b)``; the strengths ``s`` maximise

    sum_battles  y log sigmoid(s_a - s_b) + (1 - y) log sigmoid(s_b - s_a)
      - (prior / 2) sum_m s_m^2

The small Gaussian prior keeps the fit finite when a model wins (or loses)
every battle, where the plain likelihood has no maximum; with any mixed
record its pull is negligible. Where it is not, the rating is the prior's and
its bootstrap interval too narrow: :func:`unanimous_pairs` names those pairs. Ratings are on the Elo scale,
``rating = anchor_rating + 400 / ln(10) * (s - s_anchor)``, so a 400-point gap
means 10:1 odds and the anchor model (the base) sits at ``anchor_rating``.
The fit sees only the per-pair totals, so the order of battles cannot
matter. Confidence intervals come from a bootstrap over battles.

The sources of battles (the shapes judge, a VLM judge, human votes) all
end in :func:`fit_elo`; :func:`validate_votes` checks a table of human votes
row by row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ELO_SCALE = 400.0 / math.log(10.0)
OUTCOMES = {"a": 1.0, "b": 0.0, "tie": 0.5}


@dataclass(frozen=True)
class Battle:
    model_a: str
    model_b: str
    outcome: float  # 1: a wins, 0: b wins, 0.5: tie


@dataclass(frozen=True)
class Rating:
    rating: float
    ci_low: float
    ci_high: float


def battle_totals(battles: Sequence[Battle], index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """wins[i, j]: (fractional) wins of i over j; games[i, j]: battles between them (symmetric)."""
    m = len(index)
    wins, games = np.zeros((m, m)), np.zeros((m, m))
    for b in battles:
        i, j = index[b.model_a], index[b.model_b]
        wins[i, j] += b.outcome
        wins[j, i] += 1.0 - b.outcome
        games[i, j] += 1.0
        games[j, i] += 1.0
    return wins, games


def unanimous_pairs(wins: np.ndarray, games: np.ndarray, models: Sequence[str]) -> list[dict]:
    """Each model that won, or lost, every one of its battles against some opponent.

    ``wins`` and ``games`` are :func:`battle_totals` (a tie is half a win each way, so a pair with
    a single tie is not unanimous). Such a pair's rating gap has no maximum-likelihood value from
    their own battles: the fit's prior decides how far apart they sit, and a bootstrap over
    battles redraws the same one-sided record, so their intervals come out too narrow. One entry
    per model and opponent, ``{"model", "opponent", "outcome": "won_all" | "lost_all", "battles"}``,
    in the order of ``models``; pairs that never met are left out."""
    models = list(models)
    if wins.shape != games.shape or wins.shape != (len(models), len(models)):
        raise ValueError(f"unanimous_pairs: expected two {len(models)} x {len(models)} totals, got "
                         f"{wins.shape} and {games.shape}")
    flags = []
    for i, model in enumerate(models):
        for j, opponent in enumerate(models):
            played = games[i, j]
            if i == j or played <= 0:
                continue
            if np.isclose(wins[i, j], played):
                outcome = "won_all"
            elif np.isclose(wins[i, j], 0.0):
                outcome = "lost_all"
            else:
                continue
            flags.append({"model": model, "opponent": opponent, "outcome": outcome, "battles": int(round(played))})
    return flags


def arena_flags(battles: Sequence[Battle], models: Sequence[str]) -> list[dict]:
    """:func:`unanimous_pairs` of one arena's battles."""
    models = list(models)
    wins, games = battle_totals(battles, {name: i for i, name in enumerate(models)})
    return unanimous_pairs(wins, games, models)


def bradley_terry(wins: np.ndarray, games: np.ndarray, prior: float = 1e-2, iterations: int = 100) -> np.ndarray:
    """Strengths (natural log-odds units) maximising the penalised likelihood, by Newton's method.

    The objective is strictly concave (the prior makes it so), so Newton
    converges from zero in a handful of steps.
    """
    m = wins.shape[0]
    s = np.zeros(m)
    for _ in range(iterations):
        diff = s[:, None] - s[None, :]
        p = 1.0 / (1.0 + np.exp(-diff))  # p[i, j] = P(i beats j)
        grad = (wins - games * p).sum(axis=1) - prior * s
        w = games * p * (1.0 - p)
        hess = w - np.diag(w.sum(axis=1)) - prior * np.eye(m)  # negative definite
        step = np.linalg.solve(hess, grad)
        s = s - step
        if np.max(np.abs(step)) < 1e-10:
            break
    return s


def to_elo(strengths: np.ndarray, anchor: int, anchor_rating: float = 1000.0) -> np.ndarray:
    return anchor_rating + ELO_SCALE * (strengths - strengths[anchor])


def fit_elo(
    battles: Sequence[Battle],
    models: Sequence[str],
    anchor: str,
    *,
    anchor_rating: float = 1000.0,
    bootstrap: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    prior: float = 1e-2,
) -> dict[str, Rating]:
    """Elo rating with a bootstrap confidence interval per model."""
    models = list(models)
    if len(set(models)) != len(models):
        raise ValueError(f"models must be distinct, got {models}")
    if anchor not in models:
        raise ValueError(f"anchor {anchor!r} is not one of the models {models}")
    index = {name: i for i, name in enumerate(models)}
    for n, b in enumerate(battles):
        for name in (b.model_a, b.model_b):
            if name not in index:
                raise ValueError(f"battle {n}: unknown model {name!r} (models: {', '.join(models)})")
        if b.model_a == b.model_b:
            raise ValueError(f"battle {n}: a model cannot battle itself ({b.model_a!r})")
        if b.outcome not in (0.0, 0.5, 1.0):
            raise ValueError(f"battle {n}: outcome must be 1, 0 or 0.5, got {b.outcome!r}")
    if not battles:
        raise ValueError("no battles to fit")
    wins, games = battle_totals(battles, index)
    point = to_elo(bradley_terry(wins, games, prior), index[anchor], anchor_rating)
    rng = np.random.default_rng(seed)
    samples = np.empty((bootstrap, len(models)))
    for k in range(bootstrap):
        drawn = rng.integers(0, len(battles), size=len(battles))
        w, g = battle_totals([battles[i] for i in drawn], index)
        samples[k] = to_elo(bradley_terry(w, g, prior), index[anchor], anchor_rating)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail], axis=0) if bootstrap else (point, point)
    return {name: Rating(float(point[i]), float(low[i]), float(high[i])) for name, i in index.items()}


def judge_outcome(primary_a: float, primary_b: float, secondary_a: float, secondary_b: float,
                  tolerance: float = 0.05, primary_tolerance: float = 0.0) -> float:
    """One judged battle on the same prompt and seed: the primary score
    (correctness) decides when it differs by more than ``primary_tolerance``
    (0: any difference, for a 0/1 judge); else the secondary (identity for
    edits, fidelity for T2I) decides if it differs by more than ``tolerance``;
    otherwise a tie. Returns 1 (a wins), 0 (b wins) or 0.5."""
    if abs(primary_a - primary_b) > primary_tolerance:
        return 1.0 if primary_a > primary_b else 0.0
    if abs(secondary_a - secondary_b) > tolerance:
        return 1.0 if secondary_a > secondary_b else 0.0
    return 0.5


def judge_battles(primary: dict[str, np.ndarray], secondary: dict[str, np.ndarray],
                  tolerance: float = 0.05, primary_tolerance: float = 0.0) -> list[Battle]:
    """Every pair of models on every prompt (arrays aligned by prompt and seed)."""
    names = list(primary)
    lengths = {len(primary[n]) for n in names} | {len(secondary[n]) for n in names}
    if len(lengths) != 1:
        raise ValueError(f"per-prompt scores must all have one length, got {sorted(lengths)}")
    battles = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            for k in range(len(primary[a])):
                outcome = judge_outcome(float(primary[a][k]), float(primary[b][k]), float(secondary[a][k]),
                                        float(secondary[b][k]), tolerance, primary_tolerance)
                battles.append(Battle(a, b, outcome))
    return battles


VOTE_COLUMNS = ("arena", "prompt", "model_a", "model_b", "winner")


def validate_votes(frame, models: Sequence[str] | None = None) -> dict[str, list[Battle]]:
    """Human votes (a pandas DataFrame, e.g. read from parquet) -> battles per arena.

    Schema: ``arena`` (t2i | edit), ``prompt`` (non-empty text),
    ``model_a``, ``model_b`` (model names, distinct), ``winner`` (a | b | tie).
    Every bad row is an error naming the row and the column.
    """
    missing = [c for c in VOTE_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"votes: missing column(s) {', '.join(missing)} (schema: {', '.join(VOTE_COLUMNS)})")
    known = set(models) if models is not None else None
    arenas: dict[str, list[Battle]] = {}
    for row, rec in enumerate(frame[list(VOTE_COLUMNS)].itertuples(index=False)):
        arena, prompt, a, b, winner = rec
        if arena not in ("t2i", "edit"):
            raise ValueError(f"votes row {row}: arena must be t2i or edit, got {arena!r}")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"votes row {row}: prompt must be non-empty text, got {prompt!r}")
        for column, name in (("model_a", a), ("model_b", b)):
            if not isinstance(name, str) or not name:
                raise ValueError(f"votes row {row}: {column} must be a model name, got {name!r}")
            if known is not None and name not in known:
                raise ValueError(f"votes row {row}: {column} {name!r} is not one of the models {sorted(known)}")
        if a == b:
            raise ValueError(f"votes row {row}: model_a and model_b are both {a!r}")
        if winner not in OUTCOMES:
            raise ValueError(f"votes row {row}: winner must be a, b or tie, got {winner!r}")
        arenas.setdefault(arena, []).append(Battle(a, b, OUTCOMES[winner]))
    return arenas
