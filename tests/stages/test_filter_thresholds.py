"""The range cut of prompt filtering: one for all candidates, or one per category."""

import numpy as np
import pandas as pd
import pytest

from flowrl.stages.filter_prompts import category_thresholds, range_threshold


def _frame() -> pd.DataFrame:
    # counting spreads far less than color_attr: a global quartile would drop all of it
    ranges = {"counting": [0.2, 0.4, 0.6, 0.8], "color_attr": [2.0 + 0.25 * i for i in range(16)]}
    rows = [(c, r) for c, values in ranges.items() for r in values]
    return pd.DataFrame(rows, columns=["category", "reward_range"])


def test_global_quantile_can_empty_a_category():
    frame = _frame()
    cuts = category_thresholds(frame, "quantile", 0.25, "all")
    cut = np.quantile(frame.reward_range, 0.25)
    assert cuts == {"color_attr": pytest.approx(cut), "counting": pytest.approx(cut)}
    kept = frame.reward_range >= frame.category.map(cuts)
    assert not kept[frame.category == "counting"].any()


def test_per_category_quantile_keeps_each_categorys_most_spread_prompts():
    frame = _frame()
    cuts = category_thresholds(frame, "quantile", 0.25, "category")
    assert cuts["counting"] == pytest.approx(range_threshold(np.array([0.2, 0.4, 0.6, 0.8]), "quantile", 0.25))
    kept = frame.reward_range >= frame.category.map(cuts)
    assert list(frame[kept & (frame.category == "counting")].reward_range) == [0.4, 0.6, 0.8]
    assert kept[frame.category == "color_attr"].sum() == 12


def test_absolute_threshold_is_the_same_for_every_category_whatever_the_scope():
    frame = _frame()
    assert category_thresholds(frame, "absolute", 1.0, "category") == {"counting": 1.0, "color_attr": 1.0}


def test_a_quantile_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="filter.threshold"):
        category_thresholds(_frame(), "quantile", 1.5, "category")
