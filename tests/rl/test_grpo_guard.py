"""GRPO-Guard's ratio normalisation (grpo.ratio_norm) in the trainer: the rollouts keep the transition means
the ratio compares against, the ratio is 1 before an update, the step differs from plain GRPO's (the gradient
is reweighted per step), and a resumed run equals an uninterrupted one."""

import pytest
import torch

from flowrl.config import GRPOConfig, LoopConfig, OptimConfig, RolloutConfig, WindowTimestepsConfig
from flowrl.rewards.base import RewardScores
from flowrl.rl.grpo import GRPOTrainer, LocalRewards, PromptSet, settings_of
from flowrl.rl.rollout import rollout, step_log_probs
from flowrl.rl.trainer import Checkpoints
from flowrl.storage import ArtifactStore
from tests.rl.conftest import tiny_model


class _Brightness:
    def score_components(self, images, prompts, sources=None):
        total = images.mean(dim=(1, 2, 3))
        return RewardScores(total=total, components={"brightness": total})


def _cfg(ratio_norm: bool, epochs: int = 1, mode: str = "hybrid") -> GRPOConfig:
    return GRPOConfig(loop=LoopConfig(iterations=2, eval_every=100, checkpoint_every=1), prompts_per_iteration=2,
                      group_size=2, rollout=RolloutConfig(num_steps=4, cfg_mode=mode),
                      timesteps=WindowTimestepsConfig(fraction=0.5, per_trajectory=2), reward_chunks=1,
                      optim=OptimConfig(lr=1e-2), kl_coef=0.1, kl_anchor_steps=1, ratio_norm=ratio_norm,
                      epochs=epochs)


def _trainer(root, cfg):
    model = tiny_model()
    rewards = LocalRewards(_Brightness())
    trainer = GRPOTrainer(model, model.net, tiny_model(seed=1), cfg,
                          PromptSet(["a red circle", "a blue square"], ["x", "y"], None), rewards,
                          weights=lambda prompts: torch.ones(len(prompts), 1),
                          checkpoints=None if root is None else Checkpoints(ArtifactStore(str(root)), "grpo_t2i", "v"))
    return trainer, rewards, model


@pytest.mark.parametrize("mode", ["hybrid", "both", "none"])
def test_rollouts_keep_the_means_the_training_path_recomputes(mode):
    cfg = _cfg(True, mode=mode)
    model = tiny_model()
    ro = rollout(model, ["a red circle", "a blue square"], 2, settings_of(cfg), torch.Generator().manual_seed(0))
    assert ro.old_means.shape == (4, 4, *ro.states.shape[2:])
    rows, steps = torch.arange(4), torch.tensor([[0, 1, 2, 3]] * 4)
    with torch.no_grad():
        new = step_log_probs(model, ro, rows, steps, settings_of(cfg))
    torch.testing.assert_close(new.means, ro.old_means, atol=1e-5, rtol=1e-5)
    plain = rollout(model, ["a red circle"], 2, settings_of(_cfg(False, mode=mode)), torch.Generator().manual_seed(0))
    assert plain.old_means is None  # kept only when the ratio reads them


def test_guard_keeps_ratio_one_changes_the_step_and_resumes_exactly(tmp_path):
    finals = {}
    for guard in (False, True):
        trainer, rewards, model = _trainer(None, _cfg(guard))
        state = trainer.train(progress=False).state
        rewards.close()
        assert all(h["train/ratio_dev"] < 1e-4 for h in state.history)  # one step per iteration: ratio 1
        finals[guard] = [p.detach().clone() for p in model.net.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(finals[False], finals[True]))  # the step is reweighted
    # with two epochs the second compares against the kept means, and the ratio moves off 1
    trainer, rewards, _ = _trainer(None, _cfg(True, epochs=2))
    history = trainer.train(progress=False).state.history
    rewards.close()
    assert all(h["train/ratio_dev"] > 0 for h in history)
    killed, rewards, _ = _trainer(tmp_path, _cfg(True))
    killed.train(progress=False, stop_after=1)
    rewards.close()
    resumed, rewards, resumed_model = _trainer(tmp_path, _cfg(True))
    assert resumed.resume() and resumed.state.iteration == 1
    resumed.train(progress=False)
    rewards.close()
    assert all(torch.equal(a, b) for a, b in zip(finals[True], resumed_model.net.parameters()))
