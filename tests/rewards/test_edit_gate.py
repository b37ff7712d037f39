"""Gated reward components: the gate map, its config rules, the composite's columns, and the failure it
prevents (an edit reward won by returning the source unchanged)."""

import dataclasses
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from flowrl.config import ConfigError, RewardComponent, RewardsConfig
from flowrl.rewards.base import RewardScores
from flowrl.rewards.composite import CompositeReward, gate_factor
from flowrl.rewards.identity import ShapesIdentityScorer
from flowrl.shapes.edits import EditSpec, apply_edit
from flowrl.shapes.render import render_batch
from flowrl.shapes.scene import Scene, ShapeObject

log = logging.getLogger(__name__)

INSTRUCTION = RewardComponent(name="instruction", scorer="learned", criterion="alignment", weight=1.0)


def edit_rewards(gate: str | None) -> tuple[RewardComponent, ...]:
    return INSTRUCTION, RewardComponent(name="identity", scorer="identity", weight=0.5, gate=gate)


class Fixed:
    """A reward returning fixed scores, with a declared range."""

    def __init__(self, values, score_range=(1.0, 5.0)):
        self.values, self.score_range = torch.tensor(values), score_range

    def score(self, images, prompts, sources=None):
        return self.values

    def score_components(self, images, prompts, sources=None):
        return RewardScores(total=self.values, components={"fixed": self.values})


# --------------------------------------------------------------------------- the map


def test_gate_factor_maps_the_score_range_onto_the_unit_interval_and_clips():
    levels = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.6, 5.0, 7.0])
    # flat at 0 up to the middle of the range (Likert 3), then (level - 3) / 2
    torch.testing.assert_close(gate_factor(levels, (1.0, 5.0)), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.8, 1.0, 1.0]))
    torch.testing.assert_close(gate_factor(torch.tensor([-1.0, 0.3, 0.75, 2.0]), (0.0, 1.0)),
                               torch.tensor([0.0, 0.0, 0.5, 1.0]))
    for bad in ((1.0, 1.0), (5.0, 1.0), (0.0, float("inf"))):
        with pytest.raises(ValueError, match="score_range"):
            gate_factor(levels, bad)


# --------------------------------------------------------------------------- the config


def test_the_default_edit_reward_gates_identity_by_the_instruction():
    assert RewardsConfig().gates("edit") == {"identity": "instruction"}
    assert RewardsConfig().gates("t2i") == {}
    assert "gate: instruction" in repr(RewardsConfig().edit[1])


@pytest.mark.parametrize("edit, message", [
    (edit_rewards("identity"), r"rewards\.edit\[1\]\.gate: component 'identity' cannot gate itself"),
    (edit_rewards("nothing"), r"rewards\.edit\[1\]\.gate: no component 'nothing' in rewards\.edit"),
    (edit_rewards("quality"), r"rewards\.edit\[1\]\.gate: no component 'quality'.*another task"),
    ((dataclasses.replace(INSTRUCTION, gate="identity"), edit_rewards("instruction")[1]),
     r"rewards\.edit\[0\]\.gate: component 'identity' is gated itself.*do not chain"),
    (edit_rewards("instruction") + (RewardComponent(name="identity_gated", scorer="identity"),),
     r"rewards\.edit\[1\]\.gate: .*'identity_gated'.*another component"),
])
def test_bad_gates_are_refused_naming_the_key(edit, message):
    with pytest.raises(ConfigError, match=message):
        RewardsConfig(edit=edit)


# --------------------------------------------------------------------------- the composite


def gated_composite(gates=None) -> CompositeReward:
    return CompositeReward(
        components={"instruction": Fixed([1.0, 3.0, 5.0]), "identity": Fixed([1.0, 0.8, 0.6], (0.0, 1.0))},
        weights={"b": {"instruction": 1.0, "identity": 2.0}}, categorize=lambda prompt: prompt[0],
        default_weights={"instruction": 1.0, "identity": 0.5},
        gates={"identity": "instruction"} if gates is None else gates,
    )


def test_a_gated_component_is_weighted_through_its_gated_column_and_both_are_logged():
    reward = gated_composite()
    prompts = ["a", "b", "a"]
    scores = reward.score_components(torch.zeros(3, 3, 4, 4), prompts)
    assert reward.component_names == ("instruction", "identity", "identity_gated")
    assert list(scores.components) == list(reward.component_names)
    torch.testing.assert_close(scores.components["identity"], torch.tensor([1.0, 0.8, 0.6]))  # raw, logged
    torch.testing.assert_close(scores.components["identity_gated"], torch.tensor([0.0, 0.0, 0.6]))
    torch.testing.assert_close(reward.weight_matrix(prompts),
                               torch.tensor([[1.0, 0.0, 0.5], [1.0, 0.0, 2.0], [1.0, 0.0, 0.5]]))
    # a: 1 + 0.5 * 0; b: 3 + 2 * 0 (level 3 is not "done"); a: 5 + 0.5 * 0.6
    torch.testing.assert_close(scores.total, torch.tensor([1.0, 3.0, 5.3]))


@pytest.mark.parametrize("gates, message", [
    ({"identity": "identity"}, "cannot gate itself"),
    ({"identity": "nothing"}, "unknown component 'nothing'"),
    ({"identity": "instruction", "instruction": "identity"}, "gates do not chain"),
])
def test_the_composite_refuses_bad_gates(gates, message):
    with pytest.raises(ValueError, match=message):
        gated_composite(gates)


def test_a_gate_without_a_score_range_is_refused():
    unbounded = Fixed([1.0, 2.0, 3.0])
    del unbounded.score_range
    with pytest.raises(ValueError, match="declares no score_range"):
        CompositeReward(components={"g": unbounded, "x": Fixed([0.0, 0.0, 0.0])}, weights={},
                        categorize=str, default_weights={"g": 1.0, "x": 1.0}, gates={"x": "g"})


# --------------------------------------------------------------------------- identity reads only untouched objects


def test_identity_ignores_the_touched_object_and_pays_for_drift_of_the_others():
    """Carrying out the instruction changes the touched cell; identity stays ~1 as long as the other
    objects are kept, and drops when one of them drifts."""
    source = Scene((ShapeObject("circle", "red", 0, 0), ShapeObject("square", "blue", 2, 2),
                    ShapeObject("triangle", "green", 3, 0)))
    outputs = {}
    for text, spec in (("recolor", EditSpec("recolor", "circle", "red", new_color="yellow")),
                       ("move", EditSpec("move", "circle", "red", direction="right")),
                       ("remove", EditSpec("remove", "circle", "red"))):
        done = apply_edit(source, spec)
        drifted = done.replace(ShapeObject("square", "blue", 2, 2), ShapeObject("square", "yellow", 2, 2))
        outputs[text] = (spec, done, drifted)
    specs = [spec for spec, _, _ in outputs.values()]
    sources = render_batch([source] * len(specs), 32)
    scorer = ShapesIdentityScorer()
    done = scorer.score(render_batch([d for _, d, _ in outputs.values()], 32), [s.instruction() for s in specs],
                        sources)
    drifted = scorer.score(render_batch([d for _, _, d in outputs.values()], 32), [s.instruction() for s in specs],
                           sources)
    assert (done > 0.99).all(), done
    assert (drifted < 0.8).all(), drifted  # one of two untouched objects recoloured: about half lost


# --------------------------------------------------------------------------- the failure it prevents, on trained models


@pytest.fixture(scope="module")
def copy_and_base_edits(upstream):
    """The smoke run's edit composite, ungated and gated, on the base model's edits of 24 instructions
    and on their sources returned unchanged: {gate: (base totals [N], copy totals [N])}."""
    from flowrl.evaluation import generate, item_seeds
    from flowrl.models.families import family_of
    from flowrl.rewards.registry import load_rewards
    from flowrl.shapes.edits import make_edit_set
    from flowrl.storage import fetch

    _, config, base, rm, _ = upstream
    edits = make_edit_set(11, 6)
    prompts = [e.instruction for e in edits]
    sources = render_batch([e.source for e in edits], config.world.resolution)
    model = family_of(config).load_policy(fetch(base.uri), config, "edit")
    outputs = generate(model, prompts, item_seeds(11, 0, len(edits))[1], config.sampler, sources=sources)
    totals = {}
    for gate in (None, "instruction"):
        gated = dataclasses.replace(config, rewards=dataclasses.replace(config.rewards, edit=edit_rewards(gate)))
        reward = load_rewards(gated, rm.uri, "edit")
        totals[gate] = (reward.score(outputs, prompts, sources), reward.score(sources.clone(), prompts, sources))
    return totals


def test_the_gate_lowers_a_copy_of_the_source_against_the_base_edits(copy_and_base_edits):
    """Identity paid only as far as the instruction was done: the copy's lead over the base's edits
    (its deficit, on a reward model that reads unchanged outputs as failed) moves down."""
    (base_free, copy_free), (base_gated, copy_gated) = copy_and_base_edits[None], copy_and_base_edits["instruction"]
    lead_free = (copy_free.median() - base_free.median()).item()
    lead_gated = (copy_gated.median() - base_gated.median()).item()
    assert lead_gated < lead_free - 0.05, (lead_free, lead_gated)


# The base's edit accuracy on a full-size shapes run (judge, bench split): the share of its edits that carry
# the instruction out.
BASE_EDIT_ACCURACY = 0.4
FAILED_PER_GROUP = 4


@pytest.fixture(scope="module")
def rendered_policies():
    """configs/shapes.yaml's edit composite, gated as shipped and with the gate taken out, over a real
    instruction scorer (trained here on simulated annotators' labels of rendered edit candidates and
    failed edits, :mod:`tests.rewards.edit_policies`) and the real identity scorer, on 64 fresh
    instructions (16 per kind, prompts and scenes apart from the scorer's training rows) and three
    rendered policies per instruction: the target (the instruction carried out), ``FAILED_PER_GROUP``
    failed-but-changed edits (another object edited, or another object drifted), and the source returned
    unchanged. Returns {"gated" | "ungated": {"target": [N], "failed": [N, F], "copy": [N],
    "advantage": [N, F + 1]}}: each output's composite total, and the GRPO advantages of the group of the
    failed edits and the copy (the copy last)."""
    from flowrl.config import load_config
    from flowrl.rewards.composite import CompositeReward, shapes_category
    from flowrl.rewards.shapes_annotators import latents_for
    from flowrl.rewards.shapes_rewards import ScorerReward
    from flowrl.rl.objectives import group_advantages
    from tests.rewards import edit_policies as policies

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        instruction = ScorerReward(policies.train_instruction_scorer(seed=5, per_kind=60, steps=400), "instruction")
        examples = policies.edit_examples(99, 16)
        rng = np.random.default_rng(7)
        failed = [[policies.failed_edit(rng, e) for _ in range(FAILED_PER_GROUP)] for e in examples]
        prompts = [e.instruction for e in examples]
        sources = render_batch([e.source for e in examples], policies.RESOLUTION)  # [N, 3, H, W]
        targets = render_batch([e.target for e in examples], policies.RESOLUTION)
        misses = render_batch([f for group in failed for f in group], policies.RESOLUTION)  # [N F, 3, H, W]
        # the stand-ins are what they claim to be: the annotators' instruction latent is 1 for every target,
        # 0 for every failed edit and for the unchanged copy
        pixels = lambda images: (images.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        specs = [e.spec for e in examples]
        judged = {name: [lat.alignment for lat in latents_for(pixels(images), spec_rows, pixels(src))]
                  for name, images, spec_rows, src in (
                      ("target", targets, specs, sources), ("copy", sources, specs, sources),
                      ("failed", misses, [s for s in specs for _ in range(FAILED_PER_GROUP)],
                       sources.repeat_interleave(FAILED_PER_GROUP, 0)))}
        assert set(judged["target"]) == {1.0} and set(judged["copy"]) == set(judged["failed"]) == {0.0}

        rewards = load_config(Path(__file__).parents[2] / "configs" / "shapes.yaml").rewards
        default, by_category = rewards.weights("edit")
        assert rewards.gates("edit") == {"identity": "instruction"}
        out = {}
        for name, gates in (("gated", rewards.gates("edit")), ("ungated", {})):
            reward = CompositeReward(components={"instruction": instruction, "identity": ShapesIdentityScorer()},
                                     weights=by_category, categorize=shapes_category, default_weights=default,
                                     gates=gates)
            group = FAILED_PER_GROUP + 1
            images = torch.cat([misses.view(len(examples), FAILED_PER_GROUP, *misses.shape[1:]),
                                sources[:, None]], dim=1).flatten(0, 1)  # [N G, 3, H, W], the copy last
            rows = [p for p in prompts for _ in range(group)]
            scores = reward.score_components(images, rows, sources.repeat_interleave(group, 0))
            columns = torch.stack([scores.components[c] for c in reward.component_names], dim=1)  # [N G, K]
            advantage = group_advantages(columns, reward.weight_matrix(rows),
                                         torch.arange(len(examples)).repeat_interleave(group))
            totals = scores.total.view(len(examples), group)
            out[name] = {"target": reward.score(targets, prompts, sources), "failed": totals[:, :-1],
                         "copy": totals[:, -1], "advantage": advantage.view(len(examples), group)}
        return out
    finally:
        torch.set_num_threads(threads)


def test_a_copy_of_the_source_scores_below_the_base_typical_edit(rendered_policies):
    """The failure the gate prevents: an edit teacher that learned to return its source unchanged, because
    the edit composite paid identity whatever the instruction asked. On configs/shapes.yaml's gated
    composite, a copy-the-source policy scores below a base-like policy that carries the instruction out
    on a share ``BASE_EDIT_ACCURACY`` of its samples and otherwise returns a failed but changed edit (its
    expected composite per instruction), on the median and the mean over 64 instructions; and in GRPO
    groups where no sample carried the instruction out (failed edits and one copy), the gate lowers the
    copy's advantage, which without it is paid for the identity it keeps."""
    gated, ungated = rendered_policies["gated"], rendered_policies["ungated"]
    base = BASE_EDIT_ACCURACY * gated["target"] + (1 - BASE_EDIT_ACCURACY) * gated["failed"].mean(dim=1)  # [N]
    copy = gated["copy"]
    assert len(copy) >= 48
    assert copy.median() < base.median() - 0.5, (copy.median().item(), base.median().item())
    assert copy.mean() < base.mean() - 0.5, (copy.mean().item(), base.mean().item())
    assert (copy < base).float().mean() >= 0.8, (copy < base).float().mean().item()
    # the copy's advantage in the groups nobody carried out, with and without the gate
    copy_gated, copy_ungated = gated["advantage"][:, -1].mean(), ungated["advantage"][:, -1].mean()
    free = BASE_EDIT_ACCURACY * ungated["target"] + (1 - BASE_EDIT_ACCURACY) * ungated["failed"].mean(dim=1)
    log.info("gated composite: copy median %.3f mean %.3f, base-like median %.3f mean %.3f, copy below on %.2f "
             "(ungated: copy median %.3f, base-like %.3f); copy advantage among failed edits: ungated %+.3f, "
             "gated %+.3f", copy.median(), copy.mean(), base.median(), base.mean(), (copy < base).float().mean(),
             ungated["copy"].median(), free.median(), copy_ungated, copy_gated)
    assert copy_gated < copy_ungated - 0.3, (copy_ungated.item(), copy_gated.item())
