"""Edit instructions of the shapes world: recolor, remove, add, move.

Each instruction names one object by (colour, shape); it is unique in the
source, and the source always keeps at least one object the instruction does
not touch, so identity preservation is always defined.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flowrl.shapes.scene import (
    COLORS,
    GRID,
    MAX_OBJECTS,
    SHAPES,
    Scene,
    ShapeObject,
    random_cells,
    random_color,
    random_shape,
)
from flowrl.shapes.splits import in_split

EDIT_KINDS: tuple[str, ...] = ("recolor", "remove", "add", "move")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}


@dataclass(frozen=True)
class EditSpec:
    """One instruction: ``kind`` applied to the (``color``, ``shape``) object.

    ``new_color`` is set exactly for recolor and ``direction`` exactly for move.
    """

    kind: str
    shape: str
    color: str
    new_color: str | None = None
    direction: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"kind must be one of {EDIT_KINDS}, got {self.kind!r}")
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"color must be one of {tuple(COLORS)}, got {self.color!r}")
        if self.kind == "recolor":
            if self.new_color not in COLORS or self.new_color == self.color:
                raise ValueError(f"new_color must be a colour other than {self.color!r}, got {self.new_color!r}")
        elif self.new_color is not None:
            raise ValueError(f"new_color must be None for {self.kind}, got {self.new_color!r}")
        if (self.kind == "move") != (self.direction is not None) or (
            self.direction is not None and self.direction not in DIRECTIONS
        ):
            raise ValueError(f"direction must be one of {tuple(DIRECTIONS)} exactly for move, got {self.direction!r}")

    def instruction(self) -> str:
        obj = f"{self.color} {self.shape}"
        return {
            "recolor": f"make the {obj} {self.new_color}",
            "remove": f"remove the {obj}",
            "add": f"add a {obj}",
            "move": f"move the {obj} {self.direction}",
        }[self.kind]


@dataclass(frozen=True)
class EditExample:
    """An instruction with its source scene and the scene it should produce."""

    instruction: str
    kind: str
    spec: EditSpec
    source: Scene
    target: Scene


def moved_cell(cell: tuple[int, int], direction: str) -> tuple[int, int]:
    """The cell one step in ``direction`` (may lie outside the grid)."""
    dr, dc = DIRECTIONS[direction]
    return (cell[0] + dr, cell[1] + dc)


def find_referenced(scene: Scene, spec: EditSpec) -> ShapeObject:
    """The object the instruction names; ValueError unless exactly one matches."""
    matches = [o for o in scene.objects if (o.color, o.shape) == (spec.color, spec.shape)]
    if len(matches) != 1:
        raise ValueError(f"scene must hold exactly one {spec.color} {spec.shape}, found {len(matches)}")
    return matches[0]


def apply_edit(scene: Scene, spec: EditSpec, add_cell: tuple[int, int] | None = None) -> Scene:
    """The scene after the instruction; ``add`` needs ``add_cell``, a free cell."""
    if spec.kind == "add":
        if add_cell is None or add_cell not in scene.free_cells():
            raise ValueError(f"add_cell must be a free cell of the scene, got {add_cell!r}")
        return Scene(scene.objects + (ShapeObject(spec.shape, spec.color, *add_cell),))
    obj = find_referenced(scene, spec)
    if spec.kind == "remove":
        return Scene(tuple(o for o in scene.objects if o != obj))
    if spec.kind == "recolor":
        return scene.replace(obj, ShapeObject(obj.shape, str(spec.new_color), obj.row, obj.col))
    cell = moved_cell(obj.cell, str(spec.direction))
    if cell not in scene.free_cells():
        raise ValueError(f"cannot move the {spec.color} {spec.shape} {spec.direction}: cell {cell} is not free")
    return scene.replace(obj, ShapeObject(obj.shape, obj.color, *cell))


def _other_objects(
    rng: np.random.Generator, n: int, avoid: tuple[str, str], cells: list[tuple[int, int]]
) -> tuple[ShapeObject, ...]:
    """``n`` random objects in ``cells``, none of them a (colour, shape) ``avoid``."""
    objects = []
    for row, col in cells[:n]:
        color, shape = avoid
        while (color, shape) == avoid:
            color, shape = random_color(rng), random_shape(rng)
        objects.append(ShapeObject(shape, color, row, col))
    return tuple(objects)


def _sample_spec(rng: np.random.Generator, kind: str) -> EditSpec:
    color, shape = random_color(rng), random_shape(rng)
    new_color = str(rng.choice([c for c in COLORS if c != color])) if kind == "recolor" else None
    direction = str(rng.choice(list(DIRECTIONS))) if kind == "move" else None
    return EditSpec(kind, shape, color, new_color, direction)


def sample_edit(rng: np.random.Generator, kind: str, split: str = "train") -> EditExample:
    """A random instruction of ``kind`` from ``split`` (see :mod:`flowrl.shapes.splits`)
    with a source that makes it well defined."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"kind must be one of {EDIT_KINDS}, got {kind!r}")
    spec = _sample_spec(rng, kind)
    while not in_split("edit", kind, spec.instruction(), split):
        spec = _sample_spec(rng, kind)
    color, shape, direction = spec.color, spec.shape, spec.direction
    if kind == "add":
        n_source = int(rng.integers(1, MAX_OBJECTS))
        cells = random_cells(rng, n_source + 1)
        source = Scene(_other_objects(rng, n_source, (color, shape), cells))
        return EditExample(spec.instruction(), kind, spec, source, apply_edit(source, spec, cells[-1]))
    # The referenced object's cell, and for move the cell it moves into, are
    # drawn first so the other objects never block the move.
    while True:
        (cell,) = random_cells(rng, 1)
        reserved = (cell,) if direction is None else (cell, moved_cell(cell, direction))
        if all(0 <= r < GRID and 0 <= c < GRID for r, c in reserved):
            break
    n_others = int(rng.integers(1, MAX_OBJECTS))
    others = _other_objects(rng, n_others, (color, shape), random_cells(rng, n_others, exclude=reserved))
    source = Scene(others + (ShapeObject(shape, color, *cell),))
    return EditExample(spec.instruction(), kind, spec, source, apply_edit(source, spec))


def make_edit_set(seed: int, n_per_kind: int, split: str = "train") -> list[EditExample]:
    """A fixed instruction set of ``split``, ``n_per_kind`` per kind in kind order (one stream per kind)."""
    examples = []
    for index, kind in enumerate(EDIT_KINDS):
        rng = np.random.default_rng([seed, len(EDIT_KINDS) + index])
        examples.extend(sample_edit(rng, kind, split) for _ in range(n_per_kind))
    return examples


_KIND_BY_OPENING: dict[tuple[str, ...], str] = {
    ("make", "the"): "recolor",
    ("remove", "the"): "remove",
    ("add", "a"): "add",
    ("move", "the"): "move",
}


def parse_edit(text: str) -> EditSpec:
    """Invert the instruction grammar; anything it cannot emit raises ValueError."""
    words = text.split(" ")
    try:
        if len(words) not in (4, 5) or tuple(words[:2]) not in _KIND_BY_OPENING:
            raise ValueError("unknown form")
        kind = _KIND_BY_OPENING[tuple(words[:2])]
        last = words[4] if len(words) == 5 else None
        spec = EditSpec(kind, words[3], words[2], last if kind == "recolor" else None, last if kind == "move" else None)
        if spec.instruction() != text:
            raise ValueError("not a sentence of the grammar")
    except ValueError as error:
        raise ValueError(f"cannot parse edit instruction {text!r}: {error}") from None
    return spec
