"""Flow-matching pretraining of the shapes model (the `base` stage's work).

Each step draws fresh T2I pairs and edit triples from the grammar, renders
them, and minimises the velocity loss ``||v_theta(x_t, t, c) - (eps - x_0)||^2``
with ``t`` drawn logit-normal (more weight to mid-noise). The prompt is
dropped with probability ``cond_dropout`` so the null branch used by CFG is
trained too; for edits only the text is dropped, the source stays.
The steps run on the shared trainer loop (:class:`Pretrainer`), which
checkpoints them and resumes a stopped run.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from flowrl.config import BaseConfig
from flowrl.models import CheckpointError
from flowrl.models.base import Condition, FlowModel
from flowrl.models.shapes_dit import ShapesFlowModel
from flowrl.rl.engine import TorchEngine
from flowrl.rl.trainer import Checkpoints, LoopSettings, LoopTrainer, TrainResult
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
    return masked_null(model, cond, torch.rand(cond.batch_size, generator=generator) < p)


def masked_null(model: FlowModel, cond: Condition, drop: torch.Tensor) -> Condition:
    """``cond`` with the rows where ``drop`` [B] is true replaced by their null counterpart."""
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


TRAIN_METRICS = ("train/loss", "train/grad_norm", "train/lr", "train/images_per_s")  # what the tracker gets


class Pretrainer(LoopTrainer):
    """Flow-matching pretraining on the shared loop: one iteration is one
    optimizer step (AdamW with betas (0.9, 0.99) through the plain engine,
    which clips the gradient's global norm), the learning rate set from
    :func:`lr_at` before it and the EMA updated after it.

    The examples and the noise come from two random streams seeded once and
    running across steps (a numpy generator for the grammar, a torch one for
    ``t``, noise and prompt dropout); checkpoints hold their states
    (:meth:`extra_state`), so a resumed run draws what the uninterrupted one
    would have. The tracker gets the training metrics every
    ``cfg.log_every`` steps and after the last, at the step's index."""

    def __init__(self, model: ShapesFlowModel, cfg: BaseConfig, resolution: int, seed: int, *,
                 checkpoints: Checkpoints | None = None, config_hash: str = ""):
        net = model.net
        net.train()
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)
        # foreach: the multi-tensor AdamW (bit-identical to the per-tensor loop on the CPU, faster)
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99),
                                      foreach=True)
        engine = TorchEngine.of(net, optimizer, cfg.grad_clip)
        ema = engine.make_ema(cfg.ema_decay) if cfg.ema_decay > 0 else None
        settings = LoopSettings(iterations=cfg.steps, eval_every=cfg.steps, checkpoint_every=cfg.checkpoint_every,
                                name="base", tracked="train/loss")
        super().__init__(model, net, engine, ema, settings, checkpoints=checkpoints, config_hash=config_hash)
        self.cfg, self.resolution = cfg, resolution
        self._start, self._seen = None, 0  # images per second since this process's first step

    def step(self, iteration: int) -> dict[str, float]:
        cfg, model = self.cfg, self.model
        if self._start is None:
            self._start = time.perf_counter()
        batch = draw_batch(self.rng, cfg.batch_size, cfg.edit_fraction, self.resolution)
        x0 = model.encode_images(batch.targets)
        t = logit_normal_t(len(batch.prompts), self.gen)
        noise = torch.randn(x0.shape, generator=self.gen)
        lr = lr_at(iteration, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = _step_loss(model, batch, x0, t, noise, cfg.cond_dropout, self.gen)
        self.engine.zero_grad()
        self.engine.backward(loss)
        grad_norm = self.engine.step()
        if self.ema is not None:
            self.ema.update(self.module)
        self._seen += len(batch.prompts)
        rate = self._seen / (time.perf_counter() - self._start)
        return {"train/loss": loss.item(), "train/grad_norm": grad_norm, "train/lr": lr, "train/images_per_s": rate}

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.4f}", "img_s": f"{metrics['train/images_per_s']:.0f}"}

    def extra_state(self) -> dict:
        return {"numpy_rng": self.rng.bit_generator.state, "torch_generator": self.gen.get_state()}

    def load_extra_state(self, extra: dict) -> None:
        try:
            self.rng.bit_generator.state = extra["numpy_rng"]
            self.gen.set_state(extra["torch_generator"])
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"base checkpoint: unusable random-stream state ({str(exc)[:200]})") from None

    def train(self, log_metrics: Callable[[dict[str, float], int], None] | None = None, progress: bool = True,
              stop_after: int | None = None) -> TrainResult:
        every, last = self.cfg.log_every, self.cfg.steps - 1

        def logged(metrics: dict[str, float], done: int) -> None:
            step = done - 1  # the loop counts the steps done; the tracker gets the step's index
            if step % every == 0 or step == last:
                log_metrics({key: metrics[key] for key in TRAIN_METRICS}, step)

        return super().train(logged if log_metrics is not None else None, progress, stop_after)

    def trained_model(self) -> ShapesFlowModel:
        """The model holding the weights to save: the EMA copy when ``cfg.ema_decay`` > 0, else the
        trained one (in eval mode)."""
        self.module.eval()
        if self.ema is None:
            return self.model
        return ShapesFlowModel(self.ema.shadow, cfg_renorm=self.model.cfg_renorm_dim is not None)


def pretrain(
    model: ShapesFlowModel,
    cfg: BaseConfig,
    resolution: int,
    seed: int,
    log: Callable[[dict[str, float], int], None] | None = None,
    progress: bool = True,
) -> ShapesFlowModel:
    """Train ``model`` in place (no checkpoints); return the model holding the weights to save
    (the EMA copy when ``cfg.ema_decay`` > 0)."""
    trainer = Pretrainer(model, cfg, resolution, seed)
    trainer.train(log, progress=progress)
    return trainer.trained_model()


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


def supervised_loss(model: FlowModel, batch_size: int, edit_fraction: float, cond_dropout: float, resolution: int,
                    seed: int, iteration: int, stream: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """The pretraining loss on ``batch_size`` fresh examples of the grammar's train split, drawn as the base
    stage draws them (its T2I / edit mix, prompt dropout, logit-normal t) but from a stream fixed by
    (``seed``, ``iteration``, ``stream``): an RL step that adds it (PPO-ptx's pretraining mix) replays the
    same examples and noise when resumed. Every rank draws the whole batch and takes its ``1 / world`` of
    the T2I rows and of the edit rows (so every rank runs the same forwards, as ZeRO-3's gathers need),
    weighted so that the mean over ranks is the batch's mean loss: ``world`` processes take the step one
    process takes. Both row counts must be multiples of ``world``."""
    n_edit = int(round(batch_size * edit_fraction))
    n_t2i = batch_size - n_edit
    if n_t2i % world or n_edit % world:
        raise ValueError(f"the pretraining batch's {n_t2i} T2I and {n_edit} edit rows do not split over {world} "
                         "processes")
    state = np.random.SeedSequence([seed, iteration, stream]).generate_state(4, dtype=np.uint32)
    rng = np.random.default_rng(state[:2])
    gen = torch.Generator().manual_seed(int(state[2]) << 32 | int(state[3]))
    batch = draw_batch(rng, batch_size, edit_fraction, resolution)
    n = len(batch.prompts)
    x0 = model.encode_images(batch.targets)  # [n, C, H, W]
    t = logit_normal_t(n, gen)
    noise = torch.randn(x0.shape, generator=gen)
    drop = torch.rand(n, generator=gen) < cond_dropout
    loss = torch.zeros(())
    # T2I rows and edit rows as two forwards (different sequence lengths); each part's mean weighs its rows
    for first, count in ((0, n_t2i), (n_t2i, n_edit)):
        if count == 0:
            continue
        share = count // world
        start, stop = first + rank * share, first + (rank + 1) * share
        sources = batch.sources[start - n_t2i:stop - n_t2i] if first else None
        cond = masked_null(model, model.encode_prompts(batch.prompts[start:stop], sources), drop[start:stop])
        part = flow_matching_loss(model, x0[start:stop], cond, t[start:stop], noise[start:stop])
        loss = loss + part * share
    return loss * (world / n)
