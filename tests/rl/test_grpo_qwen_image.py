"""GRPO's production code path on tiny random Qwen-Image components: SDE
rollouts through the diffusers-backed adapter, group advantages, the clipped
update of the transformer, plain PyTorch against DeepSpeed ZeRO (DeepSpeed's
CPU accelerator, one process)."""

from concurrent.futures import Future

import pytest
import torch

from flowrl.config import GRPOConfig, LoopConfig, OptimConfig, RolloutConfig, WindowTimestepsConfig
from flowrl.models.qwen_image import QwenImageModel
from flowrl.rewards.base import RewardScores
from flowrl.rl.grpo import GRPOTrainer, PromptSet
from tests.models.tiny_qwen_image import build_tiny_qwen_image

HEIGHT, WIDTH = 32, 32
PROMPTS = ["a red circle left of a blue square", "two green triangles"]


class Brightness:
    """A deterministic reward with a spread inside every group: mean brightness of the image."""

    def submit(self, images, prompts, sources=None) -> Future:
        done: Future = Future()
        value = images.float().mean(dim=(1, 2, 3))
        done.set_result(RewardScores(value, {"brightness": value}))
        return done


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("grpo_qwen"), task="t2i")


def _train(tiny, zero: int):
    model = QwenImageModel.from_pretrained(tiny, task="t2i", height=HEIGHT, width=WIDTH)
    cfg = GRPOConfig(loop=LoopConfig(iterations=2, checkpoint_every=100), prompts_per_iteration=2, group_size=2,
                     rollout=RolloutConfig(num_steps=2),
                     timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=1),
                     reward_chunks=1,
                     optim=OptimConfig(lr=1e-3, zero_stage=zero), kl_coef=0.0)
    trainer = GRPOTrainer(model, model.transformer, None, cfg, PromptSet(PROMPTS, ["a", "b"], None), Brightness(),
                          lambda prompts: torch.ones(len(prompts), 1))
    try:
        result = trainer.train(progress=False)
    finally:
        trainer.engine.close()
    return trainer, result


@pytest.mark.parametrize("zero", [2, 3])
def test_grpo_on_qwen_image_under_deepspeed_zero_takes_the_plain_update(tiny, zero):
    start = QwenImageModel.from_pretrained(tiny, task="t2i", height=HEIGHT, width=WIDTH).transformer.state_dict()
    _, plain = _train(tiny, 0)
    trainer, sharded = _train(tiny, zero)
    assert trainer.engine.zero_stage == zero and sharded.state.iteration == 2
    assert any(not torch.equal(start[k], v) for k, v in plain.module_state.items())  # the transformer moved
    for a, b in zip(plain.state.history, sharded.state.history):
        assert a["train/reward"] == pytest.approx(b["train/reward"], rel=1e-5)
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-3, abs=1e-7)
    for key, value in plain.module_state.items():
        # to 3 % of one Adam step (lr 1e-3): m / sqrt(v) turns float noise in an all-but-zero gradient
        # entry into a visible part of a step, and ZeRO sums the gradient in another order
        torch.testing.assert_close(sharded.module_state[key], value, atol=3e-5, rtol=1e-4)
