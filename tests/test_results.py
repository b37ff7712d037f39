"""The committed measurement of the base stage matches the shipped config
and sits in the band issue 2 asks for (re-run it with
`make results/base_shapes.json` after a change that affects it)."""

import json


from flowrl.config import load_config
from flowrl.stages.base import SECTIONS
from tests.conftest import ROOT


def test_base_results_match_config_and_targets():
    results = json.loads((ROOT / "results" / "base_shapes.json").read_text())
    config = load_config(ROOT / "configs" / "shapes.yaml")
    assert results["config_hash"] == config.section_hash(*SECTIONS), "results/base_shapes.json is stale"
    m = results["metrics"]
    assert 0.30 <= m["t2i/alignment"] <= 0.75
    assert 0.20 <= m["edit/accuracy"] <= 0.70
    assert m["fidelity"] >= 0.8
    assert m["wall_s"] <= 12 * 60 and not results["reused"]
    assert results["machine"]["cpu_count"] == 2


def test_reward_model_results_match_config_and_targets():
    from flowrl.stages.reward_model import SECTIONS as RM_SECTIONS

    results = json.loads((ROOT / "results" / "reward_model_shapes.json").read_text())
    config = load_config(ROOT / "configs" / "shapes.yaml")
    assert results["config_hash"] == config.section_hash(*RM_SECTIONS), "results/reward_model_shapes.json is stale"
    m = results["metrics"]
    t2i = m["t2i"]["pointwise_alignment"]
    assert t2i["reference"] == "judge" and t2i["spearman"] >= 0.8  # issue 3's bar, on held-out annotation groups
    assert t2i["heldout_images"] >= 1000
    for task in ("t2i", "edit"):
        for name, entry in m[task].items():
            if name == "split":
                continue
            assert 0.0 < entry["spearman"] <= entry["spearman_ceiling"] + 0.02, (task, name)
            assert entry["pairwise_accuracy"] > 0.5, (task, name)
        assert "pairwise" in m[task] and "unseen_prompt_spearman" in m[task]["pointwise_alignment"]
    assert results["machine"]["cpu_count"] == 2 and not results["reused"]


def test_grpo_results_match_config_and_show_gains():
    """What is claimed in the README for GRPO: both teachers beat the base on
    their task's judge metric (the issue's +0.20 / +0.15 targets are not met
    yet, and this test does not pretend otherwise)."""
    from flowrl.stages.grpo import HEADLINE, SECTIONS as GRPO_SECTIONS

    results = json.loads((ROOT / "results" / "grpo_shapes.json").read_text())
    config = load_config(ROOT / "configs" / "shapes.yaml")
    for task in ("t2i", "edit"):
        entry = results[task]
        assert entry["config_hash"] == config.section_hash(*GRPO_SECTIONS), f"grpo_shapes.json[{task}] is stale"
        m = entry["metrics"]
        assert m["task"] == task and m["iterations"] == config.grpo.iterations and not entry["reused"]
        assert m["teacher"][HEADLINE[task]] > m["base"][HEADLINE[task]]
        per_category = [k for k in m["teacher"] if k.startswith(HEADLINE[task] + "/")]
        assert len(per_category) == (6 if task == "t2i" else 4)
        assert m["wall_s"] > 0 and entry["machine"]["cpu_count"] == 2


def test_opd_results_hold_every_model_and_match_the_config():
    """results/opd_shapes.json (`make results/opd_shapes.json`): the judge on the six models of issue 6."""
    results = json.loads((ROOT / "results" / "opd_shapes.json").read_text())
    config = load_config(ROOT / "configs" / "shapes.yaml")
    meta = results["meta"]
    assert meta["config_hash"] == config.section_hash("run.seed", "world", "sampler", "eval"), "opd_shapes.json is stale"
    assert meta["machine"]["cpu_count"] == 2
    models = ("base", "t2i_teacher", "edit_teacher", "mix_rl", "student", "student_offpolicy")
    assert set(results) == {*models, "meta"}
    stages = {"base": "base", "t2i_teacher": "grpo_t2i", "edit_teacher": "grpo_edit", "mix_rl": "grpo_mixed",
              "student": "opd", "student_offpolicy": "opd_offpolicy"}
    for name in models:
        entry = results[name]
        assert entry["stage"] == stages[name]
        assert set(entry["t2i_alignment_per_category"]) == {
            "single_object", "two_objects", "counting", "colors", "position", "color_attr"}
        assert set(entry["edit_accuracy_per_kind"]) == {"recolor", "remove", "add", "move"}
        for key in ("t2i_alignment", "edit_accuracy", "identity", "fidelity"):
            assert 0.0 <= entry[key] <= 1.0, (name, key)
        assert entry["wall_s"] > 0
    # the judge is deterministic: each entry agrees with what its own stage measured
    base = results["base"]
    assert results["t2i_teacher"]["t2i_alignment"] > base["t2i_alignment"]
    assert results["edit_teacher"]["edit_accuracy"] > base["edit_accuracy"]
    # OPD runs within issue 6's budget
    assert results["student"]["wall_s"] <= 8 * 60 and results["student_offpolicy"]["wall_s"] <= 8 * 60
    # what the committed run reached (issue 6 asks >= 90 % of each teacher's gain; the edit share is
    # reported, not asserted, because it falls short: see the README)
    student = results["student"]
    t2i_gain = results["t2i_teacher"]["t2i_alignment"] - base["t2i_alignment"]
    assert student["t2i_alignment"] - base["t2i_alignment"] >= 0.9 * t2i_gain
    assert student["edit_accuracy"] > base["edit_accuracy"]
    mean = lambda e: (e["t2i_alignment"] + e["edit_accuracy"]) / 2  # noqa: E731
    assert mean(student) > mean(results["mix_rl"])
    # on- vs off-policy is reported, not asserted: in the committed run they are within 0.003 of each other



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
