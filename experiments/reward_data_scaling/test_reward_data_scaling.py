"""The study's own pieces on small synthetic annotations: what a share keeps, the bootstrap, the slope, the target.
Run by `make experiments-test`."""

import numpy as np
import pandas as pd
import pytest

from experiments.reward_data_scaling.reward_data_scaling import bootstrap, subset_frames, target_of
from experiments.reward_data_scaling.summary import grammar_training_texts, per_doubling
from flowrl.rewards.training import split_annotations
from flowrl.shapes.splits import bench_texts, grammar

HELD, UNSEEN, SEED = 0.2, 0.1, 3


def annotations(task_texts: int = 40, groups_per_text: int = 6, rows_per_group: int = 3):
    """Pointwise and pairwise frames of both tasks: texts in four categories, each with its groups and rows."""
    points, pairs = [], []
    for task in ("t2i", "edit"):
        for t in range(task_texts):
            prompt, category = f"{task} text {t}", f"cat{t % 4}"
            for g in range(groups_per_text):
                group = f"{task}-{t}-{g}"
                points += [{"task": task, "prompt": prompt, "category": category, "group": group, "row": r}
                           for r in range(rows_per_group)]
                pairs.append({"task": task, "prompt": prompt, "category": category, "group": group})
    return pd.DataFrame(points), pd.DataFrame(pairs)


def parts(frame: pd.DataFrame, task: str):
    split = split_annotations(frame[frame.task == task].reset_index(drop=True), HELD, UNSEEN, SEED)
    return split.train, split.heldout, split.unseen


@pytest.mark.parametrize("axis", ["texts", "groups"])
def test_a_share_keeps_every_unseen_and_held_out_row_and_nests(axis):
    points, pairs = annotations()
    kept_before: dict[str, set] = {"t2i": set(), "edit": set()}
    for fraction in (0.125, 0.25, 0.5, 1.0):
        sub_p, sub_q, counts = subset_frames(points, pairs, axis, fraction, HELD, UNSEEN, SEED)
        for task in ("t2i", "edit"):
            train, held, unseen = parts(sub_p, task)
            whole_train, whole_held, whole_unseen = parts(points, task)
            # the evaluation rows are the whole's, whatever the share
            pd.testing.assert_frame_equal(held, whole_held)
            pd.testing.assert_frame_equal(unseen, whole_unseen)
            groups = set(train["group"])
            assert kept_before[task] <= groups  # nested
            kept_before[task] = groups
            assert counts[task]["groups"] == len(groups) and counts[task]["texts"] == train["prompt"].nunique()
            if axis == "texts":  # a kept text keeps every group; every category keeps a text
                whole_of_kept = whole_train[whole_train["prompt"].isin(train["prompt"])]
                assert groups == set(whole_of_kept["group"])
                assert set(train["category"]) == set(whole_train["category"])
            else:  # every text stays, with at least one group
                assert set(train["prompt"]) == set(whole_train["prompt"])
            # pairwise rows go with their group
            assert set(sub_q[sub_q.task == task]["group"]) == groups | set(held["group"]) | set(unseen["group"])
        if fraction == 1.0:
            pd.testing.assert_frame_equal(sub_p.sort_index(), points)
    small = subset_frames(points, pairs, axis, 0.125, HELD, UNSEEN, SEED)[2]["t2i"]
    assert small[axis] < small[f"of_{axis}"]


def test_the_axes_refuse_anything_else():
    points, pairs = annotations(task_texts=8)
    with pytest.raises(ValueError, match="axis"):
        subset_frames(points, pairs, "rows", 0.5, HELD, UNSEEN, SEED)


def test_bootstrap_interval_holds_the_spearman_and_collapses_on_a_perfect_ranking():
    rng = np.random.default_rng(0)
    labels = rng.normal(size=300)
    units = np.repeat(np.arange(30), 10).astype(str)
    perfect = bootstrap(labels.copy(), labels, units, seed=1)
    assert perfect["ci_low"] == pytest.approx(1.0) and perfect["ci_high"] == pytest.approx(1.0)
    noisy = bootstrap(labels + rng.normal(size=300), labels, units, seed=1)
    assert 0.4 < noisy["ci_low"] < noisy["ci_high"] < 0.9


def test_per_doubling_is_the_slope_on_log2_of_the_share():
    assert per_doubling([13, 26, 52, 104], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.1)
    assert per_doubling([1.0], [0.5]) is None


def test_target_is_point_eight_or_ninety_percent_of_a_low_ceiling():
    assert target_of(0.95) == 0.8 and target_of(0.89) == 0.8
    assert target_of(0.6) == pytest.approx(0.54)


def test_grammar_training_texts_leave_out_the_bench_and_the_unseen_prompts():
    for task in ("t2i", "edit"):
        everything = sum(len(texts) for texts in grammar(task).values())
        bench = sum(len(texts) for texts in bench_texts(task).values())
        assert grammar_training_texts(task, 0.0, SEED) == everything - bench
        assert grammar_training_texts(task, 0.5, SEED) < everything - bench
