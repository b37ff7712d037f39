"""Stage `opd` (and `opd_offpolicy`): on-policy distillation of the task
teachers into one student (:mod:`flowrl.rl.opd`).

Inputs: the base checkpoint, the teacher checkpoints by name (the pipeline's
are ``t2i_teacher`` and ``edit_teacher``; ``opd.routes`` binds tasks and
categories to names) and the curated prompt sets of both tasks. No reward
model is used. Outputs: the student checkpoint, ``history.json``,
``curves.png`` (distillation loss and held-out judge scores), ``table.md``
(base, each teacher and the student on both tasks, and the share of each
teacher's gain the student kept) and ``grid.png``.

``qwen_image`` with LoRA (``model.qwen_image.lora``): the student is a fresh
adapter on the base transformer (on the init teacher's merged one with
``opd.init`` a teacher); a teacher trained with LoRA on the same pretrained
weights is its adapter loaded beside the student's on that transformer
(unless ``opd.teacher_devices`` places it); the artifact holds the student's
adapter and the transformer with it merged.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time

import numpy as np
from PIL import Image

from flowrl.config import FlowRLConfig
from flowrl.evaluation import evaluate_shapes
from flowrl.config import ConfigError, name_value_pairs, safe_name
from flowrl.models import (
    load_checkpoint, load_frozen_network, load_task_views, pretrained_path, save_checkpoint, save_policy,
    trainable_module,
)
from flowrl.models.families import family_of
from flowrl.models.lora import (
    ADAPTER_DIR, STUDENT, AdapterView, add_adapter, load_adapter, lora_settings, save_lora_policy,
)
from flowrl.models.qwen_image import same_component
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
    follow_rank0,
    run_trainer,
    stage_context,
    stage_version,
    trained_model,
    write_history,
)
from flowrl.evaluation import heldout_sample, reward_evaluation
from flowrl.prompt_files import decode_sources
from flowrl.stages.filter_prompts import check_prompt_tasks, load_heldout_set, load_prompt_set
from flowrl.stages.grpo import MONITOR_SEED_OFFSET, model_key, monitor_for, place_text_encoders
from flowrl.storage import ArtifactError, ArtifactStore, fetch
from flowrl.tracking import Tracker

log = logging.getLogger(__name__)

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


def _curves_png(history: list[dict], monitor: list[dict], headline: dict[str, str] = HEADLINE,
                scorer: str = "judge") -> bytes:
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
                   label=f"held-out {scorer} {headline[key]}")
    other.set_ylabel(f"{scorer} score")
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
    o = config.opd
    stage = "opd" if o.states == "on_policy" else "opd_offpolicy"
    if set(prompts_uris) != set(TASKS):
        raise ConfigError(f"opd: prompts must be given for both tasks {TASKS}, got {sorted(prompts_uris)}")
    if not teacher_uris:
        raise ConfigError("opd: no teacher given")
    for name in teacher_uris:
        safe_name(name, "opd: teacher name")
    try:
        routes = parse_routes(o.routes, TASKS, tuple(teacher_uris))
    except ValueError as exc:  # the routes name teachers that were not given: the user's config and flags
        raise ConfigError(str(exc)) from None
    init_name = {"t2i_teacher": "t2i_teacher", "edit_teacher": "edit_teacher"}.get(o.init)
    if init_name is not None and init_name not in teacher_uris:
        raise ConfigError(f"opd.init: {o.init} but no teacher named {init_name!r} is given")
    inputs = {"base": base_uri, **{f"teacher_{k}": v for k, v in sorted(teacher_uris.items())},
              **{f"prompts_{k}": v for k, v in sorted(prompts_uris.items())}, **model_key(config)}
    done = committed_result(stage, config, SECTIONS, inputs, output_root, tracker)
    if done is not None:
        return done
    check_prompt_tasks(prompts_uris)
    if family_of(config).from_pretrained:
        return _run_opd_pretrained(config, base_uri, teacher_uris, prompts_uris, stage, inputs, routes, init_name,
                                   output_root=output_root, tracker=tracker, resume=resume, progress=progress,
                                   stop_after=stop_after)
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

    if rank != 0:
        return follow_rank0(config, store, stage, version, train)
    with stage_context(stage, config, SECTIONS, inputs, tracker=tracker) as ctx:
        start = time.perf_counter()
        trainer, result = train(ctx.tracker)
        train_s = time.perf_counter() - start
        model = trained_model(trainer, model, result)
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


# --------------------------------------------------------------------------- qwen_image: no judge


def _teacher_tasks(teacher_uris: dict[str, str]) -> dict[str, str]:
    """{teacher name: the task its GRPO run trained}, from the artifacts' metrics."""
    tasks = {}
    for name, uri in teacher_uris.items():
        task = json.loads((fetch(uri) / "metrics.json").read_text()).get("task")
        if task not in TASKS:
            raise ArtifactError(f"{uri}: teacher {name!r} is not a T2I or edit GRPO artifact (task {task!r})")
        tasks[name] = task
    return tasks


def _reward_model_of(teacher_uris: dict[str, str], store: ArtifactStore) -> str:
    """The reward_model artifact the teachers were trained against (their lineage): the
    student is scored by the same models, on the same held-out prompts and seeds."""
    used = {store.read_manifest(uri).inputs.get("reward_model") for uri in teacher_uris.values()}
    if len(used) != 1 or None in used:
        raise ArtifactError(f"opd: the teachers were trained against different reward models {sorted(map(str, used))}")
    return used.pop()


def _adapter_on(teacher_dir, task: str, base_dir) -> bool:
    """Whether a teacher artifact holds a LoRA adapter of the pretrained transformer the student
    starts from (the base's T2I one): then the adapter alone is the teacher's difference to it."""
    if not (teacher_dir / ADAPTER_DIR).is_dir():
        return False
    ours, theirs = pretrained_path(base_dir, "t2i"), pretrained_path(teacher_dir, task)
    return ours == theirs or same_component(ours, theirs, "transformer")


def _run_opd_pretrained(config: FlowRLConfig, base_uri: str, teacher_uris: dict[str, str],
                        prompts_uris: dict[str, str], stage: str, inputs: dict, routes: dict[str, str],
                        init_name: str | None, *, output_root, tracker, resume, progress, stop_after) -> StageResult:
    """OPD of a pretrained family (qwen_image): one student transformer behind a T2I and an
    edit pipeline view; each teacher's transformer (frozen, on its own device if placed there)
    behind the student's frozen VAE and text encoder. The held-out reward model of GRPO
    (``grpo.monitor_reward``) watches both tasks' held-out prompts and scores the student."""
    from flowrl.rewards.production import (
        ReleasedAfterScoring, load_monitor_scorer, load_production_rewards, prompt_categories,
    )

    o = config.opd
    store = ArtifactStore(output_root or config.run.artifact_root)
    devices = dict(name_value_pairs(o.teacher_devices, "opd.teacher_devices", "TEACHER=DEVICE"))
    unknown = sorted(set(devices) - set(teacher_uris))
    if unknown:
        raise ConfigError(f"opd.teacher_devices: no teacher named {unknown[0]!r} (given: {', '.join(teacher_uris)})")
    teacher_task = _teacher_tasks(teacher_uris)
    reward_model_uri = _reward_model_of(teacher_uris, store)
    curated = {t: load_prompt_set(prompts_uris[t]) for t in TASKS}
    heldout = {t: load_heldout_set(prompts_uris[t]) for t in TASKS}
    watchers, scorers = {}, {}
    for t in TASKS:
        composite = load_production_rewards(config, reward_model_uri, t, prompt_categories(curated[t], heldout[t]))
        # each loaded for its call only: one on the GPU at a time (the monitor's, the final evaluation's)
        watchers[t] = ReleasedAfterScoring(load_monitor_scorer(reward_model_uri, t, config.grpo.monitor_reward,
                                                               composite))
        scorers[t] = {name: ReleasedAfterScoring(r) for name, r in dict(composite.components).items()}
        scorers[t][config.grpo.monitor_reward] = watchers[t]
    base_dir = fetch(base_uri)
    views = load_task_views(fetch(teacher_uris[init_name]) if init_name else base_dir, config)
    place_text_encoders(config, list(views.values()))
    lora = lora_settings(config)
    network = views["t2i"].transformer
    if lora is not None:  # a fresh adapter on the starting transformer trains, behind both task views
        add_adapter(network, lora, seed=o.seed)
        module = AdapterView(network, STUDENT)
        views = {t: view.with_transformer(module) for t, view in views.items()}
    model, module = views["t2i"], trainable_module(views["t2i"])
    teachers = {}
    for name, uri in teacher_uris.items():
        teacher_dir, task = fetch(uri), teacher_task[name]
        if lora is not None and name not in devices and init_name is None and _adapter_on(
                teacher_dir, task, base_dir):
            load_adapter(network, teacher_dir / ADAPTER_DIR, name)  # costs its adapter only
            teachers[name] = views[task].with_transformer(AdapterView(network, name))
            log.info("opd: teacher %s is its LoRA adapter on the student's transformer", name)
        else:
            teachers[name] = views[task].with_transformer(
                load_frozen_network(teacher_dir, config, task, devices.get(name)))
            log.info("opd: teacher %s is its whole transformer (on %s)", name, devices.get(name, "the student's device"))
    prompt_sets = {}
    for t in TASKS:
        prompt_sets[t] = PromptSet(list(curated[t]["prompt"]), list(curated[t]["category"]),
                                   decode_sources(curated[t]))
        if not len(prompt_sets[t]):
            raise ArtifactError(f"{prompts_uris[t]}: no kept {t} prompts")
    version = stage_version(stage, config, SECTIONS, inputs)
    rank, _ = dist_info()
    guidance = o.guidance_scale if o.guidance_scale is not None else config.sampler.guidance_scale
    resolved = dataclasses.replace(o, num_steps=o.num_steps or config.sampler.num_steps)
    monitor_rows = {t: heldout_sample(heldout[t], o.monitor_per_category) for t in TASKS}
    per_task = {"t2i": config.eval.t2i_per_category, "edit": config.eval.edit_per_kind}
    eval_rows = {t: heldout_sample(heldout[t], per_task[t]) for t in TASKS}
    seed = config.eval.seed + MONITOR_SEED_OFFSET  # the same monitor draws as the teachers'

    def task_views(model_) -> dict:
        """Both task views of ``model_`` (the trainer's model, or ZeRO-3's plain copy of it)."""
        return views if model_ is model else {"t2i": model_, "edit": views["edit"].with_transformer(
            trainable_module(model_))}

    def monitor_with(tracker_: Tracker):
        def monitor(model_, iteration: int) -> dict[str, float]:
            scores = {}
            for t, view in task_views(model_).items():
                result, grid = reward_evaluation(view, monitor_rows[t], {"heldout": watchers[t]}, config.sampler,
                                                 seed, config.eval.batch_size)
                scores[t] = result["heldout"]
                if iteration % o.grid_every == 0:
                    tracker_.log_image(grid, f"monitor/grid_{t}_{iteration:06d}.png")
            return {"heldout": (scores["t2i"] + scores["edit"]) / 2, **scores}
        return monitor

    def train(tracker_: Tracker):
        trainer = OPDTrainer(
            model, module, teachers, resolved, prompt_sets, routes, {"t2i": o.t2i_fraction, "edit": 1 - o.t2i_fraction},
            guidance_scale=guidance, shift=config.sampler.shift, monitor=monitor_with(tracker_),
            checkpoints=Checkpoints(store, stage, version), config_hash=config.section_hash(*SECTIONS),
            task_models=views,
        )
        result = run_trainer(trainer, tracker_, stage=stage, iterations=o.iterations, resume=resume,
                             progress=progress, stop_after=stop_after)
        return trainer, result

    if rank != 0:
        return follow_rank0(config, store, stage, version, train)
    with stage_context(stage, config, SECTIONS, inputs, tracker=tracker) as ctx:
        start = time.perf_counter()
        trainer, result = train(ctx.tracker)
        train_s = time.perf_counter() - start
        trained = trained_model(trainer, model, result)
        student, grids = {}, []
        for t, view in task_views(trained).items():
            scores, grid = reward_evaluation(view, eval_rows[t], scorers[t], config.sampler, config.eval.seed,
                                             config.eval.batch_size)
            student.update({f"{t}/{k}": v for k, v in scores.items()})
            grids.append(grid)
        recorded = {name: json.loads((fetch(uri) / "metrics.json").read_text()) for name, uri in teacher_uris.items()}
        models = {"base": {k: v for m in recorded.values() for k, v in m["base"].items()}}
        models.update({name: m["teacher"] for name, m in recorded.items()})
        models["student"] = student
        headline = {t: f"{t}/{config.grpo.monitor_reward}" for t in TASKS}
        kept = {}
        for t in TASKS:
            teacher = routes[t]
            if headline[t] in models[teacher] and headline[t] in models["base"]:
                kept[f"{teacher} ({headline[t]})"] = gain_kept(models["base"], models[teacher], student, headline[t])
        metrics = {
            "states": o.states,
            "init": o.init,
            "scored_by": config.grpo.monitor_reward,
            "reward_model": reward_model_uri,
            "iterations": trainer.state.iteration,
            "train_s": round(train_s, 1),
            "wall_s": round(time.perf_counter() - start, 1),
            "student": student,
            "gain_kept": kept,
            "final_loss": float(np.mean([h["train/loss"] for h in trainer.state.history[-10:]])),
            "monitor": trainer.state.monitor,
        }
        if lora is not None:
            save_lora_policy(network, ctx.staging, base_dir)  # merges the adapter: the network's last use
        else:
            save_policy(trained, ctx.staging, base_dir)
        write_history(ctx.staging, trainer.state)
        (ctx.staging / "curves.png").write_bytes(_curves_png(trainer.state.history, trainer.state.monitor, headline,
                                                             config.grpo.monitor_reward))
        (ctx.staging / "table.md").write_text(table_markdown(models, kept))
        grid = np.concatenate([g[:, : min(x.shape[1] for x in grids)] for g in grids], axis=0)
        Image.fromarray(grid).save(ctx.staging / "grid.png")
        ctx.tracker.log_metrics(flat_metrics({"student": student}))
        ctx.tracker.log_image(grid, "grid.png")
        return commit_stage(ctx, stage, SECTIONS, inputs, metrics, output_root)
