"""Deterministic, crisp rendering of scenes (no anti-aliasing).

Geometry is chosen so the judge can tell the shapes apart from two numbers:
a square fills its bounding box, a circle (just wide enough to reach the box
edges with a 2-px run) fills about two thirds of it symmetrically, and an upward triangle fills about the same
but holds only a third of its pixels in the top half.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Sequence

import numpy as np
import torch

from flowrl.shapes.scene import BACKGROUND, COLORS, DEFAULT_RESOLUTION, Scene, cell_size, object_margin, object_size

@lru_cache(maxsize=None)
def shape_mask(shape: str, size: int) -> np.ndarray:
    """Boolean [size, size] mask of a shape, sampled at pixel centres."""
    centres = np.arange(size) + 0.5 - size / 2  # pixel-centre offsets from the box centre
    dy, dx = np.meshgrid(centres, centres, indexing="ij")
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "circle":
        # Radius through the centres of the two middle pixels of the outer rows:
        # the circle spans the whole box yet its corners are clearly cut.
        mask = dx**2 + dy**2 <= (size / 2 - 0.5) ** 2 + 0.25
    elif shape == "triangle":
        # Apex at the top centre, base on the bottom row; the half-width grows by
        # half a pixel per row so the top row is 2 px wide and the bottom row full.
        half_width = (np.arange(size) + 1)[:, None] / 2
        mask = np.abs(dx) <= half_width
    else:
        raise ValueError(f"shape must be circle, square or triangle, got {shape!r}")
    mask.setflags(write=False)
    return mask


def nominal_area(shape: str, resolution: int = DEFAULT_RESOLUTION) -> int:
    """Pixel area of a cleanly rendered shape at this resolution."""
    return int(shape_mask(shape, object_size(resolution)).sum())


def render_scene(scene: Scene, resolution: int = DEFAULT_RESOLUTION) -> np.ndarray:
    """uint8 [H, W, 3] image: white background, each object centred in its cell."""
    image = np.empty((resolution, resolution, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    cell, margin, size = cell_size(resolution), object_margin(resolution), object_size(resolution)
    for obj in scene.objects:
        top, left = obj.row * cell + margin, obj.col * cell + margin
        window = image[top : top + size, left : left + size]
        window[shape_mask(obj.shape, size)] = COLORS[obj.color]
    return image


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float() / 255.0


def render_batch(scenes: Sequence[Scene], resolution: int = DEFAULT_RESOLUTION) -> torch.Tensor:
    """Float [B, 3, H, W] in [0, 1], the layout the models consume."""
    return to_tensor(np.stack([render_scene(s, resolution) for s in scenes]))
