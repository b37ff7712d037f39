"""DiffusionNFT (Zheng et al. 2025): reward learning on the forward process, as the algorithm ``nft``.

GRPO scores whole reverse trajectories through the log-probs of their stochastic steps. DiffusionNFT looks
only at where a trajectory ends: each clean sample ``x0`` (from any sampler, the deterministic one by
default) gets an optimality probability ``r`` in [0, 1], and the policy is trained with the ordinary
flow-matching loss on fresh noisings of those samples, split into a positive and a negative part.

One iteration (``grpo.*`` keys unless said otherwise; ``nft.*`` is ``grpo.nft.*``):

1. Draw ``prompts_per_iteration`` prompts exactly as GRPO does (each rank its share of the groups) and
   sample ``group_size`` images each with the *sampling policy* theta_old, over ``model.schedule(
   rollout.num_steps)`` with the rollout's guidance (guided unless ``rollout.cfg_mode`` is none) and sampler
   noise ``nft.noise_level`` (0: the ODE). The rewards of chunk i are computed while chunk i + 1 samples
   (``reward_chunks``), as in GRPO.
2. Advantages ``A`` are GRPO's: per-component group normalisation weighted by category
   (:func:`~flowrl.rl.objectives.group_advantages`), times the optional category scale, clipped at
   ``advantage_clip``. The optimality probability is ``r = 0.5 + 0.5 clip(A / nft.adv_max, -1, 1)``
   (:func:`optimality`).
3. Each sample is noised ``K = nft.timesteps_per_sample`` times: ``t`` one of the schedule's noisy sigmas
   within ``[nft.t_min, nft.t_max]`` (``nft.timestep_mode`` schedule, uniformly) or uniform in that interval,
   ``eps ~ N(0, I)``, ``x_t = (1 - t) x0 + t eps``, target velocity ``v* = eps - x0``. Both are drawn per
   sample from a generator seeded by (seed, iteration, global row), so they do not depend on how the batch
   is split across ranks.
4. ``v_old = v_{theta_old}(x_t, t, c)`` without gradient (the conditional branch), once per iteration;
   then ``epochs`` passes over the samples in ``minibatches`` optimizer steps each, every step minimising
   (:func:`nft_loss`), with ``v = v_theta(x_t, t, c)`` and ``d = v - v_old``:

   ``v+ = v_old + beta d``, ``v- = v_old - beta d`` (the paper's ``(1 - beta) v_old + beta v`` and
   ``(1 + beta) v_old - beta v``, written so that ``v = v_old`` gives ``v+ = v- = v_old`` exactly),
   ``L = mean_rows[ r |v+ - v*|^2 + (1 - r) |v- - v*|^2 ]`` (each norm a mean over latent elements),
   plus ``kl_coef mean |v - v_ref|^2`` with a reference model. ``nft.adaptive_weight`` measures each term in
   x0-prediction space instead, where ``x0_hat - x0 = (x_t - t v+-) - x0 = -t (v+- - v*)``, divided by its
   detached mean absolute value: ``|t e|^2 / sg(mean |t e|)`` for ``e = v+- - v*``.
5. The sampling policy follows softly: after iteration ``i`` (from 0),
   ``theta_old <- eta_i theta_old + (1 - eta_i) theta`` with ``eta_i = min(nft.decay_rate i,
   nft.decay_max)`` (defaults 0.001 and 0.5, the paper's schedule as we recall it), so early on it tracks
   theta and later lags it by up to half.

Why it improves the policy: at a given ``x_t`` let ``a`` be the velocity of the positive samples (``v*``
weighted by ``r``), ``b`` that of the negatives (weighted by ``1 - r``) and ``p`` the positive share. Setting
the loss's gradient to zero gives ``beta d = p a - (1 - p) b - (2p - 1) v_old``; when theta_old fits its own
samples (``v_old = p a + (1 - p) b``) this is ``d = 2 p (1 - p) (a - b) / beta``: the policy moves from the
negative samples' velocity towards the positive ones', a guidance direction learned into the weights, no
log-probs and no particular sampler needed. Two consequences the tests pin down: with theta = theta_old and
every ``r = 1/2`` the gradient is exactly zero (nothing to learn from ties), and with every ``r = 1`` it is
``2 beta (v+ - v*) / (rows x elements)``, the flow-matching gradient towards the samples scaled by beta.

The final weights are theta (or its EMA with ``optim.ema_decay``, as GRPO). theta_old is a full copy of the
trained parameters (:class:`~flowrl.rl.ema.EMA`, with a decay set per iteration) and is part of every
checkpoint (``extra_state``), so a resumed run replays the uninterrupted one; that needs the plain engine
(``optim.zero_stage`` 0), which the constructor and the config check. One task at a time (no Mix-RL).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from flowrl.config import GRPOConfig, category_weights
from flowrl.models import CheckpointError
from flowrl.models.base import Condition, FlowModel
from flowrl.models.lora import enable_gradient_checkpointing
from flowrl.rewards.base import RewardScores
from flowrl.rewards.client import RewardClientError
from flowrl.rl.algorithms import register_algorithm
from flowrl.rl.distributed import mean_across_ranks
from flowrl.rl.ema import EMA
from flowrl.rl.engine import make_engine
from flowrl.rl.grpo import (
    PromptSet,
    RewardSubmitter,
    TaskData,
    cat_cond,
    draw_prompts,
    loop_settings,
    scored_advantages,
    settings_of,
)
from flowrl.rl.rollout import compiled_view, decode_in_parts
from flowrl.rl.trainer import Checkpoints, LoopTrainer, seeded_generator
from flowrl.sampling import sample

log = logging.getLogger(__name__)

__all__ = ["NFTBatch", "NFTTrainer", "nft_loss", "optimality", "soft_update_weight", "draw_noise_levels"]

# the smallest mean absolute x0 error the adaptive weight divides by
ADAPTIVE_FLOOR = 1e-5


# ---------------------------------------------------------------------- pure functions
def optimality(advantages: torch.Tensor, adv_max: float) -> torch.Tensor:
    """The optimality probability ``r = 0.5 + 0.5 clip(A / adv_max, -1, 1)`` of each sample: [B] -> [B]."""
    if adv_max <= 0:
        raise ValueError(f"adv_max must be > 0, got {adv_max}")
    return 0.5 + 0.5 * (advantages / adv_max).clamp(-1.0, 1.0)


def soft_update_weight(iteration: int, rate: float, cap: float) -> float:
    """``eta_i = min(rate i, cap)``: the weight theta_old keeps of itself after iteration ``i`` (from 0)."""
    return min(rate * iteration, cap)


def nft_loss(
    v: torch.Tensor, v_old: torch.Tensor, target: torch.Tensor, r: torch.Tensor, beta: float,
    t: torch.Tensor | None = None, adaptive: bool = False,
) -> torch.Tensor:
    """DiffusionNFT's loss, the mean over rows of ``r |v+ - v*|^2 + (1 - r) |v- - v*|^2``.

    v (with gradient), v_old, target (``v*``): [R, *latent]; r: [R]; ``v+- = v_old +- beta (v - v_old)``;
    each squared norm is a mean over the latent elements. ``adaptive``: each term is measured in
    x0-prediction space instead, ``|t e|^2 / sg(mean |t e|)`` with ``e = v+- - v*`` (needs ``t`` [R])."""
    if not (v.shape == v_old.shape == target.shape) or r.shape != v.shape[:1]:
        raise ValueError(f"v {tuple(v.shape)}, v_old {tuple(v_old.shape)} and target {tuple(target.shape)} must be "
                         f"[R, *latent] and r {tuple(r.shape)} must be [R]")
    step = beta * (v - v_old)
    err_pos, err_neg = (v_old + step) - target, (v_old - step) - target
    if adaptive:
        if t is None or t.shape != r.shape:
            raise ValueError("the adaptive weighting needs t [R]")
        scale = t.to(v.dtype).reshape(-1, *[1] * (v.ndim - 1))
        err_pos, err_neg = scale * err_pos, scale * err_neg
        pos = _mean_sq(err_pos) / err_pos.detach().abs().flatten(1).mean(dim=1).clamp_min(ADAPTIVE_FLOOR)
        neg = _mean_sq(err_neg) / err_neg.detach().abs().flatten(1).mean(dim=1).clamp_min(ADAPTIVE_FLOOR)
    else:
        pos, neg = _mean_sq(err_pos), _mean_sq(err_neg)
    r = r.to(device=pos.device, dtype=pos.dtype)
    return (r * pos + (1.0 - r) * neg).mean()


def _mean_sq(x: torch.Tensor) -> torch.Tensor:
    return (x**2).flatten(1).mean(dim=1)


def draw_noise_levels(u: torch.Tensor, mode: str, t_min: float, t_max: float,
                      sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Noise levels t from uniform draws ``u`` in [0, 1): ``uniform`` maps them onto [t_min, t_max);
    ``schedule`` picks one of the noisy ``sigmas`` (all but the last, 0) within [t_min, t_max], each as
    likely."""
    if mode == "uniform":
        return t_min + (t_max - t_min) * u
    if mode != "schedule":
        raise ValueError(f"timestep mode must be schedule or uniform, got {mode!r}")
    levels = schedule_levels(sigmas, t_min, t_max)
    index = (u * len(levels)).long().clamp(max=len(levels) - 1)
    return levels[index]


def schedule_levels(sigmas: torch.Tensor, t_min: float, t_max: float) -> torch.Tensor:
    """The schedule's noisy sigmas within [t_min, t_max]; a ValueError naming the keys when there are none."""
    noisy = sigmas[:-1].to(torch.float32)
    levels = noisy[(noisy >= t_min) & (noisy <= t_max)]
    if len(levels) == 0:
        raise ValueError(f"grpo.nft.t_min {t_min} / grpo.nft.t_max {t_max}: none of the rollout schedule's sigmas "
                         f"{[round(float(s), 4) for s in noisy]} lies in between (grpo.nft.timestep_mode schedule)")
    return levels


# ---------------------------------------------------------------------- the trainer
@dataclass(frozen=True)
class NFTBatch:
    """One rank's samples of an iteration: B = its prompts x G rows, a prompt's rows adjacent."""

    prompts: list[str]  # [B]
    group_ids: torch.Tensor  # [B]
    cond: Condition  # [B]
    latents: torch.Tensor  # [B, *latent] the clean samples x0
    scores: RewardScores
    advantages: torch.Tensor  # [B], clipped
    first_row: int = 0  # the global index of row 0 (the rank's offset): seeds the per-row draws

    @property
    def batch_size(self) -> int:
        return len(self.prompts)


def _row_generator(seed: int, iteration: int, row: int) -> torch.Generator:
    """The generator of one sample's noise levels and noise (by its global row)."""
    state = np.random.SeedSequence([seed, iteration, 7, row]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@register_algorithm("nft", kind="reward")
class NFTTrainer(LoopTrainer):
    """DiffusionNFT on one task, constructed as :class:`~flowrl.rl.grpo.GRPOTrainer` is (the same stage,
    rewards, filtering, monitor and checkpoints); ``grpo.nft`` holds its own settings."""

    fatal_errors = (RewardClientError,)

    def __init__(
        self,
        model: FlowModel,
        module: torch.nn.Module,
        reference: FlowModel | None,
        cfg: GRPOConfig,
        prompts: PromptSet,
        rewards: RewardSubmitter,
        weights: Callable[[list[str]], torch.Tensor],
        monitor: Callable[[FlowModel, int], dict[str, float]] | None = None,
        checkpoints: Checkpoints | None = None,
        config_hash: str = "",
        category_scale: dict[str, float] | None = None,
    ):
        if isinstance(prompts, dict):
            raise ValueError("grpo.algorithm nft trains one task at a time (no Mix-RL)")
        if cfg.kl_coef > 0 and reference is None:
            raise ValueError("grpo.kl_coef > 0 needs a reference model")
        opt = cfg.optim
        if opt.zero_stage > 0:
            raise ValueError(f"grpo.optim.zero_stage = {opt.zero_stage} with grpo.algorithm nft: its sampling policy "
                             "(a copy of the trained weights, saved in its checkpoints) is kept by the plain engine "
                             "only; use zero_stage 0")
        if cfg.nft.t_min >= cfg.nft.t_max:
            raise ValueError(f"grpo.nft.t_min {cfg.nft.t_min} must be below grpo.nft.t_max {cfg.nft.t_max}")
        if opt.gradient_checkpointing:  # before the engine wraps the module
            enable_gradient_checkpointing(module, "grpo.optim.gradient_checkpointing")
        engine = make_engine(model, module, lr=opt.lr, weight_decay=opt.weight_decay, grad_clip=opt.grad_clip,
                             zero_stage=0, ema=opt.ema_decay > 0, where="grpo", trainable=cfg.trainable)
        ema = engine.make_ema(opt.ema_decay) if opt.ema_decay > 0 else None
        super().__init__(model, module, engine, ema, loop_settings(cfg, name="nft"), monitor, checkpoints,
                         config_hash)
        if cfg.prompts_per_iteration % (cfg.reward_chunks * self.world):
            raise ValueError(
                f"grpo.reward_chunks = {cfg.reward_chunks} times the {self.world} process(es) must divide "
                f"grpo.prompts_per_iteration = {cfg.prompts_per_iteration}"
            )
        self.reference, self.cfg = reference, cfg
        self.task = TaskData(prompts, rewards, weights)
        self.category_scale = category_scale or {}
        self.sampling_weights = category_weights(cfg.sampling_weights, "grpo.sampling_weights")
        self.settings = settings_of(cfg)
        self.sigmas = model.schedule(self.settings.num_steps, self.settings.shift)
        if cfg.nft.timestep_mode == "schedule":
            schedule_levels(self.sigmas, cfg.nft.t_min, cfg.nft.t_max)  # some level to train, or a clear error
        self.old = EMA(module, 0.0)  # theta_old: the trained parameters' copy the rollouts are sampled with
        self.train_model = self.engine.view(model)

    @property
    def prompts(self) -> PromptSet:
        return self.task.prompts

    # ------------------------------------------------------------------ sampling (with theta_old)
    @torch.no_grad()
    def _sample(self, prompts: list[str], sources: torch.Tensor | None, gen: torch.Generator,
                window: tuple[int, int] | None = None):
        """(rows' condition, clean latents, images) of ``group_size`` samples per prompt; the sampler is the
        rollout's (grpo.rollout: dynamics, SDE window of the iteration, ODE solver) at ``nft.noise_level``."""
        s, group = self.settings, self.cfg.group_size
        group_ids = torch.arange(len(prompts)).repeat_interleave(group)
        cond = self.model.encode_prompts(list(prompts), sources).index(group_ids)
        null_cond = self.model.null_condition(cond) if s.guided else None
        traj = sample(compiled_view(self.model) if s.compile else self.model, cond, self.sigmas,
                      null_cond=null_cond, guidance_scale=s.guidance_scale if s.guided else 1.0,
                      renorm_dim=self.model.cfg_renorm_dim, noise_level=self.cfg.nft.noise_level,
                      generator=gen, micro_batch=s.micro_batch, dynamics=s.dynamics, sde_window=window,
                      ode_solver=s.ode_solver)
        latents = traj.final
        return cond, latents, decode_in_parts(self.model, latents, s.micro_batch)

    def collect(self, iteration: int) -> NFTBatch:
        """This rank's samples and their advantages, drawn as GRPO draws them (call it with theta_old in
        the module: :meth:`step` does)."""
        cfg, task = self.cfg, self.task
        gen = seeded_generator(cfg.seed, iteration, stream=100 + self.rank)
        chosen = draw_prompts(task.prompts, cfg.prompts_per_iteration, cfg.seed, iteration, self.sampling_weights,
                              cfg.balance_categories)
        chosen = chosen.reshape(self.world, -1)[self.rank]  # this rank's share of the groups
        per_chunk = len(chosen) // cfg.reward_chunks
        conds, latents, futures = [], [], []
        for c in range(cfg.reward_chunks):
            idx = chosen[c * per_chunk : (c + 1) * per_chunk]
            prompts = [task.prompts.prompts[i] for i in idx]
            sources = None if task.prompts.sources is None else task.prompts.sources[torch.as_tensor(idx)]
            cond, x0, images = self._sample(prompts, sources, gen, self.settings.window(iteration))
            rows = [p for p in prompts for _ in range(cfg.group_size)]
            row_sources = None if sources is None else sources.repeat_interleave(cfg.group_size, dim=0)
            futures.append(task.rewards.submit(images, rows, row_sources))  # scored while the next chunk samples
            conds.append(cond)
            latents.append(x0)
        scores = [f.result() for f in futures]
        prompts = [task.prompts.prompts[i] for i in chosen for _ in range(cfg.group_size)]
        categories = [task.prompts.categories[i] for i in chosen for _ in range(cfg.group_size)]
        group_ids = torch.arange(len(chosen)).repeat_interleave(cfg.group_size)
        joined, adv = scored_advantages(scores, task, prompts, categories, group_ids, self.category_scale,
                                        cfg.advantage_clip)
        return NFTBatch(prompts, group_ids, cat_cond(conds), torch.cat(latents), joined, adv,
                        first_row=self.rank * len(prompts))

    # ------------------------------------------------------------------ the update
    def _noised(self, batch: NFTBatch, iteration: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x_t, t, v*) [B K, *latent], [B K], [B K, *latent]: K noisings of every sample, row-major."""
        nft, x0 = self.cfg.nft, batch.latents
        k = nft.timesteps_per_sample
        levels, noise = [], []
        for row in range(batch.batch_size):
            gen = _row_generator(self.cfg.seed, iteration, batch.first_row + row)
            levels.append(draw_noise_levels(torch.rand(k, generator=gen), nft.timestep_mode, nft.t_min, nft.t_max,
                                            self.sigmas))
            noise.append(torch.randn((k, *x0.shape[1:]), generator=gen))
        t = torch.cat(levels).to(x0.device)  # [B K]
        eps = torch.cat(noise).to(device=x0.device, dtype=x0.dtype)  # [B K, *latent]
        clean = x0.repeat_interleave(k, dim=0)
        tb = t.to(x0.dtype).reshape(-1, *[1] * (x0.ndim - 1))
        return (1.0 - tb) * clean + tb * eps, t, eps - clean

    def _micro_batches(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        micro = self.cfg.optim.micro_batch
        return (rows,) if micro is None else torch.split(rows, micro)

    def _entries(self, rows: torch.Tensor) -> torch.Tensor:
        """The noised entries (row-major, K per sample) of samples ``rows``."""
        k = self.cfg.nft.timesteps_per_sample
        return (rows[:, None] * k + torch.arange(k)).reshape(-1)

    @torch.no_grad()
    def _velocities(self, model: FlowModel, batch: NFTBatch, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``model``'s conditional velocity at every noised entry, without gradient, in micro-batches."""
        k = self.cfg.nft.timesteps_per_sample
        out = []
        for rows in self._micro_batches(torch.arange(batch.batch_size)):
            entries = self._entries(rows)
            out.append(model.velocity(x_t[entries], t[entries], batch.cond.index(rows.repeat_interleave(k))))
        return torch.cat(out)

    def update(self, batch: NFTBatch, iteration: int) -> dict[str, float]:
        """The optimizer steps of one iteration on ``batch`` (theta_old is the EMA copy, unchanged here)."""
        cfg, nft = self.cfg, self.cfg.nft
        k = nft.timesteps_per_sample
        x_t, t, target = self._noised(batch, iteration)
        with self.old.swapped(self.module):
            v_old = self._velocities(self.model, batch, x_t, t)
        v_ref = None
        if self.reference is not None and cfg.kl_coef > 0:
            v_ref = self._velocities(self.reference, batch, x_t, t)
        r = optimality(batch.advantages, nft.adv_max)
        gen = seeded_generator(cfg.seed, iteration, stream=1)
        chunks = [c for _ in range(cfg.epochs) for c in torch.randperm(batch.batch_size, generator=gen)
                  .chunk(cfg.minibatches)]
        stats: dict[str, list[float]] = {"loss": [], "kl": [], "drift": [], "grad_norm": []}
        self.module.train()
        for rows in chunks:
            self.engine.zero_grad()
            parts = self._micro_batches(rows)
            step_stats = {"loss": 0.0, "kl": 0.0, "drift": 0.0}
            for p, part in enumerate(parts):
                frac = len(part) / len(rows)
                entries = self._entries(part)
                with self.engine.accumulate(self.train_model, last=p == len(parts) - 1):
                    v = self.train_model.velocity(x_t[entries], t[entries],
                                                  batch.cond.index(part.repeat_interleave(k))).float()
                    loss = nft_loss(v, v_old[entries].float(), target[entries].float(), r[part].repeat_interleave(k),
                                    nft.beta, t[entries], nft.adaptive_weight)
                    kl = torch.zeros(())
                    if v_ref is not None:
                        kl = ((v - v_ref[entries].float()) ** 2).mean()
                        loss = loss + cfg.kl_coef * kl
                    self.engine.backward(loss * frac)
                step_stats["loss"] += frac * float(loss.detach())
                step_stats["kl"] += frac * float(kl.detach())
                step_stats["drift"] += frac * float(((v.detach() - v_old[entries].float()) ** 2).mean())
            grad_norm = self.engine.step()
            if self.ema is not None:
                self.ema.update(self.module)
            for key, value in (*step_stats.items(), ("grad_norm", float(grad_norm))):
                stats[key].append(value)
        self.module.eval()
        metrics = {f"train/{key}": float(np.mean(values)) for key, values in stats.items()}
        metrics["train/reward"] = float(batch.scores.total.mean())
        for name, value in batch.scores.components.items():
            metrics[f"train/reward_{name}"] = float(value.mean())
        return mean_across_ranks(metrics)

    def advance_old(self, iteration: int) -> None:
        """theta_old <- eta theta_old + (1 - eta) theta after iteration ``iteration``."""
        self.old.decay = soft_update_weight(iteration, self.cfg.nft.decay_rate, self.cfg.nft.decay_max)
        self.old.update(self.module)

    def step(self, iteration: int) -> dict[str, float]:
        with self.old.swapped(self.module):  # the rollouts come from the sampling policy
            batch = self.collect(iteration)
        metrics = self.update(batch, iteration)
        self.advance_old(iteration)
        return metrics

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['train/reward']:.3f}", "kl": f"{metrics['train/kl']:.2e}",
                **super().postfix(metrics)}

    # ------------------------------------------------------------------ resume
    def extra_state(self) -> dict:
        """theta_old, which a resumed run must sample with and decay from exactly as the uninterrupted one."""
        return {"sampling_policy": self.old.state_dict()}

    def load_extra_state(self, extra: dict) -> None:
        state = extra.get("sampling_policy") if isinstance(extra, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError("trainer.pt: extra.sampling_policy: missing (not a checkpoint of grpo.algorithm "
                                  "nft)")
        self.old.load_state_dict(state)
