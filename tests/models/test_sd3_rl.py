"""GRPO and OPD on tiny random Stable Diffusion 3 components, through the same trainers as every family:
the first update's ratio is 1 (rollout and training forwards agree), the transformer (or a LoRA adapter
on it) moves, a student equal to its teacher has zero distillation loss."""

import copy
from concurrent.futures import Future

import pytest
import torch

from flowrl.config import (GRPOConfig, LoopConfig, OPDConfig, OptimConfig, QwenImageLoraConfig, RolloutConfig,
                           TimestepsConfig, WindowTimestepsConfig)
from flowrl.models.lora import STUDENT, AdapterView, add_adapter
from flowrl.models.sd3 import SD3Model
from flowrl.rewards.base import RewardScores
from flowrl.rl.grpo import GRPOTrainer, PromptSet
from flowrl.rl.opd import OPDTrainer
from tests.models.tiny_sd3 import T5_LENGTH, build_tiny_sd3

SIZE = 32
PROMPTS = PromptSet(["a red circle", "two blue squares"], ["a", "b"], None)


class Brightness:
    """A deterministic reward with a spread inside every group: mean brightness of the image."""

    def submit(self, images, prompts, sources=None) -> Future:
        done: Future = Future()
        value = images.float().mean(dim=(1, 2, 3))
        done.set_result(RewardScores(value, {"brightness": value}))
        return done


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("sd3_rl"))


def _model(tiny) -> SD3Model:
    return SD3Model.from_pretrained(tiny, height=SIZE, width=SIZE, max_sequence_length=T5_LENGTH)


def _grpo(model, module, iterations=2, cfg_mode="hybrid", **overrides):
    cfg = GRPOConfig(**{"prompts_per_iteration": 2, "group_size": 2, "reward_chunks": 1, "kl_coef": 0.0, **overrides},
                     rollout=RolloutConfig(num_steps=3, guidance_scale=4.5, cfg_mode=cfg_mode),
                     loop=LoopConfig(iterations=iterations, checkpoint_every=100),
                     timesteps=WindowTimestepsConfig(fraction=1.0, per_trajectory=2), optim=OptimConfig(lr=1e-3))
    return GRPOTrainer(model.with_trainable(module), module, None, cfg, PROMPTS, Brightness(),
                       lambda prompts: torch.ones(len(prompts), 1))


@pytest.mark.parametrize("cfg_mode", ["hybrid", "both"])
def test_grpo_on_sd3_starts_at_ratio_one_and_moves_the_transformer(tiny, cfg_mode):
    model = _model(tiny)
    before = copy.deepcopy(model.transformer.state_dict())
    trainer = _grpo(model, model.transformer, cfg_mode=cfg_mode)
    first = trainer.update(trainer.collect(0), 0)  # one minibatch: the ratio is taken before the step
    assert first["train/ratio_dev"] < 1e-5
    assert first["train/loss"] == first["train/loss"] and first["train/grad_norm"] > 0
    result = trainer.train(progress=False)
    assert result.state.iteration == 2
    assert any(not torch.equal(before[k], v) for k, v in model.transformer.state_dict().items())


def test_grpo_trains_a_lora_adapter_on_sd3(tiny):
    """The attention projections of both streams carry the same names as Qwen-Image's, so the default LoRA
    targets fit SD3's transformer; only the adapter moves and it starts exactly at the base."""
    model = _model(tiny)
    base = copy.deepcopy(model.transformer.state_dict())
    add_adapter(model.transformer, QwenImageLoraConfig(rank=4), seed=0, key="model.sd3.lora")
    view = AdapterView(model.transformer, STUDENT)
    trainer = _grpo(model, view, iterations=1)
    first = trainer.update(trainer.collect(0), 0)
    assert first["train/ratio_dev"] < 1e-5
    moved = [k for k, v in view.state_dict().items() if "lora_B" in k and v.abs().max() > 0]
    assert moved  # lora_B starts at zero: the step moved it
    for name, value in model.transformer.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(base[name.replace(".base_layer", "")], value)  # the base stays frozen


def _perturbed(model: SD3Model, seed: int) -> SD3Model:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.transformer.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def _opd(student, teacher):
    cfg = OPDConfig(loop=LoopConfig(iterations=2, checkpoint_every=100), prompts_per_iteration=2, num_steps=2,
                    timesteps=TimestepsConfig(mode="all", per_trajectory=4), optim=OptimConfig(lr=1e-3))
    return OPDTrainer(student, student.transformer, {"t2i_teacher": teacher}, cfg, {"t2i": PROMPTS},
                      {"t2i": "t2i_teacher"}, {"t2i": 1.0}, guidance_scale=4.5)


def test_opd_distils_an_sd3_teacher(tiny):
    student, teacher = _model(tiny), _perturbed(_model(tiny), 1)
    frozen = copy.deepcopy(teacher.transformer.state_dict())
    before = copy.deepcopy(student.transformer.state_dict())
    state = _opd(student, teacher).train(progress=False).state
    assert state.iteration == 2 and all(h["train/loss"] > 0 for h in state.history)
    assert any(not torch.equal(before[k], v) for k, v in student.transformer.state_dict().items())
    assert all(torch.equal(frozen[k], v) for k, v in teacher.transformer.state_dict().items())


def test_an_sd3_student_equal_to_its_teacher_has_zero_loss(tiny):
    trainer = _opd(_model(tiny), _model(tiny))
    metrics = trainer.update(trainer.collect(0), 0)
    assert metrics["train/loss"] == pytest.approx(0.0, abs=1e-10)


def test_the_base_stage_references_sd3_weights_and_the_family_loads_the_policy_from_them(tiny, tmp_path):
    """The base stage asks the family which published weights to validate (model.sd3.pretrained), and a
    model artifact of that reference loads back as the T2I policy; broken weights are named by their key."""
    import json
    import shutil

    from flowrl.config import load_config
    from flowrl.models import CheckpointError
    from flowrl.models.families import family_of
    from flowrl.stages.base import run_base
    from flowrl.storage import fetch
    from flowrl.tracking import NullTracker
    from tests.conftest import ROOT

    config = load_config(ROOT / "configs" / "sd3_tiny.yaml",
                         overrides=[f"model.sd3.pretrained={tiny}", f"run.artifact_root={tmp_path / 'a'}",
                                    "filter.t2i_prompts=p.parquet",
                                    "bench.t2i_prompts=b.parquet"])
    result = run_base(config, progress=False, tracker=NullTracker())
    reference = json.loads((fetch(result.uri) / "reference.json").read_text())
    assert reference["family"] == "sd3" and set(reference["pretrained"]) == {"t2i"}
    model = family_of(config).load_policy(fetch(result.uri), config, "t2i")
    assert family_of(config).owns(model)
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    shutil.rmtree(broken / "vae")
    bad = load_config(ROOT / "configs" / "sd3_tiny.yaml",
                      overrides=[f"model.sd3.pretrained={broken}", f"run.artifact_root={tmp_path / 'b'}",
                                 "filter.t2i_prompts=p.parquet", "bench.t2i_prompts=b.parquet"])
    with pytest.raises(CheckpointError, match=r"model.sd3.pretrained: component 'vae'"):
        run_base(bad, progress=False, tracker=NullTracker())
