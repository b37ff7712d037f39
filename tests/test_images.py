"""Container images, checked offline: content tags (images/build.py), hadolint, build contexts,
pinned requirements, the DeepSpeed op checks of the training base, `make images` without an
engine (and against a fake engine that reports errors), and the `pyflyte package` bundle's
tasks and workflow edges."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import ROOT

IMAGES = ROOT / "images"
DOCKERFILES = sorted(IMAGES.glob("*.Dockerfile"))
BIN = Path(sys.executable).parent


def _load_build(name="flowrl_images_build_test"):
    """images/build.py loaded by path, as tasks/launch.py loads it (not registered in sys.modules)."""
    spec = importlib.util.spec_from_file_location(name, IMAGES / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()
STAGES = list(build.STAGE_IMAGES)

# What each Dockerfile COPYs, written out by hand: the parser of images/build.py must find exactly this.
COPIED = {
    "images/cuda-base.Dockerfile": ["images/requirements/runtime.txt", "pyproject.toml", "README.md", "flowrl",
                                    "tasks", "pipelines", "configs"],
    "images/train-base.Dockerfile": ["images/requirements/train.txt"],
    "images/reward_model.Dockerfile": ["images/requirements/reward.txt"],
    "images/grpo.Dockerfile": ["images/requirements/reward.txt"],
    "images/base.Dockerfile": [], "images/annotate.Dockerfile": [], "images/filter_prompts.Dockerfile": [],
    "images/opd.Dockerfile": [], "images/bench.Dockerfile": [],
}


# --------------------------------------------------------------------------- the Dockerfiles

def test_one_dockerfile_per_image_each_from_its_parent():
    assert {p.relative_to(ROOT).as_posix() for p in DOCKERFILES} == {s.dockerfile for s in build.IMAGES.values()}
    assert set(build.STAGE_IMAGES.values()) <= set(build.IMAGES)
    for name, spec in build.IMAGES.items():
        text = (ROOT / spec.dockerfile).read_text()
        users = re.findall(r"^USER (\S+)", text, re.M)
        assert users and users[-1] == "1000", f"{spec.dockerfile}: must end as the non-root user"
        if spec.parent is None:
            assert re.search(r"^FROM nvidia/cuda:[\d.]+-cudnn-\$\{CUDA_FLAVOR\}-ubuntu[\d.]+$", text, re.M), name
        else:  # built FROM the parent, whose repository is also the default of BASE_IMAGE
            assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M), name
            assert f"ARG BASE_IMAGE={build.repository(spec.parent)}:latest" in text, name
    assert {dict(s.buildargs).get("CUDA_FLAVOR") for s in build.IMAGES.values() if s.parent is None} == \
        {"runtime", "devel"}
    base = (IMAGES / "cuda-base.Dockerfile").read_text()
    assert 'pip install "torch==${TORCH_VERSION}" --index-url' in base
    assert "userdel ubuntu" in base  # Ubuntu 24.04 images hold uid 1000 already


def _ancestors(image):
    while image is not None:
        yield image
        image = build.IMAGES[image].parent


def test_training_images_sit_on_the_devel_base_with_deepspeed_ops():
    for stage in ("grpo", "opd"):
        assert list(_ancestors(stage))[1:] == ["train-base", "cuda-devel"], stage
    for stage in set(STAGES) - {"grpo", "opd"}:
        assert "cuda-devel" not in _ancestors(build.STAGE_IMAGES[stage]), stage  # the runtime base stays lean
    base = (IMAGES / "cuda-base.Dockerfile").read_text()
    assert re.search(r'if \[ "\$\{CUDA_FLAVOR\}" = devel \]; then apt-get install .*g\+\+ python3\.11-dev', base)
    train = (IMAGES / "train-base.Dockerfile").read_text()
    assert "DS_BUILD_FUSED_ADAM=1" in train and "--no-build-isolation" in train
    assert re.search(r"^ARG TORCH_CUDA_ARCH_LIST=\S*9\.0", train, re.M) and "ENV DS_ACCELERATOR=cuda" in train
    assert "ds_report" in train and "CPUAdamBuilder().load()" in train
    assert "images/requirements/reward.txt" in (IMAGES / "grpo.Dockerfile").read_text()
    assert "images/requirements/reward.txt" in (IMAGES / "reward_model.Dockerfile").read_text()


def _op_checks():
    """The `python -c` programs of train-base's check step, as docker runs them (continuations joined)."""
    text = (IMAGES / "train-base.Dockerfile").read_text()
    run = next(args for keyword, args in build._instructions(text) if keyword == "RUN" and "ds_report" in args)
    return re.findall(r'python -c "(.*?)"', run)


def test_the_op_checks_run_against_deepspeed_and_fail_without_prebuilt_ops():
    """The checks name real DeepSpeed APIs: here (`make venv` builds no ops, no GPU) the FusedAdam check
    must fail with its message, and the CPU Adam builder must import (its compile is left to the image)."""
    prebuilt, jit = _op_checks()
    importer = jit.replace("CPUAdamBuilder().load()", "assert CPUAdamBuilder.NAME == 'cpu_adam'")
    assert importer != jit
    program = (f"try:\n    exec({prebuilt!r})\nexcept AssertionError as e:\n    print('refused:', e)\n"
               f"else:\n    raise SystemExit('the FusedAdam check passed without a prebuilt op')\nexec({importer!r})")
    proc = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "refused: FusedAdam not prebuilt for cuda: 'cpu'" in proc.stdout


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_passes(path):
    proc = subprocess.run([str(BIN / "hadolint"), str(path)], capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout + proc.stderr


def _ignored(rel: str) -> bool:
    """Whether .dockerignore (a deny-all with exceptions, as written here) leaves ``rel`` out."""
    allowed = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")]
    return not any(rel == a or rel.startswith(a + "/") for a in allowed)


def test_the_parsed_copy_sources_are_the_declared_ones_and_in_the_build_context():
    assert {p.relative_to(ROOT).as_posix() for p in DOCKERFILES} == set(COPIED)
    for dockerfile, expected in COPIED.items():
        sources = build.copy_sources(dockerfile)
        assert sources == expected, dockerfile
        for source in sources:
            assert (ROOT / source).exists(), f"{dockerfile}: COPY {source}: not in the build context"
            assert not _ignored(source), f"{dockerfile}: COPY {source}: excluded by .dockerignore"
    opd = build.image_files("opd")  # its own Dockerfile, its parents' and everything they copy
    assert {"images/opd.Dockerfile", "images/train-base.Dockerfile", "images/cuda-base.Dockerfile",
            "images/requirements/train.txt", "flowrl/__init__.py", "configs/qwen_image.yaml", ".dockerignore"} <= set(opd)
    assert "images/requirements/reward.txt" not in opd and not any("__pycache__" in f for f in opd)


def test_copy_parser_reads_every_form_and_refuses_what_it_cannot_hash(tmp_path):
    (tmp_path / "d").write_text(
        "# syntax comment\nFROM x:1\nCOPY --chown=a:b one.txt \\\n  # a comment inside\n  two/ /dst/\n"
        'COPY ["three", "/dst/"]\nADD four.tar /x\nRUN echo COPY nope /x\n')
    assert build.copy_sources("d", tmp_path) == ["one.txt", "two", "three", "four.tar"]
    for line, word in [("COPY --from=builder /a /b", "another image"), ("COPY src/*.py /x/", "wildcard"),
                       ("ADD https://e.com/f /f", "URL"), ("COPY . /app", "outside"), ("COPY ../x /x", "outside"),
                       ("COPY $SRC /x", "variable"), ("COPY onlyone", "source and a destination")]:
        (tmp_path / "d").write_text(f"FROM x:1\n{line}\n")
        with pytest.raises(build.DockerfileError, match=word):
            build.copy_sources("d", tmp_path)


# --------------------------------------------------------------------------- content tags

def _tree(dst: Path) -> Path:
    """A copy of what the images are built from, plus files that go into no image."""
    for name in ("images", "flowrl", "tasks", "pipelines", "configs"):
        shutil.copytree(ROOT / name, dst / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", ".dockerignore"):
        shutil.copy2(ROOT / name, dst / name)
    for rel in ("results/a.json", "docs/b.md", "bench/c.py", "tests/d.py"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_text("{}\n")
    return dst


@pytest.fixture
def tree(tmp_path):
    return _tree(tmp_path / "repo")


def _tags(root):
    return {stage: build.image_tag(stage, root) for stage in [*STAGES, "cuda-devel", "train-base"]}


def _edit(root: Path, rel: str):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        f.write(b"\n# edited\n")


@pytest.mark.parametrize("rel", ["flowrl/__init__.py", "flowrl/new_module.py", "tasks/types.py",
                                 "pipelines/post_train.py", "configs/shapes.yaml", "configs/new.yaml",
                                 "pyproject.toml", "README.md", "images/requirements/runtime.txt",
                                 "images/cuda-base.Dockerfile", ".dockerignore"])
def test_every_image_is_retagged_when_a_file_of_the_shared_base_changes(tree, rel):
    before = _tags(tree)
    _edit(tree, rel)
    after = _tags(tree)
    assert all(after[s] != before[s] for s in before), (rel, before, after)


def test_a_deleted_file_retags_too(tree):
    before = _tags(tree)
    (tree / "configs" / "smoke.yaml").unlink()
    assert all(t != before[s] for s, t in _tags(tree).items())


@pytest.mark.parametrize("rel,changed", [
    ("images/requirements/train.txt", {"grpo", "opd", "train-base"}),
    ("images/requirements/reward.txt", {"grpo", "reward_model"}),
    ("images/train-base.Dockerfile", {"grpo", "opd", "train-base"}),
    ("images/grpo.Dockerfile", {"grpo"}),
    ("images/bench.Dockerfile", {"bench"}),
])
def test_a_stage_file_retags_exactly_the_images_built_on_it(tree, rel, changed):
    before = _tags(tree)
    _edit(tree, rel)
    after = _tags(tree)
    assert {s for s in before if after[s] != before[s]} == changed


@pytest.mark.parametrize("rel", ["results/a.json", "docs/b.md", "bench/c.py", "tests/d.py", "images/README.md",
                                 "images/lock.py", "images/build.py", "flowrl/__pycache__/x.cpython-311.pyc",
                                 "tasks/stale.pyc", "requirements/cpu.txt"])
def test_files_outside_the_images_leave_the_tags_alone(tree, rel):
    before = _tags(tree)
    _edit(tree, rel)
    assert _tags(tree) == before


def test_tags_depend_on_content_only_not_on_where_or_when(tmp_path):
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "elsewhere" / "b")
    for path in b.rglob("*"):
        os.utime(path, (0, 0))
    assert _tags(a) == _tags(b)
    assert all(re.fullmatch(r"0\.1\.0-[0-9a-f]{12}", t) for t in _tags(a).values())
    assert len(set(_tags(a).values())) == len(_tags(a))  # no two images share a tag


def test_image_uri_names_registry_repository_and_tag(tree):
    tag = build.image_tag("reward_model", tree)
    assert build.image_uri("reward_model", "ghcr.io/acme/", tree) == f"ghcr.io/acme/flowrl-reward-model:{tag}"
    assert build.image_uri("default", "localhost:5000", tree).startswith("localhost:5000/flowrl-cuda-base:0.1.0-")
    for bad in ("", "  ", "https://ghcr.io/acme", "ghcr.io/a b"):
        with pytest.raises(ValueError, match="registry"):
            build.image_uri("grpo", bad, tree)
    with pytest.raises(KeyError, match="no image for 'nope'"):
        build.image_tag("nope", tree)


@pytest.mark.parametrize("rel,named", [("tasks", "tasks (COPY in images/cuda-base.Dockerfile)"),
                                       ("images/requirements/train.txt", "images/requirements/train.txt"),
                                       ("images/opd.Dockerfile", "images/opd.Dockerfile"),
                                       ("pyproject.toml", "pyproject.toml")])
def test_a_missing_input_is_named(tree, rel, named):
    path = tree / rel
    shutil.rmtree(path) if path.is_dir() else path.unlink()
    with pytest.raises(build.MissingImageSource, match=re.escape(named)):
        for stage in STAGES:
            build.image_tag(stage, tree)


def test_naming_every_stage_image_takes_well_under_a_second():
    fresh = _load_build("flowrl_images_build_timing")
    start = time.perf_counter()
    uris = [fresh.image_uri(stage, "ghcr.io/acme") for stage in fresh.STAGE_IMAGES]
    assert time.perf_counter() - start < 1.0
    assert len(set(uris)) == len(uris)


# --------------------------------------------------------------------------- building and pushing

class FakeAPI:
    """The two calls of docker's low-level API that build_images makes, replaying canned event streams."""

    def __init__(self, build_events=None, push_events=None):
        self.calls = []
        self.build_events = build_events or (lambda tag: [{"stream": f"Step 1/1 {tag}\n"}, {"aux": {"ID": "sha256:1"}},
                                                          {"stream": "Successfully built 1\n"}])
        self.push_events = push_events or (lambda name, tag: [
            {"status": "Pushing", "progressDetail": {"current": 1}, "id": "l1"},
            b'{"status": "v: digest: sha256:d size: 1"}\r\n{"aux": {"Tag": "v", "Digest": "sha256:d", "Size": 1}}\r\n'])

    def build(self, **kwargs):
        self.calls.append(("build", kwargs["tag"], kwargs["buildargs"]))
        assert kwargs["decode"] is True and kwargs["path"] == str(ROOT)
        return iter(self.build_events(kwargs["tag"]))

    def push(self, name, tag, stream, decode):
        self.calls.append(("push", f"{name}:{tag}", None))
        assert stream and decode
        return iter(self.push_events(name, tag))


class FakeClient:
    def __init__(self, api):
        self.api = api


def test_build_images_builds_parents_first_and_pushes_each():
    builds = build.plan_builds("r.example/ml")
    api = FakeAPI()
    done = build.build_images(FakeClient(api), builds, push=True)
    assert [c[0] for c in api.calls] == ["build", "push"] * len(build.IMAGES)
    order = [c[1] for c in api.calls if c[0] == "build"]
    for b in builds:
        if "BASE_IMAGE" in b.buildargs:
            assert order.index(b.buildargs["BASE_IMAGE"]) < order.index(b.tag), b.name
    assert done == {b.tag: "sha256:d" for b in builds}
    assert builds[-1].tag == build.image_uri("bench", "r.example/ml")


@pytest.mark.parametrize("events,message", [
    ([{"stream": "Step 1/3\n"}, {"errorDetail": {"message": "COPY failed: no such file"}, "error": "COPY failed"}],
     "COPY failed: no such file"),
    ([b'{"stream": "Step 1/3"}\n{"error": "The command returned a non-zero code: 1"}\n'], "non-zero code: 1"),
    ([{"stream": "Step 1/3\n"}], "without an image ID"),
])
def test_a_build_error_in_the_stream_raises_with_the_image_name(events, message):
    builds = build.plan_builds("r.example/ml")
    api = FakeAPI(build_events=lambda tag: events)
    with pytest.raises(build.DockerStreamError, match=re.escape(f"build {builds[0].tag} failed: ") + ".*" +
                       re.escape(message)):
        build.build_images(FakeClient(api), builds, push=True)
    assert [c[0] for c in api.calls] == ["build"]  # nothing after the failed build


@pytest.mark.parametrize("events,message", [
    ([{"status": "The push refers to repository [r.example/ml/flowrl-cuda-base]"},
      {"errorDetail": {"message": "denied: requested access to the resource is denied"},
       "error": "denied: requested access to the resource is denied"}], "denied: requested access"),
    ([b'{"status": "Preparing"}\r\n{"error": "unauthorized: authentication required"}\r\n'], "unauthorized"),
    ([{"status": "Pushed"}], "without a pushed digest"),
])
def test_a_push_error_in_the_stream_raises_with_the_image_name(events, message):
    builds = build.plan_builds("r.example/ml")
    api = FakeAPI(push_events=lambda name, tag: events)
    with pytest.raises(build.DockerStreamError, match=re.escape(f"push {builds[0].tag} failed: ") + ".*" +
                       re.escape(message)):
        build.build_images(FakeClient(api), builds, push=True)
    assert [c[0] for c in api.calls] == ["build", "push"]


# --------------------------------------------------------------------------- requirements and `make images`

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
    # DeepSpeed's sdist is built without isolation: a setuptools with bdist_wheel is installed before it
    assert re.search(r"^setuptools==(\d+)\.(\d+)", (IMAGES / "requirements" / "train.txt").read_text(), re.M)
    proc = subprocess.run([sys.executable, "images/lock.py", "--check"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_make_images_says_there_is_no_engine_and_fails(tmp_path):
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    proc = subprocess.run(["make", "-s", "images"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert proc.returncode != 0
    assert "no docker engine reachable" in proc.stderr and "DRY_RUN=1" in proc.stderr


def test_make_images_dry_run_prints_every_build_under_content_tags():
    env = {k: v for k, v in os.environ.items() if k not in ("FLOWRL_REGISTRY", "FLOWRL_IMAGE_TAG")}
    proc = subprocess.run(["make", "-s", "images", "DRY_RUN=1", "REGISTRY=registry.example.com/ml"], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    builds = [line for line in proc.stdout.splitlines() if line.startswith("docker build")]
    uri = {s: build.image_uri(s, "registry.example.com/ml") for s in [*STAGES, "train-base", "cuda-devel"]}
    assert len(builds) == len(build.IMAGES)
    assert builds[0] == (f"docker build -f images/cuda-base.Dockerfile -t {uri['default']} "
                         "--build-arg CUDA_FLAVOR=runtime .")
    assert (f"docker build -f images/grpo.Dockerfile -t {uri['grpo']} --build-arg BASE_IMAGE={uri['train-base']} ."
            in builds)
    assert (f"docker build -f images/train-base.Dockerfile -t {uri['train-base']} "
            f"--build-arg BASE_IMAGE={uri['cuda-devel']} .") in builds


def test_the_registry_comes_from_the_config_and_a_forced_tag_still_applies(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("run: {}\nlaunch:\n  registry: ghcr.io/acme/flowrl\n")
    assert build.main(["--config", str(config), "--flags"]) == 0
    assert f"--image grpo={build.image_uri('grpo', 'ghcr.io/acme/flowrl')}" in capsys.readouterr().out
    assert build.main(["--config", str(config), "--tag", "v1", "--flags"]) == 0
    assert "--image reward_model=ghcr.io/acme/flowrl/flowrl-reward-model:v1" in capsys.readouterr().out
    config.write_text("run: {}\n")
    with pytest.raises(SystemExit, match="has no launch.registry"):
        build.main(["--config", str(config), "--flags"])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    env = {**os.environ, "FLOWRL_REGISTRY": "registry.example.com/ml", "FLOWRL_IMAGE_TAG": "v1"}
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


def test_image_flags_override_the_task_images(bundle):
    """`--image NAME=REF` flags (`images/build.py --flags`) still name every task's image; the launch
    settings baked from a config (workers, resources, registry) are tests/test_package.py's."""
    tasks = _tasks(bundle)
    expected = {  # task: (image, retries)
        "tasks.base.validate_config": ("cuda-base", 0), "tasks.opd.branch_switches": ("cuda-base", 0),
        "tasks.opd.skipped": ("cuda-base", 0), "tasks.base.base": ("base", 1),
        "tasks.base.start_pipeline_run": ("cuda-base", 2), "tasks.bench.finish_pipeline_run": ("cuda-base", 2),
        "tasks.base.fail_pipeline_run": ("cuda-base", 2),
        "tasks.reference.artifact_at": ("cuda-base", 2),
        "tasks.annotate.annotate": ("annotate", 1), "tasks.reward_model.reward_model": ("reward-model", 1),
        "tasks.filter_prompts.filter_prompts": ("filter-prompts", 1), "tasks.grpo.grpo": ("grpo", 2),
        "tasks.grpo.grpo_mixed": ("grpo", 2), "tasks.opd.opd": ("opd", 2), "tasks.bench.bench": ("bench", 1),
        # the second annotation round and its switch
        "tasks.annotate.annotation_rounds": ("cuda-base", 0), "tasks.annotate.passed_on": ("cuda-base", 0),
        "tasks.annotate.annotate_policies": ("annotate", 1),
        "tasks.reward_model.reward_model_refresh": ("reward-model", 1), "tasks.grpo.grpo_continued": ("grpo", 2),
    }
    assert set(tasks) == set(expected)
    for name, (image, retries) in expected.items():
        template = tasks[name]
        got_image, _ = _container(template)
        assert got_image == f"registry.example.com/ml/flowrl-{image}:v1", name
        assert template.metadata.retries.retries == retries, name


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
        bindings = list(node.inputs)
        if node.HasField("branch_node"):  # a conditional's data flows into its `then` node
            bindings += list(node.branch_node.if_else.case.then_node.inputs)
        for binding in bindings:
            promise = binding.binding.promise
            if promise.node_id in by_id:
                edges.add((by_id[promise.node_id], by_id[node.id]))
    # GRPO round 1 -> the second annotation round -> refreshed reward models -> GRPO round 2 (each a conditional
    # on pipeline.annotation_rounds, named here by its `then` task) -> OPD
    for edge in [("base", "annotate"), ("annotate", "reward_model"), ("reward_model", "filter_prompts"),
                 ("filter_prompts", "grpo"), ("grpo", "annotate_policies"), ("annotate_policies", "reward_model_refresh"),
                 ("reward_model_refresh", "grpo_continued"), ("grpo", "grpo_continued"), ("grpo_continued", "opd"),
                 ("opd", "bench"), ("base", "bench")]:
        assert edge in edges, (edge, sorted(edges))
    assert path.stat().st_size > 0


def _parses(spec, path) -> bool:
    try:
        spec.ParseFromString(path.read_bytes())
        return bool(spec.template.nodes)
    except Exception:
        return False
