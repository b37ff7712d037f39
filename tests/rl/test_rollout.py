"""Rollouts store what the objective needs, and the training path recomputes
their log-probs exactly before any update (docs/design.md, Invariants)."""

import pytest
import torch

from flowrl.rl.rollout import RolloutSettings, rollout, select_timesteps, step_log_probs
from flowrl.shapes import make_edit_set, render_batch
from tests.rl.conftest import tiny_model


@pytest.mark.parametrize("task", ["t2i", "edit"])
@pytest.mark.parametrize("mode", ["hybrid", "both", "none"])
def test_ratio_is_one_before_any_update(task, mode):
    model = tiny_model()
    if task == "t2i":
        prompts, sources = ["a red circle", "two blue squares"], None
    else:
        edits = make_edit_set(3, 1)[:2]
        prompts, sources = [e.instruction for e in edits], render_batch([e.source for e in edits], 32)
    settings = RolloutSettings(num_steps=4, noise_level=0.7, guidance_scale=3.0, cfg_mode=mode)
    ro = rollout(model, prompts, 3, settings, torch.Generator().manual_seed(0), sources)
    assert ro.states.shape == (6, 5, 3, 32, 32) and ro.old_log_probs.shape == (6, 4)
    assert ro.group_ids.tolist() == [0, 0, 0, 1, 1, 1] and ro.images.shape == (6, 3, 32, 32)
    assert (ro.null_cond is None) == (mode == "none")
    rows = torch.arange(6)
    steps = torch.arange(4).expand(6, 4)
    with torch.no_grad():
        new = step_log_probs(model, ro, rows, steps, settings).log_probs
    assert (torch.exp(new - ro.old_log_probs) - 1).abs().max() < 1e-5
    # a subset of rows and steps gives the same numbers as the full recompute
    sub = step_log_probs(model, ro, torch.tensor([4, 1]), torch.tensor([[2, 0], [3, 1]]), settings).log_probs
    torch.testing.assert_close(sub, torch.stack([new[4, [2, 0]], new[1, [3, 1]]]), atol=1e-6, rtol=1e-6)


def test_hybrid_and_both_store_different_old_log_probs():
    model = tiny_model()
    settings = {m: RolloutSettings(4, 0.7, 3.0, m) for m in ("hybrid", "both")}
    ro = {m: rollout(model, ["a red circle"], 2, s, torch.Generator().manual_seed(0)) for m, s in settings.items()}
    torch.testing.assert_close(ro["hybrid"].states, ro["both"].states)  # same guided sampler
    assert not torch.allclose(ro["hybrid"].old_log_probs, ro["both"].old_log_probs)


def test_subset_timesteps_come_from_the_noisy_start_and_are_distinct():
    idx = select_timesteps(64, 10, "subset", 0.5, 2, torch.Generator().manual_seed(0))
    assert idx.shape == (64, 2) and idx.max() < 5 and (idx[:, 0] != idx[:, 1]).all()
    assert set(idx.flatten().tolist()) == {0, 1, 2, 3, 4}
    assert select_timesteps(3, 10, "all", 0.5, 2, torch.Generator()).tolist() == [list(range(10))] * 3
    with pytest.raises(ValueError, match="timesteps.per_trajectory"):
        select_timesteps(3, 10, "subset", 0.2, 3, torch.Generator())


def test_a_later_window_draws_only_its_steps_and_the_default_window_is_unchanged():
    from flowrl.rl.rollout import timestep_window

    assert timestep_window(10, 0.5) == (0, 5) and timestep_window(10, 0.5, 0.5) == (5, 10)
    assert timestep_window(10, 0.3, 0.35) == (3, 6)  # floor of the start, ceil of the width
    assert timestep_window(10, 0.01, 0.99) == (9, 10)  # never empty
    idx = select_timesteps(64, 10, "subset", 0.5, 2, torch.Generator().manual_seed(0), start=0.5)
    assert set(idx.flatten().tolist()) == {5, 6, 7, 8, 9} and (idx[:, 0] != idx[:, 1]).all()
    # start 0 draws exactly what the window-less selection drew (runs made before the key existed replay)
    first = select_timesteps(64, 10, "subset", 0.5, 2, torch.Generator().manual_seed(0))
    torch.testing.assert_close(first, torch.rand(64, 5, generator=torch.Generator().manual_seed(0)).argsort(1)[:, :2])
    with pytest.raises(ValueError, match=r"window \[5, 7\)"):
        select_timesteps(3, 10, "subset", 0.2, 3, torch.Generator(), start=0.5)


def test_anchor_steps_come_from_the_untrained_rest():
    from flowrl.rl.rollout import select_anchor_steps

    idx = select_anchor_steps(64, 10, 0.5, 2, torch.Generator().manual_seed(0))
    assert idx.shape == (64, 2) and idx.min() >= 5 and idx.max() <= 9 and (idx[:, 0] != idx[:, 1]).all()
    assert select_anchor_steps(4, 10, 1.0, 2, torch.Generator()).shape == (4, 0)
    assert select_anchor_steps(4, 10, 0.8, 5, torch.Generator()).shape == (4, 2)
    # a middle window leaves anchors on both sides of it
    idx = select_anchor_steps(256, 10, 0.4, 3, torch.Generator().manual_seed(1), start=0.3)
    assert set(idx.flatten().tolist()) == {0, 1, 2, 7, 8, 9}
