"""The committed results of the fidelity probe (results/ beside this file) match configs/shapes.yaml and
hold what this study's README.md says of them; each test names the make target that re-measures its file.
Run by `make experiments-test`, not by `make test`: a changed default makes them stale, not the product wrong.
"""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "fidelity_probe" / "results"
GRPO_ABLATIONS_RESULTS = ROOT / "experiments" / "grpo_ablations" / "results"


def _name(uri: str) -> str:
    """An artifact URI's last part (its version), whichever root it was written under."""
    return uri.rstrip("/").rsplit("/", 1)[-1]


def test_fidelity_probe_reads_the_kl_long_run_on_both_reward_models():
    """fidelity_probe.json (`make experiments/fidelity_probe/results/fidelity_probe.json`): the base and checkpoints of the KL 0.3
    long run, judged as the GRPO stage judged them (same held-out T2I set and seeds: the same T2I fidelity as
    the tables' base, the 400-iteration KL 0.3 run and the 800-iteration one), each reward model's components,
    and every reward component ranked against every judge term."""
    from flowrl.shapes.judge import FIDELITY_SCALES

    probe = json.loads((RESULTS / "fidelity_probe.json").read_text())
    windows = json.loads((GRPO_ABLATIONS_RESULTS / "grpo_windows.json").read_text())["t2i"]
    hold = json.loads((GRPO_ABLATIONS_RESULTS / "grpo_hold_fidelity.json").read_text())["t2i"]
    long = json.loads((GRPO_ABLATIONS_RESULTS / "grpo_kl_long.json").read_text())["t2i"]
    cast = json.loads((GRPO_ABLATIONS_RESULTS / "grpo_cast_rm.json").read_text())["t2i"]
    assert set(probe["models"]) == {"base", "kl03_it100", "kl03_it400", "kl03_it800"}
    assert _name(probe["inputs"]["base"]) == _name(windows["inputs"]["base"])
    assert set(probe["inputs"]["reward_models"]) == {"shipped", "cast"}
    assert _name(probe["inputs"]["reward_models"]["shipped"]) == _name(windows["inputs"]["reward_model"])
    assert _name(probe["inputs"]["reward_models"]["cast"]) == _name(cast["inputs"]["reward_model"])
    judged = {"base": windows["base"], "kl03_it400": hold["variants"]["first_30pct_kl03"]["judge"],
              "kl03_it800": long["variants"]["first_30pct_kl03_800"]["judge"]}
    for name, entry in probe["models"].items():
        assert set(entry["terms"]) == set(FIDELITY_SCALES)
        assert {k.split("/")[0] for k in entry["rewards"]} == {"shipped", "cast"}, name
        if name in judged:
            assert entry["fidelity"] == pytest.approx(judged[name]["t2i/fidelity"], abs=1e-3), name
    for component, row in probe["rank_agreement"].items():
        assert set(row) == set(FIDELITY_SCALES), component
        assert all(v is None or -1 <= v <= 1 for v in row.values()), component
