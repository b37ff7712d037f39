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
