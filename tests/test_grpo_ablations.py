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


def test_a_variant_overrides_nested_reward_weights_key_by_key():
    """A table variant may set one reward weight (``{"rewards": {"t2i": {"fidelity": 1.0}}}``): the other
    weights keep the config's values, and a misspelt key is refused like in a config file."""
    from experiments.grpo_ablations.grpo_ablations import HOLD_FIDELITY, split_variant, with_section
    from flowrl.config import ConfigError

    config = load_config(ROOT / "configs" / "shapes.yaml")
    changed = with_section(config, "rewards", HOLD_FIDELITY["first_30pct_fidelity1"]["rewards"])
    assert changed.rewards.t2i.fidelity == 1.0 and changed.rewards.t2i.alignment == config.rewards.t2i.alignment
    assert changed.rewards.t2i.quality == config.rewards.t2i.quality and changed.rewards.edit == config.rewards.edit
    assert changed.section_hash("rewards") != config.section_hash("rewards")
    with pytest.raises(ConfigError, match="rewards.t2i.fidelty"):
        with_section(config, "rewards", {"t2i": {"fidelty": 1.0}})
    # a variant that sets only reward weights has no grpo or filter keys
    assert split_variant({"rewards": {"t2i": {"fidelity": 1.0}}}) == ({}, {})
