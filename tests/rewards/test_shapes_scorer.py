"""The shapes reward-model backbone trains with both paradigms."""

import numpy as np
import pytest
import torch

from flowrl.rewards.shapes_annotators import annotator_pool
from flowrl.rewards.shapes_dataset import annotate, draw_candidates
from flowrl.rewards.shapes_scorer import ScorerArch, ShapesScorer
from flowrl.rewards.training import (
    PairwiseData,
    PointwiseData,
    fit,
    ordering_accuracy,
    pairwise_step_loss,
    pointwise_step_loss,
    rewards_of,
    spearman,
    spearman_ceiling,
    split_annotations,
)


@pytest.fixture(scope="module")
def frames():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    pointwise, pairwise = annotate(draw_candidates(rng, 4, 0, 32), annotator_pool(rng, 4, 0.2, (0.2, 0.4)), rng, 1, 4)
    return pointwise, pairwise


def test_pointwise_loss_falls(frames):
    torch.manual_seed(0)
    scorer = ShapesScorer(ScorerArch(width=32, depth=1, heads=2), 32)
    data = PointwiseData.from_frame(frames[0], "fidelity")
    losses = fit(scorer, lambda i: pointwise_step_loss(scorer, data, i), len(data.prompts),
                 steps=120, batch_size=16, lr=3e-3, seed=0)
    assert np.mean(losses[-20:]) < 0.85 * np.mean(losses[:10])  # measured 0.80 on the bench-split data


def test_pairwise_loss_falls_and_orders_training_pairs(frames):
    torch.manual_seed(0)
    scorer = ShapesScorer(ScorerArch(width=32, depth=1, heads=2), 32)
    data = PairwiseData.from_frame(frames[1])
    losses = fit(scorer, lambda i: pairwise_step_loss(scorer, data, i), len(data.prompts),
                 steps=80, batch_size=16, lr=3e-3, seed=0)
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
    ra = rewards_of(scorer, data.images_a, data.prompts, None)
    rb = rewards_of(scorer, data.images_b, data.prompts, None)
    assert ordering_accuracy(ra, rb, data.preference) > 0.6


def test_save_load_roundtrip(tmp_path):
    scorer = ShapesScorer(ScorerArch(width=32, depth=1, heads=2), 32).eval()
    scorer.save(tmp_path)
    loaded = ShapesScorer.load(tmp_path)
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(loaded.level_logits(images, ["a circle", "a square"]),
                               scorer.level_logits(images, ["a circle", "a square"]))


def test_split_never_cuts_a_group_or_an_unseen_prompt(frames):
    pointwise, pairwise = frames
    for frame in (pointwise, pairwise):
        split = split_annotations(frame, 0.3, 0.2, seed=0)
        assert len(split.train) + len(split.heldout) + len(split.unseen) == len(frame)
        assert min(len(split.train), len(split.heldout), len(split.unseen)) > 0
        assert set(split.train.group).isdisjoint(split.heldout.group)
        assert set(split.unseen.prompt).isdisjoint(set(split.train.prompt) | set(split.heldout.prompt))
    # the pointwise and pairwise rows of one group land on the same side
    p, q = split_annotations(pointwise, 0.3, 0.2, 0), split_annotations(pairwise, 0.3, 0.2, 0)
    for name in ("train", "heldout", "unseen"):
        assert set(getattr(p, name).group) == set(getattr(q, name).group)


def test_split_without_groups_keeps_prompts_apart(frames):
    split = split_annotations(frames[0].drop(columns="group"), 0.3, 0.0, seed=1)
    assert split.unseen.empty and len(split.heldout) > 0
    assert set(split.train.prompt).isdisjoint(split.heldout.prompt)


def test_split_depends_on_the_seed(frames):
    a, b = split_annotations(frames[0], 0.3, 0.0, 0), split_annotations(frames[0], 0.3, 0.0, 1)
    assert set(a.heldout.group) != set(b.heldout.group)


def test_ordering_accuracy_ignores_ties():
    acc = ordering_accuracy(torch.tensor([2.0, 1.0, 5.0]), torch.tensor([1.0, 3.0, 0.0]), torch.tensor([1.0, 1.0, 0.5]))
    assert acc == 0.5


def test_spearman_ceiling_is_one_without_ties_and_low_with_many():
    rng = np.random.default_rng(0)
    distinct = rng.random(500)
    assert spearman_ceiling(distinct) == pytest.approx(1.0)
    tied = np.where(rng.random(4000) < 0.87, 1.0, rng.uniform(0.05, 0.9, 4000))
    ceiling = spearman_ceiling(tied)
    assert 0.45 < ceiling < 0.7
    # a perfect scorer that breaks the ties at random lands at the ceiling
    perfect = torch.from_numpy(tied + rng.uniform(0, 1e-6, 4000))
    assert spearman(perfect, tied) == pytest.approx(ceiling, abs=0.03)


def test_a_scorer_with_a_convolutional_stem_scores_saves_and_loads(tmp_path):
    import json

    from flowrl.rewards.shapes_scorer import META, ScorerArch, ShapesScorer

    torch.manual_seed(0)
    scorer = ShapesScorer(ScorerArch(width=16, depth=1, heads=4, stem=4), 32).eval()
    images = torch.rand(3, 3, 32, 32)
    logits = scorer.level_logits(images, ["a red circle"] * 3)
    assert logits.shape == (3, 5)
    scorer.save(tmp_path / "s")
    loaded = ShapesScorer.load(tmp_path / "s")
    assert loaded.arch.stem == 4 and torch.equal(loaded.level_logits(images, ["a red circle"] * 3), logits)
    # a scorer saved before the stem existed (no "stem" in its description) loads without one
    plain = ShapesScorer(ScorerArch(width=16, depth=1, heads=4), 32)
    plain.save(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / META).read_text())
    del meta["arch"]["stem"]
    (tmp_path / "p" / META).write_text(json.dumps(meta))
    assert ShapesScorer.load(tmp_path / "p").stem is None
