"""GRPO ablations on the shapes world: one GRPO run per variant, one table.

Not a test: it measures, it does not assert. From the repository root:

    .venv/bin/python -m experiments.grpo_ablations.grpo_ablations --task t2i --base URI --reward-model URI \\
        --prompts URI --output experiments/grpo_ablations/results/grpo_ablations.json

Variants change only the ``grpo`` keys named below against the config's
values (``--config``, default configs/shapes.yaml); every other key, the
prompts and the seed stay the same:

* ``cfg_hybrid`` (the config as is; hybrid CFG is the default), ``cfg_both``,
  ``cfg_none``: which velocity the rollouts follow and the objective sees;
* ``timesteps_all``: train on all N steps instead of K early ones (the
  reward-hacking question: does the training reward rise while the judge
  falls?).

``--table levers`` measures instead what the prompt distribution does (the
shapes grammar has 2 single-object texts against 50 colour-binding ones, so
uniform draws over the curated prompts are mostly colour binding):

* ``default``: the config as is;
* ``category_filter_balanced_unsaturated_2steps``: the levers together:
  prompt filtering cuts each category at its own quantile of reward ranges
  (``filter.threshold_scope: category``), so a category whose groups spread
  less than the others keeps prompts; every category is drawn equally often
  (``grpo.balance_categories``) except the two the base already gets right
  (single object, colours: five times less often); two optimizer steps per
  iteration (``grpo.minibatches: 2``).

``--table epochs``: ``levers_2epochs``, ``levers_4epochs``, the levers with 2
or 4 passes over each iteration's rollouts (``grpo.epochs``; 4 or 8 optimizer
steps per iteration), so that the ratio leaves 1 and the clip range binds.

``--table edit_levers`` (``--task edit``): the same levers on edits,
``kind_filter_balanced_2steps`` (filter cut per edit kind, kinds drawn
equally often, two optimizer steps per iteration) and
``kind_filter_balanced_2steps_hard_kinds`` (remove and add, which the base
mostly gets right, drawn half as often). Its default-config arm is the edit
teacher of ``results/grpo_shapes.json`` (same base, reward models, prompts
and seed).

``--table windows``: the T2I levers for 400 iterations with the K = 2 trained
steps drawn from the first half of the 10-step schedule (``first_half``, the
default), its first 30 % (``first_30pct``), all of it (``whole_schedule``)
or its second half (``second_half``, ``grpo.timesteps.start: 0.5``); and
``first_half_group16``, 16 samples per prompt on 4 prompts per iteration
(the same 64 samples), so that rare right answers appear in more groups.

The later tables (``ema``, ``hold_fidelity``, ``kl_long``, ``edit_window``,
``kl03_levers``, ``cast_rm``, ``trainable``, ``trainable_long``) each build on the windows table's first 30 %
variant; the comment above each table's definition below says what it varies.

A variant with ``filter`` keys runs the filter_prompts stage itself (same
base and reward models, sampling at the config file's rollout steps and noise
level: :func:`filter_view`; a normal artifact, reused when it exists) and
trains on what that keeps; the others train on ``--prompts``.

``--set KEY=VALUE`` (repeatable) overrides a grpo key for every variant, and
``--variants`` picks a subset. Each run writes a normal grpo artifact under
``--artifacts``; the table holds, per variant, the judge's score on the
held-out evaluation set (headline and per category), fidelity, the final
training reward, the monitor curve, the early-stop reason if any, and wall
time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from flowrl.machine import machine_info
from flowrl.config import ConfigError, FlowRLConfig, from_dict, load_config, merge_data, parse_overrides
from flowrl.stages.filter_prompts import run_filter_prompts
from flowrl.stages.grpo import HEADLINE, run_grpo
from flowrl.tracking import NullTracker

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "cfg_hybrid": {},
    "cfg_both": {"cfg_mode": "both"},
    "cfg_none": {"cfg_mode": "none"},
    "timesteps_all": {"timesteps": "all"},
}
# Levers of the prompt distribution (``--table levers``): a ``filter`` entry re-runs prompt filtering
# with those keys (from the same base and reward models) and trains on what it keeps.
PER_CATEGORY = {"filter": {"threshold_scope": "category"}}
_LEVERS_GRPO = {"balance_categories": True, "sampling_weights": ["single_object=0.2", "colors=0.2"], "minibatches": 2}
LEVERS = {
    "default": {},
    "category_filter_balanced_unsaturated_2steps": {**PER_CATEGORY, "grpo": _LEVERS_GRPO},
}
# PPO epochs (``--table epochs``): the levers above with 2 or 4 passes over each iteration's rollouts
# (4 or 8 optimizer steps), so that the ratio leaves 1 and the clip range binds.
EPOCHS = {
    "levers_2epochs": {**PER_CATEGORY, "grpo": {**_LEVERS_GRPO, "epochs": 2}},
    "levers_4epochs": {**PER_CATEGORY, "grpo": {**_LEVERS_GRPO, "epochs": 4}},
}
# The same levers on edits (``--table edit_levers``, ``--task edit``): the filter cut per edit kind, every
# kind drawn equally often, two optimizer steps per iteration; then the two kinds the base gets mostly
# right (remove, add) drawn half as often, so recolor and move get two thirds of the draws.
_EDIT_LEVERS_GRPO = {"balance_categories": True, "minibatches": 2}
EDIT_LEVERS = {
    "kind_filter_balanced_2steps": {**PER_CATEGORY, "grpo": _EDIT_LEVERS_GRPO},
    "kind_filter_balanced_2steps_hard_kinds": {
        **PER_CATEGORY, "grpo": {**_EDIT_LEVERS_GRPO, "sampling_weights": ["remove=0.5", "add=0.5"]}},
}
# Gain over time (``--table long``): the T2I levers run four times as long, a checkpoint every 100
# iterations, each of which ``experiments.grpo_ablations.grpo_curve`` then judges on the full held-out set.
LONG = {"levers_800": {**PER_CATEGORY, "grpo": {**_LEVERS_GRPO, "iterations": 800, "checkpoint_every": 100}}}
# Where in the schedule to train, and how many samples per group (``--table windows``): the T2I levers for
# 400 iterations (where the long run peaked), K = 2 steps drawn from the first 5 of 10 (the default), the
# first 3, all 10 or the last 5; and 16 samples per group on 4 prompts (same samples per iteration).
_400_ITERATIONS = {"iterations": 400, "checkpoint_every": 100}
_LEVERS_400 = {**_LEVERS_GRPO, **_400_ITERATIONS}
_FIRST_30PCT = {**_LEVERS_400, "timestep_fraction": 0.3}
WINDOWS = {
    "first_half": {**PER_CATEGORY, "grpo": _LEVERS_400},
    "first_30pct": {**PER_CATEGORY, "grpo": _FIRST_30PCT},
    "whole_schedule": {**PER_CATEGORY, "grpo": {**_LEVERS_400, "timestep_fraction": 1.0}},
    "second_half": {**PER_CATEGORY, "grpo": {**_LEVERS_400, "timestep_start": 0.5}},
    "first_half_group16": {**PER_CATEGORY, "grpo": {**_LEVERS_400, "group_size": 16, "prompts_per_iteration": 4}},
}
# Weight averaging (``--table ema``): the first 30 % window (the largest gain of the windows table, past the
# fidelity bound) with the judged and saved weights an EMA of the trained ones (decay 0.95, about the last 20
# optimizer steps), at the levers' lr and at twice it (averaging may tolerate a larger step).
EMA = {
    "first_30pct_ema95": {**PER_CATEGORY, "grpo": {**_FIRST_30PCT, "ema_decay": 0.95}},
    "first_30pct_ema95_lr2e4": {**PER_CATEGORY, "grpo": {**_FIRST_30PCT, "ema_decay": 0.95, "lr": 2e-4}},
}
# Holding fidelity at the first 30 % window's gain (``--table hold_fidelity``): three times the KL to the base
# (0.3), or the fidelity reward weighted as much as alignment (1.0 instead of 0.5); then, under KL 0.3, more
# exploration in the rollouts (SDE noise level 1.0 instead of 0.7).
_KL03 = {**_FIRST_30PCT, "kl_coef": 0.3}
HOLD_FIDELITY = {
    "first_30pct_kl03": {**PER_CATEGORY, "grpo": _KL03},
    "first_30pct_fidelity1": {**PER_CATEGORY, "grpo": _FIRST_30PCT, "rewards": {"t2i": {"fidelity": 1.0}}},
    "first_30pct_kl03_noise1": {**PER_CATEGORY, "grpo": {**_KL03, "noise_level": 1.0}},
}
# Past 400 iterations under KL 0.3 (``--table kl_long``): the first 30 % window with KL 0.3 held fidelity at 400
# iterations (+0.133, -0.018), where the KL 0.1 long run stopped gaining and lost fidelity; the same for 800
# iterations, a checkpoint every 100 for ``experiments.grpo_ablations.grpo_curve``.
KL_LONG = {"first_30pct_kl03_800": {**PER_CATEGORY, "grpo": {**_KL03, "iterations": 800}}}
# The best T2I configuration on edits (``--table edit_window``, ``--task edit``): the edit levers for 400
# iterations with K = 2 steps from the first 30 % of the schedule and KL 0.3.
EDIT_WINDOW = {"kind_levers_first_30pct_kl03": {**PER_CATEGORY, "grpo": {
    **_EDIT_LEVERS_GRPO, **_400_ITERATIONS, "timestep_fraction": 0.3, "kl_coef": 0.3}}}
# A lever on the first 30 % window with KL 0.3 (``--table kl03_levers``), which held fidelity at 400 iterations
# (+0.133, -0.018) and then lost it: each category's advantages scaled by its reward headroom at filtering
# (``grpo.calibrate``).
KL03_LEVERS = {"first_30pct_kl03_calibrate": {**PER_CATEGORY, "grpo": {**_KL03, "calibrate": True}}}
# The same configurations on reward models that were shown off-palette colours (``--table cast_rm``, run with
# ``--reward-model`` from ``flowrl annotate`` / ``reward-model`` with ``--set 'annotate.degradations=[noise, blur,
# blotches, color_cast]'``): the drift of the KL runs' fidelity is object colours leaving the palette, a fault the
# shipped reward models never saw in their annotation data and cannot rank.
CAST_RM = {"first_30pct_kl03": HOLD_FIDELITY["first_30pct_kl03"], "first_30pct": WINDOWS["first_30pct"]}
# Which weights GRPO may move (``--table trainable``, ``grpo.trainable``): the fidelity the KL runs lose is object
# colour drifting off the palette, made at the trained high-noise steps; the easy paths to a colour shift are the
# adaLN modulation, the embeddings and the output head. Attention alone (qkv, proj of every block) against the
# first 30 % window with KL 0.3 (all weights: +0.133, -0.018), and the blocks' attention and MLPs against the same
# window with KL 0.1 (all weights: +0.153, -0.047).
_ATTENTION = ["blocks.*.qkv.*", "blocks.*.proj.*"]
# Then the blocks' attention and MLPs (which held fidelity at KL 0.1) pushed harder: twice the lr, or no KL.
_BLOCKS = [*_ATTENTION, "blocks.*.mlp.*"]
TRAINABLE = {
    "first_30pct_kl03_attention": {**PER_CATEGORY, "grpo": {**_KL03, "trainable": _ATTENTION}},
    "first_30pct_kl01_blocks": {**PER_CATEGORY, "grpo": {**_FIRST_30PCT, "kl_coef": 0.1, "trainable": _BLOCKS}},
    "first_30pct_kl01_blocks_lr2e4": {**PER_CATEGORY, "grpo": {
        **_FIRST_30PCT, "kl_coef": 0.1, "trainable": _BLOCKS, "lr": 2e-4}},
    "first_30pct_nokl_blocks": {**PER_CATEGORY, "grpo": {
        **_FIRST_30PCT, "kl_coef": 0.0, "kl_anchor_steps": 0, "trainable": _BLOCKS}},
}
# The trainable subsets past 400 iterations (``--table trainable_long``): the blocks' attention and MLPs at lr 2e-4
# under KL 0.1 (at 400: +0.140, -0.013, against all weights under KL 0.3 at +0.133, -0.018, which went on to +0.177,
# -0.065 at 800), and the attention alone with the same lr and KL, for 600 iterations; a checkpoint every 100 for
# ``experiments.grpo_ablations.grpo_curve``.
_BLOCKS_LR2E4_600 = {**TRAINABLE["first_30pct_kl01_blocks_lr2e4"]["grpo"], "iterations": 600}
TRAINABLE_LONG = {
    "first_30pct_kl01_blocks_lr2e4_600": {**PER_CATEGORY, "grpo": _BLOCKS_LR2E4_600},
    "first_30pct_kl01_attention_lr2e4_600": {**PER_CATEGORY, "grpo": {**_BLOCKS_LR2E4_600, "trainable": _ATTENTION}},
}
TABLES = {"ablations": VARIANTS, "levers": LEVERS, "epochs": EPOCHS, "edit_levers": EDIT_LEVERS, "long": LONG,
          "windows": WINDOWS, "ema": EMA, "hold_fidelity": HOLD_FIDELITY, "kl_long": KL_LONG,
          "edit_window": EDIT_WINDOW, "kl03_levers": KL03_LEVERS,
          "cast_rm": CAST_RM, "trainable": TRAINABLE, "trainable_long": TRAINABLE_LONG}
TABLE_TASK = {"levers": "t2i", "epochs": "t2i", "edit_levers": "edit", "long": "t2i", "windows": "t2i", "ema": "t2i",
              "hold_fidelity": "t2i", "kl_long": "t2i", "edit_window": "edit",
              "kl03_levers": "t2i", "cast_rm": "t2i", "trainable": "t2i",
              "trainable_long": "t2i"}  # tables whose variants name one task's categories


def split_variant(spec: dict) -> tuple[dict, dict]:
    """(grpo overrides, filter overrides) of a variant: plain grpo keys, or {"grpo": ..., "filter": ...,
    "rewards": ...} (reward weights are read by the caller)."""
    if {"grpo", "filter", "rewards"} & set(spec):
        return dict(spec.get("grpo", {})), dict(spec.get("filter", {}))
    return dict(spec), {}


def _parse_sets(values: list[str]) -> dict:
    try:
        return parse_overrides(values)
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None


def with_section(config: FlowRLConfig, section: str, overrides: dict) -> FlowRLConfig:
    """``config`` with keys of ``section`` replaced (nested sections key by key), validated like a config file."""
    current = getattr(config, section)
    merged = merge_data(dataclasses.asdict(current), overrides)
    return dataclasses.replace(config, **{section: from_dict(type(current), merged, f"{section}.")})


def with_reward_weights(config: FlowRLConfig, weights: dict) -> FlowRLConfig:
    """``config`` with the weights of named reward components replaced (a variant's ``{"t2i": {"fidelity":
    1.0}}``: rewards.t2i's component fidelity weighs 1.0), validated like a config file."""
    rewards = dataclasses.asdict(config.rewards)
    for task, by_name in weights.items():
        if task not in rewards or not isinstance(by_name, dict):
            raise ConfigError(f"rewards.{task}: expected {{component: weight}} for one of {sorted(rewards)}")
        names = [c["name"] for c in rewards[task]]
        for name, weight in by_name.items():
            if name not in names:
                raise ConfigError(f"rewards.{task}.{name}: no such component (components: {', '.join(names)})")
            rewards[task][names.index(name)]["weight"] = weight
    return dataclasses.replace(config, rewards=from_dict(type(config.rewards), rewards, "rewards."))


# The tables (and their committed results) name grpo keys as the section had them flat when they were recorded;
# these are where those keys live now (grpo.optim, grpo.loop, grpo.timesteps, grpo.rollout).
_NESTED = {
    **{key: ("optim", key) for key in ("lr", "weight_decay", "grad_clip", "ema_decay", "zero_stage",
                                       "gradient_checkpointing", "micro_batch")},
    **{key: ("loop", key) for key in ("iterations", "eval_every", "monitor_per_category", "checkpoint_every",
                                      "grid_every")},
    "timesteps": ("timesteps", "mode"), "timestep_fraction": ("timesteps", "fraction"),
    "timestep_start": ("timesteps", "start"), "timesteps_per_trajectory": ("timesteps", "per_trajectory"),
    **{key: ("rollout", key) for key in ("num_steps", "noise_level", "guidance_scale", "cfg_mode")},
    "rollout_micro_batch": ("rollout", "micro_batch"),
}


def nested_grpo_keys(keys: dict) -> dict:
    """A table's grpo keys (flat, as recorded) in the section's shape: ``{"iterations": 400}`` ->
    ``{"loop": {"iterations": 400}}``; other keys as they are."""
    out: dict = {}
    for key, value in keys.items():
        if key in _NESTED and not isinstance(value, dict):
            sub, name = _NESTED[key]
            out[sub] = {**out.get(sub, {}), name: value}
        elif isinstance(value, dict):  # a subsection given nested: merged into a copy, never into the caller's
            out[key] = {**out.get(key, {}), **value}
        else:
            out[key] = value
    return out


def with_grpo(config: FlowRLConfig, overrides: dict) -> FlowRLConfig:
    return with_section(config, "grpo", nested_grpo_keys(overrides))


def filter_view(config: FlowRLConfig, variant: FlowRLConfig) -> FlowRLConfig:
    """The config a variant's prompt filtering runs on: the variant's, its rollout sampler's steps and noise
    level those of ``config`` (the table's config file, before --set and variant keys). The tables were
    recorded when the filter had its own copies of those two keys, which no variant or --set changed
    (first_30pct_kl03_noise1 raises GRPO's noise level, and its filter sampled at the file's), so the
    curated prompts stay those the committed results trained on."""
    rollout = dataclasses.replace(variant.grpo.rollout, num_steps=config.grpo.rollout.num_steps,
                                  noise_level=config.grpo.rollout.noise_level)
    return dataclasses.replace(variant, grpo=dataclasses.replace(variant.grpo, rollout=rollout))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", required=True, choices=("t2i", "edit"))
    parser.add_argument("--base", required=True)
    parser.add_argument("--reward-model", required=True)
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes.yaml"))
    parser.add_argument("--table", default="ablations", choices=list(TABLES),
                        help="ablations: the CFG and timestep variants; levers: prompt-distribution levers; "
                        "epochs: the levers with PPO epochs; edit_levers: the levers on edits (--task edit); "
                        "long: the T2I levers for 800 iterations (see grpo_curve.py); windows: which steps "
                        "of the schedule are trained, and group size (T2I levers, 400 iterations); ema: the first 30 %% "
                        "window with EMA weights; hold_fidelity: that window with more KL or fidelity weight; kl_long: "
                        "that window with KL 0.3 for 800 iterations; edit_window: the edit levers with that window "
                        "and KL 0.3 (--task edit); kl03_levers: that window with KL 0.3 and grpo.calibrate; cast_rm: "
                        "that window with KL 0.3 and 0.1, for --reward-model trained with color_cast candidates; trainable: "
                        "that window training only the blocks' attention (KL 0.3) or attention and MLPs (KL 0.1; "
                        "also at twice the lr, and with no KL)")
    parser.add_argument("--variants", nargs="+", default=None, help="a subset of the table's variants")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--output", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: run.torch_threads)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if args.threads is not None:
        config = dataclasses.replace(config, run=dataclasses.replace(config.run, torch_threads=args.threads))
    if TABLE_TASK.get(args.table, args.task) != args.task:
        raise SystemExit(f"--table {args.table} is a {TABLE_TASK[args.table]} table, got --task {args.task}")
    specs = TABLES[args.table]
    names = args.variants or list(specs)
    unknown = sorted(set(names) - set(specs))
    if unknown:
        raise SystemExit(f"--variants: {unknown} not in the {args.table} table ({sorted(specs)})")
    common = _parse_sets(args.set)
    for name in names:  # a variant's own keys would silently win over --set: refuse instead
        clash = sorted(set(common) & set(split_variant(specs[name])[0]))
        if clash:
            raise SystemExit(f"--set {', '.join(clash)}: the variant {name} sets it itself (it is what the variant varies)")
    table, base_metrics = {}, {}
    for name in names:
        grpo_keys, filter_keys = split_variant(specs[name])
        variant = with_grpo(config, {**common, **grpo_keys})
        rewards_keys = specs[name].get("rewards", {})
        if rewards_keys:
            variant = with_reward_weights(variant, rewards_keys)
        prompts, filter_metrics = args.prompts, None
        if filter_keys:
            variant = with_section(variant, "filter", filter_keys)
            filtered = run_filter_prompts(filter_view(config, variant), args.task, args.base, args.reward_model,
                                          output_root=args.artifacts, tracker=NullTracker())
            prompts, filter_metrics = filtered.uri, filtered.metrics
        result = run_grpo(variant, args.task, args.base, args.reward_model, prompts,
                          output_root=args.artifacts, tracker=NullTracker(), progress=False)
        m = result.metrics
        base_metrics = m["base"]
        table[name] = {
            "grpo": {**common, **grpo_keys},
            **({"rewards": rewards_keys} if rewards_keys else {}),
            **({"filter": filter_keys, "prompts": prompts,
                "kept_fraction": filter_metrics["kept_fraction"]} if filter_keys else {}),
            "judge": m["teacher"],
            "headline_delta": m["teacher"][HEADLINE[args.task]] - m["base"][HEADLINE[args.task]],
            "fidelity_delta": m["teacher"]["fidelity"] - m["base"]["fidelity"],
            "final_train_reward": m["final_train_reward"],
            "monitor": [(e["iteration"], e["heldout"], e["train_reward"]) for e in m["monitor"]],
            "hacking_warnings": [e["iteration"] for e in m["monitor"] if "hacking" in e],
            "stopped_early": m["stopped_early"],
            "wall_s": m["wall_s"],
            "artifact": result.uri,
        }
        print(json.dumps({name: table[name]}, indent=1), flush=True)
    payload = {
        "task": args.task,
        "config_hash": config.section_hash("run.seed", "world", "sampler", "eval", "grpo", "rewards"),
        "filter_config_hash": config.section_hash("filter"),
        "table": args.table,
        "command": " ".join(["python -m experiments.grpo_ablations.grpo_ablations",
                             *(argv if argv is not None else sys.argv[1:])]),
        "base": base_metrics,
        "inputs": {"base": args.base, "reward_model": args.reward_model, "prompts": args.prompts},
        "variants": table,
        "machine": machine_info(),
    }
    if args.output:
        _merge(Path(args.output), args.task, payload)
    return payload


def _merge(path: Path, task: str, payload: dict) -> None:
    """Add this run's variants to the task's table in ``path`` (several runners
    may share one file: the read-modify-write holds an exclusive lock)."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        previous = json.loads(path.read_text()) if path.is_file() else {}
        entry = previous.get(task)
        if entry is not None and entry.get("inputs") == payload["inputs"]:
            entry["variants"].update(payload["variants"])
        else:
            previous[task] = payload
        path.write_text(json.dumps(previous, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
