"""What scores a model on held-out prompts, behind one interface: the shapes world's judge, or the held-out
reward model of a family without one.

The RL stages (GRPO, Mix-RL, OPD) use an :class:`Evaluator` twice: as the monitor that watches held-out prompts
during training (the reward-hacking alarm), and for the final comparison of the trained model against the
base and the teachers. :func:`evaluator_for` picks the judge when the model family has one (``has_judge``).

- :class:`JudgeEvaluator`: the judge on the fixed held-out sets of ``eval`` (final) and on a monitor set drawn
  apart from them; the base artifact recorded its judge metrics, so the base is not scored again.
- :class:`RewardModelEvaluator`: the reward_model artifact's scorers on the filter's held-out prompts; the
  monitor is ``grpo.monitor_reward``, a scorer RL does not train on. Each scorer is loaded for its call
  only, so one is on the GPU at a time and none while the policy trains.

Metric keys are ``<task>/<name>`` in both, so one comparison table serves both.
"""

from __future__ import annotations

import abc
import json
from pathlib import Path
from typing import Callable

import numpy as np

from flowrl.config import FlowRLConfig
from flowrl.evaluation import evaluate_shapes, generate, heldout_sample, image_grid, reward_evaluation, to_uint8
from flowrl.models.base import FlowModel
from flowrl.tracking import Tracker

__all__ = ["Evaluator", "JudgeEvaluator", "RewardModelEvaluator", "evaluator_for", "MONITOR_SEED_OFFSET"]

MONITOR_SEED_OFFSET = 7919  # the monitor set is drawn apart from the evaluation set
JUDGE_HEADLINE = {"t2i": "t2i/alignment", "edit": "edit/accuracy"}

Monitor = Callable[[FlowModel, int], dict]
Views = Callable[[FlowModel], dict]


class Evaluator(abc.ABC):
    """Scores models of ``tasks`` on held-out prompts. ``name`` is what scores them (``judge``, or the
    reward model's name); ``records_base``: the base artifact recorded its scores under this evaluator."""

    name: str = ""
    records_base: bool = False

    def __init__(self, config: FlowRLConfig, tasks: tuple[str, ...]):
        self.config, self.tasks = config, tuple(tasks)

    @abc.abstractmethod
    def monitor(self, tracker: Tracker, views_of: Views, per_category: int, grid_every: int) -> Monitor:
        """The training monitor: ``monitor(model, iteration)`` -> {"heldout": headline score, ...};
        ``views_of(model)`` gives the model's view of each task (one model serves both on shapes)."""

    @abc.abstractmethod
    def evaluate(self, views: dict[str, FlowModel]) -> tuple[dict[str, float], np.ndarray]:
        """({"<task>/<metric>": value}, a grid of samples) of the final evaluation."""

    @abc.abstractmethod
    def headline(self, task: str) -> str:
        """The metric key that says how well a model does ``task``."""

    def recorded(self, artifact_dir: Path) -> dict[str, float] | None:
        """The scores a model artifact recorded of itself under this evaluator (a GRPO teacher's
        ``teacher``; the base's own metrics when ``records_base``), or None when it recorded none."""
        metrics = json.loads((Path(artifact_dir) / "metrics.json").read_text())
        if "teacher" in metrics:
            return metrics["teacher"]
        return metrics if self.records_base else None

    def heldout_label(self) -> str | None:
        """The label of the held-out curve in a GRPO stage's plot (None: the judge's default)."""
        return None

    def provenance(self, stage: str) -> dict:
        """What a stage's metrics record of how it was scored (nothing for the judge)."""
        return {}


class JudgeEvaluator(Evaluator):
    """The shapes world's judge (flowrl/shapes/judge.py): held out from every reward."""

    name = "judge"
    records_base = True

    def monitor(self, tracker, views_of, per_category, grid_every):
        return judge_monitor(self.config, "mixed" if len(self.tasks) > 1 else self.tasks[0], tracker,
                             per_category, grid_every)

    def evaluate(self, views):
        report = evaluate_shapes(views[self.tasks[0]], self.config)  # one model serves both tasks
        return report.metrics, report.grid

    def headline(self, task):
        return JUDGE_HEADLINE[task]


class RewardModelEvaluator(Evaluator):
    """The reward_model artifact's scorers on the filter's held-out prompts (``heldout``: {task: frame}):
    ``grpo.monitor_reward`` watches training; the final evaluation adds every component of the composite
    (``composites``: {task: CompositeReward})."""

    def __init__(self, config: FlowRLConfig, tasks: tuple[str, ...], reward_model_uri: str, heldout: dict,
                 composites: dict):
        from flowrl.rewards.production import ReleasedAfterScoring, load_monitor_scorer

        super().__init__(config, tasks)
        self.name, self.reward_model_uri = config.grpo.monitor_reward, reward_model_uri
        self.heldout, self.composites = heldout, composites
        self.watchers, self.scorers = {}, {}
        for t in self.tasks:
            watcher = ReleasedAfterScoring(load_monitor_scorer(reward_model_uri, t, self.name, composites[t]))
            self.watchers[t] = watcher
            self.scorers[t] = {n: ReleasedAfterScoring(r) for n, r in dict(composites[t].components).items()}
            self.scorers[t][self.name] = watcher
        per_task = {"t2i": config.eval.t2i_per_category, "edit": config.eval.edit_per_kind}
        self.eval_rows = {t: heldout_sample(heldout[t], per_task[t]) for t in self.tasks}

    def monitor(self, tracker, views_of, per_category, grid_every):
        rows = {t: heldout_sample(self.heldout[t], per_category) for t in self.tasks}
        seed = self.config.eval.seed + MONITOR_SEED_OFFSET  # the same draws in every stage

        def monitor(model: FlowModel, iteration: int) -> dict[str, float]:
            scores = {}
            for t, view in views_of(model).items():
                result, grid = reward_evaluation(view, rows[t], {"heldout": self.watchers[t]}, self.config.sampler,
                                                 seed, self.config.eval.batch_size)
                scores[t] = result["heldout"]
                if iteration % grid_every == 0:
                    tracker.log_image(grid, f"monitor/grid_{t}_{iteration:06d}.png")
            if len(self.tasks) == 1:
                return {"heldout": scores[self.tasks[0]]}
            return {"heldout": sum(scores.values()) / len(scores), **scores}

        return monitor

    def evaluate(self, views):
        metrics, grids = {}, []
        for t in self.tasks:
            scores, grid = reward_evaluation(views[t], self.eval_rows[t], self.scorers[t], self.config.sampler,
                                             self.config.eval.seed, self.config.eval.batch_size)
            metrics.update({f"{t}/{k}": v for k, v in scores.items()})
            grids.append(grid)
        width = min(g.shape[1] for g in grids)
        return metrics, np.concatenate([g[:, :width] for g in grids], axis=0)

    def headline(self, task):
        return f"{task}/{self.name}"

    def heldout_label(self):
        return f"held-out {self.name} reward"

    def provenance(self, stage):
        if stage.startswith("grpo"):
            names = [n for t in self.tasks for n in self.composites[t].component_names]
            return {"scored_by": {"components": names, "heldout": self.name},
                    "heldout_prompts": sum(len(rows) for rows in self.eval_rows.values())}
        return {"scored_by": self.name, "reward_model": self.reward_model_uri}


def evaluator_for(config: FlowRLConfig, tasks: tuple[str, ...], *, reward_model_uri: str | None = None,
                  heldout: dict | None = None, composites: dict | None = None) -> Evaluator:
    """The judge where the model family has one, else the held-out reward model (which needs the
    reward_model artifact, the held-out prompt frames and the task composites)."""
    from flowrl.models.families import family_of

    if family_of(config).has_judge:
        return JudgeEvaluator(config, tasks)
    return RewardModelEvaluator(config, tasks, reward_model_uri, heldout, composites)


def judge_monitor(config: FlowRLConfig, task: str, tracker: Tracker, per_category: int | None = None,
                  grid_every: int | None = None) -> Monitor:
    """The judge on a fixed held-out prompt set, with the deployment sampler.

    ``task`` t2i or edit: ``heldout`` is that task's headline metric; ``mixed``
    (Mix-RL, OPD): both sets, ``heldout`` the mean of the two headlines,
    each also given under its task's name."""
    from flowrl.shapes import judge
    from flowrl.shapes.edits import make_edit_set
    from flowrl.shapes.prompts import make_t2i_set
    from flowrl.shapes.render import render_batch

    seed = config.eval.seed + MONITOR_SEED_OFFSET
    n = per_category or config.grpo.loop.monitor_per_category
    grid_every = grid_every or config.grpo.loop.grid_every
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
