"""The memory planner against measured memory: per-rank peak of GRPO and OPD iterations
(each with a checkpoint) on the CPU, in each memory mode, beside what
:mod:`flowrl.planner` predicts for the same components and settings.

Not a test: it measures. From the repository root:

    .venv/bin/python -m bench.planner_validation --output results/planner_validation.json

(``make results/planner_validation.json``, about 35 minutes). Each (mode, stage) runs in
two fresh processes joined by gloo (``torch.distributed.run``), through the trainers the
stages use (:class:`flowrl.rl.grpo.GRPOTrainer`, :class:`flowrl.rl.opd.OPDTrainer`), built
as ``flowrl.stages.grpo`` / ``flowrl.stages.opd`` build them: the KL reference, LoRA
adapters and teachers, the engine, the EMA (OPD), a checkpoint after every iteration and
the final weights. Two iterations: the first one's backward has no AdamW state yet, the
second holds everything a long run holds. The transformer is Qwen-Image's at its real
width (24 heads x 128 = 3072, joint attention dim 3584) with ``--layers`` blocks; the
text encoder (a one-layer Qwen2.5-VL of hidden size 3584), the VAE and the tokenizer are
tiny, and the reward is an in-process stand-in (the planner is told the rewards come from
a shared server). Modes (the stage's keys in ``MODE_SETTINGS``):

* ``lora``: LoRA rank ``--lora-rank`` on the attention projections under ZeRO-2, gradient
  checkpointing, micro-batches of 2;
* ``lora_ddp``: the same adapters under plain PyTorch + DDP (configs/qwen_image.yaml's engine);
* ``zero2``: full parameters under DeepSpeed ZeRO-2;
* ``zero3``: full parameters under ZeRO-3 with gradient checkpointing.

Memory is the resident set of each process: the peak (``VmHWM``, reset through
``/proc/self/clear_refs`` once the components are built: loading them is host memory on
a GPU machine) minus the resident set after the imports and the process group, before
anything is built; the row's ``measured_gib`` is the larger of the two ranks. Two glibc
settings make the resident set count what a GPU allocator would: ``MALLOC_MMAP_THRESHOLD_``
(every allocation of 64 KiB or more is its own mapping, returned to the system when freed)
and ``MALLOC_PERTURB_`` (every allocation is written when made, so memory allocated but
never touched, such as the unused end of a communication bucket, is resident as it is on
a GPU). The planner predicts with ``platform="cpu"`` (docs/memory.md says what differs).
The full-parameter pairs hold up to 10 GiB per process; a pair waits for ``--free-gib``
of available memory before it starts.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform as platform_module
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path

from flowrl.stages.registry import TRAINING_STAGES

ROOT = Path(__file__).resolve().parents[1]
MODES = ("lora", "lora_ddp", "zero2", "zero3")
STAGES = TRAINING_STAGES  # the stages whose memory the planner models
# the memory settings of each mode, as config keys of the stage's optim subsection
MODE_SETTINGS = {
    "lora": {"zero_stage": 2, "gradient_checkpointing": True, "micro_batch": 2},
    "lora_ddp": {"zero_stage": 0, "gradient_checkpointing": False, "micro_batch": None},
    "zero2": {"zero_stage": 2, "gradient_checkpointing": False, "micro_batch": None},
    "zero3": {"zero_stage": 3, "gradient_checkpointing": True, "micro_batch": None},
}
LORA_MODES = ("lora", "lora_ddp")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_PERTURB_": "85"}
GiB = 1024**3

# Qwen-Image's transformer (Qwen/Qwen-Image transformer/config.json) but for the number of blocks
TRANSFORMER = dict(patch_size=2, in_channels=64, out_channels=16, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=3584, axes_dims_rope=(16, 56, 56))
T2I_PROMPTS = ["a red circle left of a blue square", "two green triangles above a yellow circle",
               "a small purple square", "three orange circles in a row"]
EDIT_PROMPTS = ["make the circle purple", "remove the square and add an orange triangle",
                "turn the triangles blue", "add a green circle"]


# --------------------------------------------------------------------------- memory of this process


def _status(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


class Meter:
    """Resident memory of this process above a baseline, by phase: each :meth:`mark` closes a phase
    with its peak (VmHWM since the last mark) and the resident set at its end."""

    def __init__(self):
        gc.collect()
        self.base = _status("VmRSS")
        self.phases: list[dict] = []
        _reset_peak()

    def mark(self, phase: str) -> None:
        peak, now = _status("VmHWM"), _status("VmRSS")
        self.phases.append({"phase": phase, "peak_gib": (peak - self.base) / GiB, "end_gib": (now - self.base) / GiB})
        _reset_peak()

    def wrap(self, obj, attr: str, phase: str) -> None:
        """Close a phase before and after each call of ``obj.attr`` (the call itself is ``phase``)."""
        inner = getattr(obj, attr)

        def wrapped(*args, **kwargs):
            self.mark(f"before {phase}")
            try:
                return inner(*args, **kwargs)
            finally:
                self.mark(phase)

        setattr(obj, attr, wrapped)


# --------------------------------------------------------------------------- components


def build_text_encoder(tokenizer, hidden: int):
    """A one-layer Qwen2.5-VL whose hidden size is the transformer's joint attention dim (the real
    3584): the prompt embeddings have the production width; everything else is small."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    token_id = tokenizer.convert_tokens_to_ids
    heads = hidden // 128
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=heads, num_key_value_heads=4, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
                         bos_token_id=token_id("<|endoftext|>"), eos_token_id=token_id("<|im_end|>"),
                         pad_token_id=token_id("<|endoftext|>")),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=hidden,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                           fullatt_block_indexes=[0]),
        image_token_id=token_id("<|image_pad|>"), video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"), vision_end_token_id=token_id("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_views(layers: int, heads: int, size: int, tasks: tuple[str, ...]):
    """{task: QwenImageModel} around one transformer, VAE, text encoder and tokenizer, in bf16,
    each built in bf16 directly (no fp32 copy on the way)."""
    import torch
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2VLImageProcessorPil

    from flowrl.models.qwen_image import QwenImageModel
    from tests.models.tiny_qwen_image import SCHEDULER_CONFIG, VAE_CONFIG, build_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    dims = dict(TRANSFORMER, num_attention_heads=heads, num_layers=layers)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        transformer = QwenImageTransformer2DModel(**dims)
        vae = AutoencoderKLQwenImage(**VAE_CONFIG)
        text_encoder = build_text_encoder(tokenizer, dims["joint_attention_dim"])
    finally:
        torch.set_default_dtype(previous)
    views = {}
    for task in tasks:
        views[task] = QwenImageModel(transformer, vae, text_encoder, tokenizer, dict(SCHEDULER_CONFIG), task=task,
                                     height=size, width=size,
                                     image_processor=Qwen2VLImageProcessorPil() if task == "edit" else None)
    return views


class Brightness:
    """The reward stand-in: mean brightness, scored at once (no reward model in memory)."""

    def submit(self, images, prompts, sources=None) -> Future:
        from flowrl.rewards.base import RewardScores

        done: Future = Future()
        value = images.float().mean(dim=(1, 2, 3))
        done.set_result(RewardScores(value, {"brightness": value}))
        return done


# --------------------------------------------------------------------------- one stage, as the stages build it


def lora_section(rank: int):
    from flowrl.config import QwenImageLoraConfig

    return QwenImageLoraConfig(rank=rank)


def grpo_config(args, mode: str):
    from flowrl.config import GRPOConfig, LoopConfig, OptimConfig, RolloutConfig, WindowTimestepsConfig

    return GRPOConfig(loop=LoopConfig(iterations=args.iterations, checkpoint_every=1, eval_every=1000),
                      prompts_per_iteration=2, group_size=args.group_size,
                      rollout=RolloutConfig(num_steps=args.num_steps),
                      timesteps=WindowTimestepsConfig(mode="subset", fraction=1.0, per_trajectory=args.num_steps),
                      kl_coef=0.01, optim=OptimConfig(lr=1e-5, **MODE_SETTINGS[mode]), reward_chunks=1,
                      minibatches=1)


def opd_config(args, mode: str):
    from flowrl.config import LoopConfig, OPDConfig, OptimConfig, TimestepsConfig

    return OPDConfig(loop=LoopConfig(iterations=args.iterations, checkpoint_every=1, eval_every=1000),
                     prompts_per_iteration=args.opd_prompts, t2i_fraction=0.5, num_steps=args.num_steps,
                     timesteps=TimestepsConfig(mode="subset", per_trajectory=args.num_steps),
                     optim=OptimConfig(lr=1e-5, ema_decay=0.999, **MODE_SETTINGS[mode]))


def grpo_trainer(args, mode: str, store_root: Path, views: dict):
    """GRPO on T2I with the KL on, built as flowrl.stages.grpo.run_grpo builds it
    (flowrl.stages.policy.trainable_policy)."""
    import copy

    import torch

    from flowrl.models.lora import STUDENT, AdapterView, add_adapter
    from flowrl.rl.grpo import GRPOTrainer, PromptSet
    from flowrl.rl.trainer import Checkpoints
    from flowrl.storage import ArtifactStore

    cfg = grpo_config(args, mode)
    model = views["t2i"]
    if mode in LORA_MODES:  # adapters train; the reference is the transformer with them off
        network = model.transformer
        add_adapter(network, lora_section(args.lora_rank), seed=cfg.seed)
        module = AdapterView(network, STUDENT)
        reference = model.with_transformer(AdapterView(network, None))
        model = model.with_transformer(module)
    else:
        module = model.transformer
        reference = model.with_transformer(copy.deepcopy(module).requires_grad_(False).eval())
    prompts = PromptSet(T2I_PROMPTS[:2], ["a", "b"], None)
    trainer = GRPOTrainer(model, module, reference, cfg, prompts, Brightness(),
                          lambda rows: torch.ones(len(rows), 1),
                          checkpoints=Checkpoints(ArtifactStore(str(store_root)), "grpo_t2i", "bench"))
    return trainer, {"network": model.network(), "text_encoder": model.text_encoder, "vae": model.vae,
                     "views": views}


def opd_trainer(args, mode: str, store_root: Path, views: dict):
    """OPD of two teachers into one student behind both task views, built as
    flowrl.stages.opd.run_opd builds it (flowrl.stages.opd._teachers): with LoRA the teachers are adapters on the
    student's transformer, else whole frozen transformers."""
    import copy

    import torch

    from flowrl.models.lora import STUDENT, AdapterView, add_adapter, load_adapter, save_adapter
    from flowrl.rl.grpo import PromptSet
    from flowrl.rl.opd import OPDTrainer
    from flowrl.rl.trainer import Checkpoints
    from flowrl.storage import ArtifactStore

    cfg = opd_config(args, mode)
    network = views["t2i"].transformer
    names = {"t2i_teacher": "t2i", "edit_teacher": "edit"}
    teachers = {}
    if mode in LORA_MODES:
        add_adapter(network, lora_section(args.lora_rank), seed=cfg.seed)
        module = AdapterView(network, STUDENT)
        saved = store_root / "teacher_adapter"
        save_adapter(network, saved, STUDENT)  # a teacher's adapter as a GRPO artifact holds it
        for name, task in names.items():
            load_adapter(network, saved, name)
            teachers[name] = views[task].with_transformer(AdapterView(network, name))
        views = {t: view.with_transformer(module) for t, view in views.items()}
    else:
        module = network
        for name, task in names.items():
            teachers[name] = views[task].with_transformer(copy.deepcopy(network).requires_grad_(False).eval())
    sources = torch.rand(len(EDIT_PROMPTS), 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
    prompts = {"t2i": PromptSet(T2I_PROMPTS, ["a", "b", "c", "d"], None),
               "edit": PromptSet(EDIT_PROMPTS, ["e", "f", "g", "h"], sources)}
    trainer = OPDTrainer(views["t2i"], module, teachers, cfg, prompts, {"t2i": "t2i_teacher", "edit": "edit_teacher"},
                         {"t2i": 0.5, "edit": 0.5}, guidance_scale=4.0,
                         checkpoints=Checkpoints(ArtifactStore(str(store_root)), "opd", "bench"), task_models=views)
    return trainer, {"network": views["t2i"].network(), "text_encoder": views["t2i"].text_encoder,
                     "vae": views["t2i"].vae, "views": views}


def run_worker(args) -> None:
    """One rank of one (mode, stage): build, one iteration with a checkpoint, the final weights;
    writes this rank's phases and the shapes the planner needs to ``--out``/rank-N.json."""
    import torch
    import torch.distributed as dist

    import deepspeed  # noqa: F401  (imported before the baseline: its import is not the run's memory)
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    import flowrl.rl.grpo  # noqa: F401
    import flowrl.rl.opd  # noqa: F401
    from flowrl.rl.distributed import init_from_env

    torch.set_num_threads(1)
    init_from_env()
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(args.out)
    meter = Meter()
    build = grpo_trainer if args.stage == "grpo" else opd_trainer
    with tempfile.TemporaryDirectory(prefix="flowrl-plan-bench-") as tmp:
        store_root = Path(tmp)
        if dist.is_initialized():  # one store for both ranks (rank 0 commits what every rank wrote)
            box = [str(store_root)]
            dist.broadcast_object_list(box, src=0)
            store_root = Path(box[0])
        start = time.perf_counter()
        # the components as loading leaves them (how they got there is host memory, not the run's)
        views = build_views(args.layers, args.heads, args.size, ("t2i",) if args.stage == "grpo" else ("t2i", "edit"))
        meter.mark("components")
        shape = describe_components(views["t2i"])
        trainer, parts = build(args, args.mode, store_root, views)
        parts.update(shape)
        meter.mark("setup")
        for attr, phase in (("collect", "rollout"), ("update", "update"), ("_checkpoint", "checkpoint"),
                            ("final_weights", "final weights")):
            meter.wrap(trainer, attr, phase)
        meter.wrap(trainer.engine, "step", "optimizer step")
        trainer.train(progress=False)
        meter.mark("end")
        wall = time.perf_counter() - start
    record = {"rank": rank, "phases": meter.phases, "wall_s": round(wall, 1),
              **workload_of(args, args.mode, args.stage, parts)}
    (out / f"rank-{rank}.json").write_text(json.dumps(record, indent=1))


def describe_components(model) -> dict:
    """What the planner needs of the components as built (before LoRA or an engine changes them)."""
    from flowrl.config import QwenImageLoraConfig
    from flowrl.planner import network_of

    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"shape": network_of(model.transformer, tuple(QwenImageLoraConfig().target_modules)),
            "sizes": (count(model.text_encoder), count(model.vae), model.vae.config.base_dim)}


def workload_of(args, mode: str, stage: str, parts: dict) -> dict:
    """The planner's :class:`~flowrl.planner.Workload` of this run, read off the built modules and the
    batches the trainer ran (as plain data), and its :class:`~flowrl.planner.Setting`."""
    import dataclasses

    import torch

    from flowrl.planner import Setting, Workload

    network = parts["shape"]  # read before LoRA or the engine changed the module
    views = parts["views"]
    with torch.no_grad():  # the prompt lengths the rows ran with (edits: with the source's image tokens)
        if stage == "grpo":
            text = views["t2i"].encode_prompts(T2I_PROMPTS[:2]).tensors["prompt_embeds"].shape[1]
        else:
            sources = torch.rand(len(EDIT_PROMPTS), 3, args.size, args.size, generator=torch.Generator().manual_seed(1))
            text = views["edit"].encode_prompts(EDIT_PROMPTS, sources).tensors["prompt_embeds"].shape[1]
    image = (args.size // 16) ** 2
    per_rank = args.opd_prompts // 2 // args.processes  # OPD: each task's trajectories on a rank
    if stage == "grpo":  # one prompt per rank, one chunk, one minibatch; all its steps trained
        shape = dict(train_trajectories=args.group_size, rows_per_trajectory=args.num_steps, image_tokens=image,
                     sample_rows=2 * args.group_size, decode_images=args.group_size, kl=True, no_grad_in_train=True)
    else:  # the edit task's rows (target + source tokens), both CFG branches at every matched state
        shape = dict(train_trajectories=per_rank, rows_per_trajectory=2 * args.num_steps, image_tokens=2 * image,
                     sample_rows=2 * per_rank, teachers=("edit_teacher", "t2i_teacher"), ema=True)
    workload = Workload(stage, network=network, dtype="bfloat16", text_tokens=text, text_encoder=parts["sizes"][0],
                        vae=parts["sizes"][1], pixels=args.size**2, vae_base_dim=parts["sizes"][2], **shape)
    setting = Setting(lora_rank=args.lora_rank if mode in LORA_MODES else 0, **MODE_SETTINGS[mode])
    return {"workload": dataclasses.asdict(workload), "setting": dataclasses.asdict(setting)}


def predict(record: dict, ranks: int):
    """The planner's estimate of a worker's recorded workload and setting, for the CPU."""
    from flowrl.planner import Network, Setting, Workload, estimate

    data = dict(record["workload"])
    network = Network(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("network").items()})
    workload = Workload(network=network, **{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
    setting = Setting(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["setting"].items()})
    return estimate(workload, setting, ranks, platform="cpu")


# --------------------------------------------------------------------------- driver


def available_gib() -> float:
    """The machine's available memory (``MemAvailable``), GiB."""
    text = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemAvailable:\s+(\d+) kB", text, re.M).group(1)) * 1024 / GiB


def run_pair(mode: str, stage: str, args) -> list[dict]:
    """Both ranks of one (mode, stage) under torch.distributed.run; their records. The machine is shared:
    a pair starts once ``--free-gib`` is available (or after ten minutes of waiting), and one the kernel's
    out-of-memory killer ended is run again, at most twice."""
    from flowrl.rewards.server import free_port

    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(MALLOC_ENV, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    attempt = 0
    while True:
        attempt += 1
        waited = time.monotonic()
        while available_gib() < args.free_gib and time.monotonic() - waited < 600:
            time.sleep(10)
        with tempfile.TemporaryDirectory(prefix="flowrl-plan-pair-") as out:
            command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.processes),
                       "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m",
                       "bench.planner_validation", "--worker", "--mode", mode, "--stage", stage, "--out", out,
                       *worker_flags(args)]
            proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode == 0:
                return [json.loads((Path(out) / f"rank-{r}.json").read_text()) for r in range(args.processes)]
        killed = "exitcode  : -9" in proc.stderr or "SIGKILL" in proc.stderr
        if not killed or attempt == 3:
            raise RuntimeError(f"{mode}/{stage}: the workers failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        print(f"{mode}/{stage}: a worker was killed (out of memory?); running the pair again", file=sys.stderr)


def worker_flags(args) -> list[str]:
    flags = ["--layers", str(args.layers), "--heads", str(args.heads), "--size", str(args.size),
             "--group-size", str(args.group_size), "--num-steps", str(args.num_steps),
             "--opd-prompts", str(args.opd_prompts), "--lora-rank", str(args.lora_rank),
             "--iterations", str(args.iterations)]
    return flags


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default=None, help="results JSON to write")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--free-gib", type=float, default=20.0,
                        help="memory the machine must have available before a pair starts (waits up to 10 min)")
    parser.add_argument("--layers", type=int, default=1, help="transformer blocks")
    parser.add_argument("--heads", type=int, default=24, help="attention heads of 128 (24: the real width 3072)")
    parser.add_argument("--size", type=int, default=256, help="image height and width in pixels")
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--num-steps", type=int, default=2, help="sampler steps, all of them trained / matched")
    parser.add_argument("--opd-prompts", type=int, default=8, help="OPD prompts per iteration (both tasks, all ranks)")
    parser.add_argument("--lora-rank", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=2,
                        help="iterations, a checkpoint after each (the second holds what a long run holds)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--stage", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        run_worker(args)
        return
    rows = []
    for mode in args.modes:
        for stage in args.stages:
            row = row_of(mode, stage, run_pair(mode, stage, args), args.processes)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if args.output:
        write_results(args, rows)


def row_of(mode: str, stage: str, records: list[dict], ranks: int) -> dict:
    """One results row: the larger rank's measured peak (after the components are built) against the
    planner's, each phase's peak on both sides, and the planner's terms at its peak phase."""
    from flowrl.planner import TERMS

    measured: dict[str, float] = {}
    for record in records:
        for entry in record["phases"][1:]:  # [0]: building the components (loading; host memory on a GPU machine)
            name = entry["phase"].removeprefix("before ")
            measured[name] = max(measured.get(name, 0.0), entry["peak_gib"])
    est = predict(records[0], ranks)
    predicted, peak = est.total / GiB, max(measured.values())
    terms = {t: est.resident.get(t, 0.0) + est.phases[est.peak_phase].get(t, 0.0) for t in TERMS}
    return {"mode": mode, "stage": stage, "predicted_gib": round(predicted, 3), "measured_gib": round(peak, 3),
            "ratio": round(peak / predicted, 3), "setting": records[0]["setting"],
            "predicted_phase": est.peak_phase, "measured_phase": max(measured, key=measured.get),
            "predicted_phases_gib": {ph: round(est.phase_total(ph) / GiB, 3) for ph in est.phases},
            "measured_phases_gib": {ph: round(v, 3) for ph, v in measured.items()},
            "predicted_terms_gib": {t: round(v / GiB, 3) for t, v in terms.items() if v},
            "wall_s": max(r["wall_s"] for r in records)}


def write_results(args, rows: list[dict]) -> None:
    import torch

    flags = " ".join(worker_flags(args))
    out = {
        "rows": rows,
        "command": f".venv/bin/python -m bench.planner_validation --output {args.output} "
                   f"--modes {' '.join(args.modes)} --stages {' '.join(args.stages)} "
                   f"--processes {args.processes} {flags}",
        "measure": "peak resident set (VmHWM) minus the resident set after imports and the gloo process group, "
                   "components built before the peak is reset; the larger of the ranks; glibc "
                   + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items()),
        "predicted": "flowrl.planner.estimate(..., platform='cpu') of the workload each run recorded",
        "machine": {"platform": platform_module.platform(), "cpus": os.cpu_count(),
                    "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB, 1)},
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }
    Path(args.output).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
