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


def test_the_summary_keys_on_a_hand_made_run():
    from experiments.algorithms.algorithms import hacking_gap, monitor_curve

    history = [{"time/iteration_s": 2.0, "train/reward": r} for r in (0.1, 0.1, 0.3, 0.5)]
    monitor = [{"iteration": 0, "heldout": 0.50, "train_reward": None, "fidelity": 0.9},
               {"iteration": 2, "heldout": 0.62, "train_reward": 0.1},
               {"iteration": 4, "heldout": 0.58, "train_reward": 0.25}]
    curve = monitor_curve(monitor, history)
    assert [e["train_s"] for e in curve] == [0.0, 4.0, 8.0]
    entry = {"base": {"t2i/alignment": 0.5, "t2i/alignment_stderr": 0.03, "fidelity": 0.95},
             "judge": {"t2i/alignment": 0.6, "t2i/alignment_stderr": 0.04, "fidelity": 0.94},
             "train_rewards": [h["train/reward"] for h in history], "monitor": curve, "train_s": 8.0,
             "iterations": 4}
    s = summary_of(entry, "t2i")
    assert s["judge_gain"] == pytest.approx(0.1) and s["judge_gain_stderr"] == pytest.approx(0.05)
    assert s["fidelity_delta"] == pytest.approx(-0.01) and s["reward_gain"] == 0.0  # < 10 iterations: same mean
    assert s["wall_to_0_10_s"] == 4.0 and s["wall_to_0_15_s"] is None and s["best_monitor_gain"] == pytest.approx(0.12)
    assert s["hacking_gap"] == pytest.approx(0.04)  # the judge fell 0.04 from its best while the reward rose
    # the judge only fell from the base's score while the reward rose: the gap counts from iteration 0
    falling = [{"iteration": 0, "heldout": 0.5, "train_reward": None}, {"iteration": 4, "heldout": 0.4,
                                                                        "train_reward": 0.6}]
    assert hacking_gap(falling, [0.1] * 4) == pytest.approx(0.1)
    assert hacking_gap(falling, [0.9] * 4) == 0.0  # the reward fell too: not hacking
