"""Stages `grpo_t2i` / `grpo_edit`: GRPO from the base model on the curated
prompts, rewarded by the learned composite reward of the task, watched by
the judge on a fixed held-out monitor set (the reward-hacking monitor).

Outputs: the teacher checkpoint, ``history.json`` (every iteration's
training metrics and every monitor evaluation), ``curves.png`` (training
reward and held-out judge score against iterations), ``table.md`` (base vs
teacher per category on the held-out evaluation sets) and ``grid.png``.
"""

from __future__ import annotations

import copy
import json
import time

import numpy as np
from PIL import Image

from flowrl.config import FlowRLConfig
from flowrl.plots import new_figure, png_of
from flowrl.evaluation import evaluate_shapes, generate, image_grid, to_uint8
from flowrl.models import load_checkpoint, save_checkpoint, set_torch_threads
from flowrl.rewards.shapes_rewards import load_shapes_rewards
from flowrl.rl.distributed import dist_info
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
    run_trainer,
    stage_context,
    stage_version,
    write_history,
)
from flowrl.stages.filter_prompts import decode_sources, load_prompt_set
from flowrl.storage import ArtifactStore, fetch
from flowrl.tracking import NullTracker, Tracker

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


def _curves_png(history: list[dict], monitor: list[dict], task: str) -> bytes:
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
               label="held-out judge")
    other.set_ylabel(f"judge {HEADLINE[task]}")
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


def _reward_backend(config: FlowRLConfig, task: str, composite, reward_model_uri: str):
    """(the submitter GRPO scores through, the sidecar server process or None)."""
    g = config.grpo
    if g.reward_backend == "inprocess":
        return LocalRewards(composite), None
    import os
    import tempfile
    from pathlib import Path

    from flowrl.rewards.client import RewardClient
    from flowrl.rewards.server import free_port, launch_server

    token = os.environ.get(g.reward_token_env) if g.reward_token_env else None
    if g.reward_token_env and not token:
        raise ValueError(f"grpo.reward_token_env: environment variable {g.reward_token_env} is unset or empty")
    sidecar = None
    url = g.reward_url
    if url is None:
        log_path = Path(tempfile.mkdtemp(prefix="flowrl-reward-server-")) / "server.log"
        sidecar = launch_server(
            {task: "flowrl.rewards.shapes_rewards:served_composite"}, port=free_port(), log_path=log_path,
            reward_kwargs={task: {"config": config.to_dict(), "reward_model_uri": reward_model_uri, "task": task}},
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            sidecar.wait_until_healthy(timeout_s=120)
        except Exception:
            sidecar.stop()
            raise
        url = sidecar.base_url
    client = RewardClient(url, task, token=token, timeout_s=g.reward_timeout_s, retries=g.reward_retries,
                          max_batch=g.prompts_per_iteration * g.group_size, max_in_flight=g.reward_chunks)
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
    done = committed_result(stage, config, SECTIONS, inputs, output_root)
    if done is not None:
        return done
    g = config.grpo
    base_dir = fetch(base_uri)
    model = load_checkpoint(base_dir, expected_family="shapes", cfg_renorm=config.sampler.cfg_renorm)
    reference = copy.deepcopy(model) if g.kl_coef > 0 else None
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
            base_metrics = json.loads((base_dir / "metrics.json").read_text())
            rows = comparison(base_metrics, report.metrics, task)
            metrics = {
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
            save_checkpoint(model, ctx.staging)
            write_history(ctx.staging, trainer.state)
            (ctx.staging / "curves.png").write_bytes(_curves_png(trainer.state.history, trainer.state.monitor, task))
            (ctx.staging / "table.md").write_text(table_markdown(rows, task))
            Image.fromarray(report.grid).save(ctx.staging / "grid.png")
            ctx.tracker.log_metrics(flat_metrics({"base": metrics["base"], "teacher": metrics["teacher"]}))
            ctx.tracker.log_image(report.grid, "grid.png")
            return commit_stage(ctx, stage, SECTIONS, inputs, metrics, output_root)
    finally:
        for submitter, sidecar in backends.values():
            submitter.close()
            if sidecar is not None:
                sidecar.stop()
