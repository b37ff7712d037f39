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
    assert "curves.png" in written and "## Training curves" in (tmp_path / "with" / "report.md").read_text()


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
