"""Paired bootstrap gains over the anchor (flowrl.bench.paired_gain and the bench's tables of them)."""

import numpy as np
import pytest

from flowrl.bench import ItemScores, bench_gains, gain_items, group_gains, paired_gain


class _Draws:
    """A stand-in generator whose draws are fixed, so the interval can be worked out by hand."""

    def __init__(self, rows):
        self.rows = np.array(rows)

    def integers(self, low, high, size):
        assert size == self.rows.shape and low == 0 and high > self.rows.max()
        return self.rows


def test_paired_gain_by_hand():
    """Differences 1, 0, -1, 2 (delta 0.5; sd 1.291, stderr 0.6455). Five fixed draws of 4 items give the
    mean differences 1.0, 0.0, 0.5, -0.25, 0.5; sorted -0.25, 0, 0.5, 0.5, 1.0, their 10th and 90th
    percentiles (linear between ranks 0.4 and 3.6) are -0.25 + 0.4 * 0.25 = -0.15 and 0.5 + 0.6 * 0.5 = 0.8."""
    model = np.array([1.0, 0.5, 0.0, 1.0])
    anchor = np.array([0.0, 0.5, 1.0, -1.0])
    draws = [[0, 0, 1, 3], [0, 1, 2, 1], [3, 2, 1, 0], [2, 2, 0, 1], [0, 1, 2, 3]]
    gain = paired_gain(model, anchor, 5, 0.8, _Draws(draws))
    assert gain["delta"] == pytest.approx(0.5)
    assert gain["stderr"] == pytest.approx(np.std([1, 0, -1, 2], ddof=1) / 2)
    assert gain["ci_low"] == pytest.approx(-0.15) and gain["ci_high"] == pytest.approx(0.8)


def test_identical_models_gain_nothing_with_a_zero_width_interval():
    scores = np.random.default_rng(0).random(30)
    gain = paired_gain(scores, scores.copy(), 200, 0.95, np.random.default_rng(1))
    assert gain == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "stderr": 0.0}


def test_no_replicates_collapse_the_interval_and_one_item_has_no_stderr():
    gain = paired_gain([0.9, 0.7], [0.5, 0.5], 0, 0.95, np.random.default_rng(0))
    assert gain["ci_low"] == gain["ci_high"] == gain["delta"] == pytest.approx(0.3)
    assert np.isnan(paired_gain([1.0], [0.0], 10, 0.95, np.random.default_rng(0))["stderr"])


def test_bad_input_is_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="same items"):
        paired_gain([1.0, 0.0], [1.0], 10, 0.95, rng)
    with pytest.raises(ValueError, match="no items"):
        paired_gain([], [], 10, 0.95, rng)
    with pytest.raises(ValueError, match="confidence"):
        paired_gain([1.0], [0.0], 10, 1.0, rng)


def test_interval_covers_a_known_shift_at_about_the_nominal_rate():
    """400 benches of 40 items, each item's difficulty shared by both models plus independent noise, the
    model shifted by +0.1: the 95 % interval holds the true shift in 90-99 % of them (a percentile
    interval on 40 items runs a little short of its nominal 95 %)."""
    rng = np.random.default_rng(0)
    covered = 0
    for _ in range(400):
        difficulty = rng.normal(0.5, 0.2, 40)
        anchor = difficulty + rng.normal(0, 0.1, 40)
        model = difficulty + 0.1 + rng.normal(0, 0.1, 40)
        gain = paired_gain(model, anchor, 400, 0.95, rng)
        covered += gain["ci_low"] <= 0.1 <= gain["ci_high"]
    assert 0.90 <= covered / 400 <= 0.99


def test_pairing_narrows_the_interval_when_items_are_correlated():
    """The same data bootstrapped unpaired (each model's items drawn on their own) gives a far wider
    interval: the items' shared difficulty no longer cancels."""
    rng = np.random.default_rng(3)
    difficulty = rng.normal(0.5, 0.3, 50)
    anchor = difficulty + rng.normal(0, 0.05, 50)
    model = difficulty + 0.05 + rng.normal(0, 0.05, 50)
    paired = paired_gain(model, anchor, 1000, 0.95, np.random.default_rng(0))
    draws = np.random.default_rng(0)
    unpaired = (model[draws.integers(0, 50, (1000, 50))].mean(1) - anchor[draws.integers(0, 50, (1000, 50))].mean(1))
    low, high = np.percentile(unpaired, [2.5, 97.5])
    assert paired["ci_high"] - paired["ci_low"] < 0.5 * (high - low)
    assert paired["ci_low"] > 0 > low  # only the paired interval shows the gain


class _Bench:
    t2i_categories = ["counting", "counting", "colors", "colors"]
    edit_kinds = ["add", "add", "move"]


def _scores(t2i, edit, identity, fidelity):
    return ItemScores(np.array(t2i, float), np.full(4, fidelity), np.array(edit, float), np.array(identity, float),
                      np.full(3, fidelity))


def test_bench_gains_per_pillar_and_per_category_against_the_anchor():
    base = _scores([0, 1, 0, 0], [1, 0, 0], [1.0, 1.0, 1.0], 0.9)
    teacher = _scores([1, 1, 0, 1], [1, 1, 0], [1.0, 0.5, 1.0], 0.8)
    scores = {"base": base, "teacher": teacher, "copy": base}
    gains = bench_gains(scores, "base", 200, 0.95, seed=5)
    assert set(gains) == {"teacher", "copy"}  # every model but the anchor
    assert set(gains["teacher"]) == {"t2i_alignment", "edit_accuracy", "identity", "fidelity"}
    t = gains["teacher"]
    assert t["t2i_alignment"]["delta"] == pytest.approx(0.5) and t["edit_accuracy"]["delta"] == pytest.approx(1 / 3)
    assert t["identity"]["delta"] == pytest.approx(-0.5 / 3) and t["fidelity"]["delta"] == pytest.approx(-0.1)
    assert all(g == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "stderr": 0.0} for g in gains["copy"].values())
    assert len(gain_items(teacher)["fidelity"]) == 7  # T2I images then edits, as the pillar
    # deterministic, and independent of which other models are benched
    again = bench_gains({"teacher": teacher, "base": base}, "base", 200, 0.95, seed=5)
    assert again["teacher"] == gains["teacher"]
    groups = group_gains(scores, _Bench, "base", 200, 0.95, seed=5)["teacher"]
    assert list(groups) == ["t2i_alignment/counting", "t2i_alignment/colors", "edit_accuracy/add",
                            "edit_accuracy/move"]
    assert groups["t2i_alignment/counting"]["delta"] == pytest.approx(0.5)
    assert groups["edit_accuracy/add"]["delta"] == pytest.approx(0.5)
    assert groups["edit_accuracy/add"]["stderr"] == pytest.approx(0.5)  # differences 0, 1
    assert np.isnan(groups["edit_accuracy/move"]["stderr"])  # one item
    with pytest.raises(ValueError, match="anchor 'nobody'"):
        bench_gains(scores, "nobody", 10, 0.95, seed=0)


def test_two_task_difference_by_hand_and_its_interval():
    import numpy as np

    from flowrl.bench import ItemScores, two_task_difference

    def scores(t2i, edit):
        t2i, edit = np.array(t2i, float), np.array(edit, float)
        return ItemScores(t2i, np.ones_like(t2i), edit, np.ones_like(edit), np.ones_like(edit))

    a = scores([1, 1, 0, 1], [1, 0, 1, 1, 1, 0])
    b = scores([1, 0, 0, 0], [1, 0, 0, 1, 0, 0])
    d = two_task_difference(a, b, 2000, 0.95, np.random.default_rng(0))
    assert d["delta"] == pytest.approx(0.5 * (2 / 4 + 2 / 6))
    t2i, edit = np.array([0, 1, 0, 1.0]), np.array([0, 0, 1, 0, 1, 0.0])
    assert d["stderr"] == pytest.approx(0.5 * np.sqrt(t2i.var(ddof=1) / 4 + edit.var(ddof=1) / 6))
    assert d["ci_low"] < d["delta"] < d["ci_high"]
    same = two_task_difference(a, a, 500, 0.95, np.random.default_rng(1))
    assert same == {"delta": 0.0, "ci_low": 0.0, "ci_high": 0.0, "stderr": 0.0}
    with pytest.raises(ValueError, match="two items or more"):
        two_task_difference(scores([1], [1, 0]), scores([0], [1, 1]), 10, 0.95, np.random.default_rng(2))
