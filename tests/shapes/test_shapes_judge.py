"""The judge reads renders back exactly, is strict, and scores edits and fidelity."""

import numpy as np
import pytest
import torch

from flowrl.shapes.detect import UNKNOWN, read_scene, read_scenes
from flowrl.shapes.edits import EDIT_KINDS, EditSpec, find_referenced, sample_edit
from flowrl.shapes.judge import (
    edit_correct,
    edit_scores_batch,
    evaluate,
    fidelity,
    fidelity_batch,
    identity,
    t2i_correct,
    t2i_correct_batch,
)
from flowrl.shapes.perturb import add_noise, blur
from flowrl.shapes.prompts import T2I_CATEGORIES, parse_t2i, sample_t2i
from flowrl.shapes.render import render_batch, render_scene
from flowrl.shapes.scene import COLORS, Scene, ShapeObject, random_scene


def _read_back_rate(scenes, images):
    read = read_scenes(images)
    exact = [
        [(o.shape, o.color, o.row, o.col) for o in d.objects] == [(o.shape, o.color, o.row, o.col) for o in s.objects]
        and not d.strays
        for s, d in zip(scenes, read)
    ]
    return float(np.mean(exact))


def test_read_back_32_clean_noisy_blurred():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(2000)]
    clean = np.stack([render_scene(s) for s in scenes])
    rates = {
        "clean": _read_back_rate(scenes, clean),
        "noise 0.03": _read_back_rate(scenes, add_noise(clean, rng, 0.03)),
        "blur 0.5": _read_back_rate(scenes, np.stack([blur(im, 0.5) for im in clean])),
        "blur 0.5 + noise 0.03": _read_back_rate(scenes, add_noise(np.stack([blur(im, 0.5) for im in clean]), rng)),
    }
    assert min(rates.values()) >= 0.99, f"read-back rates at 32x32: {rates}"


def test_read_back_64():
    rng = np.random.default_rng(1)
    scenes = [random_scene(rng) for _ in range(300)]
    clean = np.stack([render_scene(s, 64) for s in scenes])
    rates = {
        "clean": _read_back_rate(scenes, clean),
        "noise 0.03": _read_back_rate(scenes, add_noise(clean, rng, 0.03)),
        "blur 0.5": _read_back_rate(scenes, np.stack([blur(im, 0.5) for im in clean])),
    }
    assert min(rates.values()) >= 0.99, f"read-back rates at 64x64: {rates}"


def test_float_tensor_and_uint8_inputs_agree():
    rng = np.random.default_rng(2)
    scenes = [random_scene(rng) for _ in range(20)]
    from_uint8 = read_scenes(np.stack([render_scene(s) for s in scenes]))
    assert read_scenes(render_batch(scenes)) == from_uint8
    assert read_scene(render_batch(scenes)[3]) == from_uint8[3] == read_scene(render_scene(scenes[3]))
    detected = from_uint8[3].objects[0]
    assert detected.area in (24, 36) and detected.center[0] % 8 == pytest.approx(4, abs=1)


def test_merged_and_malformed_blobs_are_unknown_objects():
    image = render_scene(Scene((ShapeObject("square", "red", 1, 1), ShapeObject("square", "red", 1, 2))))
    image[9:15, 15:17] = COLORS["red"]  # bridge the margin: one wide blob
    assert [o.shape for o in read_scene(image).objects] == [UNKNOWN]
    assert not t2i_correct(image, parse_t2i("two squares"))

    flipped = render_scene(Scene((ShapeObject("triangle", "blue", 0, 0),)))[::-1].copy()  # points down
    assert [o.shape for o in read_scene(flipped).objects] == [UNKNOWN]
    assert not t2i_correct(flipped, parse_t2i("a triangle"))

    small = np.full((32, 32, 3), 255, np.uint8)
    small[2:5, 2:4] = COLORS["green"]  # 6 px: too big for a stray, too small to classify
    assert [o.shape for o in read_scene(small).objects] == [UNKNOWN]


def test_t2i_correct_on_renders_and_extra_objects():
    rng = np.random.default_rng(3)
    examples = [sample_t2i(rng, c) for c in T2I_CATEGORIES for _ in range(100)]
    correct = t2i_correct_batch(render_batch([ex.scene for ex in examples]), [ex.spec for ex in examples])
    assert correct.mean() >= 0.99, f"unperturbed renders judged correct: {correct.mean():.4f}"
    scene = Scene((ShapeObject("circle", "red", 0, 0), ShapeObject("circle", "blue", 3, 3)))
    assert t2i_correct(render_scene(scene), parse_t2i("two circles"))
    assert not t2i_correct(render_scene(scene), parse_t2i("a red circle"))
    extra = Scene(scene.objects + (ShapeObject("square", "green", 1, 1),))
    assert t2i_correct(render_scene(extra), parse_t2i("a circle above a square")) is False
    assert not t2i_correct(render_scene(extra), parse_t2i("two circles"))


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_edit_scores(kind):
    rng = np.random.default_rng(4)
    examples = [sample_edit(rng, kind) for _ in range(100)]
    sources = np.stack([render_scene(ex.source) for ex in examples])
    targets = np.stack([render_scene(ex.target) for ex in examples])
    specs = [ex.spec for ex in examples]
    correct, kept = edit_scores_batch(sources, targets, specs)
    assert correct.all() and (kept == 1.0).all()
    unchanged_correct, unchanged_kept = edit_scores_batch(sources, sources, specs)
    assert not unchanged_correct.any() and (unchanged_kept == 1.0).all()


@pytest.mark.parametrize("kind", EDIT_KINDS)
def test_identity_drops_when_an_untouched_object_changes(kind):
    rng = np.random.default_rng(5)
    for _ in range(20):
        ex = sample_edit(rng, kind)
        touched = None if kind == "add" else find_referenced(ex.source, ex.spec)
        untouched = [o for o in ex.source.objects if o != touched]
        victim = untouched[0]
        recolored = next(c for c in COLORS if c != victim.color)
        output = ex.target.replace(victim, ShapeObject(victim.shape, recolored, victim.row, victim.col))
        score = identity(render_scene(ex.source), render_scene(output), ex.spec)
        assert score == pytest.approx(1 - 1 / len(untouched))


def test_identity_tolerates_small_size_changes_but_not_large_ones():
    source = Scene((ShapeObject("square", "red", 0, 0), ShapeObject("circle", "blue", 2, 2)))
    spec = EditSpec("remove", "circle", "blue")
    output = render_scene(Scene((ShapeObject("square", "red", 0, 0),)))
    assert identity(render_scene(source), output, spec) == 1.0 and edit_correct(render_scene(source), output, spec)
    grown = output.copy()
    grown[0:9, 0:9] = COLORS["red"]  # 81 px instead of 36
    assert identity(render_scene(source), grown, spec) == 0.0


def test_fidelity_of_clean_and_degraded_images():
    rng = np.random.default_rng(6)
    images = np.stack([render_scene(random_scene(rng)) for _ in range(50)])
    assert fidelity_batch(images) == pytest.approx(1.0)
    noise_levels, blur_sigmas = (0.01, 0.03, 0.06, 0.1), (0.3, 0.5, 0.8, 1.2)
    by_noise = [fidelity_batch(add_noise(images, np.random.default_rng(0), std)).mean() for std in noise_levels]
    by_blur = [fidelity_batch(np.stack([blur(im, s) for im in images])).mean() for s in blur_sigmas]
    assert 1.0 > by_noise[0] > by_noise[1] > by_noise[2] > by_noise[3], by_noise
    assert 1.0 > by_blur[0] > by_blur[1] > by_blur[2] > by_blur[3], by_blur
    greyed = [fidelity(np.where(images[0] == 255, level, images[0]).astype(np.uint8)) for level in (250, 240, 220)]
    assert 1.0 > greyed[0] > greyed[1] > greyed[2], greyed


def test_evaluate_reports_every_group():
    rng = np.random.default_rng(7)
    t2i = [sample_t2i(rng, c) for c in T2I_CATEGORIES for _ in range(4)]
    edits = [sample_edit(rng, k) for k in EDIT_KINDS for _ in range(4)]
    t2i_images = render_batch([ex.scene for ex in t2i])
    t2i_images[0] = 1.0  # a blank image: wrong for its single_object prompt
    metrics = evaluate(
        [ex.spec for ex in t2i], t2i_images,
        [ex.spec for ex in edits], render_batch([ex.source for ex in edits]), render_batch([ex.source for ex in edits]),
    )
    assert metrics["t2i/alignment"] == pytest.approx(23 / 24)
    assert metrics["t2i/alignment/single_object"] == 0.75 and metrics["t2i/alignment/colors"] == 1.0
    assert metrics["edit/accuracy"] == 0.0 and metrics["edit/identity"] == 1.0
    assert {f"edit/accuracy/{k}" for k in EDIT_KINDS} <= metrics.keys()
    assert metrics["t2i/fidelity"] == 1.0 and metrics["edit/clean_rate"] == 1.0
    assert torch.is_tensor(t2i_images)  # evaluate consumed the tensor as-is
