"""DiffusionNFT (flowrl/rl/nft.py): its loss on hand-derived values, the fixed point, the soft update of the
sampling policy, resume, two processes against one, and the GRPO stages running it end to end."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from flowrl.config import (
    ConfigError,
    GRPOConfig,
    LoopConfig,
    NFTConfig,
    OptimConfig,
    RolloutConfig,
    _hash_payload,
    load_config,
)
from flowrl.rewards.base import RewardScores
from flowrl.rl.algorithms import algorithm
from flowrl.rl.grpo import LocalRewards, PromptSet
from flowrl.rl.nft import NFTTrainer, draw_noise_levels, nft_loss, optimality, soft_update_weight
from flowrl.rl.trainer import Checkpoints
from flowrl.storage import ArtifactStore
from tests.rl.conftest import tiny_model

PROMPTS = ["a red circle", "a blue square", "a green triangle", "two red squares"]


# ---------------------------------------------------------------------- the loss, by hand
def test_loss_on_hand_derived_values():
    """Two rows of two latent elements, target v* = 0, beta = 0.5.

    Row 0: v_old = (1, 0), v = (2, 1): d = (1, 1), v+ = (1.5, 0.5), v- = (0.5, -0.5);
    |v+|^2 = (2.25 + 0.25) / 2 = 1.25, |v-|^2 = (0.25 + 0.25) / 2 = 0.25; r = 1: term 1.25.
    Row 1: v_old = (0, 2), v = (0, 0): d = (0, -2), v+ = (0, 1), v- = (0, 3);
    |v+|^2 = 0.5, |v-|^2 = 4.5; r = 0.25: 0.25 * 0.5 + 0.75 * 4.5 = 3.5.
    Loss: (1.25 + 3.5) / 2 = 2.375."""
    v = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    v_old = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    target = torch.zeros(2, 2)
    r = torch.tensor([1.0, 0.25])
    assert float(nft_loss(v, v_old, target, r, beta=0.5)) == pytest.approx(2.375, abs=1e-7)
    # a non-zero target: row 0 with v* = (1, 1): e+ = (0.5, -0.5), e- = (-0.5, -1.5): |e+|^2 = 0.25, r = 1
    assert float(nft_loss(v[:1], v_old[:1], torch.ones(1, 2), r[:1], beta=0.5)) == pytest.approx(0.25, abs=1e-7)


def test_adaptive_weighting_on_hand_derived_values():
    """The same two rows at t = (0.5, 1.0): each error is scaled by t (the x0-prediction error) and its
    squared mean divided by its mean absolute value.

    Row 0, t = 0.5: t e+ = (0.75, 0.25): (0.5625 + 0.0625) / 2 / ((0.75 + 0.25) / 2) = 0.3125 / 0.5 = 0.625;
    r = 1: term 0.625.
    Row 1, t = 1: e+ = (0, 1): 0.5 / 0.5 = 1; e- = (0, 3): 4.5 / 1.5 = 3; r = 0.25: 0.25 + 2.25 = 2.5.
    Loss: (0.625 + 2.5) / 2 = 1.5625."""
    v = torch.tensor([[2.0, 1.0], [0.0, 0.0]])
    v_old = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    loss = nft_loss(v, v_old, torch.zeros(2, 2), torch.tensor([1.0, 0.25]), beta=0.5, t=torch.tensor([0.5, 1.0]),
                    adaptive=True)
    assert float(loss) == pytest.approx(1.5625, abs=1e-7)
    with pytest.raises(ValueError, match="needs t"):
        nft_loss(v, v_old, torch.zeros(2, 2), torch.ones(2), beta=0.5, adaptive=True)


@pytest.mark.parametrize("beta", [1.0, 0.3, 2.5])
@pytest.mark.parametrize("adaptive", [False, True])
def test_ties_at_the_sampling_policy_are_a_fixed_point(beta, adaptive):
    """theta = theta_old (v = v_old) and every r = 1/2: the gradient is exactly zero, whatever the data."""
    g = torch.Generator().manual_seed(0)
    v_old = torch.randn(6, 3, 4, 4, generator=g)
    v = v_old.clone().requires_grad_(True)
    target = torch.randn(6, 3, 4, 4, generator=g)
    loss = nft_loss(v, v_old, target, torch.full((6,), 0.5), beta, t=torch.rand(6, generator=g), adaptive=adaptive)
    loss.backward()
    assert torch.count_nonzero(v.grad) == 0
    # a row that is not a tie moves it
    r = torch.full((6,), 0.5)
    r[2] = 0.9
    v.grad = None
    nft_loss(v, v_old, target, r, beta, t=torch.rand(6, generator=g), adaptive=adaptive).backward()
    assert torch.count_nonzero(v.grad[2]) > 0 and torch.count_nonzero(v.grad[[0, 1, 3, 4, 5]]) == 0


@pytest.mark.parametrize("beta", [1.0, 0.25])
def test_certain_samples_pull_the_velocity_to_their_target(beta):
    """Every r = 1: the gradient is 2 beta (v+ - v*) / (rows x elements), at v = v_old 2 beta (v - v*) / (R D):
    a step against it moves v toward v* (the flow-matching gradient on the samples, scaled by beta)."""
    g = torch.Generator().manual_seed(1)
    v_old = torch.randn(4, 8, generator=g)
    target = torch.randn(4, 8, generator=g)
    for v0 in (v_old.clone(), v_old + torch.randn(4, 8, generator=g)):
        v = v0.clone().requires_grad_(True)
        nft_loss(v, v_old, target, torch.ones(4), beta).backward()
        v_pos = v_old + beta * (v0 - v_old)
        torch.testing.assert_close(v.grad, 2 * beta * (v_pos - target) / 32, rtol=1e-6, atol=1e-7)
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, target, torch.ones(4), beta).backward()
    moved = v_old - 0.1 * v.grad
    assert ((moved - target) ** 2).sum() < ((v_old - target) ** 2).sum()
    # every r = 0 pushes the other way: the negative policy v- = v_old - beta d is pulled to v*, so v leaves it
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, target, torch.zeros(4), beta).backward()
    torch.testing.assert_close(v.grad, -2 * beta * (v_old - target) / 32, rtol=1e-6, atol=1e-7)


def test_optimality_soft_update_and_noise_levels():
    assert optimality(torch.tensor([-10.0, -2.5, 0.0, 2.5, 10.0]), 5.0).tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert [soft_update_weight(i, 0.001, 0.5) for i in (0, 1, 400, 600)] == [0.0, 0.001, 0.4, 0.5]
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    u = torch.tensor([0.0, 0.3, 0.6, 0.99])
    assert draw_noise_levels(u, "schedule", 0.0, 1.0, sigmas).tolist() == [1.0, 0.75, 0.5, 0.25]
    assert draw_noise_levels(u, "schedule", 0.3, 0.8, sigmas).tolist() == [0.75, 0.75, 0.5, 0.5]
    torch.testing.assert_close(draw_noise_levels(u, "uniform", 0.2, 0.6), 0.2 + 0.4 * u)
    with pytest.raises(ValueError, match="grpo.nft.t_min 0.3 / grpo.nft.t_max 0.4: none of the rollout schedule"):
        draw_noise_levels(u, "schedule", 0.3, 0.4, sigmas)


# ---------------------------------------------------------------------- the trainer
class _Brightness:
    def score_components(self, images, prompts, sources=None):
        total = images.mean(dim=(1, 2, 3))
        return RewardScores(total=total, components={"brightness": total})


class _Constant:
    def score_components(self, images, prompts, sources=None):
        total = torch.ones(len(images))
        return RewardScores(total=total, components={"flat": total})


def _config(**nft) -> GRPOConfig:
    return GRPOConfig(algorithm="nft", loop=LoopConfig(iterations=3, eval_every=100, checkpoint_every=1),
                      prompts_per_iteration=2, group_size=2, rollout=RolloutConfig(num_steps=3), reward_chunks=1,
                      optim=OptimConfig(lr=1e-2), nft=NFTConfig(**nft))


def _trainer(cfg, reward=None, root=None, sources=None):
    model = tiny_model()
    rewards = LocalRewards(reward or _Brightness())
    checkpoints = Checkpoints(ArtifactStore(str(root)), "grpo_t2i", "v") if root is not None else None
    trainer = NFTTrainer(model, model.net, None, cfg, PromptSet(PROMPTS, ["x", "y", "x", "y"], sources), rewards,
                         weights=lambda prompts: torch.ones(len(prompts), 1), checkpoints=checkpoints)
    return trainer, rewards, model


def test_nft_is_a_registered_reward_algorithm_of_one_task():
    found = algorithm("nft", "reward")
    assert found.trainer is NFTTrainer and not found.multitask
    with pytest.raises(ConfigError, match="needs a multitask algorithm"):
        algorithm("nft", "reward", multitask=True)


def test_ties_leave_the_weights_where_they_were():
    """A constant reward: every r = 1/2 and theta = theta_old on the first iteration, so the update is zero."""
    trainer, rewards, model = _trainer(_config(), _Constant())
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    metrics = trainer.step(0)
    rewards.close()
    assert metrics["train/grad_norm"] == 0.0 and metrics["train/drift"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in model.net.state_dict().items())


def test_the_sampling_policy_follows_softly():
    """eta_i = min(rate i, cap): theta_old takes theta after iteration 0, then lags it by eta."""
    trainer, rewards, model = _trainer(_config(decay_rate=0.3, decay_max=0.5))
    trainer.step(0)
    assert all(torch.equal(a, b) for a, b in zip(trainer.old.shadow.parameters(), model.net.parameters()))
    old = [p.clone() for p in trainer.old.shadow.parameters()]
    metrics = trainer.step(1)
    rewards.close()
    assert metrics["train/grad_norm"] > 0 and metrics["train/drift"] == 0.0  # one minibatch: v = v_old at its start
    for held, prev, now in zip(trainer.old.shadow.parameters(), old, model.net.parameters()):
        torch.testing.assert_close(held, 0.3 * prev + 0.7 * now, rtol=0, atol=1e-6)
    assert any(not torch.equal(a, b) for a, b in zip(trainer.old.shadow.parameters(), model.net.parameters()))


def test_rollouts_come_from_the_sampling_policy():
    """collect inside step runs with theta_old's weights in the module: a trainer whose theta has moved but whose
    theta_old is the start samples what the start samples."""
    trainer, rewards, model = _trainer(_config())
    with trainer.old.swapped(model.net):
        start = trainer.collect(0).latents
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05)
    with trainer.old.swapped(model.net):
        again = trainer.collect(0).latents
    moved = trainer.collect(0).latents
    rewards.close()
    assert torch.equal(start, again) and not torch.allclose(start, moved)


@pytest.mark.parametrize("edit", [False, True])
def test_a_resumed_run_equals_the_uninterrupted_one(tmp_path, edit):
    """Killed after two iterations and resumed from its checkpoint (weights, AdamW, theta_old), a run ends on the
    uninterrupted one's weights and theta_old bit for bit; T2I and edit (source images in the condition)."""
    sources = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(3)) if edit else None
    cfg = _config(decay_rate=0.25, noise_level=0.5 if edit else 0.0, timestep_mode="uniform" if edit else "schedule")
    whole, rewards, model = _trainer(cfg, root=tmp_path / "whole", sources=sources)
    whole.train(progress=False)
    rewards.close()
    killed, rewards, _ = _trainer(cfg, root=tmp_path / "resumed", sources=sources)
    killed.train(progress=False, stop_after=2)
    rewards.close()
    resumed, rewards, resumed_model = _trainer(cfg, root=tmp_path / "resumed", sources=sources)
    assert resumed.resume() and resumed.state.iteration == 2
    resumed.train(progress=False)
    rewards.close()
    assert all(torch.equal(a, b) for a, b in zip(model.net.parameters(), resumed_model.net.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(whole.old.shadow.parameters(), resumed.old.shadow.parameters()))
    assert [h["train/loss"] for h in whole.state.history] == [h["train/loss"] for h in resumed.state.history]
    assert not all(torch.equal(a, b) for a, b in zip(whole.old.shadow.parameters(), model.net.parameters()))


def test_the_trainer_refuses_zero_and_several_tasks():
    model = tiny_model()
    with pytest.raises(ValueError, match="zero_stage = 2 with grpo.algorithm nft"):
        NFTTrainer(model, model.net, None, dataclasses.replace(_config(), optim=OptimConfig(zero_stage=2)),
                   PromptSet(PROMPTS, ["x"] * 4, None), None, weights=None)
    with pytest.raises(ValueError, match="one task at a time"):
        NFTTrainer(model, model.net, None, _config(), {"t2i": PromptSet(PROMPTS, ["x"] * 4, None)}, {}, {})
    with pytest.raises(ValueError, match="none of the rollout schedule's sigmas"):
        NFTTrainer(model, model.net, None, _config(t_min=0.4, t_max=0.6), PromptSet(PROMPTS, ["x"] * 4, None),
                   None, weights=None)


# ---------------------------------------------------------------------- config
@pytest.mark.bad_input
@pytest.mark.parametrize("text, message", [
    ("grpo:\n  nft: {betta: 1.0}\n", r"grpo\.nft\.betta: unknown key"),
    ("grpo:\n  nft: {beta: 0}\n", r"grpo\.nft\.beta"),
    ("grpo:\n  nft: {timestep_mode: logit}\n", r"grpo\.nft\.timestep_mode: expected one of"),
    ("grpo:\n  nft: {decay_max: 1.0}\n", r"grpo\.nft\.decay_max"),
    ("grpo:\n  nft: {noise_level: -0.1}\n", r"grpo\.nft\.noise_level"),
    ("grpo:\n  nft: {t_min: 0.6, t_max: 0.5}\n", r"grpo\.nft\.t_min: 0\.6 must be below grpo\.nft\.t_max 0\.5"),
    ("grpo:\n  nft: 3\n", r"grpo\.nft: expected a mapping"),
    ("grpo:\n  algorithm: nft\n  optim: {zero_stage: 2}\n", r"grpo\.optim\.zero_stage: 2 with grpo\.algorithm nft"),
])
def test_bad_nft_keys_name_the_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_the_nft_section_leaves_the_grpo_hash_alone_at_its_defaults():
    assert "nft" not in _hash_payload(GRPOConfig())
    changed = dataclasses.replace(GRPOConfig(), nft=NFTConfig(beta=0.5))
    assert _hash_payload(changed)["nft"] == {"beta": 0.5}


# ---------------------------------------------------------------------- two processes
SCRIPT = os.path.join(os.path.dirname(__file__), "nft_ddp.py")


def _run_worker(out, processes):
    from flowrl.rewards.server import free_port
    from tests.conftest import ROOT

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if processes == 1:
        proc = subprocess.run([sys.executable, SCRIPT, str(out)], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=300)
    for _ in range(2 if processes > 1 else 0):  # the port was free when picked; another process may take it
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), SCRIPT, str(out)],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(out)


def test_two_processes_take_the_single_process_update(tmp_path):
    """Two gloo processes under torchrun, each with its half of the prompt groups (and of the noisings, drawn per
    global row), take the one-process update on the same batch, with a kl term to a reference."""
    one = _run_worker(tmp_path / "one.safetensors", 1)
    two = _run_worker(tmp_path / "two.safetensors", 2)
    start = tiny_model().net.state_dict()
    assert any(not torch.allclose(one[k], start[k]) for k in start)
    for key in one:
        atol = 1e-6 if key.startswith("grad.") else 1e-5
        torch.testing.assert_close(one[key], two[key], atol=atol, rtol=1e-5)


# ---------------------------------------------------------------------- the stage
@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_the_grpo_stage_trains_with_nft(upstream, tmp_path, task):
    from flowrl.stages.grpo import run_grpo
    from flowrl.storage import fetch

    _, config, base, rm, prompts = upstream
    g = config.grpo
    chosen = dataclasses.replace(config, grpo=dataclasses.replace(
        g, algorithm="nft", loop=dataclasses.replace(g.loop, iterations=2), kl_coef=0.01,
        ptx_coef=0.0))  # nft takes no pretraining mix (the config check refuses it)
    result = run_grpo(chosen, task, base.uri, rm.uri, prompts[task].uri, output_root=str(tmp_path), progress=False)
    out = fetch(result.uri)
    history = json.loads((out / "history.json").read_text())["history"]
    assert len(history) == 2
    for entry in history:
        assert {"train/reward", "train/loss", "train/grad_norm", "train/kl", "train/drift"} <= entry.keys()
        assert any(k.startswith("train/reward_") for k in entry)
    assert history[1]["train/kl"] > 0  # the policy left the reference after the first update
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 2 and metrics["teacher"]
