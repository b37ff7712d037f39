"""The shapes world: a synthetic image domain with a deterministic judge.

``scene`` and ``render`` make images, ``prompts`` / ``edits`` / ``vocab`` make
the text, ``detect`` and ``judge`` read images back and score them, and
``perturb`` makes wrong or degraded images for annotation data.
"""

from flowrl.shapes.detect import (
    DetectedObject,
    DetectedScene,
    Reading,
    Stray,
    read_images,
    read_scene,
    read_scenes,
)
from flowrl.shapes.edits import (
    DIRECTIONS,
    EDIT_KINDS,
    EditExample,
    EditSpec,
    apply_edit,
    make_edit_set,
    parse_edit,
    sample_edit,
)
from flowrl.shapes.judge import (
    FidelityTerms,
    edit_correct,
    edit_correct_scenes,
    edit_scores_batch,
    evaluate,
    evaluate_edits,
    evaluate_t2i,
    fidelity,
    fidelity_batch,
    fidelity_terms_of,
    identity,
    identity_scenes,
    t2i_correct,
    t2i_correct_batch,
    t2i_correct_scene,
)
from flowrl.shapes.prompts import (
    RELATIONS,
    T2I_CATEGORIES,
    ObjectRef,
    T2IExample,
    T2ISpec,
    make_t2i_set,
    parse_t2i,
    sample_t2i,
)
from flowrl.shapes.render import render_batch, render_scene
from flowrl.shapes.scene import COLORS, GRID, SHAPES, Scene, ShapeObject, random_scene
from flowrl.shapes.vocab import MAX_PROMPT_TOKENS, VOCAB, tokenize

__all__ = [
    "COLORS", "DIRECTIONS", "EDIT_KINDS", "GRID", "MAX_PROMPT_TOKENS", "RELATIONS", "SHAPES", "T2I_CATEGORIES", "VOCAB",
    "DetectedObject", "DetectedScene", "EditExample", "EditSpec", "FidelityTerms", "ObjectRef", "Reading", "Scene",
    "ShapeObject", "Stray", "T2IExample", "T2ISpec",
    "apply_edit", "edit_correct", "edit_correct_scenes", "edit_scores_batch", "evaluate", "evaluate_edits",
    "evaluate_t2i", "fidelity", "fidelity_batch", "fidelity_terms_of", "identity", "identity_scenes", "make_edit_set",
    "make_t2i_set", "parse_edit", "parse_t2i", "random_scene", "read_images", "read_scene", "read_scenes",
    "render_batch", "render_scene", "sample_edit", "sample_t2i", "t2i_correct", "t2i_correct_batch",
    "t2i_correct_scene", "tokenize",
]
