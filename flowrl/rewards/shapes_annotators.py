"""Simulated human annotators for the shapes world.

The judge gives each image three latent scores in [0, 1] (prompt adherence,
texture/aesthetics, structural correctness). An annotator turns a latent
into a Likert level through its own bias and noise, and compares two images
in the priority order consistency > structural distortion > texture >
aesthetics, with its own noise, so the labels are human-like: consistent on
average, wrong sometimes, and never a copy of the judge.

Instruction adherence of an edit (:func:`edit_latents`), as a person rating
"did it do what was asked" reads it:

- carried out: the named object's postcondition holds and the object count is
  the target's -> 1. Drift of an object the instruction leaves alone (it
  changed colour, shape or cell) does not lower this latent: the instruction
  was carried out, and identity preservation is what pays for the drift.
- carried out with a side effect: the postcondition holds but the count is
  off (an object vanished or an extra one appeared) ->
  ``PARTIAL_ALIGNMENT`` times the share of untouched source objects kept
  unchanged, so a blank canvas for "remove the X" earns nothing.
- not carried out: the named object's postcondition fails -> 0, whatever
  else is kept. This covers the source returned unchanged and an edit
  applied to the wrong object; neither earns partial credit, so a policy
  cannot collect instruction reward by copying its source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from flowrl.shapes import judge
from flowrl.shapes.detect import DetectedScene, Reading, read_images
from flowrl.shapes.edits import EditSpec, moved_cell
from flowrl.shapes.prompts import T2ISpec

# The texture and structure halves of the judge's fidelity, with its scales.
_TEXTURE_TERMS = ("background", "color")
_STRUCTURE_TERMS = ("strays", "shapes")
# Instruction adherence of an edit whose instruction was carried out but which also added or removed
# another object, scaled by the share of untouched objects kept (see the module docstring).
PARTIAL_ALIGNMENT = 0.5


@dataclass(frozen=True)
class Latents:
    """The judge's view of one image, each in [0, 1]."""

    alignment: float  # prompt / instruction adherence, 1 = exactly right
    quality: float  # texture and aesthetics: clean background, pure colours
    fidelity: float  # structure: no stray blobs, no malformed shapes

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.alignment, self.quality, self.fidelity)


def _term_score(terms: judge.FidelityTerms, names: tuple[str, ...]) -> float:
    return math.exp(-sum(getattr(terms, n) / judge.FIDELITY_SCALES[n] for n in names))


def _matched_fraction(scene: DetectedScene, spec: T2ISpec) -> tuple[float, int]:
    """Share of the requested objects present (greedy match), and the extras."""
    pool = list(scene.objects)
    matched = 0
    for ref in spec.objects:
        for i, obj in enumerate(pool):
            if obj.shape == ref.shape and (ref.color is None or obj.color == ref.color):
                matched += 1
                del pool[i]
                break
    return matched / len(spec.objects), len(pool)


def t2i_latents(reading: Reading, spec: T2ISpec) -> Latents:
    terms = judge.fidelity_terms_of(reading)
    if judge.t2i_correct_scene(reading.scene, spec):
        alignment = 1.0
    else:
        fraction, extras = _matched_fraction(reading.scene, spec)
        alignment = float(np.clip(0.6 * fraction - 0.15 * extras, 0.0, 0.6))
    return Latents(alignment, _term_score(terms, _TEXTURE_TERMS), _term_score(terms, _STRUCTURE_TERMS))


def instruction_done(source: DetectedScene, output: DetectedScene, spec: EditSpec) -> bool:
    """The named object's postcondition holds in ``output``, whatever happened to the other objects.

    remove: no object of the named colour and shape is left; recolor: none is left and one of the new
    colour sits in its cell; move: exactly one is left, in the destination cell; add: one more of them
    than the source holds, one in a cell the source left empty. An unchanged output fails every kind.
    """
    named = [o for o in output.objects if (o.color, o.shape) == (spec.color, spec.shape)]
    if spec.kind == "add":
        taken = {o.cell for o in source.objects}
        before = sum((o.color, o.shape) == (spec.color, spec.shape) for o in source.objects)
        return len(named) == before + 1 and any(o.cell not in taken for o in named)
    referenced = [o for o in source.objects if (o.color, o.shape) == (spec.color, spec.shape)]
    if len(referenced) != 1:
        raise ValueError(f"source must show exactly one {spec.color} {spec.shape}, the reading has "
                         f"{len(referenced)}")
    cell = referenced[0].cell
    if spec.kind == "remove":
        return not named
    if spec.kind == "recolor":
        return not named and any((o.color, o.shape, o.cell) == (spec.new_color, spec.shape, cell)
                                 for o in output.objects)
    return len(named) == 1 and named[0].cell == moved_cell(cell, str(spec.direction))


def edit_alignment(source: DetectedScene, output: DetectedScene, spec: EditSpec) -> float:
    """Instruction adherence in [0, 1] by the rule of the module docstring."""
    if judge.edit_correct_scenes(source, output, spec):
        return 1.0
    if not instruction_done(source, output, spec):
        return 0.0
    return PARTIAL_ALIGNMENT * judge.identity_scenes(source, output, spec)


def edit_latents(source: Reading, output: Reading, spec: EditSpec) -> Latents:
    terms = judge.fidelity_terms_of(output)
    alignment = edit_alignment(source.scene, output.scene, spec)
    return Latents(alignment, _term_score(terms, _TEXTURE_TERMS), _term_score(terms, _STRUCTURE_TERMS))


def latents_for(images: np.ndarray, specs: list, sources: np.ndarray | None = None) -> list[Latents]:
    """Latents of a batch of uint8 [B, H, W, 3] images (edits: with sources)."""
    readings = read_images(images)
    if sources is None:
        return [t2i_latents(r, s) for r, s in zip(readings, specs)]
    return [edit_latents(s, r, spec) for s, r, spec in zip(read_images(sources), readings, specs)]


@dataclass(frozen=True)
class Annotator:
    """A simulated person: a bias (in Likert levels) and a noise level."""

    name: str
    bias: float
    noise: float

    def likert(self, latent: float, rng: np.random.Generator) -> int:
        return int(np.clip(np.rint(1.0 + 4.0 * latent + self.bias + rng.normal(0.0, self.noise)), 1, 5))

    def prefer(self, a: Latents, b: Latents, rng: np.random.Generator, tie_margin: float = 0.1) -> str:
        """'a', 'b' or 'tie': the first criterion, in priority order, whose
        (noisy) difference clears the margin decides."""
        for criterion in ("alignment", "fidelity", "quality"):  # consistency > structure > texture/aesthetics
            diff = getattr(a, criterion) - getattr(b, criterion) + rng.normal(0.0, self.noise / 4.0)
            if abs(diff) > tie_margin:
                return "a" if diff > 0 else "b"
        return "tie"


def annotator_pool(rng: np.random.Generator, size: int, bias_std: float, noise: tuple[float, float]) -> list[Annotator]:
    """``size`` annotators with biases ~ N(0, bias_std) and noise uniform in ``noise``."""
    return [
        Annotator(f"annotator-{i:02d}", float(rng.normal(0.0, bias_std)), float(rng.uniform(*noise)))
        for i in range(size)
    ]
