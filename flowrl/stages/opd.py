"""Stage `opd` (and `opd_offpolicy`): on-policy distillation of the task
teachers into one student (:mod:`flowrl.rl.opd`).

Inputs: the base checkpoint, the teacher checkpoints by name (the pipeline's
are ``t2i_teacher`` and ``edit_teacher``; ``opd.routes`` binds tasks and
categories to names) and the curated prompt sets of both tasks. No reward
model is used. Outputs: the student checkpoint, ``history.json``,
``curves.png`` (distillation loss and held-out judge scores), ``table.md``
(base, each teacher and the student on both tasks, and the share of each
teacher's gain the student kept) and ``grid.png``.
"""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
from PIL import Image

from flowrl.config import FlowRLConfig
from flowrl.evaluation import evaluate_shapes
from flowrl.models import load_checkpoint, save_checkpoint, set_torch_threads
from flowrl.plots import new_figure, png_of
from flowrl.rl.distributed import dist_info
from flowrl.rl.grpo import PromptSet
from flowrl.rl.opd import OPDTrainer, parse_routes
from flowrl.rl.trainer import Checkpoints
from flowrl.stages.common import (
    StageResult,
    commit_stage,
    committed_result,
    flat_metrics,
    run_trainer,
    stage_context,
    stage_version,
    write_history,
)
from flowrl.stages.filter_prompts import decode_sources, load_prompt_set
from flowrl.stages.grpo import monitor_for
from flowrl.storage import ArtifactError, ArtifactStore, fetch
from flowrl.tracking import NullTracker, Tracker

SECTIONS = ("run.seed", "world", "sampler", "eval", "opd")
TASKS = ("t2i", "edit")
HEADLINE = {"t2i": "t2i/alignment", "edit": "edit/accuracy"}


def judge_metrics(model_dir) -> dict[str, float]:
    """The full judge metrics an artifact recorded (base: ``metrics``; GRPO: ``teacher``)."""
    metrics = json.loads((model_dir / "metrics.json").read_text())
    return metrics.get("teacher", metrics)


def gain_kept(base: dict, teacher: dict, student: dict, key: str) -> float | None:
    """(student - base) / (teacher - base) on ``key``; None when the teacher gained nothing."""
    gain = teacher[key] - base[key]
    return (student[key] - base[key]) / gain if gain > 0 else None


def _curves_png(history: list[dict], monitor: list[dict]) -> bytes:
    fig, ax = new_figure(7, 4)
    losses = [h["train/loss"] for h in history]
    ax.plot(range(1, len(losses) + 1), losses, color="#4c72b0", alpha=0.35, label="distillation loss")
    if len(losses) >= 10:
        ax.plot(range(10, len(losses) + 1), np.convolve(losses, np.ones(10) / 10, mode="valid"), color="#4c72b0",
                label="loss (10-it mean)")
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("velocity-matching loss")
    other = ax.twinx()
    for key, color in (("t2i", "#c44e52"), ("edit", "#55a868")):
        other.plot([m["iteration"] for m in monitor], [m[key] for m in monitor], "o-", color=color,
                   label=f"held-out judge {HEADLINE[key]}")
    other.set_ylabel("judge score")
    lines = ax.get_legend_handles_labels()[0] + other.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + other.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="lower right", fontsize=8)
    ax.set_title("OPD")
    return png_of(fig)


def table_markdown(models: dict[str, dict], kept: dict[str, float | None]) -> str:
    keys = sorted(k for k in models["student"] if k.startswith(("t2i/", "edit/")) and not k.endswith(
        ("_stderr", "/count", "clean_rate"))) + ["fidelity"]
    names = list(models)
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key in keys:
        cells = [f"{models[n][key]:.3f}" if key in models[n] else "" for n in names]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
    for teacher, share in kept.items():
        lines.append(f"- student kept {'n/a' if share is None else f'{share:.0%}'} of the {teacher}'s gain over base")
    return "\n".join(lines) + "\n"


def run_opd(
    config: FlowRLConfig,
    base_uri: str,
    teacher_uris: dict[str, str],
    prompts_uris: dict[str, str],
    *,
    states: str | None = None,
    output_root: str | None = None,
    tracker: Tracker | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> StageResult:
    """Distil ``teacher_uris`` ({name: grpo artifact}) into one student.
    ``states`` overrides ``opd.states`` (the pipeline's off-policy ablation)."""
    if states is not None:
        config = dataclasses.replace(config, opd=dataclasses.replace(config.opd, states=states))
    if config.model.family != "shapes":
        raise NotImplementedError(
            f"stage opd for model.family {config.model.family}: OPDTrainer runs on Qwen-Image components "
            "(task_models, see tests/rl/test_opd_qwen_image.py), but loading GRPO teachers of that family and "
            "DeepSpeed ZeRO for the student are not wired yet"
        )
    o = config.opd
    stage = "opd" if o.states == "on_policy" else "opd_offpolicy"
    if set(prompts_uris) != set(TASKS):
        raise ValueError(f"opd: prompts must be given for both tasks {TASKS}, got {sorted(prompts_uris)}")
    if not teacher_uris:
        raise ValueError("opd: no teacher given")
    routes = parse_routes(o.routes, TASKS, tuple(teacher_uris))
    init_name = {"t2i_teacher": "t2i_teacher", "edit_teacher": "edit_teacher"}.get(o.init)
    if init_name is not None and init_name not in teacher_uris:
        raise ValueError(f"opd.init: {o.init} but no teacher named {init_name!r} is given")
    inputs = {"base": base_uri, **{f"teacher_{k}": v for k, v in sorted(teacher_uris.items())},
              **{f"prompts_{k}": v for k, v in sorted(prompts_uris.items())}}
    done = committed_result(stage, config, SECTIONS, inputs, output_root)
    if done is not None:
        return done
    base_dir = fetch(base_uri)
    model = load_checkpoint(fetch(teacher_uris[init_name]) if init_name else base_dir, expected_family="shapes",
                            cfg_renorm=config.sampler.cfg_renorm)
    teacher_dirs = {name: fetch(uri) for name, uri in teacher_uris.items()}
    teachers = {name: load_checkpoint(d, expected_family="shapes", cfg_renorm=config.sampler.cfg_renorm)
                for name, d in teacher_dirs.items()}
    prompt_sets = {}
    for task in TASKS:
        frame = load_prompt_set(prompts_uris[task])
        prompt_sets[task] = PromptSet(list(frame["prompt"]), list(frame["category"]), decode_sources(frame))
        if not len(prompt_sets[task]):
            raise ArtifactError(f"{prompts_uris[task]}: no kept {task} prompts")
    store = ArtifactStore(output_root or config.run.artifact_root)
    version = stage_version(stage, config, SECTIONS, inputs)
    rank, _ = dist_info()
    guidance = o.guidance_scale if o.guidance_scale is not None else config.sampler.guidance_scale

    resolved = dataclasses.replace(o, num_steps=o.num_steps or config.sampler.num_steps)

    def train(tracker_: Tracker):
        trainer = OPDTrainer(
            model, model.net, teachers, resolved, prompt_sets, routes, {"t2i": o.t2i_fraction, "edit": 1 - o.t2i_fraction},
            guidance_scale=guidance, shift=config.sampler.shift,
            monitor=monitor_for(config, "mixed", tracker_, o.monitor_per_category, o.grid_every),
            checkpoints=Checkpoints(store, stage, version), config_hash=config.section_hash(*SECTIONS),
        )
        result = run_trainer(trainer, tracker_, stage=stage, iterations=o.iterations, resume=resume,
                             progress=progress, stop_after=stop_after)
        return trainer, result

    if rank != 0:  # other ranks train beside rank 0, which evaluates, commits and tracks
        set_torch_threads(config.run.torch_threads)
        train(NullTracker())
        return StageResult(stage, version, store.uri(stage, version), None, {})
    with stage_context(stage, config, SECTIONS, inputs, tracker=tracker) as ctx:
        start = time.perf_counter()
        trainer, result = train(ctx.tracker)
        train_s = time.perf_counter() - start
        model = trainer.engine.plain_model(model)  # ZeRO-3 partitioned the trained one
        model.net.load_state_dict(result.module_state)
        report = evaluate_shapes(model, config)
        models = {"base": judge_metrics(base_dir)}
        models.update({name: judge_metrics(d) for name, d in teacher_dirs.items()})
        models["student"] = report.metrics
        kept = {}
        for task in TASKS:  # the teacher bound to each task, on that task's headline metric
            teacher = routes[task]
            key = HEADLINE[task]
            if key in models[teacher] and key in models["base"]:
                kept[f"{teacher} ({key})"] = gain_kept(models["base"], models[teacher], report.metrics, key)
        metrics = {
            "states": o.states,
            "init": o.init,
            "iterations": trainer.state.iteration,
            "train_s": round(train_s, 1),
            "wall_s": round(time.perf_counter() - start, 1),
            "student": report.metrics,
            "gain_kept": kept,
            "final_loss": float(np.mean([h["train/loss"] for h in trainer.state.history[-10:]])),
            "monitor": trainer.state.monitor,
        }
        save_checkpoint(model, ctx.staging)
        write_history(ctx.staging, trainer.state)
        (ctx.staging / "curves.png").write_bytes(_curves_png(trainer.state.history, trainer.state.monitor))
        (ctx.staging / "table.md").write_text(table_markdown(models, kept))
        Image.fromarray(report.grid).save(ctx.staging / "grid.png")
        ctx.tracker.log_metrics(flat_metrics({"student": report.metrics}))
        ctx.tracker.log_image(report.grid, "grid.png")
        return commit_stage(ctx, stage, SECTIONS, inputs, metrics, output_root)
