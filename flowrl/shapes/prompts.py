"""Text-to-image prompts of the shapes world: a GenEval-like grammar.

Every prompt has a structured :class:`T2ISpec` that the judge evaluates, and
``parse_t2i`` inverts the grammar exactly, so a prompt string alone is enough
to score an image. Specs are exact: extra objects make an image wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import permutations

import numpy as np

from flowrl.shapes.scene import COLORS, SHAPES, Scene, ShapeObject, all_cells, random_cells, random_color
from flowrl.shapes.splits import in_split

T2I_CATEGORIES: tuple[str, ...] = ("single_object", "two_objects", "counting", "colors", "position", "color_attr")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBER_WORDS: dict[int, str] = {2: "two", 3: "three", 4: "four"}
PLURALS: dict[str, str] = {shape: shape + "s" for shape in SHAPES}


@dataclass(frozen=True)
class ObjectRef:
    """An object a prompt asks for; ``color`` None means any colour will do."""

    shape: str
    color: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.color is not None and self.color not in COLORS:
            raise ValueError(f"color must be one of {tuple(COLORS)} or None, got {self.color!r}")

    def phrase(self) -> str:
        return f"a {self.shape}" if self.color is None else f"a {self.color} {self.shape}"


@dataclass(frozen=True)
class T2ISpec:
    """What an image must show: exactly ``objects`` (prompt order) and, for
    ``position``, ``objects[0]`` in ``relation`` to ``objects[1]``."""

    category: str
    objects: tuple[ObjectRef, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.category not in T2I_CATEGORIES:
            raise ValueError(f"category must be one of {T2I_CATEGORIES}, got {self.category!r}")
        if (self.relation is not None) != (self.category == "position"):
            raise ValueError(f"relation must be set exactly for position prompts, got {self.relation!r}")
        if self.relation is not None and self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
        object.__setattr__(self, "objects", tuple(self.objects))
        _check_objects(self.category, self.objects)

    def prompt(self) -> str:
        first = self.objects[0]
        if self.category == "counting":
            return f"{NUMBER_WORDS[len(self.objects)]} {PLURALS[first.shape]}"
        if self.category == "position":
            return f"{first.phrase()} {self.relation} {self.objects[1].phrase()}"
        return " and ".join(o.phrase() for o in self.objects)


def _check_objects(category: str, objects: tuple[ObjectRef, ...]) -> None:
    """Raise ValueError naming ``objects`` when they cannot belong to ``category``."""
    shapes = [o.shape for o in objects]
    colors = [o.color for o in objects]
    expected = {"single_object": 1, "colors": 1, "counting": len(objects)}.get(category, 2)
    colored = category in ("colors", "color_attr")
    if any((c is not None) != colored for c in colors):
        problem = "colours must be given exactly for colors and color_attr"
    elif category == "counting" and (len(objects) not in NUMBER_WORDS or len(set(shapes)) != 1):
        problem = "counting needs 2-4 objects of one shape"
    elif len(objects) != expected:
        problem = f"needs {expected} object(s)"
    elif category != "counting" and len(set(shapes)) != len(shapes):
        problem = "shapes must be distinct"
    elif category == "color_attr" and colors[0] == colors[1]:
        problem = "colours must be distinct"
    else:
        return
    raise ValueError(f"objects {objects} do not fit category {category!r}: {problem}")


@dataclass(frozen=True)
class T2IExample:
    """A prompt, its spec, and one scene that satisfies it (a training target)."""

    prompt: str
    spec: T2ISpec
    scene: Scene


def satisfies_relation(a: tuple[int, int], b: tuple[int, int], relation: str) -> bool:
    """Whether cell ``a`` is ``relation`` cell ``b`` (strict row/column comparison)."""
    (ra, ca), (rb, cb) = a, b
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


def _sample_spec(rng: np.random.Generator, category: str) -> T2ISpec:
    colors, shape_pairs = list(COLORS), list(permutations(SHAPES, 2))
    if category in ("single_object", "colors"):
        color = random_color(rng) if category == "colors" else None
        return T2ISpec(category, (ObjectRef(str(rng.choice(SHAPES)), color),))
    if category == "counting":
        count = int(rng.integers(2, 5))
        return T2ISpec(category, (ObjectRef(str(rng.choice(SHAPES))),) * count)
    first, second = shape_pairs[rng.integers(len(shape_pairs))]
    if category == "color_attr":
        c1, c2 = rng.choice(colors, size=2, replace=False)
        return T2ISpec(category, (ObjectRef(first, str(c1)), ObjectRef(second, str(c2))))
    relation = str(rng.choice(RELATIONS)) if category == "position" else None
    return T2ISpec(category, (ObjectRef(first), ObjectRef(second)), relation)


def _sample_cells(rng: np.random.Generator, spec: T2ISpec) -> list[tuple[int, int]]:
    if spec.relation is None:
        return random_cells(rng, len(spec.objects))
    pairs = [(a, b) for a in all_cells() for b in all_cells() if satisfies_relation(a, b, spec.relation)]
    a, b = pairs[rng.integers(len(pairs))]
    return [a, b]


def sample_t2i(rng: np.random.Generator, category: str, split: str = "train") -> T2IExample:
    """A random prompt of ``category`` from ``split`` (see :mod:`flowrl.shapes.splits`)
    and a random scene satisfying it."""
    if category not in T2I_CATEGORIES:
        raise ValueError(f"category must be one of {T2I_CATEGORIES}, got {category!r}")
    spec = _sample_spec(rng, category)
    while not in_split("t2i", category, spec.prompt(), split):
        spec = _sample_spec(rng, category)
    cells = _sample_cells(rng, spec)
    objects = tuple(
        ShapeObject(ref.shape, ref.color or random_color(rng), row, col) for ref, (row, col) in zip(spec.objects, cells)
    )
    return T2IExample(spec.prompt(), spec, Scene(objects))


def make_t2i_set(seed: int, n_per_category: int, split: str = "train") -> list[T2IExample]:
    """A fixed prompt set of ``split``, ``n_per_category`` per category in category order.

    Each category draws from its own stream, so sets with the same seed share
    their prefixes whatever ``n_per_category`` is.
    """
    examples = []
    for index, category in enumerate(T2I_CATEGORIES):
        rng = np.random.default_rng([seed, index])
        examples.extend(sample_t2i(rng, category, split) for _ in range(n_per_category))
    return examples


def _parse_object(words: list[str]) -> ObjectRef:
    """``a [colour] shape`` -> ObjectRef."""
    if len(words) == 2 and words[0] == "a" and words[1] in SHAPES:
        return ObjectRef(words[1])
    if len(words) == 3 and words[0] == "a" and words[1] in COLORS and words[2] in SHAPES:
        return ObjectRef(words[2], words[1])
    raise ValueError(f"not an object phrase: {' '.join(words)!r}")


def _parse_words(words: list[str]) -> T2ISpec:
    counts = {word: n for n, word in NUMBER_WORDS.items()}
    shapes = {plural: shape for shape, plural in PLURALS.items()}
    if len(words) == 2 and words[0] in counts and words[1] in shapes:
        return T2ISpec("counting", (ObjectRef(shapes[words[1]]),) * counts[words[0]])
    if "and" in words:
        split = words.index("and")
        objects = (_parse_object(words[:split]), _parse_object(words[split + 1 :]))
        return T2ISpec("color_attr" if objects[0].color else "two_objects", objects)
    for relation in RELATIONS:
        rel = relation.split()
        for split in range(1, len(words)):
            if words[split : split + len(rel)] == rel:
                objects = (_parse_object(words[:split]), _parse_object(words[split + len(rel) :]))
                return T2ISpec("position", objects, relation)
    obj = _parse_object(words)
    return T2ISpec("colors" if obj.color else "single_object", (obj,))


def parse_t2i(text: str) -> T2ISpec:
    """Invert the prompt grammar; anything it cannot emit raises ValueError."""
    try:
        spec = _parse_words(text.split(" "))
        if spec.prompt() != text:
            raise ValueError("not a sentence of the grammar")
    except ValueError as error:
        raise ValueError(f"cannot parse prompt {text!r}: {error}") from None
    return spec
