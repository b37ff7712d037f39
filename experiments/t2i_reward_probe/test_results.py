"""The committed results of the T2I reward probe (results/ beside this file) match configs/shapes.yaml and
hold what this study's README.md says of them; each test names the make target that re-measures its file.
Run by `make experiments-test`, not by `make test`: a changed default makes them stale, not the product wrong.
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GRPO_ABLATIONS_RESULTS = ROOT / "experiments" / "grpo_ablations" / "results"
RESULTS = ROOT / "experiments" / "t2i_reward_probe" / "results"


def _name(uri: str) -> str:
    """An artifact URI's last part (its version), whichever root it was written under."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def test_t2i_reward_probe_covers_every_category_of_the_curve_chain():
    """t2i_reward_probe.json (`make experiments/t2i_reward_probe/results/t2i_reward_probe.json`): every T2I category, from the
    base and reward models of the ../grpo_ablations/results/grpo_long.json chain, as the README reads it."""
    from flowrl.shapes.prompts import T2I_CATEGORIES

    probe = json.loads((RESULTS / "t2i_reward_probe.json").read_text())
    long = json.loads((GRPO_ABLATIONS_RESULTS / "grpo_long.json").read_text())["t2i"]
    assert _name(probe["inputs"]["base"]) == _name(long["inputs"]["base"])
    assert _name(probe["inputs"]["reward_model"]) == _name(long["inputs"]["reward_model"])
    assert set(probe["categories"]) == set(T2I_CATEGORIES)
    for category, row in probe["categories"].items():
        assert row["groups"] == probe["per_category"] and 0 <= row["mixed_groups"] <= row["groups"], category
        assert 0.0 <= row["p_right"] <= 1.0
        if row["mixed_groups"]:
            assert 0.0 <= row["auc_in_mixed"] <= 1.0 and 0.0 <= row["top_is_right_in_mixed"] <= 1.0
