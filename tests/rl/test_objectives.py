"""The GRPO objective's pure functions: hand-computed values and the
advantage invariants of docs/design.md, Invariants."""

import math

import pytest
import torch

from flowrl.rl.objectives import anchored_kl_term, gaussian_kl, group_advantages, guard_log_ratio, ppo_clip_loss
from flowrl.sampling import gaussian_log_prob


def test_advantages_hand_computed():
    # one group, two rows, one component: mean 2, population std 1
    adv = group_advantages(torch.tensor([[1.0], [3.0]]), torch.ones(2, 1), torch.tensor([0, 0]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 1.0]))
    # two components with weights 1 and 0.5, two groups of two
    rewards = torch.tensor([[0.0, 10.0], [2.0, 30.0], [5.0, 1.0], [5.0, 3.0]])
    weights = torch.tensor([[1.0, 0.5]] * 4)
    adv = group_advantages(rewards, weights, torch.tensor([7, 7, 9, 9]), eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.5, 1.5, -0.5, 0.5]))


def test_advantages_zero_mean_per_group_and_per_row_weights():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(12, 3, generator=gen)
    weights = torch.rand(12, 3, generator=gen)
    groups = torch.tensor([0, 1, 2] * 4)
    weights = weights[groups]  # one category per group, as prompts have
    adv = group_advantages(rewards, weights, groups)
    for g in range(3):
        assert abs(float(adv[groups == g].sum())) < 1e-5


def test_advantages_ignore_shift_and_scale_of_one_component():
    gen = torch.Generator().manual_seed(1)
    rewards = torch.randn(8, 2, generator=gen)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    moved = rewards.clone()
    moved[:, 1] = 7.0 * moved[:, 1] + 3.0
    weights = torch.tensor([[1.0, 0.3]] * 8)
    torch.testing.assert_close(
        group_advantages(moved, weights, groups, eps=1e-8), group_advantages(rewards, weights, groups, eps=1e-8)
    )


def test_constant_group_contributes_zero_gradient():
    rewards = torch.tensor([[2.0], [2.0], [2.0], [1.0], [4.0]])
    adv = group_advantages(rewards, torch.ones(5, 1), torch.tensor([0, 0, 0, 1, 1]))
    assert torch.equal(adv[:3], torch.zeros(3))
    logp = torch.zeros(5, 2, requires_grad=True)
    loss, _ = ppo_clip_loss(logp, torch.zeros(5, 2), adv, clip_range=0.2)
    loss.backward()
    assert torch.equal(logp.grad[:3], torch.zeros(3, 2)) and logp.grad[3:].abs().sum() > 0


def test_ppo_clip_hand_computed():
    logp_old = torch.zeros(2, 1)
    logp_new = torch.tensor([[math.log(1.5)], [math.log(0.5)]])
    loss, stats = ppo_clip_loss(logp_new, logp_old, torch.tensor([1.0, -1.0]), clip_range=0.2)
    # row 0: max(-1.5, -1.2) = -1.2; row 1: max(0.5, 0.8) = 0.8
    assert float(loss) == pytest.approx(-0.2)
    assert float(stats["clip_fraction"]) == 1.0
    # inside the clip range the loss is the plain surrogate, gradient -A * ratio
    logp = torch.tensor([[0.05]], requires_grad=True)
    loss, _ = ppo_clip_loss(logp, torch.zeros(1, 1), torch.tensor([2.0]), clip_range=0.2)
    loss.backward()
    assert float(logp.grad) == pytest.approx(-2.0 * math.exp(0.05))


def test_ratio_one_has_the_policy_gradient():
    logp = torch.zeros(3, 2, requires_grad=True)
    adv = torch.tensor([1.0, -2.0, 0.5])
    loss, stats = ppo_clip_loss(logp, torch.zeros(3, 2), adv, clip_range=1e-4)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(3, 2) / 6)
    assert float(stats["clip_fraction"]) == 0.0


def test_gaussian_kl_hand_computed_and_zero_at_reference():
    mean = torch.tensor([[1.0, 2.0]])
    assert float(gaussian_kl(mean, torch.zeros(1, 2), torch.tensor([1.0]))) == pytest.approx(1.25)
    assert float(gaussian_kl(mean, mean, torch.tensor([0.3]))) == 0.0
    assert float(gaussian_kl(mean, torch.zeros(1, 2), torch.tensor([2.0]))) == pytest.approx(1.25 / 4)


def test_anchored_kl_term_weighs_anchor_steps_apart():
    # 2 rows x 3 KL steps: 1 trained step, then 2 anchors
    kl = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    # unweighted: 0.5 * mean = 0.5 * 21 / 6
    assert float(anchored_kl_term(kl, 1, 0.5)) == pytest.approx(1.75)
    assert float(anchored_kl_term(kl, 1, 0.5, 0.5)) == pytest.approx(1.75)
    # trained (1 + 4) * 0.5 + anchors (2 + 3 + 5 + 6) * 2.0 = 2.5 + 32 over 6 entries
    assert float(anchored_kl_term(kl, 1, 0.5, 2.0)) == pytest.approx(34.5 / 6)
    # anchors at weight 0: only the trained steps count, still over all 6 entries
    assert float(anchored_kl_term(kl, 1, 0.5, 0.0)) == pytest.approx(2.5 / 6)
    # no anchor columns: the anchor weight has nothing to weigh
    assert float(anchored_kl_term(kl, 3, 0.5, 9.0)) == pytest.approx(1.75)


def test_anchored_kl_term_gradient_follows_the_step_weights():
    kl = torch.ones(2, 3, requires_grad=True)
    anchored_kl_term(kl, 2, 0.3, 3.0).backward()
    torch.testing.assert_close(kl.grad, torch.tensor([[0.3, 0.3, 3.0], [0.3, 0.3, 3.0]]) / 6)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(torch.zeros(4, 1), torch.ones(4, 1), torch.zeros(3))
    with pytest.raises(ValueError, match="weights"):
        group_advantages(torch.zeros(4, 2), torch.ones(4, 1), torch.zeros(4))


def _step_log_probs(x_next, mean, std):
    """[R, S] log-probs of [R, S, D] samples under [R, S, D] means and [R, S] stds (the trainers' density)."""
    r, s = std.shape
    return gaussian_log_prob(x_next.flatten(0, 1), mean.flatten(0, 1), std.flatten()).view(r, s)


def test_guard_log_ratio_hand_computed():
    # D = 2, std 0.5, sample (0.2, 0.1) drawn around mean_old 0; the new mean moved to (0.1, 0.1):
    # plain log-ratio = mean((0.04 - 0.01), (0.01 - 0)) / (2 * 0.25) = 0.04; moved = mean(0.01, 0.01) = 0.01;
    # guard = 0.5 * 0.04 + 0.01 / (2 * 0.5) = 0.03 = (z . d) / D with z = (0.4, 0.2), d = (0.1, 0.1)
    x = torch.tensor([[[0.2, 0.1]]])
    old, new = torch.zeros(1, 1, 2), torch.tensor([[[0.1, 0.1]]])
    std = torch.tensor([[0.5]])
    plain = _step_log_probs(x, new, std) - _step_log_probs(x, old, std)
    assert plain.item() == pytest.approx(0.04, abs=1e-6)
    guard = guard_log_ratio(_step_log_probs(x, new, std), _step_log_probs(x, old, std), new, old, std)
    assert guard.item() == pytest.approx(0.03, abs=1e-6)


def test_guard_log_ratio_is_centred_where_the_plain_one_is_biased():
    gen = torch.Generator().manual_seed(0)
    r, d = 4000, 16
    std = torch.tensor([0.02, 0.5]).expand(r, 2)  # a low-noise and a high-noise step
    old = torch.randn(r, 2, d, generator=gen)
    new = old + 0.01 * torch.randn(r, 2, d, generator=gen)
    x = old + std[..., None] * torch.randn(r, 2, d, generator=gen)
    lp_new, lp_old = _step_log_probs(x, new, std), _step_log_probs(x, old, std)
    plain, guard = lp_new - lp_old, guard_log_ratio(lp_new, lp_old, new, old, std)
    # plain: mean -|d|^2 / (2 std^2 D) = -0.01^2 / (2 * 0.02^2) = -0.125 at the low-noise step
    assert plain[:, 0].mean().item() == pytest.approx(-0.125, rel=0.1)
    for step in range(2):  # guard: centred at both steps, with the same spread |d| / D = 0.01 / 4
        assert abs(guard[:, step].mean().item()) < 4 * 0.0025 / math.sqrt(r)
        assert guard[:, step].std().item() == pytest.approx(0.0025, rel=0.1)


def test_guard_ratio_is_one_before_an_update_and_reweights_the_gradient_by_std():
    gen = torch.Generator().manual_seed(1)
    old = torch.randn(3, 2, 5, generator=gen)
    std = torch.tensor([[0.1, 0.4]]).expand(3, 2)
    x = old + std[..., None] * torch.randn(3, 2, 5, generator=gen)
    lp_old = _step_log_probs(x, old, std)
    adv = torch.tensor([1.0, -0.5, 0.3])
    grads = {}
    for guard in (False, True):
        mean = old.clone().requires_grad_(True)
        lp_new = _step_log_probs(x, mean, std)
        log_ratio = guard_log_ratio(lp_new, lp_old, mean, old, std) if guard else None
        loss, stats = ppo_clip_loss(lp_new, lp_old, adv, 0.2, log_ratio=log_ratio)
        assert stats["ratio_dev"].item() == 0.0
        (grads[guard],) = torch.autograd.grad(loss, mean)
    torch.testing.assert_close(grads[True], grads[False] * std[..., None])
