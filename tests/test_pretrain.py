"""Flow-matching pretraining pieces: loss, prompt dropout, schedule, EMA."""

import dataclasses

import numpy as np
import torch

from flowrl.config import BaseConfig, FlowRLConfig, from_dict
from flowrl.models import create_model
from flowrl.pretrain import draw_batch, drop_prompts, flow_matching_loss, lr_at, pretrain
from flowrl.rl.ema import EMA

TINY = {"model": {"shapes": {"width": 32, "depth": 1, "heads": 2, "head_channels": 4}}}


def test_loss_is_zero_for_the_exact_velocity():
    class Oracle:
        def velocity(self, x_t, t, cond):
            return cond.tensors["noise"] - cond.tensors["x0"]

    from flowrl.models.base import Condition

    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    cond = Condition({"x0": x0, "noise": noise})
    assert flow_matching_loss(Oracle(), x0, cond, torch.rand(3), noise).item() == 0.0


def test_draw_batch_mixes_tasks():
    batch = draw_batch(np.random.default_rng(0), 10, 0.6, 32)
    assert batch.n_t2i == 4 and batch.targets.shape == (10, 3, 32, 32)
    assert batch.sources.shape == (6, 3, 32, 32)


def test_drop_prompts_only_drops_text():
    model = create_model(from_dict(FlowRLConfig, TINY))
    batch = draw_batch(np.random.default_rng(0), 8, 1.0, 32)
    cond = model.encode_prompts(batch.prompts, batch.sources)
    dropped = drop_prompts(model, cond, 1.0, torch.Generator().manual_seed(0))
    assert torch.all(dropped.tensors["tokens"] == 0)
    assert torch.equal(dropped.tensors["source"], cond.tensors["source"])
    kept = drop_prompts(model, cond, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(kept.tensors["tokens"], cond.tensors["tokens"])


def test_lr_schedule_warms_up_then_decays():
    cfg = BaseConfig(steps=100, lr=1.0, warmup_steps=10)
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert lr_at(10, cfg) == 1.0 and abs(lr_at(99, cfg) - 0.1) < 1e-3


def test_ema_moves_toward_the_weights():
    net = torch.nn.Linear(2, 2)
    ema = EMA(net, 0.5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(2.0)
    before = [p.clone() for p in ema.shadow.parameters()]
    ema.update(net)
    for avg, old, cur in zip(ema.shadow.parameters(), before, net.parameters()):
        torch.testing.assert_close(avg, 0.5 * old + 0.5 * cur)


def test_loss_falls_on_a_tiny_run():
    torch.set_num_threads(1)
    config = from_dict(FlowRLConfig, TINY)
    model = create_model(config)
    losses = []
    cfg = dataclasses.replace(config.base, steps=60, batch_size=8, warmup_steps=5, log_every=1, ema_decay=0.0)
    pretrain(model, cfg, 32, seed=0, log=lambda m, s: losses.append(m["train/loss"]), progress=False)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5])
