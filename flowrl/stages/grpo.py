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
from flowrl.stages.common import StageResult, commit_stage, committed_result, flat_metrics, stage_context, stage_version
from flowrl.stages.filter_prompts import decode_sources, load_prompt_set
from flowrl.storage import ArtifactStore, fetch
from flowrl.tracking import NullTracker, Tracker

SECTIONS = ("run.seed", "world", "sampler", "eval", "grpo", "rewards")
MONITOR_SEED_OFFSET = 7919  # the monitor set is drawn apart from the evaluation set
HEADLINE = {"t2i": "t2i/alignment", "edit": "edit/accuracy"}


def monitor_for(config: FlowRLConfig, task: str, tracker: Tracker):
    """The judge on a fixed held-out prompt set, with the deployment sampler."""
    seed = config.eval.seed + MONITOR_SEED_OFFSET
    n = config.grpo.monitor_per_category
    res = config.world.resolution
    if task == "t2i":
        items = make_t2i_set(seed, n)
        prompts, sources = [e.prompt for e in items], None
    else:
        items = make_edit_set(seed, n)
        prompts, sources = [e.instruction for e in items], render_batch([e.source for e in items], res)
    seeds = [seed * 1_000_003 + i for i in range(len(items))]

    def monitor(model, iteration: int) -> dict[str, float]:
        images = generate(model, prompts, seeds, config.sampler, sources=sources, batch_size=config.eval.batch_size)
        if task == "t2i":
            m = judge.evaluate(t2i_specs=[e.spec for e in items], t2i_images=to_uint8(images))
        else:
            m = judge.evaluate(edit_specs=[e.spec for e in items], edit_sources=to_uint8(sources),
                               edit_outputs=to_uint8(images))
        if iteration % config.grpo.grid_every == 0:
            tracker.log_image(image_grid(to_uint8(images[:: max(1, len(items) // 12)][:12]), 12, scale=4),
                              f"monitor/grid_{iteration:06d}.png")
        return {"heldout": m[HEADLINE[task]], "fidelity": m[f"{task}/fidelity"]}

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
    """{metric: {"base", "teacher", "delta"}} for the task's judge metrics."""
    keys = sorted(k for k in teacher if k.startswith(f"{task}/")) + ["fidelity"]
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
    client = RewardClient(url, task, token=token, timeout_s=g.reward_timeout_s,
                          max_batch=g.prompts_per_iteration * g.group_size, max_in_flight=g.reward_chunks)
    return client, sidecar


def run_grpo(
    config: FlowRLConfig,
    task: str,
    base_uri: str,
    reward_model_uri: str,
    prompts_uri: str,
    *,
    output_root: str | None = None,
    tracker: Tracker | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> StageResult:
    if task not in ("t2i", "edit"):
        raise ValueError(f"task must be t2i or edit, got {task!r}")
    stage = f"grpo_{task}"
    inputs = {"base": base_uri, "reward_model": reward_model_uri, "prompts": prompts_uri}
    done = committed_result(stage, config, SECTIONS, inputs, output_root)
    if done is not None:
        return done
    g = config.grpo
    base_dir = fetch(base_uri)
    model = load_checkpoint(base_dir, expected_family="shapes", cfg_renorm=config.sampler.cfg_renorm)
    reference = copy.deepcopy(model) if g.kl_coef > 0 else None
    frame = load_prompt_set(prompts_uri)
    prompts = PromptSet(list(frame["prompt"]), list(frame["category"]), decode_sources(frame))
    composite = load_shapes_rewards(config, reward_model_uri)[task]
    scale = None
    if g.calibrate:
        scale = json.loads((fetch(prompts_uri) / "metrics.json").read_text())["calibration"]
    store = ArtifactStore(output_root or config.run.artifact_root)
    version = stage_version(stage, config, SECTIONS, inputs)
    rank, _ = dist_info()
    rewards, sidecar = _reward_backend(config, task, composite, reward_model_uri)

    def train(tracker_: Tracker) -> tuple[GRPOTrainer, object]:
        trainer = GRPOTrainer(
            model, model.net, reference, g, prompts, rewards, composite.weight_matrix,
            monitor=monitor_for(config, task, tracker_),
            checkpoints=Checkpoints(store, stage, version), config_hash=config.section_hash(*SECTIONS),
            category_scale=scale,
        )
        if resume:
            trainer.resume()
        result = trainer.train(tracker_.log_metrics, progress=progress, stop_after=stop_after)
        if trainer.state.iteration < g.iterations and not trainer.state.stopped:
            raise InterruptedError(f"{stage}: stopped after iteration {trainer.state.iteration} (stop_after)")
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
            (ctx.staging / "history.json").write_text(json.dumps(
                {"history": trainer.state.history, "monitor": trainer.state.monitor}, indent=1))
            (ctx.staging / "curves.png").write_bytes(_curves_png(trainer.state.history, trainer.state.monitor, task))
            (ctx.staging / "table.md").write_text(table_markdown(rows, task))
            Image.fromarray(report.grid).save(ctx.staging / "grid.png")
            ctx.tracker.log_metrics(flat_metrics({"base": metrics["base"], "teacher": metrics["teacher"]}))
            ctx.tracker.log_image(report.grid, "grid.png")
            return commit_stage(ctx, stage, SECTIONS, inputs, metrics, output_root)
    finally:
        rewards.close()
        if sidecar is not None:
            sidecar.stop()
