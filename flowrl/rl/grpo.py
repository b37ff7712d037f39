"""The GRPO loop for flow-matching models (Flow-GRPO with the recipe's levers).

One iteration: draw ``prompts_per_iteration`` prompts from the curated set;
sample G SDE trajectories each, in ``reward_chunks`` chunks whose rewards are
submitted as soon as a chunk's images exist (so scoring chunk i overlaps
sampling chunk i + 1); normalise each reward component within its prompt
group and weight by category into one advantage per trajectory; recompute
the log-probs of K selected steps per trajectory with gradient and take the
PPO-clipped step (plus the optional closed-form KL to the reference policy).
With ``micro_batch`` each minibatch's rows run through the network in parts
whose gradients accumulate, each weighted by its share of the rows, so the
step is the one the whole minibatch in one forward would take. With
``rollout.micro_batch`` the sampling forwards and the decoding of a chunk run in
parts of that many trajectories; the noise is drawn for the whole chunk, so the
rollouts are the same.

Everything an iteration draws is seeded from (seed, iteration), so a run
resumed from a checkpoint replays exactly.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from flowrl.config import GRPOConfig, category_weights
from flowrl.models.base import Condition, FlowModel
from flowrl.models.lora import enable_gradient_checkpointing
from flowrl.rewards.base import RewardScores
from flowrl.rewards.client import RewardClientError
from flowrl.rl.algorithms import register_algorithm
from flowrl.rl.distributed import mean_across_ranks
from flowrl.rl.engine import make_engine
from flowrl.rl.objectives import anchored_kl_term, gaussian_kl, group_advantages, guard_log_ratio, ppo_clip_loss
from flowrl.rl.rollout import (
    RolloutSettings,
    Rollouts,
    excluded_steps,
    rollout,
    rollout_settings,
    select_anchor_steps,
    select_timesteps,
    step_log_probs,
)
from flowrl.rl.trainer import Checkpoints, LoopSettings, LoopTrainer, seeded_generator

log = logging.getLogger(__name__)


class RewardSubmitter(Protocol):
    """What GRPO needs from a reward: submit a batch now, read the scores later
    (the reward server's client, or :class:`LocalRewards` in process)."""

    def submit(self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None) -> Future:
        """A future of :class:`RewardScores`."""


@dataclass(frozen=True)
class PromptSet:
    """The curated prompts of one task: text, category, and edit sources."""

    prompts: list[str]
    categories: list[str]
    sources: torch.Tensor | None  # [P, 3, H, W] for edits

    def __len__(self) -> int:
        return len(self.prompts)


def settings_of(cfg: GRPOConfig) -> RolloutSettings:
    """The rollout sampler's settings (grpo.rollout); the rollouts keep their transition means when
    GRPO-Guard's ratio compares against them (grpo.ratio_norm)."""
    return dataclasses.replace(rollout_settings(cfg.rollout), keep_means=cfg.ratio_norm)


def cat_cond(conds: list[Condition | None]) -> Condition | None:
    """The rows of several conditions (of one encoder) in order; None for absent ones."""
    if conds[0] is None:
        return None
    if len(conds) == 1:
        return conds[0]
    tensors = {k: torch.cat([c.tensors[k] for c in conds]) for k in conds[0].tensors}
    return Condition(tensors, dict(conds[0].extras))


def scored_advantages(
    scores: Sequence[RewardScores], task: "TaskData", prompts: list[str], categories: list[str],
    group_ids: torch.Tensor, category_scale: dict[str, float], advantage_clip: float,
) -> tuple[RewardScores, torch.Tensor]:
    """The chunks' reward scores joined in row order, and each row's advantage: per-component group
    normalisation weighted by the task's weights of its prompt, times its category's scale (if any),
    clipped to +- ``advantage_clip``. Rows: ``prompts``, ``categories``, ``group_ids`` [B]."""
    names = list(scores[0].components)
    joined = RewardScores(
        total=torch.cat([s.total for s in scores]),
        components={n: torch.cat([s.components[n] for s in scores]) for n in names},
    )
    components = torch.stack([joined.components[n] for n in names], dim=1)  # [B, K]
    adv = group_advantages(components, task.weights(prompts), group_ids)
    if category_scale:
        adv = adv * torch.tensor([category_scale.get(c, 1.0) for c in categories])
    return joined, adv.clamp(-advantage_clip, advantage_clip)


def cat_rollouts(parts: Sequence[Rollouts]) -> Rollouts:
    """Join chunks; group ids are renumbered so groups stay distinct."""
    if len(parts) == 1:
        return parts[0]

    offset, ids = 0, []
    for part in parts:
        ids.append(part.group_ids + offset)
        offset += int(part.group_ids.max()) + 1
    return Rollouts(
        prompts=[p for part in parts for p in part.prompts],
        group_ids=torch.cat(ids),
        sources=None if parts[0].sources is None else torch.cat([p.sources for p in parts]),
        cond=cat_cond([p.cond for p in parts]),
        null_cond=cat_cond([p.null_cond for p in parts]),
        states=torch.cat([p.states for p in parts]),
        sigmas=parts[0].sigmas,
        old_log_probs=torch.cat([p.old_log_probs for p in parts]),
        images=torch.cat([p.images for p in parts]),
        stochastic=parts[0].stochastic,  # the chunks of one iteration share its SDE window
        window=parts[0].window,
        old_means=None if parts[0].old_means is None else torch.cat([p.old_means for p in parts]),
    )


def draw_prompts(
    prompts: PromptSet, count: int, seed: int, iteration: int, category_weights: dict[str, float] | None = None,
    balance: bool = False,
) -> np.ndarray:
    """``count`` prompt indices for one iteration, seeded by (seed, iteration).

    Uniform and without replacement by default; with ``category_weights``
    ({category: weight}, others 1) each prompt is drawn with probability
    proportional to its category's weight (with replacement). ``balance``:
    each category's prompts share its weight, so a category with 2 prompts
    is drawn as often as one with 50."""
    rng = np.random.default_rng([seed, iteration])
    if not category_weights and not balance:
        return rng.choice(len(prompts), size=count, replace=count > len(prompts))
    weights = category_weights or {}
    w = np.array([weights.get(c, 1.0) for c in prompts.categories], dtype=np.float64)
    if balance:
        sizes = Counter(prompts.categories)
        w = w / np.array([sizes[c] for c in prompts.categories], dtype=np.float64)
    return rng.choice(len(prompts), size=count, replace=True, p=w / w.sum())


@dataclass
class IterationOutput:
    """One task's share of an iteration."""

    rollouts: Rollouts
    scores: RewardScores
    advantages: torch.Tensor
    categories: list[str]


@dataclass(frozen=True)
class TaskData:
    """One task GRPO trains on: its curated prompts, the reward it is scored
    by (submit interface) and the per-row component weights of that reward."""

    prompts: PromptSet
    rewards: RewardSubmitter
    weights: Callable[[list[str]], torch.Tensor]


def loop_settings(cfg: GRPOConfig, name: str = "grpo") -> LoopSettings:
    loop = cfg.loop
    return LoopSettings(loop.iterations, loop.eval_every, loop.checkpoint_every, cfg.hacking_threshold,
                        cfg.stop_on_hacking, name=name, tracked="train/reward", time_budget_s=loop.time_budget_s)


@register_algorithm("grpo", kind="reward", multitask=True)
class GRPOTrainer(LoopTrainer):
    """GRPO on one task, or on several at once (Mix-RL).

    Single task: ``prompts`` a :class:`PromptSet`, ``rewards`` its submitter
    and ``weights(prompts)`` -> [B, K] component weights in the order of the
    reward's components (by each prompt's category). Several tasks: all
    three are dicts keyed by task; each iteration draws
    ``prompts_per_iteration`` groups from *each* task, scores each with its
    own reward, and takes one optimizer step per minibatch (of each epoch) over all of them
    (rows weighted equally). ``monitor(model, iteration)`` -> held-out
    metrics with the watched score under ``"heldout"``; ``category_scale``
    multiplies the advantages of each category (the optional calibration);
    ``supervised(model, iteration, minibatch, rank, world)`` -> this rank's
    share of a supervised loss (the base's own objective on fresh data, the
    same batch however many ranks split it), added to every optimizer step
    with weight ``cfg.ptx_coef`` (PPO-ptx's pretraining mix).
    """

    fatal_errors = (RewardClientError,)  # the reward server gone past every retry ends the run cleanly

    def __init__(
        self,
        model: FlowModel,
        module: torch.nn.Module,
        reference: FlowModel | None,
        cfg: GRPOConfig,
        prompts: PromptSet | dict[str, PromptSet],
        rewards: RewardSubmitter | dict[str, RewardSubmitter],
        weights: Callable[[list[str]], torch.Tensor] | dict[str, Callable[[list[str]], torch.Tensor]],
        monitor: Callable[[FlowModel, int], dict[str, float]] | None = None,
        checkpoints: Checkpoints | None = None,
        config_hash: str = "",
        category_scale: dict[str, float] | None = None,
        supervised: Callable[[FlowModel, int, int, int, int], torch.Tensor] | None = None,
    ):
        if cfg.kl_coef > 0 and reference is None:
            raise ValueError("grpo.kl_coef > 0 needs a reference model")
        if cfg.ptx_coef > 0 and supervised is None:
            raise ValueError("grpo.ptx_coef > 0 needs a supervised loss")
        if isinstance(prompts, dict):
            if not (isinstance(rewards, dict) and isinstance(weights, dict)) or not (
                prompts.keys() == rewards.keys() == weights.keys()
            ):
                raise ValueError("several tasks: prompts, rewards and weights must be dicts with the same tasks")
            self.tasks = {t: TaskData(prompts[t], rewards[t], weights[t]) for t in prompts}
        else:
            self.tasks = {"": TaskData(prompts, rewards, weights)}
        opt = cfg.optim
        if opt.gradient_checkpointing:  # before the engine wraps the module
            enable_gradient_checkpointing(module, "grpo.optim.gradient_checkpointing")
        engine = make_engine(model, module, lr=opt.lr, weight_decay=opt.weight_decay, grad_clip=opt.grad_clip,
                             zero_stage=opt.zero_stage, ema=opt.ema_decay > 0, where="grpo",
                             trainable=cfg.trainable)
        ema = engine.make_ema(opt.ema_decay) if opt.ema_decay > 0 else None  # sharded under ZeRO
        super().__init__(model, module, engine, ema, loop_settings(cfg), monitor, checkpoints, config_hash)
        if cfg.prompts_per_iteration % (cfg.reward_chunks * self.world):
            raise ValueError(
                f"grpo.reward_chunks = {cfg.reward_chunks} times the {self.world} process(es) must divide "
                f"grpo.prompts_per_iteration = {cfg.prompts_per_iteration}"
            )
        self.reference, self.cfg = reference, cfg
        self.category_scale = category_scale or {}
        self.supervised = supervised if cfg.ptx_coef > 0 else None
        self.sampling_weights = category_weights(cfg.sampling_weights, "grpo.sampling_weights")
        self.settings = settings_of(cfg)
        self.train_model = self.engine.view(model)  # forward with the engine's gradient reduction

    @property
    def prompts(self) -> PromptSet:
        """The prompt set of a single-task trainer."""
        (task,) = self.tasks.values()
        return task.prompts

    # ------------------------------------------------------------------ one iteration
    def _collect_task(self, task: TaskData, index: int, iteration: int, gen: torch.Generator) -> IterationOutput:
        """One task's rollouts, rewards and advantages; the rollouts use the iteration's SDE window
        (grpo.rollout.sde_steps), which they carry to the update."""
        cfg = self.cfg
        # task 0 draws with the run's seed, so a single-task run is unchanged by the multi-task path
        chosen = draw_prompts(task.prompts, cfg.prompts_per_iteration, cfg.seed + 1_000_003 * index, iteration,
                              self.sampling_weights, cfg.balance_categories)
        chosen = chosen.reshape(self.world, -1)[self.rank]  # this rank's share of the groups
        per_chunk = len(chosen) // cfg.reward_chunks
        parts, futures = [], []
        for c in range(cfg.reward_chunks):
            idx = chosen[c * per_chunk : (c + 1) * per_chunk]
            sources = None if task.prompts.sources is None else task.prompts.sources[torch.as_tensor(idx)]
            part = rollout(self.model, [task.prompts.prompts[i] for i in idx], cfg.group_size, self.settings,
                           gen, sources, iteration=iteration)
            futures.append(task.rewards.submit(part.images, part.prompts, part.sources))  # scored while we sample on
            parts.append(part)
        scores = [f.result() for f in futures]
        ro = cat_rollouts(parts)
        categories = [task.prompts.categories[i] for i in chosen for _ in range(cfg.group_size)]
        joined, adv = scored_advantages(scores, task, ro.prompts, categories, ro.group_ids, self.category_scale,
                                        cfg.advantage_clip)
        return IterationOutput(ro, joined, adv, categories)

    def collect(self, iteration: int) -> dict[str, IterationOutput]:
        gen = seeded_generator(self.cfg.seed, iteration, stream=100 + self.rank)
        return {name: self._collect_task(task, i, iteration, gen) for i, (name, task) in enumerate(self.tasks.items())}

    def _part_loss(self, out: IterationOutput, rows: torch.Tensor, steps: torch.Tensor, n_trained: int):
        cfg, ro = self.cfg, out.rollouts
        new = step_log_probs(self.train_model, ro, rows, steps[rows], self.settings)
        trained = steps[rows][:, :n_trained]
        old = ro.old_log_probs[rows[:, None], trained]
        log_ratio = None
        if cfg.ratio_norm:  # GRPO-Guard: the log-ratio centred and rescaled per step
            log_ratio = guard_log_ratio(new.log_probs[:, :n_trained], old, new.means[:, :n_trained],
                                        ro.old_means[rows[:, None], trained], new.stds[:, :n_trained])
        loss, diag = ppo_clip_loss(new.log_probs[:, :n_trained], old, out.advantages[rows], cfg.clip_range,
                                   log_ratio=log_ratio)
        kl = torch.zeros(())
        if self.reference is not None and cfg.kl_coef > 0:
            with torch.no_grad():
                ref = step_log_probs(self.reference, ro, rows, steps[rows], self.settings)
            per_step = gaussian_kl(new.means.flatten(0, 1), ref.means.flatten(0, 1), new.stds.flatten())
            per_step = per_step.view(len(rows), -1)  # [R, trained + anchor steps]
            kl = per_step.mean()
            loss = loss + anchored_kl_term(per_step, n_trained, cfg.kl_coef, cfg.kl_anchor_coef)
        return loss, {"kl": kl, **diag}

    def _micro_batches(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``rows`` in the parts that run through the network one at a time (all at once by default)."""
        micro = self.cfg.optim.micro_batch
        return (rows,) if micro is None else torch.split(rows, micro)

    def _task_step(self, out: IterationOutput, rows: torch.Tensor, steps: torch.Tensor, n_trained: int,
                   share: float, last: bool) -> dict[str, float]:
        """Forward and backward of one task's share of a minibatch (``rows``, weighted ``share`` of the
        step), one micro-batch at a time; the last part of the ``last`` task reduces across ranks.
        Returns its diagnostics over all rows: means weighted by rows, ``ratio_dev`` the largest."""
        parts = self._micro_batches(rows)
        stats: dict[str, float] = {}
        for p, part in enumerate(parts):
            frac = len(part) / len(rows)  # every row has the same steps: the part's mean weighs its rows
            with self.engine.accumulate(self.train_model, last=last and p == len(parts) - 1):
                loss, diag = self._part_loss(out, part, steps, n_trained)
                self.engine.backward(loss * share * frac)
            for key, value in (("loss", loss), *diag.items()):
                value = float(value.detach()) if torch.is_tensor(value) else float(value)
                if key == "ratio_dev":
                    stats[key] = max(stats.get(key, value), value)
                else:
                    stats[key] = stats.get(key, 0.0) + frac * value
        return stats

    def update(self, outs: dict[str, IterationOutput], iteration: int) -> dict[str, float]:
        cfg, ts = self.cfg, self.cfg.timesteps
        gen = seeded_generator(cfg.seed, iteration, stream=1)
        plans = []
        for out in outs.values():
            ro = out.rollouts
            # drawn for the global batch and sliced, so the update does not depend on the number of ranks;
            # with an SDE window the trained steps come from the window the rollouts were sampled with,
            # the anchors from outside it, neither from a zero-noise step
            excluded = excluded_steps(self.settings)
            steps = select_timesteps(ro.batch_size * self.world, cfg.rollout.num_steps, ts.mode, ts.fraction,
                                     ts.per_trajectory, gen, start=ts.start, window=ro.window, excluded=excluded)
            anchors = select_anchor_steps(
                ro.batch_size * self.world, cfg.rollout.num_steps, ts.fraction,
                cfg.kl_anchor_steps if ts.mode == "subset" and cfg.kl_coef > 0 else 0, gen,
                start=ts.start, window=ro.window, excluded=excluded)
            local = slice(self.rank * ro.batch_size, (self.rank + 1) * ro.batch_size)
            n_trained = steps.shape[1]
            steps = torch.cat([steps[local], anchors[local]], dim=1)  # anchors: KL only
            plans.append((out, steps, n_trained))
        # the row orders come after every global draw: their size is the local batch; each epoch
        # (pass over the rollouts) splits them in a new order, drawn after the first's
        orders = [[torch.randperm(plan[0].rollouts.batch_size, generator=gen).chunk(cfg.minibatches)
                   for plan in plans] for _ in range(cfg.epochs)]
        plans = [(*plan, tuple(chunk for epoch in orders for chunk in epoch[j])) for j, plan in enumerate(plans)]
        stats: dict[str, list[float]] = {"loss": [], "clip_fraction": [], "ratio_dev": [], "kl": [], "grad_norm": []}
        self.module.train()
        for m in range(len(plans[0][3])):
            self.engine.zero_grad()
            rows_total = sum(len(plan[3][m]) for plan in plans)
            step_stats: dict[str, float] = {}
            if self.supervised is not None:  # its own backward, reduced across ranks with the tasks' last one
                with self.engine.accumulate(self.train_model, last=False):
                    ptx = self.supervised(self.train_model, iteration, m, self.rank, self.world)
                    self.engine.backward(ptx * cfg.ptx_coef)
                step_stats["ptx"] = float(ptx.detach())
            for j, (out, steps, n_trained, chunks) in enumerate(plans):
                share = len(chunks[m]) / rows_total
                # several tasks: one backward per task (their conditions differ), gradients accumulate;
                # only the last backward reduces across ranks
                task_stats = self._task_step(out, chunks[m], steps, n_trained, share, last=j == len(plans) - 1)
                for key, value in task_stats.items():
                    step_stats[key] = step_stats.get(key, 0.0) + share * value
            grad_norm = self.engine.step()  # global-norm clip, then AdamW
            if self.ema is not None:
                self.ema.update(self.module)
            step_stats["grad_norm"] = float(grad_norm)
            for key, value in step_stats.items():
                stats.setdefault(key, []).append(value)
        self.module.eval()
        metrics = {f"train/{k}": float(np.mean(v)) for k, v in stats.items()}
        metrics["train/reward"] = float(torch.cat([o.scores.total for o in outs.values()]).mean())
        for task, out in outs.items():
            prefix = f"train/{task}/" if task else "train/"
            if task:
                metrics[f"{prefix}reward"] = float(out.scores.total.mean())
            for name, value in out.scores.components.items():
                metrics[f"{prefix}reward_{name}"] = float(value.mean())
        return mean_across_ranks(metrics)

    def step(self, iteration: int) -> dict[str, float]:
        return self.update(self.collect(iteration), iteration)

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['train/reward']:.3f}", "kl": f"{metrics['train/kl']:.2e}",
                **super().postfix(metrics)}


class LocalRewards:
    """An in-process reward behind the submit interface: a worker thread
    scores while the caller samples on (torch releases the GIL in its ops)."""

    def __init__(self, reward):
        from concurrent.futures import ThreadPoolExecutor

        self.reward = reward
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowrl-reward")

    def submit(self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None) -> Future:
        return self._pool.submit(self.reward.score_components, images.detach().clone(), list(prompts),
                                 None if sources is None else sources.detach().clone())

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
