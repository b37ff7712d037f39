"""The GRPO objective as pure functions (docs/design.md, Math).

Advantages per prompt group of G samples and K reward components:
``A_i = sum_k w_k(category_i) (R_k,i - mean_k) / (std_k + eps)`` with the mean
and (population) std over the group. The policy loss is PPO's clipped
surrogate on the per-step ratio ``exp(logp_new - logp_old)``, averaged over
the trained timesteps; the optional KL to a reference policy is the closed
form between two Gaussians of equal std,
``||mean_theta - mean_ref||^2 / (2 std^2)``, averaged over latent elements.

KL convention (docs/kl.md): ``std`` is the std of the whole transition,
``sigma_t sqrt(|dt|)``, so :func:`gaussian_kl` is the exact KL of the two
steps. Flow-GRPO divides by ``sigma_t^2`` alone, so its per-step KL is ours
times ``|dt|``, and its ``beta`` converts with
:func:`flow_grpo_equivalent_kl_coef`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def group_advantages(
    rewards: torch.Tensor, weights: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-4
) -> torch.Tensor:
    """Per-component group normalisation, then the per-row weighted sum.

    rewards, weights: [B, K]; group_ids: [B] integers (rows with the same id
    are one prompt's group). Returns [B]. Each group sums to zero; a group
    whose component is constant contributes zero through that component.
    """
    if rewards.ndim != 2 or weights.shape != rewards.shape:
        raise ValueError(f"rewards {tuple(rewards.shape)} and weights {tuple(weights.shape)} must both be [B, K]")
    if group_ids.shape != rewards.shape[:1]:
        raise ValueError(f"group_ids {tuple(group_ids.shape)} must be [B] = [{rewards.shape[0]}]")
    rewards = rewards.to(torch.float64)
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    count = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(inverse, dtype=torch.float64))
    total = torch.zeros(n_groups, rewards.shape[1], dtype=torch.float64).index_add_(0, inverse, rewards)
    mean = total / count[:, None]  # [G, K]
    centred = rewards - mean[inverse]  # [B, K]
    var = torch.zeros_like(mean).index_add_(0, inverse, centred**2) / count[:, None]
    std = var.sqrt()[inverse]
    normalised = torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))
    return (weights.to(torch.float64) * normalised).sum(dim=1).to(torch.float32)


def ppo_clip_loss(
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_range: float,
    log_ratio: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, mean over rows and trained steps.

    logp_new, logp_old: [B, S] (S trained steps per row); advantages: [B]. ``log_ratio`` [B, S], when
    given, replaces ``logp_new - logp_old`` (e.g. :func:`guard_log_ratio`).
    Returns the loss and detached diagnostics (clip fraction, ratio spread).
    """
    ratio = torch.exp(logp_new - logp_old if log_ratio is None else log_ratio)
    adv = advantages[:, None].to(ratio.dtype)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {
            "clip_fraction": ((ratio - 1.0).abs() > clip_range).float().mean(),
            "ratio_dev": (ratio - 1.0).abs().max(),
        }
    return loss, stats


def guard_log_ratio(
    logp_new: torch.Tensor, logp_old: torch.Tensor, mean_new: torch.Tensor, mean_old: torch.Tensor,
    std: torch.Tensor,
) -> torch.Tensor:
    """GRPO-Guard's normalised log-ratio of Gaussian steps: [R, S] from log-probs [R, S], transition means
    [R, S, *latent] and the transition std [R, S].

    With the sample ``x' = mean_old + std z`` and ``d = mean_new - mean_old``, the per-element log-ratio our
    log-probs give is ``(z . d) / (std D) - |d|^2 / (2 std^2 D)`` (D latent elements): its second term biases
    the ratio below 1 (most at the low-noise steps, where std is small), and the first scales as 1 / std,
    so a fixed clip range binds at different strengths per step. Multiplying by ``std`` and adding back the
    bias, ``std (logp_new - logp_old) + mean(d^2) / (2 std)``, leaves ``(z . d) / D``: centred on 0 for every
    step, its spread set by how far the mean moved, not by the step's noise. Equal to 0 wherever the means
    agree (before an update), so the ratio is still exactly 1 there, and there its gradient is ``std`` times
    the plain one's, the step reweighting of GRPO-Guard. (Centred exactly when the sample was drawn around
    ``mean_old``; under hybrid CFG it was drawn around the guided mean, which adds a term in that offset.)"""
    moved = ((mean_new - mean_old.to(mean_new.dtype)) ** 2).flatten(2).mean(dim=2)  # [R, S]
    std = std.to(logp_new.dtype)
    return std * (logp_new - logp_old) + moved / (2.0 * std)


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between N(mean, std^2) and N(mean_ref, std^2) per row, averaged over
    the latent elements: [B, *latent], [B, *latent], [B] -> [B].

    The trainers pass the transition's own std, ``sigma_t sqrt(|dt|)``
    (:class:`flowrl.sampling.SDEStep`), which makes this the exact KL of the
    policy's and the reference's Gaussian steps x_t -> x_{t+dt}. Flow-GRPO
    divides the same squared distance by ``2 sigma_t^2`` (no ``|dt|``): its
    value is this one times ``|dt|``, so a coefficient tuned there is
    ``1 / |dt|`` times too strong here (10-16x over the noisiest half of
    Qwen-Image's 10-step 1024 x 1024 schedule) unless converted
    (:func:`flow_grpo_equivalent_kl_coef`)."""
    diff2 = ((mean - mean_ref) ** 2).flatten(1).mean(dim=1)  # [B]
    return diff2 / (2.0 * std.to(diff2.dtype) ** 2)  # [B]


def flow_grpo_equivalent_kl_coef(beta: float, dts: Sequence[float] | torch.Tensor) -> float:
    """``grpo.kl_coef`` that weighs the KL as Flow-GRPO's ``beta`` does.

    ``dts``: the step sizes ``t_next - t`` (either sign) of the steps the KL
    term averages over, e.g. the trained window of the schedule. Both
    trainers average the per-step KL uniformly over those steps (ours draws
    them uniformly from the window, so in expectation), and Flow-GRPO's
    per-step KL is ours times ``|dt|``: its term is
    ``beta * mean_s(|dt_s| KL_s)``, ours ``kl_coef * mean_s(KL_s)``. They are
    equal for ``kl_coef = beta * mean_s |dt_s|`` whenever the exact per-step
    KLs ``KL_s`` are equal across the steps; otherwise Flow-GRPO's term is a
    KL-weighted mean of ``|dt|`` instead, and its ratio to ours stays
    within ``[min |dt|, max |dt|] / mean |dt|``. No single coefficient can do
    better: per step the exact factor is ``|dt_s|``.
    """
    steps = torch.as_tensor(dts, dtype=torch.float64).flatten().abs()  # [S]
    if steps.numel() == 0:
        raise ValueError("dts: no steps to average the KL over")
    if not bool(torch.isfinite(steps).all()) or bool((steps == 0).any()):
        raise ValueError(f"dts: step sizes must be finite and non-zero, got {steps.tolist()}")
    if not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta: a KL coefficient must be finite and >= 0, got {beta}")
    return float(beta * steps.mean())


def anchored_kl_term(kl: torch.Tensor, n_trained: int, coef: float, anchor_coef: float | None = None) -> torch.Tensor:
    """The KL term of the GRPO loss from per-step KLs ``kl`` [R, S]: the first
    ``n_trained`` columns are trained steps (weight ``coef``), the rest
    KL-only anchor steps (weight ``anchor_coef``; None: ``coef``); the mean over
    all R x S entries of weight times KL."""
    if anchor_coef is None or anchor_coef == coef or n_trained >= kl.shape[1]:
        return coef * kl.mean()
    weights = torch.full((kl.shape[1],), float(coef), dtype=kl.dtype, device=kl.device)
    weights[n_trained:] = anchor_coef
    return (kl * weights).mean()
