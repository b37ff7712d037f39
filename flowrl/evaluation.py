"""Deterministic sampling for evaluation, and image grids.

Every sample's initial noise comes from its own seed, so a (prompt, seed)
pair gives the same image whatever the batch it is in and whatever other
models are evaluated beside it (the bench relies on this).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from flowrl.config import FlowRLConfig, SamplerConfig
from flowrl.models.base import FlowModel
from flowrl.prompt_files import decode_sources, first_per_category
from flowrl.sampling import sample


def per_sample_noise(model: FlowModel, seeds: list[int]) -> torch.Tensor:
    """[len(seeds), *latent] initial noise, one generator per sample."""
    return torch.cat([model.prepare_noise(1, torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def item_seeds(seed: int, n_t2i: int, n_edit: int = 0) -> tuple[list[int], list[int]]:
    """The sampling seeds of ``n_t2i`` T2I and ``n_edit`` edit items of a fixed set drawn with ``seed``
    (held-out evaluation, bench): the same item gets the same seed in every model's run."""
    return [seed * 1_000_003 + i for i in range(n_t2i)], [seed * 1_000_003 + 500_000 + i for i in range(n_edit)]


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
        if src is not None and src.dtype == torch.uint8:  # sources kept as bytes until their batch
            src = src.float() / 255
        cond = model.encode_prompts(prompts[start:stop], src)
        traj = sample(
            model, cond, sigmas,
            null_cond=model.null_condition(cond),
            guidance_scale=sampler.guidance_scale,
            renorm_dim=model.cfg_renorm_dim,
            initial_noise=per_sample_noise(model, seeds[start:stop]),
        )
        out.append(model.decode_latents(traj.final).cpu())  # each batch leaves the accelerator as it is decoded
    return torch.cat(out)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] (or already uint8), on any device -> [N, H, W, 3] uint8."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).numpy()


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


@dataclass(frozen=True)
class ShapesReport:
    """The judge's view of one model on the held-out sets."""

    metrics: dict[str, float]
    grid: np.ndarray  # [H, W, 3] uint8: T2I samples, then (source, output) edit pairs
    wall_s: float


def heldout_sets(config: FlowRLConfig) -> tuple[list, list]:
    """The fixed held-out T2I prompts and edit instructions (seeded by eval.seed)."""
    from flowrl.shapes.edits import make_edit_set
    from flowrl.shapes.prompts import make_t2i_set

    ev = config.eval
    return make_t2i_set(ev.seed, ev.t2i_per_category), make_edit_set(ev.seed, ev.edit_per_kind)


def evaluate_shapes(model: FlowModel, config: FlowRLConfig, grid_items: int = 12) -> ShapesReport:
    """Sample the held-out sets with the deployment sampler and judge them."""
    from flowrl.shapes import judge
    from flowrl.shapes.render import render_batch

    start = time.perf_counter()
    t2i_set, edit_set = heldout_sets(config)
    res, ev = config.world.resolution, config.eval
    t2i_seeds, edit_seeds = item_seeds(ev.seed, len(t2i_set), len(edit_set))
    t2i_images = generate(model, [e.prompt for e in t2i_set], t2i_seeds, config.sampler, batch_size=ev.batch_size)
    sources = render_batch([e.source for e in edit_set], res)
    edit_images = generate(
        model, [e.instruction for e in edit_set], edit_seeds, config.sampler, sources=sources, batch_size=ev.batch_size
    )
    metrics = judge.evaluate(
        t2i_specs=[e.spec for e in t2i_set], t2i_images=to_uint8(t2i_images),
        edit_specs=[e.spec for e in edit_set], edit_sources=to_uint8(sources), edit_outputs=to_uint8(edit_images),
    )
    n_t, n_e = len(t2i_set), len(edit_set)
    metrics["fidelity"] = (metrics["t2i/fidelity"] * n_t + metrics["edit/fidelity"] * n_e) / (n_t + n_e)
    grid = _report_grid(t2i_images, t2i_set, sources, edit_images, grid_items)
    return ShapesReport(metrics=metrics, grid=grid, wall_s=time.perf_counter() - start)


def _report_grid(t2i_images, t2i_set, sources, edit_images, n: int) -> np.ndarray:
    """One row of T2I samples spread over the categories, then rows of edit pairs."""
    step_t = max(1, len(t2i_set) // n)
    t2i = to_uint8(t2i_images[::step_t][:n])
    step_e = max(1, len(edit_images) // (n // 2))
    pairs = torch.stack([sources[::step_e][: n // 2], edit_images[::step_e][: n // 2]], dim=1).flatten(0, 1)
    return image_grid(np.concatenate([t2i, to_uint8(pairs)]), ncols=n, scale=4)


# --------------------------------------------------------------------------- families without a judge


# the first N held-out rows of each category, in file order
heldout_sample = first_per_category


def reward_evaluation(model, frame, scorers: dict, sampler, seed: int, batch_size: int) -> tuple[dict, np.ndarray]:
    """Deployment-sampler images of ``frame``'s prompts (fixed seeds), scored by each of
    ``scorers`` ({name: reward}): the mean over the prompts and per category; and a grid."""
    prompts = list(frame["prompt"])
    sources = decode_sources(frame)
    seeds, _ = item_seeds(seed, len(prompts))
    images = generate(model, prompts, seeds, sampler, sources=sources, batch_size=batch_size)
    metrics = {}
    for name, scorer in scorers.items():
        values = scorer.score(images, prompts, sources).float().cpu().numpy()
        metrics[name] = float(values.mean())
        for category, rows in frame.groupby("category").groups.items():
            metrics[f"{name}/{category}"] = float(values[list(rows)].mean())
    return metrics, thumbnails(images[:12])


def thumbnails(images, side: int = 128) -> np.ndarray:
    """A grid of up to 12 images, each scaled to ``side`` pixels on its longer edge."""
    import torch.nn.functional as F

    scale = side / max(images.shape[-2:])
    if scale < 1:
        images = F.interpolate(images.float(), scale_factor=scale, mode="bilinear", antialias=True)
    return image_grid(to_uint8(images), min(len(images), 6))
