"""Container images and the remote bundle, checked offline: hadolint, build
contexts, pinned requirements, `make images` without an engine, and the
`pyflyte package` bundle's tasks and workflow edges."""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
BIN = Path(sys.executable).parent
STAGE_IMAGES = {"base", "annotate", "reward_model", "filter_prompts", "grpo", "opd", "bench"}


def test_one_dockerfile_per_stage_on_the_shared_base():
    assert {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES} == STAGE_IMAGES | {"cuda-base"}
    for path in DOCKERFILES:
        text = path.read_text()
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1] == "1000", f"{path.name}: must end as the non-root user"
        if path.name != "cuda-base.Dockerfile":
            assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M), path.name
    base = (IMAGES / "cuda-base.Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:[\d.]+-cudnn-runtime-", base, re.M)
    assert 'pip install "torch==${TORCH_VERSION}" --index-url' in base
    for name in ("grpo", "opd"):
        assert "images/requirements/train.txt" in (IMAGES / f"{name}.Dockerfile").read_text()
    assert "images/requirements/reward.txt" in (IMAGES / "reward_model.Dockerfile").read_text()


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path):
    proc = subprocess.run([str(BIN / "hadolint"), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def _ignored(rel: str) -> bool:
    """Whether .dockerignore (a deny-all with exceptions, as written here) leaves ``rel`` out."""
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    return not any(rel == a or rel.startswith(a + "/") for a in allowed)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_every_copy_source_exists_in_the_build_context(path):
    for line in path.read_text().splitlines():
        if line.startswith("COPY "):
            parts = [p for p in line.split()[1:] if not p.startswith("--")]
            for source in parts[:-1]:
                assert (ROOT / source).exists(), f"{path.name}: COPY {source}: not in the build context"
                assert not _ignored(source.rstrip("/")), f"{path.name}: COPY {source}: excluded by .dockerignore"


def test_image_requirements_are_pinned_subsets_and_up_to_date():
    pins = {}
    for name in ("cpu.txt", "gpu.txt"):
        for line in (ROOT / "requirements" / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                pins[Requirement(line).name.lower()] = line.strip()
    files = sorted((IMAGES / "requirements").glob("*.txt"))
    assert {f.name for f in files} == {"runtime.txt", "reward.txt", "train.txt"}
    for path in files:
        for line in path.read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                req = Requirement(line)
                assert pins.get(req.name.lower()) == line.strip(), f"{path.name}: {line} is not in requirements/*.txt"
                assert req.name.lower() != "torch", f"{path.name}: torch comes from the CUDA index in cuda-base"
    proc = subprocess.run([sys.executable, "images/lock.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_make_images_says_there_is_no_engine_and_fails(tmp_path):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    proc = subprocess.run(["make", "-s", "images"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert "no docker engine reachable" in proc.stderr and "DRY_RUN=1" in proc.stderr


def test_make_images_dry_run_prints_every_build(tmp_path):
    env = {**os.environ, "FLOWRL_REGISTRY": "registry.example.com/ml", "FLOWRL_IMAGE_TAG": "v1"}
    proc = subprocess.run(["make", "-s", "images", "DRY_RUN=1"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    builds = [line for line in proc.stdout.splitlines() if line.startswith("docker build")]
    assert builds[0] == ("docker build -f images/cuda-base.Dockerfile -t registry.example.com/ml/flowrl-cuda-base:v1 .")
    assert len(builds) == 1 + len(STAGE_IMAGES)
    assert ("docker build -f images/grpo.Dockerfile -t registry.example.com/ml/flowrl-grpo:v1 "
            "--build-arg BASE_IMAGE=registry.example.com/ml/flowrl-cuda-base:v1 .") in builds


def test_default_tag_follows_the_code(monkeypatch):
    sys.path.insert(0, str(IMAGES))
    try:
        import build
    finally:
        sys.path.remove(str(IMAGES))
    monkeypatch.delenv("FLOWRL_IMAGE_TAG", raising=False)
    from flowrl.storage import code_version

    tag = build.image_tag()
    assert tag.startswith("0.1.0-") and len(tag) == len("0.1.0-") + 12
    monkeypatch.setattr("flowrl.storage.code_version", lambda: code_version() + "x")
    assert build.image_tag() != tag


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    env = {**os.environ, "FLOWRL_REGISTRY": "registry.example.com/ml", "FLOWRL_IMAGE_TAG": "v1",
           "FLOWRL_GRPO_PROCS": "8", "FLOWRL_GRPO_NODES": "2", "FLOWRL_OPD_PROCS": "8"}
    flags = subprocess.run([sys.executable, "images/build.py", "--flags"], cwd=ROOT, capture_output=True, text=True,
                           env=env, check=True).stdout.split()
    proc = subprocess.run([str(BIN / "pyflyte"), "--pkgs", "pipelines", "package", *flags, "--output",
                           str(out / "flyte-package.tgz"), "--force"], cwd=ROOT, capture_output=True, text=True,
                          env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with tarfile.open(out / "flyte-package.tgz") as tar:
        tar.extractall(out / "x", filter="data")
    return out / "x"


def _tasks(bundle_dir):
    from flyteidl.admin import task_pb2

    tasks = {}
    for path in bundle_dir.glob("*_tasks.*.pb"):
        spec = task_pb2.TaskSpec()
        spec.ParseFromString(path.read_bytes())
        tasks[spec.template.id.name] = spec.template
    return tasks


def _container(template):
    """(image, {resource: value}) of a task, from its container or its pod template's primary container."""
    from flyteidl.core import tasks_pb2
    from google.protobuf.json_format import MessageToDict

    if template.HasField("container"):
        names = tasks_pb2.Resources.ResourceName
        requests = template.container.resources.requests
        return template.container.image, {names.Name(r.name).lower(): r.value for r in requests}
    pod = MessageToDict(template.k8s_pod.pod_spec)
    primary = next(c for c in pod["containers"] if c["name"] == template.config["primary_container_name"])
    return primary["image"], primary["resources"]["requests"]


def test_bundle_tasks_name_their_images_gpus_and_retries(bundle):
    tasks = _tasks(bundle)
    expected = {  # task: (image, gpus, retries)
        "tasks.base.validate_config": ("cuda-base", None, 0), "tasks.opd.branch_switches": ("cuda-base", None, 0),
        "tasks.opd.skipped": ("cuda-base", None, 0), "tasks.base.base": ("base", None, 1),
        "tasks.base.start_pipeline_run": ("cuda-base", None, 2), "tasks.bench.finish_pipeline_run": ("cuda-base", None, 2),
        "tasks.reference.artifact_at": ("cuda-base", None, 2),
        "tasks.annotate.annotate": ("annotate", "1", 1), "tasks.reward_model.reward_model": ("reward-model", "1", 1),
        "tasks.filter_prompts.filter_prompts": ("filter-prompts", "1", 1), "tasks.grpo.grpo": ("grpo", "8", 2),
        "tasks.grpo.grpo_mixed": ("grpo", "8", 2), "tasks.opd.opd": ("opd", "8", 2), "tasks.bench.bench": ("bench", "1", 1),
    }
    assert set(tasks) == set(expected)
    for name, (image, gpus, retries) in expected.items():
        template = tasks[name]
        got_image, requests = _container(template)
        assert got_image == f"registry.example.com/ml/flowrl-{image}:v1", name
        assert requests.get("gpu") == gpus, name
        assert template.metadata.retries.retries == retries, name
        if gpus:
            assert template.extended_resources.gpu_accelerator.device == "nvidia-h100", name
    # the bench spills every model's images to local disk before scoring them
    assert _container(tasks["tasks.bench.bench"])[1]["ephemeral_storage"] == "100Gi"


def test_bundle_carries_the_elastic_torchrun_config(bundle):
    from google.protobuf.json_format import MessageToDict

    tasks = _tasks(bundle)
    grpo = tasks["tasks.grpo.grpo"]  # FLOWRL_GRPO_NODES=2: a PyTorchJob with an elastic config
    assert grpo.type == "pytorch"
    elastic = MessageToDict(grpo.custom)["elasticConfig"]
    assert elastic["nprocPerNode"] == 8 and elastic["minReplicas"] == 2 and elastic["maxReplicas"] == 2
    opd = tasks["tasks.opd.opd"]  # one node: torchrun inside the pod
    assert opd.type == "python-task"
    for template in (grpo, opd):  # a memory-backed /dev/shm for the workers, through `shared_memory=True`
        assert template.extended_resources.HasField("shared_memory"), template.id.name


def test_bundle_workflow_edges(bundle):
    from flyteidl.admin import workflow_pb2

    spec = workflow_pb2.WorkflowSpec()
    path = next(p for p in bundle.glob("*_pipelines.post_train.post_train_*.pb") if _parses(spec, p))
    nodes = list(spec.template.nodes)

    def task_of(node):
        if node.HasField("task_node"):
            return node.task_node.reference_id.name.split(".")[-1]
        if node.HasField("branch_node"):  # the conditional branches: the task of the `then` case
            return node.branch_node.if_else.case.then_node.task_node.reference_id.name.split(".")[-1]
        return None

    by_id = {n.id: task_of(n) for n in nodes}
    edges = set()
    for node in nodes:
        for binding in node.inputs:
            promise = binding.binding.promise
            if promise.node_id in by_id:
                edges.add((by_id[promise.node_id], by_id[node.id]))
    for edge in [("base", "annotate"), ("annotate", "reward_model"), ("reward_model", "filter_prompts"),
                 ("filter_prompts", "grpo"), ("grpo", "opd"), ("opd", "bench"), ("base", "bench")]:
        assert edge in edges, (edge, sorted(edges))
    assert path.stat().st_size > 0


def _parses(spec, path) -> bool:
    try:
        spec.ParseFromString(path.read_bytes())
        return bool(spec.template.nodes)
    except Exception:
        return False


def test_training_resources_of_a_production_config_come_from_the_planner(tmp_path):
    """`make package PLAN_CONFIG=...`: the GRPO and OPD tasks request what flowrl.planner.task_requests gives."""
    import yaml

    from flowrl.config import load_config
    from flowrl.planner import task_requests
    from tests.models.tiny_qwen_image import build_tiny_qwen_image

    weights = build_tiny_qwen_image(tmp_path / "tiny", task="t2i")
    data = yaml.safe_load((ROOT / "configs" / "qwen_image.yaml").read_text())
    data["model"]["qwen_image"]["pretrained"] = str(weights)
    config_path = tmp_path / "qwen_tiny.yaml"
    config_path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "FLOWRL_REGISTRY": "r", "FLOWRL_IMAGE_TAG": "v1", "FLOWRL_GRPO_PROCS": "4",
           "FLOWRL_OPD_PROCS": "4", "FLOWRL_PLAN_CONFIG": str(config_path), "FLOWRL_GPU_MEM": "1"}
    flags = subprocess.run([sys.executable, "images/build.py", "--flags"], cwd=ROOT, capture_output=True, text=True,
                           env=env, check=True).stdout.split()
    proc = subprocess.run([str(BIN / "pyflyte"), "--pkgs", "pipelines", "package", *flags, "--output",
                           str(tmp_path / "pkg.tgz"), "--force"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with tarfile.open(tmp_path / "pkg.tgz") as tar:
        tar.extractall(tmp_path / "x", filter="data")
    tasks = _tasks(tmp_path / "x")
    config = load_config(config_path)
    for task, stage in (("tasks.grpo.grpo", "grpo"), ("tasks.opd.opd", "opd")):
        expected, _ = task_requests(config, stage, 4, 1.0)
        _, requests = _container(tasks[task])
        assert requests == {"gpu": "4", "cpu": expected["cpu"], "memory": expected["mem"]}, task
