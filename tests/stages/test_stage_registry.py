"""The stage registry (flowrl/stages/registry.py) is the one list of stages, and each stage reads only
the config sections it declares there.

The sections check runs every stage on the smoke config with a guarded copy of it: each section (or
key of a section) the stage does not declare, nor :data:`INFRASTRUCTURE`, is replaced by an object
that raises :class:`UndeclaredRead`, naming the section, on any use. The inputs come from the shared
smoke artifacts (tests/stages/conftest.py); each guarded run writes under a fresh root, so none is
a cache hit that skips the stage's work.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import subprocess
import sys

import pytest

from flowrl.config import FlowRLConfig, LaunchConfig, load_config
from flowrl.stages import registry
from flowrl.stages.registry import INFRASTRUCTURE, STAGES, readable, stage_sections
from flowrl.tracking import NullTracker
from tests.conftest import ROOT


class UndeclaredRead(AssertionError):
    """A stage used a config section it does not declare."""


def _refuse(operation: str):
    def refuse(self, *args, **kwargs):
        self._refuse(operation)

    return refuse


class UndeclaredSection:
    """Stands in for a config section (or key) a stage does not declare: any use raises."""

    __slots__ = ("_path", "_stage", "_reads")

    def __init__(self, path: str, stage: str, reads: list[str]):
        object.__setattr__(self, "_path", path)
        object.__setattr__(self, "_stage", stage)
        object.__setattr__(self, "_reads", reads)

    def _refuse(self, operation: str):
        self._reads.append(self._path)
        raise UndeclaredRead(f"stage {self._stage} read config {self._path} ({operation}), which it does not "
                             f"declare; declared: {', '.join(stage_sections(self._stage))}")

    def __getattr__(self, name: str):
        self._refuse(f"attribute {name}")

    def __deepcopy__(self, memo):  # config.to_dict() copies the whole config; a use of the copy still raises
        return self

    def __repr__(self) -> str:
        return f"<undeclared config {self._path}>"


for _op in ("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__hash__", "__bool__", "__len__", "__iter__",
            "__contains__", "__getitem__", "__int__", "__float__", "__index__", "__add__", "__radd__", "__sub__",
            "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__floordiv__", "__mod__", "__pow__",
            "__neg__", "__abs__", "__round__", "__str__", "__format__", "__call__", "__setattr__"):
    setattr(UndeclaredSection, _op, _refuse(_op))


def guarded(obj, allowed: set[str], stage: str, reads: list[str], prefix: str = ""):
    """A copy of the config dataclass ``obj`` in which every field outside ``allowed`` (dotted paths
    relative to ``obj``) is an :class:`UndeclaredSection`; a field named by a dotted path only is
    guarded the same way one level down ("run.seed" keeps run.seed, guards the rest of run)."""
    new = copy.copy(obj)
    for f in dataclasses.fields(obj):
        if f.name in allowed:
            continue
        inner = {path.split(".", 1)[1] for path in allowed if path.startswith(f"{f.name}.")}
        value = getattr(obj, f.name)
        if inner and dataclasses.is_dataclass(value):
            replacement = guarded(value, inner, stage, reads, f"{prefix}{f.name}.")
        else:
            replacement = UndeclaredSection(f"{prefix}{f.name}", stage, reads)
        object.__setattr__(new, f.name, replacement)
    return new


def guarded_config(config: FlowRLConfig, stage: str, reads: list[str], sections=None) -> FlowRLConfig:
    allowed = set(readable(stage) if sections is None else (*sections, *INFRASTRUCTURE))
    return guarded(config, allowed, stage, reads)


@pytest.fixture
def run_guarded(upstream, tmp_path, monkeypatch):
    """Run stage ``name``'s function on the guarded smoke config under a fresh artifact root; the
    stage module hashes the registry's sections (its own SECTIONS, if still local, are replaced)."""
    _, config, *_ = upstream

    def run(name: str, *args, sections=None, **kwargs):
        stage = registry.stage(name)
        module = importlib.import_module(stage.module)
        declared = stage.sections if sections is None else tuple(sections)
        monkeypatch.setattr(module, "SECTIONS", declared, raising=False)
        reads: list[str] = []
        cfg = guarded_config(config, name, reads, declared)
        result = stage.run_function()(cfg, *args, output_root=str(tmp_path / "guarded"), tracker=NullTracker(),
                                      **kwargs)
        assert not reads, f"stage {name} used undeclared config sections {sorted(set(reads))}"
        assert not result.reused
        return result

    return run


def _uris(upstream, teachers) -> dict:
    _, _, base, rm, prompts = upstream
    return {"base": base.uri, "rm": rm.uri, "prompts": {t: p.uri for t, p in prompts.items()}, "teachers": teachers}


# each case: (stage, how to call it on the shared smoke artifacts)
CASES = {
    "base": lambda u: ((), {"progress": False}),
    "annotate": lambda u: ((u["base"],), {}),
    "reward_model": lambda u: ((u["annotations"],), {}),
    "filter_prompts": lambda u: (("edit", u["base"], u["rm"]), {}),
    "grpo_t2i": lambda u: (("t2i", u["base"], u["rm"], u["prompts"]["t2i"]), {"progress": False}),
    "grpo_mixed": lambda u: (("mixed", u["base"], u["rm"], u["prompts"]), {"progress": False}),
    "opd_offpolicy": lambda u: ((u["base"], u["teachers"], u["prompts"]), {"states": "off_policy", "progress": False}),
    "bench": lambda u: (({"base": u["base"], **u["teachers"]},), {}),
}


def test_every_registered_stage_is_run_by_a_case():
    assert {registry.stage_of(case).name for case in CASES} == set(registry.STAGE_NAMES)


@pytest.mark.slow  # the whole smoke pipeline once more, each stage under the guard
@pytest.mark.parametrize("case", list(CASES))
def test_each_stage_reads_only_the_sections_it_declares(case, upstream, teachers, run_guarded):
    uris = _uris(upstream, teachers)
    if case == "reward_model":  # the shared annotations: a cache hit of the shared run's annotate
        from flowrl.stages.annotate import run_annotate

        uris["annotations"] = run_annotate(upstream[1], uris["base"], tracker=NullTracker()).uri
    args, kwargs = CASES[case](uris)
    result = run_guarded(registry.stage_of(case).name, *args, **kwargs)
    assert registry.stage_of(result.stage).name == registry.stage_of(case).name


def test_a_stage_reading_an_undeclared_section_fails_naming_it(upstream, run_guarded):
    """The check can fail: annotate batches its model samples by eval.batch_size; declared without it,
    its run stops at that read with the section's name."""
    _, _, base, _, _ = upstream
    sections = tuple(s for s in stage_sections("annotate") if s != "eval.batch_size")
    with pytest.raises(UndeclaredRead, match=r"stage annotate read config eval \(attribute batch_size\)"):
        run_guarded("annotate", base.uri, sections=sections)


def test_the_guard_refuses_every_kind_of_use_and_keeps_the_declared_hash(upstream):
    _, config, *_ = upstream
    reads: list[str] = []
    cfg = guarded_config(config, "filter_prompts", reads)
    assert cfg.grpo.rollout == config.grpo.rollout  # a declared subsection of an undeclared section
    assert cfg.section_hash(*stage_sections("filter_prompts")) == config.section_hash(
        *stage_sections("filter_prompts"))
    assert cfg.run.artifact_root == config.run.artifact_root  # infrastructure
    # an undeclared section raises at its first attribute; an undeclared key of a partly declared
    # section at its first use (compared, computed with, formatted, tested for truth, indexed)
    a, b = [f"grpo.{f.name}" for f in dataclasses.fields(config.grpo)
            if f"grpo.{f.name}" not in stage_sections("filter_prompts")][:2]
    key = lambda path: getattr(cfg.grpo, path.split(".")[1])  # noqa: E731
    for use in (lambda: cfg.opd.loop.iterations, lambda: key(a) + 1, lambda: bool(cfg.bench), lambda: f"{key(a)}",
                lambda: key(b) == 4, lambda: key(b) < 1, lambda: int(key(a)), lambda: key(b)[0]):
        with pytest.raises(UndeclaredRead, match="stage filter_prompts read config"):
            use()
    assert reads == ["opd", a, "bench", a, b, b, a, b]
    assert cfg.to_dict()["filter"] == config.to_dict()["filter"]


# --------------------------------------------------------------------------- one list, read everywhere

# the stage modules that still spell SECTIONS out (being rewritten elsewhere); each takes
# `SECTIONS = stage_sections(STAGE)` (filter_prompts, reward_model, base) or `stage_sections("grpo")` /
# `stage_sections("opd")`, after which its name leaves this set
PENDING_ONE_LINE: set[str] = set()


@pytest.mark.parametrize("name", registry.STAGE_NAMES)
def test_stage_modules_take_their_sections_from_the_registry(name, request):
    if name in PENDING_ONE_LINE:
        request.applymarker(pytest.mark.xfail(strict=True, reason="SECTIONS still spelled out in the module"))
    module = importlib.import_module(registry.stage(name).module)
    # the registry's own tuple, not a copy spelled out again (which could drift from it)
    assert module.SECTIONS is stage_sections(name), (module.SECTIONS, stage_sections(name))


def test_the_registry_names_real_modules_functions_images_and_sections():
    config = load_config(ROOT / "configs" / "smoke.yaml")
    for stage in STAGES:
        assert callable(stage.run_function()), stage.name
        assert (ROOT / "images" / f"{stage.image}.Dockerfile").is_file(), stage.name
        assert dataclasses.is_dataclass(getattr(LaunchConfig(), stage.name)), stage.name  # launch.<stage>
        config.section_hash(*stage.sections)  # every entry names a section or key that exists
    assert registry.stage_of("grpo_t2i").name == "grpo" and registry.stage_of("opd_offpolicy").name == "opd"
    with pytest.raises(ValueError, match="no module under flowrl/stages runs stage 'nonsense'"):
        registry.stage_of("nonsense")
    with pytest.raises(KeyError, match="no stage 'grpo_t2i'; stages: base, annotate"):
        registry.stage("grpo_t2i")


def test_bad_registry_entries_are_refused():
    entry = STAGES[0]
    with pytest.raises(ValueError, match="declares 'run.seed' and its whole section"):
        registry._check((dataclasses.replace(entry, sections=("run", "run.seed")),))
    with pytest.raises(ValueError, match="'base' names both base and other"):
        registry._check((entry, dataclasses.replace(entry, name="other", artifacts=("base",))))
    with pytest.raises(ValueError, match="unknown kind"):
        registry.Arg("--x", None, kind="list")


def test_cli_tasks_and_images_are_built_from_the_registry():
    import argparse

    from flowrl.cli import STORE_COMMANDS, build_parser
    from tasks.launch import TASK_DEFAULTS
    from tasks.types import STAGE_MODULES, StageConfigs

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for stage in STAGES:
        flags = {o for a in sub.choices[stage.command]._actions for o in a.option_strings}
        assert {a.flag for a in stage.cli} <= flags, stage.name
        assert stage.command in STORE_COMMANDS
        assert TASK_DEFAULTS[stage.name]["image"] == stage.image
    assert tuple(StageConfigs._fields) == STAGE_MODULES == registry.STAGE_NAMES
    from flowrl.planner import stage_workloads

    assert tuple(stage_workloads(load_config(ROOT / "configs" / "smoke.yaml"), 1)) == registry.TRAINING_STAGES
    spec = importlib.util.spec_from_file_location("build_for_registry_test", ROOT / "images" / "build.py")
    build = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = build
    spec.loader.exec_module(build)
    assert [s for s in build.STAGE_IMAGES if s != "default"] == list(registry.STAGE_NAMES)
    assert all(build.IMAGES[s.image].parent == s.image_parent for s in STAGES)
    # the image builder loads the registry by path: neither flowrl's package nor torch is imported
    probe = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('b', 'images/build.py'); "
             "m = importlib.util.module_from_spec(spec); sys.modules['b'] = m; spec.loader.exec_module(m); "
             "print(sorted(k for k in sys.modules if k.split('.')[0] in ('torch', 'flowrl', 'flytekit')))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out


def test_the_launch_section_has_one_entry_per_registered_stage():
    """The config schema names each stage's launch settings; the registry is the list they must match."""
    import dataclasses

    from flowrl.config import LaunchConfig, StageLaunchConfig

    stages = [f.name for f in dataclasses.fields(LaunchConfig) if f.type in (StageLaunchConfig, "StageLaunchConfig")]
    assert tuple(stages) == registry.STAGE_NAMES
