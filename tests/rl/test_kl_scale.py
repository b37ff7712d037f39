"""The KL convention (docs/kl.md): our per-step KL is the exact KL of the two
Gaussian transitions; Flow-GRPO's is it times |dt|; the shipped Qwen-Image
coefficient is Flow-GRPO's beta = 0.04 converted for its schedule."""

import math

import pytest
import torch

from flowrl.config import load_config
from flowrl.models.qwen_image import qwen_image_sigmas
from flowrl.models.qwen_image_specs import shipped_spec
from flowrl.rl.objectives import anchored_kl_term, flow_grpo_equivalent_kl_coef, gaussian_kl
from flowrl.rl.rollout import timestep_window
from flowrl.sampling import sde_sigma, sde_step_mean
from tests.conftest import ROOT

FLOW_GRPO_BETA = 0.04


def flow_grpo_kl(mean: torch.Tensor, mean_ref: torch.Tensor, std_dev_t: torch.Tensor) -> torch.Tensor:
    """Flow-GRPO's per-step KL as its training script writes it: the squared
    distance of the means over 2 std_dev_t^2, std_dev_t the diffusion
    coefficient sigma_t (its sampler's noise is std_dev_t * sqrt(-dt) * eps)."""
    return ((mean - mean_ref) ** 2).mean(dim=tuple(range(1, mean.ndim))) / (2 * std_dev_t**2)


def qwen_image_window_dts(num_steps: int, fraction: float, start: float, height: int, width: int) -> torch.Tensor:
    """|dt| of the trained window of Qwen-Image's schedule, from the shipped scheduler config."""
    components = shipped_spec("Qwen/Qwen-Image")["components"]
    tokens_per_side = 2 ** len(components["vae"]["temperal_downsample"]) * components["transformer"]["patch_size"]
    tokens = (height // tokens_per_side) * (width // tokens_per_side)
    sigmas = qwen_image_sigmas(num_steps, tokens, components["scheduler"]).double()  # [N + 1]
    lo, hi = timestep_window(num_steps, fraction, start)
    return sigmas[lo:hi] - sigmas[lo + 1 : hi + 1]  # [hi - lo], positive


def test_our_kl_times_dt_is_flow_grpo_kl_for_the_trainers_own_steps():
    gen = torch.Generator().manual_seed(0)
    batch, noise_level = 6, 0.7
    x = torch.randn(batch, 4, 3, 5, generator=gen, dtype=torch.float64)
    v, v_ref = torch.randn(2, batch, 4, 3, 5, generator=gen, dtype=torch.float64)
    t = 0.05 + 0.9 * torch.rand(batch, generator=gen, dtype=torch.float64)
    dt = -t * (0.02 + 0.5 * torch.rand(batch, generator=gen, dtype=torch.float64))  # t + dt stays in (0, t)
    step = sde_step_mean(x, v, t, t + dt, noise_level, t_guard=0.99)
    ref = sde_step_mean(x, v_ref, t, t + dt, noise_level, t_guard=0.99)
    sigma = sde_sigma(t, noise_level, 0.99)
    torch.testing.assert_close(step.std, sigma * dt.abs().sqrt())  # the std the trainers pass is sigma sqrt|dt|
    ours = gaussian_kl(step.mean, ref.mean, step.std)  # [B]
    torch.testing.assert_close(ours * dt.abs(), flow_grpo_kl(step.mean, ref.mean, sigma), rtol=1e-12, atol=0)
    # and ours is the exact KL: the mean log-ratio of the two Gaussians over samples of the policy's step
    samples = step.mean + step.std[:, None, None, None] * torch.randn(4000, *x.shape, generator=gen,
                                                                      dtype=torch.float64)
    log_ratio = ((samples - ref.mean) ** 2 - (samples - step.mean) ** 2) / (2 * step.std[:, None, None, None] ** 2)
    torch.testing.assert_close(log_ratio.mean(dim=0).flatten(1).mean(dim=1), ours, rtol=0.05, atol=0)


def test_converted_coefficient_gives_flow_grpo_term_on_qwen_images_schedule():
    dts = qwen_image_window_dts(10, 0.5, 0.0, 1024, 1024)  # [5]
    assert len(dts) == 5 and 10 < float(1 / dts.max()) < float(1 / dts.min()) < 16  # 10-16x stronger unconverted
    coef = flow_grpo_equivalent_kl_coef(FLOW_GRPO_BETA, -dts)  # the sign of dt does not matter
    assert coef == pytest.approx(FLOW_GRPO_BETA * float(dts.mean()), rel=1e-12)
    gen = torch.Generator().manual_seed(1)
    rows, steps = 8, len(dts)
    sigma = 0.3 + torch.rand(steps, generator=gen, dtype=torch.float64)  # [S] any diffusion coefficients
    std = sigma * dts.sqrt()  # [S]
    # each row drifts from the reference by the same exact KL at every window step
    unit = torch.randn(rows, 1, 16, generator=gen, dtype=torch.float64).expand(rows, steps, 16)
    mean_ref = torch.randn(rows, steps, 16, generator=gen, dtype=torch.float64)
    mean = mean_ref + unit * std[None, :, None]  # [R, S, 16]
    ours = gaussian_kl(mean.flatten(0, 1), mean_ref.flatten(0, 1), std.repeat(rows)).view(rows, steps)
    flow_grpo = flow_grpo_kl(mean.flatten(0, 1), mean_ref.flatten(0, 1), sigma.repeat(rows)).view(rows, steps)
    ours_term = anchored_kl_term(ours, steps, coef)  # as the GRPO trainer weighs it
    torch.testing.assert_close(ours_term, FLOW_GRPO_BETA * flow_grpo.mean(), rtol=1e-12, atol=0)
    # unconverted, the same beta weighs the KL 1 / mean|dt| = 12.5x as much
    assert float(anchored_kl_term(ours, steps, FLOW_GRPO_BETA) / ours_term) == pytest.approx(1 / float(dts.mean()))


def test_with_unequal_step_kls_the_terms_differ_by_at_most_the_spread_of_dt():
    dts = qwen_image_window_dts(10, 0.5, 0.0, 1024, 1024)
    coef = flow_grpo_equivalent_kl_coef(FLOW_GRPO_BETA, dts)
    gen = torch.Generator().manual_seed(2)
    for _ in range(20):
        kl = torch.rand(4, len(dts), generator=gen, dtype=torch.float64) ** 4  # [R, S] exact per-step KLs
        ratio = float(anchored_kl_term(kl, len(dts), coef) / (FLOW_GRPO_BETA * (kl * dts).mean()))
        assert float(dts.mean() / dts.max()) - 1e-12 <= ratio <= float(dts.mean() / dts.min()) + 1e-12


def test_shipped_qwen_image_kl_coef_is_flow_grpos_beta():
    config = load_config(ROOT / "configs" / "qwen_image.yaml")
    g, q = config.grpo, config.model.qwen_image
    assert g.timesteps.mode == "subset" and g.kl_anchor_steps == 0  # the KL averages over the trained window only
    dts = qwen_image_window_dts(g.rollout.num_steps, g.timesteps.fraction, g.timesteps.start, q.height, q.width)
    expected = flow_grpo_equivalent_kl_coef(FLOW_GRPO_BETA, dts)
    assert g.kl_coef == pytest.approx(expected, rel=1e-3)


@pytest.mark.bad_input
def test_conversion_rejects_bad_input():
    with pytest.raises(ValueError, match="dts: no steps"):
        flow_grpo_equivalent_kl_coef(0.04, [])
    with pytest.raises(ValueError, match="dts: step sizes"):
        flow_grpo_equivalent_kl_coef(0.04, [0.1, 0.0])
    with pytest.raises(ValueError, match="dts: step sizes"):
        flow_grpo_equivalent_kl_coef(0.04, [0.1, math.nan])
    for beta in (-0.1, math.nan, math.inf):
        with pytest.raises(ValueError, match="beta"):
            flow_grpo_equivalent_kl_coef(beta, [0.1])
