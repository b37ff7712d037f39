"""Trainer machinery: the hacking monitor, checkpoints, seeded draws."""

import fnmatch
import logging
import os

import pytest
import torch

from flowrl.config import GRPOConfig, LoopConfig, OptimConfig, RolloutConfig, WindowTimestepsConfig
from flowrl.rl.grpo import GRPOTrainer, LocalRewards, PromptSet
from flowrl.rl.trainer import (
    Checkpoints,
    HackingMonitor,
    LoopSettings,
    LoopTrainer,
    TrainerState,
    TrainingStopped,
    seeded_generator,
)
from flowrl.rewards.base import RewardScores
from flowrl.storage import ArtifactStore
from tests.rl.conftest import tiny_model


def test_hacking_fires_when_reward_rises_and_heldout_falls():
    monitor = HackingMonitor(threshold=0.05)
    assert monitor.check(0.50, None) is None  # iteration 0: no training reward yet
    assert monitor.check(0.60, 5.0) is None  # new best
    assert monitor.check(0.57, 5.5) is None  # within the threshold
    warning = monitor.check(0.50, 5.6)
    assert warning and "0.500" in warning and "0.600" in warning


def test_no_hacking_when_both_fall_or_the_heldout_recovers():
    monitor = HackingMonitor(threshold=0.05)
    monitor.check(0.60, 5.0)
    assert monitor.check(0.40, 4.0) is None  # the reward fell too: a bad step, not hacking
    assert monitor.check(0.65, 6.0) is None  # better than ever


def test_first_reward_stands_in_for_the_baseline():
    monitor = HackingMonitor(threshold=0.05)
    monitor.check(0.60, None)  # the best is the untrained model's
    assert monitor.check(0.58, 5.0) is None  # first training reward becomes the reference
    assert monitor.check(0.50, 5.2)


def test_seeded_generators_are_reproducible_and_distinct():
    draw = lambda *key: torch.rand(4, generator=seeded_generator(*key))
    assert torch.equal(draw(1, 2, 3), draw(1, 2, 3))
    assert not torch.equal(draw(1, 2, 3), draw(1, 2, 4))
    assert not torch.equal(draw(1, 2, 3), draw(1, 3, 3))


def test_latest_checkpoint_skips_incomplete_ones(tmp_path):
    store = ArtifactStore(str(tmp_path))
    ckpts = Checkpoints(store, "grpo_t2i", "abc")
    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    assert ckpts.latest() is None
    ckpts.save(TrainerState(iteration=2), net, opt, None, "h")
    uri = ckpts.save(TrainerState(iteration=4), net, opt, None, "h")
    os.remove(os.path.join(uri, "manifest.json"))  # as if killed before the manifest was written
    assert ckpts.latest().endswith("abc-0000002")
    other = Checkpoints(store, "grpo_t2i", "abcd")  # a version with the same prefix is another run
    assert other.latest() is None
    state = ckpts.load(ckpts.latest(), net, opt, None)
    assert state.iteration == 2


class _ConstantReward:
    def score_components(self, images, prompts, sources=None):
        total = images.mean(dim=(1, 2, 3))
        return RewardScores(total=total, components={"brightness": total})


def test_stop_on_hacking_stops_and_keeps_the_state():
    cfg = GRPOConfig(loop=LoopConfig(iterations=6, eval_every=1), prompts_per_iteration=2, group_size=2,
                     rollout=RolloutConfig(num_steps=2),
                     timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=1), reward_chunks=1,
                     stop_on_hacking=True, hacking_threshold=0.01)
    scores = iter([0.5, 0.9, 0.1, 0.1, 0.1, 0.1, 0.1])  # held-out: best at iteration 1, then a collapse
    model = tiny_model()
    rewards = LocalRewards(_ConstantReward())
    trainer = GRPOTrainer(model, model.net, None, cfg, PromptSet(["a red circle", "a blue square"], ["x", "y"], None),
                          rewards, weights=lambda prompts: torch.ones(len(prompts), 1),
                          monitor=lambda m, it: {"heldout": next(scores)})
    # a training reward that always rises
    trainer.state.history = []
    original = trainer.update

    def rising(out, iteration):
        metrics = original(out, iteration)
        metrics["train/reward"] = float(iteration)
        return metrics

    trainer.update = rising
    result = trainer.train(progress=False)
    rewards.close()
    assert result.state.stopped and "reward hacking" in result.state.stopped
    assert result.state.iteration == 2


def test_fidelity_collapse_is_hacking_even_when_alignment_rises():
    cfg = GRPOConfig(loop=LoopConfig(iterations=4, eval_every=1), prompts_per_iteration=2, group_size=2,
                     rollout=RolloutConfig(num_steps=2),
                     timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=1), reward_chunks=1,
                     hacking_threshold=0.02)
    readings = iter([(0.5, 0.96), (0.55, 0.95), (0.6, 0.90), (0.65, 0.85), (0.7, 0.80)])
    model = tiny_model()
    rewards = LocalRewards(_ConstantReward())
    trainer = GRPOTrainer(model, model.net, None, cfg, PromptSet(["a red circle", "a blue square"], ["x", "y"], None),
                          rewards, weights=lambda prompts: torch.ones(len(prompts), 1),
                          monitor=lambda m, it: dict(zip(("heldout", "fidelity"), next(readings))))
    original = trainer.update
    trainer.update = lambda out, iteration: {**original(out, iteration), "train/reward": float(iteration)}
    state = trainer.train(progress=False).state
    rewards.close()
    flagged = [e for e in state.monitor if "hacking" in e]
    assert flagged and all(e["hacking"].startswith("fidelity:") for e in flagged)
    assert not state.stopped  # warn only unless stop_on_hacking


def test_epochs_pass_over_the_same_rollouts_again_and_the_clip_then_binds():
    """PPO epochs: epochs x minibatches optimizer steps on one set of rollouts; the first step sees a ratio of
    exactly 1, later ones do not, so a clip range below their deviation clips. One epoch is the old update."""

    def run(epochs, clip_range=1e-6):
        cfg = GRPOConfig(loop=LoopConfig(iterations=1, eval_every=100), prompts_per_iteration=2, group_size=2,
                         rollout=RolloutConfig(num_steps=2),
                         timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=1),
                         reward_chunks=1,
                         minibatches=2, epochs=epochs, optim=OptimConfig(lr=1e-2), clip_range=clip_range)
        model = tiny_model()
        rewards = LocalRewards(_ConstantReward())
        trainer = GRPOTrainer(model, model.net, None, cfg,
                              PromptSet(["a red circle", "a blue square"], ["x", "y"], None), rewards,
                              weights=lambda prompts: torch.ones(len(prompts), 1))
        outs = trainer.collect(0)
        steps = []
        original = trainer.engine.step

        def recording_step():
            steps.append([p.detach().clone() for p in model.net.parameters()])
            return original()

        trainer.engine.step = recording_step
        metrics = trainer.update(outs, 0)
        rewards.close()
        return metrics, steps, [p.detach().clone() for p in model.net.parameters()]

    one, one_steps, one_params = run(1)
    three, three_steps, three_params = run(3)
    assert len(one_steps) == 2 and len(three_steps) == 6
    # the first epoch is the one-epoch update, step for step; the later ones keep moving the weights
    for a, b in zip(one_steps, three_steps[:2]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(one_params, three_params))
    # one epoch: the first minibatch's ratio is exactly 1, only the second can clip; three: four more steps clip
    assert one["train/clip_fraction"] <= 0.5 < three["train/clip_fraction"]
    with pytest.raises(ValueError, match="grpo.epochs"):
        from flowrl.config import FlowRLConfig, from_dict

        from_dict(FlowRLConfig, {"grpo": {"epochs": 0}})


class _FlatReward:
    def score_components(self, images, prompts, sources=None):
        total = torch.zeros(len(images))
        return RewardScores(total=total, components={"flat": total})


def test_anchor_kl_weight_reaches_the_loss_and_leaves_the_measured_kl_alone():
    """Flat rewards give zero advantages, so the loss is the KL term alone: the anchors' own weight moves it,
    while the KL reported (the plain mean over trained and anchor steps) stays the same; at kl_coef it is the
    unweighted update."""

    def run(anchor_coef):
        cfg = GRPOConfig(loop=LoopConfig(iterations=1, eval_every=100), prompts_per_iteration=2, group_size=2,
                         rollout=RolloutConfig(num_steps=4),
                         timesteps=WindowTimestepsConfig(fraction=0.5, per_trajectory=1),
                         kl_coef=0.5,
                         kl_anchor_steps=2, kl_anchor_coef=anchor_coef, reward_chunks=1)
        model = tiny_model()
        rewards = LocalRewards(_FlatReward())
        trainer = GRPOTrainer(model, model.net, tiny_model(seed=1), cfg,
                              PromptSet(["a red circle", "a blue square"], ["x", "y"], None), rewards,
                              weights=lambda prompts: torch.ones(len(prompts), 1))
        metrics = trainer.update(trainer.collect(0), 0)
        rewards.close()
        return metrics, [p.detach().clone() for p in model.net.parameters()]

    (plain, plain_w), (same, same_w), (off, _), (heavy, _) = run(None), run(0.5), run(0.0), run(5.0)
    assert plain["train/loss"] == same["train/loss"]
    assert all(torch.equal(a, b) for a, b in zip(plain_w, same_w))
    assert plain["train/kl"] == off["train/kl"] == heavy["train/kl"] > 0
    assert 0 < off["train/loss"] < plain["train/loss"] < heavy["train/loss"]
    # zero advantages: the unweighted loss is kl_coef times the mean KL
    assert plain["train/loss"] == pytest.approx(0.5 * plain["train/kl"])


def test_checkpoint_keeps_the_ema_weights(tmp_path):
    from flowrl.rl.ema import EMA

    net = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(net.parameters())
    ema = EMA(net, 0.5)
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update(net)
    ckpts = Checkpoints(ArtifactStore(str(tmp_path)), "grpo_t2i", "v")
    ckpts.save(TrainerState(iteration=1), net, opt, ema, "h")
    fresh_net = torch.nn.Linear(2, 2)
    fresh_ema = EMA(fresh_net, 0.5)
    ckpts.load(ckpts.latest(), fresh_net, torch.optim.AdamW(fresh_net.parameters()), fresh_ema)
    assert torch.equal(fresh_ema.shadow.weight, ema.shadow.weight)
    assert not torch.equal(fresh_ema.shadow.weight, net.weight)  # the average, not the live weights


def test_category_sampling_weights_shift_the_draws():
    import numpy as np
    import pytest

    from flowrl.config import category_weights
    from flowrl.rl.grpo import draw_prompts

    prompts = PromptSet([f"p{i}" for i in range(8)], ["move"] * 2 + ["remove"] * 6, None)
    uniform = np.concatenate([draw_prompts(prompts, 4, 0, it) for it in range(500)])
    weighted = np.concatenate([draw_prompts(prompts, 4, 0, it, {"move": 3.0}) for it in range(500)])
    share = lambda idx: np.isin(idx, [0, 1]).mean()  # noqa: E731
    assert share(uniform) == pytest.approx(2 / 8, abs=0.03)
    assert share(weighted) == pytest.approx(6 / 12, abs=0.03)  # 2 x 3 against 6 x 1
    assert np.array_equal(draw_prompts(prompts, 4, 0, 7, {"move": 3.0}), draw_prompts(prompts, 4, 0, 7, {"move": 3.0}))
    assert category_weights(("move=3", "recolor=1.5"), "k") == {"move": 3.0, "recolor": 1.5}
    for bad in ("move", "move=0", "move=x", "=2"):
        with pytest.raises(ValueError, match=r"k\[0\]"):
            category_weights((bad,), "k")


def test_balanced_draws_give_every_category_the_same_share():
    import numpy as np
    import pytest

    from flowrl.rl.grpo import draw_prompts

    # one prompt of counting against nine of color_attr: balanced, each category gets half the draws
    prompts = PromptSet([f"p{i}" for i in range(10)], ["counting"] + ["color_attr"] * 9, None)
    uniform = np.concatenate([draw_prompts(prompts, 8, 0, it) for it in range(400)])
    balanced = np.concatenate([draw_prompts(prompts, 8, 0, it, balance=True) for it in range(400)])
    assert (uniform == 0).mean() == pytest.approx(0.1, abs=0.02)
    assert (balanced == 0).mean() == pytest.approx(0.5, abs=0.03)
    # within a category the prompts stay uniform
    counts = np.bincount(balanced, minlength=10)[1:]
    assert counts.min() > 0.7 * counts.mean()
    # sampling weights scale a category's share on top of the balance: 3 x 1/1 against 1 x 9/9
    weighted = np.concatenate([draw_prompts(prompts, 8, 0, it, {"counting": 3.0}, balance=True) for it in range(400)])
    assert (weighted == 0).mean() == pytest.approx(0.75, abs=0.03)
    assert np.array_equal(draw_prompts(prompts, 8, 0, 3, balance=True), draw_prompts(prompts, 8, 0, 3, balance=True))


class _Scripted(LoopTrainer):
    """A loop whose iterations return scripted metrics (or raise)."""

    fatal_errors = (ConnectionError,)

    def __init__(self, script, checkpoints):
        module = torch.nn.Linear(2, 2)
        super().__init__(None, module, torch.optim.SGD(module.parameters(), lr=0.1), None,
                         LoopSettings(iterations=len(script), eval_every=100, checkpoint_every=2, name="scripted"),
                         checkpoints=checkpoints)
        self.script = script

    def step(self, iteration):
        what = self.script[iteration]
        if isinstance(what, Exception):
            raise what
        with torch.no_grad():
            self.module.weight.add_(what)  # the "update" happens before the metrics are checked
        return {"train/loss": what}


@pytest.mark.fault("NaN or inf in the rewards or the loss", "failed clearly naming the iteration; the last checkpoint intact")
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path):
    checkpoints = Checkpoints(ArtifactStore(str(tmp_path)), "scripted", "run")
    trainer = _Scripted([0.5, 0.25, 0.125, float("inf"), 1.0], checkpoints)
    with pytest.raises(TrainingStopped, match=r"scripted: stopped at iteration 4 of 5: non-finite train/loss=inf"):
        trainer.train(progress=False)
    latest = checkpoints.latest()
    assert latest.endswith("run-0000002")
    fresh = _Scripted([0.0] * 5, checkpoints)
    assert fresh.resume() and fresh.state.iteration == 2  # the good checkpoint loads: weights from before the inf
    assert torch.isfinite(fresh.module.weight).all()


def test_a_fatal_step_error_becomes_a_clear_stop_and_other_errors_propagate(tmp_path):
    trainer = _Scripted([0.5, ConnectionError("reward server gone")], None)
    with pytest.raises(TrainingStopped, match="iteration 2 of 2: reward server gone.*no checkpoint was written"):
        trainer.train(progress=False)
    with pytest.raises(ZeroDivisionError):
        _Scripted([ZeroDivisionError("bug")], None).train(progress=False)


def test_trainable_patterns_train_only_the_matching_parameters_and_resume_exactly(tmp_path, caplog):
    """grpo.trainable: the matching parameters move, the rest keep the base's values bit for bit and get no AdamW
    state, and the log says how many are trained; a run killed after one iteration and resumed from its checkpoint
    ends on the uninterrupted weights."""
    pattern = "blocks.*.qkv.*"

    def trainer_for(root, trainable=(pattern,)):
        cfg = GRPOConfig(loop=LoopConfig(iterations=2, eval_every=100, checkpoint_every=1), prompts_per_iteration=2,
                         group_size=2, rollout=RolloutConfig(num_steps=2),
                         timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=1),
                         reward_chunks=1, optim=OptimConfig(lr=1e-2), trainable=trainable)
        model = tiny_model()
        rewards = LocalRewards(_ConstantReward())
        trainer = GRPOTrainer(model, model.net, None, cfg,
                              PromptSet(["a red circle", "a blue square"], ["x", "y"], None), rewards,
                              weights=lambda prompts: torch.ones(len(prompts), 1),
                              checkpoints=Checkpoints(ArtifactStore(str(root)), "grpo_t2i", "v"))
        return trainer, rewards, model

    before = dict(tiny_model().net.named_parameters())
    with caplog.at_level(logging.INFO, logger="flowrl.rl.engine"):
        trainer, rewards, model = trainer_for(tmp_path / "whole")
    matching = sum(p.numel() for n, p in before.items() if fnmatch.fnmatchcase(n, pattern))
    total = sum(p.numel() for p in before.values())
    assert f"grpo.trainable: training {matching} of {total} parameters" in caplog.text
    trainer.train(progress=False)
    rewards.close()
    after = dict(model.net.named_parameters())
    trained = {n for n in after if not torch.equal(after[n], before[n])}
    assert trained and all(fnmatch.fnmatchcase(n, pattern) for n in trained)
    assert {n for n in after if fnmatch.fnmatchcase(n, pattern)} == trained
    stepped = {id(p) for p in trainer.engine.optimizer.state}
    assert stepped == {id(after[n]) for n in trained}

    killed, rewards, _ = trainer_for(tmp_path / "resumed")
    killed.train(progress=False, stop_after=1)
    rewards.close()
    resumed, rewards, resumed_model = trainer_for(tmp_path / "resumed")
    assert resumed.resume() and resumed.state.iteration == 1
    resumed.train(progress=False)
    rewards.close()
    assert all(torch.equal(a, b) for a, b in zip(model.net.parameters(), resumed_model.net.parameters()))

    with pytest.raises(ValueError, match=r"grpo.trainable: 'blocks.\*.qkvv' matches no parameter of ShapesDiT"):
        trainer_for(tmp_path / "typo", ("blocks.*.qkv.*", "blocks.*.qkvv"))


class _Slow(LoopTrainer):
    """Iterations that take a known time on a fake clock (``clock``, advanced 0.06 s by each step and
    read by the loop in place of time.perf_counter), with a monitor counting its calls."""

    clock = [0.0]

    def __init__(self, iterations, budget, checkpoints=None, eval_every=2):
        module = torch.nn.Linear(2, 2)
        self.evaluated = []
        super().__init__(None, module, torch.optim.SGD(module.parameters(), lr=0.1), None,
                         LoopSettings(iterations=iterations, eval_every=eval_every, checkpoint_every=100,
                                      name="slow", time_budget_s=budget),
                         monitor=lambda model, it: self.evaluated.append(it) or {"heldout": 0.5},
                         checkpoints=checkpoints)

    def step(self, iteration):
        self.clock[0] += 0.06
        return {"train/reward": 1.0}


def test_a_time_budget_stops_after_the_iteration_that_reaches_it_and_scores_that_point(tmp_path, monkeypatch):
    import flowrl.rl.trainer as trainer_module

    monkeypatch.setattr(trainer_module.time, "perf_counter", lambda: _Slow.clock[0])
    checkpoints = Checkpoints(ArtifactStore(str(tmp_path)), "slow", "run")
    trainer = _Slow(iterations=50, budget=0.15, checkpoints=checkpoints)
    trainer.train(progress=False)
    # 0.06 s per iteration: the third reaches 0.15 s; monitor at 0, 2 (eval_every) and 3 (where it stopped)
    assert trainer.state.iteration == 3
    assert trainer.state.stopped.startswith("time budget:") and "time_budget_s = 0.15" in trainer.state.stopped
    assert trainer.evaluated == [0, 2, 3]
    assert [m["iteration"] for m in trainer.state.monitor] == [0, 2, 3]
    assert trainer.train_seconds() == pytest.approx(0.18)
    assert checkpoints.latest().endswith("run-0000003")  # what was trained is kept
    # resumed from that checkpoint (the stage died before committing), the run is already done
    again = _Slow(iterations=50, budget=0.15, checkpoints=checkpoints)
    assert again.resume() and again.state.iteration == 3
    again.train(progress=False)
    assert again.state.iteration == 3 and again.evaluated == []
    # no budget, or one the iterations never reach: every iteration runs and nothing is marked stopped
    for budget in (None, 100.0):
        whole = _Slow(iterations=3, budget=budget)
        whole.train(progress=False)
        assert whole.state.iteration == 3 and whole.state.stopped is None


def test_time_budget_must_be_positive():
    from flowrl.config import ConfigError, FlowRLConfig, from_dict

    with pytest.raises(ConfigError, match=r"grpo\.loop\.time_budget_s"):
        from_dict(FlowRLConfig, {"grpo": {"loop": {"time_budget_s": 0}}})
    assert from_dict(FlowRLConfig, {"opd": {"loop": {"time_budget_s": 30}}}).opd.loop.time_budget_s == 30
    # a budget is part of the stage's version (a cut-short run is never reused for a whole one); none leaves
    # the version of a config that never named the key as it was
    default = from_dict(FlowRLConfig, {})
    budgeted = from_dict(FlowRLConfig, {"grpo": {"loop": {"time_budget_s": 30}}})
    unset = from_dict(FlowRLConfig, {"grpo": {"loop": {"time_budget_s": None}}})
    assert budgeted.section_hash("grpo") != default.section_hash("grpo") == unset.section_hash("grpo")
