"""The committed parity result (results/parity.json, `make experiments/refactor_parity/results/parity.json`): the smoke
pipeline of this checkout ended where the reference commit's did, stage by stage, weights included."""

import json
from pathlib import Path

RESULT = Path(__file__).resolve().parent / "results" / "parity.json"
STAGES = {"base", "annotate", "reward_model", "filter_prompts_t2i", "filter_prompts_edit", "grpo_t2i", "grpo_edit",
          "grpo_mixed", "opd", "opd_offpolicy", "bench"}


def test_every_stage_of_the_smoke_pipeline_ends_where_the_reference_did():
    result = json.loads(RESULT.read_text())
    assert len(result["ref"]) == 40 and len(result["head"]) == 40 and result["ref"] != result["head"]
    assert set(result["stages"]) == STAGES
    assert result["differ"] == {}
    # the trained weights themselves were compared, not only the metrics
    assert {"base", "grpo_t2i", "grpo_edit", "opd"} <= set(result["weights_compared"])
