"""Shared fixtures: scenario configs pointed at temporary storage."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def user_env(**extra: str) -> dict[str, str]:
    """This process's environment as a user's shell has it (no PYTHONPATH), plus ``extra``: what a
    `pyflyte run` subprocess gets, so that its Elastic workers must import `tasks` on their own."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | extra


def write_config(tmp_path: Path, scenario: str = "smoke.yaml", **overrides) -> Path:
    """A copy of configs/<scenario> with artifacts and tracking under tmp_path.

    ``overrides`` are section -> {key: value} dicts merged into the YAML; a subsection of grpo / opd
    (loop, optim, timesteps) is merged into the file's key by key, any other value replaces the file's.
    """
    data = yaml.safe_load((ROOT / "configs" / scenario).read_text())
    data["run"]["artifact_root"] = str(tmp_path / "artifacts")
    data["run"]["tracking_uri"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for section, values in overrides.items():
        current = data.setdefault(section, {})
        for key, value in values.items():
            if section in ("grpo", "opd") and isinstance(value, dict) and isinstance(current.get(key), dict):
                value = {**current[key], **value}
            current[key] = value
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def smoke_config(tmp_path) -> Path:
    return write_config(tmp_path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def upstream(tmp_path_factory):
    """The smoke config's base, annotations, reward models and filtered prompt sets: built once per session
    (per xdist worker) for every test that reads them (the stage tests, the production chain)."""
    import torch

    from flowrl.config import load_config
    from flowrl.stages.annotate import run_annotate
    from flowrl.stages.base import run_base
    from flowrl.stages.filter_prompts import run_filter_prompts
    from flowrl.stages.reward_model import run_reward_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("grpo")
    config = load_config(write_config(root))
    base = run_base(config, progress=False)
    rm = run_reward_model(config, run_annotate(config, base.uri).uri)
    prompts = {task: run_filter_prompts(config, task, base.uri, rm.uri) for task in ("t2i", "edit")}
    return root, config, base, rm, prompts


@pytest.fixture(scope="session")
def teachers(upstream):
    from flowrl.stages.grpo import run_grpo

    _, config, base, rm, prompts = upstream
    return {f"{task}_teacher": run_grpo(config, task, base.uri, rm.uri, prompts[task].uri, progress=False).uri
            for task in ("t2i", "edit")}


@pytest.fixture(scope="session")
def production(tmp_path_factory, upstream):
    """The production family (qwen_image) on tiny random components: base, VLM reward models and filtered
    prompt sets, built once per session for tests/stages/test_production_path.py and the LoRA chain of
    tests/models/test_qwen_image_lora.py (each stage run of a test under its own directory or config)."""
    import torch
    from transformers import Qwen2VLImageProcessorPil

    from flowrl.stages.annotate import run_annotate
    from flowrl.stages.base import run_base
    from flowrl.stages.filter_prompts import run_filter_prompts
    from flowrl.stages.reward_model import run_reward_model
    from flowrl.storage import fetch
    from tests.models.tiny_qwen_image import build_text_encoder, build_tiny_qwen_image, build_tokenizer
    from tests.stages.test_production_path import _prompt_files, _qwen_config

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny components train and score single-threaded (as on a CI core)
    try:
        _, shapes_config, shapes_base, _, _ = upstream
        labels_dir = fetch(run_annotate(shapes_config, shapes_base.uri).uri)  # cached: the smoke labels as "human" ones
        labels = {k: str(labels_dir / f"{k}.parquet") for k in ("pointwise", "pairwise")}
        root = tmp_path_factory.mktemp("production")
        weights = build_tiny_qwen_image(root / "qwen-tiny", task="edit")
        vlm = root / "vlm-tiny"
        tokenizer = build_tokenizer()
        tokenizer.save_pretrained(vlm)
        build_text_encoder(tokenizer, seed=1).save_pretrained(vlm)
        Qwen2VLImageProcessorPil().save_pretrained(vlm)
        prompts = _prompt_files(root)
        config = _qwen_config(root, labels, weights, vlm, prompts)
        base = run_base(config, progress=False)
        rm = run_reward_model(config, run_annotate(config, base.uri).uri)
        filtered = {task: run_filter_prompts(config, task, base.uri, rm.uri) for task in ("t2i", "edit")}
    finally:
        torch.set_num_threads(threads)
    return root, config, base, rm, filtered, (labels, weights, vlm, prompts)


@pytest.fixture(scope="session")
def s3_server():
    """An S3 API server (moto) on loopback for this test session; yields the
    URI of an empty bucket and points boto3 / s3fs / MLflow at the server
    through the environment (AWS_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL)."""
    port = _free_port()
    server = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    assert server, "moto_server is not installed next to this python (requirements/cpu.txt pins moto[server])"
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start")
                time.sleep(0.2)
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
        fs.mkdir("flowrl-test")
        yield "s3://flowrl-test"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TcpProxy:
    """A loopback TCP forwarder to ``target_port`` that a test can take down
    (listener closed, open connections cut: clients see refused and reset
    connections, as in a network outage) and bring back on the same port,
    while the server behind it keeps its state."""

    def __init__(self, target_port: int):
        self.target_port, self.port = target_port, _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> "TcpProxy":
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def stop(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # closed by stop()
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._listener is not listener:
                    client.close(), upstream.close()
                    return
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture(autouse=True, scope="session")
def _isolated_flyte_cache(tmp_path_factory):
    """In-process workflow runs use a Flyte local cache of this session only: entries from an
    earlier session would name artifacts (e.g. on a since-restarted S3 test server) that are gone."""
    from diskcache import Cache
    from flytekit.core.local_cache import LocalTaskCache

    saved = (getattr(LocalTaskCache, "_cache", None), LocalTaskCache._initialized)
    LocalTaskCache._cache = Cache(str(tmp_path_factory.mktemp("flyte-local-cache")))
    LocalTaskCache._initialized = True
    yield
    LocalTaskCache._cache, LocalTaskCache._initialized = saved


# ---------------------------------------------------------------------------------------------------------
# results/reliability.json: `pytest -m "fault or bad_input" --reliability-report PATH` records, from the
# tests that ran, each fault scenario (marker `fault(scenario, outcome)`) with whether every test of it
# passed, how many bad-input cases (marker `bad_input`) were tried and passed, and how many cases the
# property battery generated (tests/test_property_battery.py: `generated`, `failed`, `seed`). What a test
# counts travels on its reports' user_properties, so the report is also right under pytest-xdist.

_RELIABILITY: dict[str, dict] = {}


def pytest_addoption(parser):
    parser.addoption("--reliability-report", default=None, metavar="PATH",
                     help="write the fault scenarios and bad-input cases that ran, with their outcomes, to PATH")


def pytest_collection_modifyitems(config, items):
    for item in items:
        fault = item.get_closest_marker("fault")
        if fault is not None:
            entry = {"kind": "fault", "scenario": fault.args[0], "outcome": fault.args[1]}
        elif item.get_closest_marker("bad_input") is not None:
            entry = {"kind": "bad_input"}
        else:
            continue
        item.user_properties.append(("reliability", entry))  # on every report, to xdist's controller too


def pytest_runtest_logreport(report):
    properties = dict(report.user_properties)
    if "reliability" not in properties:
        return
    entry = _RELIABILITY.setdefault(report.nodeid, dict(properties["reliability"]))
    if "property_battery" in properties:  # the battery's counts, set at its teardown
        entry.update(properties["property_battery"])
    if report.failed:
        entry["result"] = "failed"
    elif report.when == "call" and report.passed and entry.get("result") != "failed":
        entry["result"] = "passed"
    elif report.skipped:
        entry["result"] = "skipped"


def pytest_sessionfinish(session, exitstatus):
    path = session.config.getoption("--reliability-report", default=None)
    if not path or not _RELIABILITY or hasattr(session.config, "workerinput"):  # xdist: the controller writes it
        return
    import json
    import platform
    import shlex
    from datetime import datetime, timezone

    ran = {k: v for k, v in _RELIABILITY.items() if "result" in v}
    scenarios: dict[str, dict] = {}
    for nodeid, entry in sorted(ran.items()):
        if entry["kind"] != "fault":
            continue
        row = scenarios.setdefault(entry["scenario"], {"scenario": entry["scenario"], "outcome": entry["outcome"],
                                                       "tests": [], "passed": 0})
        row["tests"].append(nodeid)
        row["passed"] += entry["result"] == "passed"
    for row in scenarios.values():
        row["verified"] = row["passed"] == len(row["tests"])
    bad = [v for v in ran.values() if v["kind"] == "bad_input"]
    report = {
        "command": shlex.join(["python", "-m", "pytest", *session.config.invocation_params.args]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "faults": list(scenarios.values()),
        "bad_input": {"tried": len(bad), "passed": sum(v["result"] == "passed" for v in bad)},
    }
    battery = {nodeid: v for nodeid, v in sorted(ran.items()) if "generated" in v}
    seeds = sorted({v["seed"] for v in battery.values()})
    report |= {  # the generated cases: how many ran, how many broke the contract, from which seed (None: none ran)
        "generated": sum(v["generated"] for v in battery.values()),
        "failed": sum(v["failed"] for v in battery.values()),
        "seed": seeds[0] if len(seeds) == 1 else seeds or None,
        "property_battery": {nodeid: {"generated": v["generated"], "failed": v["failed"], "result": v["result"]}
                             for nodeid, v in battery.items()},
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(path)


@contextlib.contextmanager
def mlflow_server_at(root: Path, artifacts: str):
    """A real `mlflow server` on a free loopback port, its backend store and log under ``root`` and its
    artifacts proxied to ``artifacts``; yields its URL once /health answers, stops it afterwards."""
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [shutil.which("mlflow", path=os.path.dirname(sys.executable)), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", artifacts, "--serve-artifacts"],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, env=dict(os.environ),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("mlflow server did not start:\n" + (root / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
