"""Flow-matching pretraining of the shapes model (the `base` stage's work).

Each step draws fresh T2I pairs and edit triples from the grammar, renders
them, and minimises the velocity loss ``||v_theta(x_t, t, c) - (eps - x_0)||^2``
with ``t`` drawn logit-normal (more weight to mid-noise). The prompt is
dropped with probability ``cond_dropout`` so the null branch used by CFG is
trained too; for edits only the text is dropped, the source stays.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from flowrl.config import BaseConfig
from flowrl.rl.ema import EMA
from flowrl.models.base import Condition, FlowModel
from flowrl.models.shapes_dit import ShapesFlowModel
from flowrl.shapes.edits import EDIT_KINDS, sample_edit
from flowrl.shapes.prompts import T2I_CATEGORIES, sample_t2i
from flowrl.shapes.render import render_batch


@dataclass(frozen=True)
class TrainingBatch:
    prompts: list[str]
    targets: torch.Tensor  # [B, 3, H, W] in [0, 1]
    sources: torch.Tensor | None  # [B_edit, 3, H, W] in [0, 1] for the edit rows
    n_t2i: int  # rows [0, n_t2i) are T2I, the rest edits


def draw_batch(rng: np.random.Generator, batch_size: int, edit_fraction: float, resolution: int) -> TrainingBatch:
    """Fresh examples: categories and edit kinds uniformly at random."""
    n_edit = int(round(batch_size * edit_fraction))
    n_t2i = batch_size - n_edit
    t2i = [sample_t2i(rng, T2I_CATEGORIES[i]) for i in rng.integers(len(T2I_CATEGORIES), size=n_t2i)]
    edits = [sample_edit(rng, EDIT_KINDS[i]) for i in rng.integers(len(EDIT_KINDS), size=n_edit)]
    targets = render_batch([e.scene for e in t2i] + [e.target for e in edits], resolution)
    sources = render_batch([e.source for e in edits], resolution) if edits else None
    return TrainingBatch([e.prompt for e in t2i] + [e.instruction for e in edits], targets, sources, n_t2i)


def logit_normal_t(n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """t = sigmoid(N(mean, std)) -> [n] in (0, 1)."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def flow_matching_loss(
    model: FlowModel, x0: torch.Tensor, cond: Condition, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """Mean squared velocity error at ``x_t = (1 - t) x0 + t eps`` (scalar)."""
    tb = t[:, None, None, None]  # [B, 1, 1, 1]
    x_t = (1.0 - tb) * x0 + tb * noise  # [B, C, H, W]
    target = noise - x0  # [B, C, H, W]
    return ((model.velocity(x_t, t, cond) - target) ** 2).mean()


def drop_prompts(model: FlowModel, cond: Condition, p: float, generator: torch.Generator) -> Condition:
    """Replace each row's condition by its null counterpart with probability p."""
    drop = torch.rand(cond.batch_size, generator=generator) < p  # [B]
    null = model.null_condition(cond)
    tensors = {}
    for key, value in cond.tensors.items():
        mask = drop.reshape(-1, *[1] * (value.ndim - 1))
        tensors[key] = torch.where(mask, null.tensors[key], value)
    return Condition(tensors, dict(cond.extras))


def lr_at(step: int, cfg: BaseConfig) -> float:
    """Linear warm-up then cosine decay to 10 % of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain(
    model: ShapesFlowModel,
    cfg: BaseConfig,
    resolution: int,
    seed: int,
    log: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
) -> ShapesFlowModel:
    """Train ``model`` in place; return the model holding the weights to save
    (the EMA copy when ``cfg.ema_decay`` > 0)."""
    net = model.net
    net.train()
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema = EMA(net, cfg.ema_decay) if cfg.ema_decay > 0 else None
    bar = tqdm(range(cfg.steps), desc="base", disable=not progress, mininterval=2.0)
    start, seen = time.perf_counter(), 0
    for step in bar:
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
        seen += len(batch.prompts)
        if step % cfg.log_every == 0 or step == cfg.steps - 1:
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
            if log is not None:
                log({"train/loss": loss.item(), "train/grad_norm": float(grad_norm),
                     "train/lr": lr_at(step, cfg), "train/images_per_s": rate}, step)
    net.eval()
    if ema is None:
        return model
    return ShapesFlowModel(ema.shadow, cfg_renorm=model.cfg_renorm_dim is not None)


def _step_loss(model, batch: TrainingBatch, x0, t, noise, cond_dropout: float, gen) -> torch.Tensor:
    """Loss over the batch, T2I rows and edit rows as two forwards (different
    sequence lengths), weighted by their row counts."""
    n = batch.n_t2i
    total = len(batch.prompts)
    loss = torch.zeros(())
    if n > 0:
        cond = drop_prompts(model, model.encode_prompts(batch.prompts[:n]), cond_dropout, gen)
        loss = loss + flow_matching_loss(model, x0[:n], cond, t[:n], noise[:n]) * (n / total)
    if n < total:
        cond = drop_prompts(model, model.encode_prompts(batch.prompts[n:], batch.sources), cond_dropout, gen)
        loss = loss + flow_matching_loss(model, x0[n:], cond, t[n:], noise[n:]) * ((total - n) / total)
    return loss
