"""The GRPO loop for flow-matching models (Flow-GRPO with the recipe's levers).

One iteration: draw ``prompts_per_iteration`` prompts from the curated set;
sample G SDE trajectories each, in ``reward_chunks`` chunks whose rewards are
submitted as soon as a chunk's images exist (so scoring chunk i overlaps
sampling chunk i + 1); normalise each reward component within its prompt
group and weight by category into one advantage per trajectory; recompute
the log-probs of K selected steps per trajectory with gradient and take the
PPO-clipped step (plus the optional closed-form KL to the reference policy).

Everything an iteration draws is seeded from (seed, iteration), so a run
resumed from a checkpoint replays exactly.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from flowrl.config import GRPOConfig
from flowrl.models.base import Condition, FlowModel
from flowrl.rewards.base import RewardScores
from flowrl.rl.distributed import barrier, broadcast, ddp_model, dist_info, mean_across_ranks
from flowrl.rl.objectives import gaussian_kl, group_advantages, ppo_clip_loss
from flowrl.rl.rollout import (
    RolloutSettings,
    Rollouts,
    rollout,
    select_anchor_steps,
    select_timesteps,
    step_log_probs,
)
from flowrl.rl.trainer import EMA, Checkpoints, HackingMonitor, TrainerState, seeded_generator

log = logging.getLogger(__name__)

MONITOR_WINDOW = 10  # iterations of training reward the hacking monitor averages
WATCHED = ("heldout", "fidelity")  # monitor scores the hacking check watches


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


@dataclass(frozen=True)
class GRPOResult:
    state: TrainerState
    module_state: dict[str, torch.Tensor]  # the weights to deploy (EMA when on)


def settings_of(cfg: GRPOConfig) -> RolloutSettings:
    return RolloutSettings(cfg.num_steps, cfg.noise_level, cfg.guidance_scale, cfg.cfg_mode)


def cat_rollouts(parts: Sequence[Rollouts]) -> Rollouts:
    """Join chunks; group ids are renumbered so groups stay distinct."""
    if len(parts) == 1:
        return parts[0]

    def cat_cond(conds: list[Condition | None]) -> Condition | None:
        if conds[0] is None:
            return None
        tensors = {k: torch.cat([c.tensors[k] for c in conds]) for k in conds[0].tensors}
        return Condition(tensors, dict(conds[0].extras))

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
    )


def draw_prompts(prompts: PromptSet, count: int, seed: int, iteration: int) -> np.ndarray:
    rng = np.random.default_rng([seed, iteration])
    return rng.choice(len(prompts), size=count, replace=count > len(prompts))


@dataclass
class IterationOutput:
    rollouts: Rollouts
    scores: RewardScores
    advantages: torch.Tensor
    categories: list[str]


class GRPOTrainer:
    """GRPO on one task. ``weights(prompts)`` -> [B, K] component weights in
    the order of the reward's components (by each prompt's category);
    ``monitor(model, iteration)`` -> held-out metrics with the watched score
    under ``"heldout"``; ``category_scale`` multiplies the advantages of each
    category (the optional calibration)."""

    def __init__(
        self,
        model: FlowModel,
        module: torch.nn.Module,
        reference: FlowModel | None,
        cfg: GRPOConfig,
        prompts: PromptSet,
        rewards: RewardSubmitter,
        weights: Callable[[list[str]], torch.Tensor],
        monitor: Callable[[FlowModel, int], dict[str, float]] | None = None,
        checkpoints: Checkpoints | None = None,
        config_hash: str = "",
        category_scale: dict[str, float] | None = None,
    ):
        if cfg.kl_coef > 0 and reference is None:
            raise ValueError("grpo.kl_coef > 0 needs a reference model")
        self.rank, self.world = dist_info()
        if cfg.prompts_per_iteration % (cfg.reward_chunks * self.world):
            raise ValueError(
                f"grpo.reward_chunks = {cfg.reward_chunks} times the {self.world} process(es) must divide "
                f"grpo.prompts_per_iteration = {cfg.prompts_per_iteration}"
            )
        self.model, self.module, self.reference, self.cfg = model, module, reference, cfg
        self.prompts, self.rewards, self.weights, self.monitor = prompts, rewards, weights, monitor
        self.checkpoints, self.config_hash = checkpoints, config_hash
        self.category_scale = category_scale or {}
        self.settings = settings_of(cfg)
        self.train_model = ddp_model(model) if self.world > 1 else model
        self.optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.ema = EMA(module, cfg.ema_decay) if cfg.ema_decay > 0 else None
        self.state = TrainerState()
        # watched held-out scores: the task's judge metric and, where the monitor gives it, fidelity
        # (texture drift that the learned rewards miss shows there first)
        self.hacking = {key: HackingMonitor(cfg.hacking_threshold) for key in WATCHED}

    # ------------------------------------------------------------------ resume
    def resume(self) -> bool:
        """Load the newest complete checkpoint of this run, if there is one."""
        uri = self.checkpoints.latest() if self.checkpoints else None
        if uri is None:
            return False
        self.state = self.checkpoints.load(uri, self.module, self.optimizer, self.ema)
        for entry in self.state.monitor:  # rebuild the monitor's memory
            for key, watch in self.hacking.items():
                if key in entry:
                    watch.check(entry[key], entry["train_reward"])
        log.info("resumed from %s at iteration %d", uri, self.state.iteration)
        return True

    # ------------------------------------------------------------------ one iteration
    def collect(self, iteration: int) -> IterationOutput:
        cfg = self.cfg
        chosen = draw_prompts(self.prompts, cfg.prompts_per_iteration, cfg.seed, iteration)
        chosen = chosen.reshape(self.world, -1)[self.rank]  # this rank's share of the groups
        gen = seeded_generator(cfg.seed, iteration, stream=100 + self.rank)
        per_chunk = cfg.prompts_per_iteration // cfg.reward_chunks
        parts, futures = [], []
        for c in range(cfg.reward_chunks):
            idx = chosen[c * per_chunk : (c + 1) * per_chunk]
            sources = None if self.prompts.sources is None else self.prompts.sources[torch.as_tensor(idx)]
            part = rollout(self.model, [self.prompts.prompts[i] for i in idx], cfg.group_size, self.settings,
                           gen, sources)
            futures.append(self.rewards.submit(part.images, part.prompts, part.sources))  # scored while we sample on
            parts.append(part)
        scores = [f.result() for f in futures]
        ro = cat_rollouts(parts)
        names = list(scores[0].components)
        joined = RewardScores(
            total=torch.cat([s.total for s in scores]),
            components={n: torch.cat([s.components[n] for s in scores]) for n in names},
        )
        categories = [self.prompts.categories[i] for i in chosen for _ in range(cfg.group_size)]
        components = torch.stack([joined.components[n] for n in names], dim=1)  # [B, K]
        weights = self.weights(ro.prompts)
        adv = group_advantages(components, weights, ro.group_ids)
        if self.category_scale:
            adv = adv * torch.tensor([self.category_scale.get(c, 1.0) for c in categories])
        adv = adv.clamp(-cfg.advantage_clip, cfg.advantage_clip)
        return IterationOutput(ro, joined, adv, categories)

    def update(self, out: IterationOutput, iteration: int) -> dict[str, float]:
        cfg, ro = self.cfg, out.rollouts
        gen = seeded_generator(cfg.seed, iteration, stream=1)
        # drawn for the global batch and sliced, so the update does not depend on the number of ranks
        steps = select_timesteps(ro.batch_size * self.world, cfg.num_steps, cfg.timesteps, cfg.timestep_fraction,
                                 cfg.timesteps_per_trajectory, gen)
        anchors = select_anchor_steps(ro.batch_size * self.world, cfg.num_steps, cfg.timestep_fraction,
                                      cfg.kl_anchor_steps if cfg.timesteps == "subset" and cfg.kl_coef > 0 else 0, gen)
        local = slice(self.rank * ro.batch_size, (self.rank + 1) * ro.batch_size)
        steps, anchors = steps[local], anchors[local]
        n_trained = steps.shape[1]
        steps = torch.cat([steps, anchors], dim=1)  # anchors: KL only
        order = torch.randperm(ro.batch_size, generator=gen)
        stats: dict[str, list[float]] = {"loss": [], "clip_fraction": [], "ratio_dev": [], "kl": [], "grad_norm": []}
        self.module.train()
        for rows in order.chunk(cfg.minibatches):
            new = step_log_probs(self.train_model, ro, rows, steps[rows], self.settings)
            trained = steps[rows][:, :n_trained]
            loss, diag = ppo_clip_loss(new.log_probs[:, :n_trained], ro.old_log_probs[rows[:, None], trained],
                                       out.advantages[rows], cfg.clip_range)
            kl = torch.zeros(())
            if self.reference is not None and cfg.kl_coef > 0:
                with torch.no_grad():
                    ref = step_log_probs(self.reference, ro, rows, steps[rows], self.settings)
                kl = gaussian_kl(new.means.flatten(0, 1), ref.means.flatten(0, 1), new.stds.flatten()).mean()
                loss = loss + cfg.kl_coef * kl
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.grad_clip)
            self.optimizer.step()
            if self.ema is not None:
                self.ema.update(self.module)
            for key, value in (("loss", loss), ("kl", kl), ("grad_norm", grad_norm), *diag.items()):
                stats[key].append(float(value.detach()) if torch.is_tensor(value) else float(value))
        self.module.eval()
        metrics = {f"train/{k}": float(np.mean(v)) for k, v in stats.items()}
        metrics["train/reward"] = float(out.scores.total.mean())
        for name, value in out.scores.components.items():
            metrics[f"train/reward_{name}"] = float(value.mean())
        return mean_across_ranks(metrics)

    # ------------------------------------------------------------------ the loop
    def _evaluate(self, iteration: int) -> dict[str, float]:
        if self.ema is None:
            return self.monitor(self.model, iteration)
        live = {k: v.clone() for k, v in self.module.state_dict().items()}
        self.module.load_state_dict(self.ema.shadow.state_dict())
        try:
            return self.monitor(self.model, iteration)
        finally:
            self.module.load_state_dict(live)

    def _checkpoint(self) -> None:
        if self.checkpoints is not None and self.rank == 0:
            self.checkpoints.save(self.state, self.module, self.optimizer, self.ema, self.config_hash)
        barrier()

    def train(
        self,
        log_metrics: Callable[[dict[str, float], int], None] | None = None,
        progress: bool = True,
        stop_after: int | None = None,
    ) -> GRPOResult:
        """Run (or finish) the configured iterations. ``stop_after`` ends the
        call after that many iterations in total, as a kill would (tests)."""
        cfg = self.cfg
        if self.monitor is not None and self.state.iteration == 0 and not self.state.monitor:
            self._monitor_step(0, [])
        bar = tqdm(range(self.state.iteration, cfg.iterations), desc="grpo", disable=not progress or self.rank != 0,
                   initial=self.state.iteration, total=cfg.iterations, mininterval=2.0)
        for iteration in bar:
            if stop_after is not None and iteration >= stop_after:
                break
            start = time.perf_counter()
            out = self.collect(iteration)
            metrics = self.update(out, iteration)
            metrics["time/iteration_s"] = time.perf_counter() - start
            self.state.history.append(metrics)
            self.state.iteration = iteration + 1
            if log_metrics is not None and self.rank == 0:
                log_metrics(metrics, iteration + 1)
            postfix = {"reward": f"{metrics['train/reward']:.3f}", "kl": f"{metrics['train/kl']:.2e}",
                       "s/it": f"{metrics['time/iteration_s']:.2f}"}
            if self.monitor is not None and (iteration + 1) % cfg.eval_every == 0:
                entry = self._monitor_step(iteration + 1, [h["train/reward"] for h in self.state.history], log_metrics)
                postfix["judge"] = f"{entry['heldout']:.3f}"
            bar.set_postfix(postfix)
            if (iteration + 1) % cfg.checkpoint_every == 0 or iteration + 1 == cfg.iterations:
                self._checkpoint()
            if self.state.stopped:
                self._checkpoint()
                break
        weights = (self.ema.shadow if self.ema is not None else self.module).state_dict()
        return GRPOResult(self.state, {k: v.detach().clone() for k, v in weights.items()})


    def _monitor_step(self, iteration: int, rewards: list[float], log_metrics=None) -> dict:
        scores = broadcast(self._evaluate(iteration) if self.rank == 0 else None)  # one judge, same verdict everywhere
        recent = rewards[-MONITOR_WINDOW:]
        reward = float(np.mean(recent)) if recent else None
        entry = {"iteration": iteration, "train_reward": reward, **scores}
        self.state.monitor.append(entry)
        if log_metrics is not None and self.rank == 0:
            log_metrics({f"monitor/{k}": v for k, v in scores.items()}, iteration)
        found = [(key, watch.check(scores[key], reward)) for key, watch in self.hacking.items() if key in scores]
        warning = "; ".join(f"{key}: {text}" for key, text in found if text)
        if warning:
            entry["hacking"] = warning
            log.warning("iteration %d: %s", iteration, warning)
            if self.cfg.stop_on_hacking:
                self.state.stopped = warning
        return entry


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
