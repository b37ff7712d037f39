"""Typed values that flow between Flyte tasks."""

import hashlib
import json
from dataclasses import dataclass, field
from typing import NamedTuple

from flowrl.stages.common import flat_metrics


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
    """The stage's MLflow tracker, its run nested under the pipeline's run ``parent_run``."""
    from flowrl.tracking import make_tracker

    return make_tracker(config, parent_run_id=parent_run or None)


def image(name: str) -> str:
    """The container image of a task: the image ``name`` given to pyflyte as
    ``--image NAME=REGISTRY/REPO:TAG`` (``make images`` prints those flags;
    ``make package`` passes them). Local runs ignore it."""
    return "{{.image.%s.fqn}}:{{.image.%s.version}}" % (name, name)


# The GPU every GPU task asks for (FLOWRL_ACCELERATOR: a name from flytekit.extras.accelerators).
def _accelerator():
    import os

    from flytekit.extras import accelerators

    name = os.environ.get("FLOWRL_ACCELERATOR", "H100")
    if not hasattr(accelerators, name):
        raise ValueError(f"FLOWRL_ACCELERATOR: {name!r} is not an accelerator of flytekit.extras.accelerators")
    return getattr(accelerators, name)


GPU = _accelerator()


# --------------------------------------------------------------------------- caching
#
# Flyte's cache key is (task, cache version, input literals). Each stage's cache version is the
# code version of its module (flowrl.storage.module_closure: the source that stage runs), and
# each stage reads the config through its own output of validate_config whose literal hash is
# that stage's config sections (plus the artifact root its outputs live under). So a change to
# the grpo section reruns GRPO and what consumes its artifacts (OPD, bench) and nothing else. A stage
# whose config names files outside the store (prompt files, labels, weights) adds their content stamps
# (its input_stamps), so new content at the same path is a cache miss too.
STAGE_MODULES = ("base", "annotate", "reward_model", "filter_prompts", "grpo", "opd", "bench")


def stage_config_key(module: str, config) -> str:
    """The cache hash of ``config`` (a FlyteFile) as stage module ``module`` sees it."""
    import importlib

    from flowrl.config import load_config

    stage = importlib.import_module(f"flowrl.stages.{module}")
    loaded = load_config(config.download())
    key = f"{module}:{loaded.section_hash(*stage.SECTIONS, 'run.artifact_root')}"
    # what the config names outside the artifact store (prompt files, labels, pretrained weights), by
    # content: new rows or weights at the same path rerun the stage
    stamps = getattr(stage, "input_stamps", lambda _: {})(loaded)
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

    return Cache(version=code_version(f"flowrl.stages.{module}"), ignored_inputs=("parent_run",))


def elastic(nodes: int, procs: int):
    """The Elastic (torchrun) config of the GRPO / OPD tasks. The agent polls its workers every
    ``monitor_interval`` seconds and a task ends only at the first poll after they exit: the plugin's
    default of 5 s adds up to 5 s to every task, at 1 s at most 1 (measured on the pipeline-cache test,
    6 Elastic tasks: 180 s -> 168 s, one run each). Polling every second is no load on the agent."""
    from flytekitplugins.kfpytorch import Elastic

    return Elastic(nnodes=nodes, nproc_per_node=procs, start_method="spawn", increase_shared_mem=False,
                   monitor_interval=1)


def training_requests(stage: str, procs: int):
    """Resources of the GRPO / OPD task. With ``FLOWRL_PLAN_CONFIG`` (a scenario YAML; ``make package
    PLAN_CONFIG=...``) they come from the memory planner for ``procs`` GPUs of ``FLOWRL_GPU_MEM`` GiB
    (default 80); otherwise a fixed default."""
    import os

    from flytekit import Resources

    path = os.environ.get("FLOWRL_PLAN_CONFIG")
    if not path:
        return Resources(cpu="8", mem="64Gi", gpu=str(procs))
    from flowrl.config import load_config
    from flowrl.planner import task_requests

    requests, _ = task_requests(load_config(path), stage, procs, float(os.environ.get("FLOWRL_GPU_MEM", "80")))
    return Resources(**requests)
