"""Rendered stand-ins for edit policies, and a small instruction scorer trained on simulated labels of
them: what the copy-the-source test of the gated edit reward (tests/rewards/test_edit_gate.py) is built on.

A *failed edit* changes the picture without carrying the instruction out, the way the base model's misses
do: the instruction's edit applied to another object of the scene (:func:`wrong_object`), or the named
object left alone while another one drifts to another colour (:func:`drift_only`). Both leave the named
object's postcondition false, so the annotators' instruction latent is 0 for them, as for an unchanged copy.
"""

from __future__ import annotations

import numpy as np
import torch

from flowrl.rewards.shapes_annotators import annotator_pool
from flowrl.rewards.shapes_dataset import Candidates, annotate, edit_candidates
from flowrl.rewards.shapes_scorer import ScorerArch, ShapesScorer
from flowrl.rewards.training import PointwiseData, fit, pointwise_step_loss
from flowrl.shapes.edits import EDIT_KINDS, EditExample, moved_cell, sample_edit
from flowrl.shapes.render import render_scene
from flowrl.shapes.scene import COLORS, GRID, SHAPES, Scene, ShapeObject

RESOLUTION = 32


def _untouched(example: EditExample) -> list[ShapeObject]:
    """The source objects the instruction does not name."""
    named = (example.spec.color, example.spec.shape)
    return [o for o in example.source.objects if (o.color, o.shape) != named]


def _other_color(rng: np.random.Generator, *avoid: str) -> str:
    return str(rng.choice([c for c in COLORS if c not in avoid]))


def wrong_object(rng: np.random.Generator, example: EditExample) -> Scene:
    """The instruction's kind of edit applied to an object it does not name: another object recoloured
    (to the asked colour where it can be), removed or moved; for ``add``, an object of another colour or
    shape added."""
    source, spec = example.source, example.spec
    free = source.free_cells()
    if spec.kind == "add":
        color, shape = spec.color, spec.shape
        while (color, shape) == (spec.color, spec.shape):
            color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        return Scene(source.objects + (ShapeObject(shape, color, *free[int(rng.integers(len(free)))]),))
    others = _untouched(example)
    victim = others[int(rng.integers(len(others)))]
    if spec.kind == "remove":
        return Scene(tuple(o for o in source.objects if o != victim))
    if spec.kind == "recolor":
        color = spec.new_color if spec.new_color != victim.color else _other_color(rng, victim.color)
        return source.replace(victim, ShapeObject(victim.shape, str(color), victim.row, victim.col))
    cell = moved_cell(victim.cell, str(spec.direction))
    if cell not in free or not all(0 <= v < GRID for v in cell):
        cell = free[int(rng.integers(len(free)))]
    return source.replace(victim, ShapeObject(victim.shape, victim.color, *cell))


def drift_only(rng: np.random.Generator, example: EditExample) -> Scene:
    """The source with the named object left alone and one other object recoloured."""
    others = _untouched(example)
    victim = others[int(rng.integers(len(others)))]
    return example.source.replace(victim, ShapeObject(victim.shape, _other_color(rng, victim.color), victim.row,
                                                      victim.col))


def failed_edit(rng: np.random.Generator, example: EditExample) -> Scene:
    """One failed-but-changed output: :func:`wrong_object` or :func:`drift_only`, drawn evenly."""
    return (wrong_object if rng.random() < 0.5 else drift_only)(rng, example)


def edit_examples(seed: int, per_kind: int) -> list[EditExample]:
    """``per_kind`` fresh instructions of every kind (kind order), from one stream per ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_edit(rng, kind) for kind in EDIT_KINDS for _ in range(per_kind)]


def labelled_candidates(seed: int, per_kind: int) -> list[Candidates]:
    """Per instruction: the annotation stage's rendered edit candidates (target, unchanged source, target
    with drift, degraded target) and two failed edits, as a base model's misses would add them."""
    rng = np.random.default_rng(seed)
    out = []
    for example in edit_examples(seed + 1, per_kind):
        c = edit_candidates(rng, example, RESOLUTION)
        failed = [render_scene(f(rng, example), RESOLUTION) for f in (wrong_object, drift_only)]
        out.append(Candidates(c.task, c.prompt, c.category, c.spec, c.images + failed, c.source))
    return out


def train_instruction_scorer(seed: int = 5, per_kind: int = 60, steps: int = 300, width: int = 48,
                             depth: int = 2, batch_size: int = 32) -> ShapesScorer:
    """A pointwise instruction (alignment) scorer trained on simulated annotators' labels of
    :func:`labelled_candidates`, with the reward_model stage's loss and optimiser loop."""
    rng = np.random.default_rng(seed)
    pool = annotator_pool(rng, 8, 0.3, (0.3, 0.7))  # the shapes run's annotator settings
    points, _ = annotate(labelled_candidates(seed, per_kind), pool, rng, labels_per_image=1, pairs_per_prompt=0)
    data = PointwiseData.from_frame(points, "alignment")
    torch.manual_seed(seed)
    scorer = ShapesScorer(ScorerArch(width=width, depth=depth, heads=4), RESOLUTION)
    fit(scorer, lambda idx: pointwise_step_loss(scorer, data, idx), len(data.prompts), steps=steps,
        batch_size=batch_size, lr=1e-3, seed=seed)
    return scorer.eval()
