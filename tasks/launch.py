"""Launch settings of the Flyte tasks: fixed when the workflow is registered, read back in the pod.

A task module is imported twice: where the workflow is registered (``pyflyte run --remote``,
``make package``) and again inside every pod, where the submitter's environment and command line
do not exist. Whatever decides how a task is launched (its worker processes and nodes, image,
resources, GPU kind, secrets) therefore comes from the scenario config given at registration
(its ``launch`` section) and is serialized twice into the task's spec:

- as Flyte's own fields: image, resources, accelerator, secret requests and, across nodes, the
  PyTorchJob's elastic config (what the cluster schedules);
- in the loader arguments with which the pod's ``pyflyte-execute`` finds the task
  (:data:`resolver`): the pod rebuilds the task with the same :class:`TaskLaunch`, so torchrun
  starts exactly the workers the spec was registered with.

Which config: ``pyflyte run`` imports the workflow module before it parses the workflow's
inputs, so the launch settings are read from the ``--config`` argument of the pyflyte command
being run (the same file the workflow then receives as its input); ``python -m tasks.package
--config FILE`` (``make package CONFIG=FILE``) names it explicitly. Without one (tests, the pod
before its resolver runs) the defaults of :class:`flowrl.config.LaunchConfig` apply: one process.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from flytekit import Resources, Secret, task
from flytekit.core.base_task import TaskResolverMixin
from flytekit.core.python_auto_container import PythonAutoContainerTask
from flytekit.core.tracker import TrackedInstance, extract_task_module
from flytekit.exceptions.user import FlyteUserException

from flowrl.config import FlowRLConfig, LaunchConfig, load_config, secret_requests
from flowrl.models.families import family_of
from flowrl.stages.registry import STAGES, TRAINING_STAGES

ROOT = Path(__file__).resolve().parent.parent

# each task's defaults where the config leaves a value null: image, cpu, memory, GPUs, disk
# ("default": the light tasks that validate configs and pass references; each stage's from the registry)
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "default": {"image": "default", "cpu": "1", "mem": "2Gi", "gpus": 0},
    **{s.name: {"image": s.image, "cpu": s.resources.cpu, "mem": s.resources.mem, "gpus": s.resources.gpus,
                **({"disk": s.resources.disk} if s.resources.disk else {})} for s in STAGES},
}


@dataclass(frozen=True)
class TaskLaunch:
    """How one task runs: what registration writes into its spec and the pod reads back."""

    image: str
    cpu: str
    mem: str
    gpus: int = 0  # per node: the workers' and (GRPO) the reward sidecar's, grpo.reward_gpus
    disk: str | None = None
    nodes: int = 1
    procs: int = 1  # worker processes per node (training stages)
    accelerator: str | None = None  # a name in flytekit.extras.accelerators, for GPU tasks
    secrets: tuple[tuple[str, str, str], ...] = ()  # (env var, group, key)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "TaskLaunch":
        data = json.loads(text)
        data["secrets"] = tuple(tuple(s) for s in data.get("secrets", ()))
        return cls(**data)

    # ------------------------------------------------------------------ as flytekit arguments
    def resources(self) -> Resources:
        extra = {"gpu": str(self.gpus)} if self.gpus else {}
        if self.disk:
            extra["ephemeral_storage"] = self.disk
        return Resources(cpu=self.cpu, mem=self.mem, **extra)

    def secret_requests(self) -> list[Secret]:
        return [Secret(group=group, key=key, env_var=env, mount_requirement=Secret.MountType.ENV_VAR)
                for env, group, key in self.secrets]

    def gpu_kind(self):
        if not self.gpus or not self.accelerator:
            return None
        from flytekit.extras import accelerators

        kind = getattr(accelerators, self.accelerator, None)
        if kind is None or not hasattr(kind, "to_flyte_idl"):
            raise ValueError(f"launch.accelerator: {self.accelerator!r} is not an accelerator of "
                             "flytekit.extras.accelerators (e.g. H100, A100_80GB)")
        return kind


# --------------------------------------------------------------------------- the registration's config

_explicit: list[str] = []  # set by use_config (python -m tasks.package)


def use_config(path: str | os.PathLike) -> None:
    """Register with the launch settings of ``path`` (call before the task modules are imported)."""
    _explicit[:] = [str(path)]


def _argv_option(argv: list[str], names: tuple[str, ...]) -> list[str]:
    values = []
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                values.append(argv[i + 1])
            elif arg.startswith(name + "="):
                values.append(arg.split("=", 1)[1])
    return values


def _pyflyte_argv() -> list[str]:
    """The command line when this process is a pyflyte registration or run command, else []."""
    argv = list(sys.argv)
    return argv if argv and Path(argv[0]).name in ("pyflyte", "pyflyte.exe") else []


def registration_config_path() -> str | None:
    """The scenario config this registration is for: :func:`use_config`'s, or pyflyte's ``--config``."""
    if _explicit:
        return _explicit[0]
    values = _argv_option(_pyflyte_argv(), ("--config",))
    return values[-1] if values else None


def image_flags_given() -> bool:
    """pyflyte was given ``--image`` flags: they name the images, overriding ``launch.registry``."""
    return bool(_argv_option(_pyflyte_argv(), ("--image", "-i")))


def _load_image_namer() -> Callable[[str, str], str]:
    name = "flowrl_images_build"  # images/ is a folder of build files, not a package
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "images" / "build.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # its dataclasses look their module up while the file runs
        spec.loader.exec_module(module)
    return sys.modules[name].image_uri


class Registration:
    """The launch settings of every task, from one config (or the defaults)."""

    def __init__(self, config: FlowRLConfig | None):
        self.config = config
        self.launch = config.launch if config is not None else LaunchConfig()
        self._images: dict[str, str] = {}

    def image(self, name: str) -> str:
        """The task image: REGISTRY/flowrl-NAME:TAG from ``launch.registry``, or pyflyte's ``--image NAME=...``."""
        if self.launch.registry is None or image_flags_given():
            return "{{.image.%s.fqn}}:{{.image.%s.version}}" % (name, name)
        if name not in self._images:
            self._images[name] = _load_image_namer()(name, self.launch.registry)
        return self._images[name]

    def task_launch(self, stage: str) -> TaskLaunch:
        """The launch of the task of ``stage`` (a key of :data:`TASK_DEFAULTS`)."""
        defaults = TASK_DEFAULTS[stage]
        section = getattr(self.launch, stage, None)  # None for the light helper tasks ("default")
        nodes = section.nodes if section is not None else 1
        procs = section.procs if section is not None else 1
        gpus = section.gpus if section is not None and section.gpus is not None else defaults["gpus"]
        if gpus is None:  # a training stage: one GPU per worker process
            gpus = procs
        if stage == "grpo" and gpus and self.config is not None:
            gpus += self.config.grpo.reward_gpus  # the node's reward sidecar's, after the workers' (procs stays)
        cpu = (section.cpu if section is not None and section.cpu else None) or defaults["cpu"]
        mem = section.mem if section is not None and section.mem else None
        if mem is None and stage in TRAINING_STAGES and self.config is not None \
                and family_of(self.config).model_keys:  # qwen_image: the requests come from the planner
            cpu_planned, mem = self._planned(stage, procs, nodes)
            if not (section is not None and section.cpu):
                cpu = cpu_planned
        disk = (section.disk if section is not None and section.disk else None) or defaults.get("disk")
        return TaskLaunch(
            image=self.image(defaults["image"]), cpu=cpu, mem=mem or defaults["mem"], gpus=gpus, disk=disk,
            nodes=nodes, procs=procs, accelerator=self.launch.accelerator if gpus else None,
            secrets=tuple(secret_requests(self.launch.secrets)),
        )

    def _planned(self, stage: str, procs: int, nodes: int) -> tuple[str, str]:
        """CPU and host memory of one node of a training task from the memory planner (no hub access needed);
        the ranks of all ``nodes`` share the sharded states."""
        from flowrl.planner import task_requests

        requests, _ = task_requests(self.config, stage, procs, self.launch.gpu_mem_gib, nodes=nodes)
        return requests["cpu"], requests["mem"]


def _registration() -> Registration:
    path = registration_config_path()
    return Registration(load_config(path) if path else None)


REGISTRATION = _registration()


# --------------------------------------------------------------------------- building tasks

def elastic(nodes: int, procs: int):
    """The Elastic (torchrun) config of the GRPO / OPD tasks: one node runs torchrun inside the pod,
    several become a PyTorchJob. The agent polls its workers every ``monitor_interval`` seconds and a
    task ends only at the first poll after they exit: the plugin's default of 5 s adds up to 5 s to every
    task, at 1 s at most 1 (measured on the pipeline-cache test, 6 Elastic tasks: 180 s -> 168 s)."""
    from flytekitplugins.kfpytorch import Elastic

    return Elastic(nnodes=nodes, nproc_per_node=procs, start_method="spawn", increase_shared_mem=False,
                   monitor_interval=1)


_BUILT: list[PythonAutoContainerTask] = []


class FlowRLUserError(FlyteUserException):
    """A task stopped by bad input (config, artifact, credential, path): the message is the one line
    the ``flowrl`` CLI prints for it (exit status 2 there), without the library's traceback."""

    _ERROR_CODE = "USER:FlowRLBadInput"


def user_error_boundary(fn: Callable) -> Callable:
    """``fn`` with the CLI's error boundary: a user error (:data:`flowrl.cli.USER_ERRORS`) becomes a
    :class:`FlowRLUserError` naming the task and what was wrong; anything else (a bug) is raised as it
    is, with its traceback."""
    if getattr(fn, "_flowrl_boundary", False):  # the resolver rebuilds tasks from the wrapped function
        return fn

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        if not logging.getLogger().handlers:  # the library's progress messages reach the task's log, as on the CLI
            logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            from flowrl.cli import USER_ERRORS, one_line
            from flowrl.redact import redact_url

            if isinstance(exc, USER_ERRORS):
                raise FlowRLUserError(f"{fn.__name__}: {one_line(redact_url(str(exc)))}") from None
            raise

    run._flowrl_boundary = True
    return run


def build_task(fn: Callable, stage: str, launch: TaskLaunch, options: dict[str, Any]) -> PythonAutoContainerTask:
    """The Flyte task running ``fn`` with ``launch``; ``options``: the other @task arguments (cache, retries)."""
    kwargs = dict(options, container_image=launch.image, requests=launch.resources(), task_resolver=resolver,
                  secret_requests=launch.secret_requests())
    kind = launch.gpu_kind()
    if kind is not None:
        kwargs["accelerator"] = kind
    if stage in TRAINING_STAGES:
        # /dev/shm as a memory-backed volume, for the workers' DataLoader and NCCL
        kwargs.update(task_config=elastic(launch.nodes, launch.procs), shared_memory=True)
    built = task(user_error_boundary(fn), **kwargs)
    built._flowrl_launch = (stage, launch, options)
    _BUILT.append(built)
    return built


def stage_task(stage: str, **options: Any) -> Callable[[Callable], PythonAutoContainerTask]:
    """Decorator: a Flyte task of ``stage`` (a key of :data:`TASK_DEFAULTS`) launched as the
    registration's config says; ``options`` go to ``flytekit.task`` unchanged."""

    def wrap(fn: Callable) -> PythonAutoContainerTask:
        return build_task(fn, stage, REGISTRATION.task_launch(stage), options)

    return wrap


def launch_of(t: PythonAutoContainerTask) -> TaskLaunch:
    """The launch a task was built with."""
    return t._flowrl_launch[1]


class LaunchResolver(TrackedInstance, TaskResolverMixin):
    """Loads a task in its pod with the launch it was registered with (carried in the loader arguments)."""

    def name(self) -> str:
        return "flowrl.LaunchResolver"

    def loader_args(self, settings, t: PythonAutoContainerTask) -> list[str]:  # type: ignore[override]
        _, module, name, _ = extract_task_module(t)
        return ["task-module", module, "task-name", name, "launch", launch_of(t).to_json()]

    def load_task(self, loader_args: list[str]) -> PythonAutoContainerTask:
        args = dict(zip(loader_args[::2], loader_args[1::2]))
        missing = [k for k in ("task-module", "task-name", "launch") if k not in args]
        if missing:
            raise ValueError(f"flowrl.LaunchResolver: loader arguments {loader_args} lack {', '.join(missing)}")
        module = importlib.import_module(args["task-module"])
        registered = getattr(module, args["task-name"])
        stage, _, options = registered._flowrl_launch
        return build_task(registered.task_function, stage, TaskLaunch.from_json(args["launch"]), options)

    def get_all_tasks(self) -> list[PythonAutoContainerTask]:  # type: ignore[override]
        """Every task built in this process with its launch (:func:`build_task`)."""
        return list(_BUILT)


resolver = LaunchResolver()


def check_workers(stage: str, config: FlowRLConfig) -> None:
    """Inside a training task: the config the workflow received asks for the workers this task was
    registered with (a different config at registration would launch the wrong number)."""
    from flowrl.rl.distributed import dist_info

    section = getattr(config.launch, stage)
    _, world = dist_info()
    if world != section.nodes * section.procs:
        raise RuntimeError(
            f"launch.{stage}: the config asks for {section.nodes} node(s) x {section.procs} process(es), but this "
            f"task runs {world} worker(s): it was registered with another config; register the workflow with "
            "this one (pyflyte run --remote ... --config FILE, or make package CONFIG=FILE)")
