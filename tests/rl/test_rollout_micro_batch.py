"""grpo.rollout.micro_batch: a rollout chunk sampled (and decoded) in parts of
at most that many trajectories is the rollout of the whole chunk at once: the
noise is drawn for the whole chunk in the same order, only the forwards are
split. On the shapes model, on the tiny Qwen-Image pipeline (t2i and edit)
and for one whole GRPO iteration."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowrl.config import (ConfigError, FlowRLConfig, GRPOConfig, LoopConfig, OptimConfig, RolloutConfig,
                           WindowTimestepsConfig, from_dict)
from flowrl.models.base import FlowModel
from flowrl.rewards.base import RewardScores
from flowrl.rl.grpo import GRPOTrainer, LocalRewards, PromptSet, settings_of
from flowrl.rl.rollout import RolloutSettings, Rollouts, rollout
from flowrl.shapes import make_edit_set, render_batch
from tests.rl.conftest import tiny_model

QWEN_SIZE = 32


def _record_forwards(model: FlowModel) -> list[int]:
    """Rows of every velocity forward of ``model`` from now on (wraps the instance's method)."""
    rows: list[int] = []
    original = model.velocity

    def recording(x, t, cond):
        assert x.shape[0] == t.shape[0] == cond.batch_size
        rows.append(x.shape[0])
        return original(x, t, cond)

    model.velocity = recording
    return rows


def _record_decodes(model: FlowModel) -> list[int]:
    """Rows of every ``decode_latents`` call of ``model`` from now on."""
    rows: list[int] = []
    original = model.decode_latents

    def recording(latents):
        rows.append(latents.shape[0])
        return original(latents)

    model.decode_latents = recording
    return rows


def _assert_same_rollouts(whole: Rollouts, parts: Rollouts, atol: float = 1e-5) -> None:
    assert parts.prompts == whole.prompts and torch.equal(parts.group_ids, whole.group_ids)
    for name in ("cond", "null_cond"):
        a, b = getattr(whole, name), getattr(parts, name)
        assert (a is None) == (b is None)
        if a is not None:
            assert a.tensors.keys() == b.tensors.keys()
            assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    torch.testing.assert_close(parts.sigmas, whole.sigmas, atol=0, rtol=0)
    torch.testing.assert_close(parts.states, whole.states, atol=atol, rtol=1e-5)
    torch.testing.assert_close(parts.old_log_probs, whole.old_log_probs, atol=atol, rtol=1e-5)
    torch.testing.assert_close(parts.images, whole.images, atol=atol, rtol=1e-5)


def _run(model, prompts, group_size, settings, sources, seed=0):
    gen = torch.Generator().manual_seed(seed)
    forwards, decodes = _record_forwards(model), _record_decodes(model)
    try:
        ro = rollout(model, prompts, group_size, settings, gen, sources)
    finally:
        del model.velocity, model.decode_latents  # back to the class's methods
    if settings.micro_batch is None:
        assert decodes == [len(ro.prompts)]
    else:
        assert max(decodes) <= settings.micro_batch and sum(decodes) == len(ro.prompts)
    return ro, forwards, gen.get_state()


def _check(model, prompts, group_size, sources, mode, micro, atol=1e-5):
    base = RolloutSettings(num_steps=3, noise_level=0.7, guidance_scale=3.0, cfg_mode=mode)
    whole, whole_forwards, whole_gen = _run(model, prompts, group_size, base, sources)
    parts, part_forwards, part_gen = _run(model, prompts, group_size,
                                          dataclasses.replace(base, micro_batch=micro), sources)
    _assert_same_rollouts(whole, parts, atol)
    assert torch.equal(part_gen, whole_gen)  # the same draws were taken: the next chunk sees the same stream
    rows = len(prompts) * group_size
    branches = 1 if mode == "none" else 2
    assert whole_forwards == [branches * rows] * 3  # one forward per step
    assert max(part_forwards) <= branches * micro
    assert sum(part_forwards) == branches * rows * 3  # every row of every step exactly once
    if micro < rows:
        assert len(part_forwards) == 3 * -(-rows // micro)


@pytest.mark.parametrize("task", ["t2i", "edit"])
@pytest.mark.parametrize("mode", ["hybrid", "both", "none"])
@pytest.mark.parametrize("micro", [1, 3, 4])
def test_shapes_rollouts_in_parts_are_the_whole_chunks(task, mode, micro):
    """6 rows (2 prompts x 3) in parts of 1, 3 (even) and 4 (4 + 2)."""
    model = tiny_model()
    if task == "t2i":
        prompts, sources = ["a red circle", "two blue squares"], None
    else:
        edits = make_edit_set(3, 1)[:2]
        prompts, sources = [e.instruction for e in edits], render_batch([e.source for e in edits], 32)
    _check(model, prompts, 3, sources, mode, micro)


def test_a_part_size_over_the_chunk_is_the_single_forward():
    model = tiny_model()
    settings = RolloutSettings(3, 0.7, 3.0, "hybrid")
    whole, _, _ = _run(model, ["a red circle"], 2, settings, None)
    big, forwards, _ = _run(model, ["a red circle"], 2, dataclasses.replace(settings, micro_batch=50), None)
    assert forwards == [4, 4, 4]
    assert torch.equal(big.states, whole.states) and torch.equal(big.images, whole.images)


def test_parts_draw_the_whole_chunks_noise_not_their_own():
    """The test above could pass by luck if a part drew its own noise only when it is the whole chunk:
    sampling the first part alone from the same seed gives other states than its rows in the chunk."""
    model = tiny_model()
    settings = RolloutSettings(3, 0.7, 3.0, "hybrid", micro_batch=2)
    chunk, _, _ = _run(model, ["a red circle", "a blue square"], 2, settings, None)
    alone, _, _ = _run(model, ["a red circle"], 2, settings, None)
    torch.testing.assert_close(alone.states[:, 0], chunk.states[:2, 0])  # initial noise: a prefix of the draw
    assert not torch.allclose(alone.states[:, 1], chunk.states[:2, 1])  # step noise: drawn for all 4 rows


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    from flowrl.models.qwen_image import QwenImageModel
    from tests.models.tiny_qwen_image import build_tiny_qwen_image

    folder = build_tiny_qwen_image(tmp_path_factory.mktemp("rollout_micro_qwen"), task="edit")
    return {task: QwenImageModel.from_pretrained(folder, task=task, height=QWEN_SIZE, width=QWEN_SIZE)
            for task in ("t2i", "edit")}


@pytest.mark.parametrize("task", ["t2i", "edit"])
@pytest.mark.parametrize("micro", [1, 3])
def test_qwen_image_rollouts_in_parts_are_the_whole_chunks(qwen, task, micro):
    """6 rows (2 prompts x 3) of two prompt lengths (padded to the chunk's longest) in parts of 1 and of 3,
    through the diffusers transformer (CFG renorm) and the VAE decode."""
    model = qwen[task]
    prompts = ["a red circle left of a blue square", "two green triangles on top of a long yellow rectangle"]
    sources = None
    if task == "edit":
        sources = torch.rand(2, 3, QWEN_SIZE, QWEN_SIZE, generator=torch.Generator().manual_seed(3))
    _check(model, prompts, 3, sources, "hybrid", micro, atol=1e-5)


class _Brightness:
    """A reward with a spread in every group, so the advantages and the loss are not zero."""

    def score_components(self, images, prompts, sources=None):
        total = images.mean(dim=(1, 2, 3))
        return RewardScores(total=total, components={"brightness": total})


def _grpo_iteration(rollout_micro_batch):
    cfg = GRPOConfig(loop=LoopConfig(iterations=1, checkpoint_every=100, eval_every=100), prompts_per_iteration=4,
                     group_size=3, rollout=RolloutConfig(num_steps=3, micro_batch=rollout_micro_batch),
                     timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=2), reward_chunks=2,
                     optim=OptimConfig(lr=1e-2), kl_coef=0.0)
    model = tiny_model()
    rewards = LocalRewards(_Brightness())
    prompts = PromptSet(["a red circle", "a blue square", "two green triangles", "a yellow star"], list("abcd"), None)
    trainer = GRPOTrainer(model, model.net, None, cfg, prompts, rewards, lambda p: torch.ones(len(p), 1))
    forwards = _record_forwards(model)
    try:
        outs = trainer.collect(0)
        del model.velocity
        metrics = trainer.update(outs, 0)
    finally:
        rewards.close()
        trainer.engine.close()
    return outs[""], metrics, forwards, [p.detach().clone() for p in model.net.parameters()]


def test_grpo_iteration_with_rollout_parts_is_the_same_iteration():
    """Two chunks of 6 rows (2 prompts x 3), sampled in parts of 4 + 2: same rollouts, rewards, advantages,
    metrics and updated weights as whole chunks."""
    whole, whole_metrics, whole_forwards, whole_params = _grpo_iteration(None)
    parts, part_metrics, part_forwards, part_params = _grpo_iteration(4)
    assert whole_forwards == [12] * 6 and part_forwards == [8, 4] * 6  # 2 chunks x 3 steps, CFG doubles
    _assert_same_rollouts(whole.rollouts, parts.rollouts)
    torch.testing.assert_close(parts.scores.total, whole.scores.total, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(parts.advantages, whole.advantages, atol=1e-5, rtol=1e-5)
    assert whole.advantages.abs().max() > 0.1  # an update that can differ
    assert whole_metrics.keys() == part_metrics.keys()
    for key, value in whole_metrics.items():
        assert part_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    for a, b in zip(whole_params, part_params):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)


def test_the_key_reaches_the_rollout_settings_and_is_validated():
    assert settings_of(GRPOConfig()).micro_batch is None
    assert settings_of(GRPOConfig(rollout=RolloutConfig(micro_batch=3))).micro_batch == 3
    assert from_dict(FlowRLConfig, {"grpo": {"rollout": {"micro_batch": 2}}}).grpo.rollout.micro_batch == 2
    with pytest.raises(ConfigError, match=r"grpo.rollout.micro_batch: expected int >= 1"):
        from_dict(FlowRLConfig, {"grpo": {"rollout": {"micro_batch": 0}}})
    # at its default the key leaves the section hash alone (results keyed before it existed stay valid)
    base = from_dict(FlowRLConfig, {})
    for section in ("grpo", "grpo.rollout"):
        assert from_dict(FlowRLConfig, {"grpo": {"rollout": {"micro_batch": None}}}).section_hash(section) == \
            base.section_hash(section)


@pytest.mark.parametrize("guided", [True, False])
def test_velocity_in_parts_is_the_single_forward(guided):
    from flowrl.sampling import cfg_velocity, cfg_velocity_in_parts

    model = tiny_model()
    cond = model.encode_prompts(["a red circle", "two blue squares", "a green star", "a yellow square", "a dot"])
    null = model.null_condition(cond) if guided else None
    x = torch.randn(5, *model.latent_shape(), generator=torch.Generator().manual_seed(4))
    t = torch.linspace(0.9, 0.2, 5)
    with torch.no_grad():
        whole = cfg_velocity(model, x, t, cond, null, 3.0)
        parts = cfg_velocity_in_parts(model, x, t, cond, null, 3.0, micro_batch=2)  # 2 + 2 + 1
    torch.testing.assert_close(parts.guided, whole.guided, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(parts.cond, whole.cond, atol=1e-5, rtol=1e-5)
    assert (parts.cond is parts.guided) == (not guided)  # unguided: one tensor, as the single forward gives
