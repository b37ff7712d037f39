"""opd.states_per_forward: OPD's forwards over parts of (trajectory, matched state) pairs, below one
trajectory, take the whole batch's update and report its losses; with opd.optim.micro_batch the pairs are cut
within each trajectory part. On the shapes model and on the tiny Qwen-Image transformer.

Each test takes the same update twice on the same rollouts and compares the accumulated gradient (the
gradient clip is out of reach), the weights after the AdamW step and the loss metrics."""

from __future__ import annotations

import pytest
import torch

from flowrl.config import ConfigError, OPDConfig, OptimConfig, TimestepsConfig, _hash_payload
from flowrl.rl.grpo import PromptSet
from flowrl.rl.opd import OPDTrainer, pair_parts
from tests.rl.conftest import tiny_model
from tests.rl.ddp_update import EDITS, PROMPTS

NO_CLIP = 1e9
LOSSES = ("train/loss", "train/loss_t2i", "train/loss_t2i_uncond", "train/loss_edit", "train/loss_edit_uncond")


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _rows_per_forward(module: torch.nn.Module, seen: list[int]):
    """Record the batch size of each call of ``module`` (the shapes net's first argument, the Qwen-Image
    transformer's ``hidden_states``)."""

    def record(_, args, kwargs):
        seen.append(int((args[0] if args else kwargs["hidden_states"]).shape[0]))

    return module.register_forward_pre_hook(record, with_kwargs=True)


def _opd_shapes(optim=None, **overrides):
    """One OPD update of the tiny shapes model, two tasks of 4 trajectories with K = 2 matched states each,
    the T2I rows split over two teachers: (gradient, weights after the step, metrics, rows of each student
    forward of the update, rows of each teacher forward)."""
    sources = torch.rand(len(EDITS), 3, 32, 32, generator=torch.Generator().manual_seed(9))
    model = tiny_model()
    teachers = {"a": tiny_model(seed=1), "b": tiny_model(seed=3)}
    cfg = OPDConfig(prompts_per_iteration=8, num_steps=3, timesteps=TimestepsConfig(per_trajectory=2),
                    optim=OptimConfig(**{"lr": 1e-3, "grad_clip": NO_CLIP, **(optim or {})}), **overrides)
    trainer = OPDTrainer(model, model.net, teachers, cfg,
                         {"t2i": PromptSet(PROMPTS, ["x", "x", "z", "z"], None),
                          "edit": PromptSet(EDITS, ["y"] * 4, sources)},
                         {"t2i": "a", "edit": "b", "z": "b"}, {"t2i": 0.5, "edit": 0.5}, guidance_scale=3.0)
    batches = trainer.collect(0)  # the sampling forwards (no gradient) are not counted
    student_rows: list[int] = []
    teacher_rows: list[int] = []
    hooks = [_rows_per_forward(model.net, student_rows)]
    hooks += [_rows_per_forward(t.net, teacher_rows) for t in teachers.values()]
    grads = {}
    step = trainer.engine.step
    trainer.engine.step = lambda: grads.update(_grads(model.net)) or step()  # the gradient the step applies
    try:
        metrics = trainer.update(batches, 0)
    finally:
        for hook in hooks:
            hook.remove()
    weights = {k: v.detach().clone() for k, v in model.net.state_dict().items()}
    return grads, weights, metrics, student_rows, teacher_rows


def _assert_same_update(whole, parts) -> None:
    (grads, weights, metrics), (part_grads, part_weights, part_metrics) = whole[:3], parts[:3]
    assert grads.keys() == part_grads.keys() and grads
    assert any(v.abs().max() > 0 for v in grads.values())  # a gradient that can be wrong
    for key, value in grads.items():
        torch.testing.assert_close(part_grads[key], value, atol=1e-6, rtol=1e-5)  # sums of 16 parts or 1
    for key, value in weights.items():
        # AdamW's first step is about lr x sign(g): an element whose gradient is near Adam's eps moves by a
        # fraction of lr that its rounding changes; 1e-5 is 1 % of lr
        torch.testing.assert_close(part_weights[key], value, atol=1e-5, rtol=1e-5)
    for key in LOSSES + ("train/grad_norm",):
        assert part_metrics[key] == pytest.approx(metrics[key], rel=1e-5), key
    assert metrics["train/loss_edit_uncond"] > 0


def test_pair_parts_cut_trajectory_major_pairs():
    parts = pair_parts(torch.tensor([5, 7]), 3, 4)
    assert [(r.tolist(), c.tolist()) for r, c in parts] == [([5, 5, 5, 7], [0, 1, 2, 0]), ([7, 7], [1, 2])]
    assert [(r.tolist(), c.tolist()) for r, c in pair_parts(torch.tensor([2]), 2, 9)] == [([2, 2], [0, 1])]
    with pytest.raises(ValueError, match="per_part must be >= 1"):
        pair_parts(torch.tensor([0]), 2, 0)


@pytest.fixture(scope="module")
def whole():
    return _opd_shapes()


@pytest.mark.parametrize("per_forward", [1, 3])
def test_states_per_forward_takes_the_whole_batch_update(whole, per_forward):
    """8 pairs per task in parts of 1, or of 3, 3 and 2 (parts that cut a trajectory's states apart, and
    teachers' rows split by routing); each student forward holds at most 2 x states_per_forward rows."""
    parts = _opd_shapes(states_per_forward=per_forward)
    _assert_same_update(whole, parts)
    student_rows, teacher_rows = parts[3], parts[4]
    assert whole[3] == [16, 16]  # today's path: one forward per task, 4 trajectories x 2 branches x 2 states
    assert max(student_rows) <= 2 * per_forward and max(teacher_rows) <= 2 * per_forward
    assert sum(student_rows) == sum(teacher_rows) == 2 * 16  # every pair once, both branches
    assert student_rows == {1: [2] * 16, 3: [6, 6, 4] * 2}[per_forward]


def test_states_per_forward_cuts_within_each_micro_batch(whole):
    """micro_batch 3 trajectories (parts of 3 and 1 per task) with states_per_forward 4: the 6 pairs of
    the first part in 4 + 2, the last trajectory's 2 on their own; the same update."""
    both = _opd_shapes(optim={"micro_batch": 3}, states_per_forward=4)
    _assert_same_update(whole, both)
    assert both[3] == [8, 4, 4] * 2
    assert _opd_shapes(states_per_forward=4)[3] == [8, 8] * 2  # without micro_batch: 4 + 4 pairs per task
    # a states_per_forward beyond a micro-batch's pairs leaves micro_batch's parts as they are
    assert _opd_shapes(optim={"micro_batch": 3}, states_per_forward=100)[3] == [12, 4] * 2


def test_unset_keeps_today_s_path(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the pair path ran with states_per_forward unset")

    monkeypatch.setattr(OPDTrainer, "_pair_velocities", refuse)
    _, _, metrics, student_rows, _ = _opd_shapes(optim={"micro_batch": 3})
    assert student_rows == [12, 4] * 2 and metrics["train/loss"] > 0
    assert "states_per_forward" not in _hash_payload(OPDConfig())  # earlier section hashes stay valid
    assert _hash_payload(OPDConfig(states_per_forward=2))["states_per_forward"] == 2


def test_states_per_forward_must_be_positive_naming_the_key(tmp_path):
    from flowrl.config import load_config
    from tests.conftest import write_config

    with pytest.raises(ConfigError, match=r"opd.states_per_forward: expected int >= 1, got 0"):
        load_config(write_config(tmp_path, opd={"states_per_forward": 0}))
    assert load_config(write_config(tmp_path, opd={"states_per_forward": 2})).opd.states_per_forward == 2


# --------------------------------------------------------------------------- the tiny Qwen-Image transformer


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    from tests.models.tiny_qwen_image import build_tiny_qwen_image

    return build_tiny_qwen_image(tmp_path_factory.mktemp("opd_pairs_qwen"), task="edit")


def _opd_qwen(tiny, **overrides):
    """One OPD update of the tiny Qwen-Image student (T2I and edit views of one transformer), one
    trajectory per task matched at all N = 3 states, against two perturbed teachers."""
    from flowrl.models.qwen_image import QwenImageModel
    from tests.rl.test_opd_qwen_image import HEIGHT, WIDTH, _perturbed, _student, _trainer

    teachers = {
        "t2i_teacher": _perturbed(QwenImageModel.from_pretrained(tiny, task="t2i", height=HEIGHT, width=WIDTH), 1),
        "edit_teacher": _perturbed(QwenImageModel.from_pretrained(tiny, task="edit", height=HEIGHT, width=WIDTH), 2),
    }
    student_t2i, student_edit = _student(tiny)
    trainer = _trainer(student_t2i, student_edit, teachers, num_steps=3, optim={"grad_clip": NO_CLIP}, **overrides)
    batches = trainer.collect(0)
    rows: list[int] = []
    hook = _rows_per_forward(student_t2i.transformer, rows)
    grads = {}
    step = trainer.engine.step
    trainer.engine.step = lambda: grads.update(_grads(student_t2i.transformer)) or step()
    try:
        metrics = trainer.update(batches, 0)
    finally:
        hook.remove()
    return grads, metrics, rows


def test_qwen_image_states_per_forward_takes_the_whole_batch_update(tiny_qwen):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        grads, metrics, rows = _opd_qwen(tiny_qwen)
        part_grads, part_metrics, part_rows = _opd_qwen(tiny_qwen, states_per_forward=2)
    finally:
        torch.set_num_threads(threads)
    assert rows == [6, 6] and part_rows == [4, 2, 4, 2]  # 3 pairs per task in parts of 2 and 1
    assert grads.keys() == part_grads.keys() and any(v.abs().max() > 0 for v in grads.values())
    for key, value in grads.items():
        torch.testing.assert_close(part_grads[key], value, atol=1e-6, rtol=1e-4)
    assert metrics["train/loss_edit"] > 0
    for key in LOSSES:  # batches of 2 and 6 rows round differently in the forward
        assert part_metrics[key] == pytest.approx(metrics[key], rel=1e-4), key
