"""grpo.rollout.compile: rollouts sampled through torch.compile's graph of the policy network match the
eager sampler to float rounding, the graph is compiled once per network, and it follows the network's
weights as they are updated (it reads the same parameters)."""

import dataclasses

import torch

from flowrl.config import RolloutConfig
from flowrl.rl import rollout as rollout_module
from flowrl.rl.rollout import RolloutSettings, rollout, rollout_settings, step_log_probs
from tests.rl.conftest import tiny_model


def test_the_compile_key_reaches_the_sampler_settings():
    assert rollout_settings(RolloutConfig(compile=True)).compile
    assert not rollout_settings(RolloutConfig()).compile


def test_compiled_rollouts_match_eager_ones_and_follow_weight_updates():
    model = tiny_model()
    eager = RolloutSettings(num_steps=3, noise_level=0.7, guidance_scale=3.0, cfg_mode="hybrid")
    compiled = dataclasses.replace(eager, compile=True)
    prompts = ["a red circle", "two blue squares"]

    def both():
        a = rollout(model, prompts, 2, eager, torch.Generator().manual_seed(0))
        b = rollout(model, prompts, 2, compiled, torch.Generator().manual_seed(0))
        return a, b

    a, b = both()
    torch.testing.assert_close(b.states, a.states, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b.old_log_probs, a.old_log_probs, atol=1e-4, rtol=1e-4)
    # the training path (eager) against the compiled rollout's stored log-probs: a ratio of 1 to rounding
    rows, steps = torch.arange(4), torch.arange(3).expand(4, 3)
    with torch.no_grad():
        new = step_log_probs(model, b, rows, steps, eager).log_probs
    assert (torch.exp(new - b.old_log_probs) - 1).abs().max() < 1e-4
    graph = model.net.__dict__[rollout_module._COMPILED_ATTR]
    with torch.no_grad():  # an "update": the compiled graph must see it
        model.net.conv_out.bias.add_(0.5)
    a2, b2 = both()
    assert model.net.__dict__[rollout_module._COMPILED_ATTR] is graph  # compiled once, reused
    assert not any("_flowrl_compiled" in k or "_orig_mod" in k for k in model.net.state_dict())  # not a submodule
    assert not torch.allclose(a2.states, a.states, atol=1e-3)  # the update changed the rollouts
    torch.testing.assert_close(b2.states, a2.states, atol=1e-4, rtol=1e-4)
