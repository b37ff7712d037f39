"""The model-family registry: both families behind one interface, unknown names refused, and no code
outside flowrl/models/ comparing family names."""

import dataclasses
import inspect
import re
from pathlib import Path

import pytest
import torch

from flowrl.config import ConfigError, load_config
from flowrl.models import create_model, load_policy, save_policy, trainable_module
from flowrl.models.families import (
    ModelFamily, QwenImageFamily, ShapesFamily, family_names, family_of, family_of_model, register_family,
)

ROOT = Path(__file__).resolve().parents[2]
INTERFACE = [name for name, member in vars(ModelFamily).items()
             if inspect.isfunction(member) and not name.startswith("_")]


def test_the_registry_lists_both_families():
    assert family_names()[:2] == ("shapes", "qwen_image") and "sd3" in family_names()
    assert isinstance(family_of("shapes"), ShapesFamily) and isinstance(family_of("qwen_image"), QwenImageFamily)
    assert family_of(load_config(ROOT / "configs" / "shapes.yaml")).name == "shapes"


PRETRAINED_ONLY = ("pretrained_sources", "validate_pretrained")  # what the base stage asks of published weights


@pytest.mark.parametrize("name", ["shapes", "qwen_image", "sd3"])
def test_each_family_implements_the_interface(name):
    family = family_of(name)
    assert family.name == name
    assert {"load_policy", "save_policy", "load_task_views", "trainable_module", "with_trainable", "check_config",
            "planner_figures", "image_size", "model_key"} <= set(INTERFACE)
    for method in INTERFACE:
        if method == "with_trainable":  # one definition for all: the models answer with_trainable themselves
            continue
        if method in PRETRAINED_ONLY and not family.from_pretrained:  # the base stage pretrains it
            continue
        assert getattr(type(family), method) is not getattr(ModelFamily, method), f"{name} lacks {method}"
    for flag in ("has_judge", "from_pretrained", "prompt_files", "model_keys"):
        assert isinstance(getattr(family, flag), bool)
    assert re.fullmatch(r"[\w.]+:\w+", family.reward_factory)


def test_an_unknown_family_is_a_config_error_naming_the_key():
    config = load_config(ROOT / "configs" / "shapes.yaml")
    bad = dataclasses.replace(config, model=dataclasses.replace(config.model, family="sd35"))
    with pytest.raises(ConfigError, match=r"model\.family: 'sd35' is not a registered model family"):
        family_of(bad)
    with pytest.raises(ValueError, match="registered twice"):
        register_family("shapes")(type("Again", (ShapesFamily,), {}))


def test_the_families_facts_are_todays_behaviour():
    config = load_config(ROOT / "configs" / "shapes.yaml")
    shapes, qwen = family_of("shapes"), family_of("qwen_image")
    assert shapes.has_judge and not qwen.has_judge
    assert qwen.from_pretrained and qwen.prompt_files and qwen.model_keys
    assert not (shapes.from_pretrained or shapes.prompt_files or shapes.model_keys)
    assert shapes.image_size(config) == (config.world.resolution,) * 2
    assert qwen.image_size(config) == (config.model.qwen_image.height, config.model.qwen_image.width)
    assert shapes.model_key(config) == {} and qwen.model_key(config) == {"model": config.section_hash("model")}
    g = config.grpo
    assert shapes.reward_request_images(config) == g.prompts_per_iteration * g.group_size
    assert qwen.reward_request_images(config) == g.group_size
    assert shapes.reward_server_kwargs("uri", spread=True) == {}
    assert qwen.reward_server_kwargs("uri", spread=False) == {"prompts_uri": "uri"}
    assert qwen.reward_server_kwargs("uri", spread=True) == {"prompts_uri": "uri", "spread": True}
    # the qwen_image rules run only for its configs: the shapes config passes, as a qwen_image one it fails
    shapes.check_config(config)
    with pytest.raises(ConfigError, match="model.qwen_image.pretrained"):
        qwen.check_config(config)


def test_a_shapes_model_round_trips_and_swaps_its_network(tmp_path, smoke_config):
    tiny_config = load_config(smoke_config)
    model = create_model(tiny_config, seed=0)
    family = family_of_model(model)
    assert family is family_of(tiny_config) and trainable_module(model) is model.net
    save_policy(model, tmp_path / "model")
    loaded = load_policy(tmp_path / "model", tiny_config)
    for a, b in zip(model.net.state_dict().values(), loaded.net.state_dict().values()):
        assert torch.equal(a, b)
    other = torch.nn.Linear(1, 1)
    view = family.with_trainable(model, other)
    assert view.net is other and model.net is not other and trainable_module(view) is other
    views = family.load_task_views(tmp_path / "model", tiny_config)
    assert views["t2i"] is views["edit"]
    with pytest.raises(TypeError, match="no registered family"):
        family_of_model(object())


# a comparison of a family name: `family ==`, `family !=`, `== ... .family`, `.family in (...)`
COMPARISON = re.compile(r"\bfamily\s*[!=]=|[!=]=\s*[\w.]*\bfamily\b|\.family\s+(not\s+)?in\b")


def test_no_family_comparison_outside_the_models_package():
    found = []
    for folder in ("flowrl", "tasks", "pipelines", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path.is_relative_to(ROOT / "flowrl" / "models"):
                continue
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if COMPARISON.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert found == [], "branch on family_of(config) instead:\n" + "\n".join(found)


def test_the_source_check_finds_a_comparison():
    assert COMPARISON.search('    if config.model.family == "qwen_image":')
    assert COMPARISON.search('production = config.model.family != "shapes"')
    assert COMPARISON.search('if "shapes" == cfg.model.family:')
    assert COMPARISON.search('if m.family in ("shapes",):')
    assert not COMPARISON.search('load_checkpoint(d, expected_family="shapes")')
