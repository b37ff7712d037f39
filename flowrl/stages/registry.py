"""The pipeline's stages, each declared once.

A :class:`Stage` says everything the layers around the library need to know about one stage: the
module and function that run it, the names its artifacts carry, the config sections its output
depends on, the container image it runs in, the resources its task asks for, and the arguments of
its ``flowrl`` subcommand. The CLI builds its stage subcommands from :data:`STAGES`, the Flyte tasks
take their defaults, cache keys and per-stage configs from it, the image builder makes one image per
entry, and the stage modules read their config sections from it (:func:`stage_sections`).

This file imports only the standard library and never the stage modules themselves (a stage names
its module and function as strings, imported when it runs), so it is cheap to import and can be
loaded by path from a checkout (``images/build.py`` does, without importing flowrl or torch).

Config sections: an entry is a top-level section (``"grpo"``) or one key of it (``"run.seed"``). A
stage reads only what it declares, plus :data:`INFRASTRUCTURE` (where artifacts and runs go, how many
threads), which changes where a result is written and never what it is.
``tests/stages/test_stage_registry.py`` runs every stage on a config whose undeclared sections raise
on any read.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

# keys any stage may read without declaring them: where it writes, where it tracks, its threads, its launch
INFRASTRUCTURE = ("run.name", "run.artifact_root", "run.tracking_uri", "run.torch_threads", "launch")


@dataclass(frozen=True)
class Arg:
    """One argument of a stage's ``flowrl`` subcommand.

    ``param``: the keyword of the stage function the value is passed as (None: the CLI reads it
    itself, e.g. ``--report-dir``). ``kind`` says how the value reaches the function: ``value`` as
    parsed; ``named`` a list of NAME=URI turned into ``{NAME: URI}`` (exactly ``names`` when given);
    ``task_uris`` one URI, or for ``--task mixed`` the NAME=URI pairs of ``names``.
    """

    flag: str
    help: str | None
    param: str | None = None
    kind: str = "value"  # value | named | task_uris
    required: bool = False
    metavar: str | None = None
    choices: tuple[Any, ...] | None = None
    nargs: int | str | None = None
    append: bool = False  # repeatable (action="append")
    store_true: bool = False
    default: Any = None
    names: tuple[str, ...] = ()
    type: Callable[[str], Any] | None = None  # converts the value as argparse's ``type`` does

    def __post_init__(self) -> None:
        if self.kind not in ("value", "named", "task_uris"):
            raise ValueError(f"stage argument {self.flag}: unknown kind {self.kind!r}")

    @property
    def dest(self) -> str:
        """The attribute argparse stores the value under."""
        return self.flag.lstrip("-").replace("-", "_")

    def argparse_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of ``ArgumentParser.add_argument`` for this argument."""
        if self.store_true:
            return {"action": "store_true", "help": self.help}
        kwargs: dict[str, Any] = {"help": self.help, "default": self.default}
        if self.required:
            kwargs["required"] = True
        if self.append:
            kwargs["action"] = "append"
        for key in ("metavar", "choices", "nargs", "type"):
            if getattr(self, key) is not None:
                kwargs[key] = getattr(self, key)
        return kwargs


@dataclass(frozen=True)
class Resources:
    """What a stage's task asks the cluster for when the config's ``launch.<stage>`` leaves a value
    null. ``gpus`` None: one GPU per worker process (the training stages)."""

    cpu: str
    mem: str
    gpus: int | None = 0
    disk: str | None = None


@dataclass(frozen=True)
class Stage:
    """One stage of the pipeline (see the module doc)."""

    name: str  # the stage's name: its module under flowrl.stages, its config key under launch, its image
    function: str  # the function of the module that runs it
    sections: tuple[str, ...]  # the config sections (or keys) its output depends on, in hash order
    help: str  # one line: what the stage does (its subcommand's help)
    resources: Resources
    artifacts: tuple[str, ...] = ()  # the stage names its artifacts carry when not `name` alone
    image_parent: str = "cuda-base"  # the shared image its own image builds FROM
    training: bool = False  # runs torchrun workers (Flyte Elastic / PyTorchJob), one process group per run
    progress: bool = False  # its function takes `progress` (progress bars)
    cli: tuple[Arg, ...] = ()  # the subcommand's own arguments, after the common ones

    @property
    def module(self) -> str:
        return f"flowrl.stages.{self.name}"

    @property
    def command(self) -> str:
        """The ``flowrl`` subcommand (``reward_model`` -> ``reward-model``)."""
        return self.name.replace("_", "-")

    @property
    def image(self) -> str:
        """The name of the container image its task runs in (images/<image>.Dockerfile)."""
        return self.name

    @property
    def artifact_names(self) -> tuple[str, ...]:
        return self.artifacts or (self.name,)

    def run_function(self) -> Callable[..., Any]:
        """The function that runs the stage (imports its module: torch and all)."""
        return getattr(importlib.import_module(self.module), self.function)


_URI = "URI"
_BASE = Arg("--base", "the base stage's artifact", param="base_uri", required=True, metavar=_URI)
_REWARD_MODEL = Arg("--reward-model", "the reward_model stage's artifact", param="reward_model_uri", required=True,
                    metavar=_URI)
_RESUME = Arg("--resume", "continue from the run's newest complete checkpoint", param="resume", store_true=True)

# The stages in pipeline order: the order of the CLI's subcommands, the per-stage configs of the
# workflow and the images built.
STAGES: tuple[Stage, ...] = (
    Stage(
        "base", "run_base", ("run.seed", "world", "model", "sampler", "eval", "base"),
        "pretrain the shapes model, or validate Qwen-Image weights",
        Resources(cpu="2", mem="8Gi", gpus=0), progress=True, cli=(_RESUME,),
    ),
    Stage(
        "annotate", "run_annotate", ("run.seed", "world", "sampler", "eval.batch_size", "annotate"),
        "build the annotation datasets (simulated annotators on the shapes world)",
        Resources(cpu="4", mem="32Gi", gpus=1), progress=True,
        cli=(_BASE,
             Arg("--previous", "second annotation round: the first round's annotate artifact, whose rows the new "
                 "artifact keeps (with --policies)", param="previous_uri", metavar=_URI),
             Arg("--policies", "second annotation round: the first round's GRPO artifacts whose samples are "
                 "annotated (annotate.policy_round): t2i=URI edit=URI", param="policy_uris", kind="named", nargs=2,
                 metavar="TASK=URI", names=("t2i", "edit"))),
    ),
    Stage(
        "reward_model", "run_reward_model", ("run.seed", "world", "model.family", "reward_model"),
        "train the reward models on the annotation datasets",
        Resources(cpu="8", mem="64Gi", gpus=1), progress=True,
        cli=(Arg("--annotations", "the annotate stage's artifact", param="annotations_uri", required=True,
                 metavar=_URI),
             Arg("--init", "refresh: a reward_model artifact every scorer starts from, trained "
                 "reward_model.refresh_steps steps on --annotations (the second annotation round's)",
                 param="init_uri", metavar=_URI),
             _RESUME),
    ),
    Stage(
        "filter_prompts", "run_filter_prompts",
        ("run.seed", "world", "model", "sampler.cfg_renorm", "reward_model", "grpo.rollout", "filter", "rewards"),
        "keep the prompts whose base-model rewards spread within a group",
        Resources(cpu="4", mem="32Gi", gpus=1), artifacts=("filter_prompts_t2i", "filter_prompts_edit"), progress=True,
        cli=(Arg("--task", None, param="task", required=True, choices=("t2i", "edit")), _BASE, _REWARD_MODEL),
    ),
    Stage(
        "grpo", "run_grpo", ("run.seed", "world", "model", "sampler", "eval", "reward_model", "grpo", "rewards",
                            "base.edit_fraction", "base.cond_dropout"),
        "GRPO from the base model on the curated prompts of one task (mixed: Mix-RL)",
        Resources(cpu="8", mem="64Gi", gpus=None), artifacts=("grpo_t2i", "grpo_edit", "grpo_mixed"),
        image_parent="train-base", training=True, progress=True,
        cli=(Arg("--task", None, param="task", required=True, choices=("t2i", "edit", "mixed")), _BASE, _REWARD_MODEL,
             Arg("--prompts", "the filter_prompts stage's artifact of the task; mixed: t2i=URI edit=URI",
                 param="prompts_uri", kind="task_uris", required=True, nargs="+", metavar=_URI,
                 names=("t2i", "edit")),
             Arg("--round", "two GRPO rounds around a second annotation round: 1 trains the first "
                 "grpo.round1_iterations iterations from the base, 2 the rest from --init", param="rl_round",
                 type=int, choices=(1, 2)),
             Arg("--init", "round 2: the first round's GRPO artifact of the task, whose weights the policy starts "
                 "from (the KL reference stays --base)", param="init_uri", metavar=_URI),
             _RESUME),
    ),
    Stage(
        "opd", "run_opd", ("run.seed", "world", "model", "sampler", "eval", "reward_model", "grpo.monitor_reward", "opd",
                           "rewards"),
        "on-policy distillation of the task teachers into one student",
        Resources(cpu="8", mem="64Gi", gpus=None), artifacts=("opd", "opd_offpolicy"),
        image_parent="train-base", training=True, progress=True,
        cli=(_BASE,
             Arg("--teacher", "a teacher (grpo artifact) by the name opd.routes uses; repeat per teacher",
                 param="teacher_uris", kind="named", required=True, append=True, metavar="NAME=URI"),
             Arg("--prompts", "the filter_prompts artifacts: t2i=URI edit=URI", param="prompts_uris", kind="named",
                 required=True, nargs=2, metavar="TASK=URI", names=("t2i", "edit")),
             Arg("--states", "override opd.states (off_policy: the ablation, stage opd_offpolicy)", param="states",
                 choices=("on_policy", "off_policy")),
             _RESUME),
    ),
    Stage(
        "bench", "run_bench", ("run.seed", "world", "model.family", "sampler", "reward_model", "bench", "rewards"),
        "pillar scores, T2I and edit arenas, and the report for any set of models",
        Resources(cpu="4", mem="64Gi", gpus=1, disk="100Gi"), progress=True,
        cli=(Arg("--model", "a model artifact (base, grpo, opd) by name; repeat per model; bench.anchor names the "
                 "base", param="models", kind="named", required=True, append=True, metavar="NAME=URI"),
             Arg("--votes", "parquet of human votes (arena, prompt, model_a, model_b, winner); they replace the "
                 "judge's battles in the arenas they cover", param="votes", metavar="FILE"),
             Arg("--reward-model", "the reward_model stage's artifact (needed when bench.scorer is reward_models)",
                 param="reward_model", metavar=_URI),
             Arg("--report-dir", "also copy report.md, report.html and the PNGs to DIR (e.g. results/)",
                 metavar="DIR")),
    ),
)

BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
STAGE_NAMES: tuple[str, ...] = tuple(BY_NAME)
TRAINING_STAGES: tuple[str, ...] = tuple(s.name for s in STAGES if s.training)


def _check(stages: tuple[Stage, ...]) -> None:
    """The registry's own rules: unique names, commands and artifact names; sections named once."""
    seen: dict[str, str] = {}
    for s in stages:
        for name in (s.name, *s.artifact_names):
            if seen.get(name, s.name) != s.name:
                raise ValueError(f"stage registry: {name!r} names both {seen[name]} and {s.name}")
            seen[name] = s.name
        if len(set(s.sections)) != len(s.sections):
            raise ValueError(f"stage registry: {s.name} declares a section twice: {s.sections}")
        tops = {e for e in s.sections if "." not in e}
        for entry in s.sections:
            if "." in entry and entry.split(".", 1)[0] in tops:
                raise ValueError(f"stage registry: {s.name} declares {entry!r} and its whole section")
        flags = [a.flag for a in s.cli]
        if len(set(flags)) != len(flags):
            raise ValueError(f"stage registry: {s.name} lists a flag twice: {flags}")


_check(STAGES)


def stage(name: str) -> Stage:
    """The stage called ``name`` (a key of :data:`BY_NAME`); KeyError naming the known ones."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no stage {name!r}; stages: {', '.join(STAGE_NAMES)}") from None


def stage_sections(name: str) -> tuple[str, ...]:
    """The config sections (or keys) stage ``name`` declares: what its version and cache key hash."""
    return stage(name).sections


def stage_of(artifact_stage: str) -> Stage:
    """The stage that makes artifacts named ``artifact_stage`` (``grpo_t2i`` -> grpo): an exact
    artifact name, else the longest underscore-joined prefix that is a stage name. ValueError when
    none runs it."""
    for s in STAGES:
        if artifact_stage in s.artifact_names:
            return s
    parts = artifact_stage.split("_")
    for end in range(len(parts), 0, -1):
        found = BY_NAME.get("_".join(parts[:end]))
        if found is not None:
            return found
    raise ValueError(f"no module under flowrl/stages runs stage {artifact_stage!r} "
                     f"(stages: {', '.join(STAGE_NAMES)})")


def by_command(command: str) -> Stage | None:
    """The stage whose ``flowrl`` subcommand is ``command``, or None."""
    return next((s for s in STAGES if s.command == command), None)


def readable(name: str) -> tuple[str, ...]:
    """What stage ``name`` may read of a config: its sections and :data:`INFRASTRUCTURE`."""
    return stage_sections(name) + INFRASTRUCTURE
