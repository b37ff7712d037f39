"""The memory planner: each term on hand-computed cases, the activation model against the tensors autograd
really keeps, LoRA against full parameters, advice that is config keys, the production config's plan, the
host requests, and the measurement machinery of bench/planner_validation.py on a small width."""

import contextlib
import io
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from flowrl.planner import (
    GiB, HOST_BASE_BYTES, TERM_LABELS, ZERO3_MAX_LIVE_PARAMETERS, ZERO_REDUCE_BUCKET_ELEMENTS, Batch, Network, Setting,
    Workload, activation_bytes, check_budget, configured_setting, estimate, families, model_state, network_of, plan,
    plan_table, stage_workloads, task_requests,
)
from tests.conftest import ROOT

QWEN_YAML = ROOT / "configs" / "qwen_image.yaml"
BILLION = 1_000_000_000
PLAIN = Network(parameters=BILLION, tensors=100, largest=10_000_000, layers=10, hidden=1024, qwen=False)


def _workload(network=PLAIN, **overrides) -> Workload:
    fields = dict(stage="grpo", network=network, dtype="bfloat16", train_trajectories=1, rows_per_trajectory=1,
                  image_tokens=0, text_tokens=0, sample_rows=0)
    return Workload(**{**fields, **overrides})


# --------------------------------------------------------------------------- the terms, by hand


def test_zero3_shards_everything_the_optimizer_steps():
    """1 B bf16 parameters on 8 GPUs under ZeRO-3: weights 2 GB / 8 = 0.25 GB; fp32 masters, gradient
    partitions and the EMA 4 GB / 8 = 0.5 GB; AdamW 8 GB / 8 = 1 GB; DeepSpeed's fp32 bucket 5e8 x 4 B."""
    state = model_state(PLAIN, Setting(zero_stage=3), gpus=8, w=2, ema=True, platform="cuda")
    assert state["resident"] == {"weights": 0.25e9, "masters": 0.5e9, "adam": 1e9, "ema": 0.5e9, "grads": 0.5e9,
                                 "buffers": ZERO_REDUCE_BUCKET_ELEMENTS * 4}
    assert state["step"] == {"grads": 0.5e9, "step": 0.5e9}  # the flat fp32 gradient, foreach AdamW's sqrt
    assert state["backward"]["buffers"] == min(BILLION, ZERO3_MAX_LIVE_PARAMETERS) * 2  # gathered layers
    assert state["reduction"]["buffers"] == 5e8 * 4  # one bucket reduced in fp32
    assert state["checkpoint"] == {"checkpoint": 0.0}  # every rank streams its shard
    cpu = model_state(PLAIN, Setting(zero_stage=3), gpus=8, w=2, ema=False, platform="cpu")
    assert cpu["step"]["step"] == 1e9 and cpu["reduction"]["buffers"] == 4e9  # two temporaries; gloo's copy
    assert cpu["export"]["export"] == 2e9 + 2 * 10_000_000 * 2  # rank 0's host copy, one gathered tensor


def test_zero2_keeps_whole_weights_and_reduces_a_bucket_at_a_time():
    state = model_state(PLAIN, Setting(zero_stage=2), gpus=8, w=2, ema=False, platform="cuda")
    assert state["resident"] == {"weights": 2e9, "masters": 0.5e9, "adam": 1e9}
    assert state["backward"] == {"grads": 10_000_000 * 2, "buffers": 1e9}  # a parameter's gradient, the bucket
    # the bucket, its 5e8 elements flattened (bf16) and cast to fp32, and the fp32 partition they land in
    assert state["reduction"] == {"buffers": 1e9 + 5e8 * 6, "grads": 0.5e9}
    assert state["setup"]["buffers"] == 2e9  # the weights flattened into one buffer


def test_plain_pytorch_steps_in_the_training_dtype_and_ddp_adds_its_buckets():
    one = model_state(PLAIN, Setting(), gpus=1, w=2, ema=False, platform="cuda")
    assert one["resident"] == {"weights": 2e9, "grads": 2e9, "adam": 4e9}  # bf16 moments, no fp32 masters
    two = model_state(PLAIN, Setting(), gpus=2, w=2, ema=True, platform="cuda")
    assert two["resident"]["buffers"] == 2e9 and two["resident"]["ema"] == 4e9  # DDP buckets; fp32 averages
    assert one["step"]["step"] == 2e9  # foreach AdamW: sqrt of every second moment at once


def test_the_real_transformer_by_its_config():
    """Qwen-Image from its shipped config: 20.43 B parameters in 60 blocks of width 3072; LoRA on the
    attention projections of both streams: 8 linears of 3072 -> 3072 per block, rank x (3072 + 3072) each."""
    from flowrl.config import QwenImageLoraConfig
    from flowrl.planner import qwen_image_network

    net = qwen_image_network("Qwen/Qwen-Image", tuple(QwenImageLoraConfig().target_modules))  # the meta device
    assert (net.layers, net.hidden, net.joint_dim) == (60, 3072, 3584)
    assert net.parameters == 20_430_401_088
    assert net.lora_fan == 60 * 8 * (3072 + 3072) and net.adapters(64) == 188_743_680
    assert net.lora_inputs == (4 * 3072, 4 * 3072) and net.lora_linears == (4, 4)
    # the last block's text stream feeds nothing: its output projection and MLP get no gradient
    assert net.unused == (3072 * 3072 + 3072) + (12288 * 3072 + 12288) + (3072 * 12288 + 3072)
    assert net.lora_unused_fan == 3072 + 3072  # the adapter on that to_add_out


def test_lora_holds_the_base_once_and_trains_fp32_adapters():
    net = Network(parameters=BILLION, tensors=100, largest=10_000_000, layers=10, hidden=1024, lora_fan=1000,
                  lora_width=1024)
    workload = _workload(net, kl=True, teachers=("a", "b"), stage="opd")
    lora = estimate(workload, Setting(lora_rank=64), gpus=8)
    full = estimate(workload, Setting(zero_stage=2), gpus=8)
    adapters = 64 * 1000
    assert lora.resident["weights"] == 2e9 + 4 * adapters
    assert (lora.resident["grads"], lora.resident["adam"], lora.resident["buffers"]) == (
        4 * adapters, 8 * adapters, 4 * adapters)  # fp32 gradients, moments, DDP buckets
    assert lora.resident["reference"] == 0 and full.resident["reference"] == 2e9  # the base with adapters off
    assert lora.resident["teachers"] == 2 * 4 * adapters and full.resident["teachers"] == 2 * 2e9
    offloaded = estimate(workload, Setting(zero_stage=2, reference_device="cpu", teachers_on_cpu=("a",),
                                           text_encoder_device="cpu"), gpus=8)
    assert offloaded.resident["reference"] == 0 and offloaded.resident["teachers"] == 2e9
    assert offloaded.host == 2e9 + 2e9  # the reference and teacher a, in host memory
    # LoRA under ZeRO-2 (the shipped setting): DeepSpeed partitions the adapters' fp32 states, and its gradient
    # bucket takes their dtype: 5e8 x 4 B, however small the adapters
    zero2 = estimate(workload, Setting(lora_rank=64, zero_stage=2), gpus=8)
    assert zero2.resident["weights"] == lora.resident["weights"]
    assert (zero2.resident["masters"], zero2.resident["adam"]) == (4 * adapters / 8, 8 * adapters / 8)
    assert zero2.phases["forward/backward"]["buffers"] == ZERO_REDUCE_BUCKET_ELEMENTS * 4
    with pytest.raises(ValueError, match="zero_stage 0, 1 or 2"):
        estimate(workload, Setting(lora_rank=8, zero_stage=3), gpus=8)


def test_rewards_served_elsewhere_leave_only_the_monitor_which_loads_for_its_scoring():
    workload = _workload(scorer=BILLION, scorer_dtype="bfloat16", colocated_scorers=3, monitor_scorers=1,
                         scorer_tokens=100, scorer_geometry=(10, 20))
    scoring = 8 * 100 * (3 * 10 + 3 * 20) * 2  # a batch of 8 inputs: one layer's streams and MLP temporaries
    here = estimate(workload, Setting(), gpus=1)
    assert here.resident["reward_models"] == 3 * 2e9
    assert here.phases["monitor scoring"] == {"reward_models": 2e9 + scoring}
    apart = estimate(workload, Setting(shared_rewards=True, reward_gpus=1), gpus=1)
    assert apart.resident["reward_models"] == 0 and apart.term("reward_models") == 2e9 + scoring


def test_a_reward_server_takes_the_fewest_gpus_its_scorers_fit():
    from flowrl.planner import reward_gpus_needed, reward_server_bytes

    workload = _workload(scorer=10 * GiB // 2, scorer_dtype="bfloat16", colocated_scorers=3,
                         scorer_tokens=0, scorer_geometry=(0, 0))  # 10 GiB each, no working set
    assert reward_server_bytes(workload, 2) == 2 * 10 * GiB  # round-robin: two on the first GPU
    assert reward_gpus_needed(workload, 30 * GiB) == 1
    assert reward_gpus_needed(workload, 29 * GiB) == 2
    assert reward_gpus_needed(workload, 19 * GiB) == 3
    assert reward_gpus_needed(workload, 9 * GiB) is None


def test_sampling_in_parts_bounds_the_rollout_forward_and_the_vae_decode():
    """A rollout chunk of 16 trajectories with CFG (32 rows): rollout_micro_batch 4 runs 8 rows a forward,
    decode_batch 1 decodes one image at a time; the held-out monitor samples eval.batch_size prompts."""
    from flowrl.planner import decode_bytes, no_grad_bytes

    net = Network(parameters=BILLION, tensors=10, largest=BILLION // 10, layers=4, hidden=64, qwen=True)
    workload = _workload(net, image_tokens=100, text_tokens=20, sample_rows=32, sample_unit=2, decode_images=16,
                         pixels=64 * 64, vae_base_dim=8, monitor_images=8)
    w = 2

    def sampling(setting):
        return estimate(workload, setting, gpus=1).phases["sampling"]["sampling"]

    rows = lambda n: no_grad_bytes(net, Batch(n, 100, 20), w)  # noqa: E731
    assert sampling(Setting()) == max(rows(32), decode_bytes(workload, 16, w))
    assert sampling(Setting(rollout_micro_batch=4, decode_batch=1)) == max(rows(8), decode_bytes(workload, 1, w))
    assert sampling(Setting(rollout_micro_batch=100)) == sampling(Setting())  # more than the chunk: the chunk
    monitor = estimate(workload, Setting(monitor_batch=2, decode_batch=1), gpus=1).phases["monitor"]["monitor"]
    assert monitor == max(rows(4), decode_bytes(workload, 1, w))
    assert decode_bytes(workload, 16, w) == 16 * decode_bytes(workload, 1, w)


def test_opd_states_per_forward_bound_the_rows_of_a_training_forward():
    workload = _workload(stage="opd", train_trajectories=4, rows_per_trajectory=8)  # 4 states x 2 branches
    assert workload.batch(None).rows == 32 and workload.batch(2).rows == 16
    assert workload.batch(None, 3).rows == 6 and workload.batch(1, 1).rows == 2
    assert workload.batch(None, 100).rows == 32
    net = Network(parameters=10, tensors=1, largest=10, layers=4, hidden=64, qwen=False)
    small = _workload(net, stage="opd", train_trajectories=4, rows_per_trajectory=8, image_tokens=10)
    acts = [estimate(small, Setting(states_per_forward=s), gpus=1).phases["forward/backward"]["activations"]
            for s in (None, 2, 1)]
    assert acts[0] == 16 * acts[2] and acts[1] == 2 * acts[2]  # per row: 32, 4 and 2 rows


def test_an_offloaded_text_encoder_is_on_the_gpu_while_it_encodes_only():
    from flowrl.planner import encoding_bytes

    workload = _workload(text_encoder=BILLION, encoder=(2, 16, 32), encode_rows=4, encode_tokens=10)
    ws = 4 * 10 * (3 * 16 + 3 * 32) * 2  # hidden states of every layer and the input, one MLP's temporaries
    assert encoding_bytes(workload, 2) == ws
    same = estimate(workload, Setting(), gpus=1)
    assert same.resident["text_encoder"] == 2e9 and same.phases["text encoding"] == {"encoding": ws}
    offload = estimate(workload, Setting(text_encoder_device="offload"), gpus=1)
    assert offload.resident["text_encoder"] == 0 and offload.host == 2e9
    assert offload.phases["text encoding"] == {"encoding": ws, "text_encoder": 2e9}
    on_cpu = estimate(workload, Setting(text_encoder_device="cpu"), gpus=1)
    assert on_cpu.resident["text_encoder"] == 0 and "text encoding" not in on_cpu.phases and on_cpu.host == 2e9


def test_the_peak_is_the_largest_phase_over_the_resident_terms():
    workload = _workload(train_trajectories=4, rows_per_trajectory=2, image_tokens=100, text_tokens=10,
                         sample_rows=8)
    est = estimate(workload, Setting(zero_stage=2), gpus=8)
    resident = sum(est.resident.values())
    assert est.total == max(resident + sum(extra.values()) for extra in est.phases.values())
    assert est.peak_phase == "gradient reduction"  # the bucket and its fp32 copies outweigh the rest here


def test_micro_batches_and_checkpointing_cut_activations_by_hand():
    """A generic transformer block keeps 34 hidden-sized tensors per token; checkpointing keeps one per block
    and recomputes one block."""
    net = Network(parameters=10, tensors=1, largest=10, layers=4, hidden=64, qwen=False)
    batch = Batch(rows=2, image_tokens=90, text_tokens=10)
    assert activation_bytes(net, batch, 2, checkpointing=False) == 2 * 4 * 34 * 64 * 2 * 100
    assert activation_bytes(net, batch, 2, checkpointing=True) == 2 * (4 * 1 + 34) * 64 * 2 * 100
    workload = _workload(net, train_trajectories=16, rows_per_trajectory=2, image_tokens=90, text_tokens=10)
    assert workload.batch(None).rows == 32 and workload.batch(4).rows == 8 and workload.batch(64).rows == 32


def _saved_bytes(layers: int, rank: int, checkpointing: bool, rows: int = 2, side: int = 16, text: int = 24):
    """What autograd keeps for one forward of a reduced-width Qwen-Image transformer (2 heads of the real 128),
    counted with saved-tensor hooks (unique storages, parameters and the model's own tables left out)."""
    from diffusers import QwenImageTransformer2DModel

    from flowrl.config import QwenImageLoraConfig
    from flowrl.models.lora import STUDENT, AdapterView, add_adapter

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        net = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=layers,
                                          attention_head_dim=128, num_attention_heads=2, joint_attention_dim=64,
                                          axes_dims_rope=(16, 56, 56))
    finally:
        torch.set_default_dtype(previous)
    shape = network_of(net, tuple(QwenImageLoraConfig().target_modules))
    module = net
    if rank:
        add_adapter(net, QwenImageLoraConfig(rank=rank), seed=0)
        module = AdapterView(net, STUDENT)
    if checkpointing:
        net.enable_gradient_checkpointing()
    net.train()
    skip = {t.untyped_storage().data_ptr() for t in [*net.parameters(), *net.buffers(), net.pos_embed.pos_freqs,
                                                       net.pos_embed.neg_freqs]}
    seen = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    x = torch.randn(rows, side * side, 64, dtype=torch.bfloat16)
    text_states = torch.randn(rows, text, 64, dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(hidden_states=x, timestep=torch.full((rows,), 0.5, dtype=torch.bfloat16),
               encoder_hidden_states=text_states, encoder_hidden_states_mask=torch.ones(rows, text, dtype=torch.long),
               img_shapes=[[(1, side, side)]] * rows, return_dict=False)
    return sum(seen.values()), shape, Batch(rows, side * side, text)


@pytest.mark.parametrize("layers, rank, checkpointing, rows", [
    (1, 0, False, 2), (3, 0, False, 2), (2, 0, False, 1), (3, 8, False, 2), (2, 16, False, 1), (3, 0, True, 2),
    (3, 8, True, 2)])
def test_activations_are_the_tensors_autograd_keeps(layers, rank, checkpointing, rows):
    counted, shape, batch = _saved_bytes(layers, rank, checkpointing, rows=rows)
    planned = activation_bytes(shape, Batch(rows, batch.image_tokens, batch.text_tokens), 2, checkpointing, rank,
                               recompute=False)
    assert planned == pytest.approx(counted, rel=0.03)


# --------------------------------------------------------------------------- advice is config keys


def test_advised_settings_load_as_the_config_that_runs_them(tmp_path):
    """Every setting the plan prints, passed as its --set flags to the config loader, is a valid config
    whose own setting is that setting again, with the same estimate."""
    from flowrl.config import load_config

    config = load_config(QWEN_YAML)
    workloads = stage_workloads(config, 8)
    for stage, workload in workloads.items():
        for family in families(config):
            for gpu_mem in (80.0, 2000.0):  # the most frugal setting when nothing fits, else the advice
                configured = configured_setting(config, stage)
                found = plan(workload, 8, gpu_mem, family=family, configured=configured)
                if found is None:
                    from flowrl.planner import frugal

                    found = frugal(workload, 8, family, configured, budget=0.85 * gpu_mem * GiB)
                setting, est = found
                flags = [f.removeprefix("--set ").strip("'") for f in setting.flags(stage)]
                loaded = load_config(QWEN_YAML, flags)
                assert configured_setting(loaded, stage) == setting, (stage, family, flags)
                again = stage_workloads(loaded, 8)[stage]
                assert estimate(again, setting, 8).total == pytest.approx(est.total), (stage, family)


def test_the_plan_of_the_production_config_answers_offline_for_both_families(monkeypatch):
    """configs/qwen_image.yaml on 8 x 80 GB, no network: per stage the configured setting, LoRA and full
    parameters (advised or, when nothing fits, the most frugal), each with its --set flags, and a per-term
    table a reader can add up."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from flowrl.config import load_config

    text = plan_table(load_config(QWEN_YAML), 8, 80)
    for stage in ("grpo", "opd"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {stage} |")]
        assert any("as configured" in r for r in rows)
        assert any("LoRA" in r and "--set model.qwen_image.lora.rank=" in r for r in rows), rows
        assert any("full parameters" in r and "--set model.qwen_image.lora.rank=0" in r for r in rows), rows
    for label in [*TERM_LABELS.values(), "**total (peak)**", "peak phase"]:  # every term, twice (two stages)
        assert text.count(f"| {label} |") == 2, label


def test_flowrl_plan_prints_both_stages_of_the_shapes_world():
    from flowrl.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", "--config", str(ROOT / "configs" / "shapes.yaml"), "--gpus", "2", "--gpu-mem", "1"]) == 0
    text = out.getvalue()
    assert "| grpo | as configured: full parameters" in text and "| opd | as configured" in text
    assert "does not fit" not in text and "| KL reference |" in text and "| OPD teachers |" in text


# --------------------------------------------------------------------------- host memory of the task


def test_task_requests_count_every_process_loading_its_models():
    """8 processes on a node each read the transformer, text encoder and VAE into host memory before moving
    them to their GPU, on top of their base footprint; under ZeRO rank 0 also gathers the final weights."""
    from flowrl.config import load_config

    config = load_config(QWEN_YAML, ["model.qwen_image.lora.rank=0", "grpo.optim.zero_stage=3",
                                     "model.qwen_image.text_encoder_device=same", "grpo.reward_url=http://rm:1", "grpo.reward_gpus=0"])
    workload = stage_workloads(config, 8)["grpo"]
    requests, setting = task_requests(config, "grpo", 8, 2000.0)
    assert setting == configured_setting(config, "grpo") and setting.zero_stage == 3
    loading = (workload.network.parameters + workload.text_encoder + workload.vae) * 2
    loading = max(loading, workload.scorer * 4)  # the monitor's reward model, read in fp32
    host = 8 * (HOST_BASE_BYTES + loading) + workload.network.parameters * 2
    assert requests == {"gpu": "8", "cpu": "64", "mem": f"{math.ceil(host / GiB)}Gi"}
    with pytest.raises(ValueError, match="grpo: the configured setting .* does not fit 8 x 1 GiB"):
        task_requests(config, "grpo", 8, 1.0)
    with pytest.raises(ValueError, match="no training stage 'bench'"):
        task_requests(config, "bench", 8, 80)


# --------------------------------------------------------------------------- inputs and DeepSpeed's defaults


@pytest.mark.bad_input
def test_bad_inputs_are_refused():
    workload = _workload()
    with pytest.raises(ValueError, match="dtype"):
        estimate(_workload(dtype="int8"), Setting(), gpus=1)
    with pytest.raises(ValueError, match="zero_stage"):
        estimate(workload, Setting(zero_stage=4), gpus=1)
    with pytest.raises(ValueError, match="gpus"):
        estimate(workload, Setting(), gpus=0)
    with pytest.raises(ValueError, match="platform"):
        estimate(workload, Setting(), gpus=1, platform="tpu")
    for gpu_mem, margin in ((float("nan"), 0.1), (float("inf"), 0.1), (0.0, 0.1), (80.0, 1.0), (80.0, -0.1)):
        with pytest.raises(ValueError):
            check_budget(gpu_mem, margin)


def test_the_deepspeed_constants_are_deepspeeds_defaults():
    config = pytest.importorskip("deepspeed.runtime.zero.config")
    zero = config.DeepSpeedZeroConfig()
    assert zero.reduce_bucket_size == ZERO_REDUCE_BUCKET_ELEMENTS
    assert zero.max_live_parameters == ZERO3_MAX_LIVE_PARAMETERS


# --------------------------------------------------------------------------- the measurement machinery


def test_the_validation_bench_measures_two_ranks_within_15_percent(tmp_path):
    """bench/planner_validation.py end to end at half the width (12 heads, one block, 128-pixel images): two
    gloo processes, two GRPO iterations with checkpoints under ZeRO-2, the larger rank's peak against the
    planner's for the workload the run recorded (about 35 s). Smaller widths leave most of the memory to what
    the planner does not model, a process's own ~0.15 GiB (DeepSpeed's bookkeeping, oneDNN's caches, Python);
    the full-width table is results/planner_validation.json."""
    out = tmp_path / "validation.json"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "bench.planner_validation", "--output", str(out), "--modes", "zero2", "--stages",
         "grpo", "--heads", "12", "--size", "128", "--group-size", "2", "--free-gib", "0"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert (row["mode"], row["stage"]) == ("zero2", "grpo")
    assert 0.85 <= row["ratio"] <= 1.15, row
    assert result["torch"] == torch.__version__ and "planner_validation" in result["command"]


def test_the_shipped_production_config_fits_the_gpus_it_registers(monkeypatch):
    """configs/qwen_image.yaml is what README's remote command runs: its GRPO and OPD settings fit the
    GPUs its launch section registers (launch.gpu_mem_gib, the planner's margin), with the reward models'
    own GPUs sized too, offline."""
    from flowrl.config import load_config
    from flowrl.planner import reward_server_bytes

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_config(QWEN_YAML)
    budget = 0.85 * config.launch.gpu_mem_gib * GiB
    for stage in ("grpo", "opd"):
        launch = getattr(config.launch, stage)
        ranks = launch.procs * launch.nodes
        est = estimate(stage_workloads(config, ranks)[stage], configured_setting(config, stage), ranks)
        assert est.total <= budget, (stage, est.total / GiB, est.peak_phase)
        task_requests(config, stage, launch.procs, config.launch.gpu_mem_gib, nodes=launch.nodes)  # no refusal
    g = config.grpo
    if g.reward_backend == "server" and g.reward_url is None:
        workload = stage_workloads(config, config.launch.grpo.procs)["grpo"]
        per_rank_sidecars = workload.colocated_scorers and not g.reward_gpus
        assert per_rank_sidecars or reward_server_bytes(workload, g.reward_gpus) <= budget
