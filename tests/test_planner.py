"""The memory planner: hand-computed cases, and the static estimate against the real tensors."""

import pytest
import torch

from flowrl.planner import GiB, Setting, TrainedModel, estimate, plan
from tests.rl.conftest import tiny_model


def test_static_estimate_equals_the_real_tensors_after_one_step():
    model = tiny_model()
    net = model.net
    params = list(net.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.float().pow(2).sum() for p in params).backward()
    opt.step()
    real = sum(p.numel() * p.element_size() for p in params)  # weights
    real += sum(p.grad.numel() * p.grad.element_size() for p in params)  # gradients
    real += sum(t.numel() * t.element_size() for state in opt.state.values() for t in state.values())  # AdamW
    trained = TrainedModel(parameters=sum(p.numel() for p in params), tensors=len(params))
    est = estimate(trained, Setting(), gpus=1, dtype="float32")
    assert est.master_weights == 0  # fp32 training keeps no second copy
    assert est.model_states == real


def test_zero_stages_shard_what_they_should():
    m = TrainedModel(parameters=1_000_000_000, tensors=100)
    base = estimate(m, Setting(zero_stage=0), gpus=8)  # bf16: 2 + 4 (master) + 2 + 8 bytes per parameter
    assert (base.weights, base.master_weights, base.gradients) == (2e9, 4e9, 2e9)
    assert base.optimizer == 8e9 + 400
    z1 = estimate(m, Setting(zero_stage=1), gpus=8)
    assert (z1.weights, z1.master_weights, z1.gradients, z1.optimizer) == (2e9, 0.5e9, 2e9, (8e9 + 400) / 8)
    z2 = estimate(m, Setting(zero_stage=2), gpus=8)
    assert z2.gradients == 0.25e9 and z2.weights == 2e9
    z3 = estimate(m, Setting(zero_stage=3), gpus=8, frozen_parameters=8_000_000_000)
    assert z3.weights == 0.25e9 and z3.frozen == 2e9  # frozen weights shard under ZeRO-3 too
    off = estimate(m, Setting(zero_stage=2, offload_optimizer=True), gpus=8)
    assert off.optimizer == 0 and off.master_weights == 0


def test_activations_by_hand():
    m = TrainedModel(parameters=10, tensors=1, hidden=64, layers=4)
    plain = estimate(m, Setting(micro_batch=2), gpus=1, tokens_per_sample=100)
    assert plain.activations == 2 * 100 * 64 * 4 * 2 * 34
    recompute = estimate(m, Setting(micro_batch=2, gradient_checkpointing=True), gpus=1, tokens_per_sample=100)
    assert recompute.activations == 2 * 100 * 64 * 4 * 2 * 2


def test_plan_takes_the_cheapest_setting_that_fits():
    small = TrainedModel(parameters=100_000_000, tensors=200, hidden=1024, layers=24)
    setting, est = plan(small, gpus=8, gpu_mem_gib=80, tokens_per_sample=4096)
    assert setting == Setting(0, False, False, 8)  # fits without any saving
    big = TrainedModel(parameters=20_000_000_000, tensors=1000, hidden=3072, layers=60)  # Qwen-Image-sized
    setting, est = plan(big, gpus=8, gpu_mem_gib=80, frozen_parameters=27_000_000_000, tokens_per_sample=4096)
    assert setting.zero_stage == 3 and est.total <= 0.85 * 80 * GiB
    # 20 B parameters do not fit one 80 GB GPU even with the optimizer offloaded: None says so
    assert plan(big, gpus=1, gpu_mem_gib=80) is None


def test_bad_inputs():
    with pytest.raises(ValueError, match="dtype"):
        estimate(TrainedModel(1, 1), Setting(), gpus=1, dtype="int8")
    with pytest.raises(ValueError, match="zero_stage"):
        estimate(TrainedModel(1, 1), Setting(zero_stage=4), gpus=1)
    with pytest.raises(ValueError, match="gpus"):
        estimate(TrainedModel(1, 1), Setting(), gpus=0)


def test_qwen_image_counts_come_from_the_config_files_alone(tmp_path):
    from flowrl.models.qwen_image import QwenImageModel
    from flowrl.planner import qwen_image_components
    from tests.models.tiny_qwen_image import build_tiny_qwen_image

    path = build_tiny_qwen_image(tmp_path / "tiny", task="t2i")
    counts = qwen_image_components(str(path))  # meta device: no weights read
    real = QwenImageModel.from_pretrained(path, task="t2i", height=32, width=32)
    for name in ("transformer", "vae", "text_encoder"):
        params = list(getattr(real, name).parameters())
        assert counts[name] == (sum(p.numel() for p in params), len(params)), name


def test_flowrl_plan_prints_a_row_per_training_stage(tmp_path):
    from flowrl.cli import main
    from tests.conftest import ROOT

    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", "--config", str(ROOT / "configs" / "shapes.yaml"), "--gpus", "2", "--gpu-mem", "1"]) == 0
    text = out.getvalue()
    assert "| grpo | policy + reference (KL) |" in text and "| opd | student + 2 teachers |" in text
    assert "does not fit" not in text


def test_task_requests_by_hand():
    """GRPO on the shapes model, 2 GPUs: no offload is needed, so host memory is the
    per-process base plus one copy of the weights (policy + reference) being loaded."""
    import math

    from flowrl.config import load_config
    from flowrl.planner import GiB, HOST_BASE_BYTES, stage_loads, task_requests
    from tests.conftest import ROOT

    config = load_config(ROOT / "configs" / "shapes.yaml")
    requests, setting = task_requests(config, "grpo", 2, 1.0)
    load = next(x for x in stage_loads(config) if x.stage == "grpo")
    host = 2 * HOST_BASE_BYTES + (load.trained.parameters + load.frozen_parameters) * 4
    assert not setting.offload_optimizer
    assert requests == {"gpu": "2", "cpu": "16", "mem": f"{math.ceil(host / GiB)}Gi"}
    with pytest.raises(ValueError, match="no setting fits"):
        task_requests(config, "opd", 1, 1e-6)
    with pytest.raises(ValueError, match="no training stage 'bench'"):
        task_requests(config, "bench", 1, 80)


def test_flowrl_plan_names_the_key_when_the_pretrained_configs_cannot_be_read(tmp_path, capsys):
    from flowrl.cli import main
    from tests.conftest import write_config

    path = write_config(tmp_path, scenario="qwen_image.yaml",
                        model={"family": "qwen_image", "qwen_image": {"pretrained": str(tmp_path / "missing")}})
    assert main(["plan", "--config", str(path), "--gpus", "8", "--gpu-mem", "80"]) != 0
    err = capsys.readouterr().err
    assert "model.qwen_image.pretrained: cannot read the component configs" in err and "Traceback" not in err
