"""The committed product measurements (results/*.json) were made on configs/shapes.yaml as it is now: each
section hash they record equals the current config's. Run by `make results-check`, not by `make test`: after a
change of a default these fail, naming the file and its make target, until the file is re-measured."""

import json
from pathlib import Path

from flowrl.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _results(name: str) -> dict:
    return json.loads((ROOT / "results" / name).read_text())


def _config():
    return load_config(ROOT / "configs" / "shapes.yaml")


def test_base_results_are_fresh():
    from flowrl.stages.base import SECTIONS

    assert _results("base_shapes.json")["config_hash"] == _config().section_hash(*SECTIONS), \
        "results/base_shapes.json is stale: make results/base_shapes.json"


def test_reward_model_results_are_fresh():
    from flowrl.stages.reward_model import SECTIONS, first_round_config

    results = _results("reward_model_shapes.json")
    # a first-round model hashes the config without the refresh's steps (it does not depend on them)
    for key, config in (("round1", first_round_config(_config())), ("refreshed", _config())):
        assert results[key]["config_hash"] == config.section_hash(*SECTIONS), \
            f"results/reward_model_shapes.json[{key}] is stale: make results/reward_model_shapes.json"


def test_grpo_results_are_fresh():
    from flowrl.stages.grpo import SECTIONS, round_config

    config, results = _config(), _results("grpo_shapes.json")
    for task in ("t2i", "edit"):
        m = results[task]["metrics"]
        # a round of GRPO (configs/shapes.yaml runs two annotation rounds) hashes the config as that round runs it
        run = round_config(config, m.get("round") or None, m.get("init") or None)
        assert results[task]["config_hash"] == run.section_hash(*SECTIONS), \
            f"results/grpo_shapes.json[{task}] is stale: make results/grpo_shapes.json"
        assert m["iterations"] == run.grpo.loop.iterations, task


def test_opd_results_are_fresh():
    meta = _results("opd_shapes.json")["meta"]
    assert meta["config_hash"] == _config().section_hash("run.seed", "world", "sampler", "eval"), \
        "results/opd_shapes.json is stale: make results/opd_shapes.json"


def test_bench_results_are_fresh():
    from flowrl.stages.bench import SECTIONS

    assert _results("bench_shapes.json")["config_hash"] == _config().section_hash(*SECTIONS), \
        "results/bench_shapes.json is stale: make results/bench_shapes.json"
