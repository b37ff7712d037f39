"""The bench partition: fixed, covering the grammar, never sampled for training."""

import numpy as np
import pytest

from flowrl.shapes.edits import EDIT_KINDS, make_edit_set, parse_edit, sample_edit
from flowrl.shapes.prompts import T2I_CATEGORIES, make_t2i_set, parse_t2i, sample_t2i
from flowrl.shapes.splits import BENCH_FRACTION, BENCH_VERSION, bench_texts, grammar, in_split


def test_grammar_lists_every_text_once_and_each_parses_to_its_category():
    for text, category in ((t, c) for c, ts in grammar("t2i").items() for t in ts):
        assert parse_t2i(text).category == category
    for text, kind in ((t, k) for k, ts in grammar("edit").items() for t in ts):
        assert parse_edit(text).kind == kind
    for task in ("t2i", "edit"):
        texts = [t for ts in grammar(task).values() for t in ts]
        assert len(texts) == len(set(texts))
    assert set(grammar("t2i")) == set(T2I_CATEGORIES) and set(grammar("edit")) == set(EDIT_KINDS)


def test_every_category_reserves_a_share_but_never_all():
    for task in ("t2i", "edit"):
        for category, texts in grammar(task).items():
            reserved = bench_texts(task)[category]
            assert reserved < set(texts) and 1 <= len(reserved) <= max(1, int(np.ceil(BENCH_FRACTION * len(texts))))


def test_the_partition_is_pinned():
    """Changing it silently would put trained prompts into the bench: BENCH_VERSION names it."""
    assert BENCH_VERSION == "b658ca3ad44e"
    assert bench_texts("t2i")["single_object"] == {"a triangle"}


@pytest.mark.parametrize("split", ["train", "bench"])
def test_samplers_stay_in_their_split(split):
    rng = np.random.default_rng(7)
    for category in T2I_CATEGORIES:
        for _ in range(200):
            example = sample_t2i(rng, category, split)
            assert example.prompt in grammar("t2i")[category] and in_split("t2i", category, example.prompt, split)
    for kind in EDIT_KINDS:
        for _ in range(200):
            example = sample_edit(rng, kind, split)
            assert in_split("edit", kind, example.instruction, split)
            assert example.spec == parse_edit(example.instruction)


def test_sets_default_to_train_and_bench_sets_hold_only_bench_texts():
    reserved_t2i = set().union(*bench_texts("t2i").values())
    reserved_edit = set().union(*bench_texts("edit").values())
    assert not {e.prompt for e in make_t2i_set(3, 40)} & reserved_t2i
    assert not {e.instruction for e in make_edit_set(3, 40)} & reserved_edit
    assert {e.prompt for e in make_t2i_set(3, 40, split="bench")} <= reserved_t2i
    assert {e.instruction for e in make_edit_set(3, 40, split="bench")} <= reserved_edit
    with pytest.raises(ValueError, match="split must be one of"):
        make_t2i_set(3, 1, split="test")
