"""Rewards as a list of components: the config shape (and the error for the earlier one), the registry
of scorer types, and the one loader every family goes through, which builds the same composites as
the per-family loaders did before it (components, order, weights, scores)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from flowrl.config import ConfigError, FlowRLConfig, RewardComponent, RewardsConfig, describe_fields, from_dict
from flowrl.config import load_config
from flowrl.rewards import registry
from flowrl.rewards.composite import CompositeReward, shapes_category
from flowrl.rewards.identity import ShapesIdentityScorer
from flowrl.rewards.production import LazyVLMScorer, load_production_rewards
from flowrl.rewards.registry import load_rewards, load_task_rewards, register_scorer, scorer_type
from flowrl.rewards.shapes_rewards import ScorerReward, load_shapes_rewards
from flowrl.rewards.shapes_scorer import ScorerArch, ShapesScorer
from flowrl.shapes import make_edit_set, make_t2i_set, render_batch
from flowrl.storage import ArtifactError
from tests.conftest import ROOT
from tests.rewards.fake_rewards import BrightnessReward

CONFIGS = ROOT / "configs"
SHAPES_CRITERIA = (("t2i", "alignment"), ("t2i", "quality"), ("t2i", "fidelity"), ("edit", "alignment"))


@pytest.fixture(scope="module")
def shapes_artifact(tmp_path_factory) -> Path:
    """A reward_model artifact of tiny random shapes scorers, laid out as the stage writes it."""
    root = tmp_path_factory.mktemp("shapes_rm")
    for i, (task, criterion) in enumerate(SHAPES_CRITERIA):
        torch.manual_seed(10 + i)
        ShapesScorer(ScorerArch(width=16, depth=1, heads=2, patch=8), 32).save(root / task / f"pointwise_{criterion}")
    return root


@pytest.fixture(scope="module")
def vlm_artifact(tmp_path_factory) -> Path:
    """Scorer directories of a vlm reward_model artifact (a config.json each: LazyVLMScorer loads nothing
    until its first use, so the composite's structure needs no weights)."""
    root = tmp_path_factory.mktemp("vlm_rm")
    for task, name in (*SHAPES_CRITERIA, ("t2i", "pairwise")):
        directory = root / task / (name if name == "pairwise" else f"pointwise_{name}")
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")
    return root


@pytest.fixture(autouse=True)
def local_fetch(monkeypatch):
    """The artifact URIs of these tests are local directories."""
    monkeypatch.setattr(registry, "fetch", lambda uri: Path(uri))


@pytest.fixture
def brightness_type():
    """A scorer type registered by the test (and removed after it)."""
    seen = []

    @register_scorer("brightness", takes_device=True)
    def build(request):
        seen.append(request)
        return BrightnessReward(prompt_weight=0.0)

    yield seen
    registry._SCORERS.pop("brightness")


def _shapes_batches():
    t2i, edits = make_t2i_set(2, 1), make_edit_set(2, 1)
    return ((render_batch([e.scene for e in t2i], 32), [e.prompt for e in t2i], None),
            (render_batch([e.target for e in edits], 32), [e.instruction for e in edits],
             render_batch([e.source for e in edits], 32)))


# --------------------------------------------------------------------------- config shape


def test_the_shipped_configs_round_trip_and_the_shapes_ones_are_the_defaults():
    for name in ("smoke", "shapes", "qwen_image"):
        config = load_config(CONFIGS / f"{name}.yaml")
        assert from_dict(FlowRLConfig, config.to_dict()) == config
        as_yaml = yaml.safe_dump(json.loads(json.dumps({"rewards": config.to_dict()["rewards"]})))
        assert from_dict(FlowRLConfig, yaml.safe_load(as_yaml)).rewards == config.rewards  # as a file writes it
    assert load_config(CONFIGS / "smoke.yaml").rewards == RewardsConfig()
    assert load_config(CONFIGS / "shapes.yaml").rewards == RewardsConfig()
    default, rows = RewardsConfig().weights("t2i")
    assert default == {"alignment": 1.0, "quality": 0.25, "fidelity": 0.5} and rows == {}
    assert RewardsConfig().weights("edit") == ({"instruction": 1.0, "identity": 0.5}, {})


def test_per_category_weights_live_on_the_components():
    """A category one component names takes the other components' default weight."""
    rewards = RewardsConfig(t2i=(
        RewardComponent(name="alignment", weight=1.0, categories=("counting=2", "position=0.5")),
        RewardComponent(name="quality", weight=0.25, categories=("counting=0",)),
        RewardComponent(name="fidelity", weight=0.5),
    ))
    default, rows = rewards.weights("t2i")
    assert list(default) == ["alignment", "quality", "fidelity"]
    assert rows == {"counting": {"alignment": 2.0, "quality": 0.0, "fidelity": 0.5},
                    "position": {"alignment": 0.5, "quality": 0.25, "fidelity": 0.5}}
    assert list(rows["counting"]) == ["alignment", "quality", "fidelity"]  # component order


@pytest.mark.bad_input
@pytest.mark.parametrize("override,message", [
    ("rewards.t2i={alignment: 1.0, quality: 0.25, fidelity: 0.5}",
     r"rewards.t2i: a mapping of weights is the earlier shape; rewards.t2i is now a list of components .*"
     r"here: \[\{name: alignment, scorer: learned, weight: 1.0\}, \{name: quality, scorer: learned, weight: 0.25\}"),
    ("rewards.edit={instruction: 1.0, identity: 0.0}",
     r"rewards.edit: .*earlier shape.*\[\{name: instruction, scorer: learned, criterion: alignment, weight: 1.0\}, "
     r"\{name: identity, scorer: identity, weight: 0.0\}\]"),
    ("rewards.t2i_categories={counting: {alignment: 2.0}}",
     r"rewards.t2i_categories: per-category weights moved into the components of rewards.t2i: .*"
     r"categories: \[counting=2.0\]"),
    ("rewards.edit_kinds={move: {instruction: 2.0}}", r"rewards.edit_kinds: .*components of rewards.edit"),
    ("rewards.t2i=[{name: alignment, categories: {counting: 2}}]",
     r"rewards.t2i\[0\].categories: expected a list of CATEGORY=WEIGHT entries, here \[counting=2\]"),
])
def test_the_earlier_shape_is_refused_naming_the_new_key_and_showing_the_new_shape(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "shapes.yaml", [override])


@pytest.mark.bad_input
@pytest.mark.parametrize("override,message", [
    ("rewards.t2i=[]", r"rewards.t2i: give at least one component"),
    ("rewards.t2i=[{weight: 1}]", r"rewards.t2i\[0\].name: required"),
    ("rewards.t2i=[{name: ../x}]", r"rewards.t2i\[0\].name: .* is not a safe name"),
    ("rewards.edit=[{name: a, criterion: alignment}, {name: a, scorer: identity}]",
     r"rewards.edit\[1\].name: 'a' is given twice"),
    ("rewards.t2i=[{name: alignment, weight: 0}]", r"rewards.t2i: every weight is zero"),
    ("rewards.t2i=[{name: alignment, categories: [counting=0]}]", r"rewards.t2i: every weight of category 'counting'"),
    ("rewards.t2i=[{name: alignment, categories: [counting=x]}]",
     r"rewards.t2i\[0\].categories\[0\]: expected CATEGORY=WEIGHT with a weight >= 0, got 'counting=x'"),
    ("rewards.t2i=[{name: alignment, categories: [counting=1, counting=2]}]",
     r"rewards.t2i\[0\].categories\[1\]: category 'counting' is given twice"),
    ("rewards.t2i=[{name: alignment, weight: -1}]", r"rewards.t2i\[0\].weight: expected float >= 0"),
    ("rewards.t2i=[{name: alignment, scorer: lerned}]",
     r"rewards.t2i\[0\].scorer: unknown scorer type 'lerned' \(registered: learned, identity"),
    ("rewards.t2i=[{name: sharpness}]",
     r"rewards.t2i\[0\]: a learned scorer of name 'sharpness' .*reward_model.t2i_criteria"),
    ("rewards.t2i=[{name: id, scorer: identity}]", r"rewards.t2i\[0\].scorer: the identity scorer compares an edit"),
    ("rewards.edit=[{name: id, scorer: identity, criterion: alignment}]",
     r"rewards.edit\[0\].criterion: the identity scorer takes no criterion"),
])
def test_bad_components_fail_at_load_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "shapes.yaml", [override])


@pytest.mark.bad_input
def test_a_scorer_type_a_family_lacks_fails_at_load():
    with pytest.raises(ConfigError, match=r"rewards.edit\[1\].scorer: the identity scorer has no model for "
                                          r"model.family qwen_image \(it has one for shapes\)"):
        load_config(CONFIGS / "qwen_image.yaml", ["rewards.edit=[{name: instruction, criterion: alignment}, "
                                                   "{name: identity, scorer: identity, weight: 0}]"])


def test_the_config_reference_documents_each_component_key():
    rows = {key: (default, doc) for key, default, doc in describe_fields()}
    for task in ("t2i", "edit"):
        for key in ("name", "scorer", "criterion", "weight", "categories", "gate"):
            assert rows[f"rewards.{task}[].{key}"][1], (task, key)
    assert rows["rewards.edit"][0] == ("({name: instruction, scorer: learned, criterion: alignment, weight: 1.0}, "
                                       "{name: identity, scorer: identity, weight: 0.5, gate: instruction})")
    assert "rewards.t2i_categories" not in rows and "rewards.t2i.alignment" not in rows


# --------------------------------------------------------------------------- the registry


def test_an_unknown_scorer_type_names_the_key():
    with pytest.raises(ConfigError, match=r"rewards.t2i\[3\].scorer: unknown scorer type 'nope' \(registered: "):
        scorer_type("nope", "rewards.t2i[3].scorer")
    assert scorer_type("learned").takes_device and not scorer_type("identity").takes_device
    assert scorer_type("identity").families == ("shapes",)
    with pytest.raises(ValueError, match="scorer type 'learned' is registered twice"):
        register_scorer("learned")(lambda request: None)


def test_a_scorer_type_registered_in_a_test_is_usable_from_config(brightness_type, shapes_artifact, monkeypatch):
    config = load_config(CONFIGS / "smoke.yaml", [
        "rewards.t2i=[{name: alignment, weight: 1.0}, {name: bright, scorer: brightness, weight: 0.5, "
        "categories: [counting=2]}]"])
    composite = load_rewards(config, str(shapes_artifact), "t2i")
    assert composite.component_names == ("alignment", "bright")
    assert isinstance(composite.components["bright"], BrightnessReward)
    (request,) = brightness_type
    assert (request.key, request.task, request.device, request.component.name) == ("rewards.t2i[1]", "t2i", None,
                                                                                     "bright")
    assert request.artifact() == shapes_artifact
    (images, prompts, _), _ = _shapes_batches()
    weights = composite.weight_matrix(["three triangles", "a circle"])  # counting, then single_object
    assert weights.tolist() == [[1.0, 2.0], [1.0, 0.5]]
    scores = composite.score_components(images, prompts)
    torch.testing.assert_close(scores.components["bright"], images.mean(dim=(1, 2, 3)), rtol=0, atol=0)
    # a spread load places the model scorers of this type as well, round-robin after the learned one
    brightness_type.clear()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    load_rewards(config, str(shapes_artifact), "t2i", spread=True)
    assert brightness_type[0].device == "cuda:1"


def test_a_type_restricted_to_other_families_is_refused(brightness_type, monkeypatch):
    monkeypatch.setitem(registry._SCORERS, "brightness",
                        dataclasses.replace(registry._SCORERS["brightness"], families=("qwen_image",)))
    with pytest.raises(ConfigError, match=r"rewards.t2i\[0\].scorer: the brightness scorer has no model for "
                                          r"model.family shapes"):
        load_config(CONFIGS / "smoke.yaml", ["rewards.t2i=[{name: b, scorer: brightness}]"])


# --------------------------------------------------------------------------- composites as before


def _reference_shapes(local: Path, edit_gates: dict[str, str]) -> dict[str, CompositeReward]:
    """The shapes composites as the loader before the registry built them from the default weights, the
    edit composite with ``edit_gates``."""
    def load(task, name):
        return ScorerReward(ShapesScorer.load(local / task / f"pointwise_{name}"), name)

    t2i = CompositeReward(components={n: load("t2i", n) for n in ("alignment", "quality", "fidelity")}, weights={},
                          categorize=shapes_category, default_weights={"alignment": 1.0, "quality": 0.25,
                                                                       "fidelity": 0.5})
    edit = CompositeReward(components={"instruction": load("edit", "alignment"), "identity": ShapesIdentityScorer()},
                           weights={}, categorize=shapes_category,
                           default_weights={"instruction": 1.0, "identity": 0.5}, gates=edit_gates)
    return {"t2i": t2i, "edit": edit}


@pytest.mark.parametrize("name", ["smoke", "shapes"])
def test_the_shapes_composites_are_todays_bit_for_bit(name, shapes_artifact):
    """Same components in the same order, the same weights, the same scores, and the same draws of the
    global generator while loading (the scorers are built in the same order)."""
    config = load_config(CONFIGS / f"{name}.yaml")
    torch.manual_seed(0)
    built = load_shapes_rewards(config, str(shapes_artifact))
    after = torch.rand(4)
    torch.manual_seed(0)
    reference = _reference_shapes(shapes_artifact, config.rewards.gates("edit"))
    assert torch.equal(after, torch.rand(4))
    assert list(built) == ["t2i", "edit"]
    for task, (images, prompts, sources) in zip(("t2i", "edit"), _shapes_batches()):
        new, old = built[task], reference[task]
        assert new.component_names == old.component_names
        assert [type(c) for c in new.components.values()] == [type(c) for c in old.components.values()]
        assert dict(new.default_weights) == dict(old.default_weights) and dict(new.weights) == {}
        assert list(new.default_weights) == list(new.components)
        assert dict(new.gates) == dict(old.gates)
        assert new.categorize is shapes_category
        assert [getattr(c, "batch_size", None) for c in new.components.values()] == \
            [getattr(c, "batch_size", None) for c in old.components.values()]
        a, b = new.score_components(images, prompts, sources), old.score_components(images, prompts, sources)
        assert torch.equal(a.total, b.total)
        assert all(torch.equal(a.components[k], b.components[k]) for k in old.component_names)
        assert torch.equal(new.weight_matrix(prompts), old.weight_matrix(prompts))


def test_the_qwen_image_composites_are_todays(vlm_artifact):
    """T2I: alignment, quality, fidelity; edit: instruction alone (no identity scorer for photos); each a
    lazily loaded bfloat16 VLM scorer in batches of 8, prompts categorised by the filter's table."""
    config = load_config(CONFIGS / "qwen_image.yaml")
    table = {"a cat": "animals", "make it red": "recolor"}
    expected = {"t2i": {"alignment": ("pointwise_alignment", 1.0), "quality": ("pointwise_quality", 0.25),
                        "fidelity": ("pointwise_fidelity", 0.5)},
                "edit": {"instruction": ("pointwise_alignment", 1.0)}}
    for task, components in expected.items():
        composite = load_production_rewards(config, str(vlm_artifact), task, table)
        assert composite.component_names == tuple(components)
        assert dict(composite.default_weights) == {n: w for n, (_, w) in components.items()}
        assert dict(composite.weights) == {}
        for name, (directory, _) in components.items():
            reward = composite.components[name]
            assert isinstance(reward, ScorerReward) and isinstance(reward.backbone, LazyVLMScorer)
            assert reward.backbone.directory == vlm_artifact / task / directory
            assert (reward.batch_size, reward.backbone.dtype, reward.backbone.device) == (8, "bfloat16", None)
            assert not reward.backbone.loaded
        assert [composite.categorize(p) for p in ("a cat", "make it red", "other")] == ["animals", "recolor", ""]


def test_shapes_and_production_go_through_the_one_loader(monkeypatch, shapes_artifact, vlm_artifact, tmp_path):
    import pandas as pd

    from flowrl.rewards import production, shapes_rewards

    calls = []
    build = registry._build

    def spy(config, artifact, task, categories, spread, first_device):
        calls.append((config.model.family, task))
        return build(config, artifact, task, categories, spread, first_device)

    monkeypatch.setattr(registry, "_build", spy)
    shapes = load_config(CONFIGS / "smoke.yaml")
    qwen = load_config(CONFIGS / "qwen_image.yaml")
    load_shapes_rewards(shapes, str(shapes_artifact))
    load_rewards(shapes, str(shapes_artifact), "edit")
    load_production_rewards(qwen, str(vlm_artifact), "t2i", {})
    shapes_rewards.served_composite(shapes.to_dict(), str(shapes_artifact), "t2i")
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    pd.DataFrame({"prompt": ["a cat"], "category": ["animals"]}).to_parquet(prompts / "prompts.parquet")
    served = production.served_composite(qwen.to_dict(), str(vlm_artifact), "edit", str(prompts))
    assert served.categorize("a cat") == "animals"
    assert calls == [("shapes", "t2i"), ("shapes", "edit"), ("shapes", "edit"), ("qwen_image", "t2i"),
                     ("shapes", "t2i"), ("qwen_image", "edit")]


def test_one_fetch_serves_both_tasks(monkeypatch, shapes_artifact):
    fetched = []
    monkeypatch.setattr(registry, "fetch", lambda uri: fetched.append(uri) or Path(uri))
    load_task_rewards(load_config(CONFIGS / "smoke.yaml"), str(shapes_artifact))
    assert fetched == [str(shapes_artifact)]


# --------------------------------------------------------------------------- failures at load


@pytest.mark.bad_input
def test_a_learned_scorer_the_artifact_lacks_names_the_component(tmp_path, shapes_artifact):
    import shutil

    partial = tmp_path / "rm"
    shutil.copytree(shapes_artifact / "t2i", partial / "t2i")
    config = load_config(CONFIGS / "smoke.yaml")
    with pytest.raises(ArtifactError, match=r"no edit pointwise alignment model for rewards.edit\[0\] \(add "
                                            r"'alignment' to reward_model.edit_criteria"):
        load_rewards(config, str(partial), "edit")


@pytest.mark.bad_input
def test_categories_are_checked_against_the_prompts(shapes_artifact, vlm_artifact, caplog):
    # a shapes config names a category its grammar lacks: refused when it loads (flowrl validate), before any stage
    with pytest.raises(ConfigError, match=r"rewards.t2i: weights for category 'countng', which no t2i prompt has "
                                          r"\(categories: single_object"):
        load_config(CONFIGS / "smoke.yaml", ["rewards.t2i=[{name: alignment, categories: [countng=2]}]"])
    qwen = load_config(CONFIGS / "qwen_image.yaml")
    with pytest.raises(ValueError, match="reads its prompts from prompt files; pass categories"):
        load_rewards(qwen, str(vlm_artifact), "t2i")
    weighted = load_config(CONFIGS / "qwen_image.yaml", [
        "rewards.edit=[{name: instruction, criterion: alignment, categories: [portrait=2]}]"])
    with caplog.at_level("WARNING", logger="flowrl.rewards.registry"):
        composite = load_rewards(weighted, str(vlm_artifact), "edit", categories={"make it red": "recolor"})
    assert "no prompt here has: portrait" in caplog.text  # the filter may have dropped them all: said, not refused
    assert composite.weight_matrix(["make it red"]).tolist() == [[1.0]]


def test_the_planner_counts_the_model_scorers():
    qwen = load_config(CONFIGS / "qwen_image.yaml")
    assert registry.model_scorer_count(qwen, "t2i") == 3 and registry.model_scorer_count(qwen, "edit") == 1
    assert registry.model_scorer_count(FlowRLConfig(), "edit") == 1  # identity loads no model

