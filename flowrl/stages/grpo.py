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

import json
import os
import time

import numpy as np
import torch
from PIL import Image

from flowrl.config import ConfigError, FlowRLConfig
from flowrl.evaluators import MONITOR_SEED_OFFSET, evaluator_for
from flowrl.models.families import family_of
from flowrl.plots import new_figure, png_of
from flowrl.prompt_files import decode_sources
from flowrl.rewards.registry import load_rewards, load_task_rewards
from flowrl.rl.algorithms import algorithm
from flowrl.rl.distributed import dist_info
from flowrl.rl.grpo import GRPOTrainer, LocalRewards, PromptSet
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
from flowrl.stages.policy import trainable_policy
from flowrl.stages.registry import stage_sections
from flowrl.storage import ArtifactStore, fetch
from flowrl.tracking import Tracker

SECTIONS = stage_sections("grpo")
HEADLINE = {"t2i": "t2i/alignment", "edit": "edit/accuracy", "mixed": "mean of t2i/alignment and edit/accuracy"}
__all__ = ["run_grpo", "MONITOR_SEED_OFFSET", "SECTIONS", "HEADLINE"]


def model_key(config: FlowRLConfig) -> dict[str, str]:
    """Production: the model section (LoRA, where the text encoder runs, dtype, size) shapes what GRPO and OPD
    train, and the base URI carries it only while the base is rerun with the same config; an input of the
    stage's version (as the bench's). A shapes checkpoint carries its model."""
    return family_of(config).model_key(config)


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
    two teachers together). Every model family takes the same path: the family
    loads and saves the policy, the evaluator (the judge, or a held-out reward
    model) watches training and scores base against teacher."""
    # long: the stage's one flow in order (inputs and cache, checks, setup, training, commit), with the
    # training closure that ranks other than 0 run too; its parts live in the helpers below
    uris = _task_prompts(task, prompts_uri)
    tasks = tuple(uris)
    stage = f"grpo_{task}"
    inputs = {"base": base_uri, "reward_model": reward_model_uri}
    inputs.update({"prompts": uris[task]} if task != "mixed" else {f"prompts_{t}": uris[t] for t in tasks})
    inputs.update(model_key(config))
    done = committed_result(stage, config, SECTIONS, inputs, output_root, tracker)
    if done is not None:
        return done
    check_prompt_tasks(uris)  # the cheap checks of user input before any work
    reward_token(config)
    family = family_of(config)
    if task == "mixed" and family.from_pretrained:
        raise ConfigError("grpo --task mixed (Mix-RL) runs on the shapes family only: on a pretrained family it "
                          "would need the T2I and edit pipeline views of one network in one trainer; set "
                          "pipeline.mix_rl: false")
    g = config.grpo
    trainer_class = algorithm(g.algorithm, "reward", multitask=task == "mixed").trainer
    base_dir = fetch(base_uri)
    curated = {t: load_prompt_set(uris[t]) for t in tasks}
    composites = task_rewards(config, reward_model_uri, uris, curated)
    evaluator = evaluator_for(config, tasks, reward_model_uri=reward_model_uri, composites=composites,
                              heldout=None if family.has_judge else {t: load_heldout_set(uris[t]) for t in tasks})
    policy = trainable_policy(config, family.load_policy(base_dir, config, tasks[0]), seed=g.seed)
    model = policy.model
    reference = policy.reference(g.reference_device) if g.kl_coef > 0 else None
    prompt_sets = prompt_sets_of(curated)
    scale = _calibration(uris) if g.calibrate else None
    store = ArtifactStore(output_root or config.run.artifact_root)
    version = stage_version(stage, config, SECTIONS, inputs)
    rank, _ = dist_info()
    backends = {t: _reward_backend(config, t, composites[t], reward_model_uri, uris[t]) for t in tasks}

    def one_or_all(values: dict):  # one task's own, or Mix-RL's {task: ...}
        return values if task == "mixed" else values[task]

    def train(tracker_: Tracker) -> tuple[GRPOTrainer, object]:
        trainer = trainer_class(
            model, policy.module, reference, g, one_or_all(prompt_sets),
            one_or_all({t: b[0] for t, b in backends.items()}),
            one_or_all({t: c.weight_matrix for t, c in composites.items()}),
            monitor=evaluator.monitor(tracker_, lambda m: {t: m for t in tasks}, g.loop.monitor_per_category,
                                      g.loop.grid_every),
            checkpoints=Checkpoints(store, stage, version), config_hash=config.section_hash(*SECTIONS),
            category_scale=scale,
        )
        result = run_trainer(trainer, tracker_, stage=stage, iterations=g.loop.iterations, resume=resume,
                             progress=progress, stop_after=stop_after)
        return trainer, result

    try:
        if rank != 0:
            return follow_rank0(config, store, stage, version, train)
        with stage_context(stage, config, SECTIONS, inputs, tracker=tracker) as ctx:
            start = time.perf_counter()
            trainer, result = train(ctx.tracker)
            train_s = time.perf_counter() - start
            trained = trained_model(trainer, model, result)
            rows, grid = _base_against_teacher(config, task, policy, evaluator, trained, base_dir, ctx.staging)
            metrics = {**_teacher_metrics(task, trainer, rows, train_s, start), **evaluator.provenance(stage)}
            _write_outputs(ctx, trainer, rows, task, grid, metrics, evaluator.heldout_label())
            return commit_stage(ctx, stage, SECTIONS, inputs, metrics, output_root)
    finally:
        for submitter, sidecar in backends.values():
            submitter.close()
            if sidecar is not None:
                sidecar.stop()


def _task_prompts(task: str, prompts_uri: str | dict[str, str]) -> dict[str, str]:
    """{task: filter_prompts artifact} of a GRPO run on ``task`` (both tasks for ``mixed``)."""
    if task not in ("t2i", "edit", "mixed"):
        raise ValueError(f"task must be t2i, edit or mixed, got {task!r}")
    if task == "mixed":
        if not isinstance(prompts_uri, dict) or set(prompts_uri) != {"t2i", "edit"}:
            raise ValueError("task mixed: prompts must be {'t2i': uri, 'edit': uri}")
        return {t: prompts_uri[t] for t in ("t2i", "edit")}
    if isinstance(prompts_uri, dict):
        raise ValueError(f"task {task}: prompts is one filter_prompts artifact, not a mapping")
    return {task: prompts_uri}


def prompt_sets_of(curated: dict) -> dict[str, PromptSet]:
    """{task: PromptSet} of curated prompt frames (filter_prompts' kept rows)."""
    return {t: PromptSet(list(f["prompt"]), list(f["category"]), decode_sources(f)) for t, f in curated.items()}


def _calibration(uris: dict[str, str]) -> dict[str, float]:
    """The filter's per-category advantage scales (``grpo.calibrate``) of every task's prompts; T2I
    categories and edit kinds never share a name."""
    scale = {}
    for uri in uris.values():
        scale.update(json.loads((fetch(uri) / "metrics.json").read_text())["calibration"])
    return scale


def _base_against_teacher(config: FlowRLConfig, task: str, policy, evaluator, trained, base_dir,
                          staging) -> tuple[dict, np.ndarray]:
    """The comparison rows of base and teacher on the evaluator's held-out prompts, and the teacher's
    grid; writes the teacher artifact into ``staging`` on the way (with LoRA, after the base is scored
    with the adapters off: the export merges them). A base that recorded its scores is not scored again."""
    tasks = evaluator.tasks
    teacher, grid = evaluator.evaluate({t: trained for t in tasks})
    base = evaluator.recorded(base_dir) if evaluator.records_base else None
    if base is None and policy.lora:
        base, _ = evaluator.evaluate({t: policy.base_view for t in tasks})
    policy.save(trained, staging, base_dir)
    if base is None:
        base, _ = evaluator.evaluate({t: policy.base_model(trained, base_dir, config, task) for t in tasks})
    return comparison(base, teacher, task), grid


def task_rewards(config: FlowRLConfig, reward_model_uri: str, uris: dict[str, str], curated: dict) -> dict:
    """{task: the composite reward GRPO optimises} for the tasks of ``uris`` (filter_prompts artifacts).
    A family with prompt files weighs each prompt by the category its curated or held-out row gives;
    the shapes grammar names its own."""
    if family_of(config).prompt_files:
        from flowrl.rewards.production import prompt_categories

        return {t: load_rewards(config, reward_model_uri, t,
                                categories=prompt_categories(curated[t], load_heldout_set(uris[t]))) for t in uris}
    composites = load_task_rewards(config, reward_model_uri)  # both tasks over one fetch, in their usual order
    return {t: composites[t] for t in uris}
