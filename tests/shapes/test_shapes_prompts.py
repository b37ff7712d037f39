"""Prompt and instruction grammars: round trips, sampling invariants, tokenizer."""

import numpy as np
import pytest

from flowrl.shapes.edits import (
    EDIT_KINDS,
    EditSpec,
    apply_edit,
    find_referenced,
    make_edit_set,
    parse_edit,
    sample_edit,
)
from flowrl.shapes.prompts import (
    T2I_CATEGORIES,
    ObjectRef,
    T2ISpec,
    make_t2i_set,
    parse_t2i,
    sample_t2i,
    satisfies_relation,
)
from flowrl.shapes.vocab import MAX_PROMPT_TOKENS, PAD_ID, UNK_ID, VOCAB, tokenize


@pytest.fixture(scope="module")
def t2i_examples():
    rng = np.random.default_rng(0)
    return [sample_t2i(rng, c) for c in T2I_CATEGORIES for _ in range(300)]


@pytest.fixture(scope="module")
def edit_examples():
    rng = np.random.default_rng(1)
    return [sample_edit(rng, k) for k in EDIT_KINDS for _ in range(300)]


def test_t2i_round_trip(t2i_examples):
    for ex in t2i_examples:
        assert parse_t2i(ex.prompt) == ex.spec, ex.prompt
        assert ex.spec.prompt() == ex.prompt


def test_t2i_scene_satisfies_its_spec(t2i_examples):
    for ex in t2i_examples:
        objects = ex.scene.objects
        assert sorted(o.shape for o in objects) == sorted(r.shape for r in ex.spec.objects)
        for ref in ex.spec.objects:
            assert any(o.shape == ref.shape and ref.color in (None, o.color) for o in objects)
        if ex.spec.relation:
            (a,) = [o for o in objects if o.shape == ex.spec.objects[0].shape]
            (b,) = [o for o in objects if o.shape == ex.spec.objects[1].shape]
            assert satisfies_relation(a.cell, b.cell, ex.spec.relation)


def test_every_category_and_prompt_form_appears(t2i_examples):
    prompts = {ex.prompt for ex in t2i_examples}
    assert {"a circle", "four squares", "a circle left of a square", "a triangle below a circle"} <= prompts
    assert {ex.spec.category for ex in t2i_examples} == set(T2I_CATEGORIES)


@pytest.mark.parametrize(
    "text",
    ["", "a", "a star", "a circle and a circle", "one circle", "five circles", "a red circle left of a square",
     "a red circle and a red square", "a red circle and a square", " a circle", "a circle  and a square",
     "two circle", "a circle above", "make the red circle red"],
)
def test_unparseable_prompt_quotes_text(text):
    with pytest.raises(ValueError, match="cannot parse prompt"):
        parse_t2i(text)


def test_spec_validation_names_the_field():
    with pytest.raises(ValueError, match="category"):
        T2ISpec("counting_things", (ObjectRef("circle"),) * 2)
    with pytest.raises(ValueError, match="relation"):
        T2ISpec("two_objects", (ObjectRef("circle"), ObjectRef("square")), "above")
    with pytest.raises(ValueError, match="objects"):
        T2ISpec("counting", (ObjectRef("circle"), ObjectRef("square")))
    with pytest.raises(ValueError, match="color"):
        ObjectRef("circle", "pink")
    with pytest.raises(ValueError, match="new_color"):
        EditSpec("recolor", "circle", "red", "red")
    with pytest.raises(ValueError, match="direction"):
        EditSpec("move", "circle", "red")


def test_edit_round_trip_and_invariants(edit_examples):
    for ex in edit_examples:
        assert parse_edit(ex.instruction) == ex.spec and ex.spec.kind == ex.kind
        if ex.kind != "add":
            touched = find_referenced(ex.source, ex.spec)  # unique by (colour, shape)
            assert len(ex.source.objects) >= 2, "an untouched object must remain"
            assert apply_edit(ex.source, ex.spec) == ex.target
        else:
            assert not [o for o in ex.source.objects if (o.color, o.shape) == (ex.spec.color, ex.spec.shape)]
        assert 1 <= len(ex.target.objects) <= 4
        if ex.kind == "move":
            assert touched not in ex.target.objects
    assert {ex.instruction.split()[-1] for ex in edit_examples if ex.kind == "move"} == {"left", "right", "up", "down"}


@pytest.mark.parametrize(
    "text", ["make the red circle", "remove a red circle", "add the red circle", "move the red circle north",
             "remove the red circle now", "make the red circle red", "add a red circles"],
)
def test_unparseable_instruction_quotes_text(text):
    with pytest.raises(ValueError, match="cannot parse edit instruction"):
        parse_edit(text)


def test_prompt_sets_are_deterministic_and_sized():
    first, again, other = make_t2i_set(7, 5), make_t2i_set(7, 5), make_t2i_set(8, 5)
    assert first == again and first != other
    assert [ex.spec.category for ex in first] == [c for c in T2I_CATEGORIES for _ in range(5)]
    assert make_t2i_set(7, 8)[:5] == first[:5]  # per-category streams: prefixes are shared
    edits = make_edit_set(7, 4)
    assert edits == make_edit_set(7, 4) and edits != make_edit_set(8, 4)
    assert [ex.kind for ex in edits] == [k for k in EDIT_KINDS for _ in range(4)]


def test_tokenizer_covers_every_word(t2i_examples, edit_examples):
    texts = [ex.prompt for ex in t2i_examples] + [ex.instruction for ex in edit_examples]
    ids = tokenize(texts)
    assert ids.shape == (len(texts), MAX_PROMPT_TOKENS)
    assert not (ids == UNK_ID).any()
    used = {VOCAB[i] for i in ids.unique().tolist()} - {VOCAB[PAD_ID]}
    assert used == set(VOCAB) - {"<pad>", "<unk>"}, "every grammar word appears and nothing else"
    assert tokenize(["a circle"])[0].tolist() == [VOCAB.index("a"), VOCAB.index("circle")] + [PAD_ID] * 6
    assert tokenize(["a star"])[0, 1] == UNK_ID
    with pytest.raises(ValueError, match="max_len"):
        tokenize(["a " * 9])
