"""Ways to make an image wrong, for building annotation data and judge tests.

Scene perturbations take a prompt's spec and a scene that satisfies it and
return a scene that contradicts it; image degradations lower fidelity without
changing what the image shows.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from flowrl.shapes.prompts import T2ISpec
from flowrl.shapes.scene import (
    COLORS,
    MAX_OBJECTS,
    SHAPES,
    Scene,
    ShapeObject,
    random_cells,
    random_color,
    random_shape,
)

PERTURBATIONS: tuple[str, ...] = ("wrong_color", "missing_object", "extra_object", "wrong_relation", "wrong_shape")


def applicable_perturbations(spec: T2ISpec, scene: Scene) -> tuple[str, ...]:
    """The perturbations that can contradict this prompt with this scene."""
    allowed = {
        "wrong_color": any(ref.color is not None for ref in spec.objects),
        "missing_object": len(scene.objects) > 1,  # a scene keeps at least one object
        "extra_object": len(scene.objects) < MAX_OBJECTS,
        "wrong_relation": spec.relation is not None,
        "wrong_shape": True,
    }
    return tuple(name for name in PERTURBATIONS if allowed[name])


def _pick(rng: np.random.Generator, objects: list[ShapeObject]) -> ShapeObject:
    return objects[rng.integers(len(objects))]


def wrong_color(rng: np.random.Generator, spec: T2ISpec, scene: Scene) -> Scene:
    """Recolour an object whose colour the prompt names."""
    named = {(ref.shape, ref.color) for ref in spec.objects if ref.color is not None}
    obj = _pick(rng, [o for o in scene.objects if (o.shape, o.color) in named])
    color = str(rng.choice([c for c in COLORS if c != obj.color]))
    return scene.replace(obj, ShapeObject(obj.shape, color, obj.row, obj.col))


def missing_object(rng: np.random.Generator, spec: T2ISpec, scene: Scene) -> Scene:
    """Drop one object (exact counts make the prompt fail)."""
    dropped = _pick(rng, list(scene.objects))
    return Scene(tuple(o for o in scene.objects if o != dropped))


def extra_object(rng: np.random.Generator, spec: T2ISpec, scene: Scene) -> Scene:
    """Add a random object in a free cell."""
    (cell,) = random_cells(rng, 1, exclude=tuple(o.cell for o in scene.objects))
    return Scene(scene.objects + (ShapeObject(random_shape(rng), random_color(rng), *cell),))


def wrong_relation(rng: np.random.Generator, spec: T2ISpec, scene: Scene) -> Scene:
    """Swap the cells of the two objects, which reverses any strict relation."""
    first, second = scene.objects
    return Scene(
        (ShapeObject(first.shape, first.color, *second.cell), ShapeObject(second.shape, second.color, *first.cell))
    )


def wrong_shape(rng: np.random.Generator, spec: T2ISpec, scene: Scene) -> Scene:
    """Give one object another shape, which changes the multiset of shapes."""
    obj = _pick(rng, list(scene.objects))
    shape = str(rng.choice([s for s in SHAPES if s != obj.shape]))
    return scene.replace(obj, ShapeObject(shape, obj.color, obj.row, obj.col))


_PERTURBERS = {f.__name__: f for f in (wrong_color, missing_object, extra_object, wrong_relation, wrong_shape)}


def perturb_scene(rng: np.random.Generator, spec: T2ISpec, scene: Scene, kind: str) -> Scene:
    """Apply the perturbation named ``kind``; ValueError when it does not apply here."""
    if kind not in applicable_perturbations(spec, scene):
        raise ValueError(f"kind {kind!r} does not apply to {spec.prompt()!r} with {len(scene.objects)} object(s)")
    return _PERTURBERS[kind](rng, spec, scene)


def add_noise(image: np.ndarray, rng: np.random.Generator, std: float = 0.03) -> np.ndarray:
    """uint8 image plus gaussian noise of ``std`` in [0, 1] units."""
    noisy = image.astype(np.float64) + rng.normal(0.0, std * 255.0, image.shape)
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def blur(image: np.ndarray, sigma: float = 0.5) -> np.ndarray:
    """uint8 [H, W, 3] image blurred by a gaussian of ``sigma`` px (channels kept apart)."""
    blurred = ndimage.gaussian_filter(image.astype(np.float64), sigma=(sigma, sigma, 0), mode="nearest")
    return np.clip(np.round(blurred), 0, 255).astype(np.uint8)


def add_blotches(image: np.ndarray, rng: np.random.Generator, count: int = 1, size: int = 2) -> np.ndarray:
    """Paint ``count`` small palette-coloured squares on clear background (stray blobs)."""
    out = image.copy()
    height, width = image.shape[:2]
    clear = ndimage.binary_erosion((image == 255).all(-1), np.ones((size + 2, size + 2)), border_value=0)
    candidates = np.argwhere(clear)
    for _ in range(count):
        if not len(candidates):
            raise ValueError(f"no clear background left for a {size}x{size} blotch")
        cy, cx = candidates[rng.integers(len(candidates))]
        top, left = min(max(cy - size // 2, 0), height - size), min(max(cx - size // 2, 0), width - size)
        out[top : top + size, left : left + size] = COLORS[random_color(rng)]
        clear[max(top - size - 1, 0) : top + 2 * size + 1, max(left - size - 1, 0) : left + 2 * size + 1] = False
        candidates = np.argwhere(clear)
    return out


def color_cast(image: np.ndarray, rng: np.random.Generator, distance: float = 20.0) -> np.ndarray:
    """uint8 image whose object pixels (every pixel not pure white) all move ``distance`` levels (of 255) in one
    random RGB direction: off-palette colours on the same shapes, in the same places."""
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    out = image.astype(np.float64)
    objects = (image < 255).any(-1)
    out[objects] += distance * direction
    return np.clip(np.round(out), 0, 255).astype(np.uint8)
