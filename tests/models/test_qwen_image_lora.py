"""LoRA on the tiny Qwen-Image transformer (flowrl/models/lora.py): the adapter starts at the base, the
reference and the base are the transformer with adapters off (no copy), a teacher is a saved adapter
loaded beside the student's, the export merges; GRPO with LoRA keeps the invariants of docs/design.md
(ratio 1 before the first update, resume = uninterrupted, two processes = one).

Run as a script (under torchrun) it takes one LoRA GRPO update: the two-process test below."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from flowrl.config import (ConfigError, GRPOConfig, LoopConfig, OptimConfig, QwenImageLoraConfig,  # noqa: E402
                           RolloutConfig, WindowTimestepsConfig)
from flowrl.models.lora import (  # noqa: E402
    ADAPTER_CONFIG, ADAPTER_WEIGHTS, QWEN_IMAGE_ATTENTION, STUDENT, AdapterView, add_adapter, adapter_layout,
    adapter_parameters, export_merged, load_adapter, save_adapter,
)
from flowrl.models.qwen_image import QwenImageModel  # noqa: E402
from flowrl.rewards.base import RewardScores  # noqa: E402
from flowrl.rl.grpo import GRPOTrainer, PromptSet  # noqa: E402
from tests.models.tiny_qwen_image import TRANSFORMER_CONFIG, build_tiny_qwen_image  # noqa: E402

SIZE = 32
PROMPTS = ["a red circle left of a blue square", "two green triangles", "a yellow circle", "three blue squares"]


class Brightness:
    """A deterministic reward with a spread inside every group: mean brightness of the image."""

    def submit(self, images, prompts, sources=None) -> Future:
        done: Future = Future()
        value = images.float().mean(dim=(1, 2, 3))
        done.set_result(RewardScores(value, {"brightness": value}))
        return done


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("lora_qwen"), task="edit")


@pytest.fixture(scope="module", autouse=True)
def one_thread():  # the tiny components train single-threaded (as on a CI core)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lora_views(tiny, rank: int = 4, seed: int = 0, task: str = "t2i"):
    """(policy, its adapter module, the base) around one tiny transformer with a fresh adapter."""
    model = QwenImageModel.from_pretrained(tiny, task=task, height=SIZE, width=SIZE)
    network = model.transformer
    add_adapter(network, QwenImageLoraConfig(rank=rank), seed=seed)
    module = AdapterView(network, STUDENT)
    return model.with_transformer(module), module, model.with_transformer(AdapterView(network, None))


def _inputs(model, n=2):
    cond = model.encode_prompts(PROMPTS[:n])
    x = model.prepare_noise(n, torch.Generator().manual_seed(0))
    return x, torch.tensor([0.8, 0.3][:n]), cond


def _perturb(module, seed=1, scale=0.1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * scale)


def test_the_adapter_starts_at_the_base_and_the_reference_is_the_base_without_a_copy(tiny):
    plain = QwenImageModel.from_pretrained(tiny, task="t2i", height=SIZE, width=SIZE)
    x, t, cond = _inputs(plain)
    expected = plain.velocity(x, t, cond)
    policy, module, base = lora_views(tiny)
    assert base.transformer.network is policy.transformer.network  # one transformer behind both
    # the trained parameters are the adapter's alone: rank x (in + out) per targeted linear, in fp32
    width = TRANSFORMER_CONFIG["num_attention_heads"] * TRANSFORMER_CONFIG["attention_head_dim"]
    targeted = len(QWEN_IMAGE_ATTENTION) * TRANSFORMER_CONFIG["num_layers"]
    assert sum(p.numel() for p in module.parameters()) == targeted * 4 * (width + width)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in module.parameters())
    frozen = [p for n, p in module.network.named_parameters() if "lora_" not in n]
    assert frozen and not any(p.requires_grad for p in frozen)
    assert torch.equal(policy.velocity(x, t, cond), expected)  # lora_B starts at zero
    _perturb(module)
    moved = policy.velocity(x, t, cond)
    assert (moved - expected).abs().max() > 1e-3
    assert torch.equal(base.velocity(x, t, cond), expected)  # adapters off: the base, bit for bit
    assert torch.equal(policy.velocity(x, t, cond), moved)  # and the switch is undone
    assert all(p.requires_grad for p in module.parameters())  # without touching the trained flags
    # the EMA's copy holds the adapter weights and shares the transformer
    import copy

    shadow = copy.deepcopy(module)
    assert shadow.network is module.network and shadow.state_dict().keys() == module.state_dict().keys()


def test_a_saved_adapter_loads_as_a_frozen_teacher_beside_the_student(tiny, tmp_path):
    policy, module, base = lora_views(tiny)
    _perturb(module)
    x, t, cond = _inputs(policy)
    trained = policy.velocity(x, t, cond)
    save_adapter(module.network, tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    assert adapter_layout(tmp_path / "adapter") == {"rank": 4, "alpha": 4, "target_modules": sorted(QWEN_IMAGE_ATTENTION)}
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert saved.keys() == get_peft_model_state_dict(module.network, adapter_name=STUDENT).keys()  # peft's layout

    student, _, _ = lora_views(tiny, seed=5)  # another fresh student on another transformer
    network = student.transformer.network
    load_adapter(network, tmp_path / "adapter", "t2i_teacher")
    teacher = student.with_transformer(AdapterView(network, "t2i_teacher"))
    assert torch.equal(teacher.velocity(x, t, cond), trained)
    assert not any(p.requires_grad for p in adapter_parameters(network, "t2i_teacher").values())
    assert all(p.requires_grad for p in student.transformer.parameters())
    assert torch.equal(student.velocity(x, t, cond), base.velocity(x, t, cond))  # its own adapter: still zero
    with pytest.raises(ValueError, match="already holds an adapter named 't2i_teacher'"):
        load_adapter(network, tmp_path / "adapter", "t2i_teacher")
    with pytest.raises(ValueError, match="holds no adapter 'nobody'"):
        AdapterView(network, "nobody")


def test_the_export_merges_the_adapter_into_a_plain_transformer(tiny, tmp_path):
    from diffusers import QwenImageTransformer2DModel

    policy, module, _ = lora_views(tiny)
    _perturb(module)
    x, t, cond = _inputs(policy)
    trained = policy.velocity(x, t, cond)
    export_merged(module.network, tmp_path / "transformer")
    merged = QwenImageTransformer2DModel.from_pretrained(str(tmp_path / "transformer"))
    assert not any("lora" in k for k in merged.state_dict())
    torch.testing.assert_close(policy.with_transformer(merged).velocity(x, t, cond), trained, atol=1e-5, rtol=1e-5)


def test_bad_lora_settings_are_refused_naming_the_key(tiny, tmp_path):
    model = QwenImageModel.from_pretrained(tiny, task="t2i", height=SIZE, width=SIZE)
    with pytest.raises(ValueError, match=r"model.qwen_image.lora.target_modules: 'to_qq' names no linear layer"):
        add_adapter(model.transformer, QwenImageLoraConfig(rank=2, target_modules=("to_q", "to_qq")), seed=0)
    from tests.conftest import write_config

    from flowrl.config import load_config

    base = {"model": {"family": "qwen_image", "qwen_image": {"pretrained": str(tiny), "lora": {"rank": 8}}},
            "filter": {"t2i_prompts": "a.parquet", "edit_prompts": "b.parquet"},
            "bench": {"scorer": "reward_models", "t2i_prompts": "c.parquet", "edit_prompts": "d.parquet"},
            "grpo": {"monitor_reward": "pairwise", "optim": {"zero_stage": 0}}, "opd": {"optim": {"zero_stage": 0}}}
    config = load_config(write_config(tmp_path, scenario="qwen_image.yaml", **base))
    assert config.model.qwen_image.lora.rank == 8 and config.model.qwen_image.lora.alpha is None
    zero2 = load_config(write_config(tmp_path, scenario="qwen_image.yaml", **{**base, "grpo": {
        **base["grpo"], "optim": {"zero_stage": 2}}}))
    assert zero2.grpo.optim.zero_stage == 2  # the adapters' optimizer states partitioned: allowed
    for section, values, message in (
            ("grpo", {"optim": {"zero_stage": 3}}, r"grpo.optim.zero_stage: 3 with LoRA"),
            ("opd", {"optim": {"zero_stage": 3}}, r"opd.optim.zero_stage: 3 with LoRA"),
            ("grpo", {"trainable": ["transformer_blocks.*"]}, r"grpo.trainable: .* only the adapters train"),
            ("grpo", {"reference_device": "cpu"}, r"grpo.reference_device: cpu places the full-parameter")):
        with pytest.raises(ConfigError, match=message):
            load_config(write_config(tmp_path, scenario="qwen_image.yaml", **{**base, section: {
                **base.get(section, {}), **values}}))
    with pytest.raises(ConfigError, match=r"model.qwen_image.lora.rank: expected int >= 0, got -1"):
        load_config(write_config(tmp_path, scenario="qwen_image.yaml", **{**base, "model": {
            "family": "qwen_image", "qwen_image": {"pretrained": str(tiny), "lora": {"rank": -1}}}}))


# --------------------------------------------------------------------------- GRPO with LoRA


def _grpo_cfg(optim=None, timesteps=None, loop=None, rollout=None, **overrides) -> GRPOConfig:
    """``optim``, ``timesteps``, ``loop``, ``rollout``: keys of those subsections of grpo over the test's own."""
    settings = dict(prompts_per_iteration=2, group_size=2, reward_chunks=1, kl_coef=0.1)
    settings.update(overrides)
    return GRPOConfig(**settings, rollout=RolloutConfig(**{"num_steps": 2, **(rollout or {})}),
                      loop=LoopConfig(**{"iterations": 2, "checkpoint_every": 1, "eval_every": 100, **(loop or {})}),
                      timesteps=WindowTimestepsConfig(**{"fraction": 1.0, "per_trajectory": 1, **(timesteps or {})}),
                      optim=OptimConfig(**{"lr": 1e-2, **(optim or {})}))


def _lora_trainer(tiny, cfg, checkpoints=None):
    policy, module, base = lora_views(tiny)
    trainer = GRPOTrainer(policy, module, base, cfg, PromptSet(PROMPTS[:2], ["a", "b"], None), Brightness(),
                          lambda prompts: torch.ones(len(prompts), 1), checkpoints=checkpoints)
    return trainer, module


def test_grpo_with_lora_starts_at_ratio_one_and_zero_kl_and_trains_only_the_adapter(tiny):
    trainer, module = _lora_trainer(tiny, _grpo_cfg())
    base_weights = {n: p.detach().clone() for n, p in module.network.named_parameters() if "lora_" not in n}
    start = {k: v.clone() for k, v in module.state_dict().items()}
    trainer.train(progress=False)
    first, second = trainer.state.history
    # before the first update the training path reproduces the rollout's log-probs, and the policy is the base
    assert first["train/ratio_dev"] < 1e-5 and first["train/kl"] == 0.0
    assert second["train/kl"] > 0  # after it, the adapter has moved away from the base the KL sees
    assert any(not torch.equal(start[k], v) for k, v in module.state_dict().items())
    after = dict(module.network.named_parameters())
    assert all(torch.equal(after[n], value) for n, value in base_weights.items())  # the base never moves
    stepped = {id(p) for p in trainer.engine.optimizer.state}
    assert stepped and stepped <= {id(p) for p in module.parameters()}  # AdamW state for adapter weights only


def test_grpo_with_lora_under_deepspeed_zero_2_takes_the_plain_update(tiny):
    pytest.importorskip("deepspeed")
    results = {}
    for zero in (0, 2):
        trainer, _ = _lora_trainer(tiny, _grpo_cfg(optim={"zero_stage": zero, "lr": 1e-3},
                                                   loop={"checkpoint_every": 100}))
        results[zero] = trainer.train(progress=False), trainer.state.history
    (plain, plain_history), (sharded, sharded_history) = results[0], results[2]
    assert plain.module_state.keys() == sharded.module_state.keys()
    assert [h["train/loss"] for h in plain_history] == pytest.approx([h["train/loss"] for h in sharded_history],
                                                                     rel=1e-5, abs=1e-9)
    for key, value in plain.module_state.items():
        torch.testing.assert_close(sharded.module_state[key], value, atol=3e-5, rtol=1e-4)


def test_grpo_with_lora_resumes_exactly_from_adapter_only_checkpoints(tiny, tmp_path):
    from safetensors.torch import load_file

    from flowrl.rl.trainer import Checkpoints
    from flowrl.storage import ArtifactStore

    def run(root, stop_after=None, resume=False):
        trainer, module = _lora_trainer(tiny, _grpo_cfg(), Checkpoints(ArtifactStore(str(root)), "grpo_t2i", "v"))
        if resume:
            assert trainer.resume() and trainer.state.iteration == 1
        trainer.train(progress=False, stop_after=stop_after)
        return trainer, module

    whole, whole_module = run(tmp_path / "whole")
    run(tmp_path / "resumed", stop_after=1)
    resumed, resumed_module = run(tmp_path / "resumed", resume=True)
    assert resumed.state.iteration == 2
    for key, value in whole_module.state_dict().items():
        assert torch.equal(resumed_module.state_dict()[key], value), key
    assert [h["train/loss"] for h in resumed.state.history] == [h["train/loss"] for h in whole.state.history]
    # a checkpoint holds the adapter, not the transformer
    files = sorted((tmp_path / "resumed").rglob("*.safetensors"))
    assert files
    for file in files:
        assert set(load_file(file)) <= set(whole_module.state_dict()), file
    adapter_bytes = sum(v.numel() * v.element_size() for v in whole_module.state_dict().values())
    assert max(f.stat().st_size for f in files) < 2 * adapter_bytes


# --------------------------------------------------------------------------- the stages

from tests.stages.test_production_path import _qwen_config  # noqa: E402  (production: tests/conftest.py)


@pytest.mark.slow
def test_grpo_and_opd_stages_train_adapters_and_commit_merged_transformers(production, caplog):
    """The production chain with LoRA (rank 4), the text encoder on the CPU, one trajectory per forward and
    gradient checkpointing: GRPO starts at ratio 1 and zero KL (the base with adapters off is the reference),
    scores the same base as full-parameter GRPO, and commits its adapter beside the merged transformer; OPD
    loads both teachers as adapters on the student's transformer and commits the same layout."""
    import logging

    from flowrl.models import load_policy
    from flowrl.stages.base import run_base
    from flowrl.stages.grpo import run_grpo
    from flowrl.stages.opd import run_opd
    from flowrl.storage import fetch

    root, config, base, rm, filtered, (labels, weights, vlm, prompts) = production
    qwen = {"pretrained": str(weights), "edit_pretrained": str(weights), "height": SIZE, "width": SIZE,
            "dtype": "float32"}
    lora = _qwen_config(root / "lora", labels, weights, vlm, prompts,
                        model={"qwen_image": {**qwen, "lora": {"rank": 4}, "text_encoder_device": "cpu"}},
                        grpo={"optim": {"micro_batch": 1, "gradient_checkpointing": True}},
                        opd={"teacher_devices": [],
                             "optim": {"micro_batch": 1, "gradient_checkpointing": True, "ema_decay": 0.5}})
    lora_base = run_base(lora, progress=False)
    teachers = {f"{t}_teacher": run_grpo(lora, t, lora_base.uri, rm.uri, filtered[t].uri, progress=False)
                for t in ("t2i", "edit")}
    t2i = teachers["t2i_teacher"]
    first = json_history(t2i.uri)[0]
    assert first["train/ratio_dev"] < 1e-5 and first["train/kl"] == 0.0
    plain = run_grpo(config, "t2i", base.uri, rm.uri, filtered["t2i"].uri, progress=False)
    assert t2i.version != plain.version and t2i.metrics["base"] == pytest.approx(plain.metrics["base"], rel=1e-5)
    local = fetch(t2i.uri)
    assert {p.name for p in (local / "adapter").iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    # the committed transformer is the base with the committed adapter merged in
    merged = load_policy(local, lora, "t2i")
    adapted = QwenImageModel.from_pretrained(weights, task="t2i", height=SIZE, width=SIZE)
    load_adapter(adapted.transformer, local / "adapter", "teacher")
    adapted = adapted.with_transformer(AdapterView(adapted.transformer, "teacher"))
    x, t, cond = _inputs(adapted)
    assert (adapted.velocity(x, t, cond) - QwenImageModel.from_pretrained(
        weights, task="t2i", height=SIZE, width=SIZE).velocity(x, t, cond)).abs().max() > 0  # it trained
    torch.testing.assert_close(merged.velocity(x, t, cond), adapted.velocity(x, t, cond), atol=1e-5, rtol=1e-5)

    with caplog.at_level(logging.INFO, logger="flowrl.stages.opd"):
        student = run_opd(lora, lora_base.uri, {k: v.uri for k, v in teachers.items()},
                          {t: filtered[t].uri for t in ("t2i", "edit")}, progress=False)
    for name in teachers:
        assert f"opd: teacher {name} is its LoRA adapter on the student's network" in caplog.text
    assert student.metrics["iterations"] == 2
    local = fetch(student.uri)
    assert {"adapter", "transformer", "reference.json"} <= {p.name for p in local.iterdir()}
    assert load_policy(local, lora, "edit").task == "edit"


def json_history(uri: str) -> list[dict]:
    import json

    from flowrl.storage import fetch

    return json.loads((fetch(uri) / "history.json").read_text())["history"]


# --------------------------------------------------------------------------- two processes = one

LORA_DDP_PROMPTS = 4


def _ddp_update(tiny: str, micro: bool) -> dict[str, torch.Tensor]:
    """One LoRA GRPO update (KL on) on a fixed global batch; this rank's share of the prompt groups.
    ``micro``: one trajectory per forward and gradient checkpointing."""
    from flowrl.rl.distributed import dist_info
    from tests.rl.ddp_update import _task_batch

    rank, world = dist_info()
    cfg = _grpo_cfg(prompts_per_iteration=LORA_DDP_PROMPTS, rollout={"num_steps": 3}, timesteps={"per_trajectory": 2},
                    optim={"lr": 1e-3, "micro_batch": 1 if micro else None, "gradient_checkpointing": micro})
    policy, module, base = lora_views(tiny)
    trainer = GRPOTrainer(policy, module, base, cfg, PromptSet(PROMPTS, ["x"] * 4, None), Brightness(),
                          lambda prompts: torch.ones(len(prompts), 1))
    trainer.update({"": _task_batch(policy, cfg, PROMPTS, None, rank, world, 5)}, iteration=0)
    names = [n for n, _ in module.named_parameters()]
    out = {k: v.detach().clone() for k, v in trainer.engine.full_state_dict().items()}
    for i, entry in trainer.engine.optimizer_state()["state"].items():
        out[f"grad.{names[i]}"] = entry["exp_avg"] / 0.1  # AdamW's first moment after one step
    return out


def test_two_processes_with_micro_batches_and_checkpointing_take_the_single_process_lora_update(tiny, tmp_path):
    from safetensors.torch import load_file

    from flowrl.rewards.server import free_port
    from tests.conftest import ROOT

    single = _ddp_update(str(tiny), micro=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    out = tmp_path / "two.safetensors"
    for _ in range(2):  # the port was free when picked; another process may take it
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), __file__, str(out), str(tiny)],
            capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    assert proc.returncode == 0, proc.stderr[-3000:]
    double = load_file(out)
    assert double.keys() == single.keys() and any(k.startswith("grad.") for k in single)
    assert any(single[k].abs().max() > 0 for k in single if k.startswith("grad."))  # the update did something
    for key, value in single.items():
        torch.testing.assert_close(double[key], value, atol=1e-6 if key.startswith("grad.") else 1e-5, rtol=1e-5)


if __name__ == "__main__":
    from safetensors.torch import save_file

    from flowrl.rl.distributed import dist_info, init_from_env, shutdown

    torch.set_num_threads(1)
    init_from_env()
    tensors = _ddp_update(sys.argv[2], micro=True)
    if dist_info()[0] == 0:
        save_file({k: v.contiguous() for k, v in tensors.items()}, sys.argv[1])
    shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as tests/rl/ddp_update.py: skip the interpreter's teardown after the group is gone
