"""Typed values that flow between Flyte tasks."""

import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import NamedTuple

from flowrl.stages.common import flat_metrics
from flowrl.stages.registry import STAGE_NAMES, stage


@dataclass
class StageArtifact:
    """A committed stage output.

    The bytes live in flowrl's artifact store at ``uri`` (write-once, manifest
    written last); Flyte passes this reference between tasks. ``version`` is
    content-derived: the same config, code and inputs give the same URI.
    """

    stage: str
    version: str
    uri: str
    mlflow_run_id: str
    metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def of(cls, result) -> "StageArtifact":
        """The reference to a stage's committed result (:class:`flowrl.stages.common.StageResult`)."""
        return cls(stage=result.stage, version=result.version, uri=result.uri,
                   mlflow_run_id=result.run_id or "", metrics=flat_metrics(result.metrics))


def tracker_for(config, parent_run: str):
    """The stage's MLflow tracker, its run nested under the pipeline's run ``parent_run`` and tagged
    with this Flyte execution's id (none in a local run, whose id is the placeholder local:local:local)."""
    from flowrl.tracking import make_tracker

    return make_tracker(config, parent_run_id=parent_run or None, flyte_execution_id=flyte_execution_id())


def show_progress() -> bool:
    """Whether a stage task draws progress bars: in a local execution (``make run``, ``pyflyte run`` without
    ``--remote``), where they reach a terminal, yes; in a cluster pod, whose log is a file read later, no
    (each stage still logs its summary line when it ends, and its metrics go to MLflow as it runs)."""
    if os.environ.get("FLYTE_INTERNAL_EXECUTION_ID"):  # set in every pod Flyte starts (workers included)
        return False
    return flyte_execution_id() is None


def flyte_execution_id() -> str | None:
    """``project:domain:name`` of this Flyte execution; None in a local run (whose id is the placeholder
    local:local:local) or outside a Flyte context (a worker process)."""
    try:
        import flytekit

        found = flytekit.current_context().execution_id
        if found is not None and found.name and (found.project, found.domain, found.name) != ("local",) * 3:
            return f"{found.project}:{found.domain}:{found.name}"
    except Exception:  # noqa: BLE001 - no Flyte context here: the runs go untagged
        pass
    return None


# --------------------------------------------------------------------------- caching
#
# Flyte's cache key is (task, cache version, input literals). Each stage's cache version is the
# code version of its module (flowrl.storage.module_closure: the source that stage runs), and
# each stage reads the config through its own output of validate_config whose literal hash is
# that stage's config sections (plus the artifact root its outputs live under). So a change to
# the grpo section reruns GRPO and what consumes its artifacts (OPD, bench) and nothing else. A stage
# whose config names files outside the store (prompt files, labels, weights) adds their content stamps
# (its input_stamps), so new content at the same path is a cache miss too.
STAGE_MODULES = STAGE_NAMES  # one per-stage config each, in the registry's order (flowrl.stages.registry)


def stage_config_key(module: str, config) -> str:
    """The cache hash of ``config`` (a FlyteFile) as stage ``module`` (a registry name) sees it."""
    import importlib

    from flowrl.config import load_config

    declared = stage(module)
    loaded = load_config(config.download())
    key = f"{module}:{loaded.section_hash(*declared.sections, 'run.artifact_root')}"
    # what the config names outside the artifact store (prompt files, labels, pretrained weights), by
    # content: new rows or weights at the same path rerun the stage
    stamps = getattr(importlib.import_module(declared.module), "input_stamps", lambda _: {})(loaded)
    if stamps:
        key += ":" + hashlib.sha256(json.dumps(stamps, sort_keys=True).encode()).hexdigest()[:16]
    return key


def _config_type(module: str):
    from functools import partial
    from typing import Annotated

    from flytekit import HashMethod
    from flytekit.types.file import FlyteFile

    return Annotated[FlyteFile, HashMethod(partial(stage_config_key, module))]


StageConfigs = NamedTuple("StageConfigs", [(m, _config_type(m)) for m in STAGE_MODULES])


def stage_cache(module: str):
    """Cache settings of a stage task: its code version; the pipeline run id is not part of the key."""
    from flytekit import Cache

    from flowrl.storage import code_version

    return Cache(version=code_version(stage(module).module), ignored_inputs=("parent_run",))
