"""On-policy distillation (OPD): the task teachers merged into one student.

The student samples its own trajectories with the deployment sampler (ODE,
CFG at the deployment scale, no grad); at every visited state ``x_tn`` the
teacher bound to the prompt's task (or category) gives its velocity, and the
student regresses onto it on the conditional *and* the unconditional branch,
so that guided sampling with the student follows the teacher's guided field:

    L = mean_trajectories  sum_n  sum_{branch in (cond, uncond)}
            mean_elements (v_student(x_tn, t_n, c_b) - v_teacher(x_tn, t_n, c_b))^2

(the squared norm of docs/design.md, Math, divided by the number of latent
elements so the scale does not depend on the resolution). With
``timesteps: subset`` each trajectory contributes K of its N visited steps,
drawn uniformly, and the sum is scaled by N / K, an unbiased estimate of the
full sum. Off-policy distillation (the ablation) takes the states from the
teacher's own trajectories instead.

The K states of each trajectory are drawn before it is sampled, and each
trajectory is integrated only as far as its deepest drawn state
(:func:`ode_states_at`): the states it holds are those the
full trajectory passes through, and the forwards after the deepest one,
whose states nothing would match at, are never run.

No reward model takes part. Teachers are frozen, loaded once and run under
``torch.no_grad``; they share the student's family and text conditioning.
With ``micro_batch`` the student's and the teachers' forwards run over parts
of each batch's rows; the student's gradients accumulate, each part weighted
by its share of the rows, so the step is the whole batch's.

The loss is a sum over (trajectory, matched state) pairs, so a part need not
hold whole trajectories: with ``states_per_forward = s`` each forward holds at
most s pairs, 2 s rows (both CFG branches of each pair). It splits further
within each ``micro_batch`` part (the pairs of one part's trajectories, in
trajectory-major order; a part of pairs never spans two trajectory parts),
so with both keys set a forward holds at most ``min(s, micro_batch * K)``
pairs. Each part's mean over its pairs is weighted by its pairs over the
batch's trajectories, so the loss, its gradient and the reported metrics are
the whole batch's (up to the order of float sums). Unset, the parts are
whole trajectories, as above.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from flowrl.config import OPDConfig, name_value_pairs
from flowrl.models import trainable_module
from flowrl.models.base import Condition, FlowModel
from flowrl.models.lora import enable_gradient_checkpointing
from flowrl.rl.algorithms import register_algorithm
from flowrl.rl.distributed import mean_across_ranks
from flowrl.rl.engine import make_engine
from flowrl.rl.grpo import PromptSet, draw_prompts
from flowrl.rl.trainer import Checkpoints, LoopSettings, LoopTrainer, seeded_generator
from flowrl.sampling import cfg_velocity, euler_step


def velocity_matching_loss(v_student: torch.Tensor, v_teacher: torch.Tensor, step_scale: float = 1.0) -> torch.Tensor:
    """``step_scale * mean_r sum_s mean_elements (v_student - v_teacher)^2``.

    Both [R, S, *latent]: R trajectories, S visited steps (both CFG branches
    count as steps here). ``step_scale`` is N / K when S holds a K-of-N subset.
    """
    if v_student.shape != v_teacher.shape or v_student.ndim < 3:
        raise ValueError(
            f"velocities must both be [R, S, *latent]; got {tuple(v_student.shape)} and {tuple(v_teacher.shape)}"
        )
    per_step = (v_student - v_teacher.detach()).pow(2).flatten(2).mean(dim=2)  # [R, S]
    return step_scale * per_step.sum(dim=1).mean()


@torch.no_grad()
def ode_states_at(
    model: FlowModel,
    cond: Condition,
    sigmas: torch.Tensor,
    steps: torch.Tensor,
    initial_noise: torch.Tensor,
    *,
    null_cond: Condition | None = None,
    guidance_scale: float = 1.0,
    renorm_dim: int | None = None,
) -> torch.Tensor:
    """The ODE sampler's states at chosen indices: ``states[b, k]`` is row b's
    state at ``sigmas[steps[b, k]]`` (``steps``: [B, K] indices into the N + 1
    states), what :func:`flowrl.sampling.sample` would give there.

    Each row is integrated only as far as its deepest chosen index, so rows
    leave the batch as soon as they have what is asked of them: when K of N
    states are drawn uniformly, the deepest lies about K / (K + 1) of the
    way down the schedule, and the forwards after it are never run.
    """
    batch = cond.batch_size
    if steps.ndim != 2 or steps.shape[0] != batch:
        raise ValueError(f"steps must be [{batch}, K] indices, got {tuple(steps.shape)}")
    if int(steps.min()) < 0 or int(steps.max()) >= len(sigmas):
        raise ValueError(
            f"steps must index the {len(sigmas)} states of the schedule, got {int(steps.min())}..{int(steps.max())}")
    x = initial_noise.clone()
    out = torch.empty(batch, steps.shape[1], *x.shape[1:], dtype=x.dtype, device=x.device)
    depth = steps.max(dim=1).values  # [B] the last index each row needs
    for n in range(int(depth.max()) + 1):
        rows, cols = (steps == n).nonzero(as_tuple=True)
        out[rows, cols] = x[rows]
        active = (depth > n).nonzero(as_tuple=True)[0]
        if len(active) == 0:
            break
        t = torch.full((len(active),), float(sigmas[n]), device=x.device)
        t_next = torch.full((len(active),), float(sigmas[n + 1]), device=x.device)
        whole = len(active) == batch
        vel = cfg_velocity(model, x if whole else x[active], t, cond if whole else cond.index(active),
                           None if null_cond is None else (null_cond if whole else null_cond.index(active)),
                           guidance_scale, renorm_dim)
        x[active] = euler_step(x[active], vel.guided, t, t_next)
    return out


def parse_routes(routes: tuple[str, ...], tasks: tuple[str, ...], teachers: tuple[str, ...]) -> dict[str, str]:
    """``("t2i=t2i", "counting=counting_expert")`` -> {selector: teacher}; a
    selector is a task or a prompt category (category routes win)."""
    out: dict[str, str] = {}
    for i, (selector, teacher) in enumerate(name_value_pairs(routes, "opd.routes", "SELECTOR=TEACHER")):
        if teacher not in teachers:
            raise ValueError(f"opd.routes[{i}]: no teacher named {teacher!r} (given: {', '.join(teachers)})")
        out[selector] = teacher
    missing = [t for t in tasks if t not in out]
    if missing:
        raise ValueError(f"opd.routes: no teacher for task {missing[0]!r} (add {missing[0]}=TEACHER)")
    return out


def pair_parts(rows: torch.Tensor, states: int, per_part: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (trajectory, state) pairs of trajectories ``rows``, each with ``states`` matched states, in
    trajectory-major order, cut into parts of at most ``per_part`` pairs: [(trajectory indices [P],
    state columns [P]), ...]."""
    if states < 1 or per_part < 1:
        raise ValueError(f"pair_parts: states and per_part must be >= 1, got {states} and {per_part}")
    trajectories = rows.repeat_interleave(states)
    columns = torch.arange(states).repeat(len(rows))
    return list(zip(torch.split(trajectories, per_part), torch.split(columns, per_part)))


@dataclass(frozen=True)
class DistillBatch:
    """One task's share of an iteration: R trajectories, the K states of each that are matched."""

    task: str
    cond: Condition
    null_cond: Condition
    noise: torch.Tensor  # [R, *latent] where each trajectory starts
    steps: torch.Tensor  # [R, K] indices of the matched states (into the N + 1 states of the schedule)
    states: torch.Tensor  # [R, K, *latent] the states at those indices
    sigmas: torch.Tensor  # [N + 1]
    step_scale: float  # N / K for a subset, 1 for all N
    teacher_names: list[str]  # [R]


def task_counts(total: int, fractions: dict[str, float]) -> dict[str, int]:
    """Split ``total`` prompts over tasks by ``fractions`` (largest remainder)."""
    raw = {t: total * f for t, f in fractions.items()}
    counts = {t: math.floor(v) for t, v in raw.items()}
    for t in sorted(raw, key=lambda t: raw[t] - counts[t], reverse=True)[: total - sum(counts.values())]:
        counts[t] += 1
    return counts


@register_algorithm("opd", kind="distill")
class OPDTrainer(LoopTrainer):
    """Velocity-matching distillation of ``teachers`` into ``model``.

    ``prompts``: {task: PromptSet}; ``routes``: {task or category: teacher
    name}; ``fractions``: {task: share of each iteration's prompts}.
    ``task_models``: per-task views of the student that share ``module``
    (Qwen-Image's T2I and edit pipelines around one transformer); by
    default ``model`` serves every task (the shapes family).
    """

    def __init__(
        self,
        model: FlowModel,
        module: torch.nn.Module,
        teachers: dict[str, FlowModel],
        cfg: OPDConfig,
        prompts: dict[str, PromptSet],
        routes: dict[str, str],
        fractions: dict[str, float],
        guidance_scale: float,
        shift: float = 1.0,
        monitor: Callable[[FlowModel, int], dict[str, float]] | None = None,
        checkpoints: Checkpoints | None = None,
        config_hash: str = "",
        task_models: dict[str, FlowModel] | None = None,
    ):
        opt, loop = cfg.optim, cfg.loop
        if opt.gradient_checkpointing:  # before the engine wraps the module
            enable_gradient_checkpointing(module, "opd.optim.gradient_checkpointing")
        engine = make_engine(model, module, lr=opt.lr, weight_decay=opt.weight_decay, grad_clip=opt.grad_clip,
                             zero_stage=opt.zero_stage, ema=opt.ema_decay > 0, where="opd")
        ema = engine.make_ema(opt.ema_decay) if opt.ema_decay > 0 else None  # sharded under ZeRO
        settings = LoopSettings(loop.iterations, loop.eval_every, loop.checkpoint_every, name="opd",
                                tracked="train/loss", time_budget_s=loop.time_budget_s)
        super().__init__(model, module, engine, ema, settings, monitor, checkpoints, config_hash)
        self.teachers, self.cfg, self.prompts, self.routes = teachers, cfg, prompts, routes
        if cfg.num_steps is None:
            raise ValueError("opd.num_steps: resolve null to the sampler's steps before building the trainer")
        self.guidance_scale, self.shift = guidance_scale, shift
        for teacher in teachers.values():
            trainable_module(teacher).requires_grad_(False)
        self.counts = task_counts(cfg.prompts_per_iteration, fractions)
        for task, n in self.counts.items():
            if n % self.world:
                raise ValueError(f"opd: {n} {task} prompts per iteration do not split over {self.world} processes")
        self.task_models = {task: (task_models or {}).get(task, model) for task in prompts}
        # the engine keeps one gradient-reducing wrapper of the module, whichever model views it
        self.train_models = {task: self.engine.view(m) for task, m in self.task_models.items()}

    def teacher_of(self, task: str, category: str) -> str:
        return self.routes.get(category, self.routes[task])

    # ------------------------------------------------------------------ states
    def _states(self, sampler_model: FlowModel, cond, null_cond, sigmas, noise, steps) -> torch.Tensor:
        return ode_states_at(sampler_model, cond, sigmas, steps, noise, null_cond=null_cond,
                             guidance_scale=self.guidance_scale, renorm_dim=sampler_model.cfg_renorm_dim)

    def collect(self, iteration: int) -> list[DistillBatch]:
        cfg = self.cfg
        gen = seeded_generator(cfg.seed, iteration, stream=100)  # global draws, sliced per rank
        step_gen = seeded_generator(cfg.seed, iteration, stream=1)
        out = []
        for index, (task, prompt_set) in enumerate(self.prompts.items()):
            n = self.counts.get(task, 0)
            if n == 0:
                continue
            chosen = draw_prompts(prompt_set, n, cfg.seed + 1_000_003 * index, iteration)
            student = self.task_models[task]
            noise = student.prepare_noise(n, gen).reshape(self.world, n // self.world, -1)[self.rank]
            chosen = chosen.reshape(self.world, -1)[self.rank]
            texts = [prompt_set.prompts[i] for i in chosen]
            sources = None if prompt_set.sources is None else prompt_set.sources[torch.as_tensor(chosen)]
            names = [self.teacher_of(task, prompt_set.categories[i]) for i in chosen]
            cond = student.encode_prompts(texts, sources)
            null_cond = student.null_condition(cond)
            sigmas = student.schedule(cfg.num_steps, self.shift)
            noise = noise.reshape(len(texts), *student.latent_shape())
            steps, scale = self._select_steps(len(texts), step_gen)
            if cfg.timesteps.mode == "subset":  # drawn for the global batch, so ranks do not change the update
                steps = steps[self.rank * len(texts) : (self.rank + 1) * len(texts)]
            if cfg.states == "on_policy":
                self.module.eval()
                states = self._states(student, cond, null_cond, sigmas, noise, steps)
            else:  # off-policy ablation: each row follows its own teacher
                states = torch.empty(len(texts), steps.shape[1], *noise.shape[1:])
                for name in sorted(set(names)):
                    rows = torch.tensor([i for i, t in enumerate(names) if t == name])
                    states[rows] = self._states(self.teachers[name], cond.index(rows), null_cond.index(rows),
                                                sigmas, noise[rows], steps[rows])
            out.append(DistillBatch(task, cond, null_cond, noise, steps, states, sigmas, scale, names))
        return out

    # ------------------------------------------------------------------ update
    def _select_steps(self, rows: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
        n = self.cfg.num_steps
        if self.cfg.timesteps.mode == "all":
            return torch.arange(n).expand(rows, n).clone(), 1.0
        k = self.cfg.timesteps.per_trajectory
        return torch.rand(rows * self.world, n, generator=gen).argsort(dim=1)[:, :k], n / k

    def _velocities(self, model: FlowModel, batch: DistillBatch, rows: torch.Tensor):
        """[R, 2K, *latent]: both CFG branches at the matched states of ``rows``, in one batched forward."""
        r, s = batch.steps[rows].shape
        flat_rows = rows[:, None].expand(r, s).reshape(-1)
        x = batch.states[rows].flatten(0, 1)
        t = batch.sigmas[batch.steps[rows].reshape(-1)].to(x.device)
        cond = batch.cond.index(flat_rows).cat(batch.null_cond.index(flat_rows))
        v = model.velocity(torch.cat([x, x]), torch.cat([t, t]), cond)
        v_c, v_u = v.chunk(2)
        return torch.cat([v_c.reshape(r, s, *x.shape[1:]), v_u.reshape(r, s, *x.shape[1:])], dim=1)

    def _pair_velocities(self, model: FlowModel, batch: DistillBatch, rows: torch.Tensor,
                         cols: torch.Tensor) -> torch.Tensor:
        """[P, 2, *latent]: the cond and uncond velocities at the matched states ``cols`` of trajectories
        ``rows`` (P pairs, one batched forward of 2 P rows)."""
        x = batch.states[rows, cols]
        t = batch.sigmas[batch.steps[rows, cols]].to(x.device)
        cond = batch.cond.index(rows).cat(batch.null_cond.index(rows))
        v_c, v_u = model.velocity(torch.cat([x, x]), torch.cat([t, t]), cond).chunk(2)
        return torch.stack([v_c, v_u], dim=1)

    def _micro_batches(self, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``rows`` in the parts that run through a network one at a time (all at once by default)."""
        micro = self.cfg.optim.micro_batch
        return (rows,) if micro is None else torch.split(rows, micro)

    def _pair_parts(self, rows: torch.Tensor, states: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The (trajectory, state) pairs of ``rows`` in the parts that run one at a time with
        ``states_per_forward`` (see :func:`pair_parts`)."""
        return [part for group in self._micro_batches(rows)
                for part in pair_parts(group, states, self.cfg.states_per_forward)]

    def _targets(self, batch: DistillBatch) -> torch.Tensor:
        """[R, 2K, *latent]: each row's teacher's velocities at its matched states, both branches."""
        k = batch.steps.shape[1]
        target = torch.empty(batch.states.shape[0], 2 * k, *batch.states.shape[2:])
        with torch.no_grad():
            for name in sorted(set(batch.teacher_names)):
                rows = torch.tensor([i for i, t in enumerate(batch.teacher_names) if t == name])
                if self.cfg.states_per_forward is None:
                    for part in self._micro_batches(rows):
                        target[part] = self._velocities(self.teachers[name], batch, part)
                    continue
                for part_rows, part_cols in self._pair_parts(rows, k):
                    v = self._pair_velocities(self.teachers[name], batch, part_rows, part_cols)
                    target[part_rows, part_cols] = v[:, 0].to(target)
                    target[part_rows, k + part_cols] = v[:, 1].to(target)
        return target

    def _task_step(self, batch: DistillBatch, target: torch.Tensor, share: float, last: bool) -> tuple[float, float]:
        """Forward and backward of one task's batch (weighted ``share`` of the step), one micro-batch
        at a time; the last part of the ``last`` task reduces across ranks. Returns the task's loss and
        its unconditional-branch part, over all rows."""
        if self.cfg.states_per_forward is not None:
            return self._pair_task_step(batch, target, share, last)
        rows = torch.arange(batch.states.shape[0])
        parts = self._micro_batches(rows)
        train_model = self.train_models[batch.task]
        half = batch.steps.shape[1]
        loss_total, uncond_total = 0.0, 0.0
        for p, part in enumerate(parts):
            frac = len(part) / len(rows)  # the loss is a mean over rows: each part's mean weighs its rows
            with self.engine.accumulate(train_model, last=last and p == len(parts) - 1):
                pred = self._velocities(train_model, batch, part)
                loss = velocity_matching_loss(pred, target[part], batch.step_scale)
                self.engine.backward(loss * share * frac)
            with torch.no_grad():
                per_branch = (pred.detach() - target[part]).pow(2).flatten(2).mean(dim=2)
            loss_total += frac * float(loss.detach())
            uncond_total += frac * float(batch.step_scale * per_branch[:, half:].sum(1).mean())
        return loss_total, uncond_total

    def _pair_task_step(self, batch: DistillBatch, target: torch.Tensor, share: float,
                        last: bool) -> tuple[float, float]:
        """:meth:`_task_step` over parts of (trajectory, state) pairs (``states_per_forward``). The loss is
        ``step_scale / R`` times the sum over pairs of both branches' errors; a part's mean over its P
        pairs therefore weighs P / R."""
        total_rows, k = batch.steps.shape
        parts = self._pair_parts(torch.arange(total_rows), k)
        train_model = self.train_models[batch.task]
        loss_total, uncond_total = 0.0, 0.0
        for p, (rows, cols) in enumerate(parts):
            frac = len(rows) / total_rows
            part_target = torch.stack([target[rows, cols], target[rows, k + cols]], dim=1)  # [P, 2, *latent]
            with self.engine.accumulate(train_model, last=last and p == len(parts) - 1):
                pred = self._pair_velocities(train_model, batch, rows, cols)
                part_target = part_target.to(pred)
                loss = velocity_matching_loss(pred, part_target, batch.step_scale)
                self.engine.backward(loss * share * frac)
            with torch.no_grad():
                per_branch = (pred.detach() - part_target).pow(2).flatten(2).mean(dim=2)  # [P, 2]
            loss_total += frac * float(loss.detach())
            uncond_total += frac * float(batch.step_scale * per_branch[:, 1].mean())
        return loss_total, uncond_total

    def update(self, batches: list[DistillBatch], iteration: int) -> dict[str, float]:
        total = sum(b.states.shape[0] for b in batches)
        metrics: dict[str, float] = {}
        self.module.train()
        self.engine.zero_grad()
        loss_sum = 0.0
        for j, batch in enumerate(batches):
            target = self._targets(batch)
            share = batch.states.shape[0] / total
            loss, uncond = self._task_step(batch, target, share, last=j == len(batches) - 1)
            metrics[f"train/loss_{batch.task}"] = loss
            metrics[f"train/loss_{batch.task}_uncond"] = uncond
            loss_sum += share * loss
        grad_norm = self.engine.step()  # global-norm clip, then AdamW
        if self.ema is not None:
            self.ema.update(self.module)
        self.module.eval()
        metrics["train/loss"] = loss_sum
        metrics["train/grad_norm"] = grad_norm
        return mean_across_ranks(metrics)

    def step(self, iteration: int) -> dict[str, float]:
        return self.update(self.collect(iteration), iteration)

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.4f}", **super().postfix(metrics)}
