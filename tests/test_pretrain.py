"""Flow-matching pretraining pieces: loss, prompt dropout, schedule, EMA."""

import dataclasses

import numpy as np
import pytest
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


# ---------------------------------------------------------------------------- the shared loop
# The pretraining loop as it was before it moved onto the shared engine and loop (LoopTrainer):
# the reference the Pretrainer must match bit for bit (same draws, same order of operations).
def _reference_pretrain(model, cfg, resolution, seed, log):
    from flowrl.models.shapes_dit import ShapesFlowModel
    from flowrl.pretrain import _step_loss, logit_normal_t

    net = model.net
    net.train()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = EMA(net, cfg.ema_decay) if cfg.ema_decay > 0 else None
    for step in range(cfg.steps):
        batch = draw_batch(rng, cfg.batch_size, cfg.edit_fraction, resolution)
        x0 = model.encode_images(batch.targets)
        t = logit_normal_t(len(batch.prompts), gen)
        noise = torch.randn(x0.shape, generator=gen)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = _step_loss(model, batch, x0, t, noise, cfg.cond_dropout, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
        opt.step()
        if ema is not None:
            ema.update(net)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            log({"train/loss": loss.item(), "train/grad_norm": float(grad_norm), "train/lr": lr_at(step, cfg)}, step)
    net.eval()
    return model if ema is None else ShapesFlowModel(ema.shadow, cfg_renorm=model.cfg_renorm_dim is not None)


def _smoke(**base):
    from flowrl.config import load_config
    from tests.conftest import ROOT

    config = load_config(ROOT / "configs" / "smoke.yaml")
    return config, dataclasses.replace(config.base, **base)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.net.state_dict().items()}


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("ema_decay", [0.9, 0.0])
def test_pretrain_on_the_shared_loop_equals_the_old_loop_bit_for_bit(ema_decay):
    """Smoke config (12 steps, logged every 4): the same weights (EMA or raw) and the same logged metrics."""
    torch.set_num_threads(1)
    config, cfg = _smoke(ema_decay=ema_decay)
    res, seed = config.world.resolution, config.run.seed
    ref_log, new_log = [], []
    torch.manual_seed(5)
    reference = _reference_pretrain(create_model(config, seed=seed), cfg, res, seed,
                                    lambda m, s: ref_log.append((s, m)))
    torch.manual_seed(5)
    trained = pretrain(create_model(config, seed=seed), cfg, res, seed,
                       log=lambda m, s: new_log.append((s, m)), progress=False)
    _assert_same(_weights(reference), _weights(trained))
    assert [s for s, _ in new_log] == [s for s, _ in ref_log] == [0, 4, 8, 11]
    for (_, ref), (_, new) in zip(ref_log, new_log):
        assert set(new) == {*ref, "train/images_per_s"}
        assert all(new[k] == ref[k] for k in ref)  # exact floats
    assert not trained.net.training


def test_pretrain_resumed_after_k_steps_equals_the_uninterrupted_run(tmp_path):
    """Stopped after 5 steps (checkpoints every 5 and 2) and resumed: the same weights, EMA, history."""
    from flowrl.pretrain import Pretrainer
    from flowrl.rl.trainer import Checkpoints
    from flowrl.storage import ArtifactStore

    torch.set_num_threads(1)
    store = ArtifactStore(str(tmp_path / "store"))
    for every in (5, 2):  # the stop at a checkpoint, and past one (steps 5 and 6 are redone)
        config, cfg = _smoke(checkpoint_every=every)
        res, seed = config.world.resolution, config.run.seed

        def trainer(version):
            return Pretrainer(create_model(config, seed=seed), cfg, res, seed,
                              checkpoints=Checkpoints(store, "base", version))

        torch.manual_seed(0)
        whole = trainer(f"whole{every}")
        whole.train(progress=False)
        torch.manual_seed(0)
        first = trainer(f"split{every}")
        first.train(progress=False, stop_after=5)
        assert first.state.iteration == 5
        torch.manual_seed(123)  # the resumed process starts elsewhere: the checkpoint restores every stream
        second = trainer(f"split{every}")
        assert second.resume() and second.state.iteration == 5 - 5 % every
        second.train(progress=False)
        _assert_same(_weights(whole.trained_model()), _weights(second.trained_model()))
        _assert_same(whole.module.state_dict(), second.module.state_dict())
        drop = lambda h: [{k: v for k, v in e.items() if k in ("train/loss", "train/grad_norm", "train/lr")} for e in h]
        assert drop(whole.state.history) == drop(second.state.history) and len(whole.state.history) == cfg.steps


def test_base_stage_resumes_to_the_uninterrupted_result(tmp_path):
    """`run_base(stop_after=...)` commits nothing; `resume=True` finishes from its checkpoint and commits the
    same weights and metrics as a run that was never stopped."""
    import hashlib

    from flowrl.config import load_config
    from flowrl.stages.base import run_base
    from flowrl.storage import ArtifactStore, fetch
    from flowrl.tracking import NullTracker
    from tests.conftest import write_config

    torch.set_num_threads(1)
    whole = run_base(load_config(write_config(tmp_path / "a")), progress=False, tracker=NullTracker())
    config = load_config(write_config(tmp_path / "b", base={"checkpoint_every": 4}))
    with pytest.raises(InterruptedError, match="stopped after iteration 6"):
        run_base(config, progress=False, stop_after=6, tracker=NullTracker())
    assert not ArtifactStore(config.run.artifact_root).exists("base", whole.version)
    resumed = run_base(config, progress=False, resume=True, tracker=NullTracker())
    assert resumed.version == whole.version  # checkpoint_every is operational
    digest = lambda r: hashlib.sha256((fetch(r.uri) / "model.safetensors").read_bytes()).hexdigest()
    assert digest(resumed) == digest(whole)
    timing = ("train_s", "eval_s", "wall_s")
    assert {k: v for k, v in resumed.metrics.items() if k not in timing} == \
        {k: v for k, v in whole.metrics.items() if k not in timing}
