"""Scenes of the shapes world: one to four coloured shapes on a 4x4 grid.

Objects sit in grid cells rather than at free pixel positions: with 8-px cells
at 32x32 a patch-8 model sees one object per image token, which is what let a
tiny DiT learn in minutes (docs/design.md, The shapes world). Every object has the same
nominal size at a given resolution, so size is part of identity, not of the
prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")

# Saturated colours whose directions away from white are at least 30 degrees
# apart, so blur (which mixes a colour with the white background) and mild
# noise never move a pixel to another colour.
COLORS: Mapping[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 30, 30),
        "green": (30, 160, 50),
        "blue": (30, 70, 220),
        "yellow": (240, 200, 10),
    }
)
BACKGROUND: tuple[int, int, int] = (255, 255, 255)

GRID = 4
MAX_OBJECTS = 4
DEFAULT_RESOLUTION = 32


def cell_size(resolution: int) -> int:
    """Side of one grid cell in pixels (8 at 32x32, 16 at 64x64)."""
    if resolution % GRID or resolution // GRID < 8:
        raise ValueError(f"resolution must be a multiple of {GRID} and at least {8 * GRID}, got {resolution}")
    return resolution // GRID


def object_margin(resolution: int) -> int:
    """Empty pixels between an object and its cell border (neighbours never touch)."""
    return cell_size(resolution) // 8


def object_size(resolution: int) -> int:
    """Nominal side of every object's bounding box (6 px at 32x32, 12 px at 64x64)."""
    return cell_size(resolution) - 2 * object_margin(resolution)


@dataclass(frozen=True)
class ShapeObject:
    """One shape of one colour in grid cell (row, col); row 0 is the top."""

    shape: str
    color: str
    row: int
    col: int

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"color must be one of {tuple(COLORS)}, got {self.color!r}")
        for name in ("row", "col"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or not 0 <= value < GRID:
                raise ValueError(f"{name} must be an int in [0, {GRID}), got {value!r}")
            object.__setattr__(self, name, int(value))

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)


@dataclass(frozen=True)
class Scene:
    """A set of objects, kept sorted by (row, col) so equal scenes compare equal."""

    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        objects = tuple(sorted(self.objects, key=lambda o: (o.row, o.col)))
        if not 1 <= len(objects) <= MAX_OBJECTS:
            raise ValueError(f"objects must hold 1 to {MAX_OBJECTS} objects, got {len(objects)}")
        cells = [o.cell for o in objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"objects must occupy distinct cells, got cells {cells}")
        object.__setattr__(self, "objects", objects)

    def free_cells(self) -> list[tuple[int, int]]:
        taken = {o.cell for o in self.objects}
        return [(r, c) for r in range(GRID) for c in range(GRID) if (r, c) not in taken]

    def replace(self, old: ShapeObject, new: ShapeObject) -> Scene:
        """The scene with ``old`` swapped for ``new`` (used by edits and perturbations)."""
        return Scene(tuple(new if o == old else o for o in self.objects))


def all_cells() -> list[tuple[int, int]]:
    return [(r, c) for r in range(GRID) for c in range(GRID)]


def random_color(rng: np.random.Generator) -> str:
    return str(rng.choice(list(COLORS)))


def random_shape(rng: np.random.Generator) -> str:
    return str(rng.choice(SHAPES))


def random_cells(rng: np.random.Generator, n: int, exclude: tuple[tuple[int, int], ...] = ()) -> list[tuple[int, int]]:
    """``n`` distinct random cells avoiding ``exclude``."""
    free = [cell for cell in all_cells() if cell not in exclude]
    picks = rng.choice(len(free), size=n, replace=False)
    return [free[i] for i in picks]


def random_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A scene of random shapes, colours and cells (1-4 objects if ``n_objects`` is not given)."""
    n = int(rng.integers(1, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    cells = random_cells(rng, n)
    return Scene(tuple(ShapeObject(random_shape(rng), random_color(rng), r, c) for r, c in cells))
