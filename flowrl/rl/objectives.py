"""The GRPO objective as pure functions (DESIGN.md section 3).

Advantages per prompt group of G samples and K reward components:
``A_i = sum_k w_k(category_i) (R_k,i - mean_k) / (std_k + eps)`` with the mean
and (population) std over the group. The policy loss is PPO's clipped
surrogate on the per-step ratio ``exp(logp_new - logp_old)``, averaged over
the trained timesteps; the optional KL to a reference policy is the closed
form between two Gaussians of equal std,
``||mean_theta - mean_ref||^2 / (2 std^2)``, averaged over latent elements.
"""

from __future__ import annotations

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
    logp_new: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate, mean over rows and trained steps.

    logp_new, logp_old: [B, S] (S trained steps per row); advantages: [B].
    Returns the loss and detached diagnostics (clip fraction, ratio spread).
    """
    ratio = torch.exp(logp_new - logp_old)
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


def gaussian_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between N(mean, std^2) and N(mean_ref, std^2) per row, averaged over
    the latent elements: [B, *latent], [B, *latent], [B] -> [B]."""
    diff2 = ((mean - mean_ref) ** 2).flatten(1).mean(dim=1)
    return diff2 / (2.0 * std.to(diff2.dtype) ** 2)


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
