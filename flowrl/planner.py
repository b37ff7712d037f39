"""GPU memory planning: per-GPU bytes of one training stage, and the cheapest
setting that fits.

Model states of the trained network with ``P`` parameters in ``n`` tensors,
trained with AdamW (two moments and a step counter per tensor):

- weights: ``P * w`` bytes (``w`` = bytes of the training dtype);
- fp32 master weights when training in 16-bit: ``P * 4``;
- gradients: ``P * w``;
- optimizer: ``P * 8`` (exp_avg and exp_avg_sq in fp32) plus ``n * 4``
  (PyTorch keeps each tensor's step as a float32 scalar).

DeepSpeed ZeRO shards them over the ``g`` GPUs of the data-parallel group:
stage 1 the optimizer states (and master weights), stage 2 also the
gradients, stage 3 also the weights; ``offload_optimizer`` moves the
optimizer states and master weights to host memory. Frozen models (the
reference policy, teachers, reward models, text encoder, VAE) hold their
weights only (sharded too under ZeRO-3). Activations of the trained network:
``batch * tokens * hidden * layers * bytes * factor`` with ``factor`` about
34 for a transformer block without gradient checkpointing (attention
scores excluded, flash attention) and 2 with it (the block inputs only, one
block recomputed at a time): the standard estimates, rough by nature, so
the planner keeps a safety margin.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
STEP_BYTES = 4  # the per-tensor step counter
ACTIVATION_FACTOR = {False: 34.0, True: 2.0}  # per token x hidden x layer, in units of the dtype's bytes
GiB = 1024**3


@dataclass(frozen=True)
class TrainedModel:
    parameters: int
    tensors: int
    hidden: int = 0
    layers: int = 0


@dataclass(frozen=True)
class Setting:
    zero_stage: int = 0
    offload_optimizer: bool = False
    gradient_checkpointing: bool = False
    micro_batch: int = 1


@dataclass(frozen=True)
class Estimate:
    weights: float
    master_weights: float
    gradients: float
    optimizer: float
    frozen: float
    activations: float

    @property
    def model_states(self) -> float:
        return self.weights + self.master_weights + self.gradients + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.frozen + self.activations


def dtype_bytes(dtype: str) -> int:
    table = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r} (one of {', '.join(table)})")
    return table[dtype]


def estimate(
    model: TrainedModel,
    setting: Setting,
    gpus: int,
    dtype: str = "bfloat16",
    frozen_parameters: int = 0,
    tokens_per_sample: int = 0,
) -> Estimate:
    """Per-GPU bytes of one training process."""
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    if setting.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {setting.zero_stage}")
    w = dtype_bytes(dtype)
    p = model.parameters
    shard = lambda stage: gpus if setting.zero_stage >= stage else 1  # noqa: E731
    weights = p * w / shard(3)
    master = (p * 4 if w != 4 else 0) / shard(1)
    grads = p * w / shard(2)
    optimizer = (p * ADAM_STATE_BYTES + model.tensors * STEP_BYTES) / shard(1)
    if setting.offload_optimizer:
        optimizer, master = 0.0, 0.0
    frozen = frozen_parameters * w / shard(3)
    acts = (setting.micro_batch * tokens_per_sample * model.hidden * model.layers * w
            * ACTIVATION_FACTOR[setting.gradient_checkpointing])
    return Estimate(weights, master, grads, optimizer, frozen, acts)


def candidate_settings(max_batch: int = 8) -> list[Setting]:
    """From cheapest (fastest) to most frugal: less sharding, no offload, no recompute, bigger batches first."""
    out = []
    for zero in (0, 1, 2, 3):
        for offload in (False, True):
            for checkpointing in (False, True):
                batch = max_batch
                while batch >= 1:
                    out.append(Setting(zero, offload, checkpointing, batch))
                    batch //= 2
    cost = lambda s: (s.offload_optimizer, s.zero_stage, s.gradient_checkpointing, -s.micro_batch)  # noqa: E731
    return sorted(out, key=cost)


def plan(
    model: TrainedModel,
    gpus: int,
    gpu_mem_gib: float,
    dtype: str = "bfloat16",
    frozen_parameters: int = 0,
    tokens_per_sample: int = 0,
    margin: float = 0.15,
    max_batch: int = 8,
) -> tuple[Setting, Estimate] | None:
    """The first setting of :func:`candidate_settings` whose estimate fits in
    ``(1 - margin) * gpu_mem_gib``; None when nothing fits."""
    budget = (1.0 - margin) * gpu_mem_gib * GiB
    for setting in candidate_settings(max_batch):
        est = estimate(model, setting, gpus, dtype, frozen_parameters, tokens_per_sample)
        if est.total <= budget:
            return setting, est
    return None


# --------------------------------------------------------------------------- stages of a config

@dataclass(frozen=True)
class StageLoad:
    """What one training stage holds on each GPU, before any setting."""

    stage: str
    trained: TrainedModel
    frozen_parameters: int
    tokens_per_sample: int
    dtype: str
    note: str


def _count(module) -> tuple[int, int]:
    params = list(module.parameters())
    return sum(p.numel() for p in params), len(params)


def qwen_image_components(pretrained: str) -> dict[str, tuple[int, int]]:
    """(parameters, tensors) of the transformer, text encoder and VAE, built
    from their config files on the meta device (no weights read, no memory)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import AutoConfig, Qwen2_5_VLForConditionalGeneration

    try:
        configs = (QwenImageTransformer2DModel.load_config(pretrained, subfolder="transformer"),
                   AutoencoderKLQwenImage.load_config(pretrained, subfolder="vae"),
                   AutoConfig.from_pretrained(pretrained, subfolder="text_encoder"))
    except OSError as exc:  # no such directory, no hub access, or a component's config missing
        raise FileNotFoundError(
            f"model.qwen_image.pretrained: cannot read the component configs of {pretrained!r} "
            f"(a local diffusers-layout directory, or a hub id reachable from here): {exc}") from None
    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel.from_config(configs[0])
        vae = AutoencoderKLQwenImage.from_config(configs[1])
        text = Qwen2_5_VLForConditionalGeneration._from_config(configs[2])
    out = {"transformer": _count(transformer), "vae": _count(vae), "text_encoder": _count(text)}
    cfg = transformer.config
    out["_geometry"] = (cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim)
    return out


def stage_loads(config) -> list[StageLoad]:
    """The GRPO and OPD stages of a scenario, as the planner sees them."""
    from flowrl.models import create_model

    m = config.model
    if m.family == "shapes":
        net = create_model(config).net
        p, n = _count(net)
        s = m.shapes
        tokens = 2 * (config.world.resolution // s.patch) ** 2 + 16  # target + source tokens + prompt
        trained = TrainedModel(p, n, hidden=s.width, layers=s.depth)
        dtype = "float32"
    else:
        q = m.qwen_image
        parts = qwen_image_components(q.pretrained)
        layers, hidden = parts["_geometry"]
        p, n = parts["transformer"]
        frozen_base = parts["vae"][0] + parts["text_encoder"][0]
        image_tokens = (q.height // 16) * (q.width // 16)
        tokens = 2 * image_tokens + 512  # edit: target + source image tokens, plus the prompt
        trained = TrainedModel(p, n, hidden=hidden, layers=layers)
        dtype = q.dtype
    frozen_encoders = 0 if m.family == "shapes" else frozen_base
    encoders = "" if m.family == "shapes" else " + text encoder + VAE"
    g, o = config.grpo, config.opd
    reference = p if g.kl_coef > 0 else 0
    n_teachers = len({route.split("=", 1)[1] for route in o.routes})
    return [
        StageLoad("grpo", trained, frozen_encoders + reference, tokens, dtype,
                  "policy" + (" + reference (KL)" if reference else "") + encoders),
        StageLoad("opd", trained, frozen_encoders + n_teachers * p, tokens, dtype,
                  f"student + {n_teachers} teachers{encoders}"),
    ]


def _bytes(b: float) -> str:
    return f"{b / GiB:.1f} GiB" if b >= GiB else f"{b / 1024**2:.1f} MiB"


def _params(p: int) -> str:
    return f"{p / 1e9:.2f} B" if p >= 1e9 else f"{p / 1e6:.2f} M"


def plan_table(config, gpus: int, gpu_mem_gib: float, margin: float = 0.15) -> str:
    """A markdown table: per stage, the chosen setting and its per-GPU estimate."""
    lines = [f"GPUs: {gpus} x {gpu_mem_gib:g} GiB (planning to {1 - margin:.0%} of it)", "",
             "| stage | holds | trained params | ZeRO | offload | recompute | micro-batch | model states | frozen "
             "| activations | total / GPU |", "|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    for load in stage_loads(config):
        found = plan(load.trained, gpus, gpu_mem_gib, load.dtype, load.frozen_parameters, load.tokens_per_sample,
                     margin)
        if found is None:
            lines.append(f"| {load.stage} | {load.note} | {_params(load.trained.parameters)} | does not fit | | | | "
                         "| | | |")
            continue
        s, e = found
        lines.append(f"| {load.stage} | {load.note} | {_params(load.trained.parameters)} | {s.zero_stage} | "
                     f"{'yes' if s.offload_optimizer else 'no'} | {'yes' if s.gradient_checkpointing else 'no'} | "
                     f"{s.micro_batch} | {_bytes(e.model_states)} | {_bytes(e.frozen)} | {_bytes(e.activations)} | "
                     f"{_bytes(e.total)} |")
    return "\n".join(lines) + "\n"


HOST_BASE_BYTES = 16 * GiB  # per training process: CUDA context, dataloader, Python
CPUS_PER_GPU = 8


def task_requests(config, stage: str, gpus: int, gpu_mem_gib: float, margin: float = 0.15
                  ) -> tuple[dict[str, str], Setting]:
    """Flyte resource requests of a training task (``grpo`` or ``opd``) on one node of
    ``gpus`` GPUs, from the plan's setting: the GPUs, ``CPUS_PER_GPU`` cores each, and
    host memory for every process's base footprint, the offloaded optimizer states and
    fp32 master weights (ZeRO offload keeps them in host memory, sharded across the
    ranks), and one copy of every model's weights as they are loaded before moving to
    the GPU. Raises ValueError naming the stage when nothing fits."""
    loads = {load.stage: load for load in stage_loads(config)}
    if stage not in loads:
        raise ValueError(f"no training stage {stage!r} to plan (one of {', '.join(loads)})")
    load = loads[stage]
    found = plan(load.trained, gpus, gpu_mem_gib, load.dtype, load.frozen_parameters, load.tokens_per_sample, margin)
    if found is None:
        raise ValueError(f"{stage}: no setting fits {gpus} x {gpu_mem_gib:g} GiB; use more or larger GPUs")
    setting, _ = found
    p, w = load.trained.parameters, dtype_bytes(load.dtype)
    offloaded = p * (ADAM_STATE_BYTES + 4) if setting.offload_optimizer else 0  # all ranks' shards together
    loading = (p + load.frozen_parameters) * w
    host = gpus * HOST_BASE_BYTES + offloaded + loading
    requests = {"gpu": str(gpus), "cpu": str(CPUS_PER_GPU * gpus), "mem": f"{math.ceil(host / GiB)}Gi"}
    return requests, setting
