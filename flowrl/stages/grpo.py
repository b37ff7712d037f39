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

import dataclasses
import json
import os
import time

import numpy as np
import torch
from PIL import Image

from flowrl.config import SEED_MAX, ConfigError, FlowRLConfig
from flowrl.evaluators import MONITOR_SEED_OFFSET, evaluator_for
from flowrl.models.families import family_of
from flowrl.models.lora import lora_settings
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
    relative_uri,
    run_trainer,
    stage_context,
    stage_version,
    trained_model,
    write_history,
)
from flowrl.stages.filter_prompts import check_prompt_tasks, load_heldout_set, load_prompt_set
from flowrl.stages.policy import trainable_policy
from flowrl.stages.registry import stage_sections
from flowrl.storage import ArtifactError, ArtifactStore, fetch, read_manifest
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
    init_uri: str | None = None,
    rl_round: int | None = None,
) -> StageResult:
    """GRPO on ``task`` (t2i, edit) from its curated prompts; ``mixed`` is the
    Mix-RL baseline: ``prompts_uri`` {"t2i": uri, "edit": uri}, each prompt
    scored by its own task's composite, every iteration drawing
    ``grpo.prompts_per_iteration`` groups from each task (the budget of the
    two teachers together). Every model family takes the same path: the family
    loads and saves the policy, the evaluator (the judge, or a held-out reward
    model) watches training and scores base against teacher.

    Two rounds around a second annotation round (``pipeline.annotation_rounds: 2``): ``rl_round`` 1
    trains the first ``grpo.round1_iterations`` iterations from the base; ``rl_round`` 2 starts the
    policy from ``init_uri`` (the first round's artifact of the task) and trains the remaining
    iterations, the KL reference and the comparison staying the base (:func:`round_config`)."""
    # long: the stage's one flow in order (inputs and cache, checks, setup, training, commit), with the
    # training closure that ranks other than 0 run too; its parts live in the helpers below
    uris = _task_prompts(task, prompts_uri)
    tasks = tuple(uris)
    stage = f"grpo_{task}"
    config = round_config(config, rl_round, init_uri)
    inputs = {"base": base_uri, "reward_model": reward_model_uri}
    inputs.update({"prompts": uris[task]} if task != "mixed" else {f"prompts_{t}": uris[t] for t in tasks})
    inputs.update(model_key(config))
    if rl_round is not None:
        inputs["round"] = str(rl_round)
    if init_uri is not None:
        _check_init(init_uri, stage, base_uri, config)
        inputs["init"] = init_uri
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
    supervised = _pretraining_mix(config)
    base_dir = fetch(base_uri)
    curated = {t: load_prompt_set(uris[t]) for t in tasks}
    composites = task_rewards(config, reward_model_uri, uris, curated)
    evaluator = evaluator_for(config, tasks, reward_model_uri=reward_model_uri, composites=composites,
                              heldout=None if family.has_judge else {t: load_heldout_set(uris[t]) for t in tasks})
    policy, reference = policy_and_reference(config, family, base_dir, tasks[0],
                                             None if init_uri is None else fetch(init_uri))
    model = policy.model
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
            category_scale=scale, **({} if supervised is None else {"supervised": supervised}),
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
            if rl_round is not None or init_uri is not None:
                metrics.update(round=rl_round or 0, init=relative_uri(init_uri) if init_uri else "")
            _write_outputs(ctx, trainer, rows, task, grid, metrics, evaluator.heldout_label())
            return commit_stage(ctx, stage, SECTIONS, inputs, metrics, output_root)
    finally:
        for submitter, sidecar in backends.values():
            submitter.close()
            if sidecar is not None:
                sidecar.stop()


PTX_STREAM = 10_000  # the pretraining mix's draws: stream PTX_STREAM + minibatch of each iteration


def _pretraining_mix(config: FlowRLConfig):
    """``grpo.ptx_coef``'s supervised loss (None when 0): the base's flow-matching objective on fresh
    examples of the shapes grammar's train split (where it is allowed: :func:`flowrl.config.check_consistency`)."""
    g = config.grpo
    if g.ptx_coef == 0:
        return None
    from flowrl.pretrain import supervised_loss

    def loss(model, iteration: int, minibatch: int, rank: int, world: int):
        return supervised_loss(model, g.ptx_batch_size, config.base.edit_fraction, config.base.cond_dropout,
                               config.world.resolution, g.seed, iteration, PTX_STREAM + minibatch, rank, world)

    return loss


ROUND_SEED_OFFSET = 7_919  # the second round draws its prompts and noise from grpo.seed plus this


def round_config(config: FlowRLConfig, rl_round: int | None, init_uri: str | None) -> FlowRLConfig:
    """``config`` as one GRPO round runs it (its version hashes it). No round: the whole loop, with
    ``grpo.round1_iterations`` at its default (the hash leaves it out). Round 1: the first
    ``round1_iterations`` iterations; round 2: the rest, on a seed of its own (not replaying the first
    round's prompt draws and noise). A set ``loop.time_budget_s`` is split in the same proportion."""
    g = config.grpo
    if rl_round is None and init_uri is not None:
        raise ConfigError("grpo --init continues a first round's policy: give --round 2 with it")
    if rl_round is None:
        default = type(g)().round1_iterations
        return dataclasses.replace(config, grpo=dataclasses.replace(g, round1_iterations=default))
    if rl_round not in (1, 2):
        raise ConfigError(f"grpo: round must be 1 or 2, got {rl_round!r}")
    if rl_round == 2 and init_uri is None:
        raise ConfigError("grpo --round 2 continues the first round's policy: give its artifact with --init")
    if rl_round == 1 and init_uri is not None:
        raise ConfigError("grpo --round 1 starts from the base: it takes no --init")
    total, first = g.loop.iterations, g.round1_iterations
    if first >= total:
        raise ConfigError(f"grpo.round1_iterations = {first} must be below grpo.loop.iterations = {total}, which "
                          "the two rounds share")
    share = first / total if rl_round == 1 else (total - first) / total
    budget = None if g.loop.time_budget_s is None else g.loop.time_budget_s * share
    loop = dataclasses.replace(g.loop, iterations=first if rl_round == 1 else total - first, time_budget_s=budget)
    seed = g.seed if rl_round == 1 else (g.seed + ROUND_SEED_OFFSET) % (SEED_MAX + 1)
    return dataclasses.replace(config, grpo=dataclasses.replace(g, loop=loop, seed=seed))


def _check_init(init_uri: str, stage: str, base_uri: str, config: FlowRLConfig) -> None:
    """``init_uri`` must be a committed artifact of this GRPO stage trained from ``base_uri`` (the KL
    reference and the comparison stay that base); checked before any model loads."""
    manifest = read_manifest(init_uri)
    if manifest.stage != stage:
        raise ArtifactError(f"grpo --init {init_uri}: an artifact of stage {manifest.stage}, where a {stage} "
                            "artifact was expected")
    if str(manifest.inputs.get("round", "1")) != "1":
        raise ArtifactError(f"grpo --init {init_uri}: not a first-round run (round {manifest.inputs.get('round')}); "
                            "round 2 continues round 1")
    if manifest.inputs.get("base") != base_uri:
        raise ArtifactError(f"grpo --init {init_uri}: trained from the base {manifest.inputs.get('base')}, not "
                            f"from {base_uri}; a later round must keep the base its KL reference is")
    if lora_settings(config) is not None:
        raise ConfigError("grpo --init: continuing a LoRA run (model.qwen_image.lora) is not supported; the "
                          "adapter would start fresh. Train one round (pipeline.annotation_rounds: 1)")


def policy_and_reference(config: FlowRLConfig, family, base_dir, task: str, init_dir=None):
    """(the policy to train, the frozen KL reference or None): both the base's, or with ``init_dir``
    (a GRPO artifact of the task) the policy starts from its weights while the reference stays the
    base (made before the init weights are loaded)."""
    g = config.grpo
    policy = trainable_policy(config, family.load_policy(base_dir, config, task), seed=g.seed)
    reference = policy.reference(g.reference_device) if g.kl_coef > 0 else None
    if init_dir is not None:
        policy.module.load_state_dict(family.trained_state(init_dir, config, task))
    return policy, reference


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
