"""Composite rewards: per-category weighted sums, validation, and the shapes categories."""

from dataclasses import dataclass, field

import pytest
import torch

from flowrl.rewards.base import RewardModel, RewardScores
from flowrl.rewards.composite import CompositeReward, shapes_category
from flowrl.rewards.identity import ShapesIdentityScorer
from flowrl.shapes.edits import make_edit_set
from flowrl.shapes.render import render_batch


@dataclass
class FixedReward:
    """Returns ``values`` whatever the images; counts its calls."""

    values: torch.Tensor
    calls: list[int] = field(default_factory=list)

    def score(self, images, prompts, sources=None) -> torch.Tensor:
        self.calls.append(len(prompts))
        return self.values

    def score_components(self, images, prompts, sources=None) -> RewardScores:
        return RewardScores(total=self.values, components={"fixed": self.values})


@pytest.fixture
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def first_letter(prompt: str) -> str:
    return prompt[0]


PROMPTS = ["a: one", "b: two", "a: three"]
IMAGES = torch.zeros(3, 3, 8, 8)
WEIGHTS = {"a": {"align": 1.0, "quality": 0.5}, "b": {"align": 2.0}}
DEFAULT = {"align": 0.25, "quality": 0.1}


def composite(align=(1.0, 2.0, 3.0), quality=(10.0, 20.0, 30.0), weights=None, default=None) -> CompositeReward:
    return CompositeReward(
        components={"align": FixedReward(torch.tensor(align)), "quality": FixedReward(torch.tensor(quality))},
        weights=WEIGHTS if weights is None else weights,
        categorize=first_letter,
        default_weights=DEFAULT if default is None else default,
    )


def test_totals_are_weighted_sums_with_each_rows_category():
    reward = composite()
    assert isinstance(reward, RewardModel)
    scores = reward.score_components(IMAGES, PROMPTS)
    # row 0 (a): 1*1 + 0.5*10 = 6; row 1 (b): 2*2 + 0*20 = 4; row 2 (a): 1*3 + 0.5*30 = 18
    torch.testing.assert_close(scores.total, torch.tensor([6.0, 4.0, 18.0]))
    assert list(scores.components) == ["align", "quality"]
    torch.testing.assert_close(scores.components["quality"], torch.tensor([10.0, 20.0, 30.0]))
    torch.testing.assert_close(reward.score(IMAGES, PROMPTS), scores.total)
    assert [model.calls for model in reward.components.values()] == [[3, 3], [3, 3]]  # once per call


def test_weight_matrix_rows_follow_component_order():
    reward = composite()
    assert reward.component_names == ("align", "quality")
    torch.testing.assert_close(
        reward.weight_matrix(PROMPTS), torch.tensor([[1.0, 0.5], [2.0, 0.0], [1.0, 0.5]])
    )
    assert reward.weight_matrix([]).shape == (0, 2)


def test_unseen_category_uses_default_weights():
    reward = composite()
    prompts = ["c: unseen", "a: seen", "z: unseen"]
    torch.testing.assert_close(reward.weight_matrix(prompts), torch.tensor([[0.25, 0.1], [1.0, 0.5], [0.25, 0.1]]))
    # row 0: 0.25*1 + 0.1*10 = 1.25; row 1: 1*2 + 0.5*20 = 12; row 2: 0.25*3 + 0.1*30 = 3.75
    torch.testing.assert_close(reward.score(IMAGES, prompts), torch.tensor([1.25, 12.0, 3.75]))


@pytest.mark.parametrize(
    ("weights", "default", "message"),
    [
        ({"a": {"aesthetics": 1.0}}, None, r"weights\['a'\]: weight for unknown component 'aesthetics'"),
        (None, {"align": 1.0, "identity": 1.0}, "default_weights: weight for unknown component 'identity'"),
        ({"b": {"align": -1.0}}, None, r"weights\['b'\]: weight of 'align' must be finite and >= 0"),
        ({"b": {"quality": float("nan")}}, None, r"weights\['b'\]: weight of 'quality' must be finite"),
        ({"b": {"quality": float("inf")}}, None, r"weights\['b'\]: weight of 'quality' must be finite"),
        ({"b": {"quality": "1"}}, None, r"weights\['b'\]: weight of 'quality' must be a number"),
        ({"b": {"align": 0.0}}, None, r"weights\['b'\]: every weight is zero"),
    ],
)
def test_bad_weights_are_rejected_naming_category_and_component(weights, default, message):
    with pytest.raises(ValueError, match=message):
        composite(weights=weights, default=default)


def test_bad_component_outputs_are_rejected_naming_the_component():
    with pytest.raises(ValueError, match=r"component 'quality' returned shape \(2,\), expected \(3,\)"):
        composite(quality=(1.0, 2.0)).score(IMAGES, PROMPTS)
    with pytest.raises(ValueError, match=r"component 'align' returned non-finite scores at rows \[1\]"):
        composite(align=(1.0, float("nan"), 0.0)).score(IMAGES, PROMPTS)
    with pytest.raises(ValueError, match=r"component 'quality' returned non-finite scores at rows \[0, 2\]"):
        composite(quality=(float("inf"), 0.0, float("-inf"))).score(IMAGES, PROMPTS)
    with pytest.raises(TypeError, match="component 'broken'"):
        CompositeReward({"broken": object()}, {}, first_letter, {"broken": 1.0})
    with pytest.raises(ValueError, match="prompts"):
        composite().score(IMAGES, PROMPTS[:2])


def test_weights_are_copied_at_construction():
    weights = {"a": {"align": 1.0}}
    reward = composite(weights=weights)
    weights["a"]["align"] = 5.0
    torch.testing.assert_close(reward.weight_matrix(["a"]), torch.tensor([[1.0, 0.0]]))


@pytest.mark.parametrize(
    ("prompt", "category"),
    [
        ("a circle", "single_object"),
        ("a red circle", "colors"),
        ("three squares", "counting"),
        ("a circle and a square", "two_objects"),
        ("a red circle and a blue square", "color_attr"),
        ("a circle left of a square", "position"),
        ("make the red circle blue", "recolor"),
        ("remove the green square", "remove"),
        ("add a yellow triangle", "add"),
        ("move the blue square up", "move"),
    ],
)
def test_shapes_category(prompt, category):
    assert shapes_category(prompt) == category


@pytest.mark.parametrize("prompt", ["a purple circle", "move the red circle sideways", ""])
def test_shapes_category_rejects_other_text_quoting_it(prompt):
    with pytest.raises(ValueError, match=repr(prompt)):
        shapes_category(prompt)


def test_shapes_edit_composite_with_identity(single_thread):
    examples = make_edit_set(seed=2, n_per_kind=2)
    sources = render_batch([e.source for e in examples])
    prompts = [e.instruction for e in examples]
    reward = CompositeReward(
        components={"identity": ShapesIdentityScorer(), "constant": FixedReward(torch.full((len(examples),), 0.5))},
        weights={"move": {"identity": 2.0, "constant": 1.0}},
        categorize=shapes_category,
        default_weights={"identity": 1.0},
    )
    totals = reward.score(sources, prompts, sources)  # unchanged outputs: identity 1 everywhere
    expected = torch.tensor([2.5 if e.kind == "move" else 1.0 for e in examples])
    torch.testing.assert_close(totals, expected)
