"""GRPO rollouts and the training-path log-probs of their stored steps.

A rollout samples G trajectories per prompt with the SDE sampler and keeps,
per step, the state, the sampled next state and the old log-prob the
objective compares against. Which old log-prob that is depends on the CFG
mode (docs/design.md, Math):

- ``hybrid``: guided rollouts; the objective sees only the conditional
  branch, so the old log-prob is the conditional one, which the sampler
  computes for free from the cond half of the batched CFG forward;
- ``both``: guided rollouts, the objective recomputes the guided velocity
  (both branches carry gradient), old log-prob = the guided one;
- ``none``: unguided rollouts and objective.

:func:`step_log_probs` recomputes a chosen subset of those steps with the
training code path; before any update it reproduces the stored values, the
consistency every GRPO run relies on (tested for every mode).

The stochastic transition is one of :data:`flowrl.sampling.DYNAMICS` (flow,
dance, cps; grpo.rollout.dynamics). With ``sde_steps`` set only a window of
that many consecutive steps is stochastic (MixGRPO); the other steps are ODE
steps, their stored old log-prob 0, and they are never trained
(:func:`sde_window` places the window, fixed or sliding with the iteration).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from flowrl.config import RolloutConfig
from flowrl.models import trainable_module
from flowrl.models.base import Condition, FlowModel
from flowrl.sampling import (
    cfg_velocity,
    largest_sigma_below_one,
    sample,
    step_log_prob,
    transition,
    zero_noise_steps,
)

CFGMode = Literal["hybrid", "both", "none"]


@dataclass(frozen=True)
class RolloutSettings:
    num_steps: int
    noise_level: float
    guidance_scale: float
    cfg_mode: CFGMode
    shift: float = 1.0
    # trajectories per sampling forward (x2 under CFG) and per decode; None: the whole chunk at once.
    # The noise is drawn for the whole chunk either way, so the rollouts do not depend on it.
    micro_batch: int | None = None
    compile: bool = False  # sample with the network compiled by torch.compile (grpo.rollout.compile)
    dynamics: str = "flow"  # the stochastic transition: flow, dance or cps (flowrl.sampling.transition)
    sde_steps: int | None = None  # width W of the window of stochastic steps; None: every step
    sde_start: int = 0  # the window's first step (at iteration 0)
    sde_slide_every: int | None = None  # the window moves one step later every this many iterations; None: fixed
    ode_solver: str = "euler"  # the solver of the steps outside the window: euler or ab2
    keep_means: bool = False  # the rollouts keep each step's old transition mean (GRPO-Guard, grpo.ratio_norm)

    @property
    def guided(self) -> bool:
        return self.cfg_mode != "none" and self.guidance_scale != 1.0

    def window(self, iteration: int = 0) -> tuple[int, int] | None:
        """The SDE window [lo, hi) of ``iteration`` (:func:`sde_window`); None: every step is stochastic."""
        if self.sde_steps is None:
            return None
        return sde_window(self.num_steps, self.sde_steps, self.sde_start, self.sde_slide_every, iteration)


def sde_window(
    num_steps: int, sde_steps: int | None, start: int, slide_every: int | None, iteration: int
) -> tuple[int, int]:
    """The steps [lo, hi) a rollout of ``iteration`` (counted from 0) runs stochastically.

    ``sde_steps`` None: all N. Fixed (``slide_every`` None): [start, start + W). Sliding
    (MixGRPO): the window starts at ``start`` and moves one step later (towards the clean end of
    the schedule) every ``slide_every`` iterations, i.e. lo = start + iteration // slide_every,
    and stays at the last position N - W once it gets there."""
    if sde_steps is None:
        return 0, num_steps
    if not 1 <= sde_steps <= num_steps:
        raise ValueError(f"sde_steps must be in [1, {num_steps}] for a {num_steps}-step schedule, got {sde_steps}")
    if not 0 <= start <= num_steps - sde_steps:
        raise ValueError(f"an SDE window of {sde_steps} steps starting at step {start} does not fit a "
                         f"{num_steps}-step schedule")
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    lo = start
    if slide_every is not None:
        if slide_every < 1:
            raise ValueError(f"slide_every must be >= 1, got {slide_every}")
        lo = min(start + iteration // slide_every, num_steps - sde_steps)
    return lo, lo + sde_steps


def rollout_settings(config: RolloutConfig) -> RolloutSettings:
    """The settings of the rollout sampler ``config`` (grpo.rollout): GRPO's rollouts and the prompt filter's
    candidate samples."""
    return RolloutSettings(config.num_steps, config.noise_level, config.guidance_scale, config.cfg_mode,
                           micro_batch=config.micro_batch, compile=config.compile, dynamics=config.dynamics,
                           sde_steps=config.sde_steps, sde_start=config.sde_start,
                           sde_slide_every=config.sde_slide_every, ode_solver=config.ode_solver)


# the attribute of a network holding its compiled graph: kept in the network's __dict__ (not as a
# registered submodule, which would enter its state dict), so it goes when the network goes
_COMPILED_ATTR = "_flowrl_compiled"


def compiled_view(model: FlowModel) -> FlowModel:
    """``model`` with its network compiled by torch.compile, compiled once per network and reused (the
    compiled module reads the same parameters, so updates of the eager one reach it)."""
    net = trainable_module(model)
    compiled = net.__dict__.get(_COMPILED_ATTR)
    if compiled is None:
        compiled = torch.compile(net, dynamic=False)
        object.__setattr__(net, _COMPILED_ATTR, compiled)  # bypasses Module.__setattr__: no submodule
    return model.with_trainable(compiled)


@dataclass(frozen=True)
class Rollouts:
    """B = prompts x G trajectories, rows of one prompt adjacent."""

    prompts: list[str]  # [B]
    group_ids: torch.Tensor  # [B] index of the prompt
    sources: torch.Tensor | None  # [B, 3, H, W] edit sources
    cond: Condition
    null_cond: Condition | None
    states: torch.Tensor  # [B, N + 1, *latent]
    sigmas: torch.Tensor  # [N + 1]
    old_log_probs: torch.Tensor  # [B, N] what the objective's ratio divides by (0 at the ODE steps)
    images: torch.Tensor  # [B, 3, H, W] in [0, 1]
    stochastic: torch.Tensor | None = None  # [N] bool: the steps that drew noise (None: all of them)
    window: tuple[int, int] | None = None  # the SDE window [lo, hi) they were sampled with (None: every step)
    # with settings.keep_means: the transition means the old log-probs were taken under, [B, N, *latent]
    old_means: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.prompts)

    def select(self, rows: torch.Tensor) -> "Rollouts":
        """The trajectories ``rows`` (whole groups, if the groups are to stay intact)."""
        return Rollouts(
            prompts=[self.prompts[i] for i in rows.tolist()], group_ids=self.group_ids[rows],
            sources=None if self.sources is None else self.sources[rows], cond=self.cond.index(rows),
            null_cond=None if self.null_cond is None else self.null_cond.index(rows), states=self.states[rows],
            sigmas=self.sigmas, old_log_probs=self.old_log_probs[rows], images=self.images[rows],
            stochastic=self.stochastic, window=self.window,
            old_means=None if self.old_means is None else self.old_means[rows],
        )


@torch.no_grad()
def rollout(
    model: FlowModel,
    prompts: list[str],
    group_size: int,
    settings: RolloutSettings,
    generator: torch.Generator,
    sources: torch.Tensor | None = None,
    iteration: int = 0,
) -> Rollouts:
    """Sample ``group_size`` SDE trajectories for each of ``prompts`` (sources: one per prompt).

    The prompts are encoded in one call, once each (their padded length is the
    batch's, so the parts of ``settings.micro_batch`` share one condition);
    sampling forwards and decoding run in parts of ``settings.micro_batch`` rows.
    ``iteration``: whose SDE window (``settings.window``) the rollouts use; the
    window and the steps that drew noise are kept in the result for the update."""
    rows = [p for p in prompts for _ in range(group_size)]
    group_ids = torch.arange(len(prompts)).repeat_interleave(group_size)
    row_sources = None if sources is None else sources.repeat_interleave(group_size, dim=0)
    # each prompt (with its source) is encoded once and its G rows share the encoding: the text encoder
    # costs one pass per prompt, not one per trajectory
    cond = model.encode_prompts(list(prompts), sources).index(group_ids)
    null_cond = model.null_condition(cond) if settings.guided else None
    sigmas = model.schedule(settings.num_steps, settings.shift)
    window = settings.window(iteration)
    traj = sample(
        compiled_view(model) if settings.compile else model, cond, sigmas, null_cond=null_cond, guidance_scale=settings.guidance_scale if settings.guided else 1.0,
        renorm_dim=model.cfg_renorm_dim, noise_level=settings.noise_level, generator=generator,
        micro_batch=settings.micro_batch, dynamics=settings.dynamics, sde_window=window,
        ode_solver=settings.ode_solver, keep_means=settings.keep_means,
    )
    old = traj.log_probs if settings.cfg_mode == "both" else traj.cond_log_probs
    old_means = traj.means if settings.cfg_mode == "both" else traj.cond_means
    return Rollouts(
        prompts=rows, group_ids=group_ids, sources=row_sources, cond=cond, null_cond=null_cond,
        states=traj.states, sigmas=sigmas, old_log_probs=old, images=decode_in_parts(model, traj.final,
                                                                                      settings.micro_batch),
        stochastic=traj.stochastic, window=window, old_means=old_means,
    )


def decode_in_parts(model: FlowModel, latents: torch.Tensor, micro_batch: int | None) -> torch.Tensor:
    """``model.decode_latents`` over consecutive parts of at most ``micro_batch``
    rows, joined in row order (None, or a part covering the batch: one call)."""
    if micro_batch is None or micro_batch >= latents.shape[0]:
        return model.decode_latents(latents)
    return torch.cat([model.decode_latents(part) for part in latents.split(micro_batch)])


def timestep_window(num_steps: int, fraction: float, start: float = 0.0) -> tuple[int, int]:
    """The steps [lo, hi) a subset draws from: ceil(fraction N) of them (at
    least one), beginning floor(start N) steps into the schedule (start 0: the
    noisiest). The window is cut at the last step."""
    lo = min(num_steps - 1, math.floor(start * num_steps + 1e-9))
    width = max(1, math.ceil(fraction * num_steps - 1e-9))
    return lo, min(num_steps, lo + width)


def _trained_range(
    num_steps: int, fraction: float, start: float, window: tuple[int, int] | None
) -> tuple[int, int]:
    """The steps [lo, hi) training draws from: the SDE window when there is one, else the timestep window."""
    return window if window is not None else timestep_window(num_steps, fraction, start)


def select_timesteps(
    batch: int, num_steps: int, mode: Literal["subset", "all"], fraction: float, k: int, generator: torch.Generator,
    start: float = 0.0, *, window: tuple[int, int] | None = None, excluded: tuple[int, ...] = (),
) -> torch.Tensor:
    """[B, S] step indices to train per trajectory: all of them, or K distinct
    ones drawn uniformly from the window of ``timestep_window`` (by default the
    first ceil(fraction N), the noisiest).

    ``window``: the SDE window [lo, hi) of the rollouts, which then replaces the
    timestep window (fraction and start are not read): only its steps drew
    noise. ``excluded``: steps never trained (zero-noise steps, which have no
    density); ``all`` then means every other step of the range."""
    if mode == "all" and window is None and not excluded:
        return torch.arange(num_steps).expand(batch, num_steps).clone()
    lo, hi = (0, num_steps) if mode == "all" and window is None else _trained_range(num_steps, fraction, start, window)
    candidates = torch.tensor([n for n in range(lo, hi) if n not in excluded], dtype=torch.long)
    if mode == "all":
        if len(candidates) == 0:
            raise ValueError(f"no stochastic step to train in [{lo}, {hi}) of a {num_steps}-step schedule")
        return candidates.expand(batch, len(candidates)).clone()
    if k > len(candidates):
        if window is not None:
            where = (f"the {len(candidates)} stochastic steps of the SDE window [{lo}, {hi}) of a {num_steps}-step "
                     "schedule (grpo.rollout.sde_steps, grpo.rollout.sde_start, grpo.rollout.dynamics)")
        else:
            where = (f"the {len(candidates)} steps in the window [{lo}, {hi}) of a {num_steps}-step schedule "
                     f"(grpo.rollout.num_steps {num_steps}, grpo.timesteps.fraction {fraction}, "
                     f"grpo.timesteps.start {start})")
        raise ValueError(f"grpo.timesteps.per_trajectory = {k} is more than {where}")
    scores = torch.rand(batch, len(candidates), generator=generator)
    return candidates[scores.argsort(dim=1)[:, :k]]


def select_anchor_steps(
    batch: int, num_steps: int, fraction: float, k: int, generator: torch.Generator, start: float = 0.0, *,
    window: tuple[int, int] | None = None, excluded: tuple[int, ...] = (),
) -> torch.Tensor:
    """[B, k] distinct steps per trajectory from the part of the schedule the
    subset never trains (outside ``timestep_window``, or outside the SDE
    ``window`` when there is one: there the rollouts took ODE steps, and the
    KL of the two policies' Gaussian transitions at the stored states still
    measures how far their velocities drifted apart), less the ``excluded``
    (zero-noise) steps, whose KL has no finite value; [B, 0] if none."""
    lo, hi = _trained_range(num_steps, fraction, start, window)
    rest = torch.tensor([n for n in range(num_steps) if not lo <= n < hi and n not in excluded], dtype=torch.long)
    k = min(k, len(rest))
    if k <= 0:
        return torch.zeros(batch, 0, dtype=torch.long)
    scores = torch.rand(batch, len(rest), generator=generator)
    return rest[scores.argsort(dim=1)[:, :k]]


def excluded_steps(settings: RolloutSettings) -> tuple[int, ...]:
    """The steps of ``settings``' schedule never trained nor used as KL anchors: those whose
    transition has std 0 under its dynamics (cps's last step)."""
    return zero_noise_steps(settings.num_steps, settings.dynamics)


@dataclass(frozen=True)
class StepLogProbs:
    log_probs: torch.Tensor  # [R, S]
    means: torch.Tensor  # [R, S, *latent] the transition means (KL needs them)
    stds: torch.Tensor  # [R, S]


def step_log_probs(
    model: FlowModel,
    rollouts: Rollouts,
    rows: torch.Tensor,
    steps: torch.Tensor,
    settings: RolloutSettings,
) -> StepLogProbs:
    """Log-probs of the stored transitions ``steps`` [R, S] of trajectories
    ``rows`` [R] under ``model`` now, in one batched forward (with grad), under
    ``settings.dynamics``. At a step the rollout took by ODE it is the density
    the stochastic transition would give the stored next state (what a KL
    anchor step compares); at a zero-noise step it is 0."""
    r, s = steps.shape
    flat_rows = rows[:, None].expand(r, s).reshape(-1)
    flat_steps = steps.reshape(-1)
    x = rollouts.states[flat_rows, flat_steps]
    x_next = rollouts.states[flat_rows, flat_steps + 1]
    t = rollouts.sigmas[flat_steps].to(x.device)
    t_next = rollouts.sigmas[flat_steps + 1].to(x.device)
    cond = rollouts.cond.index(flat_rows)
    if settings.cfg_mode == "both" and rollouts.null_cond is not None:
        v = cfg_velocity(
            model, x, t, cond, rollouts.null_cond.index(flat_rows), settings.guidance_scale, model.cfg_renorm_dim
        ).guided
    else:
        v = model.velocity(x, t, cond)
    step = transition(settings.dynamics, x, v, t, t_next, settings.noise_level,
                      largest_sigma_below_one(rollouts.sigmas))
    logp = step_log_prob(x_next, step.mean, step.std)  # 0 at a zero-noise step, which has no density
    return StepLogProbs(
        log_probs=logp.reshape(r, s), means=step.mean.reshape(r, s, *x.shape[1:]), stds=step.std.reshape(r, s)
    )
