"""The shapes-family DiT adapter: shapes, CFG null branch, checkpoints, RoPE."""

import json

import pytest
import torch

from flowrl.config import FlowRLConfig, ShapesModelConfig, from_dict
from flowrl.models import CheckpointError, create_model, load_checkpoint, save_checkpoint
from flowrl.models.shapes_dit import apply_rope, axial_rope
from flowrl.sampling import (
    cfg_velocity,
    gaussian_log_prob,
    largest_sigma_below_one,
    sample,
    sde_step_mean,
)
from flowrl.shapes import make_edit_set, render_batch

TINY = {"model": {"shapes": {"width": 32, "depth": 2, "heads": 2, "head_channels": 4}}}


@pytest.fixture
def model():
    """A tiny model whose adaLN gates are not zero (at init every block is the
    identity, so nothing but the image tokens would reach the output)."""
    m = create_model(from_dict(FlowRLConfig, TINY), seed=0)
    with torch.no_grad():
        for block in m.net.blocks:
            torch.nn.init.normal_(block.modulation.bias, std=0.5)
    return m


def _edit_batch(n=3):
    edits = make_edit_set(7, 1)[:n]
    return [e.instruction for e in edits], render_batch([e.source for e in edits], 32)


def test_velocity_shapes_t2i_and_edit(model):
    x = torch.randn(2, 3, 32, 32)
    t = torch.tensor([0.9, 0.2])
    cond = model.encode_prompts(["a red circle", "two squares"])
    assert model.velocity(x, t, cond).shape == (2, 3, 32, 32)
    prompts, sources = _edit_batch(2)
    edit = model.encode_prompts(prompts, sources)
    assert model.velocity(x, t, edit).shape == (2, 3, 32, 32)
    # the source image really conditions the output
    other = model.encode_prompts(prompts, sources.flip(-1))
    assert (model.velocity(x, t, edit) - model.velocity(x, t, other)).abs().max() > 1e-4


def test_null_condition_drops_text_keeps_source(model):
    prompts, sources = _edit_batch(2)
    cond = model.encode_prompts(prompts, sources)
    null = model.null_condition(cond)
    assert torch.all(null.tensors["tokens"] == 0)
    assert torch.equal(null.tensors["source"], cond.tensors["source"])
    assert null.tensors["tokens"].shape == cond.tensors["tokens"].shape


def test_latents_roundtrip(model):
    images = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(model.decode_latents(model.encode_images(images)), images)


def test_checkpoint_roundtrip(model, tmp_path):
    save_checkpoint(model, tmp_path)
    loaded = load_checkpoint(tmp_path, expected_family="shapes")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([0.5, 0.7])
    cond = model.encode_prompts(["a circle", "a square"])
    torch.testing.assert_close(loaded.velocity(x, t, cond), model.net.eval()(x, t, cond.tensors["tokens"], None))


def test_checkpoint_errors_name_the_problem(model, tmp_path):
    with pytest.raises(CheckpointError, match="missing model.json"):
        load_checkpoint(tmp_path)
    save_checkpoint(model, tmp_path)
    with pytest.raises(CheckpointError, match="checkpoint family 'shapes', expected 'qwen_image'"):
        load_checkpoint(tmp_path, expected_family="qwen_image")
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["shapes"]["width"] = 64
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="weights do not fit the model"):
        load_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="unreadable safetensors"):
        load_checkpoint(tmp_path)


def test_rope_same_cell_scores_do_not_depend_on_the_cell():
    cos, sin = axial_rope(grid=4, head_dim=8)
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 16, 8)
    scores = (apply_rope(q, cos, sin) * apply_rope(k, cos, sin)).sum(-1)  # query and key in the same cell
    torch.testing.assert_close(scores, scores[..., :1].expand_as(scores))
    # rotations preserve norms
    torch.testing.assert_close(apply_rope(q, cos, sin).norm(dim=-1), q.norm(dim=-1))


@pytest.mark.parametrize("task", ["t2i", "edit"])
@pytest.mark.parametrize("guidance,renorm", [(1.0, None), (3.0, None), (3.0, 1)])
def test_rollout_log_probs_recompute_exactly(model, task, guidance, renorm):
    """Rollout/training consistency (docs/design.md, Invariants) on the shapes DiT:
    both the conditional-branch log-probs (hybrid CFG) and the guided ones
    (CFG in the objective) recompute to a ratio of 1."""
    if task == "t2i":
        cond = model.encode_prompts(["a red circle", "three squares", "a circle left of a square"])
    else:
        cond = model.encode_prompts(*_edit_batch(3))
    null = model.null_condition(cond)
    sigmas = model.schedule(5)
    traj = sample(
        model, cond, sigmas, null_cond=null, guidance_scale=guidance,
        renorm_dim=renorm, noise_level=0.7, generator=torch.Generator().manual_seed(0),
    )
    guard = largest_sigma_below_one(sigmas)
    with torch.no_grad():
        for n in range(5):
            t, t_next = sigmas[n].expand(3), sigmas[n + 1].expand(3)
            vel = cfg_velocity(model, traj.states[:, n], t, cond, null, guidance, renorm)
            for v, stored in ((vel.cond, traj.cond_log_probs), (vel.guided, traj.log_probs)):
                step = sde_step_mean(traj.states[:, n], v, t, t_next, 0.7, guard)
                logp = gaussian_log_prob(traj.states[:, n + 1], step.mean, step.std)
                assert (torch.exp(logp - stored[:, n]) - 1).abs().max() < 1e-5


def test_config_architecture_is_used():
    cfg = ShapesModelConfig(width=64, depth=3, heads=4, head_channels=8)
    m = create_model(from_dict(FlowRLConfig, {"model": {"shapes": cfg.__dict__}}))
    assert len(m.net.blocks) == 3 and m.net.config == cfg


def test_64px_world_by_config():
    config = from_dict(FlowRLConfig, {"world": {"resolution": 64}, **TINY})
    m = create_model(config)
    prompts, _ = _edit_batch(2)
    sources = torch.rand(2, 3, 64, 64)
    v = m.velocity(torch.randn(2, 3, 64, 64), torch.tensor([0.5, 0.5]), m.encode_prompts(prompts, sources))
    assert v.shape == (2, 3, 64, 64) and m.latent_shape() == (3, 64, 64)
