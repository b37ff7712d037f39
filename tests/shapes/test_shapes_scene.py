"""Scenes and rendering: validation, canonical order, geometry."""

import numpy as np
import pytest
import torch

from flowrl.shapes.render import nominal_area, render_batch, render_scene, shape_mask
from flowrl.shapes.scene import COLORS, Scene, ShapeObject, cell_size, object_size, random_scene


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"shape": "star"}, "shape"),
        ({"color": "purple"}, "color"),
        ({"row": 4}, "row"),
        ({"col": -1}, "col"),
    ],
)
def test_object_validation_names_the_field(kwargs, field):
    args = {"shape": "circle", "color": "red", "row": 0, "col": 0} | kwargs
    with pytest.raises(ValueError, match=field):
        ShapeObject(**args)


def test_scene_validation_names_the_field():
    with pytest.raises(ValueError, match="objects"):
        Scene(())
    with pytest.raises(ValueError, match="objects"):
        Scene((ShapeObject("circle", "red", 1, 1), ShapeObject("square", "blue", 1, 1)))
    with pytest.raises(ValueError, match="objects"):
        Scene(tuple(ShapeObject("circle", "red", 0, c) for c in range(4)) + (ShapeObject("circle", "red", 1, 0),))


def test_scene_order_is_canonical():
    a, b = ShapeObject("circle", "red", 2, 0), ShapeObject("square", "blue", 0, 3)
    assert Scene((a, b)) == Scene((b, a))
    assert Scene((a, b)).objects == (b, a)


def test_sizes_at_both_resolutions():
    assert (cell_size(32), object_size(32)) == (8, 6)
    assert (cell_size(64), object_size(64)) == (16, 12)
    with pytest.raises(ValueError, match="resolution"):
        cell_size(30)


def test_shape_masks_have_the_designed_fill():
    # 6x6: square fills the box; circle and triangle 24 px, the triangle with a third on top.
    assert [nominal_area(s, 32) for s in ("circle", "square", "triangle")] == [24, 36, 24]
    triangle = shape_mask("triangle", 6)
    assert triangle[:3].sum() == 8 and triangle[0].sum() == 2 and triangle[-1].sum() == 6
    circle = shape_mask("circle", 6)
    assert not circle[0, 0] and circle[0].sum() == 2 and circle[:, 0].sum() == 2


def test_render_places_object_in_its_cell_with_margin():
    image = render_scene(Scene((ShapeObject("square", "blue", 1, 2),)), 32)
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    painted = np.argwhere((image != 255).any(-1))
    assert painted.min(0).tolist() == [9, 17] and painted.max(0).tolist() == [14, 22]
    assert (image[9, 17] == COLORS["blue"]).all()


def test_render_batch_layout_and_range():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng) for _ in range(3)]
    batch = render_batch(scenes, 64)
    assert batch.shape == (3, 3, 64, 64) and batch.dtype == torch.float32
    assert batch.min() >= 0 and batch.max() == 1
    assert torch.equal(batch[1], torch.from_numpy(render_scene(scenes[1], 64)).permute(2, 0, 1) / 255.0)
