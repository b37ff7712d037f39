"""The simulated annotators' instruction adherence of edits, on rendered scenes: an unchanged output or an
edit of the wrong object is a failed instruction (0); an instruction carried out keeps full adherence
even when another object drifted (identity pays for that)."""

import numpy as np
import pytest

from flowrl.rewards.shapes_annotators import PARTIAL_ALIGNMENT, latents_for
from flowrl.shapes import judge
from flowrl.shapes.detect import read_images
from flowrl.shapes.edits import EDIT_KINDS, EditSpec, apply_edit, sample_edit
from flowrl.shapes.render import render_scene
from flowrl.shapes.scene import Scene, ShapeObject

BLUE_SQUARE, GREEN_TRIANGLE = ShapeObject("square", "blue", 0, 3), ShapeObject("triangle", "green", 3, 0)
SOURCE = Scene((ShapeObject("circle", "red", 1, 1), BLUE_SQUARE, GREEN_TRIANGLE))
SPECS = {
    "recolor": EditSpec("recolor", "circle", "red", new_color="yellow"),
    "remove": EditSpec("remove", "circle", "red"),
    "add": EditSpec("add", "square", "red"),
    "move": EditSpec("move", "circle", "red", direction="down"),
}
# the same kind of edit applied to the blue square instead of the named red circle
WRONG = {
    "recolor": SOURCE.replace(BLUE_SQUARE, ShapeObject("square", "yellow", 0, 3)),
    "remove": Scene(tuple(o for o in SOURCE.objects if o != BLUE_SQUARE)),
    "add": Scene(SOURCE.objects + (ShapeObject("square", "blue", 2, 2),)),
    "move": SOURCE.replace(BLUE_SQUARE, ShapeObject("square", "blue", 1, 3)),
}


def alignment(output: Scene, spec: EditSpec, source: Scene = SOURCE) -> float:
    images = np.stack([render_scene(output, 32)])
    return latents_for(images, [spec], np.stack([render_scene(source, 32)]))[0].alignment


def done(kind: str) -> Scene:
    return apply_edit(SOURCE, SPECS[kind], add_cell=(2, 2) if kind == "add" else None)


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_a_correct_edit_is_fully_aligned_and_an_unchanged_one_not_at_all(kind):
    assert alignment(done(kind), SPECS[kind]) == 1.0
    assert alignment(SOURCE, SPECS[kind]) == 0.0


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_editing_the_wrong_object_is_a_failed_instruction(kind):
    assert alignment(WRONG[kind], SPECS[kind]) == 0.0


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_an_instruction_carried_out_while_another_object_drifted_stays_aligned(kind):
    drifted = done(kind).replace(GREEN_TRIANGLE, ShapeObject("circle", "green", 3, 0))  # another shape
    assert alignment(drifted, SPECS[kind]) == 1.0
    source, output = read_images(np.stack([render_scene(SOURCE, 32), render_scene(drifted, 32)]))
    untouched = 3 if kind == "add" else 2  # add touches no source object
    assert judge.identity_scenes(source.scene, output.scene, SPECS[kind]) == pytest.approx(1 - 1 / untouched)


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_an_instruction_carried_out_that_also_lost_an_object_gets_partial_credit(kind):
    untouched = 3 if kind == "add" else 2  # add touches no source object
    lost = Scene(tuple(o for o in done(kind).objects if o != GREEN_TRIANGLE))
    assert alignment(lost, SPECS[kind]) == pytest.approx(PARTIAL_ALIGNMENT * (1 - 1 / untouched))
    if kind == "remove":  # a blank canvas: nothing the instruction left alone was kept
        blank = np.full((1, 32, 32, 3), 255, dtype=np.uint8)
        source = np.stack([render_scene(SOURCE, 32)])
        assert latents_for(blank, [SPECS[kind]], source)[0].alignment == 0.0


def test_sampled_edits_hold_the_rule():
    """Over sampled instructions of every kind: targets 1, unchanged sources 0."""
    rng = np.random.default_rng(3)
    examples = [sample_edit(rng, kind) for kind in EDIT_KINDS for _ in range(5)]
    sources = np.stack([render_scene(e.source, 32) for e in examples])
    targets = np.stack([render_scene(e.target, 32) for e in examples])
    specs = [e.spec for e in examples]
    assert [x.alignment for x in latents_for(targets, specs, sources)] == [1.0] * len(examples)
    assert [x.alignment for x in latents_for(sources, specs, sources)] == [0.0] * len(examples)
