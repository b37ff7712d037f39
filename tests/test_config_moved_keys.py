"""Keys that moved (shared grpo / opd subsections, the pipeline section, one spelling per concept): an earlier
config fails at load with an error naming the old key and the new one, and the moved keys keep their values
and each stage's own defaults."""

import dataclasses

import pytest

from flowrl.config import (
    ConfigError,
    FlowRLConfig,
    LoopConfig,
    OptimConfig,
    RolloutConfig,
    TimestepsConfig,
    WindowTimestepsConfig,
    describe_fields,
    from_dict,
    load_config,
)
from tests.conftest import ROOT

OPTIM = ("lr", "weight_decay", "grad_clip", "ema_decay", "zero_stage", "gradient_checkpointing", "micro_batch")
LOOP = ("iterations", "eval_every", "monitor_per_category", "checkpoint_every", "grid_every")
# (section, old key, a value it took, new key)
MOVED = [
    *[(s, k, v, f"{s}.optim.{k}") for s in ("grpo", "opd")
      for k, v in zip(OPTIM, (1e-3, 0.1, 0.5, 0.9, 1, True, 2))],
    *[(s, k, 4, f"{s}.loop.{k}") for s in ("grpo", "opd") for k in LOOP],
    ("grpo", "timestep_fraction", 0.3, "grpo.timesteps.fraction"),
    ("grpo", "timestep_start", 0.5, "grpo.timesteps.start"),
    ("grpo", "timesteps_per_trajectory", 2, "grpo.timesteps.per_trajectory"),
    ("opd", "timesteps_per_trajectory", 2, "opd.timesteps.per_trajectory"),
    ("opd", "mix_rl", True, "pipeline.mix_rl"),
    ("opd", "offpolicy_ablation", True, "pipeline.offpolicy_ablation"),
    ("annotate", "edits_per_kind", 3, "annotate.edit_per_kind"),
    ("filter", "edits_per_kind", 3, "filter.edit_per_kind"),
    ("grpo", "num_steps", 4, "grpo.rollout.num_steps"),
    ("grpo", "noise_level", 0.5, "grpo.rollout.noise_level"),
    ("grpo", "guidance_scale", 2.0, "grpo.rollout.guidance_scale"),
    ("grpo", "cfg_mode", "both", "grpo.rollout.cfg_mode"),
    ("grpo", "rollout_micro_batch", 2, "grpo.rollout.micro_batch"),
]


@pytest.mark.parametrize("section,old,value,new", MOVED, ids=[f"{s}.{k}" for s, k, _, _ in MOVED])
def test_an_old_key_is_an_error_naming_the_new_one(section, old, value, new):
    with pytest.raises(ConfigError) as caught:
        from_dict(FlowRLConfig, {section: {old: value}})
    assert str(caught.value) == f"{section}.{old}: this key moved; write {new} instead"


@pytest.mark.parametrize("section", ["grpo", "opd"])
def test_timesteps_as_the_old_string_names_the_mode_key(section, tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(f"{section}:\n  timesteps: all\n")
    with pytest.raises(ConfigError, match=rf"old.yaml: {section}.timesteps: 'all' is the earlier shape; timesteps is "
                                          rf"now a subsection: write {section}.timesteps.mode: all$"):
        load_config(path)


def test_an_old_key_given_with_set_is_named_too():
    with pytest.raises(ConfigError, match=r"--set grpo.lr=0.001: grpo.lr: this key moved; write grpo.optim.lr instead"):
        load_config(ROOT / "configs" / "smoke.yaml", ["grpo.lr=0.001"])


def test_a_partial_subsection_keeps_its_stages_own_defaults():
    """opd.loop and opd.timesteps share their classes with grpo but not their defaults: keys left out of a
    subsection keep the stage's default, not the class's."""
    config = from_dict(FlowRLConfig, {"opd": {"loop": {"eval_every": 5}, "timesteps": {"mode": "all"}},
                                      "grpo": {"loop": {"eval_every": 5}}})
    assert config.opd.loop == dataclasses.replace(FlowRLConfig().opd.loop, eval_every=5)
    assert config.opd.loop.iterations == 150 and config.grpo.loop.iterations == 200
    assert config.opd.timesteps == TimestepsConfig(mode="all", per_trajectory=4)
    assert config.grpo.timesteps == WindowTimestepsConfig()
    assert type(config.grpo.optim) is type(config.opd.optim) is OptimConfig
    assert type(config.grpo.loop) is type(config.opd.loop) is LoopConfig
    rows = {key: default for key, default, _ in describe_fields()}  # the reference shows each stage's defaults
    assert rows["opd.loop.iterations"] == "150" and rows["grpo.loop.iterations"] == "200"
    assert rows["opd.timesteps.per_trajectory"] == "4" and rows["grpo.timesteps.per_trajectory"] == "2"


def test_the_subsections_reject_keys_of_the_other_shape():
    with pytest.raises(ConfigError, match=r"opd.timesteps.fraction: unknown key \(allowed: mode, per_trajectory\)"):
        from_dict(FlowRLConfig, {"opd": {"timesteps": {"fraction": 0.5}}})
    with pytest.raises(ConfigError, match=r"grpo.optim.iterations: unknown key"):
        from_dict(FlowRLConfig, {"grpo": {"optim": {"iterations": 3}}})


def test_the_shipped_configs_give_the_moved_keys_their_values():
    import yaml

    shapes = load_config(ROOT / "configs" / "shapes.yaml")
    written = yaml.safe_load((ROOT / "configs" / "shapes.yaml").read_text())
    assert shapes.grpo.loop == LoopConfig(**written["grpo"]["loop"])  # the file's values, under the new keys
    assert shapes.grpo.timesteps == WindowTimestepsConfig(mode="subset", fraction=0.5, start=0.0, per_trajectory=2)
    assert shapes.grpo.optim == OptimConfig(lr=1e-4)
    assert shapes.opd.loop.iterations == 200 and shapes.opd.loop.eval_every == 50
    assert shapes.opd.optim == OptimConfig(lr=1e-4, ema_decay=0.95)
    assert shapes.opd.timesteps == TimestepsConfig(mode="subset", per_trajectory=2)
    assert not shapes.pipeline.mix_rl and not shapes.pipeline.offpolicy_ablation  # the default run: the recipe only
    assert shapes.annotate.edit_per_kind == 300
    smoke = load_config(ROOT / "configs" / "smoke.yaml")
    assert smoke.grpo.timesteps.fraction == 0.7 and smoke.opd.optim.lr == 1e-3 and smoke.opd.loop.iterations == 4
    assert smoke.pipeline.mix_rl and smoke.annotate.edit_per_kind == 2
    assert not FlowRLConfig().pipeline.mix_rl and not FlowRLConfig().pipeline.offpolicy_ablation


@pytest.mark.parametrize("key,value", [("num_steps", 4), ("noise_level", 0.5)])
def test_the_filters_own_sampler_keys_name_grpos_rollout(key, value):
    """The filter's candidates are GRPO's rollout samples: its copies of the sampler's keys are gone, and an
    earlier config that gives them is told which key the filter samples with."""
    with pytest.raises(ConfigError) as caught:
        from_dict(FlowRLConfig, {"filter": {key: value}})
    assert str(caught.value) == (f"filter.{key}: this key was removed; the filter samples its candidates with GRPO's "
                                 f"rollout sampler: write grpo.rollout.{key} instead")


def test_the_rollout_subsection_holds_the_shipped_values_and_hashes_on_its_own():
    """grpo.rollout keeps the values the shipped configs gave GRPO's (and the filter's) sampler; a dotted key
    naming it hashes the subsection alone (the filter stage declares grpo.rollout, not all of grpo)."""
    for name, expected in (("shapes", RolloutConfig()), ("smoke", RolloutConfig(num_steps=3)),
                           ("qwen_image", RolloutConfig(guidance_scale=4.0, micro_batch=4))):
        assert load_config(ROOT / "configs" / f"{name}.yaml").grpo.rollout == expected, name
    base = FlowRLConfig()
    noisier = from_dict(FlowRLConfig, {"grpo": {"rollout": {"noise_level": 1.0}}})
    other = from_dict(FlowRLConfig, {"grpo": {"kl_coef": 0.3}})
    assert noisier.section_hash("grpo.rollout") != base.section_hash("grpo.rollout")
    assert other.section_hash("grpo.rollout") == base.section_hash("grpo.rollout")
    assert other.section_hash("grpo") != base.section_hash("grpo")
    assert set(base.to_dict()["filter"]).isdisjoint({"num_steps", "noise_level", "edits_per_kind"})
