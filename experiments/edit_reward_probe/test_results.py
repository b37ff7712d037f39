"""The committed results of the edit reward probe (results/ beside this file) match configs/shapes.yaml and
hold what this study's README.md says of them; each test names the make target that re-measures its file.
Run by `make experiments-test`, not by `make test`: a changed default makes them stale, not the product wrong.
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "edit_reward_probe" / "results"


def test_edit_reward_prefers_the_ideal_edit_to_a_noop_on_unseen_texts():
    """edit_reward_probe.json (`make experiments/edit_reward_probe/results/edit_reward_probe.json`), what the README's bench
    section says of it: on both splits the edit reward of the committed reward models scores the ideal
    output above a no-op for every item."""
    results = json.loads((RESULTS / "edit_reward_probe.json").read_text())
    rm = json.loads((ROOT / "results" / "reward_model_shapes.json").read_text())
    assert results["reward_model"] == rm["artifact_uri"] and results["config"] == "configs/shapes.yaml"
    for split in ("train", "bench"):
        kinds = results["splits"][split]
        assert set(kinds) == {"recolor", "remove", "add", "move"}, split
        for kind, row in kinds.items():
            assert row["items"] == results["per_kind"] and row["ideal"] > row["noop"], (split, kind)
            assert row["noop_at_least_ideal"] == 0.0, (split, kind)
