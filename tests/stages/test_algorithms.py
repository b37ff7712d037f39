"""Algorithms are registered trainers: the stages build theirs from the config's name, so a new one is a
class and a registration (flowrl/rl/algorithms.py)."""

import dataclasses

import pytest

from flowrl.config import ConfigError
from flowrl.rl import algorithms
from flowrl.rl.algorithms import algorithm, algorithm_names, register_algorithm
from flowrl.rl.grpo import GRPOTrainer
from flowrl.rl.opd import OPDTrainer
from flowrl.stages.grpo import run_grpo


def test_the_built_in_algorithms_are_registered_by_kind():
    assert algorithm("grpo", "reward", multitask=True).trainer is GRPOTrainer
    assert algorithm("opd", "distill").trainer is OPDTrainer
    assert set(algorithm_names("reward")) >= {"grpo"} and "opd" not in algorithm_names("reward")


def test_unknown_or_misplaced_algorithms_name_the_config_key():
    with pytest.raises(ConfigError, match=r"grpo.algorithm: 'ppo' is not a registered algorithm.*grpo"):
        algorithm("ppo", "reward")
    with pytest.raises(ConfigError, match=r"grpo.algorithm: 'opd' is a distill algorithm"):
        algorithm("opd", "reward")
    with pytest.raises(ConfigError, match=r"opd.algorithm: 'grpo' is a reward algorithm"):
        algorithm("grpo", "distill")


def test_registration_refuses_what_is_not_a_trainer_and_a_second_class_under_one_name():
    with pytest.raises(TypeError, match="not a LoopTrainer subclass"):
        register_algorithm("not_a_trainer", kind="reward")(dict)
    with pytest.raises(ValueError, match="kind must be one of"):
        register_algorithm("x", kind="supervised")
    with pytest.raises(ValueError, match="registered twice"):
        register_algorithm("grpo", kind="reward")(type("Other", (GRPOTrainer,), {}))


@pytest.fixture
def scaled_grpo(monkeypatch):
    """A new reward algorithm registered by a test alone: GRPO whose every step also logs a marker."""
    monkeypatch.setattr(algorithms, "_REGISTRY", dict(algorithms._REGISTRY))

    @register_algorithm("marked_grpo", kind="reward")
    class MarkedGRPO(GRPOTrainer):
        def step(self, iteration):
            metrics = super().step(iteration)
            return {**metrics, "train/marked": 1.0}

    return MarkedGRPO


def test_a_registered_algorithm_is_what_the_grpo_stage_trains_with(upstream, scaled_grpo, tmp_path):
    _, config, base, rm, prompts = upstream
    chosen = dataclasses.replace(config, grpo=dataclasses.replace(
        config.grpo, algorithm="marked_grpo", loop=dataclasses.replace(config.grpo.loop, iterations=2)))
    result = run_grpo(chosen, "t2i", base.uri, rm.uri, prompts["t2i"].uri, output_root=str(tmp_path), progress=False)
    import json

    from flowrl.storage import fetch

    history = json.loads((fetch(result.uri) / "history.json").read_text())["history"]
    assert [h["train/marked"] for h in history] == [1.0, 1.0]
    # one task at a time: Mix-RL refuses it before any work
    with pytest.raises(ConfigError, match="needs a multitask algorithm"):
        run_grpo(chosen, "mixed", base.uri, rm.uri, {t: prompts[t].uri for t in ("t2i", "edit")},
                 output_root=str(tmp_path), progress=False)


@pytest.mark.bad_input
def test_a_huge_algorithm_name_is_refused_with_a_short_message():
    from flowrl.config import ConfigError
    from flowrl.rl.algorithms import algorithm

    with pytest.raises(ConfigError, match=r"opd\.algorithm: 'xxx.*\(20000 characters\) is not a registered") as err:
        algorithm("x" * 20000, "distill")
    assert len(str(err.value)) < 300
