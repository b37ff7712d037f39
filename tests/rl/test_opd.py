"""OPD (DESIGN.md sections 3 and 6): the velocity-matching loss, the fixed
point, the unbiased step subset, off-policy states, routing, and a loss that
falls on a smoke setting."""

import copy

import numpy as np
import pytest
import torch

from flowrl.config import OPDConfig
from flowrl.rl.grpo import PromptSet
from flowrl.rl.opd import OPDTrainer, parse_routes, task_counts, velocity_matching_loss
from flowrl.sampling import sample
from tests.rl.conftest import tiny_model

T2I = PromptSet(["a red circle", "two blue squares", "a green triangle", "a red square above a blue circle"],
                ["single_object", "counting", "single_object", "position"], None)
EDIT = PromptSet(["make the red circle blue", "remove the blue square"], ["recolor", "remove"],
                 torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)))


def _trainer(student, teachers, routes=None, **overrides):
    cfg = OPDConfig(**{"prompts_per_iteration": 4, "num_steps": 3, "timesteps_per_trajectory": 2, "lr": 1e-3,
                       **overrides})
    routes = routes or {"t2i": "t", "edit": "e"}
    return OPDTrainer(student, student.net, teachers, cfg, {"t2i": T2I, "edit": EDIT}, routes,
                      {"t2i": 0.5, "edit": 0.5}, guidance_scale=3.0)


def test_loss_on_a_hand_computed_case():
    v_s = torch.tensor([[1.0, 3.0], [0.0, 2.0]]).reshape(2, 2, 1)
    v_t = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).reshape(2, 2, 1)
    # squared errors [[1, 4], [0, 4]] -> per-trajectory sums [5, 4] -> mean 4.5
    assert velocity_matching_loss(v_s, v_t).item() == pytest.approx(4.5)
    assert velocity_matching_loss(v_s, v_t, step_scale=2.0).item() == pytest.approx(9.0)
    # elements of one latent are averaged: [1, 3] vs [0, 0] -> (1 + 9) / 2
    assert velocity_matching_loss(torch.tensor([[[1.0, 3.0]]]), torch.zeros(1, 1, 2)).item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="R, S"):
        velocity_matching_loss(torch.zeros(2, 2), torch.zeros(2, 2))


def test_gradient_flows_to_the_student_only():
    v_s = torch.tensor([[[2.0]]], requires_grad=True)
    v_t = torch.tensor([[[0.5]]], requires_grad=True)
    velocity_matching_loss(v_s, v_t).backward()
    assert v_s.grad.item() == pytest.approx(2 * 1.5)
    assert v_t.grad is None


@pytest.mark.parametrize("states", ["on_policy", "off_policy"])
def test_student_equal_to_its_only_teacher_has_zero_loss_and_gradient(states):
    teacher = tiny_model(seed=1)
    student = copy.deepcopy(teacher)
    trainer = _trainer(student, {"only": teacher}, routes={"t2i": "only", "edit": "only"}, states=states)
    batches = trainer.collect(0)
    before = {k: v.clone() for k, v in student.net.state_dict().items()}
    # the update's gradient, seen before the optimizer applies it
    grads = []
    trainer.optimizer.step = lambda: grads.extend(p.grad.abs().max() for p in student.net.parameters()
                                                 if p.grad is not None)
    metrics = trainer.update(batches, 0)
    assert metrics["train/loss"] == 0.0
    assert metrics["train/loss_t2i"] == 0.0 and metrics["train/loss_edit"] == 0.0
    assert grads and max(float(g) for g in grads) == 0.0
    assert all(torch.equal(before[k], v) for k, v in student.net.state_dict().items())


def test_subset_of_steps_is_an_unbiased_estimate_of_the_full_sum():
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    trainer = _trainer(student, {"t": teacher, "e": teacher}, timesteps_per_trajectory=1)
    errors = torch.tensor([1.0, 2.0, 7.0])  # per-step squared errors of one trajectory
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(3000):
        steps, scale = trainer._select_steps(1, gen)
        draws.append(scale * errors[steps[0]].sum().item())
    assert np.mean(draws) == pytest.approx(errors.sum().item(), rel=0.05)
    full = _trainer(student, {"t": teacher, "e": teacher}, timesteps="all")
    steps, scale = full._select_steps(2, gen)
    assert scale == 1.0 and steps.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_off_policy_states_are_the_teachers_trajectories():
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    trainer = _trainer(student, {"t": teacher, "e": teacher}, states="off_policy")
    on = _trainer(student, {"t": teacher, "e": teacher})
    off_batch, on_batch = trainer.collect(0)[0], on.collect(0)[0]
    noise = off_batch.states[:, 0]
    assert torch.equal(noise, on_batch.states[:, 0])  # same prompts and noise either way
    expected = sample(teacher, off_batch.cond, off_batch.sigmas, null_cond=off_batch.null_cond, guidance_scale=3.0,
                      initial_noise=noise).states
    torch.testing.assert_close(off_batch.states, expected)
    assert not torch.allclose(on_batch.states[:, -1], expected[:, -1])  # the student's own are elsewhere


def test_category_routes_win_over_task_routes():
    student = tiny_model(seed=0)
    teachers = {"t": tiny_model(seed=1), "e": tiny_model(seed=2), "c": tiny_model(seed=3)}
    trainer = _trainer(student, teachers, routes=parse_routes(("t2i=t", "edit=e", "counting=c"), ("t2i", "edit"),
                                                              tuple(teachers)))
    assert trainer.teacher_of("t2i", "counting") == "c"
    assert trainer.teacher_of("t2i", "position") == "t"
    assert trainer.teacher_of("edit", "remove") == "e"


def test_route_errors_name_the_entry():
    with pytest.raises(ValueError, match=r"routes\[1\].*SELECTOR=TEACHER"):
        parse_routes(("t2i=a", "edit"), ("t2i", "edit"), ("a",))
    with pytest.raises(ValueError, match="no teacher named 'b'"):
        parse_routes(("t2i=a", "edit=b"), ("t2i", "edit"), ("a",))
    with pytest.raises(ValueError, match="no teacher for task 'edit'"):
        parse_routes(("t2i=a",), ("t2i", "edit"), ("a",))


def test_task_counts_split_by_fraction():
    assert task_counts(32, {"t2i": 0.5, "edit": 0.5}) == {"t2i": 16, "edit": 16}
    assert task_counts(5, {"t2i": 0.5, "edit": 0.5}) in ({"t2i": 3, "edit": 2}, {"t2i": 2, "edit": 3})
    assert task_counts(4, {"t2i": 1.0, "edit": 0.0}) == {"t2i": 4, "edit": 0}


def test_loss_falls_on_a_smoke_setting():
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    trainer = _trainer(student, {"t": teacher, "e": teacher}, iterations=40, prompts_per_iteration=8,
                       timesteps="all", checkpoint_every=1000)
    state = trainer.train(progress=False).state
    losses = [h["train/loss"] for h in state.history]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
