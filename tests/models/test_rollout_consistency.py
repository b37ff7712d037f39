"""Rollout/training consistency on the tiny Qwen-Image components
(docs/design.md, Invariants): recomputing each stored SDE step's conditional log-prob with a
fresh forward gives a ratio of exactly 1 before any update."""

import pytest
import torch

from flowrl.models.qwen_image import QwenImageModel
from flowrl.sampling import gaussian_log_prob, sample, sde_step_mean
from tests.models.tiny_qwen_image import build_tiny_qwen_image


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("tiny_qwen_rollout"), task="edit")


@pytest.mark.parametrize("task", ["t2i", "edit"])
@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_stored_log_probs_recompute_to_ratio_one(tiny_dir, task, guidance):
    model = QwenImageModel.from_pretrained(tiny_dir, task=task, height=32, width=32)
    prompts = ["a red circle", "two blue squares"]
    sources = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) if task == "edit" else None
    cond = model.encode_prompts(prompts, sources)
    sigmas = model.schedule(3)
    traj = sample(
        model, cond, sigmas, null_cond=model.null_condition(cond), guidance_scale=guidance,
        renorm_dim=model.cfg_renorm_dim, noise_level=0.7, generator=torch.Generator().manual_seed(1),
    )
    with torch.no_grad():
        for n in range(len(sigmas) - 1):
            t, t_next = sigmas[n].expand(2), sigmas[n + 1].expand(2)
            v = model.velocity(traj.states[:, n], t, cond)
            step = sde_step_mean(traj.states[:, n], v, t, t_next, 0.7, float(sigmas[1]))
            logp = gaussian_log_prob(traj.states[:, n + 1], step.mean, step.std)
            assert (torch.exp(logp - traj.cond_log_probs[:, n]) - 1).abs().max() < 1e-5
