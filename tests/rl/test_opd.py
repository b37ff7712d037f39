"""OPD (docs/design.md, Math and Invariants): the velocity-matching loss, the fixed
point, the unbiased step subset, off-policy states, routing, and a loss that
falls on a smoke setting."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

from flowrl.config import OPDConfig
from flowrl.rl.grpo import PromptSet
from flowrl.rl.opd import OPDTrainer, ode_states_at, parse_routes, task_counts, velocity_matching_loss
from flowrl.sampling import flow_match_sigmas, sample
from tests.rl.conftest import tiny_model
from tests.test_sampling import LinearFlow

T2I = PromptSet(["a red circle", "two blue squares", "a green triangle", "a red square above a blue circle"],
                ["single_object", "counting", "single_object", "position"], None)
EDIT = PromptSet(["make the red circle blue", "remove the blue square"], ["recolor", "remove"],
                 torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)))


def _trainer(student, teachers, routes=None, timesteps=None, loop=None, **overrides):
    """``timesteps``, ``loop``: keys of those subsections of opd over the test's own (and OPD's defaults)."""
    defaults = OPDConfig()
    cfg = OPDConfig(**{"prompts_per_iteration": 4, "num_steps": 3, **overrides},
                    timesteps=dataclasses.replace(defaults.timesteps, **{"per_trajectory": 2, **(timesteps or {})}),
                    optim=dataclasses.replace(defaults.optim, lr=1e-3),
                    loop=dataclasses.replace(defaults.loop, **(loop or {})))
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
    trainer = _trainer(student, {"t": teacher, "e": teacher}, timesteps={"per_trajectory": 1})
    errors = torch.tensor([1.0, 2.0, 7.0])  # per-step squared errors of one trajectory
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(3000):
        steps, scale = trainer._select_steps(1, gen)
        draws.append(scale * errors[steps[0]].sum().item())
    assert np.mean(draws) == pytest.approx(errors.sum().item(), rel=0.05)
    full = _trainer(student, {"t": teacher, "e": teacher}, timesteps={"mode": "all"})
    steps, scale = full._select_steps(2, gen)
    assert scale == 1.0 and steps.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_off_policy_states_are_the_teachers_trajectories():
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    trainer = _trainer(student, {"t": teacher, "e": teacher}, states="off_policy")
    on = _trainer(student, {"t": teacher, "e": teacher})
    for off_batch, on_batch in zip(trainer.collect(0), on.collect(0)):
        # the same prompts, noise and matched steps either way
        assert torch.equal(off_batch.noise, on_batch.noise) and torch.equal(off_batch.steps, on_batch.steps)
        rows = torch.arange(len(off_batch.steps))[:, None]
        for model, batch in ((teacher, off_batch), (student, on_batch)):
            full = sample(model, batch.cond, batch.sigmas, null_cond=batch.null_cond, guidance_scale=3.0,
                          initial_noise=batch.noise).states
            torch.testing.assert_close(batch.states, full[rows, batch.steps])
        deep = on_batch.steps > 0  # the students' own states are elsewhere (state 0 is the shared noise)
        assert not torch.allclose(on_batch.states[deep], off_batch.states[deep])


def test_the_matched_steps_are_drawn_per_iteration_and_bound_the_rollout():
    """K = 2 of N = 3 distinct steps per trajectory, the same draws for a rerun of the iteration, others for the next;
    the update matches exactly the states the batch holds."""
    student, teacher = tiny_model(seed=0), tiny_model(seed=1)
    trainer = _trainer(student, {"t": teacher, "e": teacher})
    first, again, second = trainer.collect(0), trainer.collect(0), trainer.collect(1)
    for batch, same in zip(first, again):
        assert batch.steps.shape == (2, 2) and batch.step_scale == 1.5
        assert all(len(set(row)) == 2 and max(row) < 3 for row in batch.steps.tolist())
        assert torch.equal(batch.steps, same.steps) and torch.equal(batch.states, same.states)
    assert any(not torch.equal(a.steps, b.steps) for a, b in zip(first, second))


def test_states_at_chosen_steps_are_the_full_trajectory_s_and_stop_at_the_deepest():
    """``ode_states_at`` gives what ``sample`` gives at each row's chosen indices, with CFG; a row leaves the
    batch after its deepest index, and nothing runs past the deepest of all."""
    model = LinearFlow()
    rows_seen = []
    velocity = model.velocity
    model.velocity = lambda x, t, cond: rows_seen.append(len(x)) or velocity(x, t, cond)
    cond = model.encode_prompts(["ab", "abcd", "x"])
    null = model.null_condition(cond)
    sigmas = flow_match_sigmas(6)
    noise = torch.randn(3, model.dim, generator=torch.Generator().manual_seed(1))
    full = sample(model, cond, sigmas, null_cond=null, guidance_scale=3.0, initial_noise=noise).states
    rows_seen.clear()
    steps = torch.tensor([[0, 2], [4, 1], [1, 0]])
    got = ode_states_at(model, cond, sigmas, steps, noise, null_cond=null, guidance_scale=3.0)
    torch.testing.assert_close(got, full[torch.arange(3)[:, None], steps])
    # deepest indices 2, 4, 1: step 0 for all three rows, 1 for rows 0 and 1, 2 and 3 for row 1; CFG doubles each
    assert rows_seen == [6, 4, 2, 2]
    assert torch.equal(noise, full[:, 0])  # the caller's noise is left as it was
    with pytest.raises(ValueError, match="steps must index the 7 states"):
        ode_states_at(model, cond, sigmas, torch.tensor([[7], [0], [0]]), noise)
    with pytest.raises(ValueError, match=r"steps must be \[3, K\]"):
        ode_states_at(model, cond, sigmas, torch.tensor([0, 1, 2]), noise)


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
    trainer = _trainer(student, {"t": teacher, "e": teacher}, loop={"iterations": 40, "checkpoint_every": 1000},
                       prompts_per_iteration=8, timesteps={"mode": "all"})
    state = trainer.train(progress=False).state
    losses = [h["train/loss"] for h in state.history]
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
