"""The config loader rejects bad input with the full key path, before any work."""

import json
from pathlib import Path

import pytest

from flowrl.config import ConfigError, FlowRLConfig, describe_fields, from_dict, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["shapes.yaml", "smoke.yaml", "qwen_image.yaml"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert isinstance(config, FlowRLConfig)


def test_yaml_maps_one_to_one():
    config = load_config(CONFIGS / "shapes.yaml")
    assert config.base.lr == 1e-3 and isinstance(config.base.lr, float)
    assert config.model.shapes.width == 128
    with pytest.raises(AttributeError):
        config.base.lr = 2.0  # frozen


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "data,message",
    [
        ({"base": {"lr": "fast"}}, "base.lr: expected float > 0, got 'fast'"),
        ({"base": {"lr": -1.0}}, "base.lr: expected float > 0, got -1.0"),
        ({"base": {"steps": 1.5}}, "base.steps: expected int >= 1, got 1.5"),
        ({"base": {"steps": True}}, "base.steps: expected int >= 1, got True"),
        ({"base": {"ema_decay": 1.0}}, "base.ema_decay: expected float in [0, 1), got 1.0"),
        ({"base": {"edit_fraction": 1.5}}, "base.edit_fraction: expected float in [0, 1], got 1.5"),
        ({"base": {"lrr": 1}}, "base.lrr: unknown key"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"model": {"shapes": {"depth": "six"}}}, "model.shapes.depth: expected int >= 1, got 'six'"),
        ({"model": {"family": "sdxl"}}, "model.family: expected one of ['shapes', 'qwen_image', 'sd3'], got 'sdxl'"),
        ({"world": {"resolution": 48}}, "world.resolution: expected one of [32, 64], got 48"),
        ({"sampler": {"cfg_renorm": "yes"}}, "sampler.cfg_renorm: expected bool, got 'yes'"),
        ({"base": 3}, "base: expected a mapping, got 3"),
        ({"base": {"lr": float("nan")}}, "base.lr: expected float > 0, got nan"),
        ({"base": {"lr": float("inf")}}, "base.lr: expected float > 0, got inf"),
        ({"run": {"name": ""}}, "run.name: expected a non-empty string, got ''"),
        ({"run": {"artifact_root": "  "}}, "run.artifact_root: expected a non-empty string"),
        ({"run": {"torch_threads": 0}}, "run.torch_threads: expected int >= 1, got 0"),
        ({"base": {True: 1, "lr": 0.1}}, "base.True: unknown key"),
    ],
)
def test_bad_values_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        from_dict(FlowRLConfig, data)
    assert str(err.value).startswith(message)


def test_cross_key_rules(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  shapes:\n    width: 100\n    heads: 3\n")
    with pytest.raises(ConfigError, match=r"model.shapes.heads: 3 does not divide model.shapes.width 100"):
        load_config(path)
    path.write_text("model:\n  family: qwen_image\n")
    with pytest.raises(ConfigError, match="model.qwen_image.pretrained: required"):
        load_config(path)
    path.write_text("model:\n  shapes:\n    width: 40\n    heads: 4\n")
    with pytest.raises(ConfigError, match=r"model.shapes.heads: head size width/heads = 10 must be a multiple of 4"):
        load_config(path)
    path.write_text("model:\n  shapes:\n    patch: 5\n")
    with pytest.raises(ConfigError, match="model.shapes.patch: 5 does not divide world.resolution 32"):
        load_config(path)


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "text,message",
    [("", "config file is empty"), ("base: [1, 2\n", "invalid YAML"), ("- 1\n- 2\n", "config: expected a mapping")],
)
def test_bad_files(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value)


@pytest.mark.bad_input
def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_every_field_is_documented():
    rows = describe_fields()
    assert len(rows) > 30
    undocumented = [key for key, _, doc in rows if not doc]
    assert not undocumented


def test_section_hash_tracks_only_its_sections():
    a = from_dict(FlowRLConfig, {})
    b = from_dict(FlowRLConfig, {"base": {"lr": 0.01}})
    c = from_dict(FlowRLConfig, {"run": {"artifact_root": "elsewhere"}})
    assert a.section_hash("base") != b.section_hash("base")
    assert a.section_hash("model") == b.section_hash("model")
    assert a.section_hash("run.seed", "base") == c.section_hash("run.seed", "base")


@pytest.mark.parametrize(
    "text,message",
    [
        ("grpo:\n  rollout: {num_steps: 10}\n  timesteps:\n    fraction: 0.2\n    per_trajectory: 3\n",
         "grpo.timesteps.per_trajectory: 3 is more than the 2 steps"),
        ("grpo:\n  timesteps: {start: 0.6, fraction: 0.5}\n",
         "grpo.timesteps.start: 0.6 \\+ grpo.timesteps.fraction"),
        ("grpo:\n  timesteps: {start: 1.0}\n", "grpo.timesteps.start"),
        ("grpo:\n  prompts_per_iteration: 6\n  reward_chunks: 4\n", "grpo.reward_chunks: 4 does not divide"),
        ("grpo:\n  prompts_per_iteration: 6\n  reward_chunks: 1\n  minibatches: 4\n", "grpo.minibatches: 4 does not divide"),
        ("grpo:\n  rollout: {cfg_mode: sometimes}\n", "grpo.rollout.cfg_mode"),
        ("filter:\n  threshold_mode: quantile\n  threshold: 1.5\n", "filter.threshold: a quantile must be below 1"),
        ("grpo:\n  optim: {zero_stage: 4}\n", "grpo.optim.zero_stage"),
        ("filter:\n  threshold_scope: per_cat\n", "filter.threshold_scope"),
        ("grpo:\n  balance_categories: maybe\n", "grpo.balance_categories"),
        ("annotate:\n  degradations: []\n", "annotate.degradations: name at least one"),
        ("annotate:\n  degradations: [noise, tint]\n", "annotate.degradations\\[1\\]: expected one of"),
        ("grpo:\n  kl_anchor_coef: 3.0\n", "grpo.kl_anchor_coef: 3.0 weighs the KL on anchor steps, and there are none"),
        ("grpo:\n  kl_coef: 0.1\n  kl_anchor_steps: 4\n  timesteps: {mode: all}\n  kl_anchor_coef: 1.0\n",
         "grpo.timesteps.mode: subset \\(got all\\)"),
        ("grpo:\n  kl_coef: 0.1\n  kl_anchor_steps: 4\n  kl_anchor_coef: -1.0\n", "grpo.kl_anchor_coef"),
        ("grpo:\n  trainable: ['blocks.*']\n  optim: {zero_stage: 2}\n",
         "grpo.trainable: \\['blocks.\\*'\\] trains a subset of the parameters, which grpo.optim.zero_stage = 2"),
    ],
)
def test_rl_cross_key_rules(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_overrides_replace_single_keys_of_the_file():
    path = CONFIGS / "shapes.yaml"
    plain = load_config(path)
    changed = load_config(path, ["annotate.degradations=[noise, color_cast]", "grpo.loop.iterations=7",
                                 "grpo.reward_url=null"])
    assert changed.annotate.degradations == ("noise", "color_cast") and changed.grpo.loop.iterations == 7
    assert changed.grpo.reward_url is None
    assert changed.grpo.group_size == plain.grpo.group_size and changed.base == plain.base
    assert changed.section_hash("annotate") != plain.section_hash("annotate")
    assert changed.section_hash("base") == plain.section_hash("base")
    # the cross-key rules see the merged config
    with pytest.raises(ConfigError, match="grpo.kl_anchor_coef"):
        load_config(path, ["grpo.kl_coef=0", "grpo.kl_anchor_coef=1.0"])


def test_keys_added_later_are_left_out_of_the_hash_at_their_defaults():
    from flowrl.config import AnnotateConfig, GRPOConfig, _hash_payload

    assert "degradations" not in _hash_payload(AnnotateConfig())
    assert "kl_anchor_coef" not in _hash_payload(GRPOConfig())
    assert "trainable" not in _hash_payload(GRPOConfig())
    assert _hash_payload(GRPOConfig(trainable=("blocks.*",)))["trainable"] == ["blocks.*"]
    assert "degradations" in _hash_payload(AnnotateConfig(degradations=("color_cast",)))


def test_a_key_added_later_leaves_the_hash_alone_at_its_default():
    import dataclasses

    from flowrl.config import FlowRLConfig

    config = FlowRLConfig()
    other = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, sampling_weights=("move=3",)))
    assert config.section_hash("grpo") != other.section_hash("grpo")
    payload_keys = json.loads(json.dumps(dataclasses.asdict(config.grpo)))
    assert "sampling_weights" in payload_keys  # it exists, it just does not count at its default
    from flowrl.config import _hash_payload

    assert "sampling_weights" not in _hash_payload(config.grpo)
    assert _hash_payload(other.grpo)["sampling_weights"] == ["move=3"]


def test_the_second_annotation_round_draws_prompts_of_its_own(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("annotate:\n  seed: 5\n  policy_round:\n    seed: 5\n")
    with pytest.raises(ConfigError, match="annotate.policy_round.seed: 5 is annotate.seed too"):
        load_config(path)
