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

Two more stochastic dynamics share that interface (:func:`transition`):
``dance`` (the same reverse SDE with a constant ``sigma_t = a``) and ``cps``
(coefficient-preserving sampling, :func:`cps_step`). A sampler may run only a
window of its steps stochastically and solve the rest as an ODE, by Euler or
by the two-step Adams-Bashforth rule (:func:`ab2_step`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from flowrl.models.base import Condition, FlowModel

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)

Dynamics = Literal["flow", "dance", "cps"]  # the stochastic transition of an SDE step (grpo.rollout.dynamics)
ODESolver = Literal["euler", "ab2"]  # the solver of the deterministic steps (grpo.rollout.ode_solver)
DYNAMICS: tuple[str, ...] = ("flow", "dance", "cps")
ODE_SOLVERS: tuple[str, ...] = ("euler", "ab2")


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


def _reverse_sde_step(
    x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, sig: torch.Tensor
) -> SDEStep:
    """One Euler-Maruyama step of the reverse-time SDE whose marginals are the flow's, with diffusion
    ``sig`` [B] (constant over the step).

    Why this mean: under ``x_t = (1 - t) x_0 + t eps`` the model's velocity gives the two
    estimates ``x_0 = x - t v`` and ``eps = x + (1 - t) v``, and the score of the marginal is
    ``-eps / t``. Walking down in t (dt < 0) while adding noise of variance ``sig^2 |dt|`` keeps
    the marginals only if the drift also climbs the score by ``sig^2 / 2`` per unit of |dt|:
    ``mean = x + v dt + sig^2 / (2 t) (x + (1 - t) v) dt``, which, grouped by x and v, is the
    form below. The std of the step is ``sig sqrt(-dt)``."""
    dt = t_next - t  # [B], negative
    sig2 = _bcast(sig**2, x)
    tb, dtb = _bcast(t, x), _bcast(dt, x)
    mean = x * (1.0 + sig2 / (2.0 * tb) * dtb) + v * (
        1.0 + sig2 * (1.0 - tb) / (2.0 * tb)
    ) * dtb
    return SDEStep(mean=mean, std=sig * torch.sqrt(-dt))


def sde_step_mean(
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    noise_level: float,
    t_guard: float,
) -> SDEStep:
    """Mean and std of the Flow-SDE transition x_t -> x_{t'} (t, t_next: [B]): the reverse SDE of
    :func:`_reverse_sde_step` with ``sig = a sqrt(t / (1 - t))`` (:func:`sde_sigma`), whose noise
    grows without bound towards t = 1 (hence the guard) and vanishes at t = 0."""
    return _reverse_sde_step(x, v, t, t_next, sde_sigma(t, noise_level, t_guard))


def dance_step(
    x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, noise_level: float
) -> SDEStep:
    """Mean and std of the Dance-SDE transition (DanceGRPO): the same reverse SDE with a constant
    diffusion ``sig = a``, so the std of a step is ``a sqrt(-dt)`` at every t (no guard needed:
    only ``t``, never ``1 - t``, divides)."""
    return _reverse_sde_step(x, v, t, t_next, torch.full_like(t, noise_level))


def cps_step(
    x: torch.Tensor, v: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, noise_level: float
) -> SDEStep:
    """Mean and std of the coefficient-preserving transition (CPS) x_t -> x_{t'}.

    The step rebuilds ``x_{t'}`` from the model's estimates ``x_0 = x - t v`` and
    ``eps = x + (1 - t) v``: ``x_{t'} = (1 - t') x_0 + c eps + s z`` with fresh noise z. If
    eps and z are independent unit Gaussians, the noise in x_{t'} has std ``sqrt(c^2 + s^2)``,
    which the marginal wants to be exactly t': so ``c^2 + s^2 = t'^2``. CPS takes
    ``s = t' sin(a pi / 2)``, hence ``c = sqrt(t'^2 - s^2) = t' cos(a pi / 2)`` (computed in the
    cosine form: no rounding can take the root's argument below 0). a in (0, 1]: a = 1 replaces
    all of the predicted noise by fresh noise, a -> 0 is the deterministic (DDIM/Euler) step.
    At t' = 0 the std is 0 and the mean is x_0 = x - t v, the Euler step: that step is
    deterministic and has no density."""
    if not 0.0 < noise_level <= 1.0:
        raise ValueError(f"cps needs a noise level in (0, 1], got {noise_level}")
    angle = noise_level * math.pi / 2.0
    tb, nb = _bcast(t, x), _bcast(t_next, x)
    x0 = x - tb * v
    eps = x + (1.0 - tb) * v
    mean = (1.0 - nb) * x0 + (nb * math.cos(angle)) * eps
    return SDEStep(mean=mean, std=t_next * math.sin(angle))


def transition(
    dynamics: str,
    x: torch.Tensor,
    v: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
    noise_level: float,
    t_guard: float,
) -> SDEStep:
    """The Gaussian transition x_t -> x_{t'} of ``dynamics`` (flow, dance or cps; ``t_guard`` is
    only read by flow)."""
    if dynamics == "flow":
        return sde_step_mean(x, v, t, t_next, noise_level, t_guard)
    if dynamics == "dance":
        return dance_step(x, v, t, t_next, noise_level)
    if dynamics == "cps":
        return cps_step(x, v, t, t_next, noise_level)
    raise ValueError(f"unknown SDE dynamics {dynamics!r} (one of {', '.join(DYNAMICS)})")


def zero_noise_steps(num_steps: int, dynamics: str) -> tuple[int, ...]:
    """The steps whose transition under ``dynamics`` has std 0, hence no density: cps's step into
    t' = 0 (every schedule ends at 0, and no earlier sigma is 0). Flow and dance add noise at
    every step (their std has the factor sqrt(-dt) > 0, and t > 0 before the last state)."""
    if dynamics not in DYNAMICS:
        raise ValueError(f"unknown SDE dynamics {dynamics!r} (one of {', '.join(DYNAMICS)})")
    return (num_steps - 1,) if dynamics == "cps" and num_steps >= 1 else ()


def stochastic_steps(
    num_steps: int, dynamics: str, noise_level: float, window: tuple[int, int] | None = None
) -> torch.Tensor:
    """[N] bool: the steps a sampler draws noise at: those in ``window`` [lo, hi) (None: all),
    less the zero-noise steps of ``dynamics``; none at noise level 0 (the ODE sampler)."""
    mask = torch.zeros(num_steps, dtype=torch.bool)
    if noise_level == 0.0:
        return mask
    lo, hi = (0, num_steps) if window is None else window
    mask[lo:hi] = True
    mask[list(zero_noise_steps(num_steps, dynamics))] = False
    return mask


def ab2_step(
    x: torch.Tensor,
    v: torch.Tensor,
    v_prev: torch.Tensor,
    t_prev: torch.Tensor,
    t: torch.Tensor,
    t_next: torch.Tensor,
) -> torch.Tensor:
    """Two-step Adams-Bashforth step of dx/dt = v on a non-uniform grid (t_prev, t, t_next: [B]).

    The velocity is extrapolated linearly in t through ``v_prev`` (at t_prev) and ``v`` (at t)
    and integrated over [t, t_next]: with ``h = t_next - t``, ``h_prev = t - t_prev`` and
    ``r = h / h_prev``, ``x' = x + h ((1 + r / 2) v - (r / 2) v_prev)``. One model forward per
    step like Euler, but second order: the error at the end shrinks ~4x when the steps halve."""
    h = _bcast(t_next - t, x)
    r = h / _bcast(t - t_prev, x)
    return x + h * ((1.0 + 0.5 * r) * v - (0.5 * r) * v_prev)


def gaussian_log_prob(
    sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """Diagonal Gaussian log-density, averaged over non-batch dims -> [B]."""
    stdb = _bcast(std, sample)
    logp = -((sample - mean) ** 2) / (2.0 * stdb**2) - torch.log(stdb) - _LOG_SQRT_2PI
    return logp.flatten(1).mean(dim=1)


def step_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """:func:`gaussian_log_prob` where ``std`` [B] > 0 and 0 on the rows of a deterministic step
    (std 0, no density): no inf or NaN reaches the value or its gradient."""
    noisy = std > 0
    if bool(noisy.all()):
        return gaussian_log_prob(sample, mean, std)
    logp = gaussian_log_prob(sample, mean, torch.where(noisy, std, torch.ones_like(std)))
    return torch.where(noisy, logp, torch.zeros_like(logp))


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
    trains on); 0 at the steps that drew no noise (``stochastic`` False).
    Both are None for a deterministic (noise_level 0) run.
    """

    states: torch.Tensor  # [B, N + 1, *latent]
    sigmas: torch.Tensor  # [N + 1]
    log_probs: torch.Tensor | None  # [B, N]
    cond_log_probs: torch.Tensor | None  # [B, N]
    stochastic: torch.Tensor | None = None  # [N] bool: the steps that drew noise
    # with keep_means: each step's transition mean under the followed and the conditional velocity
    # (at ODE steps the deterministic next state), [B, N, *latent]
    means: torch.Tensor | None = None
    cond_means: torch.Tensor | None = None

    @property
    def final(self) -> torch.Tensor:
        return self.states[:, -1]


def _stochastic_step(dynamics: str, x: torch.Tensor, vel: "CFGVelocity", t: torch.Tensor, t_next: torch.Tensor,
                     noise_level: float, t_guard: float, generator: torch.Generator | None):
    """One stochastic step of :func:`sample`: the next state (the guided transition's mean plus fresh
    noise), and (log-prob under the guided transition, under the conditional one, their two means)."""
    step = transition(dynamics, x, vel.guided, t, t_next, noise_level, t_guard)
    z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    x_next = step.mean + torch.as_tensor(step.std).reshape(-1, *[1] * (x.ndim - 1)) * z
    cond_step = transition(dynamics, x, vel.cond, t, t_next, noise_level, t_guard)
    return x_next, (gaussian_log_prob(x_next, step.mean, step.std),
                    gaussian_log_prob(x_next, cond_step.mean, cond_step.std), step.mean, cond_step.mean)


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
    dynamics: str = "flow",
    sde_window: tuple[int, int] | None = None,
    ode_solver: str = "euler",
    keep_means: bool = False,
) -> Trajectory:
    """Run the ODE (noise_level 0) or SDE sampler over ``sigmas``.

    ``dynamics``: the stochastic transition (:func:`transition`). ``sde_window``: the steps
    [lo, hi) that are stochastic (None: all); the others, and the zero-noise steps of the
    dynamics (:func:`zero_noise_steps`), are ODE steps by ``ode_solver``: euler, or ab2
    (:func:`ab2_step`), which falls back to Euler at the first step and at the first ODE step
    after a stochastic one (the previous velocity then belongs to a state the noise moved).
    Noise is drawn only at stochastic steps. ``keep_means``: the trajectory also holds every
    step's transition means (what GRPO-Guard's ratio compares the new policy's means against).

    ``micro_batch``: the model's forwards take at most this many rows (x2
    under CFG) at a time. Only the forwards are split: the initial noise and
    every step's noise are drawn for the whole batch in the same order as
    without it, so the trajectories are the same up to float differences of
    the smaller forwards. None: the whole batch in one forward per step.
    """
    # long: the docstring is the sampler's contract (windows, solvers, micro-batches); the body is one loop
    if ode_solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {ode_solver!r} (one of {', '.join(ODE_SOLVERS)})")
    batch = cond.batch_size
    if initial_noise is None:
        initial_noise = model.prepare_noise(batch, generator)
    x = initial_noise
    num_steps = len(sigmas) - 1
    noisy = stochastic_steps(num_steps, dynamics, noise_level, sde_window)
    t_guard = largest_sigma_below_one(sigmas)
    states, logps, cond_logps, means, cond_means = [x], [], [], [], []
    previous = None  # (t, guided velocity) of the last ODE step, for ab2; None after a stochastic one
    for n in range(num_steps):
        t = torch.full((batch,), float(sigmas[n]), device=x.device)
        t_next = torch.full((batch,), float(sigmas[n + 1]), device=x.device)
        vel = cfg_velocity_in_parts(model, x, t, cond, null_cond, guidance_scale, renorm_dim, micro_batch)
        if not noisy[n]:
            x_next = (ab2_step(x, vel.guided, previous[1], previous[0], t, t_next)
                      if ode_solver == "ab2" and previous is not None else euler_step(x, vel.guided, t, t_next))
            previous = (t, vel.guided)
            zeros = torch.zeros(batch, dtype=x.dtype, device=x.device)
            step_out = (zeros, zeros, x_next, x_next)
        else:
            x_next, step_out = _stochastic_step(dynamics, x, vel, t, t_next, noise_level, t_guard, generator)
            previous = None
        logps.append(step_out[0])
        cond_logps.append(step_out[1])
        if keep_means:
            means.append(step_out[2])
            cond_means.append(step_out[3])
        x = x_next
        states.append(x)
    stochastic = noise_level != 0.0
    return Trajectory(
        states=torch.stack(states, dim=1), sigmas=sigmas,
        log_probs=torch.stack(logps, dim=1) if stochastic else None,
        cond_log_probs=torch.stack(cond_logps, dim=1) if stochastic else None, stochastic=noisy,
        means=torch.stack(means, dim=1) if keep_means else None,
        cond_means=torch.stack(cond_means, dim=1) if keep_means else None,
    )
