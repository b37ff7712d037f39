"""experiments/grpo_ablations/grpo_ablations.py refuses bad tables and arguments up front and overrides
reward weights key by key (its committed results are checked by `make experiments-test`)."""

import pytest

from flowrl.config import load_config
from tests.conftest import ROOT


def test_an_ablation_table_of_one_task_refuses_the_other(capsys):
    """The levers tables name one task's categories (sampling weights of T2I categories or edit kinds):
    run on the other task they would fail after minutes of filtering, so they are refused up front."""
    from experiments.grpo_ablations.grpo_ablations import main

    common = ["--base", "unused", "--reward-model", "unused", "--prompts", "unused"]
    for table, task in (("edit_levers", "t2i"), ("levers", "edit"), ("epochs", "edit")):
        with pytest.raises(SystemExit, match=f"--table {table} is a .* table, got --task {task}"):
            main(["--table", table, "--task", task, *common])


def test_a_set_that_names_a_key_the_variant_varies_is_refused():
    """``--set iterations=400`` on the long table would be overridden by the variant's own 800 without a
    word; it is refused up front, naming the key and the variant."""
    from experiments.grpo_ablations.grpo_ablations import main

    common = ["--base", "unused", "--reward-model", "unused", "--prompts", "unused"]
    with pytest.raises(SystemExit, match="--set iterations: the variant levers_800 sets it itself"):
        main(["--table", "long", "--task", "t2i", "--set", "iterations=400", *common])
    with pytest.raises(SystemExit, match="--set cfg_mode: the variant cfg_none sets it itself"):
        main(["--task", "t2i", "--variants", "cfg_none", "--set", "cfg_mode=hybrid", *common])


def test_a_variant_overrides_reward_weights_by_component_name():
    """A table variant may set one reward component's weight (``{"rewards": {"t2i": {"fidelity": 1.0}}}``): the
    other components keep the config's values, and a misspelt component is refused like a bad config key."""
    from experiments.grpo_ablations.grpo_ablations import HOLD_FIDELITY, split_variant, with_reward_weights
    from flowrl.config import ConfigError

    config = load_config(ROOT / "configs" / "shapes.yaml")
    changed = with_reward_weights(config, HOLD_FIDELITY["first_30pct_fidelity1"]["rewards"])
    weights = {c.name: c.weight for c in changed.rewards.t2i}
    assert weights == {**{c.name: c.weight for c in config.rewards.t2i}, "fidelity": 1.0}
    assert [c.name for c in changed.rewards.t2i] == [c.name for c in config.rewards.t2i]  # the same order
    assert changed.rewards.edit == config.rewards.edit
    assert changed.section_hash("rewards") != config.section_hash("rewards")
    with pytest.raises(ConfigError, match="rewards.t2i.fidelty: no such component"):
        with_reward_weights(config, {"t2i": {"fidelty": 1.0}})
    with pytest.raises(ConfigError, match=r"rewards.t2i\[2\].weight: expected float >= 0"):
        with_reward_weights(config, {"t2i": {"fidelity": -1.0}})
    # a variant that sets only reward weights has no grpo or filter keys
    assert split_variant({"rewards": {"t2i": {"fidelity": 1.0}}}) == ({}, {})


def test_recorded_rollout_keys_reach_grpo_rollout_and_the_filter_samples_at_the_files_values():
    """The tables record grpo keys flat (``noise_level``, ``cfg_mode``): they land in grpo.rollout. A variant
    that re-runs the filter samples its candidates at the config file's rollout steps and noise level (the
    filter's own keys when the tables were recorded), and with the variant's CFG."""
    from experiments.grpo_ablations.grpo_ablations import (
        HOLD_FIDELITY,
        filter_view,
        nested_grpo_keys,
        split_variant,
        with_grpo,
    )

    common = {"rollout": {"micro_batch": 2}}
    assert nested_grpo_keys({**common, "cfg_mode": "none", "rollout_micro_batch": 4, "kl_coef": 0.3}) == {
        "rollout": {"micro_batch": 4, "cfg_mode": "none"}, "kl_coef": 0.3}
    assert common == {"rollout": {"micro_batch": 2}}  # the caller's mapping is left as it was
    config = load_config(ROOT / "configs" / "shapes.yaml")
    grpo_keys, filter_keys = split_variant(HOLD_FIDELITY["first_30pct_kl03_noise1"])
    variant = with_grpo(config, {**grpo_keys, "cfg_mode": "both"})
    assert variant.grpo.rollout.noise_level == 1.0 and variant.grpo.timesteps.fraction == 0.3
    assert filter_keys and config.grpo.rollout.noise_level == 0.7
    view = filter_view(config, variant)
    assert view.grpo.rollout.noise_level == 0.7 and view.grpo.rollout.num_steps == config.grpo.rollout.num_steps
    assert view.grpo.rollout.cfg_mode == "both" and view.grpo.kl_coef == variant.grpo.kl_coef
    assert filter_view(config, config) == config
