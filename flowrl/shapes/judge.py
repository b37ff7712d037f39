"""The deterministic shapes-world judge: alignment, edit accuracy, identity, fidelity.

It is strict on purpose (docs/design.md, The shapes world): extra objects make a prompt
wrong, and merged or unclassifiable blobs count as objects of unknown shape,
because a lenient judge is what a policy learns to exploit. Every scorer has
a scene-level form (for callers that read an image once and score it many
ways) and an image-level form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import permutations
from typing import Sequence

import numpy as np

from flowrl.shapes.detect import DetectedObject, DetectedScene, Image, ImageBatch, Reading, read_images
from flowrl.shapes.edits import EditSpec, moved_cell
from flowrl.shapes.prompts import ObjectRef, T2ISpec, satisfies_relation
from flowrl.shapes.render import nominal_area
from flowrl.shapes.scene import SHAPES

IDENTITY_AREA_TOLERANCE = 0.25  # relative area change still counted as "the same object"
CLEAN_FIDELITY = 0.6  # images at or above this fidelity count as clean in the metrics
# Error scales of the fidelity terms: each term costs exp(-error / scale).
# Gaussian noise of std 0.03 or a blur of sigma 0.5 px gives about 0.75; a
# 4-px stray about 0.5; a background at grey 230 about 0.4.
FIDELITY_SCALES = {"background": 0.2, "color": 0.4, "strays": 0.25, "shapes": 0.5}


# --- text-to-image alignment -------------------------------------------------


def _matches(obj: DetectedObject, ref: ObjectRef) -> bool:
    return obj.shape == ref.shape and (ref.color is None or obj.color == ref.color)


def t2i_correct_scene(scene: DetectedScene, spec: T2ISpec) -> bool:
    """GenEval-style exact check: the objects are exactly the spec's, relation included."""
    if len(scene.objects) != len(spec.objects):
        return False
    for order in permutations(scene.objects):
        if all(_matches(o, r) for o, r in zip(order, spec.objects)) and (
            spec.relation is None or satisfies_relation(order[0].cell, order[1].cell, spec.relation)
        ):
            return True
    return False


def t2i_correct_batch(images: ImageBatch, specs: Sequence[T2ISpec]) -> np.ndarray:
    readings = _read(images, len(specs))
    return np.array([t2i_correct_scene(r.scene, s) for r, s in zip(readings, specs)], dtype=bool)


def t2i_correct(image: Image, spec: T2ISpec) -> bool:
    return bool(t2i_correct_batch([image], [spec])[0])


# --- edits ---------------------------------------------------------------------


def _named(scene: DetectedScene, color: str, shape: str) -> list[DetectedObject]:
    return [o for o in scene.objects if (o.color, o.shape) == (color, shape)]


def _touched(source: DetectedScene, spec: EditSpec) -> DetectedObject:
    """The source object the instruction names (sources are clean renders, so it must be unique)."""
    matches = _named(source, spec.color, spec.shape)
    if len(matches) != 1:
        raise ValueError(f"source must show exactly one {spec.color} {spec.shape}, the judge read {len(matches)}")
    return matches[0]


def edit_correct_scenes(source: DetectedScene, output: DetectedScene, spec: EditSpec) -> bool:
    """The postcondition on the named object holds and the object count is the target's."""
    expected = len(source.objects) + {"add": 1, "remove": -1}.get(spec.kind, 0)
    if len(output.objects) != expected:
        return False
    named_out = _named(output, spec.color, spec.shape)
    if spec.kind == "add":
        taken = {o.cell for o in source.objects}
        added = [o for o in named_out if o.cell not in taken]
        return len(named_out) == len(_named(source, spec.color, spec.shape)) + 1 and bool(added)
    touched = _touched(source, spec)
    if spec.kind == "remove":
        return not named_out
    if spec.kind == "recolor":
        recolored = _named(output, str(spec.new_color), spec.shape)
        return not named_out and any(o.cell == touched.cell for o in recolored)
    destination = moved_cell(touched.cell, str(spec.direction))
    return len(named_out) == 1 and named_out[0].cell == destination


def identity_scenes(source: DetectedScene, output: DetectedScene, spec: EditSpec) -> float:
    """Share of untouched source objects found in the output unchanged.

    Unchanged means same cell, shape and colour, and an area within
    IDENTITY_AREA_TOLERANCE of the source's (blur moves areas by a few px).
    """
    touched = () if spec.kind == "add" else (_touched(source, spec),)
    untouched = [o for o in source.objects if o not in touched]
    if not untouched:
        raise ValueError("identity is undefined: the source has no object the instruction leaves alone")
    kept = sum(
        any(
            (o.cell, o.shape, o.color) == (u.cell, u.shape, u.color)
            and abs(o.area - u.area) <= IDENTITY_AREA_TOLERANCE * u.area
            for o in output.objects
        )
        for u in untouched
    )
    return kept / len(untouched)


def _edit_scores(
    sources: list[Reading], outputs: list[Reading], specs: Sequence[EditSpec]
) -> tuple[np.ndarray, np.ndarray]:
    correct = [edit_correct_scenes(s.scene, o.scene, spec) for s, o, spec in zip(sources, outputs, specs)]
    kept = [identity_scenes(s.scene, o.scene, spec) for s, o, spec in zip(sources, outputs, specs)]
    return np.array(correct, dtype=bool), np.array(kept, dtype=np.float64)


def edit_scores_batch(
    sources: ImageBatch, outputs: ImageBatch, specs: Sequence[EditSpec]
) -> tuple[np.ndarray, np.ndarray]:
    """(edit correct [B] bool, identity [B] float) from one read of each image."""
    return _edit_scores(_read(sources, len(specs)), _read(outputs, len(specs)), specs)


def edit_correct(source_image: Image, output_image: Image, spec: EditSpec) -> bool:
    return bool(edit_scores_batch([source_image], [output_image], [spec])[0][0])


def identity(source_image: Image, output_image: Image, spec: EditSpec) -> float:
    return float(edit_scores_batch([source_image], [output_image], [spec])[1][0])


# --- fidelity ------------------------------------------------------------------


@dataclass(frozen=True)
class FidelityTerms:
    """The errors behind fidelity, kept apart so annotators can weigh them."""

    background: float  # mean distance of background pixels from white (units of 255)
    color: float  # mean distance of object pixels from their palette colour (units of 255)
    strays: float  # stray pixels per smallest nominal object area
    shapes: float  # share of object pixels in components of unknown shape

    @property
    def score(self) -> float:
        """exp(-sum of error / scale): exactly 1 for a clean render, lower as any error grows."""
        return math.exp(-sum(getattr(self, name) / scale for name, scale in FIDELITY_SCALES.items()))


def fidelity_terms_of(reading: Reading) -> FidelityTerms:
    scene = reading.scene
    unit = min(nominal_area(s, reading.resolution) for s in SHAPES)
    object_area = sum(o.area for o in scene.objects)
    unknown_area = sum(o.area for o in scene.objects if o.shape not in SHAPES)
    return FidelityTerms(
        background=reading.background_error,
        color=reading.color_error,
        strays=sum(s.area for s in scene.strays) / unit,
        shapes=unknown_area / object_area if object_area else 0.0,
    )


def fidelity_batch(images: ImageBatch) -> np.ndarray:
    return np.array([fidelity_terms_of(r).score for r in read_images(images)], dtype=np.float64)


def fidelity(image: Image) -> float:
    return float(fidelity_batch([image])[0])


# --- evaluation ----------------------------------------------------------------


def _read(images: ImageBatch, expected: int) -> list[Reading]:
    if expected == 0:
        raise ValueError("nothing to score: no specs given")
    readings = read_images(images)
    if len(readings) != expected:
        raise ValueError(f"got {len(readings)} images for {expected} specs")
    return readings


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def evaluate_t2i(specs: Sequence[T2ISpec], images: ImageBatch) -> dict[str, float]:
    """Alignment overall and per category, fidelity and clean rate, keyed ``t2i/...``."""
    readings = _read(images, len(specs))
    correct = np.array([t2i_correct_scene(r.scene, s) for r, s in zip(readings, specs)], dtype=np.float64)
    fid = np.array([fidelity_terms_of(r).score for r in readings])
    mean, stderr = _mean_and_stderr(correct)
    metrics = {"t2i/alignment": mean, "t2i/alignment_stderr": stderr, "t2i/count": float(len(specs))}
    categories = np.array([s.category for s in specs])
    for category in dict.fromkeys(categories):
        metrics[f"t2i/alignment/{category}"] = float(correct[categories == category].mean())
    metrics["t2i/fidelity"] = float(fid.mean())
    metrics["t2i/clean_rate"] = float((fid >= CLEAN_FIDELITY).mean())
    return metrics


def evaluate_edits(specs: Sequence[EditSpec], sources: ImageBatch, outputs: ImageBatch) -> dict[str, float]:
    """Edit accuracy overall and per kind, identity, fidelity and clean rate, keyed ``edit/...``."""
    output_readings = _read(outputs, len(specs))
    correct, kept = _edit_scores(_read(sources, len(specs)), output_readings, specs)
    fid = np.array([fidelity_terms_of(r).score for r in output_readings])
    mean, stderr = _mean_and_stderr(correct.astype(np.float64))
    metrics = {"edit/accuracy": mean, "edit/accuracy_stderr": stderr, "edit/count": float(len(specs))}
    kinds = np.array([s.kind for s in specs])
    for kind in dict.fromkeys(kinds):
        metrics[f"edit/accuracy/{kind}"] = float(correct[kinds == kind].mean())
    metrics["edit/identity"] = float(kept.mean())
    metrics["edit/fidelity"] = float(fid.mean())
    metrics["edit/clean_rate"] = float((fid >= CLEAN_FIDELITY).mean())
    return metrics


def evaluate(
    t2i_specs: Sequence[T2ISpec] = (),
    t2i_images: ImageBatch = (),
    edit_specs: Sequence[EditSpec] = (),
    edit_sources: ImageBatch = (),
    edit_outputs: ImageBatch = (),
) -> dict[str, float]:
    """Both metric groups in one dict; a group without specs is left out."""
    metrics = evaluate_t2i(t2i_specs, t2i_images) if len(t2i_specs) else {}
    if len(edit_specs):
        metrics.update(evaluate_edits(edit_specs, edit_sources, edit_outputs))
    return metrics
