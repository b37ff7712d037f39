"""The committed results of the reward data study (results/ beside this file) come from the default run's reward
models and hold what its README.md says; `make experiments/reward_data_scaling/results/reward_data_scaling.json`
re-measures them (delete results/points/ first). Run by `make experiments-test`, not by `make test`: a changed
default makes them stale, not the product wrong.
"""

import json
from pathlib import Path

import pytest

from experiments.reward_data_scaling.reward_data_scaling import SCORERS
from experiments.reward_data_scaling.summary import AXES, summarize

ROOT = Path(__file__).resolve().parents[2]
HERE = ROOT / "experiments" / "reward_data_scaling"
RESULTS = HERE / "results"
SHARES = (0.125, 0.25, 0.5)


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def _points() -> dict[str, dict]:
    return {p.name: _load(p) for p in sorted((RESULTS / "points").glob("*.json"))}


def test_every_point_is_the_default_config_and_the_whole_is_the_committed_round_one():
    """The whole point scored the reward models results/reward_model_shapes.json names (round1); every share was
    trained by the same stage code on the same config sections (their manifests' hashes)."""
    points = _points()
    assert set(points) == {"whole.json", *(f"{axis}-{share:g}.json" for axis in AXES for share in SHARES)}
    whole = points["whole.json"]
    round1 = _load(ROOT / "results" / "reward_model_shapes.json")["round1"]
    assert whole["reward_model"] == round1["artifact_uri"], "stale: the default run's reward models changed"
    assert whole["config_hash"] == round1["config_hash"] and whole["code_version"] == round1["code_version"]
    for name, point in points.items():
        assert (point["config_hash"], point["code_version"]) == (whole["config_hash"], whole["code_version"]), name
        assert not Path(point["reward_model"]).is_absolute() and not Path(point["annotations"]).is_absolute()
        assert "/work/" not in point["command"] and point["machine"]["cpu_count"] == 2


@pytest.mark.parametrize("axis", AXES)
def test_the_shares_nest_and_keep_the_evaluation_rows(axis):
    """Smaller shares keep fewer texts (texts) or fewer groups of every text (groups); the unseen and held-out
    rows, and so the items each Spearman is taken over, are the whole's."""
    points = _points()
    whole = points["whole.json"]
    previous = None
    for share in SHARES:
        point = points[f"{axis}-{share:g}.json"]
        for task in ("t2i", "edit"):
            kept, full = point["training"][task], whole["training"][task]
            assert kept[f"of_{axis}"] == full[f"of_{axis}"] and kept[axis] < full[axis]
            if axis == "groups":
                assert kept["texts"] == full["texts"]
            assert point["split_rows"][task]["unseen"] == whole["split_rows"][task]["unseen"]
            assert point["split_rows"][task]["heldout"] == whole["split_rows"][task]["heldout"]
            if previous is not None:
                assert kept[axis] > previous["training"][task][axis]
        for name, row in point["scorers"].items():
            for part in ("unseen", "heldout"):
                assert row[part]["items"] == whole["scorers"][name][part]["items"], (name, part)
                assert row[part]["ci_low"] <= row[part]["spearman"] <= row[part]["ci_high"], (name, part)
            assert abs(row["unseen"]["spearman"] - row["stage_unseen_spearman"]) < 1e-9, name  # the stage's own
        previous = point


def test_the_summary_is_the_points(tmp_path):
    """reward_data_scaling.json is what `summarize` makes of the committed points (nothing edited by hand), and
    the whole already trains on every text the grammar allows a reward model."""
    committed = _load(RESULTS / "reward_data_scaling.json")
    names = [Path(p).name for p in committed["points"]]
    paths = [str(RESULTS / "points" / n) for n in names]
    again = summarize(paths, str(tmp_path / "figure.png"), str(ROOT / "configs" / "shapes.yaml"), None)
    assert again["scorers"] == committed["scorers"] and again["training_texts"] == committed["training_texts"]
    assert set(committed["scorers"]) == {f"{t}/{c}" for t, c in SCORERS}
    for name, row in committed["scorers"].items():  # every unseen item belongs to one listed prompt
        prompts = row["unseen_prompts"]
        whole = _load(RESULTS / "points" / "whole.json")["scorers"][name]["unseen"]
        assert sum(p["items"] for p in prompts.values()) == whole["items"] and len(prompts) == whole["units"], name
        assert all(p["category"] is not None for p in prompts.values()), name
    for task, texts in committed["training_texts"].items():
        assert texts["trained_on"] == texts["grammar_allows"], task
    assert (RESULTS / "reward_data_scaling.png").stat().st_size > 10_000


def test_the_readme_quotes_the_measured_numbers():
    """Each scorer's whole-data Spearman and its per-doubling slope on each axis with the slope's interval, as the
    README's table rounds them, are the committed file's."""
    readme = (HERE / "README.md").read_text().split("## Result", 1)[1]
    for name, row in _load(RESULTS / "reward_data_scaling.json")["scorers"].items():
        line = next(line for line in readme.splitlines() if line.startswith(f"| {name} |"))
        assert f"{row['whole_unseen_spearman']:.2f}" in line, name
        for axis in AXES:
            slope, interval = row["axes"][axis]["unseen_per_doubling"], row["axes"][axis]["unseen_per_doubling_interval"]
            assert interval["ci_low"] <= slope <= interval["ci_high"], (name, axis)
            assert f"{slope:+.3f} [{interval['ci_low']:+.3f}, {interval['ci_high']:+.3f}]" in line, (name, axis)
