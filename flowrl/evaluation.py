"""Deterministic sampling for evaluation, and image grids.

Every sample's initial noise comes from its own seed, so a (prompt, seed)
pair gives the same image whatever the batch it is in and whatever other
models are evaluated beside it (the bench relies on this).
"""

from __future__ import annotations

import numpy as np
import torch

from flowrl.config import SamplerConfig
from flowrl.models.base import FlowModel
from flowrl.sampling import sample


def per_sample_noise(seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """[len(seeds), *shape] standard normal noise, one generator per sample."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def generate(
    model: FlowModel,
    prompts: list[str],
    seeds: list[int],
    sampler: SamplerConfig,
    sources: torch.Tensor | None = None,
    batch_size: int = 100,
) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] with the deployment (ODE + CFG) sampler."""
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    sigmas = model.schedule(sampler.num_steps, sampler.shift)
    out = []
    for start in range(0, len(prompts), batch_size):
        stop = start + batch_size
        src = sources[start:stop] if sources is not None else None
        cond = model.encode_prompts(prompts[start:stop], src)
        traj = sample(
            model, cond, sigmas,
            null_cond=model.null_condition(cond),
            guidance_scale=sampler.guidance_scale,
            renorm_dim=model.cfg_renorm_dim,
            initial_noise=per_sample_noise(seeds[start:stop], model.latent_shape()),
        )
        out.append(model.decode_latents(traj.final))
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> [N, H, W, 3] uint8."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def image_grid(images: np.ndarray, ncols: int, pad: int = 2, scale: int = 1) -> np.ndarray:
    """[N, H, W, 3] uint8 -> one grid image with grey padding (nearest upscaling)."""
    if scale > 1:
        images = images.repeat(scale, axis=1).repeat(scale, axis=2)
    n, h, w, _ = images.shape
    nrows = -(-n // ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), 128, dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = img
    return grid
