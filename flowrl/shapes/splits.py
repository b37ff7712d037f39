"""The bench partition of the grammar: texts no training stage ever sees.

The shapes grammar is small (126 T2I prompts, 108 edit instructions), so a
bench drawn at random from it would repeat prompts the base model was
pretrained on. Instead a fixed share of the *texts* of every T2I category
and every edit kind is reserved for the bench: the first
``ceil(BENCH_FRACTION * n)`` texts of the category when sorted by a salted
SHA-256 (at least one, never all). Every sampler draws from the ``train``
split (everything else) unless asked for ``bench``: pretraining, annotation,
prompt filtering, the RL prompt sets and the held-out judge sets all use
``train``, so the bench measures prompts that no stage trained, filtered,
annotated or selected on. ``BENCH_VERSION`` names the partition; it changes
only if the grammar or the rule does.
"""

from __future__ import annotations

import hashlib
import math
from functools import lru_cache
from itertools import permutations

from flowrl.shapes.scene import COLORS, SHAPES

SPLITS: tuple[str, ...] = ("train", "bench")
BENCH_FRACTION = 0.2
_SALT = "flowrl-bench-v1"

# The T2I and edit grammars, enumerated (kept beside their samplers' vocab:
# prompts.py and edits.py; a test checks that every sampled text is listed).
_NUMBERS = {2: "two", 3: "three", 4: "four"}
_RELATIONS = ("left of", "right of", "above", "below")
_DIRECTIONS = ("left", "right", "up", "down")


def _t2i_texts() -> dict[str, list[str]]:
    colors, pairs = list(COLORS), list(permutations(SHAPES, 2))
    return {
        "single_object": [f"a {s}" for s in SHAPES],
        "two_objects": [f"a {a} and a {b}" for a, b in pairs],
        "counting": [f"{word} {s}s" for word in _NUMBERS.values() for s in SHAPES],
        "colors": [f"a {c} {s}" for c in colors for s in SHAPES],
        "position": [f"a {a} {rel} a {b}" for rel in _RELATIONS for a, b in pairs],
        "color_attr": [
            f"a {c1} {a} and a {c2} {b}" for a, b in pairs for c1 in colors for c2 in colors if c1 != c2
        ],
    }


def _edit_texts() -> dict[str, list[str]]:
    objects = [f"{c} {s}" for c in COLORS for s in SHAPES]
    return {
        "recolor": [f"make the {c} {s} {n}" for c in COLORS for s in SHAPES for n in COLORS if n != c],
        "remove": [f"remove the {o}" for o in objects],
        "add": [f"add a {o}" for o in objects],
        "move": [f"move the {o} {d}" for o in objects for d in _DIRECTIONS],
    }


def _reserve(texts: list[str]) -> list[str]:
    """The bench share of one category's texts (salted-hash order)."""
    n = min(len(texts) - 1, max(1, math.ceil(BENCH_FRACTION * len(texts))))
    return sorted(texts, key=lambda t: hashlib.sha256(f"{_SALT}:{t}".encode()).hexdigest())[:n]


@lru_cache(maxsize=None)
def grammar(task: str) -> dict[str, tuple[str, ...]]:
    """Every text of ``task`` ("t2i" or "edit") by category / kind."""
    if task not in ("t2i", "edit"):
        raise ValueError(f"task must be 't2i' or 'edit', got {task!r}")
    texts = _t2i_texts() if task == "t2i" else _edit_texts()
    return {category: tuple(values) for category, values in texts.items()}


@lru_cache(maxsize=None)
def bench_texts(task: str) -> dict[str, frozenset[str]]:
    """The reserved texts of ``task`` by category / kind."""
    return {category: frozenset(_reserve(list(texts))) for category, texts in grammar(task).items()}


def in_split(task: str, category: str, text: str, split: str) -> bool:
    """Whether ``text`` of ``category`` belongs to ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    reserved = text in bench_texts(task)[category]
    return reserved == (split == "bench")


def _version() -> str:
    digest = hashlib.sha256()
    for task in ("t2i", "edit"):
        for category, texts in sorted(bench_texts(task).items()):
            digest.update(f"{task}/{category}:{'|'.join(sorted(texts))}\n".encode())
    return digest.hexdigest()[:12]


BENCH_VERSION = _version()
