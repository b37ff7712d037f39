"""SDE dynamics (flow, dance, cps), the SDE window (fixed or sliding) with ODE steps around it, and the
second-order ODE solver: reference values of each transition, the window's placement, AB2's order, and
the invariants every variant keeps (the rollout/training ratio is 1 before an update, no NaN at the
deterministic steps, the defaults sample bit for bit what they sampled before, a resumed run equals an
uninterrupted one)."""

import math

import pytest
import torch

from flowrl.config import (
    ConfigError,
    FlowRLConfig,
    GRPOConfig,
    LoopConfig,
    OptimConfig,
    RolloutConfig,
    WindowTimestepsConfig,
    check_consistency,
    from_dict,
)
from flowrl.models.base import Condition
from flowrl.rewards.base import RewardScores
from flowrl.rl.grpo import GRPOTrainer, LocalRewards, PromptSet
from flowrl.rl.rollout import (
    RolloutSettings,
    rollout,
    rollout_settings,
    sde_window,
    select_anchor_steps,
    select_timesteps,
    step_log_probs,
)
from flowrl.rl.trainer import Checkpoints
from flowrl.sampling import (
    ab2_step,
    cfg_velocity,
    cps_step,
    dance_step,
    euler_step,
    sample,
    sde_step_mean,
    shift_sigmas,
    step_log_prob,
    stochastic_steps,
    transition,
)
from flowrl.storage import ArtifactStore
from tests.rl.conftest import tiny_model

# one step of a 1-element latent: x = 0.5, v = -1, t = 0.6 -> t' = 0.4 (dt = -0.2)
X, V, T, T_NEXT = 0.5, -1.0, 0.6, 0.4


def _one(value: float) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.float64)


def _step(fn, *args):
    return fn(_one(X)[:, None], _one(V)[:, None], _one(T), _one(T_NEXT), *args)


# ---------------------------------------------------------------------------------------- reference values
def test_flow_step_on_hand_computed_values():
    # sigma = 0.7 sqrt(0.6 / 0.4) -> sigma^2 = 0.49 * 1.5 = 0.735
    # mean = 0.5 (1 + 0.735 / 1.2 * -0.2) + (-1)(1 + 0.735 * 0.4 / 1.2)(-0.2) = 0.5 * 0.8775 + 0.2 * 1.245
    step = _step(sde_step_mean, 0.7, 0.9)
    assert step.mean.item() == pytest.approx(0.43875 + 0.249, abs=1e-12)
    assert step.std.item() == pytest.approx(math.sqrt(0.735 * 0.2), abs=1e-12)


def test_dance_step_on_hand_computed_values():
    # sigma = 0.7 at every t: mean = 0.5 (1 + 0.49 / 1.2 * -0.2) + 0.2 (1 + 0.49 * 0.4 / 1.2)
    step = _step(dance_step, 0.7)
    assert step.mean.item() == pytest.approx(0.5 * (1 - 0.49 / 6) + 0.2 * (1 + 0.49 / 3), abs=1e-12)
    assert step.std.item() == pytest.approx(0.7 * math.sqrt(0.2), abs=1e-12)
    # and at t = 1 it needs no guard: 1 - t never divides
    at_one = dance_step(_one(X)[:, None], _one(V)[:, None], _one(1.0), _one(0.8), 0.7)
    assert at_one.mean.item() == pytest.approx(0.5 * (1 - 0.49 / 2 * 0.2) + 0.2, abs=1e-12)


def test_cps_step_on_hand_computed_values():
    # x0 = x - t v = 1.1, eps = x + (1 - t) v = 0.1; a = 0.5: sin = cos = 1/sqrt(2)
    step = _step(cps_step, 0.5)
    r = 1 / math.sqrt(2)
    assert step.std.item() == pytest.approx(0.4 * r, abs=1e-12)
    assert step.mean.item() == pytest.approx(0.6 * 1.1 + 0.4 * r * 0.1, abs=1e-12)
    # a = 1: all of the predicted noise is replaced by fresh noise of std t'
    full = _step(cps_step, 1.0)
    assert full.mean.item() == pytest.approx(0.66, abs=1e-12) and full.std.item() == pytest.approx(0.4, abs=1e-12)
    # into t' = 0: the clean estimate, with std 0 (the Euler step)
    last = cps_step(_one(X)[:, None], _one(V)[:, None], _one(T), _one(0.0), 0.5)
    assert last.mean.item() == pytest.approx(1.1, abs=1e-12) and last.std.item() == 0.0
    assert last.mean.item() == pytest.approx(euler_step(_one(X)[:, None], _one(V)[:, None], _one(T), _one(0.0)).item())
    for bad in (0.0, 1.2):
        with pytest.raises(ValueError, match="cps needs a noise level in"):
            _step(cps_step, bad)


def test_cps_preserves_the_noise_coefficient_of_the_marginal():
    """On data x_t = (1 - t) x0 + t eps whose velocity is exact, the CPS step lands on a sample of the
    marginal at t': its x0 coefficient is 1 - t' and its total noise std is t' (sampled over many eps, z)."""
    g = torch.Generator().manual_seed(0)
    x0, eps, z = (torch.randn(200_000, 1, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.full((200_000,), 0.7, dtype=torch.float64)
    t_next = torch.full_like(t, 0.3)
    x = (1 - 0.7) * x0 + 0.7 * eps
    step = cps_step(x, eps - x0, t, t_next, 0.8)
    x_next = step.mean + step.std[:, None] * z
    noise = x_next - (1 - 0.3) * x0
    assert noise.mean().item() == pytest.approx(0.0, abs=5e-3)
    assert noise.std().item() == pytest.approx(0.3, rel=5e-3)


def test_transition_dispatches_by_name():
    x, v, t, tn = _one(X)[:, None], _one(V)[:, None], _one(T), _one(T_NEXT)
    flow = sde_step_mean(x, v, t, tn, 0.7, 0.9).mean
    torch.testing.assert_close(transition("flow", x, v, t, tn, 0.7, 0.9).mean, flow)
    torch.testing.assert_close(transition("dance", x, v, t, tn, 0.7, 0.9).mean, dance_step(x, v, t, tn, 0.7).mean)
    torch.testing.assert_close(transition("cps", x, v, t, tn, 0.7, 0.9).mean, cps_step(x, v, t, tn, 0.7).mean)
    with pytest.raises(ValueError, match="unknown SDE dynamics 'ddim'"):
        transition("ddim", x, v, t, tn, 0.7, 0.9)


def test_a_zero_noise_row_has_log_prob_zero_and_a_finite_gradient():
    mean = torch.tensor([[0.2, 0.1], [0.3, -0.4]], requires_grad=True)
    sample_ = torch.tensor([[0.25, 0.0], [0.3, -0.4]])
    lp = step_log_prob(sample_, mean, torch.tensor([0.5, 0.0]))
    assert lp[1].item() == 0.0 and torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(mean.grad).all() and (mean.grad[1] == 0).all()


# ---------------------------------------------------------------------------------------- the window
def test_sde_window_fixed_and_sliding():
    assert sde_window(10, None, 0, None, 7) == (0, 10)
    assert sde_window(10, 3, 2, None, 0) == sde_window(10, 3, 2, None, 99) == (2, 5)
    # sliding: one step later every 2 iterations, from the start, until the last position 10 - 3 = 7
    assert [sde_window(10, 3, 0, 2, i)[0] for i in range(0, 20, 2)] == [0, 1, 2, 3, 4, 5, 6, 7, 7, 7]
    assert sde_window(10, 3, 0, 2, 3) == (1, 4)
    assert sde_window(10, 3, 5, 1, 1) == (6, 9) and sde_window(10, 3, 5, 1, 50) == (7, 10)
    for args in ((10, 0, 0, None, 0), (10, 11, 0, None, 0), (10, 3, 8, None, 0), (10, 3, 0, 0, 1),
                 (10, 3, 0, 1, -1)):
        with pytest.raises(ValueError):
            sde_window(*args)


def test_stochastic_steps_leave_out_the_window_s_outside_and_cps_s_last_step():
    assert stochastic_steps(5, "flow", 0.7).tolist() == [True] * 5
    assert stochastic_steps(5, "cps", 0.7).tolist() == [True] * 4 + [False]
    assert stochastic_steps(5, "dance", 0.7, (1, 3)).tolist() == [False, True, True, False, False]
    assert stochastic_steps(5, "cps", 0.7, (3, 5)).tolist() == [False, False, False, True, False]
    assert not stochastic_steps(5, "flow", 0.0).any()


def test_trained_steps_come_from_the_sde_window_and_anchors_from_the_rest():
    g = torch.Generator().manual_seed(0)
    steps = select_timesteps(256, 10, "subset", 0.5, 2, g, window=(4, 7))
    assert set(steps.flatten().tolist()) == {4, 5, 6} and (steps[:, 0] != steps[:, 1]).all()
    steps = select_timesteps(256, 10, "subset", 0.5, 2, g, window=(7, 10), excluded=(9,))
    assert set(steps.flatten().tolist()) == {7, 8}
    assert select_timesteps(2, 10, "all", 0.5, 2, g, window=(7, 10), excluded=(9,)).tolist() == [[7, 8]] * 2
    assert select_timesteps(2, 4, "all", 0.5, 2, g, excluded=(3,)).tolist() == [[0, 1, 2]] * 2
    with pytest.raises(ValueError, match=r"per_trajectory = 3 is more than the 2 stochastic steps of the SDE window"):
        select_timesteps(2, 10, "subset", 0.5, 3, g, window=(7, 10), excluded=(9,))
    anchors = select_anchor_steps(256, 10, 0.5, 3, g, window=(4, 7), excluded=(9,))
    assert set(anchors.flatten().tolist()) == {0, 1, 2, 3, 7, 8}
    # no window, no exclusion: the draws of the timestep window are the ones made before the window existed
    a = select_timesteps(64, 10, "subset", 0.5, 2, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, torch.rand(64, 5, generator=torch.Generator().manual_seed(3)).argsort(1)[:, :2])


# ---------------------------------------------------------------------------------------- ODE solver
class _LinearODE:
    """A 1-element flow model with v(x, t) = lam x + beta t: dx/dt = lam x + beta t has the solution
    x(t) = C e^(lam t) - beta t / lam - beta / lam^2."""

    lam, beta = 2.0, -3.0

    def velocity(self, x, t, cond):
        return self.lam * x + self.beta * t[:, None].to(x.dtype)

    def exact(self, x1: float, t: float) -> float:
        lam, beta = self.lam, self.beta
        c = (x1 + beta / lam + beta / lam**2) / math.exp(lam)
        return c * math.exp(lam * t) - beta * t / lam - beta / lam**2


def _ode_error(solver: str, num_steps: int, shift: float) -> float:
    model = _LinearODE()
    sigmas = shift_sigmas(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)
    traj = sample(model, Condition({"c": torch.zeros(1, 1)}), sigmas,
                  initial_noise=torch.ones(1, 1, dtype=torch.float64), ode_solver=solver)
    return abs(traj.final.item() - model.exact(1.0, 0.0))


@pytest.mark.parametrize("shift", [1.0, 3.0])  # 3: non-uniform steps
def test_ab2_is_second_order_and_euler_first(shift):
    for solver, rate in (("euler", 2.0), ("ab2", 4.0)):
        errors = [_ode_error(solver, n, shift) for n in (8, 16, 32)]
        ratios = [errors[i] / errors[i + 1] for i in range(2)]
        assert all(rate * 0.8 < r < rate * 1.2 for r in ratios), (solver, errors, ratios)
    assert _ode_error("ab2", 32, shift) < _ode_error("euler", 32, shift) / 5


def test_ab2_steps_on_hand_computed_values_and_restarts_after_noise():
    # h = -0.2, h_prev = -0.4, r = 0.5: x' = 1 - 0.2 (1.25 * 2 - 0.25 * 4) = 0.7
    x = ab2_step(_one(1.0)[:, None], _one(2.0)[:, None], _one(4.0)[:, None], _one(1.0), _one(0.6), _one(0.4))
    assert x.item() == pytest.approx(0.7, abs=1e-12)
    # a window (0, 2) of 5 steps: step 2 follows a stochastic step, so it is an Euler step; step 3 is not
    model = tiny_model()
    cond = model.encode_prompts(["a red circle"])
    sigmas = model.schedule(5)
    runs = {s: sample(model, cond, sigmas, noise_level=0.7, generator=torch.Generator().manual_seed(0),
                      sde_window=(0, 2), ode_solver=s) for s in ("euler", "ab2")}
    assert torch.equal(runs["euler"].states[:, :4], runs["ab2"].states[:, :4])
    assert not torch.allclose(runs["euler"].states[:, 4], runs["ab2"].states[:, 4])
    with pytest.raises(ValueError, match="unknown ODE solver 'rk4'"):
        sample(model, cond, sigmas, ode_solver="rk4")


# ---------------------------------------------------------------------------------------- invariants
def _frozen_flow_sde(model, cond, null_cond, sigmas, scale, renorm_dim, noise_level, generator):
    """The rollout sampler as it was before the dynamics and the window existed, with its Flow-SDE
    formulas written out here (not imported), so a change of the library's default path shows."""
    x = model.prepare_noise(cond.batch_size, generator)
    guard = float(sigmas[sigmas < 1.0].max())
    states, logps, cond_logps = [x], [], []
    for n in range(len(sigmas) - 1):
        t = torch.full((x.shape[0],), float(sigmas[n]))
        t_next = torch.full((x.shape[0],), float(sigmas[n + 1]))
        vel = cfg_velocity(model, x, t, cond, null_cond, scale, renorm_dim)

        def step(v):
            dt = t_next - t
            sig = noise_level * torch.sqrt(t / (1.0 - torch.where(t >= 1.0, torch.full_like(t, guard), t)))
            sig2, tb, dtb = (a.reshape(-1, 1, 1, 1).to(x.dtype) for a in (sig**2, t, dt))
            mean = x * (1.0 + sig2 / (2.0 * tb) * dtb) + v * (1.0 + sig2 * (1.0 - tb) / (2.0 * tb)) * dtb
            return mean, sig * torch.sqrt(-dt)

        def logp(sample_, mean, std):
            s = std.reshape(-1, 1, 1, 1)
            density = -((sample_ - mean) ** 2) / (2.0 * s**2) - torch.log(s) - 0.5 * math.log(2 * math.pi)
            return density.flatten(1).mean(1)

        mean, std = step(vel.guided)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu")
        x_next = mean + std.reshape(-1, 1, 1, 1) * z
        logps.append(logp(x_next, mean, std))
        cond_mean, cond_std = step(vel.cond)
        cond_logps.append(logp(x_next, cond_mean, cond_std))
        x = x_next
        states.append(x)
    return torch.stack(states, 1), torch.stack(logps, 1), torch.stack(cond_logps, 1)


@pytest.mark.parametrize("mode", ["hybrid", "both"])
def test_default_rollouts_are_bit_identical_to_the_sampler_before_the_variants(mode):
    model = tiny_model()
    settings = rollout_settings(RolloutConfig(num_steps=4, cfg_mode=mode))
    assert (settings.dynamics, settings.sde_steps, settings.ode_solver) == ("flow", None, "euler")
    ro = rollout(model, ["a red circle", "two blue squares"], 2, settings, torch.Generator().manual_seed(0))
    cond = model.encode_prompts(["a red circle", "two blue squares"]).index(torch.tensor([0, 0, 1, 1]))
    states, logps, cond_logps = _frozen_flow_sde(model, cond, model.null_condition(cond), model.schedule(4), 3.0,
                                                 model.cfg_renorm_dim, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(ro.states, states)
    assert torch.equal(ro.old_log_probs, logps if mode == "both" else cond_logps)
    assert ro.window is None and ro.stochastic.all()


VARIANTS = [
    # (sde_steps, sde_start, sde_slide_every, iteration, ode_solver): all SDE, a fixed window, a sliding window at
    # an iteration where it moved (from step 0 to 2)
    pytest.param(None, 0, None, 0, "euler", id="all"),
    pytest.param(2, 1, None, 0, "euler", id="fixed-euler"),
    pytest.param(2, 1, None, 0, "ab2", id="fixed-ab2"),
    pytest.param(2, 0, 2, 5, "euler", id="sliding-euler"),
    pytest.param(2, 0, 2, 5, "ab2", id="sliding-ab2"),
]


@pytest.mark.parametrize("dynamics", ["flow", "dance", "cps"])
@pytest.mark.parametrize("sde_steps,start,slide,iteration,solver", VARIANTS)
def test_ratio_is_one_before_any_update_for_every_variant(dynamics, sde_steps, start, slide, iteration, solver):
    num_steps = 4
    settings = RolloutSettings(num_steps, 0.7, 3.0, "hybrid", dynamics=dynamics, sde_steps=sde_steps, sde_start=start,
                               sde_slide_every=slide, ode_solver=solver)
    model = tiny_model()
    ro = rollout(model, ["a red circle", "two blue squares"], 3, settings, torch.Generator().manual_seed(0),
                 iteration=iteration)
    window = (0, num_steps) if sde_steps is None else (2, 4) if slide else (1, 3)
    assert (ro.window or (0, num_steps)) == window
    expected = stochastic_steps(num_steps, dynamics, 0.7, window)
    assert torch.equal(ro.stochastic, expected) and expected.any()
    assert torch.isfinite(ro.old_log_probs).all() and (ro.old_log_probs[:, ~expected] == 0).all()
    rows = torch.arange(6)
    with torch.no_grad():
        new = step_log_probs(model, ro, rows, torch.arange(num_steps).expand(6, num_steps), settings)
    assert torch.isfinite(new.log_probs).all() and torch.isfinite(new.means).all()  # ODE and zero-noise steps too
    if dynamics == "cps":
        assert (new.log_probs[:, -1] == 0).all() and (new.stds[:, -1] == 0).all()
    # the steps GRPO trains are the window's stochastic ones; their ratio is 1
    trained = select_timesteps(6, num_steps, "subset", 0.5, 1, torch.Generator().manual_seed(1),
                               window=ro.window, excluded=(3,) if dynamics == "cps" else ())
    assert expected[trained].all()
    ratio = torch.exp(new.log_probs[:, expected] - ro.old_log_probs[:, expected])
    assert (ratio - 1).abs().max() < 1e-5
    # before the window the rollout follows the ODE: its first step is the Euler step of the initial noise
    if window[0] > 0:
        first = euler_step(ro.states[:, 0], cfg_velocity(model, ro.states[:, 0], torch.ones(6), ro.cond, ro.null_cond,
                                                           3.0, model.cfg_renorm_dim).guided, torch.ones(6),
                           torch.full((6,), float(ro.sigmas[1])))
        torch.testing.assert_close(ro.states[:, 1], first)


# ---------------------------------------------------------------------------------------- config
def test_config_keys_reach_the_settings_and_bad_combinations_are_refused():
    cfg = from_dict(FlowRLConfig, {"grpo": {"rollout": {"dynamics": "cps", "noise_level": 0.5, "sde_steps": 3,
                                                        "sde_start": 1, "sde_slide_every": 4, "ode_solver": "ab2"}}})
    s = rollout_settings(cfg.grpo.rollout)
    assert (s.dynamics, s.sde_steps, s.sde_start, s.sde_slide_every, s.ode_solver) == ("cps", 3, 1, 4, "ab2")
    assert s.window(0) == (1, 4) and s.window(8) == (3, 6)
    bad = [
        ({"rollout": {"dynamics": "cps", "noise_level": 1.5}}, r"grpo.rollout.noise_level: 1.5 is above 1"),
        ({"rollout": {"sde_start": 2}}, r"grpo.rollout.sde_start: 2 .*grpo.rollout.sde_steps is null"),
        ({"rollout": {"ode_solver": "ab2"}}, r"grpo.rollout.ode_solver: ab2 .*sde_steps is null"),
        ({"rollout": {"sde_steps": 4, "sde_start": 7}}, r"grpo.rollout.sde_steps: a window of 4 steps from "
                                                        r"grpo.rollout.sde_start 7 is past the end"),
        ({"rollout": {"sde_steps": 2}, "timesteps": {"per_trajectory": 3}},
         r"grpo.timesteps.per_trajectory: 3 .*grpo.rollout.sde_steps = 2 holds 2"),
        ({"rollout": {"sde_steps": 2, "sde_slide_every": 1, "dynamics": "cps", "noise_level": 0.5},
          "timesteps": {"per_trajectory": 2}}, r"grpo.rollout.sde_steps = 2 holds 1 stochastic step\(s\) \(with "),
        ({"rollout": {"dynamics": "cps", "noise_level": 0.5}, "timesteps": {"fraction": 0.2, "start": 0.8}},
         r"grpo.timesteps.per_trajectory: 2 is more than the 1 stochastic steps"),
    ]
    for grpo, match in bad:
        with pytest.raises(ConfigError, match=match):
            check_consistency(from_dict(FlowRLConfig, {"grpo": grpo}))  # what loading a config runs
    # a window's K only needs to fit the window: fraction and start are not read
    check_consistency(from_dict(FlowRLConfig, {"grpo": {"rollout": {"sde_steps": 2, "sde_start": 8},
                                                        "timesteps": {"fraction": 0.1, "per_trajectory": 2}}}))


# ---------------------------------------------------------------------------------------- trainer
class _Brightness:
    def score_components(self, images, prompts, sources=None):
        total = images.mean(dim=(1, 2, 3))
        return RewardScores(total=total, components={"brightness": total})


def _trainer(root, rollout_cfg: RolloutConfig):
    cfg = GRPOConfig(loop=LoopConfig(iterations=2, eval_every=100, checkpoint_every=1), prompts_per_iteration=2,
                     group_size=2, rollout=rollout_cfg, timesteps=WindowTimestepsConfig(fraction=0.5, per_trajectory=1),
                     reward_chunks=2, optim=OptimConfig(lr=1e-2), kl_coef=0.1, kl_anchor_steps=1)
    model = tiny_model()
    rewards = LocalRewards(_Brightness())
    trainer = GRPOTrainer(model, model.net, tiny_model(seed=1), cfg,
                          PromptSet(["a red circle", "a blue square"], ["x", "y"], None), rewards,
                          weights=lambda prompts: torch.ones(len(prompts), 1),
                          checkpoints=Checkpoints(ArtifactStore(str(root)), "grpo_t2i", "v"))
    windows = []
    collect = trainer.collect

    def recording(iteration):
        outs = collect(iteration)
        windows.append((iteration, next(iter(outs.values())).rollouts.window))
        return outs

    trainer.collect = recording
    return trainer, rewards, model, windows


@pytest.mark.parametrize("rollout_cfg", [
    pytest.param(RolloutConfig(num_steps=3, dynamics="dance", noise_level=0.5), id="dance"),
    pytest.param(RolloutConfig(num_steps=3, dynamics="cps", noise_level=0.5), id="cps"),
    pytest.param(RolloutConfig(num_steps=3, sde_steps=2, sde_slide_every=1, ode_solver="ab2"), id="flow-sliding"),
    pytest.param(RolloutConfig(num_steps=3, dynamics="cps", noise_level=0.9, sde_steps=2, sde_slide_every=1),
                 id="cps-sliding"),
])
def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path, rollout_cfg):
    trainer, rewards, model, windows = _trainer(tmp_path / "whole", rollout_cfg)
    state = trainer.train(progress=False).state
    rewards.close()
    # the one optimizer step of an iteration sees the rollouts' own policy: ratio 1 on the trained steps
    assert all(h["train/ratio_dev"] < 1e-4 and math.isfinite(h["train/kl"]) for h in state.history)
    if rollout_cfg.sde_steps is not None:
        assert windows == [(0, (0, 2)), (1, (1, 3))]  # the window slid, and the update drew from it
    killed, rewards, _, _ = _trainer(tmp_path / "resumed", rollout_cfg)
    killed.train(progress=False, stop_after=1)
    rewards.close()
    resumed, rewards, resumed_model, resumed_windows = _trainer(tmp_path / "resumed", rollout_cfg)
    assert resumed.resume() and resumed.state.iteration == 1
    resumed.train(progress=False)
    rewards.close()
    assert resumed_windows == windows[1:]
    assert all(torch.equal(a, b) for a, b in zip(model.net.parameters(), resumed_model.net.parameters()))
