"""Pillars, battles and the report from hand-made per-item scores (no models)."""

import numpy as np
import pytest

from flowrl.arena import Battle, Rating
from flowrl.bench import ItemScores, arena_battles, pillars, win_rates
from flowrl.report import ReportData, pillar_rows, render_markdown, write_report


class _Bench:
    """Only what the pillars read of a bench: each item's category."""

    t2i_categories = ["counting", "counting", "colors", "colors"]
    edit_kinds = ["add", "move"]


def _scores(t2i, edit, identity=(1.0, 0.5), fid=0.9):
    return ItemScores(np.array(t2i, float), np.full(4, fid), np.array(edit, float), np.array(identity), np.full(2, fid))


def test_pillars_by_hand():
    p = pillars(_scores([1, 0, 1, 1], [1, 0]), _Bench)
    assert p["t2i_alignment"] == 75.0 and p["edit_accuracy"] == 50.0
    assert p["identity"] == 75.0 and p["fidelity"] == 90.0
    assert p["overall"] == pytest.approx((75 + 50 + 75 + 90) / 4)
    assert p["t2i_alignment/counting"] == 50.0 and p["t2i_alignment/colors"] == 100.0
    assert p["edit_accuracy/add"] == 100.0 and p["edit_accuracy/move"] == 0.0


def test_item_scores_are_checked():
    with pytest.raises(ValueError, match="t2i_correct"):
        _scores([2, 0, 1, 1], [1, 0])
    with pytest.raises(ValueError, match="edit arrays"):
        ItemScores(np.ones(2), np.ones(2), np.ones(2), np.ones(1), np.ones(2))


def test_battles_correctness_first_then_secondary_then_tie():
    a = _scores([1, 0, 1, 1], [1, 1], identity=(1.0, 0.9))
    b = _scores([0, 0, 1, 1], [1, 1], identity=(0.5, 0.88))
    battles = arena_battles({"a": a, "b": b}, tolerance=0.05)
    assert [x.outcome for x in battles["t2i"]] == [1.0, 0.5, 0.5, 0.5]
    assert [x.outcome for x in battles["edit"]] == [1.0, 0.5]  # identity 1.0 vs 0.5 decides; 0.9 vs 0.88 ties
    rates = win_rates(battles["t2i"], ["a", "b"])
    assert rates[0, 1] == pytest.approx(0.625) and rates[1, 0] == pytest.approx(0.375) and np.isnan(rates[0, 0])


def _data(histories=None):
    models = ["base", "student"]
    img = np.zeros((2, 8, 8, 3), np.uint8)
    return ReportData(
        title="t", models=models, anchor="base",
        pillars={"base": {"overall": 50.0, "t2i_alignment": 40.0, "edit_accuracy": 30.0, "identity": 60.0,
                          "fidelity": 70.0, "t2i_alignment/colors": 40.0, "edit_accuracy/add": 30.0},
                 "student": {"overall": 55.5, "t2i_alignment": 50.0, "edit_accuracy": 32.0, "identity": 60.0,
                             "fidelity": 80.0, "t2i_alignment/colors": 50.0, "edit_accuracy/add": 32.0}},
        ratings={a: {"base": Rating(1000, 1000, 1000), "student": Rating(1100, 1050, 1150)} for a in ("t2i", "edit")},
        win_rates={a: win_rates([Battle("base", "student", 0.0)], models) for a in ("t2i", "edit")},
        battles={"t2i": 1, "edit": 1},
        t2i_grid=(["a circle", "two squares"], {m: img for m in models}),
        edit_grid=(["add a red circle", "remove the blue square"], img, {m: img for m in models}),
        histories=histories or {},
    )


def test_pillar_table_shows_deltas_against_the_anchor():
    header, rows = pillar_rows(_data())
    assert header[:3] == ["model", "Overall", "T2I alignment"]
    assert rows[0][1] == "50.0" and rows[1][1] == "55.5 (+5.5)" and rows[1][3] == "32.0 (+2.0)"
    md = render_markdown(_data())
    assert "| student | 1100 [1050, 1150] | 1100 [1050, 1150] |" in md


def test_report_without_training_histories_leaves_the_curves_out(tmp_path):
    written = {p.name for p in write_report(_data(), tmp_path)}
    assert written == {"elo.png", "grid_t2i.png", "grid_edit.png", "report.md", "report.html"}
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 3
    history = {"history": [{"train/reward": 0.1 * i, "train/loss": 1.0} for i in range(20)],
               "monitor": [{"iteration": 0, "heldout": 0.4}, {"iteration": 20, "heldout": 0.5}]}
    written = {p.name for p in write_report(_data({"student": history}), tmp_path / "with")}
    md = (tmp_path / "with" / "report.md").read_text()
    assert {"curves.png", "rl_curves.png"} <= written and "## Training curves" in md
    assert "## Reward vs judge during training\n\n![Reward vs judge during training](rl_curves.png)" in md
    # an OPD run (a loss, no reward) has training curves but no reward-vs-judge panel
    opd = {"history": [{"train/loss": 1.0 / (i + 1)} for i in range(20)], "monitor": history["monitor"]}
    written = {p.name for p in write_report(_data({"student": opd}), tmp_path / "opd")}
    assert "curves.png" in written and "rl_curves.png" not in written


def _gain(delta, low, high, stderr=0.02):
    return {"delta": delta, "ci_low": low, "ci_high": high, "stderr": stderr}


def test_gains_table_shows_each_interval_and_marks_those_above_zero():
    from flowrl.report import ABOVE, BELOW, gain_rows

    data = _data()
    data.gains = {"student": {"t2i_alignment": _gain(0.084, 0.031, 0.139), "edit_accuracy": _gain(0.02, -0.01, 0.05),
                              "identity": _gain(0.0, 0.0, 0.0, 0.0), "fidelity": _gain(-0.04, -0.07, -0.01)}}
    header, rows = gain_rows(data)
    assert header == ["model", "T2I alignment", "Edit accuracy", "Identity", "Fidelity"]
    assert rows == [["student", f"+0.084 [+0.031, +0.139] {ABOVE}", "+0.020 [-0.010, +0.050]",
                     "+0.000 [+0.000, +0.000]", f"-0.040 [-0.070, -0.010] {BELOW}"]]  # the anchor has no row
    md = render_markdown(data)
    assert "## Gains over base (paired bootstrap 95 % intervals over bench items)" in md
    assert f"| student | +0.084 [+0.031, +0.139] {ABOVE} |" in md


def test_gains_by_category_mark_a_kind_below_the_anchor_by_more_than_its_stderr(tmp_path):
    from flowrl.report import BELOW, group_gain_rows

    data = _data()
    data.group_gains = {"student": {"t2i_alignment/colors": _gain(0.1, 0.0, 0.2, 0.05),
                                    "edit_accuracy/add": _gain(-0.06, -0.1, 0.0, 0.05),
                                    "edit_accuracy/move": _gain(-0.04, -0.1, 0.0, 0.05),
                                    "edit_accuracy/recolor": _gain(0.5, 0.5, 0.5, float("nan"))}}
    assert group_gain_rows(data, "t2i_alignment") == (["model", "colors"], [["student", "+0.100 \u00b1 0.050"]])
    header, rows = group_gain_rows(data, "edit_accuracy")
    assert header == ["model", "add", "move", "recolor"]
    assert rows == [["student", f"-0.060 \u00b1 0.050 {BELOW}", "-0.040 \u00b1 0.050", "+0.500 \u00b1 n/a"]]
    md = render_markdown(data)
    assert "## Edit accuracy gain over base by kind (\u00b1 paired standard error)" in md
    write_report(data, tmp_path)
    assert (tmp_path / "report.html").read_text().count("<table>") == 8  # the six, then gains by category and by kind


def test_elo_table_marks_a_rating_set_by_the_prior_with_its_reason():
    from flowrl.report import FLAG_MARK

    data = _data()
    data.arena_flags = {"t2i": [{"model": "student", "opponent": "base", "outcome": "won_all", "battles": 50},
                                {"model": "base", "opponent": "student", "outcome": "lost_all", "battles": 50}],
                        "edit": []}
    md = render_markdown(data)
    assert f"| student | 1100 [1050, 1150] {FLAG_MARK} | 1100 [1050, 1150] |" in md
    assert (f"{FLAG_MARK} T2I arena: rating set by the prior, its interval too narrow: student: won all 50 battles "
            "against base; base: lost all 50 battles against student.") in md
    assert "Edit arena: rating set" not in md


def test_reward_vs_judge_panels_from_a_real_history_shape(tmp_path):
    """Monitor entries as GRPO writes them (iteration 0 without a training reward, fidelity beside the
    judge): one panel per RL run, in the report."""
    import io

    from PIL import Image

    from flowrl.report import reward_judge_png, rl_runs

    rng = np.random.default_rng(0)
    history = {"history": [{"train/reward": 6.0 + 0.01 * i + 0.05 * rng.standard_normal(), "train/loss": 0.1}
                           for i in range(120)],
               "monitor": [{"iteration": 0, "train_reward": None, "heldout": 0.45, "fidelity": 0.97}]
               + [{"iteration": i, "train_reward": 6.0 + 0.01 * i, "heldout": 0.45 + 0.001 * i, "fidelity": 0.96,
                   **({"hacking": "fidelity fell"} if i == 120 else {})} for i in range(10, 130, 10)]}
    data = _data({"base": history, "student": history})
    assert rl_runs(data) == ["base", "student"]
    png = reward_judge_png(data)
    width, height = Image.open(io.BytesIO(png)).size
    assert width > 2 * height  # two panels side by side
    assert reward_judge_png(_data()) is None


def _round(iterations, reward, judge, eval_every=10):
    """A GRPO history.json of ``iterations`` iterations: a flat training reward at ``reward`` and the
    judge at ``judge`` plus 0.001 per iteration, scored at 0 and every ``eval_every`` iterations."""
    return {"history": [{"train/reward": reward, "train/loss": 0.1} for _ in range(iterations)],
            "monitor": [{"iteration": i, "train_reward": None if i == 0 else reward, "heldout": judge + 0.001 * i,
                         "fidelity": 0.96} for i in range(0, iterations + 1, eval_every)]}


def test_two_rounds_chain_into_one_history_with_round_two_shifted():
    """Round 2 counts from 0 again: its rows follow round 1's 30, its monitor iterations shift by 30, and
    where it began is recorded. One round (or an OPD history) comes back as it was."""
    from flowrl.report import chain_rounds, round_starts

    first, second = _round(30, 6.0, 0.40), _round(20, 2.0, 0.43)
    second["history"][0]["train/reward"] = 2.5
    run = chain_rounds([first, second])
    assert run["rounds"] == [{"round": 1, "start": 0}, {"round": 2, "start": 30}]
    assert len(run["history"]) == 50 and run["history"][30]["train/reward"] == 2.5
    assert [m["iteration"] for m in run["monitor"]] == [0, 10, 20, 30, 30, 40, 50]
    assert run["monitor"][4] == {**second["monitor"][0], "iteration": 30}  # round 2's start, scored again
    assert second["monitor"][0]["iteration"] == 0  # the inputs are left as they were
    assert round_starts(run) == [0, 30]
    opd = {"history": [{"train/loss": 1.0}], "monitor": [{"iteration": 0, "heldout": 0.4}]}
    assert chain_rounds([first]) is first and chain_rounds([opd]) == opd and "rounds" not in opd
    assert round_starts(first) == [0]


def test_reward_changes_per_round_each_continuing_from_the_last():
    """The refreshed reward models score on their own scale: round 2's curve is its own change (6 -> 2 is no
    drop), smoothed within the round and begun where round 1's ended."""
    from flowrl.report import reward_segments

    rewards = [0.1 * i for i in range(30)] + [2.0 + 0.2 * i for i in range(20)]
    history = [{"train/reward": r} for r in rewards]
    (x1, y1), (x2, y2) = reward_segments(history, [0, 30], window=10)
    np.testing.assert_array_equal(x1, np.arange(10, 31))  # the 10-iteration means of round 1 end at 10..30
    np.testing.assert_array_equal(x2, np.arange(40, 51))  # round 2's at 30 + 10..20: none straddles the refresh
    np.testing.assert_allclose(y1[[0, -1]], [0.0, 2.0])  # 0.1 per iteration over 20 means
    np.testing.assert_allclose(y2[[0, -1]], [2.0, 2.0 + 0.2 * 10])  # from where round 1 ended, 0.2 per iteration
    (x, y), = reward_segments(history[:30], [0])
    np.testing.assert_array_equal(x, x1)
    np.testing.assert_allclose(y, y1)
    (a1, m1), (a2, m2) = reward_segments(history, [0, 30], window=10, chained=False)  # curves.png: the levels
    np.testing.assert_array_equal(a2, x2)
    np.testing.assert_allclose([m1[0], m1[-1], m2[0], m2[-1]], [0.45, 2.45, 2.9, 4.9])  # no mean mixes rounds


def test_a_two_round_run_draws_its_reward_vs_judge_panel_and_curves(tmp_path):
    from flowrl.report import chain_rounds, curves_png, reward_judge_png, rl_runs

    run = chain_rounds([_round(30, 6.0, 0.40), _round(20, 2.0, 0.43)])
    data = _data({"student": run, "base": _round(50, 6.0, 0.40)})
    assert rl_runs(data) == ["base", "student"]
    for png in (reward_judge_png(data), curves_png(data)):
        assert png[:4] == b"\x89PNG"
    written = {p.name for p in write_report(data, tmp_path)}
    assert {"curves.png", "rl_curves.png"} <= written


def test_per_category_grids_are_their_own_sections(tmp_path):
    from flowrl.report import Grid, grid_files

    data = _data()
    img = np.zeros((2, 8, 8, 3), np.uint8)
    data.category_grids = {
        "t2i": {"colors": Grid(["a red circle", "a blue square"], {m: img for m in data.models},
                               marks={m: np.array([True, False]) for m in data.models}),
                "two objects": Grid(["a", "b"], {m: img for m in data.models})},
        "edit": {"add": Grid(["add a circle", "add a square"], {m: img for m in data.models}, sources=img)}}
    assert grid_files(data, "t2i") == {"colors": "grid_t2i_colors.png", "two objects": "grid_t2i_two-objects.png"}
    written = {p.name for p in write_report(data, tmp_path)}
    assert {"grid_t2i_colors.png", "grid_t2i_two-objects.png", "grid_edit_add.png"} <= written
    md = (tmp_path / "report.md").read_text()
    assert ("## T2I, category colors: same prompts and seeds across models (frame: green = judged correct, "
            "red = not)\n\n![T2I, category colors: same prompts and seeds across models (frame: green = judged "
            "correct, red = not)](grid_t2i_colors.png)") in md
    assert "## Edits, kind add: same prompts and seeds across models\n" in md
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 6


def test_grid_frames_each_image_by_its_judgement():
    """A model's grid image is framed green when judged correct and red when not; unmarked rows are not."""
    import io

    from PIL import Image

    from flowrl.report import MARK_COLORS, grid_png

    def pixels_near(png: bytes, hex_color: str) -> int:
        rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
        target = np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(rgb - target).sum(-1) < 30).sum())

    img = np.full((2, 8, 8, 3), 255, np.uint8)
    green, red = MARK_COLORS[True], MARK_COLORS[False]
    plain = grid_png(["a", "b"], {"m": img})
    assert pixels_near(plain, green) == 0 and pixels_near(plain, red) == 0
    both = grid_png(["a", "b"], {"m": img}, marks={"m": np.array([True, False])})
    only_green = grid_png(["a", "b"], {"m": img}, marks={"m": np.array([True, True])})
    assert pixels_near(both, green) > 50 and pixels_near(both, red) > 50
    assert pixels_near(only_green, red) == 0 and pixels_near(only_green, green) > 2 * pixels_near(both, green) * 0.9
    data = _data()
    data.grid_marks.update({"t2i": {m: np.array([True, False]) for m in data.models}})
    md = render_markdown(data)
    assert "## T2I: same prompts and seeds across models (frame: green = judged correct, red = not)" in md
    assert "## Edits: source, then each model's result\n" in md


def test_the_recipe_claims_are_checked_on_the_bench_numbers():
    from flowrl.report import recipe_checks

    data = _data()
    data.gains = {
        "t2i_teacher": {"t2i_alignment": _gain(0.12, 0.05, 0.19), "edit_accuracy": _gain(0.0, -0.02, 0.02),
                        "identity": _gain(0.0, 0.0, 0.0), "fidelity": _gain(-0.01, -0.02, 0.0)},
        "edit_teacher": {"t2i_alignment": _gain(0.0, -0.02, 0.02), "edit_accuracy": _gain(0.11, -0.01, 0.2),
                         "identity": _gain(-0.03, -0.05, -0.01), "fidelity": _gain(0.0, -0.01, 0.01)},
        "student": {"t2i_alignment": _gain(0.11, 0.04, 0.18), "edit_accuracy": _gain(0.09, 0.01, 0.17),
                    "identity": _gain(0.0, 0.0, 0.0), "fidelity": _gain(0.0, 0.0, 0.0)},
    }
    data.group_gains = {"edit_teacher": {"edit_accuracy/add": _gain(-0.06, -0.1, 0.0, 0.05),
                                         "edit_accuracy/move": _gain(0.2, 0.1, 0.3, 0.05)}}
    data.ratings = {"t2i": {"base": Rating(1000, 1000, 1000), "student": Rating(1040, 1010, 1070)},
                    "edit": {"base": Rating(1000, 1000, 1000), "student": Rating(1020, 995, 1045)}}
    met = {c["claim"]: c["met"] for c in recipe_checks(data)}
    assert met == {
        "t2i_teacher: t2i_alignment gain, interval above 0": True,
        "t2i_teacher: fidelity kept": True,
        "edit_teacher: edit_accuracy gain, interval above 0": False,  # its interval reaches below 0
        "edit_teacher: fidelity kept": True,
        "edit_teacher: identity kept": False,  # -0.03 is past the 0.02 allowed
        "edit_teacher: no edit kind below base by more than its standard error": False,  # add: -0.06 +- 0.05
        "student: share of t2i_teacher's t2i_alignment gain": True,  # 0.11 of 0.12
        "student: share of edit_teacher's edit_accuracy gain": False,  # 0.09 of 0.11 is 82 %
        "student: T2I arena Elo above base": True,
        "student: Edit arena Elo above base": False,  # its interval starts at 995
    }
    data.gains = {"student": data.gains["student"]}  # the report's tables list the models it benched
    md = render_markdown(data)
    assert "## The recipe's claims on this bench" in md and "| student: T2I arena Elo above base | 1040 [1010, 1070]" in md
    data.gains = {}
    assert recipe_checks(data) == [] and "recipe's claims" not in render_markdown(data)


def test_a_kind_with_one_item_has_no_standard_error_and_is_not_called_below():
    from flowrl.report import recipe_checks

    data = _data()
    data.gains = {"edit_teacher": {"t2i_alignment": _gain(0.0, 0.0, 0.0), "edit_accuracy": _gain(0.2, 0.1, 0.3),
                                   "identity": _gain(0.0, 0.0, 0.0), "fidelity": _gain(0.0, 0.0, 0.0)}}
    data.group_gains = {"edit_teacher": {"edit_accuracy/add": _gain(-1.0, -1.0, -1.0, None),  # rounded NaN
                                         "edit_accuracy/move": _gain(-0.5, -0.5, -0.5, float("nan"))}}
    met = {c["claim"]: c["met"] for c in recipe_checks(data)}
    assert met["edit_teacher: no edit kind below base by more than its standard error"]
