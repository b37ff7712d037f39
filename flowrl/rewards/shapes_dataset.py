"""Build the shapes world's annotation datasets.

Per prompt (or edit instruction) a handful of candidate images: the base
model's samples, the clean rendering of a correct scene, a rendering
perturbed to contradict the prompt, and degraded copies (noise, blur, stray
blobs, and by config an off-palette colour cast). Simulated annotators label each candidate (pointwise) and compare
pairs of candidates of the same prompt (pairwise).
"""

from __future__ import annotations

import itertools
import typing
from dataclasses import dataclass

import numpy as np
import pandas as pd

from flowrl.config import AnnotateConfig, Degradation
from flowrl.rewards.annotations import PAIRWISE_COLUMNS, POINTWISE_COLUMNS, png_bytes
from flowrl.rewards.shapes_annotators import Annotator, Latents, latents_for
from flowrl.shapes import perturb
from flowrl.shapes.edits import EDIT_KINDS, EditExample, sample_edit
from flowrl.shapes.prompts import T2I_CATEGORIES, T2IExample, sample_t2i
from flowrl.shapes.render import render_scene
from flowrl.shapes.scene import COLORS, Scene, ShapeObject


@dataclass(frozen=True)
class Candidates:
    """One prompt's images to annotate."""

    task: str
    prompt: str
    category: str
    spec: object  # T2ISpec or EditSpec
    images: list[np.ndarray]  # uint8 [H, W, 3] each
    source: np.ndarray | None  # edits only


# Degradations of a candidate image: texture (noise, blur, an off-palette colour cast) or structure (blotches).
DEGRADATIONS: tuple[str, ...] = typing.get_args(Degradation)
DEFAULT_DEGRADATIONS: tuple[str, ...] = AnnotateConfig().degradations


def degrade(rng: np.random.Generator, image: np.ndarray, kinds: tuple[str, ...] = DEFAULT_DEGRADATIONS) -> np.ndarray:
    """One degradation drawn uniformly from ``kinds`` (names in DEGRADATIONS), at a random strength."""
    choice = kinds[int(rng.integers(len(kinds)))]
    if choice == "noise":
        return perturb.add_noise(image, rng, std=float(rng.uniform(0.02, 0.08)))
    if choice == "blur":
        return perturb.blur(image, sigma=float(rng.uniform(0.4, 1.0)))
    if choice == "blotches":
        return perturb.add_blotches(image, rng, count=int(rng.integers(1, 4)))
    if choice == "color_cast":
        return perturb.color_cast(image, rng, distance=float(rng.uniform(8.0, 40.0)))
    raise ValueError(f"unknown degradation {choice!r} (known: {', '.join(DEGRADATIONS)})")


def t2i_candidates(
    rng: np.random.Generator, example: T2IExample, resolution: int, degradations: tuple[str, ...] = DEFAULT_DEGRADATIONS
) -> Candidates:
    clean = render_scene(example.scene, resolution)
    kind = str(rng.choice(perturb.applicable_perturbations(example.spec, example.scene)))
    wrong = render_scene(perturb.perturb_scene(rng, example.spec, example.scene, kind), resolution)
    images = [clean, wrong, degrade(rng, clean, degradations), degrade(rng, wrong, degradations)]
    return Candidates("t2i", example.prompt, example.spec.category, example.spec, images, None)


def _recolor_untouched(rng: np.random.Generator, example: EditExample) -> Scene:
    """The target with one object the instruction leaves alone recoloured."""
    touched = {(example.spec.color, example.spec.shape)}
    others = [o for o in example.target.objects if (o.color, o.shape) not in touched]
    if not others:
        return example.target
    victim = others[int(rng.integers(len(others)))]
    color = str(rng.choice([c for c in COLORS if c != victim.color]))
    return example.target.replace(victim, ShapeObject(victim.shape, color, victim.row, victim.col))


def edit_candidates(
    rng: np.random.Generator, example: EditExample, resolution: int, degradations: tuple[str, ...] = DEFAULT_DEGRADATIONS
) -> Candidates:
    target = render_scene(example.target, resolution)
    unchanged = render_scene(example.source, resolution)
    drifted = render_scene(_recolor_untouched(rng, example), resolution)
    images = [target, unchanged, drifted, degrade(rng, target, degradations)]
    return Candidates("edit", example.instruction, example.kind, example.spec, images, unchanged)


def draw_candidates(
    rng: np.random.Generator, t2i_per_category: int, edit_per_kind: int, resolution: int,
    degradations: tuple[str, ...] = DEFAULT_DEGRADATIONS,
) -> list[Candidates]:
    """Rendered candidates for fresh prompts of every category and edit kind."""
    out = []
    for category in T2I_CATEGORIES:
        out += [t2i_candidates(rng, sample_t2i(rng, category), resolution, degradations)
                for _ in range(t2i_per_category)]
    for kind in EDIT_KINDS:
        out += [edit_candidates(rng, sample_edit(rng, kind), resolution, degradations) for _ in range(edit_per_kind)]
    return out


def add_model_samples(candidates: list[Candidates], samples: list[list[np.ndarray]]) -> list[Candidates]:
    """Append each prompt's model samples (same order as ``candidates``)."""
    if len(samples) != len(candidates):
        raise ValueError(f"{len(samples)} sample lists for {len(candidates)} prompts")
    return [
        Candidates(c.task, c.prompt, c.category, c.spec, c.images + list(s), c.source)
        for c, s in zip(candidates, samples)
    ]


def _latents(c: Candidates) -> list[Latents]:
    images = np.stack(c.images)
    sources = None if c.source is None else np.stack([c.source] * len(c.images))
    return latents_for(images, [c.spec] * len(c.images), sources)


def annotate(
    candidates: list[Candidates],
    annotators: list[Annotator],
    rng: np.random.Generator,
    labels_per_image: int,
    pairs_per_prompt: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(pointwise, pairwise) frames in the documented schema."""
    point_rows, pair_rows = [], []
    for p, c in enumerate(candidates):
        latents = _latents(c)
        source = png_bytes(c.source) if c.source is not None else None
        encoded = [png_bytes(img) for img in c.images]
        for i, (png, lat) in enumerate(zip(encoded, latents)):
            for who in rng.choice(len(annotators), size=labels_per_image, replace=False):
                person = annotators[who]
                point_rows.append({
                    "id": f"{c.task}-{p:05d}-{i}-{person.name}", "task": c.task, "prompt": c.prompt,
                    "category": c.category, "image": png, "source_image": source,
                    **{k: person.likert(v, rng) for k, v in zip(("alignment", "quality", "fidelity"), lat.as_tuple())},
                    "annotator": person.name, "group": f"{c.task}-{p:05d}",
                })
        pairs = list(itertools.combinations(range(len(c.images)), 2))
        for j in rng.choice(len(pairs), size=min(pairs_per_prompt, len(pairs)), replace=False):
            a, b = pairs[j]
            person = annotators[int(rng.integers(len(annotators)))]
            pair_rows.append({
                "id": f"{c.task}-{p:05d}-{a}-{b}", "task": c.task, "prompt": c.prompt, "category": c.category,
                "source_image": source, "image_a": encoded[a], "image_b": encoded[b],
                "preference": person.prefer(latents[a], latents[b], rng),
                "valid_a": latents[a].alignment >= 1.0, "valid_b": latents[b].alignment >= 1.0,
                # the shapes world draws no text, so there is no text to distort
                "text_distortion_a": False, "text_distortion_b": False,
                "figure_distortion_a": latents[a].fidelity < 0.9, "figure_distortion_b": latents[b].fidelity < 0.9,
                "annotator": person.name, "group": f"{c.task}-{p:05d}",
            })
    return (
        pd.DataFrame(point_rows, columns=[*POINTWISE_COLUMNS, "group"]),
        pd.DataFrame(pair_rows, columns=[*PAIRWISE_COLUMNS, "group"]),
    )
