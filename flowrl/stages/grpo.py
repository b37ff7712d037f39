"""Stages `grpo_t2i` / `grpo_edit`: GRPO from the base model on the curated
prompts, rewarded by the learned composite reward of the task, watched by
the judge on a fixed held-out monitor set (the reward-hacking monitor).

For ``qwen_image`` (no judge) a held-out reward model (``grpo.monitor_reward``)
takes the judge's place on the filter's held-out prompts, and the teacher
artifact is its transformer beside the base's ``reference.json``. With LoRA
(``model.qwen_image.lora``) the adapters train, the KL reference and the base
it is scored against are the transformer with adapters off, and the artifact
also holds the adapter (``adapter/``; ``transformer/`` has it merged).

Outputs: the teacher checkpoint, ``history.json`` (every iteration's
training metrics and every monitor evaluation), ``curves.png`` (training
reward and held-out judge score against iterations), ``table.md`` (base vs
teacher per category on the held-out evaluation sets) and ``grid.png``.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time

import numpy as np
import torch
from PIL import Image

from flowrl.config import ConfigError, FlowRLConfig
from flowrl.plots import new_figure, png_of
from flowrl.evaluation import evaluate_shapes, generate, heldout_sample, image_grid, reward_evaluation, to_uint8
from flowrl.models import (
    load_checkpoint, load_policy, save_checkpoint, save_policy, trainable_module, trained_state,
)
from flowrl.models.base import Condition, FlowModel
from flowrl.models.families import family_of
from flowrl.models.lora import STUDENT, AdapterView, add_adapter, lora_settings, save_lora_policy
from flowrl.rewards.shapes_rewards import load_shapes_rewards
from flowrl.rl.distributed import dist_info
from flowrl.rl.engine import trainable_attr
from flowrl.rl.grpo import GRPOTrainer, LocalRewards, PromptSet
from flowrl.rl.trainer import Checkpoints
from flowrl.shapes import judge
from flowrl.shapes.edits import make_edit_set
from flowrl.shapes.prompts import make_t2i_set
from flowrl.shapes.render import render_batch
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
from flowrl.prompt_files import decode_sources
from flowrl.stages.filter_prompts import check_prompt_tasks, load_heldout_set, load_prompt_set
from flowrl.storage import ArtifactStore, fetch
from flowrl.tracking import Tracker

SECTIONS = ("run.seed", "world", "sampler", "eval", "grpo", "rewards")
MONITOR_SEED_OFFSET = 7919  # the monitor set is drawn apart from the evaluation set
HEADLINE = {"t2i": "t2i/alignment", "edit": "edit/accuracy", "mixed": "mean of t2i/alignment and edit/accuracy"}


def monitor_for(config: FlowRLConfig, task: str, tracker: Tracker, per_category: int | None = None,
                grid_every: int | None = None):
    """The judge on a fixed held-out prompt set, with the deployment sampler.

    ``task`` t2i or edit: ``heldout`` is that task's headline metric; ``mixed``
    (Mix-RL, OPD): both sets, ``heldout`` the mean of the two headlines,
    each also given under its task's name."""
    seed = config.eval.seed + MONITOR_SEED_OFFSET
    n = per_category or config.grpo.monitor_per_category
    grid_every = grid_every or config.grpo.grid_every
    res = config.world.resolution
    tasks = ("t2i", "edit") if task == "mixed" else (task,)
    t2i_items = make_t2i_set(seed, n) if "t2i" in tasks else []
    edit_items = make_edit_set(seed, n) if "edit" in tasks else []
    sources = render_batch([e.source for e in edit_items], res) if edit_items else None

    def monitor(model, iteration: int) -> dict[str, float]:
        scores, grids = {}, []
        if t2i_items:
            seeds = [seed * 1_000_003 + i for i in range(len(t2i_items))]
            images = generate(model, [e.prompt for e in t2i_items], seeds, config.sampler,
                              batch_size=config.eval.batch_size)
            m = judge.evaluate(t2i_specs=[e.spec for e in t2i_items], t2i_images=to_uint8(images))
            scores["t2i"], scores["t2i_fidelity"] = m["t2i/alignment"], m["t2i/fidelity"]
            grids.append(images[:: max(1, len(t2i_items) // 12)][:12])
        if edit_items:
            seeds = [seed * 1_000_003 + i for i in range(len(edit_items))]
            images = generate(model, [e.instruction for e in edit_items], seeds, config.sampler, sources=sources,
                              batch_size=config.eval.batch_size)
            m = judge.evaluate(edit_specs=[e.spec for e in edit_items], edit_sources=to_uint8(sources),
                               edit_outputs=to_uint8(images))
            scores["edit"], scores["edit_fidelity"] = m["edit/accuracy"], m["edit/fidelity"]
            grids.append(images[:: max(1, len(edit_items) // 12)][:12])
        if iteration % grid_every == 0:
            for name, images in zip(tasks, grids):
                tracker.log_image(image_grid(to_uint8(images), 12, scale=4), f"monitor/grid_{name}_{iteration:06d}.png")
        if task != "mixed":
            return {"heldout": scores[task], "fidelity": scores[f"{task}_fidelity"]}
        return {"heldout": (scores["t2i"] + scores["edit"]) / 2, "t2i": scores["t2i"], "edit": scores["edit"],
                "fidelity": (scores["t2i_fidelity"] + scores["edit_fidelity"]) / 2}

    return monitor


def model_key(config: FlowRLConfig) -> dict[str, str]:
    """Production: the model section (LoRA, where the text encoder runs, dtype, size) shapes what GRPO and OPD
    train, and the base URI carries it only while the base is rerun with the same config; an input of the
    stage's version (as the bench's). A shapes checkpoint carries its model."""
    return family_of(config).model_key(config)


def frozen_copy(module: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """A frozen (eval, no grad) copy of ``module`` on ``device``, made one tensor at a time: the
    module's own device never holds a second copy of its weights."""
    memo: dict[int, torch.Tensor] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        moved = tensor.detach().to(device, copy=True)
        memo[id(tensor)] = torch.nn.Parameter(moved, requires_grad=False) if isinstance(
            tensor, torch.nn.Parameter) else moved
    return copy.deepcopy(module, memo).to(device).requires_grad_(False).eval()


class OffloadedModel:
    """A frozen model whose network lives on another device (the CPU): inputs move there, velocities
    come back to the caller's device. Only what the GRPO objective calls (:meth:`velocity`)."""

    def __init__(self, model: FlowModel, device: str | torch.device):
        self.model, self.device = model, torch.device(device)
        self.cfg_renorm_dim = model.cfg_renorm_dim

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        return self.model.velocity(x.to(self.device), t.to(self.device), cond.to(self.device)).to(x.device)


def offloaded_reference(model: FlowModel, module: torch.nn.Module, device: str) -> OffloadedModel:
    """The frozen KL reference of full-parameter training with ``grpo.reference_device: cpu``: a copy of
    the starting weights of ``module`` (``model``'s trained network) made on ``device``, run there."""
    view = copy.copy(model)
    setattr(view, trainable_attr(model, module), frozen_copy(module, device))
    return OffloadedModel(view, device)


def place_text_encoders(config: FlowRLConfig, models) -> None:
    """``model.qwen_image.text_encoder_device``: cpu moves each view's text encoder off the accelerator;
    offload keeps it in host memory and has each prompt encoding run it on the accelerator."""
    where = config.model.qwen_image.text_encoder_device
    if where != "same":
        for model in models:
            model.move_text_encoder("cpu", offload=where == "offload")


def _curves_png(history: list[dict], monitor: list[dict], task: str, heldout_label: str | None = None) -> bytes:
    fig, ax = new_figure(7, 4)
    rewards = [h["train/reward"] for h in history]
    ax.plot(range(1, len(rewards) + 1), rewards, color="#4c72b0", alpha=0.35, label="training reward")
    if len(rewards) >= 10:
        smooth = np.convolve(rewards, np.ones(10) / 10, mode="valid")
        ax.plot(range(10, len(rewards) + 1), smooth, color="#4c72b0", label="training reward (10-it mean)")
    ax.set_xlabel("iteration")
    ax.set_ylabel("composite reward")
    other = ax.twinx()
    other.plot([m["iteration"] for m in monitor], [m["heldout"] for m in monitor], "o-", color="#c44e52",
               label=heldout_label or "held-out judge")
    other.set_ylabel(heldout_label or f"judge {HEADLINE[task]}")
    lines = ax.get_legend_handles_labels()[0] + other.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + other.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="lower right")
    ax.set_title(f"GRPO {task}")
    return png_of(fig)


def comparison(base: dict, teacher: dict, task: str) -> dict[str, dict[str, float]]:
    """{metric: {"base", "teacher", "delta"}} for the task's judge metrics (both tasks' for mixed)."""
    prefixes = ("t2i/", "edit/") if task == "mixed" else (f"{task}/",)
    keys = sorted(k for k in teacher if k.startswith(prefixes)) + ["fidelity"]
    return {k: {"base": base[k], "teacher": teacher[k], "delta": teacher[k] - base[k]} for k in keys if k in base}


def table_markdown(rows: dict[str, dict[str, float]], task: str) -> str:
    lines = [f"| {task} metric | base | teacher | delta |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {v['base']:.3f} | {v['teacher']:.3f} | {v['delta']:+.3f} |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"


def _teacher_metrics(task: str, trainer: GRPOTrainer, rows: dict, train_s: float, start: float) -> dict:
    """What both families record of a GRPO run: the task, how it ran, base against teacher, the monitor."""
    return {
        "task": task,
        "iterations": trainer.state.iteration,
        "stopped_early": trainer.state.stopped or "",
        "train_s": round(train_s, 1),
        "wall_s": round(time.perf_counter() - start, 1),
        "base": {k: v["base"] for k, v in rows.items()},
        "teacher": {k: v["teacher"] for k, v in rows.items()},
        "final_train_reward": float(np.mean([h["train/reward"] for h in trainer.state.history[-10:]])),
        "monitor": trainer.state.monitor,
    }


def _write_outputs(ctx, trainer: GRPOTrainer, rows: dict, task: str, grid: np.ndarray, metrics: dict,
                   heldout_label: str | None = None) -> None:
    """history.json, curves.png, table.md and grid.png into the staging directory, and to the tracker."""
    write_history(ctx.staging, trainer.state)
    (ctx.staging / "curves.png").write_bytes(_curves_png(trainer.state.history, trainer.state.monitor, task,
                                                         heldout_label))
    (ctx.staging / "table.md").write_text(table_markdown(rows, task))
    Image.fromarray(grid).save(ctx.staging / "grid.png")
    ctx.tracker.log_metrics(flat_metrics({"base": metrics["base"], "teacher": metrics["teacher"]}))
    ctx.tracker.log_image(grid, "grid.png")


def reward_token(config: FlowRLConfig) -> str | None:
    """The reward server's bearer token from the variable ``grpo.reward_token_env`` names (None when it
    names none); a ConfigError when that variable is unset or empty (checked before any work)."""
    name = config.grpo.reward_token_env
    if not name or config.grpo.reward_backend == "inprocess":
        return None
    token = os.environ.get(name)
    if not token:
        raise ConfigError(f"grpo.reward_token_env: environment variable {name} is unset or empty")
    return token


def _reward_backend(config: FlowRLConfig, task: str, composite, reward_model_uri: str,
                    prompts_uri: str | None = None):
    """(the submitter GRPO scores through, the sidecar server process or None). A sidecar
    serves the shapes composite, or for qwen_image the production one (``prompts_uri``
    gives it the prompts' categories): one per rank, on the rank's GPU, or with
    ``grpo.reward_gpus`` one per node, started by local rank 0 on GPUs of its own."""
    g = config.grpo
    if g.reward_backend == "inprocess":
        return LocalRewards(composite), None
    import tempfile
    from pathlib import Path

    from flowrl.rewards.client import RewardClient
    from flowrl.rewards.server import free_port, launch_server, node_sidecar, sidecar_env

    token = reward_token(config)
    family = family_of(config)
    # images per request: a whole submission for the small shapes images; one prompt group of 1024 x 1024
    # images for qwen_image, so a request body stays in the tens of MB the server accepts
    per_request = family.reward_request_images(config)
    size = family.image_size(config)
    sidecar = None
    url = g.reward_url
    if url is None:
        log_path = Path(tempfile.mkdtemp(prefix="flowrl-reward-server-")) / "server.log"
        kwargs = {"config": config.to_dict(), "reward_model_uri": reward_model_uri, "task": task}
        factory = family.reward_factory
        kwargs.update(family.reward_server_kwargs(prompts_uri, spread=bool(g.reward_gpus)))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if g.reward_gpus:  # the GPUs after the node's training processes', the scorers spread over them
            env = sidecar_env(env, int(os.environ.get("LOCAL_WORLD_SIZE", "1")), g.reward_gpus,
                              torch.cuda.device_count() if torch.cuda.is_available() else None)

        def start():
            server = launch_server(
                {task: factory}, port=free_port(), log_path=log_path, reward_kwargs={task: kwargs},
                env=env, max_batch=per_request, image_size=size,
                token_env=g.reward_token_env,  # the sidecar asks for the same token the client sends
            )
            try:
                server.wait_until_healthy(timeout_s=120)
            except Exception:
                server.stop()
                raise
            return server

        if g.reward_gpus:
            url, sidecar = node_sidecar(start, int(os.environ.get("LOCAL_RANK", "0")))
        else:
            sidecar = start()
            url = sidecar.base_url
    client = RewardClient(url, task, token=token, timeout_s=g.reward_timeout_s, retries=g.reward_retries,
                          max_batch=per_request, max_in_flight=g.reward_chunks)
    return client, sidecar


def run_grpo(
    config: FlowRLConfig,
    task: str,
    base_uri: str,
    reward_model_uri: str,
    prompts_uri: str | dict[str, str],
    *,
    output_root: str | None = None,
    tracker: Tracker | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> StageResult:
    """GRPO on ``task`` (t2i, edit) from its curated prompts; ``mixed`` is the
    Mix-RL baseline: ``prompts_uri`` {"t2i": uri, "edit": uri}, each prompt
    scored by its own task's composite, every iteration drawing
    ``grpo.prompts_per_iteration`` groups from each task (the budget of the
    two teachers together)."""
    if task not in ("t2i", "edit", "mixed"):
        raise ValueError(f"task must be t2i, edit or mixed, got {task!r}")
    tasks = ("t2i", "edit") if task == "mixed" else (task,)
    if task == "mixed":
        if not isinstance(prompts_uri, dict) or set(prompts_uri) != set(tasks):
            raise ValueError("task mixed: prompts must be {'t2i': uri, 'edit': uri}")
        uris = dict(prompts_uri)
    else:
        if isinstance(prompts_uri, dict):
            raise ValueError(f"task {task}: prompts is one filter_prompts artifact, not a mapping")
        uris = {task: prompts_uri}
    stage = f"grpo_{task}"
    inputs = {"base": base_uri, "reward_model": reward_model_uri}
    inputs.update({"prompts": uris[task]} if task != "mixed" else {f"prompts_{t}": uris[t] for t in tasks})
    inputs.update(model_key(config))
    done = committed_result(stage, config, SECTIONS, inputs, output_root, tracker)
    if done is not None:
        return done
    check_prompt_tasks(uris)  # the cheap checks of user input before any work
    reward_token(config)
    if family_of(config).from_pretrained:
        if task == "mixed":
            raise ConfigError("grpo --task mixed (Mix-RL) runs on the shapes family only: on qwen_image it would need "
                             "the T2I and edit pipeline views of one transformer in one trainer; set opd.mix_rl: false")
        return _run_grpo_pretrained(config, task, base_uri, reward_model_uri, uris[task], stage, inputs,
                                    output_root=output_root, tracker=tracker, resume=resume, progress=progress,
                                    stop_after=stop_after)
    g = config.grpo
    base_dir = fetch(base_uri)
    model = load_checkpoint(base_dir, expected_family="shapes", cfg_renorm=config.sampler.cfg_renorm)
    reference = None
    if g.kl_coef > 0:
        reference = copy.deepcopy(model) if g.reference_device == "same" else offloaded_reference(
            model, model.net, g.reference_device)
    prompt_sets = {}
    for t in tasks:
        frame = load_prompt_set(uris[t])
        prompt_sets[t] = PromptSet(list(frame["prompt"]), list(frame["category"]), decode_sources(frame))
    composites = load_shapes_rewards(config, reward_model_uri)
    scale = None
    if g.calibrate:
        scale = {}
        for t in tasks:  # categories (T2I) and kinds (edit) never share a name
            scale.update(json.loads((fetch(uris[t]) / "metrics.json").read_text())["calibration"])
    store = ArtifactStore(output_root or config.run.artifact_root)
    version = stage_version(stage, config, SECTIONS, inputs)
    rank, _ = dist_info()
    backends = {t: _reward_backend(config, t, composites[t], reward_model_uri) for t in tasks}
    rewards = {t: b[0] for t, b in backends.items()}

    def train(tracker_: Tracker) -> tuple[GRPOTrainer, object]:
        if task == "mixed":
            prompts_arg, rewards_arg = prompt_sets, rewards
            weights_arg = {t: composites[t].weight_matrix for t in tasks}
        else:
            prompts_arg, rewards_arg, weights_arg = prompt_sets[task], rewards[task], composites[task].weight_matrix
        trainer = GRPOTrainer(
            model, model.net, reference, g, prompts_arg, rewards_arg, weights_arg,
            monitor=monitor_for(config, task, tracker_),
            checkpoints=Checkpoints(store, stage, version), config_hash=config.section_hash(*SECTIONS),
            category_scale=scale,
        )
        result = run_trainer(trainer, tracker_, stage=stage, iterations=g.iterations, resume=resume,
                             progress=progress, stop_after=stop_after)
        return trainer, result

    try:
        if rank != 0:
            return follow_rank0(config, store, stage, version, train)
        with stage_context(stage, config, SECTIONS, inputs, tracker=tracker) as ctx:
            start = time.perf_counter()
            trainer, result = train(ctx.tracker)
            train_s = time.perf_counter() - start
            model = trained_model(trainer, model, result)
            report = evaluate_shapes(model, config)
            base_metrics = json.loads((base_dir / "metrics.json").read_text())
            rows = comparison(base_metrics, report.metrics, task)
            metrics = _teacher_metrics(task, trainer, rows, train_s, start)
            save_checkpoint(model, ctx.staging)
            _write_outputs(ctx, trainer, rows, task, report.grid, metrics)
            return commit_stage(ctx, stage, SECTIONS, inputs, metrics, output_root)
    finally:
        for submitter, sidecar in backends.values():
            submitter.close()
            if sidecar is not None:
                sidecar.stop()


# --------------------------------------------------------------------------- qwen_image: no judge


def _run_grpo_pretrained(config: FlowRLConfig, task: str, base_uri: str, reward_model_uri: str, prompts_uri: str,
                         stage: str, inputs: dict, *, output_root, tracker, resume, progress, stop_after) -> StageResult:
    """GRPO of a pretrained family (qwen_image): the same trainer, with the production
    composite of VLM scorers, and a held-out reward model where the shapes world has its judge:
    it watches the filter's held-out prompts for hacking and scores base against teacher."""
    from flowrl.rewards.production import (
        ReleasedAfterScoring, load_monitor_scorer, load_production_rewards, prompt_categories,
    )

    g = config.grpo
    base_dir = fetch(base_uri)
    curated, heldout = load_prompt_set(prompts_uri), load_heldout_set(prompts_uri)
    composite = load_production_rewards(config, reward_model_uri, task, prompt_categories(curated, heldout))
    watcher = load_monitor_scorer(reward_model_uri, task, g.monitor_reward, composite)
    model = load_policy(base_dir, config, task)
    place_text_encoders(config, [model])
    lora = lora_settings(config)
    if lora is not None:  # adapters train; the base is the transformer with them off
        network = model.transformer
        add_adapter(network, lora, seed=g.seed)
        module = AdapterView(network, STUDENT)
        base_view = model.with_transformer(AdapterView(network, None))
        model = model.with_transformer(module)
        reference = base_view if g.kl_coef > 0 else None
    else:
        module = trainable_module(model)
        reference = None
        if g.kl_coef > 0:
            reference = model.with_transformer(copy.deepcopy(module).requires_grad_(False).eval()) if (
                g.reference_device == "same") else offloaded_reference(model, module, g.reference_device)
    prompt_set = PromptSet(list(curated["prompt"]), list(curated["category"]), decode_sources(curated))
    scale = json.loads((fetch(prompts_uri) / "metrics.json").read_text())["calibration"] if g.calibrate else None
    store = ArtifactStore(output_root or config.run.artifact_root)
    version = stage_version(stage, config, SECTIONS, inputs)
    rank, _ = dist_info()
    submitter, sidecar = _reward_backend(config, task, composite, reward_model_uri, prompts_uri)
    monitor_rows = heldout_sample(heldout, g.monitor_per_category)
    eval_rows = heldout_sample(heldout, config.eval.t2i_per_category if task == "t2i" else config.eval.edit_per_kind)
    seed = config.eval.seed + MONITOR_SEED_OFFSET

    def monitor_with(tracker_: Tracker):
        def monitor(model_, iteration: int) -> dict[str, float]:  # the watcher is loaded for the call only
            scores, grid = reward_evaluation(model_, monitor_rows, {"heldout": ReleasedAfterScoring(watcher)},
                                             config.sampler, seed, config.eval.batch_size)
            if iteration % g.grid_every == 0:
                tracker_.log_image(grid, f"monitor/grid_{task}_{iteration:06d}.png")
            return {"heldout": scores["heldout"]}
        return monitor

    def train(tracker_: Tracker):
        trainer = GRPOTrainer(
            model, module, reference, g, prompt_set, submitter, composite.weight_matrix,
            monitor=monitor_with(tracker_), checkpoints=Checkpoints(store, stage, version),
            config_hash=config.section_hash(*SECTIONS), category_scale=scale,
        )
        result = run_trainer(trainer, tracker_, stage=stage, iterations=g.iterations, resume=resume,
                             progress=progress, stop_after=stop_after)
        return trainer, result

    # the final evaluation loads one scorer at a time
    scorers = {name: ReleasedAfterScoring(r) for name, r in {**dict(composite.components),
                                                             g.monitor_reward: watcher}.items()}
    try:
        if rank != 0:
            return follow_rank0(config, store, stage, version, train)
        with stage_context(stage, config, SECTIONS, inputs, tracker=tracker) as ctx:
            start = time.perf_counter()
            trainer, result = train(ctx.tracker)
            train_s = time.perf_counter() - start
            model = trained_model(trainer, model, result)
            teacher_scores, grid = reward_evaluation(model, eval_rows, scorers, config.sampler, config.eval.seed,
                                                     config.eval.batch_size)
            if lora is not None:  # the base is the transformer with adapters off; exporting merges them, last
                base_scores, _ = reward_evaluation(base_view, eval_rows, scorers, config.sampler, config.eval.seed,
                                                   config.eval.batch_size)
                save_lora_policy(network, ctx.staging, base_dir)
            else:
                save_policy(model, ctx.staging, base_dir)
                # the base on the same prompts and seeds: its weights back into the same module (no second copy)
                trainable_module(model).load_state_dict(trained_state(base_dir, config, task))
                base_scores, _ = reward_evaluation(model, eval_rows, scorers, config.sampler, config.eval.seed,
                                                   config.eval.batch_size)
            rows = {f"{task}/{k}": {"base": base_scores[k], "teacher": teacher_scores[k],
                                    "delta": teacher_scores[k] - base_scores[k]} for k in sorted(base_scores)}
            metrics = {
                **_teacher_metrics(task, trainer, rows, train_s, start),
                "scored_by": {"components": list(composite.component_names), "heldout": g.monitor_reward},
                "heldout_prompts": len(eval_rows),
            }
            _write_outputs(ctx, trainer, rows, task, grid, metrics, f"held-out {g.monitor_reward} reward")
            return commit_stage(ctx, stage, SECTIONS, inputs, metrics, output_root)
    finally:
        submitter.close()
        if sidecar is not None:
            sidecar.stop()
