"""Flow-matching samplers as small pure functions.

Conventions: ``x_t = (1 - t) x_0 + t * eps``, velocity ``v = eps - x_0``,
sampling runs from t = 1 to t = 0 over a schedule ``sigmas`` of N + 1 values
(the last one 0). Every function here is free of I/O and model state except
:func:`cfg_velocity`, :func:`cfg_velocity_in_parts` and :func:`sample`, which
call a :class:`FlowModel`.

The SDE step is the Flow-GRPO form (docs/design.md, Math): with
``dt = t' - t < 0`` and noise level ``a``,
``sigma_t = a * sqrt(t / (1 - t))``,
``mean = x (1 + sigma_t^2 dt / (2t)) + v (1 + sigma_t^2 (1 - t) / (2t)) dt``,
``x' = mean + sigma_t sqrt(-dt) z``. At ``a = 0`` it is the Euler step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from flowrl.models.base import Condition, FlowModel

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def shift_sigmas(
    sigmas: torch.Tensor, shift: float = 1.0, mu: float | None = None
) -> torch.Tensor:
    """Apply the static shift ``s t / (1 + (s - 1) t)`` or, when ``mu`` is
    given, the resolution-dependent exponential shift
    ``e^mu / (e^mu + 1/t - 1)`` used by Qwen-Image and Flux."""
    if mu is not None:
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_match_sigmas(
    num_steps: int, shift: float = 1.0, mu: float | None = None
) -> torch.Tensor:
    """The N + 1 sigmas (float32) of an N-step schedule from 1 to 0.

    Identical to ``FlowMatchEulerDiscreteScheduler.set_timesteps(sigmas=
    linspace(1, 1/N, N), mu=mu)`` followed by its appended terminal 0, which
    is how the Qwen-Image pipelines build their schedule.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base = torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64)
    shifted = shift_sigmas(base, shift=shift, mu=mu).to(torch.float32)
    return torch.cat([shifted, torch.zeros(1)])


def qwen_image_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """Resolution-dependent shift: linear in the number of image tokens."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def _bcast(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] matching ``like``'s rank."""
    return t.reshape(t.shape[0], *([1] * (like.ndim - 1))).to(like.dtype)


def euler_step(
    x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor
) -> torch.Tensor:
    """Deterministic step ``x_{t'} = x_t + (t' - t) v``; t, t_next: [B]."""
    return x + _bcast(t_next - t, x) * v


def sde_sigma(t: torch.Tensor, noise_level: float, t_guard: float) -> torch.Tensor:
    """``a * sqrt(t / (1 - t))`` with ``1 - t`` taken at ``t_guard`` where
    t = 1 (Flow-GRPO's guard: the largest schedule sigma below 1)."""
    t_den = torch.where(t >= 1.0, torch.full_like(t, t_guard), t)
    return noise_level * torch.sqrt(t / (1.0 - t_den))


@dataclass(frozen=True)
class SDEStep:
    mean: torch.Tensor  # [B, *latent] mean of x_{t'}
    std: torch.Tensor  # [B] std of x_{t'} around the mean: sigma_t sqrt(-dt)


def sde_step_mean(
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    noise_level: float,
    t_guard: float,
) -> SDEStep:
    """Mean and std of the Gaussian transition x_t -> x_{t'} (t, t_next: [B])."""
    dt = t_next - t  # [B], negative
    sig = sde_sigma(t, noise_level, t_guard)  # [B]
    sig2 = _bcast(sig**2, x)
    tb, dtb = _bcast(t, x), _bcast(dt, x)
    mean = x * (1.0 + sig2 / (2.0 * tb) * dtb) + v * (
        1.0 + sig2 * (1.0 - tb) / (2.0 * tb)
    ) * dtb
    return SDEStep(mean=mean, std=sig * torch.sqrt(-dt))


def gaussian_log_prob(
    sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Diagonal Gaussian log-density, averaged over non-batch dims -> [B]."""
    stdb = _bcast(std, sample)
    logp = -((sample - mean) ** 2) / (2.0 * stdb**2) - torch.log(stdb) - _LOG_SQRT_2PI
    return logp.flatten(1).mean(dim=1)


def guided_velocity(
    v_cond: torch.Tensor,
    v_uncond: torch.Tensor,
    scale: float,
    renorm_dim: int | None = None,
) -> torch.Tensor:
    """Classifier-free guidance ``v_u + w (v_c - v_u)``.

    With ``renorm_dim`` set, the guided velocity is rescaled (per position)
    to the norm of the conditional one along that dimension, as the
    Qwen-Image pipelines do with ``true_cfg_scale``.
    """
    guided = v_uncond + scale * (v_cond - v_uncond)
    if renorm_dim is None:
        return guided
    cond_norm = torch.linalg.vector_norm(v_cond, dim=renorm_dim, keepdim=True)
    guided_norm = torch.linalg.vector_norm(guided, dim=renorm_dim, keepdim=True)
    return guided * (cond_norm / guided_norm)


@dataclass(frozen=True)
class CFGVelocity:
    guided: torch.Tensor  # [B, *latent] the velocity the sampler follows
    cond: torch.Tensor  # [B, *latent] the conditional branch alone


def cfg_velocity(
    model: FlowModel,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Condition,
    null_cond: Condition | None,
    scale: float,
    renorm_dim: int | None = None,
) -> CFGVelocity:
    """Conditional and guided velocity from one batched forward.

    ``null_cond`` None (or scale 1) means no guidance: one unbatched forward.
    """
    if null_cond is None or scale == 1.0:
        v = model.velocity(x, t, cond)
        return CFGVelocity(guided=v, cond=v)
    both = model.velocity(torch.cat([x, x]), torch.cat([t, t]), cond.cat(null_cond))
    v_c, v_u = both.chunk(2)
    return CFGVelocity(guided=guided_velocity(v_c, v_u, scale, renorm_dim), cond=v_c)


def cfg_velocity_in_parts(
    model: FlowModel,
    x: torch.Tensor,
    t: torch.Tensor,
    cond: Condition,
    null_cond: Condition | None,
    scale: float,
    renorm_dim: int | None = None,
    micro_batch: int | None = None,
) -> CFGVelocity:
    """:func:`cfg_velocity` over the rows in consecutive parts of at most
    ``micro_batch`` rows each (under CFG each forward then holds twice that),
    joined back in row order. None, or a part size covering the batch, is the
    single call of :func:`cfg_velocity`."""
    batch = x.shape[0]
    if micro_batch is None or micro_batch >= batch:
        return cfg_velocity(model, x, t, cond, null_cond, scale, renorm_dim)
    guided, conditional = [], []
    for start in range(0, batch, micro_batch):
        rows = slice(start, start + micro_batch)
        part = cfg_velocity(
            model, x[rows], t[rows], cond.index(rows), None if null_cond is None else null_cond.index(rows),
            scale, renorm_dim,
        )
        guided.append(part.guided)
        conditional.append(part.cond)
    v_guided = torch.cat(guided)
    unguided = all(g is c for g, c in zip(guided, conditional))  # one tensor for both: keep it one
    return CFGVelocity(guided=v_guided, cond=v_guided if unguided else torch.cat(conditional))


@dataclass(frozen=True)
class Trajectory:
    """A batch of sampled trajectories.

    ``states[:, n]`` is the state at ``sigmas[n]``; ``states[:, -1]`` the final
    latent. Log-probs are those of the transition n -> n + 1: ``log_probs``
    under the velocity actually followed (guided when CFG is on) and
    ``cond_log_probs`` under the conditional branch alone (what hybrid CFG
    trains on). Both are None for a deterministic (noise_level 0) run.
    """

    states: torch.Tensor  # [B, N + 1, *latent]
    sigmas: torch.Tensor  # [N + 1]
    log_probs: torch.Tensor | None  # [B, N]
    cond_log_probs: torch.Tensor | None  # [B, N]

    @property
    def final(self) -> torch.Tensor:
        return self.states[:, -1]


def largest_sigma_below_one(sigmas: torch.Tensor) -> float:
    """The SDE guard value: the largest schedule sigma below 1 (0 for a
    one-step schedule, where ``1 - t`` at t = 1 then reads as 1)."""
    return float(sigmas[sigmas < 1.0].max())


@torch.no_grad()
def sample(
    model: FlowModel,
    cond: Condition,
    sigmas: torch.Tensor,
    *,
    null_cond: Condition | None = None,
    guidance_scale: float = 1.0,
    renorm_dim: int | None = None,
    noise_level: float = 0.0,
    generator: torch.Generator | None = None,
    initial_noise: torch.Tensor | None = None,
    micro_batch: int | None = None,
) -> Trajectory:
    """Run the ODE (noise_level 0) or SDE sampler over ``sigmas``.

    ``micro_batch``: the model's forwards take at most this many rows (x2
    under CFG) at a time. Only the forwards are split: the initial noise and
    every step's noise are drawn for the whole batch in the same order as
    without it, so the trajectories are the same up to float differences of
    the smaller forwards. None: the whole batch in one forward per step.
    """
    batch = cond.batch_size
    if initial_noise is None:
        initial_noise = model.prepare_noise(batch, generator)
    x = initial_noise
    t_guard = largest_sigma_below_one(sigmas)
    states, logps, cond_logps = [x], [], []
    for n in range(len(sigmas) - 1):
        t = torch.full((batch,), float(sigmas[n]), device=x.device)
        t_next = torch.full((batch,), float(sigmas[n + 1]), device=x.device)
        vel = cfg_velocity_in_parts(model, x, t, cond, null_cond, guidance_scale, renorm_dim, micro_batch)
        if noise_level == 0.0:
            x = euler_step(x, vel.guided, t, t_next)
        else:
            step = sde_step_mean(x, vel.guided, t, t_next, noise_level, t_guard)
            z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
            x_next = step.mean + torch.as_tensor(step.std).reshape(-1, *[1] * (x.ndim - 1)) * z
            logps.append(gaussian_log_prob(x_next, step.mean, step.std))
            cond_step = sde_step_mean(x, vel.cond, t, t_next, noise_level, t_guard)
            cond_logps.append(gaussian_log_prob(x_next, cond_step.mean, cond_step.std))
            x = x_next
        states.append(x)
    stochastic = noise_level != 0.0
    return Trajectory(
        states=torch.stack(states, dim=1),
        sigmas=sigmas,
        log_probs=torch.stack(logps, dim=1) if stochastic else None,
        cond_log_probs=torch.stack(cond_logps, dim=1) if stochastic else None,
    )
