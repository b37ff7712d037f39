"""Perturbed scenes contradict their prompts; degradations lower fidelity only."""

import numpy as np
import pytest

from flowrl.shapes.detect import read_images, read_scene
from flowrl.shapes.judge import fidelity, t2i_correct_batch
from flowrl.shapes.perturb import PERTURBATIONS, add_blotches, applicable_perturbations, color_cast, perturb_scene
from flowrl.shapes.prompts import T2I_CATEGORIES, parse_t2i, sample_t2i
from flowrl.shapes.render import render_scene
from flowrl.shapes.scene import Scene, ShapeObject


def test_perturbed_scenes_contradict_their_prompts():
    rng = np.random.default_rng(0)
    images, specs, kinds = [], [], []
    for category in T2I_CATEGORIES:
        for _ in range(150):
            ex = sample_t2i(rng, category)
            for kind in applicable_perturbations(ex.spec, ex.scene):
                perturbed = perturb_scene(rng, ex.spec, ex.scene, kind)
                assert perturbed != ex.scene
                images.append(render_scene(perturbed))
                specs.append(ex.spec)
                kinds.append(kind)
    wrong = ~t2i_correct_batch(np.stack(images), specs)
    kinds = np.array(kinds)
    rates = {kind: float(wrong[kinds == kind].mean()) for kind in PERTURBATIONS}
    assert set(kinds) == set(PERTURBATIONS)
    assert min(rates.values()) >= 0.99, f"share judged wrong per perturbation: {rates}"


def test_applicability():
    spec = parse_t2i("a circle")
    one = Scene((ShapeObject("circle", "red", 0, 0),))
    assert applicable_perturbations(spec, one) == ("extra_object", "wrong_shape")
    four = parse_t2i("four circles")
    full = Scene(tuple(ShapeObject("circle", "red", 0, c) for c in range(4)))
    assert "extra_object" not in applicable_perturbations(four, full)
    colored = parse_t2i("a red circle")
    assert applicable_perturbations(colored, one) == ("wrong_color", "extra_object", "wrong_shape")
    with pytest.raises(ValueError, match="wrong_relation"):
        perturb_scene(np.random.default_rng(0), spec, one, "wrong_relation")


def test_blotches_are_strays_that_lower_fidelity():
    rng = np.random.default_rng(1)
    image = render_scene(sample_t2i(rng, "counting").scene)
    scores = [fidelity(image)]
    for count in (1, 2, 4):
        blotched = add_blotches(image, np.random.default_rng(count), count)
        read, clean = read_scene(blotched), read_scene(image)
        assert len(read.strays) == count and read.objects == clean.objects
        scores.append(fidelity(blotched))
    assert scores[0] == 1.0 and scores[1] > scores[2] > scores[3], scores


def test_a_colour_cast_moves_object_colours_off_palette_and_nothing_else():
    rng = np.random.default_rng(2)
    image = render_scene(sample_t2i(rng, "color_attr").scene)
    errors = [read_images(image[None])[0].color_error]
    for distance in (10.0, 20.0, 40.0):
        cast = color_cast(image, np.random.default_rng(3), distance)
        assert (cast[(image == 255).all(-1)] == 255).all()  # the background is left white
        (reading,) = read_images(cast[None])
        assert reading.scene.objects == read_scene(image).objects  # same shapes, colours and places
        errors.append(reading.color_error)
    assert errors[0] < errors[1] < errors[2] < errors[3], errors
    assert fidelity(color_cast(image, np.random.default_rng(3), 40.0)) < fidelity(image) == 1.0
