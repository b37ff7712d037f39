"""grpo.ptx_coef: the base's own flow-matching loss on fresh train-split examples, added to every GRPO step
(PPO-ptx's pretraining mix), so that RL on a few prompt texts keeps what the base learned of the others."""

from __future__ import annotations

import pytest
import torch

from flowrl.config import (ConfigError, FlowRLConfig, GRPOConfig, OptimConfig, RolloutConfig,
                           WindowTimestepsConfig, from_dict)
from flowrl.pretrain import draw_batch, supervised_loss
from flowrl.rl.grpo import GRPOTrainer, PromptSet
from flowrl.shapes.splits import bench_texts
from tests.rl.conftest import tiny_model
from tests.rl.ddp_update import PROMPTS, _task_batch


def _ptx(model, iteration, stream):
    return supervised_loss(model, 8, 0.5, 0.1, 32, 303, iteration, stream)


def test_the_mix_batch_is_fixed_by_seed_iteration_and_stream():
    model = tiny_model()
    with torch.no_grad():
        first = float(_ptx(model, 3, 0))
        assert first == float(_ptx(model, 3, 0))  # a resumed step replays its examples and noise
        assert first != float(_ptx(model, 3, 1)) != float(_ptx(model, 4, 0))


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
    for it in range(15):
        metrics = trainer.update(_flat_rewards(model, cfg), iteration=it)
    assert metrics["train/ptx"] > 0
    with torch.no_grad():
        after = sum(float(_ptx(model, 10_000, s)) for s in range(4))
    assert after < held


def test_a_positive_coefficient_needs_the_loss():
    cfg = GRPOConfig(ptx_coef=0.5)
    model = tiny_model()
    with pytest.raises(ValueError, match="ptx_coef"):
        GRPOTrainer(model, model.net, None, cfg, PromptSet(PROMPTS, ["x"] * 4, None), None,
                    lambda p: torch.ones(len(p), 1))


def test_the_stage_refuses_the_mix_where_it_has_no_meaning():
    """A pretrained family has no grammar to draw from; an algorithm whose trainer takes no supervised term
    would drop it silently. Both fail before any work."""
    import types

    from flowrl.models.families import family_of
    from flowrl.rl.algorithms import algorithm
    from flowrl.stages.grpo import _pretraining_mix

    config = from_dict(FlowRLConfig, {"grpo": {"ptx_coef": 0.5}})
    grpo = algorithm("grpo", "reward").trainer
    assert _pretraining_mix(config, family_of(config), grpo) is not None
    with pytest.raises(ConfigError, match="grpo.ptx_coef = 0.5: .* qwen_image has none"):
        config_q = from_dict(FlowRLConfig, {"grpo": {"ptx_coef": 0.5}, "model": {"family": "qwen_image"}})
        _pretraining_mix(config_q, types.SimpleNamespace(from_pretrained=True), grpo)
    with pytest.raises(ConfigError, match="algorithm 'nft' takes no pretraining mix"):
        config_n = from_dict(FlowRLConfig, {"grpo": {"ptx_coef": 0.5, "algorithm": "nft"}})
        _pretraining_mix(config_n, family_of(config_n), algorithm("nft", "reward").trainer)
    assert _pretraining_mix(from_dict(FlowRLConfig, {}), None, None) is None  # off: nothing is checked
