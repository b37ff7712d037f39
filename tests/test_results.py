"""The committed measurements of the product (results/*.json, results/report.md) are well formed, hold what the
README claims of them, and name the repository's files by relative paths. Whether they still match
configs/shapes.yaml is `make results-check` (results/test_fresh.py): a changed default makes them stale, it does
not fail this suite. The studies' results are checked beside them (`make experiments-test`)."""

import json
import re

import pytest

from tests.conftest import ROOT

PRODUCT = ("base_shapes", "reward_model_shapes", "grpo_shapes", "opd_shapes", "bench_shapes", "reliability",
           "rerun_shapes", "rerun_bench", "planner_validation", "reward_server_bench", "grpo_bench")
# the options of a recorded command that name a file or folder of the repository
PATH_OPTIONS = re.compile(r"--(?:config|results|output|report-dir|reliability-report)[= ](\S+)")


@pytest.mark.parametrize("name", PRODUCT)
def test_product_results_are_json_objects_naming_repository_files_by_relative_paths(name):
    """Every product results file parses to an object; the files its recorded commands and ``config`` name are
    relative to the repository root (a measurement re-runs from any checkout) and under results/ or configs/."""
    results = json.loads((ROOT / "results" / f"{name}.json").read_text())
    assert isinstance(results, dict) and results, name
    commands = [v for k, v in _items(results) if k == "command"]
    for path in [p for c in commands for p in PATH_OPTIONS.findall(c)] + [v for k, v in _items(results) if k == "config"]:
        assert not path.startswith(("/", "~")) and ".." not in path.split("/"), (name, path)
        assert path.split("/")[0] in ("results", "configs", "artifacts"), (name, path)


def _items(value):
    """Every (key, string value) pair of a JSON value, at any depth."""
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(v, str):
                yield k, v
            else:
                yield from _items(v)
    elif isinstance(value, list):
        for v in value:
            yield from _items(v)


def test_the_studies_results_are_not_in_results():
    """results/ holds the product's measurements only; a study writes into experiments/<study>/results/."""
    studies = {p.name for p in (ROOT / "experiments").glob("*/results/*")}
    assert not studies & {p.name for p in (ROOT / "results").iterdir()}


def test_base_results_hold_the_targets():
    results = json.loads((ROOT / "results" / "base_shapes.json").read_text())
    m = results["metrics"]
    assert 0.30 <= m["t2i/alignment"] <= 0.75
    assert 0.20 <= m["edit/accuracy"] <= 0.70
    assert m["fidelity"] >= 0.8
    # the stage's wall time holds its training; how long both take is the machine's (the target of 12 minutes
    # is checked in docs/results.md against the machine that ran it), not a property of the file
    assert 0 < m["train_s"] <= m["wall_s"]


def test_reward_model_results_hold_both_rounds_against_the_labels():
    """results/reward_model_shapes.json (`make results/reward_model_shapes.json`): the first round's reward models
    and those refreshed on both annotation rounds, each scorer measured against the annotators' mean label per
    item, beside its ceiling, on the held-out annotations of seen prompts and of prompts no scorer trained on."""
    results = json.loads((ROOT / "results" / "reward_model_shapes.json").read_text())
    assert set(results) == {"round1", "refreshed"}
    for key, entry in results.items():
        m = entry["metrics"]
        for task in ("t2i", "edit"):
            scorers = {name: e for name, e in m[task].items() if name != "split"}
            assert "pointwise_alignment" in scorers, (key, task)
            for name, e in scorers.items():
                assert e["reference"] == "labels", (key, task, name)
                assert e["heldout_images"] >= 1000, (key, task, name)
                for prefix in ("", "unseen_prompt_"):
                    assert -1.0 <= e[f"{prefix}spearman"] <= 1.0 and 0.0 < e[f"{prefix}spearman_ceiling"] <= 1.0
                assert 0.0 < e["spearman"] <= e["spearman_ceiling"] + 0.02, (key, task, name)
        assert entry["machine"]["cpu_count"] > 0 and entry["artifact_uri"].startswith("artifacts/")
    assert results["refreshed"]["artifact_uri"] != results["round1"]["artifact_uri"]


def test_grpo_results_are_the_second_rounds_of_the_teachers():
    """results/grpo_shapes.json (`make results/grpo_shapes.json`): the teachers of the default run, which with two
    annotation rounds are GRPO's second rounds, continuing the first rounds' weights; each against the base on
    the held-out sets, with the per-category breakdown. What the README claims of them: both teachers above the
    base on their task's judge metric."""
    from flowrl.stages.grpo import HEADLINE

    results = json.loads((ROOT / "results" / "grpo_shapes.json").read_text())
    for task in ("t2i", "edit"):
        entry = results[task]
        m = entry["metrics"]
        assert m["task"] == task and m["iterations"] > 0 and m["round"] == 2
        assert m["init"].startswith(f"artifacts/grpo_{task}/")
        assert m["teacher"][HEADLINE[task]] > m["base"][HEADLINE[task]]
        per_category = [k for k in m["teacher"] if k.startswith(HEADLINE[task] + "/")]
        assert len(per_category) == (6 if task == "t2i" else 4)
        assert m["wall_s"] > 0 and entry["machine"]["cpu_count"] > 0


def test_opd_results_hold_every_model():
    """results/opd_shapes.json (`make results/opd_shapes.json`): the judge on the held-out sets of the default
    run's four models (Mix-RL and off-policy OPD are the study experiments/mixrl_vs_student)."""
    results = json.loads((ROOT / "results" / "opd_shapes.json").read_text())
    models = ("base", "t2i_teacher", "edit_teacher", "student")
    assert set(results) == {*models, "meta"}
    stages = {"base": "base", "t2i_teacher": "grpo_t2i", "edit_teacher": "grpo_edit", "student": "opd"}
    for name in models:
        entry = results[name]
        assert entry["stage"] == stages[name]
        assert set(entry["t2i_alignment_per_category"]) == {
            "single_object", "two_objects", "counting", "colors", "position", "color_attr"}
        assert set(entry["edit_accuracy_per_kind"]) == {"recolor", "remove", "add", "move"}
        for key in ("t2i_alignment", "edit_accuracy", "identity", "fidelity"):
            assert 0.0 <= entry[key] <= 1.0, (name, key)
        assert entry["wall_s"] > 0
    # what the README claims of the committed run (2026-12-02): both teachers above base on their own task,
    # the student above base on both. Issue 6's bars (>= 90 % of each teacher's gain, the student above
    # Mix-RL, OPD within 8 minutes) are reported as missed in the README, not asserted.
    base, student = results["base"], results["student"]
    assert results["t2i_teacher"]["t2i_alignment"] > base["t2i_alignment"]
    assert results["edit_teacher"]["edit_accuracy"] > base["edit_accuracy"]
    assert student["t2i_alignment"] > base["t2i_alignment"] and student["edit_accuracy"] > base["edit_accuracy"]
    # one chain: the judge is deterministic, so the base and the teachers score here what their own stages
    # measured in results/base_shapes.json and results/grpo_shapes.json (same weights, same held-out sets)
    base_run = json.loads((ROOT / "results" / "base_shapes.json").read_text())
    assert base["artifact_uri"] == base_run["artifact_uri"]
    assert base["t2i_alignment"] == base_run["metrics"]["t2i/alignment"]
    assert base["edit_accuracy"] == base_run["metrics"]["edit/accuracy"]
    grpo = json.loads((ROOT / "results" / "grpo_shapes.json").read_text())
    for name, task, key in (("t2i_teacher", "t2i", "t2i_alignment"), ("edit_teacher", "edit", "edit_accuracy")):
        assert results[name]["artifact_uri"] == grpo[task]["artifact_uri"], name
        assert results[name][key] == grpo[task]["metrics"]["teacher"][key.replace("_", "/", 1)], name


def test_reliability_results_cover_every_fault_and_the_bad_input_battery():
    """results/reliability.json (`make results/reliability.json`): each fault scenario of issue 9 with
    the outcome its tests proved, and the bad-input cases tried and passed."""
    results = json.loads((ROOT / "results" / "reliability.json").read_text())
    scenarios = {row["scenario"]: row for row in results["faults"]}
    for needle in ("GRPO run killed", "OPD run killed", "S3 endpoint cut mid-upload", "S3 endpoint down past",
                   "same artifact version at once", "reward server SIGKILLed during GRPO, never back",
                   "reward server SIGKILLed during GRPO, restarted", "MLflow server unreachable", "NaN or inf",
                   "deleted behind the Flyte cache"):
        match = [row for name, row in scenarios.items() if needle in name]
        assert match, f"no scenario {needle!r} in results/reliability.json"
        assert all(row["verified"] and row["passed"] == len(row["tests"]) > 0 for row in match), match
    assert results["bad_input"]["tried"] >= 30 and results["bad_input"]["passed"] == results["bad_input"]["tried"]


def test_bench_results_hold_pillars_arenas_and_gains_of_the_default_run():
    """results/bench_shapes.json (`make results/bench_shapes.json`: a full `make run`, then `flowrl bench` on the
    default run's four models), with the report beside it (results/report.md and its PNGs)."""
    from flowrl.bench import PILLARS

    results = json.loads((ROOT / "results" / "bench_shapes.json").read_text())
    m = results["metrics"]
    names = {"base", "t2i_teacher", "edit_teacher", "student"}
    assert set(m["models"]) == names
    for name, entry in m["models"].items():
        p = entry["pillars"]
        for key in (*PILLARS, "overall"):
            assert 0.0 <= p[key] <= 100.0, (name, key)
        assert abs(p["overall"] - sum(p[k] for k in PILLARS) / len(PILLARS)) < 0.01, name
        assert {k.split("/")[1] for k in p if k.startswith("t2i_alignment/")} == {
            "single_object", "two_objects", "counting", "colors", "position", "color_attr"}
        assert {k.split("/")[1] for k in p if k.startswith("edit_accuracy/")} == {"recolor", "remove", "add", "move"}
        assert not entry["artifact_uri"].startswith("/")
    for arena in ("t2i", "edit"):
        ratings = m["arenas"][arena]
        assert set(ratings) == names, arena
        assert ratings["base"]["rating"] == 1000.0  # the anchor
        for name, r in ratings.items():
            assert r["ci_low"] <= r["rating"] <= r["ci_high"], (arena, name)
        assert m["battles"][arena] == len(names) * (len(names) - 1) // 2 * m["items"][arena]
        assert isinstance(m["arena_flags"][arena], list)
    # the paired bootstrap gains against the base: every other model, every pillar, the point inside its interval
    assert set(m["gains"]) == names - {"base"}
    for name, gains in m["gains"].items():
        assert set(gains) == set(PILLARS), name
        for pillar, g in gains.items():
            assert g["ci_low"] <= g["delta"] <= g["ci_high"] and g["stderr"] >= 0, (name, pillar)
            delta = (m["models"][name]["pillars"][pillar] - m["models"]["base"]["pillars"][pillar]) / 100
            assert abs(g["delta"] - delta) < 1e-3, (name, pillar)
    assert m["gains_bootstrap"]["resampled"].startswith("bench items")
    for f in ("report.md", "report.html"):
        assert (ROOT / "results" / f).is_file()
    report = (ROOT / "results" / "report.md").read_text()
    assert "The recipe's claims on this bench" in report
    for png in re.findall(r"\]\(([^)]+\.png)\)", report):
        assert (ROOT / "results" / png).is_file(), png


def test_second_run_of_the_shapes_pipeline_ran_no_stage():
    """results/rerun_shapes.json (`make results/rerun_shapes.json` after a `make run`): issue 8's second
    `make run` with nothing changed, in at most a minute, every stage a cache hit."""
    results = json.loads((ROOT / "results" / "rerun_shapes.json").read_text())
    assert results["config"] == "configs/shapes.yaml" and results["machine"]["cpu_count"] > 0
    (run,) = results["runs"]
    assert run["stages_run"] == [] and 0 < run["wall_s"] <= 60
