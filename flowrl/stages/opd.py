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

from flowrl.config import ConfigError, FlowRLConfig, name_value_pairs, safe_name
from flowrl.evaluators import evaluator_for
from flowrl.models import load_frozen_network, pretrained_path
from flowrl.models.families import family_of
from flowrl.models.lora import ADAPTER_DIR, AdapterView, load_adapter
from flowrl.models.qwen_image import same_component
from flowrl.plots import new_figure, png_of
from flowrl.prompt_files import decode_sources
from flowrl.rl.algorithms import algorithm
from flowrl.rl.distributed import dist_info
from flowrl.rl.grpo import PromptSet
from flowrl.rl.opd import parse_routes
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
from flowrl.stages.filter_prompts import check_prompt_tasks, load_heldout_set, load_prompt_set
from flowrl.stages.grpo import model_key, task_rewards
from flowrl.stages.policy import Policy, trainable_policy
from flowrl.stages.registry import stage_sections
from flowrl.storage import ArtifactError, ArtifactStore, fetch
from flowrl.tracking import Tracker

log = logging.getLogger(__name__)

SECTIONS = stage_sections("opd")
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
    return _distil(config, base_uri, teacher_uris, prompts_uris, stage, inputs, routes, init_name,
                   output_root=output_root, tracker=tracker, resume=resume, progress=progress, stop_after=stop_after)


# --------------------------------------------------------------------------- every family


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


def _teacher_placement(config: FlowRLConfig, teacher_uris: dict[str, str]) -> tuple[dict, dict]:
    """({teacher: device} of ``opd.teacher_devices``, {teacher: the task whose view it sits behind}),
    checked before any model loads: a family whose one model serves both tasks puts every teacher
    behind it; the others read the task each teacher's GRPO run trained."""
    devices = dict(name_value_pairs(config.opd.teacher_devices, "opd.teacher_devices", "TEACHER=DEVICE"))
    unknown = sorted(set(devices) - set(teacher_uris))
    if unknown:
        raise ConfigError(f"opd.teacher_devices: no teacher named {unknown[0]!r} (given: {', '.join(teacher_uris)})")
    if family_of(config).one_model_for_tasks:
        return devices, {name: "t2i" for name in teacher_uris}
    return devices, _teacher_tasks(teacher_uris)


def _teachers(config: FlowRLConfig, policy: Policy, views: dict, teacher_uris: dict[str, str], base_dir,
              init_name: str | None, devices: dict[str, str], teacher_task: dict[str, str]) -> dict:
    """{name: the teacher's model}: its network behind the student's view of the task it was trained on
    (frozen, on the device ``opd.teacher_devices`` names, else the student's). A LoRA teacher of the
    student's own pretrained network is only its adapter, loaded beside the student's."""
    home = str(next(policy.module.parameters()).device)  # the student's device
    teachers = {}
    for name, uri in teacher_uris.items():
        teacher_dir, task = fetch(uri), teacher_task[name]
        if policy.lora and name not in devices and init_name is None and _adapter_on(teacher_dir, task, base_dir):
            load_adapter(policy.network, teacher_dir / ADAPTER_DIR, name)  # costs its adapter only
            teachers[name] = policy.family.with_trainable(views[task], AdapterView(policy.network, name))
            log.info("opd: teacher %s is its LoRA adapter on the student's network", name)
        else:
            network = load_frozen_network(teacher_dir, config, task, devices.get(name, home))
            teachers[name] = policy.family.with_trainable(views[task], network)
            log.info("opd: teacher %s is its whole network (on %s)", name, devices.get(name, home))
    return teachers


def _evaluator(config: FlowRLConfig, teacher_uris: dict[str, str], prompts_uris: dict[str, str], curated: dict,
               store: ArtifactStore):
    """The judge, or the reward models the teachers were trained against on the same held-out prompts and
    seeds."""
    if family_of(config).has_judge:
        return evaluator_for(config, TASKS)
    _teacher_tasks(teacher_uris)  # a teacher that is no GRPO artifact is named as such, first
    reward_model_uri = _reward_model_of(teacher_uris, store)
    return evaluator_for(config, TASKS, reward_model_uri=reward_model_uri,
                         composites=task_rewards(config, reward_model_uri, prompts_uris, curated),
                         heldout={t: load_heldout_set(prompts_uris[t]) for t in TASKS})


def _scoreboard(evaluator, base_dir, teacher_uris: dict[str, str], student: dict, routes: dict[str, str]):
    """({"base", each teacher, "student": scores}, {teacher (headline): share of its gain the student kept}):
    the teachers' scores as they recorded them, the base's as it recorded them or else as the teachers did."""
    recorded = {name: evaluator.recorded(fetch(uri)) for name, uri in teacher_uris.items()}
    for name, scores in recorded.items():
        if scores is None:
            raise ArtifactError(f"{teacher_uris[name]}: teacher {name!r} recorded no {evaluator.name} scores of "
                                "itself (not a GRPO artifact)")
    base = evaluator.recorded(base_dir)
    if base is None:  # the teachers recorded the base's scores beside their own
        base = {k: v for uri in teacher_uris.values()
                for k, v in json.loads((fetch(uri) / "metrics.json").read_text())["base"].items()}
    models = {"base": base, **recorded, "student": student}
    kept = {}
    for t in TASKS:  # the teacher bound to each task, on that task's headline metric
        teacher, key = routes[t], evaluator.headline(t)
        if key in models[teacher] and key in models["base"]:
            kept[f"{teacher} ({key})"] = gain_kept(models["base"], models[teacher], student, key)
    return models, kept


def _distil(config: FlowRLConfig, base_uri: str, teacher_uris: dict[str, str], prompts_uris: dict[str, str],
            stage: str, inputs: dict, routes: dict[str, str], init_name: str | None, *, output_root, tracker,
            resume, progress, stop_after) -> StageResult:
    """OPD for every model family: one student network behind a view of each task (one model serves both on
    shapes), each teacher's network behind the student's view of its task; the evaluator (the judge, or the
    teachers' held-out reward model) watches both tasks' held-out prompts and scores the student."""
    # long: the stage's one flow in order (setup, the training closure other ranks run too, commit); its
    # parts are the helpers above
    o = config.opd
    trainer_class = algorithm(o.algorithm, "distill").trainer
    family = family_of(config)
    store = ArtifactStore(output_root or config.run.artifact_root)
    devices, teacher_task = _teacher_placement(config, teacher_uris)
    curated = {t: load_prompt_set(prompts_uris[t]) for t in TASKS}
    for t in TASKS:
        if not len(curated[t]):
            raise ArtifactError(f"{prompts_uris[t]}: no kept {t} prompts")
    evaluator = _evaluator(config, teacher_uris, prompts_uris, curated, store)
    base_dir = fetch(base_uri)
    loaded = family.load_task_views(fetch(teacher_uris[init_name]) if init_name else base_dir, config)
    policy = trainable_policy(config, loaded["t2i"], seed=o.seed, views=loaded)
    views = policy.views(loaded)
    model = policy.model
    teachers = _teachers(config, policy, views, teacher_uris, base_dir, init_name, devices, teacher_task)
    prompt_sets = {t: PromptSet(list(f["prompt"]), list(f["category"]), decode_sources(f)) for t, f in curated.items()}
    version = stage_version(stage, config, SECTIONS, inputs)
    rank, _ = dist_info()
    guidance = o.guidance_scale if o.guidance_scale is not None else config.sampler.guidance_scale
    resolved = dataclasses.replace(o, num_steps=o.num_steps or config.sampler.num_steps)

    def task_views(model_) -> dict:
        """Both task views of ``model_`` (the trainer's model, or ZeRO-3's plain copy of it)."""
        if model_ is model:
            return views
        module = family.trainable_module(model_)
        return {t: model_ if v is model else family.with_trainable(v, module) for t, v in views.items()}

    def train(tracker_: Tracker):
        trainer = trainer_class(
            model, policy.module, teachers, resolved, prompt_sets, routes,
            {"t2i": o.t2i_fraction, "edit": 1 - o.t2i_fraction}, guidance_scale=guidance, shift=config.sampler.shift,
            monitor=evaluator.monitor(tracker_, task_views, o.loop.monitor_per_category, o.loop.grid_every),
            checkpoints=Checkpoints(store, stage, version), config_hash=config.section_hash(*SECTIONS),
            task_models=views,
        )
        result = run_trainer(trainer, tracker_, stage=stage, iterations=o.loop.iterations, resume=resume,
                             progress=progress, stop_after=stop_after)
        return trainer, result

    if rank != 0:
        return follow_rank0(config, store, stage, version, train)
    with stage_context(stage, config, SECTIONS, inputs, tracker=tracker) as ctx:
        start = time.perf_counter()
        trainer, result = train(ctx.tracker)
        train_s = time.perf_counter() - start
        trained = trained_model(trainer, model, result)
        student, grid = evaluator.evaluate(task_views(trained))
        models, kept = _scoreboard(evaluator, base_dir, teacher_uris, student, routes)
        headline = {t: evaluator.headline(t) for t in TASKS}
        metrics = {
            "states": o.states,
            "init": o.init,
            **evaluator.provenance(stage),
            "iterations": trainer.state.iteration,
            "train_s": round(train_s, 1),
            "wall_s": round(time.perf_counter() - start, 1),
            "student": student,
            "gain_kept": kept,
            "final_loss": float(np.mean([h["train/loss"] for h in trainer.state.history[-10:]])),
            "monitor": trainer.state.monitor,
        }
        policy.save(trained, ctx.staging, base_dir)
        write_history(ctx.staging, trainer.state)
        (ctx.staging / "curves.png").write_bytes(_curves_png(trainer.state.history, trainer.state.monitor, headline,
                                                             evaluator.name))
        (ctx.staging / "table.md").write_text(table_markdown(models, kept))
        Image.fromarray(grid).save(ctx.staging / "grid.png")
        ctx.tracker.log_metrics(flat_metrics({"student": student}))
        ctx.tracker.log_image(grid, "grid.png")
        return commit_stage(ctx, stage, SECTIONS, inputs, metrics, output_root)
