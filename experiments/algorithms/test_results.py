"""The committed results of the algorithms study (results/algorithms_shapes.json, made by
`make results/algorithms_shapes.json` with experiments/algorithms/algorithms.py) hold every variant on both tasks,
each run to the same wall-clock budget on the same inputs, and its numbers follow from the runs file beside this
study. Run by `make experiments-test`, not by `make test`: a changed default makes them stale, not the product wrong.
"""

import json
from pathlib import Path

import pytest

from experiments.algorithms.algorithms import VARIANTS, summary_of
from flowrl.config import load_config
from flowrl.stages.grpo import SECTIONS as GRPO_SECTIONS

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "algorithms_shapes.json"
KEYS = {"judge_gain", "judge_gain_stderr", "reward_gain", "hacking_gap", "fidelity_delta", "wall_s",
        "wall_to_0_10_s", "wall_to_0_15_s"}


@pytest.fixture(scope="module")
def results():
    return json.loads(RESULTS.read_text())


@pytest.fixture(scope="module")
def runs(results):
    return json.loads((ROOT / results["runs"]).read_text())


def test_every_variant_ran_on_both_tasks_with_the_issue_keys(results):
    assert set(results["variants"]) == set(VARIANTS)
    for name, by_task in results["variants"].items():
        assert set(by_task) == {"t2i", "edit"}, name
        for task, entry in by_task.items():
            assert KEYS <= set(entry), (name, task)
    assert (ROOT / results["plot"]).is_file()
    assert not any(str(v).startswith("/") for v in json.dumps(results).split('"') if "artifacts" in str(v))


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_runs_share_inputs_and_budget_and_match_the_summary(results, runs, task):
    table = runs[task]
    config = load_config(ROOT / "configs" / "shapes.yaml")
    assert table["config_hash"] == config.section_hash(*GRPO_SECTIONS), "algorithms_shapes.json is stale"
    budget = table["budget_s"]
    for name, entry in table["variants"].items():
        assert entry["grpo"] == VARIANTS[name], name
        assert entry["base"] == table["base"], name  # one base, judged the same for every variant
        # each stopped on the budget (overshooting by at most its last iteration), none ran out of iterations
        assert entry["stopped_early"].startswith("time budget"), name
        assert budget <= entry["train_s"] < budget * 1.2, name
        assert summary_of(entry, task) == results["variants"][name][task], name
