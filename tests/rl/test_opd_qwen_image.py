"""OPD's production code path on tiny random Qwen-Image components: one
student transformer behind a T2I and an edit pipeline view, a T2I teacher and
an edit teacher, two iterations of two steps (docs/design.md, Invariants)."""

import copy
import dataclasses

import pytest
import torch

from flowrl.config import OPDConfig
from flowrl.models.qwen_image import QwenImageModel
from flowrl.rl.grpo import PromptSet
from flowrl.rl.opd import OPDTrainer
from tests.models.tiny_qwen_image import build_tiny_qwen_image

HEIGHT, WIDTH = 32, 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("opd_qwen"), task="edit")


def _perturbed(model: QwenImageModel, seed: int) -> QwenImageModel:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.transformer.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return model


def _student(tiny):
    t2i = QwenImageModel.from_pretrained(tiny, task="t2i", height=HEIGHT, width=WIDTH)
    reference = QwenImageModel.from_pretrained(tiny, task="edit", height=HEIGHT, width=WIDTH)
    edit = QwenImageModel(t2i.transformer, t2i.vae, t2i.text_encoder, t2i.tokenizer, t2i.scheduler_config,
                          task="edit", height=HEIGHT, width=WIDTH, image_processor=reference.image_processor)
    return t2i, edit


def _trainer(student_t2i, student_edit, teachers, optim=None, **overrides):
    """``optim``: keys of opd.optim over the test's own."""
    defaults = OPDConfig()
    cfg = OPDConfig(**{"prompts_per_iteration": 2, "num_steps": 2, **overrides},
                    loop=dataclasses.replace(defaults.loop, iterations=2, checkpoint_every=100),
                    timesteps=dataclasses.replace(defaults.timesteps, mode="all"),
                    optim=dataclasses.replace(defaults.optim, **{"lr": 1e-3, **(optim or {})}))
    sources = torch.rand(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(1))
    prompts = {"t2i": PromptSet(["a red circle left of a blue square", "two green triangles"], ["a", "b"], None),
               "edit": PromptSet(["make the circle purple", "remove the square"], ["c", "d"], sources)}
    return OPDTrainer(student_t2i, student_t2i.transformer, teachers, cfg, prompts,
                      {"t2i": "t2i_teacher", "edit": "edit_teacher"}, {"t2i": 0.5, "edit": 0.5},
                      guidance_scale=4.0, task_models={"t2i": student_t2i, "edit": student_edit})


def test_two_teachers_distil_into_one_qwen_image_transformer(tiny):
    student_t2i, student_edit = _student(tiny)
    teachers = {
        "t2i_teacher": _perturbed(QwenImageModel.from_pretrained(tiny, task="t2i", height=HEIGHT, width=WIDTH), 1),
        "edit_teacher": _perturbed(QwenImageModel.from_pretrained(tiny, task="edit", height=HEIGHT, width=WIDTH), 2),
    }
    frozen = {n: copy.deepcopy(t.transformer.state_dict()) for n, t in teachers.items()}
    before = copy.deepcopy(student_t2i.transformer.state_dict())
    state = _trainer(student_t2i, student_edit, teachers).train(progress=False).state
    assert state.iteration == 2
    for h in state.history:
        assert h["train/loss_t2i"] > 0 and h["train/loss_edit"] > 0
    after = student_t2i.transformer.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)  # the shared student moved
    assert student_edit.transformer is student_t2i.transformer
    for name, teacher in teachers.items():  # teachers stay frozen
        assert all(torch.equal(frozen[name][k], v) for k, v in teacher.transformer.state_dict().items())
        assert not any(p.requires_grad for p in teacher.transformer.parameters())


def test_qwen_image_student_equal_to_its_teachers_has_zero_loss(tiny):
    student_t2i, student_edit = _student(tiny)
    teachers = {"t2i_teacher": QwenImageModel.from_pretrained(tiny, task="t2i", height=HEIGHT, width=WIDTH),
                "edit_teacher": QwenImageModel.from_pretrained(tiny, task="edit", height=HEIGHT, width=WIDTH)}
    trainer = _trainer(student_t2i, student_edit, teachers)
    metrics = trainer.update(trainer.collect(0), 0)
    assert metrics["train/loss_t2i"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["train/loss_edit"] == pytest.approx(0.0, abs=1e-10)


@pytest.mark.parametrize("zero", [2, 3])
def test_qwen_image_student_under_deepspeed_zero_takes_the_plain_update(tiny, zero):
    """The production training path: the student transformer under DeepSpeed ZeRO (CPU accelerator,
    one process), behind both pipeline views at once, ends where plain PyTorch's AdamW ends."""
    teachers = {
        "t2i_teacher": _perturbed(QwenImageModel.from_pretrained(tiny, task="t2i", height=HEIGHT, width=WIDTH), 1),
        "edit_teacher": _perturbed(QwenImageModel.from_pretrained(tiny, task="edit", height=HEIGHT, width=WIDTH), 2),
    }
    plain = _trainer(*_student(tiny), teachers).train(progress=False)
    trainer = _trainer(*_student(tiny), teachers, optim={"zero_stage": zero})
    try:
        assert trainer.engine.zero_stage == zero
        sharded = trainer.train(progress=False)
    finally:
        trainer.engine.close()
    for a, b in zip(plain.state.history, sharded.state.history):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
    for key, value in plain.module_state.items():
        torch.testing.assert_close(sharded.module_state[key], value, atol=1e-5, rtol=1e-4)
