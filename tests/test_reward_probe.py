"""The arithmetic of experiments.t2i_reward_probe.t2i_reward_probe on hand-made groups."""

import numpy as np
import pytest

from experiments.t2i_reward_probe.t2i_reward_probe import ranking_auc, summarise


def test_ranking_auc_counts_pairs_and_halves_ties():
    assert ranking_auc(np.array([3.0, 2.0]), np.array([1.0])) == 1.0
    assert ranking_auc(np.array([1.0]), np.array([2.0, 3.0])) == 0.0
    # pairs: (2 > 1) yes, (2 > 2) tie, (0 > 1) no, (0 > 2) no -> (1 + 0.5) / 4
    assert ranking_auc(np.array([2.0, 0.0]), np.array([1.0, 2.0])) == pytest.approx(0.375)


def test_summary_reads_only_mixed_groups():
    groups = [
        (np.array([True, False, False]), np.array([5.0, 1.0, 2.0])),   # mixed, ranked right
        (np.array([True, True, False]), np.array([1.0, 3.0, 2.0])),    # mixed, AUC 0.5, top right
        (np.array([False, False, False]), np.array([9.0, 9.0, 9.0])),  # nothing right: no signal
    ]
    row = summarise(groups)
    assert row["groups"] == 3 and row["mixed_groups"] == 2
    assert row["p_right"] == pytest.approx(round(3 / 9, 3))
    assert row["auc_in_mixed"] == pytest.approx(0.75) and row["top_is_right_in_mixed"] == 1.0
    empty = summarise([(np.array([False, False]), np.array([1.0, 2.0]))])
    assert empty["mixed_groups"] == 0 and empty["auc_in_mixed"] is None
