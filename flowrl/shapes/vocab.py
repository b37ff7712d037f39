"""A fixed word-level vocabulary for shapes-world prompts and instructions.

The grammar is closed, so a word table built from its constants covers every
prompt; tiny models then embed token ids instead of running a text encoder.
"""

from __future__ import annotations

from typing import Sequence

import torch

from flowrl.shapes.edits import DIRECTIONS
from flowrl.shapes.prompts import NUMBER_WORDS, PLURALS, RELATIONS
from flowrl.shapes.scene import COLORS, SHAPES

PAD_ID = 0
UNK_ID = 1
# Longest sentences: "a red circle and a blue triangle" (7 words); one spare.
MAX_PROMPT_TOKENS = 8


def _grammar_words() -> tuple[str, ...]:
    words = ["a", "and", "the", "make", "remove", "add", "move"]
    words += list(SHAPES) + list(PLURALS.values()) + list(COLORS) + list(NUMBER_WORDS.values())
    words += [w for relation in RELATIONS for w in relation.split()] + list(DIRECTIONS)
    return tuple(dict.fromkeys(words))  # drop repeats ("left", "right") keeping order


VOCAB: tuple[str, ...] = ("<pad>", "<unk>") + _grammar_words()
WORD_TO_ID: dict[str, int] = {word: index for index, word in enumerate(VOCAB)}


def tokenize(texts: Sequence[str], max_len: int = MAX_PROMPT_TOKENS) -> torch.Tensor:
    """LongTensor [B, max_len] of word ids, right-padded with PAD_ID; unknown words -> UNK_ID."""
    if isinstance(texts, str):
        raise TypeError("tokenize takes a sequence of texts, not one string")
    ids = torch.full((len(texts), max_len), PAD_ID, dtype=torch.long)
    for row, text in enumerate(texts):
        words = text.split()
        if len(words) > max_len:
            raise ValueError(f"text has {len(words)} words, more than max_len={max_len}: {text!r}")
        ids[row, : len(words)] = torch.tensor([WORD_TO_ID.get(w, UNK_ID) for w in words], dtype=torch.long)
    return ids
