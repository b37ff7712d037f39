"""Reward-model training on the shared engine and loop: the same steps as the loop it replaced, the
optimizer settings from the config, and resume."""

import dataclasses

import numpy as np
import pytest
import torch

from flowrl.config import RewardModelConfig
from flowrl.rewards.shapes_annotators import annotator_pool
from flowrl.rewards.shapes_dataset import annotate, draw_candidates
from flowrl.rewards.shapes_scorer import ScorerArch, ShapesScorer
from flowrl.rewards.training import (PairwiseData, PointwiseData, ScorerTrainer, _rows, fit, pairwise_step_loss,
                                     pointwise_step_loss)
from flowrl.rl.trainer import Checkpoints
from flowrl.storage import ArtifactStore


@pytest.fixture(scope="module")
def frames():
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    return annotate(draw_candidates(rng, 2, 0, 32), annotator_pool(rng, 3, 0.2, (0.2, 0.4)), rng, 1, 2)


def _reference_fit(backbone, step_loss, n_rows, *, steps, batch_size, lr, seed, log):
    """The reward-model loop as it was before the shared engine (weight decay 0.01, clip 1.0 in the code)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(backbone.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    for step in range(steps):
        loss = step_loss(_rows(n_rows, batch_size, gen))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0:
            log({"train/loss": loss.item()}, step)
    return losses


def _scorer(seed=0):
    torch.manual_seed(seed)  # as the stage seeds each new scorer
    return ShapesScorer(ScorerArch(width=16, depth=1, heads=2), 32)


def _problems(frames):
    point, pair = PointwiseData.from_frame(frames[0], "alignment"), PairwiseData.from_frame(frames[1])
    return {"pointwise": (point, pointwise_step_loss), "pairwise": (pair, pairwise_step_loss)}


@pytest.mark.parametrize("kind", ["pointwise", "pairwise"])
def test_fit_equals_the_old_loop_bit_for_bit(frames, kind):
    """The smoke config's settings (batch 8, lr 1e-3) over 60 steps (logged at 0 and 50): same losses, weights, logs."""
    data, step_loss = _problems(frames)[kind]
    r = RewardModelConfig()
    assert (r.weight_decay, r.grad_clip) == (0.01, 1.0)  # the defaults are the values the old loop hard-coded
    ref_log, new_log = [], []
    old = _scorer()
    ref = _reference_fit(old, lambda i: step_loss(old, data, i), len(data.prompts), steps=60, batch_size=8, lr=1e-3,
                         seed=0, log=lambda m, s: ref_log.append((s, m)))
    new = _scorer()
    got = fit(new, lambda i: step_loss(new, data, i), len(data.prompts), steps=60, batch_size=8, lr=1e-3, seed=0,
              weight_decay=r.weight_decay, grad_clip=r.grad_clip, log=lambda m, s: new_log.append((s, m)))
    assert got == ref and len(got) == 60
    assert new_log == ref_log and [s for s, _ in ref_log] == [0, 50]
    for key, value in old.state_dict().items():
        assert torch.equal(value, new.state_dict()[key]), key


def test_weight_decay_and_grad_clip_are_used(frames):
    data, step_loss = _problems(frames)["pointwise"]

    def run(**settings):
        scorer = _scorer()
        fit(scorer, lambda i: step_loss(scorer, data, i), len(data.prompts), steps=3, batch_size=8, lr=1e-2, seed=0,
            **settings)
        return scorer.state_dict()

    default = run()
    for settings in ({"weight_decay": 0.5}, {"grad_clip": 1e-3}):
        changed = run(**settings)
        assert any(not torch.equal(default[k], changed[k]) for k in default), settings


def test_scorer_training_resumed_equals_the_uninterrupted_run(frames, tmp_path):
    data, step_loss = _problems(frames)["pairwise"]
    store = ArtifactStore(str(tmp_path / "store"))

    def trainer(version):
        scorer = _scorer()
        return ScorerTrainer(scorer, lambda i: step_loss(scorer, data, i), len(data.prompts), steps=9, batch_size=8,
                             lr=1e-3, seed=0, checkpoints=Checkpoints(store, "reward_model", version),
                             checkpoint_every=3, name="t2i/pairwise")

    whole = trainer("whole")
    whole.train()
    first = trainer("split")
    first.train(stop_after=5)  # past the checkpoint at 3
    torch.manual_seed(7)
    second = trainer("split")
    assert second.resume() and second.state.iteration == 3
    second.train()
    assert second.losses() == whole.losses() and len(whole.losses()) == 9
    for key, value in whole.module.state_dict().items():
        assert torch.equal(value, second.module.state_dict()[key]), key
    done = trainer("split")  # a finished run resumes to its end and trains nothing more
    assert done.resume() and done.state.iteration == 9
    done.train()
    assert done.losses() == whole.losses()


def test_reward_model_keys_are_out_of_the_hash_at_their_defaults():
    from flowrl.config import FlowRLConfig

    config = FlowRLConfig()
    moved = dataclasses.replace(config, reward_model=dataclasses.replace(config.reward_model, checkpoint_every=5))
    assert moved.section_hash("reward_model") == config.section_hash("reward_model")
    decayed = dataclasses.replace(config, reward_model=dataclasses.replace(config.reward_model, weight_decay=0.1))
    assert decayed.section_hash("reward_model") != config.section_hash("reward_model")


def test_reward_model_stage_resumes_each_scorer_from_its_checkpoints(tmp_path, monkeypatch):
    """With reward_model.checkpoint_every set, a stage that failed after its second scorer resumes: the
    finished scorers load from their last checkpoint, and the metrics are those of a run never stopped."""
    from flowrl.config import load_config
    from flowrl.stages import reward_model as stage
    from flowrl.stages.annotate import run_annotate
    from flowrl.stages.base import run_base
    from flowrl.tracking import NullTracker
    from tests.conftest import write_config

    torch.set_num_threads(1)
    plain = load_config(write_config(tmp_path / "a"))
    annotations = run_annotate(plain, run_base(plain, progress=False, tracker=NullTracker()).uri,
                               tracker=NullTracker()).uri
    whole = stage.run_reward_model(plain, annotations, tracker=NullTracker())
    config = load_config(write_config(tmp_path / "a", reward_model={"checkpoint_every": 4}))
    evaluate, calls = stage._held_out_metrics, []

    def crashing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("evaluation crashed")
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(stage, "_held_out_metrics", crashing)
    other_root = str(tmp_path / "b")
    with pytest.raises(RuntimeError, match="evaluation crashed"):
        stage.run_reward_model(config, annotations, output_root=other_root, tracker=NullTracker())
    store = ArtifactStore(other_root)
    assert not store.exists("reward_model", whole.version)
    assert len(Checkpoints(store, "reward_model", f"{whole.version}-t2i-pointwise_quality").complete()) == 2  # 4, 5
    monkeypatch.setattr(stage, "_held_out_metrics", evaluate)
    resumed = stage.run_reward_model(config, annotations, output_root=other_root, tracker=NullTracker(), resume=True)
    assert resumed.version == whole.version
    strip = lambda m: {k: strip(v) for k, v in m.items() if k != "train_s"} if isinstance(m, dict) else m
    assert strip(resumed.metrics) == strip(json_round(whole.metrics))


def json_round(metrics):
    import json

    return json.loads(json.dumps(metrics))
