"""Memory knobs that must not change the update: micro-batches (grpo/opd.optim.micro_batch), gradient
checkpointing (grpo/opd.optim.gradient_checkpointing) and the KL reference offloaded to the CPU
(grpo.reference_device), on the shapes model and on the tiny Qwen-Image transformer.

Each test takes the same update twice on the same rollouts and compares the accumulated gradient
itself (an Adam step hides its scale); the gradient clip is out of reach so it is the raw one."""

from __future__ import annotations

import pytest
import torch

from flowrl.config import (ConfigError, GRPOConfig, OPDConfig, OptimConfig, RolloutConfig, TimestepsConfig,
                           WindowTimestepsConfig)
from flowrl.rl.grpo import GRPOTrainer, PromptSet
from flowrl.rl.opd import OPDTrainer
from tests.rl.conftest import tiny_model
from tests.rl.ddp_update import EDITS, PROMPTS, _task_batch

NO_CLIP = 1e9


def _weights(prompts):
    return torch.ones(len(prompts), 1)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    assert any(v.abs().max() > 0 for v in a.values())  # a gradient that can be wrong
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, atol=1e-7, rtol=1e-5)


def _grpo_shapes(mixed: bool = False, optim: dict | None = None, rollout: dict | None = None, **overrides):
    """One GRPO update of the tiny shapes model on fixed rollouts (12 rows per task): (gradient, metrics).
    ``optim``, ``rollout``: keys of grpo.optim, grpo.rollout over the test's own."""
    cfg = GRPOConfig(prompts_per_iteration=4, group_size=3,
                     rollout=RolloutConfig(**{"num_steps": 3, **(rollout or {})}),
                     timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=2), reward_chunks=1,
                     optim=OptimConfig(**{"lr": 1e-3, "grad_clip": NO_CLIP, **(optim or {})}), **overrides)
    model = tiny_model()
    reference = tiny_model(seed=2) if cfg.kl_coef > 0 else None  # a reference that differs: the KL is not zero
    if mixed:
        sources = torch.rand(len(EDITS), 3, 32, 32, generator=torch.Generator().manual_seed(9))
        trainer = GRPOTrainer(model, model.net, reference, cfg,
                              {"t2i": PromptSet(PROMPTS, ["x"] * 4, None), "edit": PromptSet(EDITS, ["y"] * 4, sources)},
                              {"t2i": None, "edit": None}, {"t2i": _weights, "edit": _weights})
        batch = {"t2i": _task_batch(model, cfg, PROMPTS, None, 0, 1, 5),
                 "edit": _task_batch(model, cfg, EDITS, sources, 0, 1, 6)}
    else:
        trainer = GRPOTrainer(model, model.net, reference, cfg, PromptSet(PROMPTS, ["x"] * 4, None), None, _weights)
        batch = {"": _task_batch(model, cfg, PROMPTS, None, 0, 1, 5)}
    metrics = trainer.update(batch, iteration=0)
    return _grads(model.net), metrics


@pytest.mark.parametrize("mode", ["hybrid_kl", "both", "mixed"])
def test_grpo_micro_batches_take_the_whole_minibatch_update(mode):
    """12 rows in parts of 5, 5 and 2 (uneven: each part must weigh its rows), with the KL to a reference,
    with the guided objective (cfg_mode both), and with two tasks accumulating into one step."""
    settings = {"hybrid_kl": dict(kl_coef=0.5), "both": dict(rollout={"cfg_mode": "both"}),
                "mixed": dict(kl_coef=0.5)}[mode]
    mixed = mode == "mixed"
    whole, whole_metrics = _grpo_shapes(mixed, **settings)
    parts, part_metrics = _grpo_shapes(mixed, optim={"micro_batch": 5}, **settings)
    _assert_same(whole, parts)
    for key in ("train/loss", "train/kl", "train/clip_fraction", "train/ratio_dev"):
        assert part_metrics[key] == pytest.approx(whole_metrics[key], rel=1e-5, abs=1e-7), key  # the loss: ~0
    if mode != "both":
        assert whole_metrics["train/kl"] > 0


def test_grpo_gradient_checkpointing_on_the_shapes_blocks_takes_the_same_update():
    whole, metrics = _grpo_shapes(kl_coef=0.5)
    model = tiny_model()
    from flowrl.models.lora import enable_gradient_checkpointing

    names = list(model.net.state_dict())
    enable_gradient_checkpointing(model.net, "grpo.optim.gradient_checkpointing")
    assert all(type(b).__name__ == "CheckpointedBlock" for b in model.net.blocks)
    assert list(model.net.state_dict()) == names  # parameter names (checkpoints, trainable patterns) unchanged
    recomputed, again = _grpo_shapes(kl_coef=0.5, optim={"gradient_checkpointing": True, "micro_batch": 4})
    _assert_same(whole, recomputed)
    assert again["train/loss"] == pytest.approx(metrics["train/loss"], rel=1e-5)
    with pytest.raises(ValueError, match="opd.optim.gradient_checkpointing: Linear has neither"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2), "opd.optim.gradient_checkpointing")


def _opd_shapes(**optim):
    """One OPD update of the tiny shapes model; ``optim``: keys of opd.optim."""
    sources = torch.rand(len(EDITS), 3, 32, 32, generator=torch.Generator().manual_seed(9))
    model = tiny_model()
    cfg = OPDConfig(prompts_per_iteration=8, num_steps=3, timesteps=TimestepsConfig(per_trajectory=2),
                    optim=OptimConfig(lr=1e-3, grad_clip=NO_CLIP, **optim))
    trainer = OPDTrainer(model, model.net, {"a": tiny_model(seed=1), "b": tiny_model(seed=3)}, cfg,
                         {"t2i": PromptSet(PROMPTS, ["x", "x", "z", "z"], None),
                          "edit": PromptSet(EDITS, ["y"] * 4, sources)},
                         {"t2i": "a", "edit": "b", "z": "b"}, {"t2i": 0.5, "edit": 0.5}, guidance_scale=3.0)
    metrics = trainer.step(0)
    return _grads(model.net), metrics


def test_opd_micro_batches_and_checkpointing_take_the_whole_batch_update():
    whole, metrics = _opd_shapes()
    parts, part_metrics = _opd_shapes(micro_batch=3, gradient_checkpointing=True)
    _assert_same(whole, parts)
    for key in ("train/loss", "train/loss_t2i", "train/loss_edit_uncond"):
        assert part_metrics[key] == pytest.approx(metrics[key], rel=1e-5), key


def test_micro_batch_must_be_positive_naming_the_key(tmp_path):
    from flowrl.config import load_config
    from tests.conftest import write_config

    for section in ("grpo", "opd"):
        with pytest.raises(ConfigError, match=rf"{section}.optim.micro_batch: expected int >= 1, got 0"):
            load_config(write_config(tmp_path, **{section: {"optim": {"micro_batch": 0}}}))
    with pytest.raises(ConfigError, match=r"grpo.reference_device: expected one of \['same', 'cpu'\]"):
        load_config(write_config(tmp_path, grpo={"reference_device": "gpu"}))


def test_an_offloaded_reference_is_a_frozen_copy_on_its_device_and_gives_the_same_kl():
    from flowrl.stages.policy import OffloadedModel, frozen_copy, offloaded_reference

    model = tiny_model()
    copied = frozen_copy(model.net, "cpu")
    assert all(not p.requires_grad for p in copied.parameters())
    for (name, a), b in zip(model.net.state_dict().items(), copied.state_dict().values()):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name  # the same values, its own storage
    reference = offloaded_reference(model, model.net, "cpu")
    assert isinstance(reference, OffloadedModel) and reference.model.net is not model.net
    kept, _ = _grpo_shapes(kl_coef=0.5)

    def offloaded_grads():
        cfg = GRPOConfig(prompts_per_iteration=4, group_size=3, rollout=RolloutConfig(num_steps=3),
                         timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=2), reward_chunks=1,
                         optim=OptimConfig(lr=1e-3, grad_clip=NO_CLIP), kl_coef=0.5)
        policy = tiny_model()
        base = tiny_model(seed=2)
        trainer = GRPOTrainer(policy, policy.net, offloaded_reference(base, base.net, "cpu"), cfg,
                              PromptSet(PROMPTS, ["x"] * 4, None), None, _weights)
        trainer.update({"": _task_batch(policy, cfg, PROMPTS, None, 0, 1, 5)}, iteration=0)
        return _grads(policy.net)

    _assert_same(kept, offloaded_grads())


# --------------------------------------------------------------------------- the tiny Qwen-Image transformer


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from tests.models.tiny_qwen_image import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("micro_qwen"), task="t2i")


def _grpo_qwen(tiny, offload: bool = False, **optim):
    from flowrl.models.qwen_image import QwenImageModel
    from flowrl.stages.policy import offloaded_reference

    cfg = GRPOConfig(prompts_per_iteration=4, group_size=3, rollout=RolloutConfig(num_steps=3),
                     timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=2), reward_chunks=1,
                     optim=OptimConfig(lr=1e-3, grad_clip=NO_CLIP, **optim), kl_coef=0.5)
    model = QwenImageModel.from_pretrained(tiny, task="t2i", height=32, width=32)
    reference = QwenImageModel.from_pretrained(tiny, task="t2i", height=32, width=32)
    with torch.no_grad():  # a reference that differs from the policy: the KL term has a gradient
        for param in reference.transformer.parameters():
            param.mul_(1.01)
    if offload:  # grpo.reference_device: cpu (the stage's construction)
        reference = offloaded_reference(reference, reference.transformer, "cpu")
    trainer = GRPOTrainer(model, model.transformer, reference, cfg, PromptSet(PROMPTS, ["x"] * 4, None), None,
                          _weights)
    try:
        metrics = trainer.update({"": _task_batch(model, cfg, PROMPTS, None, 0, 1, 5)}, iteration=0)
    finally:
        trainer.engine.close()  # ZeRO in one process made its own process group
    return _grads(model.transformer), metrics


def test_qwen_image_micro_batches_checkpointing_and_an_offloaded_reference_take_the_same_update(tiny_qwen):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        whole, metrics = _grpo_qwen(tiny_qwen)
        parts, part_metrics = _grpo_qwen(tiny_qwen, offload=True, micro_batch=5, gradient_checkpointing=True)
    finally:
        torch.set_num_threads(threads)
    _assert_same(whole, parts)
    assert metrics["train/kl"] > 0
    # ~1e-5, a near-cancelling sum: a batch of 5 and one of 12 round differently in the forward, by up to 4e-8
    # on an Intel Xeon's kernels (rel 2e-3); a wrongly weighted micro-batch moves it by its own size
    for key in ("train/loss", "train/kl"):
        assert part_metrics[key] == pytest.approx(metrics[key], rel=1e-3, abs=1e-7), key


def test_qwen_image_under_zero_3_with_checkpointing_and_micro_batches_takes_the_plain_update(tiny_qwen):
    """The full-parameter production mode (ZeRO-3, recompute, micro-batches) in one process on DeepSpeed's CPU
    accelerator against plain PyTorch."""
    pytest.importorskip("deepspeed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plain, metrics = _grpo_qwen(tiny_qwen)
        zero, zero_metrics = _grpo_qwen(tiny_qwen, zero_stage=3, micro_batch=5, gradient_checkpointing=True)
    finally:
        torch.set_num_threads(threads)
    assert metrics["train/grad_norm"] > 0
    for key in ("train/loss", "train/kl", "train/grad_norm"):  # batches of 5 and 12 round differently (above)
        assert zero_metrics[key] == pytest.approx(metrics[key], rel=1e-3, abs=1e-7), key
