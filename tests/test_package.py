"""The remote bundle (`make package`): what the cluster schedules and what each pod launches.

The bundle is built once from a scenario whose ``launch`` section asks for GRPO on 2 nodes of 8
workers and OPD on one node of 4; then every check reads the serialized specs, and the pod's side
is imitated in a clean process (no FLOWRL_* variables, no config anywhere): the task is loaded
through the loader arguments its spec carries, as ``pyflyte-execute`` does, and must come back
with the registered worker counts.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

BIN = Path(sys.executable).parent
REGISTRY = "registry.example.com/ml"
SECRETS = ["MLFLOW_TRACKING_TOKEN=mlflow/token", "AWS_SECRET_ACCESS_KEY=s3/secret-access-key"]


def _scenario(tmp: Path, **launch) -> Path:
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    data["launch"] = {"registry": REGISTRY, "secrets": SECRETS, "accelerator": "H100", **launch}
    path = tmp / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("FLOWRL_")}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("package")
    config = _scenario(tmp, grpo={"nodes": 2, "procs": 8}, opd={"procs": 4, "mem": "300Gi"},
                       bench={"disk": "500Gi"})
    out = tmp / "bundle.tgz"
    proc = subprocess.run(["make", "-s", "package", f"PACKAGE_CONFIG={config}", f"PACKAGE_OUTPUT={out}"], cwd=ROOT,
                          capture_output=True, text=True, env=_clean_env())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with tarfile.open(out) as tar:
        tar.extractall(tmp / "x", filter="data")
    return tmp / "x"


def _tasks(bundle_dir: Path) -> dict:
    from flyteidl.admin import task_pb2

    tasks = {}
    for path in bundle_dir.glob("*_tasks.*.pb"):
        spec = task_pb2.TaskSpec()
        spec.ParseFromString(path.read_bytes())
        tasks[spec.template.id.name] = spec.template
    return tasks


def _primary(template) -> dict:
    """The task's container as plain data: from its container field, or its pod template's primary container."""
    from google.protobuf.json_format import MessageToDict

    if template.HasField("container"):
        c = MessageToDict(template.container)
        names = {"CPU": "cpu", "MEMORY": "memory", "GPU": "gpu", "EPHEMERAL_STORAGE": "ephemeral-storage"}
        c["requests"] = {names[r["name"]]: r["value"] for r in c.get("resources", {}).get("requests", [])}
        return c
    pod = MessageToDict(template.k8s_pod.pod_spec)
    c = next(c for c in pod["containers"] if c["name"] == template.config["primary_container_name"])
    c["requests"] = {k.replace("_", "-"): v for k, v in c["resources"]["requests"].items()}
    return c


def _loader_args(container: dict) -> tuple[str, list[str]]:
    args = container["args"]
    resolver = args[args.index("--resolver") + 1]
    return resolver, args[args.index("--", args.index("--resolver")) + 1:]


def _load_in_a_pod(loads: list[tuple[str, list[str]]], tmp: Path) -> list[dict]:
    """Load each task as pyflyte-execute does (resolver, then its loader arguments), in a fresh process with
    no FLOWRL_* variables and no --config on its command line; report the launch each would run with."""
    script = tmp / "pod.py"
    script.write_text(
        "import json, sys\n"
        "from flytekit.tools.module_loader import load_object_from_module\n"
        "for resolver_name, args in json.loads(sys.argv[1]):\n"
        "    t = load_object_from_module(resolver_name).load_task(args)\n"
        "    c = t.task_config\n"
        "    print(json.dumps({'nnodes': getattr(c, 'nnodes', None), 'nproc_per_node': getattr(c, 'nproc_per_node', None),"
        " 'name': t.name}))\n")
    proc = subprocess.run([sys.executable, str(script), json.dumps(loads)], cwd=ROOT, capture_output=True,
                          text=True, env={**_clean_env(), "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.strip().splitlines()[-len(loads):]]


def _image_uri(stage: str) -> str:
    from tasks.launch import _load_image_namer

    return _load_image_namer()(stage, REGISTRY)


def test_pods_launch_the_registered_workers(bundle, tmp_path):
    tasks = _tasks(bundle)
    grpo, opd = tasks["tasks.grpo.grpo"], tasks["tasks.opd.opd"]
    # across nodes: a PyTorchJob whose elastic config the training operator reads
    from google.protobuf.json_format import MessageToDict

    assert grpo.type == "pytorch"
    elastic = MessageToDict(grpo.custom)["elasticConfig"]
    assert (elastic["nprocPerNode"], elastic["minReplicas"], elastic["maxReplicas"]) == (8, 2, 2)
    assert opd.type == "python-task"  # one node: torchrun inside the pod
    # the pod: the task rebuilt from its loader arguments starts exactly the registered workers
    expected = ((grpo, 2, 8), (opd, 1, 4), (tasks["tasks.grpo.grpo_mixed"], 2, 8))
    loads = [_loader_args(_primary(template)) for template, _, _ in expected]
    assert {resolver for resolver, _ in loads} == {"tasks.launch.resolver"}
    # and what the module-level import alone would give in that pod: one worker (so the check can fail)
    loads.append(("flytekit.core.python_auto_container.default_task_resolver", loads[1][1][:4]))
    *got, default = _load_in_a_pod(loads, tmp_path)
    for (template, nodes, procs), launched in zip(expected, got):
        assert (launched["nnodes"], launched["nproc_per_node"]) == (nodes, procs), template.id.name
        assert launched["name"] == template.id.name
    assert default["nproc_per_node"] == 1


def test_every_task_names_its_image_resources_and_secrets(bundle):
    tasks = _tasks(bundle)
    expected = {  # task: (image, gpus per node)
        "tasks.base.validate_config": ("default", None), "tasks.base.start_pipeline_run": ("default", None),
        "tasks.base.fail_pipeline_run": ("default", None),
        "tasks.base.base": ("base", None), "tasks.annotate.annotate": ("annotate", "1"),
        "tasks.reward_model.reward_model": ("reward_model", "1"),
        "tasks.filter_prompts.filter_prompts": ("filter_prompts", "1"), "tasks.grpo.grpo": ("grpo", "8"),
        "tasks.grpo.grpo_mixed": ("grpo", "8"), "tasks.opd.opd": ("opd", "4"), "tasks.opd.branch_switches": ("default", None),
        "tasks.opd.skipped": ("default", None), "tasks.bench.bench": ("bench", "1"),
        "tasks.bench.finish_pipeline_run": ("default", None), "tasks.reference.artifact_at": ("default", None),
        # the second annotation round (pipeline.annotation_rounds: 2) and its switch
        "tasks.annotate.annotation_rounds": ("default", None), "tasks.annotate.passed_on": ("default", None),
        "tasks.annotate.annotate_policies": ("annotate", "1"),
        "tasks.reward_model.reward_model_refresh": ("reward_model", "1"), "tasks.grpo.grpo_continued": ("grpo", "8"),
    }
    assert set(tasks) == set(expected)
    for name, (image, gpus) in expected.items():
        template = tasks[name]
        container = _primary(template)
        assert container["image"] == _image_uri(image), name
        assert "{{" not in container["image"], name
        assert container["requests"].get("gpu") == gpus, name
        if gpus:
            assert template.extended_resources.gpu_accelerator.device == "nvidia-h100", name
        secrets = {(s.group, s.key, s.env_var) for s in template.security_context.secrets}
        assert secrets == {("mlflow", "token", "MLFLOW_TRACKING_TOKEN"),
                           ("s3", "secret-access-key", "AWS_SECRET_ACCESS_KEY")}, name
    assert _primary(tasks["tasks.opd.opd"])["requests"]["memory"] == "300Gi"  # launch.opd.mem
    assert _primary(tasks["tasks.bench.bench"])["requests"]["ephemeral-storage"] == "500Gi"  # launch.bench.disk
    for name in ("tasks.grpo.grpo", "tasks.opd.opd"):  # a memory-backed /dev/shm for the workers
        assert tasks[name].extended_resources.HasField("shared_memory"), name


def test_package_refuses_a_scenario_without_a_registry(tmp_path):
    data = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    path = tmp_path / "no_registry.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-m", "tasks.package", "--config", str(path), "--output",
                           str(tmp_path / "b.tgz")], cwd=ROOT, capture_output=True, text=True, env=_clean_env())
    assert proc.returncode == 2 and "launch.registry" in proc.stderr
    assert not (tmp_path / "b.tgz").exists()


def test_registration_reads_the_config_of_the_pyflyte_command(monkeypatch, tmp_path):
    """`pyflyte run --remote pipelines/post_train.py post_train --config FILE` imports the tasks before it
    parses the workflow's inputs: the launch settings come from that --config; other programs get none."""
    import tasks.launch as launch

    monkeypatch.setattr(launch, "_explicit", [])
    argv = ["/venv/bin/pyflyte", "run", "--remote", "pipelines/post_train.py", "post_train", "--config", "c.yaml"]
    monkeypatch.setattr(sys, "argv", argv)
    assert launch.registration_config_path() == "c.yaml" and not launch.image_flags_given()
    monkeypatch.setattr(sys, "argv", ["/venv/bin/pyflyte", "run", "--image", "grpo=x/y:1", "p.py", "wf",
                                      "--config=d.yaml"])
    assert launch.registration_config_path() == "d.yaml" and launch.image_flags_given()
    monkeypatch.setattr(sys, "argv", ["/venv/bin/pyflyte-execute", "--resolver", "tasks.launch.resolver", "--",
                                      "task-module", "tasks.grpo", "--config", "e.yaml"])
    assert launch.registration_config_path() is None  # a pod's command line is never read


def test_the_registered_launch_is_checked_against_the_config_in_the_task(tmp_path):
    """A config asking for other worker counts than the task was registered with fails clearly."""
    from flowrl.config import load_config
    from tasks.launch import check_workers

    config = load_config(_scenario(tmp_path, grpo={"procs": 8}))
    with pytest.raises(RuntimeError, match=r"launch.grpo: the config asks for 1 node\(s\) x 8 process\(es\), but this "
                                           r"task runs 1 worker"):
        check_workers("grpo", config)
    check_workers("opd", config)


@pytest.mark.parametrize("override, message", [
    ("launch.base.procs=2", "launch.base.procs: only the training stages"),
    ("launch.grpo.mem=lots", "launch.grpo.mem: expected a Kubernetes quantity"),
    ("launch.grpo.gpus=3", "launch.grpo.gpus: 3 GPUs for launch.grpo.procs = 1 workers"),
    ("launch.secrets=[TOKEN]", r"launch.secrets\[0\]: expected ENV_VAR=GROUP/KEY"),
    ("launch.secrets=[1TOKEN=a/b]", r"launch.secrets\[0\]: '1TOKEN' is not an environment variable name"),
    ("launch.secrets=[TOKEN=a]", r"launch.secrets\[0\]: expected ENV_VAR=GROUP/KEY"),
    ("launch.registry=s3://x", "launch.registry: expected a registry"),
])
def test_bad_launch_settings_name_their_key(override, message):
    from flowrl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(ROOT / "configs" / "smoke.yaml", [override])


def test_a_remote_scenario_names_no_local_file():
    """Object-storage artifacts mean the stages run in pods: a label file on the submitter's disk is refused."""
    from flowrl.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="annotate.pointwise_path: '/data/l.parquet' is a path on this machine"):
        load_config(ROOT / "configs" / "smoke.yaml", ["run.artifact_root=s3://bucket/x",
                                                      "annotate.pointwise_path=/data/l.parquet",
                                                      "annotate.pairwise_path=s3://bucket/p.parquet"])


def _package(config: Path, out: Path) -> subprocess.CompletedProcess:
    # no hub: offline mode, and an endpoint nothing listens on should anything still try
    env = {**_clean_env(), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
    return subprocess.run([sys.executable, "-m", "tasks.package", "--config", str(config), "--output", str(out)],
                          cwd=ROOT, capture_output=True, text=True, env=env)


def test_the_production_config_packages_offline_as_shipped_with_planned_resources(tmp_path):
    """`make package` of configs/qwen_image.yaml as shipped, with hub ids and no hub reachable: the planner
    finds its setting within launch.gpu_mem_gib, and GRPO and OPD get the planner's host memory and CPUs,
    GRPO its workers' GPUs plus those of its reward server (grpo.reward_gpus) with one worker per training
    GPU."""
    from flowrl.config import load_config
    from flowrl.planner import task_requests

    path = ROOT / "configs" / "qwen_image.yaml"
    proc = _package(path, tmp_path / "prod.tgz")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    with tarfile.open(tmp_path / "prod.tgz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    tasks = _tasks(tmp_path / "x")
    config = load_config(path)
    for task, stage in (("tasks.grpo.grpo", "grpo"), ("tasks.opd.opd", "opd")):
        launch = getattr(config.launch, stage)
        expected, _ = task_requests(config, stage, launch.procs, config.launch.gpu_mem_gib, nodes=launch.nodes)
        extra = config.grpo.reward_gpus if stage == "grpo" else 0
        requests = _primary(tasks[task])["requests"]
        assert requests["gpu"] == str(launch.procs + extra), (task, requests)
        assert requests["cpu"] == expected["cpu"] and requests["memory"] == expected["mem"], task
    assert config.grpo.reward_gpus > 0  # the shipped config gives the reward models GPUs of their own


def test_a_training_stage_that_fits_nowhere_is_refused_at_packaging(tmp_path):
    data = yaml.safe_load((ROOT / "configs" / "qwen_image.yaml").read_text())
    data["launch"]["gpu_mem_gib"] = 1.0
    path = tmp_path / "tiny_gpus.yaml"
    path.write_text(yaml.safe_dump(data))
    proc = _package(path, tmp_path / "none.tgz")
    said = " ".join((proc.stdout + proc.stderr).split())  # pyflyte prints the import error, wrapped, on stdout
    assert proc.returncode != 0 and "grpo: the configured setting" in said and "does not fit" in said, said[-2000:]
    assert not (tmp_path / "none.tgz").exists()


def test_the_resolver_lists_the_tasks_it_built():
    import tasks.grpo
    from tasks.launch import resolver

    assert tasks.grpo.grpo in resolver.get_all_tasks()
