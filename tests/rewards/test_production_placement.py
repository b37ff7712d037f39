"""Where the production VLM scorers run and for how long: bfloat16 in the stages, a
monitor scorer loaded for each evaluation and dropped after it, and a reward server's
scorers spread round-robin over its GPUs. On a tiny random Qwen2.5-VL checkpoint, CPU only."""

from __future__ import annotations

import dataclasses
import gc
import shutil
import weakref
from pathlib import Path

import pandas as pd
import pytest
import torch

from flowrl.config import FlowRLConfig, RewardModelConfig
from flowrl.rewards import registry
from flowrl.rewards.production import (
    SCORER_DTYPE, LazyVLMScorer, ReleasedAfterScoring, load_production_rewards, scorer_devices,
)
from flowrl.rewards.shapes_rewards import ScorerReward
from tests.models.tiny_qwen_image import build_text_encoder, build_tokenizer
from tests.rl.conftest import single_thread, tiny_model  # noqa: F401  (autouse: one thread)

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "make the circle red"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL scorer directory, as save_pretrained writes it."""
    from transformers import Qwen2VLImageProcessorPil

    root = tmp_path_factory.mktemp("tiny_scorer")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(root)
    build_text_encoder(tokenizer, seed=3).save_pretrained(root)
    Qwen2VLImageProcessorPil().save_pretrained(root)
    return root


def _images(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, 32, 32, generator=generator)  # [B, 3, 32, 32]


def test_scorers_go_round_robin_over_the_gpus():
    assert scorer_devices(3, 2) == ["cuda:0", "cuda:1", "cuda:0"]
    assert scorer_devices(2, 4) == ["cuda:0", "cuda:1"]
    assert scorer_devices(3, 1) == ["cuda:0"] * 3
    assert scorer_devices(3, 0) == ["cpu"] * 3
    # the filter stage: the policy on GPU 0, the scorers on the GPUs after it (or beside it on one GPU)
    assert scorer_devices(3, 2, first=1) == ["cuda:1"] * 3
    assert scorer_devices(3, 3, first=1) == ["cuda:1", "cuda:2", "cuda:1"]
    assert scorer_devices(2, 1, first=1) == ["cuda:0"] * 2
    assert scorer_devices(0, 2) == []
    with pytest.raises(ValueError, match="counts must be >= 0"):
        scorer_devices(-1, 2)


def test_stage_scorers_load_in_bfloat16_and_read_the_levels_in_float32(checkpoint):
    from flowrl.planner import scorer_dtype

    assert SCORER_DTYPE == "bfloat16" and scorer_dtype() == SCORER_DTYPE  # what the planner sizes
    bf16, fp32 = LazyVLMScorer(checkpoint), LazyVLMScorer(checkpoint, dtype="float32")
    x = _images(4)
    with torch.no_grad():
        low, full = bf16.level_logits(x, PROMPTS), fp32.level_logits(x, PROMPTS)
    assert bf16._scorer.model.dtype == torch.bfloat16 and fp32._scorer.model.dtype == torch.float32
    assert low.dtype == torch.float32  # the softmax of the expected level runs in float32
    # the same scorer: bfloat16 weights move the expected level by far less than a level
    score = ScorerReward(bf16, "a").score(x, PROMPTS)
    torch.testing.assert_close(score, ScorerReward(fp32, "a").score(x, PROMPTS), atol=2e-2, rtol=0)
    assert not torch.equal(low, full)  # it did load in another dtype
    with pytest.raises(ValueError, match="'bf16' is not a torch dtype name"):
        LazyVLMScorer(checkpoint, dtype="bf16")


def test_release_drops_the_model_and_the_next_use_loads_it_again(checkpoint):
    scorer = LazyVLMScorer(checkpoint, dtype="float32")
    x = _images(2, seed=1)
    assert not scorer.loaded
    with torch.no_grad():
        first = scorer.level_logits(x, PROMPTS[:2])
    model = weakref.ref(scorer._scorer.model)
    scorer.release()
    gc.collect()
    assert not scorer.loaded and model() is None  # nothing else holds the weights
    scorer.release()  # releasing an unloaded scorer is a no-op
    with torch.no_grad():
        torch.testing.assert_close(scorer.level_logits(x, PROMPTS[:2]), first, atol=0, rtol=0)


def test_a_monitor_evaluation_loads_its_scorer_for_the_call_only(checkpoint):
    """What the GRPO / OPD monitors call: reward_evaluation over a ReleasedAfterScoring watcher.
    Loaded while scoring, gone afterwards; the same scores on the next evaluation."""
    from flowrl.config import SamplerConfig
    from flowrl.evaluation import reward_evaluation

    watcher = ScorerReward(LazyVLMScorer(checkpoint), "heldout", batch_size=8)
    seen = []
    score = watcher.backbone.level_logits

    def spy(*args, **kwargs):
        out = score(*args, **kwargs)
        seen.append(watcher.backbone.loaded)
        return out

    watcher.backbone.level_logits = spy
    frame = pd.DataFrame({"prompt": ["a red circle", "a blue square", "two circles"],
                          "category": ["colors", "colors", "counting"], "source_image": [None] * 3})
    model, sampler = tiny_model(), SamplerConfig(num_steps=2, guidance_scale=2.0)
    wrapped = ReleasedAfterScoring(watcher)
    assert wrapped.name == "heldout" and wrapped.score_range == watcher.score_range
    first, _ = reward_evaluation(model, frame, {"heldout": wrapped}, sampler, seed=5, batch_size=4)
    assert seen == [True] and not watcher.backbone.loaded
    second, _ = reward_evaluation(model, frame, {"heldout": wrapped}, sampler, seed=5, batch_size=4)
    assert seen == [True, True] and not watcher.backbone.loaded
    assert first == second and set(first) == {"heldout", "heldout/colors", "heldout/counting"}
    assert 1.0 <= first["heldout"] <= 5.0


def test_a_failed_score_still_releases_the_scorer(checkpoint):
    wrapped = ReleasedAfterScoring(ScorerReward(LazyVLMScorer(checkpoint), "heldout"))
    with pytest.raises(ValueError, match="reserved chat/image markers"):  # raised after the model loaded
        wrapped.score(_images(1), ["<|im_start|> a circle"])
    assert not wrapped.reward.backbone.loaded


def _artifact(root: Path, checkpoint: Path) -> Path:
    for criterion in ("alignment", "quality", "fidelity"):
        shutil.copytree(checkpoint, root / "t2i" / f"pointwise_{criterion}")
    return root


def test_a_reward_server_spreads_the_composite_over_its_gpus(checkpoint, tmp_path, monkeypatch):
    """spread (served_composite on a sidecar with grpo.reward_gpus): scorer i on cuda:(i % GPUs);
    without it each scorer loads on the process's GPU, decided at load time."""
    local = _artifact(tmp_path / "rm", checkpoint)
    monkeypatch.setattr(registry, "fetch", lambda uri: local)
    config = dataclasses.replace(FlowRLConfig(), reward_model=RewardModelConfig(backbone="vlm",
                                                                                vlm_pretrained="unused"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    spread = load_production_rewards(config, "rm", "t2i", {}, spread=True)
    devices = {name: r.backbone.device for name, r in spread.components.items()}
    assert devices == {"alignment": "cuda:0", "quality": "cuda:1", "fidelity": "cuda:0"}
    assert all(r.backbone.dtype == SCORER_DTYPE and not r.backbone.loaded for r in spread.components.values())
    local_rank = load_production_rewards(config, "rm", "t2i", {})
    assert {r.backbone.device for r in local_rank.components.values()} == {None}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    on_cpu = load_production_rewards(config, "rm", "t2i", {}, spread=True)
    assert {r.backbone.device for r in on_cpu.components.values()} == {"cpu"}
