"""grpo.ptx_coef: the base's own flow-matching loss on fresh train-split examples, added to every GRPO step
(PPO-ptx's pretraining mix), so that RL on a few prompt texts keeps what the base learned of the others."""

from __future__ import annotations

import pytest
import torch

from flowrl.config import (ConfigError, check_consistency, FlowRLConfig, GRPOConfig, OptimConfig, RolloutConfig,
                           WindowTimestepsConfig, from_dict)
from flowrl.pretrain import draw_batch, supervised_loss
from flowrl.rl.grpo import GRPOTrainer, PromptSet
from flowrl.shapes.splits import bench_texts
from tests.rl.conftest import tiny_model
from tests.rl.ddp_update import PROMPTS, _task_batch


def _ptx(model, iteration, stream, rank=0, world=1):
    return supervised_loss(model, 8, 0.5, 0.1, 32, 303, iteration, stream, rank, world)


def test_the_mix_batch_is_fixed_by_seed_iteration_and_stream():
    model = tiny_model()
    with torch.no_grad():
        first = float(_ptx(model, 3, 0))
        assert first == float(_ptx(model, 3, 0))  # a resumed step replays its examples and noise
        others = {float(_ptx(model, 3, 1)), float(_ptx(model, 4, 0))}
        assert first not in others and len(others) == 2


@pytest.mark.parametrize("world", [2, 4])
def test_the_ranks_shares_average_to_the_whole_batch(world):
    """Each rank's share of one batch's T2I rows and of its edit rows, weighted by world / batch: their mean is
    the one-process loss, and so is the mean of their gradients (what DDP's all-reduce averages). Every rank
    runs both forwards (ZeRO-3 gathers the parameters of each forward on every rank)."""
    model = tiny_model()
    whole = _ptx(model, 5, 2)
    grads_whole = torch.autograd.grad(whole, list(model.net.parameters()), allow_unused=True)
    shares = [_ptx(model, 5, 2, r, world) for r in range(world)]
    torch.testing.assert_close(sum(shares) / world, whole)
    grads = [torch.autograd.grad(s, list(model.net.parameters()), allow_unused=True) for s in shares]
    for k, g in enumerate(grads_whole):
        if g is None:
            continue
        assert all(r[k] is not None for r in grads)  # both forwards on every rank
        total = sum(r[k] for r in grads)
        torch.testing.assert_close(total / world, g, atol=1e-8, rtol=1e-5)
    with pytest.raises(ValueError, match="4 T2I and 4 edit rows do not split over 3 processes"):
        _ptx(model, 5, 2, 0, 3)


def test_the_mix_draws_no_bench_text():
    """The same train split as the base stage's examples: a bench text would leak into training."""
    import numpy as np

    reserved = set().union(*bench_texts("t2i").values(), *bench_texts("edit").values())
    for seed in range(20):
        batch = draw_batch(np.random.default_rng(seed), 32, 0.5, 32)
        assert not reserved & set(batch.prompts)


def _trainer(ptx_coef: float):
    cfg = GRPOConfig(prompts_per_iteration=4, group_size=3, rollout=RolloutConfig(num_steps=3),
                     timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=2), reward_chunks=1,
                     optim=OptimConfig(lr=1e-3, grad_clip=1e9), ptx_coef=ptx_coef)
    model = tiny_model()
    trainer = GRPOTrainer(model, model.net, None, cfg, PromptSet(PROMPTS, ["x"] * 4, None), None,
                          lambda p: torch.ones(len(p), 1), supervised=_ptx)
    return model, trainer, cfg


def _flat_rewards(model, cfg):
    """Rollouts whose every group scored alike: zero advantages, so the clipped objective has no gradient."""
    batch = _task_batch(model, cfg, PROMPTS, None, 0, 1, 5)
    batch.advantages.zero_()
    return {"": batch}


def test_without_an_advantage_the_step_is_the_supervised_one_and_fits_the_data():
    """Zero advantages: no mix, no change; with the mix, the weights move and the pretraining loss on held
    examples falls over a few steps (it pulls toward the data, not elsewhere)."""
    model, trainer, cfg = _trainer(0.0)
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    trainer.update(_flat_rewards(model, cfg), iteration=0)
    assert all(torch.equal(before[n], p) for n, p in model.net.named_parameters())

    model, trainer, cfg = _trainer(1.0)
    with torch.no_grad():
        held = sum(float(_ptx(model, 10_000, s)) for s in range(4))
        first = float(_ptx(model, 0, 0))
    metrics = trainer.update(_flat_rewards(model, cfg), iteration=0)
    assert metrics["train/ptx"] == pytest.approx(first)  # the loss of iteration 0's batch, before its step
    for it in range(1, 15):
        trainer.update(_flat_rewards(model, cfg), iteration=it)
    with torch.no_grad():
        after = sum(float(_ptx(model, 10_000, s)) for s in range(4))
    assert after < held


def test_the_step_gradient_is_the_rl_gradient_plus_the_weighted_mix():
    """With real advantages: the accumulated gradient is the RL term's plus ptx_coef times the mix's, for two
    coefficients (an Adam step would hide the scale; the gradient does not)."""
    def grads(coef):
        model, trainer, cfg = _trainer(coef) if coef else _trainer(0.0)
        batch = _task_batch(model, cfg, PROMPTS, None, 0, 1, 5)
        step = trainer.engine.step
        trainer.engine.step = lambda: 0.0  # keep the accumulated gradient, take no step
        try:
            trainer.update({"": batch}, iteration=0)
        finally:
            trainer.engine.step = step
        return model, {n: p.grad.clone() for n, p in model.net.named_parameters() if p.grad is not None}

    model, rl = grads(0.0)
    mix = torch.autograd.grad(_ptx(model, 0, 0), [p for _, p in model.net.named_parameters()], allow_unused=True)
    mix = {n: g for (n, _), g in zip(model.net.named_parameters(), mix) if g is not None}
    assert any(g.abs().max() > 0 for g in rl.values()) and any(g.abs().max() > 0 for g in mix.values())
    for coef in (0.5, 2.0):
        _, both = grads(coef)
        for name, g in both.items():
            expected = rl.get(name, torch.zeros_like(g)) + coef * mix.get(name, torch.zeros_like(g))
            torch.testing.assert_close(g, expected, atol=1e-9, rtol=1e-4)


def test_a_positive_coefficient_needs_the_loss():
    cfg = GRPOConfig(ptx_coef=0.5)
    model = tiny_model()
    with pytest.raises(ValueError, match="ptx_coef"):
        GRPOTrainer(model, model.net, None, cfg, PromptSet(PROMPTS, ["x"] * 4, None), None,
                    lambda p: torch.ones(len(p), 1))


def test_the_config_refuses_the_mix_where_it_has_no_meaning():
    """A pretrained family has no grammar to draw from; an algorithm whose trainer takes no supervised term
    would drop it silently. Both fail when the config is checked, before the first stage."""
    from flowrl.config import load_config

    with pytest.raises(ConfigError, match="grpo.ptx_coef = 0.5: .* qwen_image has none"):
        load_config("configs/qwen_image.yaml", ["grpo.ptx_coef=0.5"])
    with pytest.raises(ConfigError, match="algorithm 'nft' takes no pretraining mix"):
        check_consistency(from_dict(FlowRLConfig, {"grpo": {"ptx_coef": 0.5, "algorithm": "nft"}}))
    check_consistency(from_dict(FlowRLConfig, {"grpo": {"ptx_coef": 0.5}}))  # the shapes family and GRPO
