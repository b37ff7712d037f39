"""GPU memory of the GRPO and OPD stages, per rank, term by term, and the
cheapest setting of the config's own keys that fits.

The planner counts what the code holds (docs/memory.md explains each term
and how bench/planner_validation.py measured it):

* the trained network: full parameters (the training dtype, ``w`` bytes each;
  under ZeRO-3 a 1/g partition) or, with LoRA, the frozen base in the training
  dtype plus fp32 adapters;
* what training adds: gradients, fp32 master weights, AdamW's two moments and
  the EMA, as the engine of the setting keeps them (plain PyTorch / DDP at
  ``zero_stage`` 0, DeepSpeed ZeRO-1/2/3 above, with the buffers DeepSpeed
  allocates under the config the engine gives it);
* the frozen models: the KL reference (a whole copy unless LoRA), the OPD
  teachers (whole transformers, or adapters with LoRA), the text encoder, the
  VAE and the reward models co-located on the rank;
* activations of one training forward (what autograd keeps per token and
  block of the diffusers transformer, with and without gradient
  checkpointing, for the rows of one micro-batch);
* sampling (a rollout chunk's forward without gradient, the VAE decoding its
  images) and the held-out monitor's batch;
* transients: engine set-up, the gradient reduction, the optimizer step, the
  checkpoint and the export of the final weights.

The peak of a rank is the largest of its phases (set-up, sampling,
forward/backward, gradient reduction, optimizer step, checkpoint, export,
monitor), each the resident terms plus what only that phase holds. ``platform="cpu"`` predicts the
resident memory of a process on a machine without GPU (the validation run):
gloo's collectives copy their buffers, PyTorch's AdamW steps one tensor at a
time on the CPU, and host-side copies share the one memory.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import itertools
import math
import shlex
from dataclasses import dataclass

GiB = 1024**3
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq in fp32 (ZeRO's flat partitions)
# DeepSpeed ZeRO defaults (flowrl.rl.engine.ZeroEngine sets none of these; deepspeed 0.19.8's values, checked
# against its config classes in tests/test_planner.py)
ZERO_REDUCE_BUCKET_ELEMENTS = 500_000_000
ZERO3_MAX_LIVE_PARAMETERS = 1_000_000_000
# What autograd keeps per token and transformer block, in tensors of the hidden size in the training dtype
# (bf16), as counted with saved-tensor hooks on diffusers 0.42.1's QwenImageTransformerBlock
# (tests/test_planner.py recounts them): every weight trained (one unit less for a batch of one row, where
# one of them is a view), and every weight frozen (the LoRA base: no linear input is kept for a weight
# gradient; the adapters' own inputs are counted apart).
QWEN_BLOCK_UNITS = {"full": 29.1, "frozen": 16.1}
GENERIC_BLOCK_UNITS = 34.0  # a transformer block without checkpointing (the shapes DiT; not measured here)
CHECKPOINTED_BLOCK_UNITS = 1.0  # gradient checkpointing keeps each block's input stream(s) only
ROPE_BYTES_PER_TOKEN = 512  # Qwen-Image's complex64 rotary factors (64 per image token), one set per forward
QWEN_LORA_TEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "txt_mlp", "txt_mod")  # text stream
# the text stream of the last block feeds nothing (diffusers returns the image stream): no gradient reaches these
QWEN_UNUSED_LAST = ("attn.to_add_out.", "txt_mlp.")
HOST_BASE_BYTES = 16 * GiB  # per training process: CUDA context, dataloader, Python
CPUS_PER_GPU = 8
ADVISED_LORA_RANK = 64  # the rank the plan proposes when the config has LoRA off
PROMPT_TOKENS = 512  # text tokens planned per prompt: the T2I pipeline's cap (max_sequence_length)
VL_PIXELS_PER_TOKEN = 28  # Qwen2.5-VL: 14-pixel patches merged 2 x 2, so an edit source adds (H/28)(W/28) tokens
TERMS = ("weights", "masters", "grads", "adam", "ema", "reference", "teachers", "text_encoder", "vae",
         "reward_models", "buffers", "activations", "sampling", "monitor", "encoding", "step", "checkpoint",
         "export")
TRANSIENT_TERMS = ("activations", "sampling", "monitor", "encoding", "step", "checkpoint", "export")
SCORER_BATCH = 8  # images a reward model scores at once (flowrl.rewards.production: ScorerReward batch_size)
TERM_LABELS = {
    "weights": "weights (trained network)", "masters": "fp32 master weights", "grads": "gradients",
    "adam": "AdamW moments", "ema": "EMA", "reference": "KL reference", "teachers": "OPD teachers",
    "text_encoder": "text encoder", "vae": "VAE", "reward_models": "reward models",
    "buffers": "communication buffers", "activations": "activations (training forward / backward)",
    "sampling": "sampling (rollout forward, VAE decode)", "monitor": "held-out monitor (sampling, VAE decode)",
    "encoding": "text encoding (prompt embeddings)",
    "step": "optimizer step transient",
    "checkpoint": "checkpoint transient", "export": "export transient",
}
# Working sets beyond what autograd keeps, per token and row, in the same units (one block's at a time, so
# not per block), measured as peak resident memory of the real-width block on the CPU: a forward without
# gradient (sampling, the KL reference, teachers); a training forward / backward with every weight trained,
# and with the base frozen (LoRA keeps less, so the block's temporaries show).
NO_GRAD_BLOCK_UNITS = 16.0
TRAIN_WORKSPACE_UNITS = {"full": 3.0, "frozen": 9.0}
# Decoding latents with the Qwen-Image VAE: the decoder's tensors and causal-convolution caches at its peak,
# per image pixel, in units of the decoder's base width in the training dtype (measured on the CPU at 256 and
# 512 pixels, base widths 16 and 96: 20 to 23).
VAE_DECODE_UNITS = 22.0


def dtype_bytes(dtype: str) -> int:
    table = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r} (one of {', '.join(table)})")
    return table[dtype]


# --------------------------------------------------------------------------- what the stage runs


@dataclass(frozen=True)
class Network:
    """The trained transformer as the planner needs it (:func:`network_of` reads it off a module)."""

    parameters: int
    tensors: int
    largest: int  # elements of its largest tensor
    layers: int
    hidden: int
    joint_dim: int = 0  # the text embeddings' width (Qwen-Image's joint attention dim)
    in_channels: int = 64
    qwen: bool = True  # diffusers' QwenImageTransformer2DModel (measured activations) or another transformer
    unused: int = 0  # parameters no gradient reaches (the last block's text-stream output)
    lora_fan: int = 0  # sum of (in + out) over the linears LoRA targets: an adapter of rank r has r x this
    lora_unused_fan: int = 0  # ... of those among ``unused``
    lora_inputs: tuple[int, int] = (0, 0)  # (image, text) stream: in_features summed over one block's targets
    lora_linears: tuple[int, int] = (0, 0)  # (image, text) stream: targeted linears in one block
    lora_width: int = 0  # the widest in or out of a targeted linear (an adapter's largest tensor: rank x this)

    def adapters(self, rank: int) -> int:
        return rank * self.lora_fan


def _text_stream(name: str) -> bool:
    return any(part in name for part in QWEN_LORA_TEXT)


def network_of(module, lora_targets: tuple[str, ...] = ()) -> Network:
    """A :class:`Network` of a transformer (real, or built on the meta device from its config), with the
    linears named by ``lora_targets`` (peft's matching: a module path ending in a target) counted for LoRA."""
    from torch import nn

    params = list(module.named_parameters())
    config = getattr(module, "config", None)
    qwen = type(module).__name__ == "QwenImageTransformer2DModel"
    if qwen:
        layers, hidden = config.num_layers, config.num_attention_heads * config.attention_head_dim
        joint, channels = config.joint_attention_dim, config.in_channels
    else:  # a transformer with a ``blocks`` list of width ``hidden`` (the shapes DiT)
        layers = len(getattr(module, "blocks", [])) or 1
        hidden = getattr(getattr(module, "config", None), "width", 0) or max(p.shape[-1] for _, p in params)
        joint, channels = 0, 0
    last = f"transformer_blocks.{layers - 1}." if qwen else None
    unused = sum(p.numel() for n, p in params if last and n.startswith(last)
                 and any(n.startswith(last + part) for part in QWEN_UNUSED_LAST))
    fan = unused_fan = width = 0
    inputs, counts = [0, 0], [0, 0]
    for name, layer in module.named_modules():
        if not isinstance(layer, nn.Linear) or not any(name == t or name.endswith("." + t) for t in lora_targets):
            continue
        fan += layer.in_features + layer.out_features
        width = max(width, layer.in_features, layer.out_features)
        if last and any(f"{name}.".startswith(last + part) for part in QWEN_UNUSED_LAST):
            unused_fan += layer.in_features + layer.out_features
        if name.startswith("transformer_blocks.0."):
            stream = 1 if _text_stream(name) else 0
            inputs[stream] += layer.in_features
            counts[stream] += 1
    return Network(parameters=sum(p.numel() for _, p in params), tensors=len(params),
                   largest=max(p.numel() for _, p in params), layers=layers, hidden=hidden, joint_dim=joint,
                   in_channels=channels, qwen=qwen, unused=unused, lora_fan=fan, lora_unused_fan=unused_fan,
                   lora_inputs=(inputs[0], inputs[1]), lora_linears=(counts[0], counts[1]), lora_width=width)


@dataclass(frozen=True)
class Batch:
    """The rows one forward runs (per rank): ``rows`` with ``image_tokens`` (target, plus the source's for
    edits) and ``text_tokens`` each."""

    rows: int
    image_tokens: int
    text_tokens: int

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens


@dataclass(frozen=True)
class Workload:
    """What one stage runs on each rank, whatever the memory setting.

    ``train_trajectories``: trajectories in one optimizer step's forward without micro-batching, each
    contributing ``rows_per_trajectory`` rows (GRPO: the trained plus anchor steps; OPD: 2 x the matched
    states, both CFG branches); ``sample``: the rows of one sampling forward (a rollout chunk with CFG);
    ``no_grad_in_train``: a frozen model's forward (the KL reference) runs inside the training forward's
    lifetime on the same rows."""

    stage: str
    network: Network
    dtype: str
    train_trajectories: int
    rows_per_trajectory: int
    image_tokens: int
    text_tokens: int
    sample_rows: int
    sample_unit: int = 1  # sampling rows per trajectory (2 with CFG): a rollout micro-batch is in trajectories
    decode_images: int = 0  # images one sampling chunk decodes (GRPO's rewards need them)
    pixels: int = 0  # pixels of one image
    vae_base_dim: int = 0  # the VAE decoder's base width
    monitor_images: int = 0  # images of one held-out monitor batch (sampled with CFG, decoded at once)
    text_encoder: int = 0
    vae: int = 0
    scorer: int = 0  # parameters of one reward model
    scorer_dtype: str = "float32"
    colocated_scorers: int = 0  # reward models the rank loads to score its rollouts (reward_url null)
    monitor_scorers: int = 0  # held-out monitor reward models (rank 0), loaded one at a time per evaluation
    encoder: tuple[int, int, int] = (0, 0, 0)  # the text encoder's (layers, hidden, MLP width)
    encode_rows: int = 0  # prompts (rows) one encoding call runs at once, and their tokens
    encode_tokens: int = 0
    scorer_tokens: int = 0  # tokens of one reward-model input (image and prompt)
    scorer_geometry: tuple[int, int] = (0, 0)  # a reward model's (hidden, MLP width)
    teachers: tuple[str, ...] = ()
    teachers_as_adapters: bool = True  # with LoRA: each teacher an adapter on the student's base (opd.init base)
    ema: bool = False
    kl: bool = False
    no_grad_in_train: bool = False
    notes: tuple[str, ...] = ()

    def batch(self, micro_batch: int | None, states: int | None = None) -> Batch:
        """The rows of one training forward: ``micro_batch`` trajectories, or (OPD) at most ``states``
        (trajectory, state) pairs of them, both CFG branches each."""
        trajectories = self.train_trajectories if micro_batch is None else min(micro_batch, self.train_trajectories)
        rows = trajectories * self.rows_per_trajectory
        return Batch(rows if states is None else min(rows, 2 * states), self.image_tokens, self.text_tokens)

    def sampling_rows(self, rollout_micro_batch: int | None) -> int:
        if rollout_micro_batch is None:
            return self.sample_rows
        return min(self.sample_rows, rollout_micro_batch * self.sample_unit)


@dataclass(frozen=True)
class Setting:
    """A memory setting: config keys and their values (:meth:`flags`)."""

    lora_rank: int = 0
    zero_stage: int = 0
    gradient_checkpointing: bool = False
    micro_batch: int | None = None
    reference_device: str = "same"
    text_encoder_device: str = "same"
    teachers_on_cpu: tuple[str, ...] = ()
    shared_rewards: bool = False  # grpo.reward_url or grpo.reward_gpus: the reward models on GPUs of their own
    rollout_micro_batch: int | None = None  # grpo.rollout.micro_batch: trajectories of one sampling forward
    decode_batch: int | None = None  # model.qwen_image.decode_batch: images the VAE decodes at once
    states_per_forward: int | None = None  # opd: (trajectory, state) pairs of one forward
    reward_gpus: int = 0  # grpo.reward_gpus of the configured setting (0 with reward_url or co-located)
    monitor_batch: int | None = None  # eval.batch_size when the plan sets it (None: the config's)
    reward_url: bool = False  # the configured rewards come from grpo.reward_url (a server deployed apart)

    def flags(self, stage: str, qwen: bool = True) -> list[str]:
        """``--set KEY=VALUE`` arguments that give a config this setting (``URL``: the shared reward
        server's base URL, which only the deployment knows); ``qwen`` False leaves out the qwen_image keys."""
        out = [f"{stage}.optim.zero_stage={self.zero_stage}",
               f"{stage}.optim.gradient_checkpointing={str(self.gradient_checkpointing).lower()}",
               f"{stage}.optim.micro_batch={'null' if self.micro_batch is None else self.micro_batch}"]
        if qwen:
            out = [f"model.qwen_image.lora.rank={self.lora_rank}", *out,
                   f"model.qwen_image.text_encoder_device={self.text_encoder_device}",
                   f"model.qwen_image.decode_batch={_null(self.decode_batch)}"]
        if stage == "grpo":
            out.append(f"grpo.reference_device={self.reference_device}")
            out.append(f"grpo.rollout.micro_batch={_null(self.rollout_micro_batch)}")
            if not self.reward_url:
                out.append(f"grpo.reward_gpus={(self.reward_gpus or 'N') if self.shared_rewards else 0}")
        if stage == "opd":
            out.append(f"opd.states_per_forward={_null(self.states_per_forward)}")
            if qwen:
                out.append(f"opd.teacher_devices=[{', '.join(f'{t}=cpu' for t in self.teachers_on_cpu)}]")
        if self.monitor_batch is not None:
            out.append(f"eval.batch_size={self.monitor_batch}")
        return ["--set " + shlex.quote(flag) for flag in out]

    def describe(self) -> str:
        parts = [f"LoRA rank {self.lora_rank}" if self.lora_rank else "full parameters",
                 f"ZeRO-{self.zero_stage}" if self.zero_stage else "DDP"]
        if self.gradient_checkpointing:
            parts.append("checkpointing")
        if self.micro_batch is not None:
            parts.append(f"micro-batch {self.micro_batch}")
        if self.states_per_forward is not None:
            parts.append(f"{self.states_per_forward} state(s) per forward")
        if self.rollout_micro_batch is not None:
            parts.append(f"rollout micro-batch {self.rollout_micro_batch}")
        if self.decode_batch is not None:
            parts.append(f"VAE decode {self.decode_batch} at a time")
        if self.monitor_batch is not None:
            parts.append(f"monitor batch {self.monitor_batch}")  # eval.batch_size
        placed = [name for name, where in (("text encoder", self.text_encoder_device),
                                           ("reference", self.reference_device)) if where == "cpu"]
        placed += list(self.teachers_on_cpu)
        if placed:
            parts.append(f"{', '.join(placed)} on cpu")
        if self.text_encoder_device == "offload":
            parts.append("text encoder offloaded between encodings")
        if self.shared_rewards:
            parts.append("reward models at grpo.reward_url" if self.reward_url else
                         f"reward models on {self.reward_gpus} GPU(s) of their own" if self.reward_gpus
                         else "reward models off the training GPUs")
        return ", ".join(p for p in parts if p)


def _null(value) -> str:
    return "null" if value is None else str(value)


@dataclass(frozen=True)
class Estimate:
    """Per-rank bytes: ``resident`` terms (held through the run) and each phase's additions; the peak is
    the largest phase."""

    resident: dict[str, float]
    phases: dict[str, dict[str, float]]
    host: float = 0.0  # host memory of the process beyond its base: models placed on the CPU, export copies

    def phase_total(self, phase: str) -> float:
        return sum(self.resident.values()) + sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def total(self) -> float:
        return self.phase_total(self.peak_phase)

    def term(self, name: str) -> float:
        """A term's largest value: resident, or in the phase that holds the most of it."""
        if name in self.resident:
            return self.resident[name] + max(p.get(name, 0.0) for p in self.phases.values())
        return max(p.get(name, 0.0) for p in self.phases.values())


# --------------------------------------------------------------------------- the terms, one function each


def activation_bytes(network: Network, batch: Batch, w: int, checkpointing: bool, lora_rank: int = 0,
                     recompute: bool = True) -> float:
    """What one training forward of ``batch`` keeps for its backward, at the backward's start (its largest
    moment): per token and block the tensors autograd saves (:data:`QWEN_BLOCK_UNITS`; fewer when the base
    is frozen, and each LoRA linear adds an fp32 copy of its input and its rank-sized output), the parts
    outside the blocks, and with checkpointing each block's input stream(s) plus (``recompute``) the one
    block the backward runs again at a time."""
    h, rows = network.hidden, batch.rows
    if not network.qwen:
        block = GENERIC_BLOCK_UNITS * h * w * batch.tokens
        outside = 0.0
    else:
        units = QWEN_BLOCK_UNITS["frozen"] if lora_rank else QWEN_BLOCK_UNITS["full"] - (rows == 1)
        block = units * h * w * batch.tokens
        if lora_rank:  # the adapters of each stream: fp32 input copies and rank-sized outputs, per token
            for stream, tokens in ((0, batch.image_tokens), (1, batch.text_tokens)):
                block += tokens * 4 * (network.lora_inputs[stream] + lora_rank * network.lora_linears[stream])
            outside = batch.image_tokens * h * w if checkpointing else 0.0  # the output norm's input
        else:  # the patch embedding's input, the output norm and projection; the text norm's fp32 input
            outside = (batch.image_tokens * (3 * h * w + network.in_channels * w)
                       + batch.text_tokens * 4 * network.joint_dim)
    if checkpointing:
        kept = CHECKPOINTED_BLOCK_UNITS * network.layers * h * w * batch.tokens + (block if recompute else 0.0)
    else:
        kept = network.layers * block
    # the image tokens' rotary factors, one set for the whole batch, kept by the blocks unless checkpointing
    # recomputes them
    rope = batch.image_tokens * ROPE_BYTES_PER_TOKEN if network.qwen and not checkpointing else 0.0
    return rows * (kept + outside) + rope


def no_grad_bytes(network: Network, batch: Batch, w: int) -> float:
    """The working set of a forward without gradient (sampling, the KL reference, a teacher): one block's."""
    units = NO_GRAD_BLOCK_UNITS if network.qwen else GENERIC_BLOCK_UNITS / 2
    return batch.rows * units * network.hidden * w * batch.tokens


def model_state(network: Network, setting: Setting, gpus: int, w: int, ema: bool, platform: str) -> dict:
    """The trained network's states on one rank, by engine: ``{"resident": {term: bytes}}`` and, per
    phase, what only that phase holds (``"setup"``, ``"backward"``, ``"reduction"``, ``"step"``,
    ``"checkpoint"``, ``"export"``).

    ``platform`` "cpu": PyTorch's AdamW steps one tensor at a time there (two temporaries of the largest,
    against one of everything at once with CUDA's foreach kernels), gloo's reduce-scatter copies its input
    and its all-gather its output (NCCL works in place), and rank 0's host copy of the final weights lands
    in the same memory."""
    # long: one branch per engine (torch DDP, ZeRO-1/2, ZeRO-3) and per phase, each stating which
    # tensors that engine holds; splitting it would separate the cases that must be compared
    g, p, zero, cpu = gpus, network.parameters, setting.zero_stage, platform == "cpu"
    out = {k: {} for k in ("resident", "setup", "backward", "reduction", "step", "checkpoint", "export")}
    res = out["resident"]
    if setting.lora_rank:  # the frozen base in the training dtype, the trained adapter in fp32
        trained, tw = network.adapters(setting.lora_rank), 4
        used = trained - setting.lora_rank * network.lora_unused_fan
        largest = setting.lora_rank * network.lora_width
        res["weights"] = p * w + trained * tw
    else:
        trained, tw, used, largest = p, w, p - network.unused, network.largest
        res["weights"] = p * w / (g if zero == 3 else 1)
    if zero == 0:  # torch AdamW on the module's own tensors, DDP across ranks
        res["grads"] = trained * tw  # kept from the first backward until the next step's zero_grad
        res["adam"] = 2 * trained * tw  # the moments take the parameters' dtype
        if g > 1:
            res["buffers"] = trained * tw  # DDP's gradient buckets
        if ema:
            res["ema"] = trained * 4  # fp32 averages of the trained parameters
        out["setup"] = {"grads": -res["grads"], "adam": -res["adam"]}
        out["backward"]["grads"] = largest * tw  # a gradient computed before it is added to the kept one
        temps = 2 * largest * tw if cpu else trained * tw  # single-tensor AdamW, or foreach over all tensors
        out["step"]["step"] = temps + (largest * 4 if ema and tw != 4 else 0)  # (the EMA's fp32 cast)
        state = trained * tw  # the trained module's state dict (with LoRA: the adapter)
        out["checkpoint"]["checkpoint"] = 2 * state + (trained * 4 if ema else 0)  # a clone, its bytes, the EMA's
        out["export"]["export"] = 2 * state  # the final weights cloned twice
        return out
    # DeepSpeed ZeRO (its config has no bf16 section: fp32 masters, gradients reduced in fp32); its buffers
    # take the trained parameters' dtype (LoRA's adapters: fp32)
    shard = trained / g
    res["masters"] = shard * 4
    res["adam"] = shard * ADAM_STATE_BYTES
    if ema:
        res["ema"] = shard * 4  # flowrl.rl.engine.ShardedEMA: fp32, sharded like the masters
    reduced = min(used, ZERO_REDUCE_BUCKET_ELEMENTS)  # gradient elements of one bucket flush
    out["backward"]["grads"] = largest * tw  # a parameter's gradient before it is copied into the bucket
    out["step"]["step"] = (2 if cpu else 1) * shard * 4  # AdamW's temporaries over the flat fp32 partition
    out["step"]["grads"] = shard * 4  # the flat fp32 gradient the optimizer steps
    out["checkpoint"]["checkpoint"] = 0.0  # every rank streams its own partitions to its shard file
    if zero == 3:
        res["grads"] = shard * 4  # fp32 gradient partitions, allocated at set-up
        res["buffers"] = ZERO_REDUCE_BUCKET_ELEMENTS * 4  # the fp32 gradient bucket, allocated at set-up
        out["setup"] = {"adam": -res["adam"], "buffers": 2 * largest * tw}
        gathered = min(p, ZERO3_MAX_LIVE_PARAMETERS) * tw  # the layers' weights gathered while they run
        out["backward"]["buffers"] = gathered + (largest * tw if cpu else 0)
        out["reduction"]["buffers"] = reduced * 4 * (2 if cpu else 1)  # reduce-scatter staging (+ gloo's copy)
        host = trained * tw if cpu else 0.0  # rank 0 copies each gathered tensor to host memory
        out["export"]["export"] = host + largest * tw * (2 if cpu else 1)
        return out
    out["setup"] = {"adam": -res["adam"], "buffers": trained * tw}  # the trained weights flattened into one buffer
    bucket = ZERO_REDUCE_BUCKET_ELEMENTS * tw  # the gradient bucket, one per backward
    out["backward"]["buffers"] = bucket
    out["reduction"] = {"buffers": bucket + reduced * (tw + 4), "grads": shard * 4}  # flattened, fp32, partition
    if zero == 1:
        res["grads"] = trained * tw
    # rank 0's host copy of the final weights; with EMA the module first holds the averages (an all-gather)
    out["export"]["export"] = (trained * tw * (2 if ema else 1)) if cpu else 0.0
    return out


def estimate(workload: Workload, setting: Setting, gpus: int, platform: str = "cuda") -> Estimate:
    """Per-rank bytes of ``workload`` under ``setting`` on ``gpus`` data-parallel ranks."""
    # long: one term of per-rank memory after another (states, reference, teachers, activations,
    # phases), each a line or two; a table in code, read top to bottom against the docs' memory model
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if setting.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {setting.zero_stage}")
    if platform not in ("cuda", "cpu"):
        raise ValueError(f"platform must be cuda or cpu, got {platform!r}")
    if setting.lora_rank and setting.zero_stage == 3:
        raise ValueError("LoRA trains with zero_stage 0, 1 or 2 (ZeRO-3 would partition the adapters only)")
    w, net, cpu = dtype_bytes(workload.dtype), workload.network, platform == "cpu"
    states = model_state(net, setting, gpus, w, workload.ema, platform)
    resident = {k: 0.0 for k in TERMS if k not in TRANSIENT_TERMS}
    resident.update(states["resident"])
    host = 0.0
    frozen_copy = net.parameters * w
    if workload.kl and not setting.lora_rank:
        on_cpu = setting.reference_device == "cpu"
        resident["reference"] = frozen_copy if not on_cpu or cpu else 0.0
        host += frozen_copy if on_cpu else 0.0
    for teacher in workload.teachers:
        on_cpu = teacher in setting.teachers_on_cpu
        adapter = setting.lora_rank and workload.teachers_as_adapters and not on_cpu
        size = net.adapters(setting.lora_rank) * 4 if adapter else frozen_copy
        resident["teachers"] += size if not on_cpu or cpu else 0.0
        host += size if on_cpu else 0.0
    te = workload.text_encoder * w
    resident["text_encoder"] = te if setting.text_encoder_device == "same" or cpu else 0.0
    host += te if setting.text_encoder_device != "same" else 0.0  # cpu, or offload between encodings
    resident["vae"] = workload.vae * w
    scorer = workload.scorer * dtype_bytes(workload.scorer_dtype)
    resident["reward_models"] = (0 if setting.shared_rewards else workload.colocated_scorers) * scorer
    batch = workload.batch(setting.micro_batch, setting.states_per_forward)
    workspace = (TRAIN_WORKSPACE_UNITS["frozen" if setting.lora_rank else "full"] if net.qwen else 0.0) \
        * batch.rows * batch.tokens * net.hidden * w
    if workload.no_grad_in_train:  # the KL reference's forward while the policy's activations are kept
        workspace = max(workspace, no_grad_bytes(net, batch, w))
    acts = activation_bytes(net, batch, w, setting.gradient_checkpointing, setting.lora_rank) + workspace
    sample_rows = workload.sampling_rows(setting.rollout_micro_batch)
    decoded = _at_most(workload.decode_images, setting.decode_batch)
    sample = max(no_grad_bytes(net, Batch(sample_rows, workload.image_tokens, workload.text_tokens), w),
                 decode_bytes(workload, decoded, w))
    gathered = {"buffers": states["backward"]["buffers"]} if setting.zero_stage == 3 else {}  # layers gathered
    phases = {
        "set-up": states["setup"],
        "sampling": {"sampling": sample, **gathered},
        "forward/backward": {"activations": acts, **states["backward"]},
        "optimizer step": states["step"],
        "checkpoint": states["checkpoint"],
        "export": states["export"],
    }
    if states["reduction"]:
        phases["gradient reduction"] = states["reduction"]
    if workload.monitor_images:  # the held-out monitor: CFG sampling and decoding one batch at a time
        images = setting.monitor_batch or workload.monitor_images
        rows = Batch(2 * images, workload.image_tokens, workload.text_tokens)
        phases["monitor"] = {"monitor": max(no_grad_bytes(net, rows, w), decode_bytes(
            workload, _at_most(images, setting.decode_batch), w)), **gathered}
    if workload.monitor_scorers:  # then one monitor scorer at a time, loaded for the scoring and released after
        phases["monitor scoring"] = {"reward_models": scorer + scoring_bytes(workload)}
    if workload.encoder[0] and not cpu:  # the prompts' encoding (on the GPU unless text_encoder_device cpu)
        if setting.text_encoder_device != "cpu":
            phases["text encoding"] = {"encoding": encoding_bytes(workload, w)}
            if setting.text_encoder_device == "offload":
                phases["text encoding"]["text_encoder"] = te  # moved over for the call only
    return Estimate(resident=resident, phases=phases, host=host)


def _at_most(n: int, cap: int | None) -> int:
    return n if cap is None else min(n, cap)


def encoding_bytes(workload: Workload, w: int) -> float:
    """The text encoder's working set for one call: every layer's hidden states (the pipelines read the
    last of ``output_hidden_states``, so all are returned), one MLP's gate, up and product at a time, and
    the logits of the last position only (``logits_to_keep=1``)."""
    layers, hidden, mlp = workload.encoder
    cells = workload.encode_rows * workload.encode_tokens
    return cells * ((layers + 1) * hidden + 3 * mlp) * w


def scoring_bytes(workload: Workload) -> float:
    """A reward model's working set for one batch of :data:`SCORER_BATCH` images: one layer's residual
    stream, normed input and attention output, and its MLP's gate, up and product (no hidden states are
    kept: the scorer reads the last position's logits, flowrl.rewards.vlm)."""
    hidden, mlp = workload.scorer_geometry
    return SCORER_BATCH * workload.scorer_tokens * (3 * hidden + 3 * mlp) * dtype_bytes(workload.scorer_dtype)


def reward_server_bytes(workload: Workload, gpus: int) -> float:
    """Per GPU of a reward server holding the stage's co-located scorers round-robin over ``gpus``."""
    one = workload.scorer * dtype_bytes(workload.scorer_dtype)
    return math.ceil(workload.colocated_scorers / gpus) * one + scoring_bytes(workload)


def reward_server_line(workload: Workload, setting: Setting, budget: float) -> str:
    """What the reward models of ``workload`` need where ``setting`` runs them."""
    n, one = workload.colocated_scorers, workload.scorer * dtype_bytes(workload.scorer_dtype)
    head = f"{workload.stage} reward models: {n} scorer(s) of {_gib(one)} GiB ({workload.scorer_dtype})"
    if setting.reward_gpus:
        per = reward_server_bytes(workload, setting.reward_gpus)
        return (f"{head} on {setting.reward_gpus} GPU(s) of their own (grpo.reward_gpus): {_gib(per)} GiB per GPU "
                f"with a batch's working set, {'fits' if per <= budget else 'over budget'}")
    if setting.reward_url:
        return f"{head} on the reward server at grpo.reward_url (its own deployment)"
    need = reward_gpus_needed(workload, budget)
    return (f"{head} co-located on every training GPU (counted above); a reward server of their own would need "
            + (f"{need} GPU(s) (grpo.reward_gpus={need})" if need else "more memory than one GPU has per scorer"))


def reward_gpus_needed(workload: Workload, budget: float) -> int | None:
    """GPUs a reward server of the stage's co-located scorers needs (scorers placed round-robin), each
    within ``budget`` bytes; None when one scorer alone does not fit a GPU."""
    n = workload.colocated_scorers
    if not n:
        return 0
    return next((k for k in range(1, n + 1) if reward_server_bytes(workload, k) <= budget), None)


def decode_bytes(workload: Workload, images: int, w: int) -> float:
    """The VAE decoder's working set for ``images`` latents decoded at once."""
    return VAE_DECODE_UNITS * images * workload.pixels * workload.vae_base_dim * w


# --------------------------------------------------------------------------- the stages of a config


def _count(module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), len(params)


def qwen_image_components(pretrained: str) -> dict[str, tuple[int, int]]:
    """(parameters, tensors) of the transformer, text encoder and VAE, built
    from their config files on the meta device (no weights read, no memory).
    The configs come from a local directory, the published configs shipped
    for known hub ids, or the local hub cache: no network
    (:func:`flowrl.models.qwen_image_specs.component_configs`)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from flowrl.models.qwen_image_specs import component_configs

    configs = component_configs(pretrained, required=("transformer", "vae", "text_encoder"))
    if "model_type" not in configs["text_encoder"]:
        from flowrl.config import ConfigError

        raise ConfigError(f"model.qwen_image.pretrained: the text_encoder config of {pretrained!r} has no model_type")
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(configs["transformer"])
        vae = AutoencoderKLQwenImage.from_config(configs["vae"])
        text = Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.for_model(**configs["text_encoder"]))
    out = {"transformer": _count(transformer), "vae": _count(vae), "text_encoder": _count(text)}
    cfg = transformer.config
    out["_geometry"] = (cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim)
    return out


@functools.cache
def qwen_image_network(pretrained: str, lora_targets: tuple[str, ...]) -> Network:
    """:func:`network_of` the transformer of ``pretrained`` (from its config alone; cached)."""
    return network_of(qwen_image_transformer(pretrained), lora_targets)


@functools.cache
def _components(pretrained: str) -> dict:
    return qwen_image_components(pretrained)


def qwen_image_transformer(pretrained: str):
    """The transformer of ``pretrained`` built on the meta device from its config file alone."""
    import torch
    from diffusers import QwenImageTransformer2DModel

    from flowrl.models.qwen_image_specs import component_configs

    configs = component_configs(pretrained, required=("transformer",))
    with torch.device("meta"):
        return QwenImageTransformer2DModel.from_config(configs["transformer"])


@functools.cache
def scorer_parameters(pretrained: str) -> int:
    """Parameters of one reward model: the Qwen2.5-VL (``reward_model.vlm_pretrained``) the scorers are
    fine-tuned from, built on the meta device from its config."""
    import torch
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    from flowrl.models.qwen_image_specs import component_configs

    config = component_configs(pretrained, key="reward_model.vlm_pretrained", required=("model",))["model"]
    with torch.device("meta"):
        return _count(Qwen2_5_VLForConditionalGeneration._from_config(AutoConfig.for_model(**config)))[0]


def scorer_dtype() -> str:
    """The dtype the stages load a reward model in: flowrl.rewards.production.LazyVLMScorer's, which is
    QwenVLScorer.from_pretrained's default unless the module names one as ``SCORER_DTYPE``."""
    from flowrl.rewards import production
    from flowrl.rewards.vlm import QwenVLScorer

    dtype = getattr(production, "SCORER_DTYPE", None)
    if dtype is None:
        dtype = inspect.signature(QwenVLScorer.from_pretrained).parameters["dtype"].default
    return str(dtype).removeprefix("torch.")


def composite_scorers(config, task: str) -> int:
    """Reward models the task's composite loads: its components whose scorer type is a model
    (flowrl/rewards/registry.py)."""
    from flowrl.rewards.registry import model_scorer_count

    return model_scorer_count(config, task)


def _tokens(config, task: str) -> tuple[int, int]:
    """(image tokens, text tokens) of one row of ``task``: the target's 2 x 2 latent patches (and the
    source's for edits), and :data:`PROMPT_TOKENS` (edits: plus the source's Qwen2.5-VL image tokens)."""
    q = config.model.qwen_image
    image = (q.height // 16) * (q.width // 16)
    if task == "t2i":
        return image, PROMPT_TOKENS
    return 2 * image, PROMPT_TOKENS + (q.height // VL_PIXELS_PER_TOKEN) * (q.width // VL_PIXELS_PER_TOKEN)


def configured_setting(config, stage: str) -> Setting:
    """The memory setting a config gives ``stage``."""
    from flowrl.models.families import family_of

    section = getattr(config, stage)
    teachers = ()
    if stage == "opd":
        from flowrl.config import name_value_pairs

        teachers = tuple(n for n, d in name_value_pairs(section.teacher_devices, "opd.teacher_devices") if d == "cpu")
    g = config.grpo
    return Setting(
        zero_stage=section.optim.zero_stage,
        gradient_checkpointing=section.optim.gradient_checkpointing,
        micro_batch=section.optim.micro_batch,
        reference_device=getattr(g, "reference_device", "same") if stage == "grpo" else "same",
        teachers_on_cpu=teachers,
        shared_rewards=stage == "grpo" and g.reward_backend == "server" and (
            g.reward_url is not None or getattr(g, "reward_gpus", 0) > 0),
        reward_gpus=getattr(g, "reward_gpus", 0) if stage == "grpo" else 0,
        reward_url=stage == "grpo" and g.reward_backend == "server" and g.reward_url is not None,
        rollout_micro_batch=g.rollout.micro_batch if stage == "grpo" else None,
        states_per_forward=getattr(section, "states_per_forward", None) if stage == "opd" else None,
        **family_of(config).memory_setting(config))  # LoRA, text encoder, decode and monitor batches


def stage_workloads(config, gpus: int) -> dict[str, Workload]:
    """The GRPO and OPD stages of ``config`` on ``gpus`` data-parallel ranks, each at its largest task
    (Qwen-Image: edit, whose rows also carry the source's tokens)."""
    from flowrl.models.families import family_of

    g, o = config.grpo, config.opd
    routes = sorted({route.split("=", 1)[1].strip() for route in o.routes})
    opd_steps = o.num_steps or config.sampler.num_steps
    matched = o.timesteps.per_trajectory if o.timesteps.mode == "subset" else opd_steps
    grpo_steps = g.timesteps.per_trajectory + (g.kl_anchor_steps if g.kl_coef > 0 else 0) \
        if g.timesteps.mode == "subset" else g.rollout.num_steps
    grpo_steps *= 2 if g.rollout.cfg_mode == "both" else 1
    per_rank = max(1, g.prompts_per_iteration // gpus)
    grpo_rows = max(1, per_rank * g.group_size // g.minibatches)
    sample = max(1, per_rank // g.reward_chunks) * g.group_size * (1 if g.rollout.cfg_mode == "none" else 2)
    opd_rows = max(1, math.ceil(o.prompts_per_iteration * max(o.t2i_fraction, 1 - o.t2i_fraction) / gpus))
    common, grpo, opd = family_of(config).planner_figures(config, per_rank, opd_rows)
    return {
        "grpo": Workload("grpo", train_trajectories=grpo_rows, rows_per_trajectory=grpo_steps, sample_rows=sample,
                         sample_unit=1 if g.rollout.cfg_mode == "none" else 2, kl=g.kl_coef > 0,
                         ema=g.optim.ema_decay > 0,
                         **grpo, **common),
        "opd": Workload("opd", train_trajectories=opd_rows, rows_per_trajectory=2 * matched, sample_rows=2 * opd_rows,
                        sample_unit=2, teachers=tuple(routes), ema=o.optim.ema_decay > 0, **opd, **common),
    }


def qwen_image_figures(config, per_rank: int, opd_rows: int) -> tuple[dict, dict, dict]:
    """The qwen_image family's planner figures (:meth:`flowrl.models.families.ModelFamily.planner_figures`):
    the transformer and its LoRA targets, the text encoder, VAE and reward models from their configs, the
    edit task's tokens, and the decoding, encoding and scoring the stages do beside training."""
    g = config.grpo
    q = config.model.qwen_image
    parts = _components(q.pretrained)
    lora = q.lora
    targets = tuple(lora.target_modules) if lora is not None else ()
    if not targets:
        from flowrl.config import QwenImageLoraConfig

        targets = tuple(QwenImageLoraConfig().target_modules)  # the advised LoRA's targets
    net = qwen_image_network(q.pretrained, targets)
    scorer = scorer_parameters(config.reward_model.vlm_pretrained) if config.reward_model.vlm_pretrained else 0
    image, text = _tokens(config, "edit")
    from flowrl.models.qwen_image_specs import component_configs

    base_dim = component_configs(q.pretrained, required=("vae",))["vae"].get("base_dim", 96)
    te = component_configs(q.pretrained, required=("text_encoder",))["text_encoder"]
    te = te.get("text_config", te)
    scorer_geometry = (0, 0)
    if config.reward_model.vlm_pretrained:
        sc = component_configs(config.reward_model.vlm_pretrained, key="reward_model.vlm_pretrained",
                               required=("model",))["model"]
        sc = sc.get("text_config", sc)
        scorer_geometry = (sc["hidden_size"], sc["intermediate_size"])
    chunk = max(1, per_rank // g.reward_chunks) * g.group_size  # trajectories of one rollout chunk
    vl_image = (q.height // VL_PIXELS_PER_TOKEN) * (q.width // VL_PIXELS_PER_TOKEN)
    common = dict(network=net, dtype=q.dtype, image_tokens=image, text_tokens=text,
                  text_encoder=parts["text_encoder"][0], vae=parts["vae"][0], scorer=scorer,
                  scorer_dtype=scorer_dtype(), pixels=q.height * q.width, vae_base_dim=base_dim,
                  monitor_images=config.eval.batch_size,
                  encoder=(te["num_hidden_layers"], te["hidden_size"], te["intermediate_size"]),
                  encode_tokens=text, scorer_tokens=2 * vl_image + PROMPT_TOKENS, scorer_geometry=scorer_geometry)
    colocated = 0 if g.reward_backend == "server" and g.reward_url is not None else \
        max(composite_scorers(config, t) for t in ("t2i", "edit"))
    monitors = 1 if g.monitor_reward else 0
    notes = ("the held-out monitor's reward model loads on rank 0 for each evaluation, one at a time, and is "
             "released after it",)
    grpo = dict(decode_images=chunk, encode_rows=max(chunk, config.eval.batch_size), colocated_scorers=colocated,
                monitor_scorers=monitors, no_grad_in_train=g.kl_coef > 0, notes=notes)
    opd = dict(encode_rows=max(opd_rows, config.eval.batch_size), monitor_scorers=2 * monitors,
               teachers_as_adapters=config.opd.init == "base", notes=notes)
    return common, grpo, opd


# --------------------------------------------------------------------------- advice


def candidates(workload: Workload, mode: str, configured: Setting) -> list[Setting]:
    """The settings of ``mode`` ("lora" or "full") the config can express, cheapest first: what runs
    fastest and needs nothing else deployed (no offload to the CPU, rewards co-located, less sharding, no
    recompute, whole batches) before what saves memory at a cost."""
    lora = mode == "lora"
    rank = (configured.lora_rank or ADVISED_LORA_RANK) if lora else 0
    rows = workload.train_trajectories
    micro = [None] + [m for m in (8, 4, 2, 1) if m < rows]
    zeros = (0, 2) if lora else (0, 2, 3)
    refs = ("same", "cpu") if workload.kl and not lora else ("same",)
    encoders = ("same", "offload", "cpu") if workload.text_encoder else ("same",)
    teacher_sets = ((), tuple(workload.teachers)) if workload.teachers and not lora else ((),)
    rewards = (False, True) if workload.stage == "grpo" and workload.colocated_scorers else (
        (configured.shared_rewards,) if workload.stage == "grpo" else (False,))
    rollouts = (None,) + tuple(m for m in (4, 1) if m * workload.sample_unit < workload.sample_rows) \
        if workload.stage == "grpo" else (None,)
    decodes = (None, 1) if max(workload.decode_images, workload.monitor_images) > 1 and workload.pixels else (None,)
    monitors = (configured.monitor_batch,) + tuple(m for m in (4, 1) if m < workload.monitor_images)
    states = (None, 2, 1) if workload.stage == "opd" and workload.rows_per_trajectory > 2 else (None,)
    out = []
    for zero, ckpt, mb, ref, enc, teachers, shared, rollout, decode, state, monitor in itertools.product(
            zeros, (False, True), micro, refs, encoders, teacher_sets, rewards, rollouts, decodes, states, monitors):
        out.append(Setting(rank, zero, ckpt, mb, ref, enc, teachers, shared, rollout_micro_batch=rollout,
                           decode_batch=decode, states_per_forward=state, monitor_batch=monitor,
                           reward_gpus=configured.reward_gpus if shared else 0,
                           reward_url=configured.reward_url and shared))

    def cost(s: Setting):
        offloaded = (s.reference_device == "cpu") + (s.text_encoder_device == "cpu") + len(s.teachers_on_cpu)
        # then the splits that cost little time: the text encoder moved over per encoding, sampling and
        # decoding in parts, OPD's states a few per forward
        return (offloaded, s.shared_rewards, s.zero_stage, s.gradient_checkpointing,
                -(s.micro_batch or rows + 1), s.text_encoder_device == "offload",
                -(s.states_per_forward or rows * workload.rows_per_trajectory + 1),
                -(s.rollout_micro_batch or workload.sample_rows + 1), -(s.decode_batch or workload.decode_images + 1),
                -(s.monitor_batch or workload.monitor_images + 1))

    return sorted(out, key=cost)


def plan(workload: Workload, gpus: int, gpu_mem_gib: float, margin: float = 0.15, family: str = "full",
         configured: Setting | None = None, platform: str = "cuda") -> tuple[Setting, Estimate] | None:
    """The first of :func:`candidates` whose peak fits ``(1 - margin) * gpu_mem_gib``; None when none does."""
    check_budget(gpu_mem_gib, margin)
    budget = (1.0 - margin) * gpu_mem_gib * GiB
    for setting in candidates(workload, family, configured or Setting()):
        found = estimate(workload, setting, gpus, platform)
        if found.total <= budget:
            return _with_reward_gpus(setting, workload, budget), found
    return None


def _with_reward_gpus(setting: Setting, workload: Workload, budget: float) -> Setting:
    """``setting`` with the GPUs its reward server needs, when it moves the reward models off the training
    GPUs and does not say how many (left at 0, flagged N, when one scorer alone does not fit a GPU)."""
    if not setting.shared_rewards or setting.reward_gpus or setting.reward_url:
        return setting
    return dataclasses.replace(setting, reward_gpus=reward_gpus_needed(workload, budget) or 0)


def frugal(workload: Workload, gpus: int, family: str, configured: Setting | None = None,
           platform: str = "cuda", budget: float | None = None) -> tuple[Setting, Estimate]:
    """The setting of ``family`` with the smallest peak (what to read when none fits); among equal peaks the
    one whose other phases hold least. ``budget`` (bytes per GPU) sizes its reward server, if it has one."""
    found = [(s, estimate(workload, s, gpus, platform)) for s in candidates(workload, family, configured or Setting())]
    setting, est = min(found, key=lambda pair: (pair[1].total, sum(pair[1].phase_total(p) for p in pair[1].phases)))
    return (setting if budget is None else _with_reward_gpus(setting, workload, budget)), est


def check_budget(gpu_mem_gib: float, margin: float) -> None:
    if not (math.isfinite(gpu_mem_gib) and gpu_mem_gib > 0):
        raise ValueError(f"GPU memory must be a finite number of GiB > 0, got {gpu_mem_gib}")
    if not 0 <= margin < 1:
        raise ValueError(f"the margin must be in [0, 1), got {margin}")


def families(config) -> tuple[str, ...]:
    """The training modes to advise, "lora" and "full" (parameters): LoRA exists for the families with model
    keys (qwen_image) only."""
    from flowrl.models.families import family_of

    return ("lora", "full") if family_of(config).model_keys else ("full",)


# --------------------------------------------------------------------------- the printed plan


def _gib(b: float) -> str:
    return f"{b / GiB:.2f}"


def term_table(columns: dict[str, Estimate]) -> list[str]:
    """One row per term (its largest value; ``*`` marks a term of a transient phase), one column per
    estimate, then each column's peak phase and total."""
    names = list(columns)
    lines = ["| term (GiB per GPU) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for term in TERMS:
        values = [e.term(term) for e in columns.values()]
        cells = []
        for e, value in zip(columns.values(), values):
            transient = term not in e.resident or not e.resident[term]
            cells.append(f"{_gib(value)}{'*' if transient and value else ''}")
        lines.append(f"| {TERM_LABELS[term]} | " + " | ".join(cells) + " |")
    lines.append("| peak phase | " + " | ".join(e.peak_phase for e in columns.values()) + " |")
    lines.append("| **total (peak)** | " + " | ".join(f"**{_gib(e.total)}**" for e in columns.values()) + " |")
    return lines


def plan_table(config, gpus: int, gpu_mem_gib: float, margin: float = 0.15) -> str:
    """Markdown: per stage the configured setting's peak per GPU and, per family (LoRA, full parameters),
    the cheapest setting that fits with its ``--set`` flags; then each stage's per-term table. A stage no
    setting fits gets a row saying "does not fit" (``flowrl plan`` then exits 1)."""
    check_budget(gpu_mem_gib, margin)
    budget = (1 - margin) * gpu_mem_gib
    lines = [f"GPUs: {gpus} x {gpu_mem_gib:g} GiB, planned to {1 - margin:.0%} of each ({budget:.1f} GiB); "
             "per rank (the largest rank), peak over the run's phases.", "",
             "| stage | setting | peak GiB / GPU | fits | config keys |", "|---|---|---:|---|---|"]
    details = []
    from flowrl.models.families import family_of

    qwen = family_of(config).model_keys  # the flags name the family's model keys
    workloads = stage_workloads(config, gpus)
    for stage, workload in workloads.items():
        configured = configured_setting(config, stage)
        columns = {}
        try:
            mine = estimate(workload, configured, gpus)
        except ValueError as exc:  # a combination the config's own checks refuse
            lines.append(f"| {stage} | as configured: {configured.describe()} | | not a valid setting: {exc} | |")
        else:
            ok = mine.total <= budget * GiB
            lines.append(f"| {stage} | as configured: {configured.describe()} | {_gib(mine.total)} | "
                         f"{'yes' if ok else 'over budget'} | |")
            columns["as configured"] = mine
        any_fit = False
        for mode in families(config):
            found = plan(workload, gpus, gpu_mem_gib, margin, mode, configured)
            label = "LoRA" if mode == "lora" else "full parameters"
            if found is None:
                setting, est = frugal(workload, gpus, mode, configured, budget=budget * GiB)
                columns[f"most frugal, {label}"] = est
                lines.append(f"| {stage} | most frugal, {label}: {setting.describe()} | {_gib(est.total)} | "
                             f"over budget | {' '.join(setting.flags(stage, qwen))} |")
                continue
            any_fit = True
            setting, est = found
            columns[f"advised, {label}"] = est
            lines.append(f"| {stage} | advised, {label}: {setting.describe()} | {_gib(est.total)} | yes | "
                         f"{' '.join(setting.flags(stage, qwen))} |")
        if not any_fit:
            lines.append(f"| {stage} | no setting of the config's keys | | does not fit | |")
        details += ["", f"{stage}: " + "; ".join(workload.notes) if workload.notes else "", ""]
        if workload.colocated_scorers:
            details += [reward_server_line(workload, configured, budget * GiB), ""]
        details += term_table(columns)
    notes = ["", "`*`: held in one phase only (the total adds the largest phase to the resident terms). "
             "`grpo.reward_gpus=N`: one reward server per node on N GPUs of the pod beyond the training "
             "processes' (or `grpo.reward_url`, a reward server deployed apart)."]
    return "\n".join(lines + [line for line in details] + notes) + "\n"


def task_requests(config, stage: str, gpus: int, gpu_mem_gib: float, margin: float = 0.15, nodes: int = 1
                  ) -> tuple[dict[str, str], Setting]:
    """Flyte resource requests of a training task (``grpo`` or ``opd``) on one node of ``gpus`` GPUs
    (``nodes`` x ``gpus`` data-parallel ranks) in the config's own setting: the GPUs, ``CPUS_PER_GPU``
    cores each, and host memory for each of the node's ``gpus`` processes: its base footprint, everything
    it loads (each process reads every model it holds into host memory before moving it to its GPU), the
    models it keeps on the CPU and its host copy of the final weights. ValueError naming the stage when
    the configured setting does not fit the GPUs."""
    workloads = stage_workloads(config, gpus * nodes)
    if stage not in workloads:
        raise ValueError(f"no training stage {stage!r} to plan (one of {', '.join(workloads)})")
    workload = workloads[stage]
    setting = configured_setting(config, stage)
    found = estimate(workload, setting, gpus * nodes)
    check_budget(gpu_mem_gib, margin)
    if found.total > (1 - margin) * gpu_mem_gib * GiB:
        advice = [plan(workload, gpus * nodes, gpu_mem_gib, margin, f, setting) for f in families(config)]
        from flowrl.models.families import family_of

        qwen = family_of(config).model_keys
        hint = next((" ".join(a[0].flags(stage, qwen)) for a in advice if a is not None), None)
        raise ValueError(
            f"{stage}: the configured setting ({setting.describe()}) needs {_gib(found.total)} GiB per GPU and "
            f"does not fit {gpus} x {gpu_mem_gib:g} GiB at a margin of {margin:g}; "
            + (f"a setting that fits: {hint}" if hint else "no setting of the config's keys fits; use more or "
               "larger GPUs") + " (flowrl plan shows the terms)")
    export = workload.network.parameters * dtype_bytes(workload.dtype) if setting.zero_stage else 0.0
    host = gpus * (HOST_BASE_BYTES + host_bytes(workload, setting, gpus * nodes)) + export  # rank 0's final weights
    requests = {"gpu": str(gpus), "cpu": str(CPUS_PER_GPU * gpus), "mem": f"{math.ceil(host / GiB)}Gi"}
    return requests, setting


def host_bytes(workload: Workload, setting: Setting, ranks: int) -> float:
    """Host memory of one training process beyond its base: the most it holds while loading (the
    transformer, text encoder and VAE are all read into host memory before QwenImageModel.from_pretrained
    moves them to the GPU; a teacher or a reward model one at a time) and the models it keeps on the CPU."""
    w = dtype_bytes(workload.dtype)
    loading = (workload.network.parameters + workload.text_encoder + workload.vae) * w
    scorers = (0 if setting.shared_rewards else workload.colocated_scorers) + workload.monitor_scorers
    if scorers:
        loading = max(loading, workload.scorer * dtype_bytes(workload.scorer_dtype))
    return loading + estimate(workload, setting, ranks).host
