"""The CLI's error boundary: every user-caused error is one line on stderr naming what was wrong
(key, file, flag, URI), exit status 2, no traceback, and the places a command writes are checked
before any work; a genuine bug keeps its traceback. The Flyte tasks map the same errors to one
line of a flytekit user error."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import flowrl.stages.base
import flowrl.stages.bench
from flowrl.cli import main
from flowrl.storage import ArtifactStore
from tests.conftest import ROOT, write_config

FAKE_VERSION = "0123456789abcdef"


def fake_artifact(root: Path, stage: str) -> str:
    """A complete, empty artifact of ``stage``: enough for the checks that read a manifest only."""
    staging = root / f"staging-{stage}"
    staging.mkdir(parents=True)
    return ArtifactStore(str(root / "store")).commit(staging, stage=stage, version=FAKE_VERSION, config_hash="x",
                                                      inputs={})


@pytest.fixture
def world(tmp_path, monkeypatch):
    """A smoke config under tmp_path, fake upstream artifacts, and the stages' work replaced by a
    failure: a case that reaches any work fails the test instead of running it."""
    config = write_config(tmp_path / "run")
    uris = {name: fake_artifact(tmp_path, name) for name in
            ("base", "reward_model", "annotate", "filter_prompts_t2i", "filter_prompts_edit", "grpo_t2i")}

    def no_work(*args, **kwargs):
        raise AssertionError("the command started work despite bad input")

    monkeypatch.setattr(flowrl.stages.base, "run_base", no_work)
    for module in ("grpo", "opd"):  # the training stages' first read of an input's files
        monkeypatch.setattr(f"flowrl.stages.{module}.fetch", no_work)
    monkeypatch.setattr(flowrl.stages.bench, "run_bench", no_work)
    return tmp_path, str(config), uris


def cli(capsys, argv: list[str]) -> tuple[int, str, float]:
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    return code, capsys.readouterr().err, elapsed


def assert_one_line(code: int, err: str, command: str, *names: str) -> None:
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"flowrl {command}: error: "), err
    for name in names:
        assert name in lines[0], (name, err)


def files_under(path: Path) -> set[Path]:
    return {p for p in path.rglob("*")} if path.exists() else set()


NT = ["--no-tracking", "--no-progress"]


# ------------------------------------------------------------------ user errors raised by a stage's input


@pytest.mark.bad_input
@pytest.mark.parametrize("case", ["annotate_base", "filter_base", "grpo_prompts", "output"])
def test_unknown_uri_protocols_are_one_line(world, capsys, case):
    tmp, config, u = world
    argv = {
        "annotate_base": ["annotate", "--config", config, "--base", "foo://x"],
        "filter_base": ["filter-prompts", "--config", config, "--task", "t2i", "--base", "foo://x",
                        "--reward-model", u["reward_model"]],
        "grpo_prompts": ["grpo", "--config", config, "--task", "t2i", "--base", u["base"], "--reward-model",
                         u["reward_model"], "--prompts", "foo://x"],
        "output": ["base", "--config", config, "--output", "foo://x"],
    }[case]
    code, err, _ = cli(capsys, argv + NT)
    assert_one_line(code, err, argv[0], "foo://x", "Protocol not known: foo",
                    *(["--output"] if case == "output" else []))


@pytest.mark.bad_input
@pytest.mark.parametrize("task, given", [("edit", "filter_prompts_t2i"), ("t2i", "filter_prompts_edit"),
                                         ("t2i", "base")])
def test_grpo_prompts_of_another_task_fail_before_work(world, capsys, task, given):
    tmp, config, u = world
    code, err, elapsed = cli(capsys, ["grpo", "--config", config, "--task", task, "--base", u["base"],
                                      "--reward-model", u["reward_model"], "--prompts", u[given], *NT])
    assert_one_line(code, err, "grpo", u[given], f"filter_prompts_{task}")


@pytest.mark.bad_input
def test_opd_prompts_swapped_fail_before_work(world, capsys):
    tmp, config, u = world
    code, err, _ = cli(capsys, ["opd", "--config", config, "--base", u["base"],
                                "--teacher", f"t2i_teacher={u['grpo_t2i']}", "--teacher", f"edit_teacher={u['grpo_t2i']}",
                                "--prompts", f"t2i={u['filter_prompts_edit']}", f"edit={u['filter_prompts_t2i']}", *NT])
    assert_one_line(code, err, "opd", u["filter_prompts_edit"], "filter_prompts_t2i")


@pytest.mark.bad_input
@pytest.mark.parametrize("command, flag, name", [
    ("opd", "--teacher", "../x"), ("opd", "--teacher", "a/b"), ("bench", "--model", "../m"),
    ("judge", "--model", ".hidden"),
])
def test_unsafe_names_are_refused(world, capsys, command, flag, name):
    tmp, config, u = world
    argv = {
        "opd": ["opd", "--config", config, "--base", u["base"], "--teacher", f"{name}={u['grpo_t2i']}",
                "--teacher", f"edit_teacher={u['grpo_t2i']}", "--prompts", f"t2i={u['filter_prompts_t2i']}",
                f"edit={u['filter_prompts_edit']}", *NT],
        "bench": ["bench", "--config", config, "--model", f"{name}={u['base']}", *NT],
        "judge": ["judge", "--config", config, "--model", f"{name}={u['base']}", "--results",
                  str(tmp / "judge.json")],
    }[command]
    code, err, _ = cli(capsys, argv)
    assert_one_line(code, err, command, flag, name, "not a safe name")
    assert not (tmp / "judge.json").exists()


@pytest.mark.bad_input
def test_opd_routes_naming_no_given_teacher(world, capsys):
    tmp, config, u = world
    code, err, _ = cli(capsys, ["opd", "--config", config, "--base", u["base"], "--teacher", f"a={u['grpo_t2i']}",
                                "--prompts", f"t2i={u['filter_prompts_t2i']}", f"edit={u['filter_prompts_edit']}",
                                *NT])
    assert_one_line(code, err, "opd", "opd.routes", "no teacher named")


@pytest.mark.bad_input
def test_reward_token_env_unset_fails_before_work(world, capsys, monkeypatch):
    tmp, config, u = world
    monkeypatch.delenv("FLOWRL_TEST_NO_SUCH_TOKEN", raising=False)
    code, err, _ = cli(capsys, ["grpo", "--config", config, "--task", "t2i", "--base", u["base"],
                                "--reward-model", u["reward_model"], "--prompts", u["filter_prompts_t2i"],
                                "--set", "grpo.reward_backend=server",
                                "--set", "grpo.reward_token_env=FLOWRL_TEST_NO_SUCH_TOKEN", *NT])
    assert_one_line(code, err, "grpo", "grpo.reward_token_env", "FLOWRL_TEST_NO_SUCH_TOKEN")


@pytest.mark.bad_input
def test_s3_output_without_credentials_fails_before_work(world, capsys, monkeypatch):
    pytest.importorskip("s3fs")
    tmp, config, _ = world
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing is sent anywhere
    code, err, elapsed = cli(capsys, ["base", "--config", config, "--output", "s3://flowrl-nocreds/root", *NT])
    assert_one_line(code, err, "base", "--output", "s3://flowrl-nocreds/root", "credentials")
    assert elapsed < 5, elapsed


@pytest.mark.bad_input
@pytest.mark.parametrize("content, words", [
    (b"\xff\xfe\x00\x01binary", ["not a UTF-8 text file"]),
    (b"run:\n  name: caf\xe9\n", ["not a UTF-8 text file"]),
    (b"run:\n  name: a\x00b\n", ["NUL"]),
    (b"run: [unclosed\n  name: x\n", ["invalid YAML"]),
])
def test_unreadable_config_files_name_the_file(tmp_path, capsys, content, words):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    code, err, _ = cli(capsys, ["validate", "--config", str(path)])
    assert_one_line(code, err, "validate", str(path), *words)


# ------------------------------------------------------------------ preflight: where the command writes


def _not_writable_cases():
    cases = [("output", "/proc/flowrl-x"), ("output", "FILE/x"), ("output", "FILE"), ("results", "/proc/r.json"),
             ("results", "FILE/r.json"), ("results", "DIR"), ("report-dir", "FILE/report"),
             ("judge-results", "/proc/r.json")]
    if Path("/sys").is_dir():
        cases.append(("output", "/sys/flowrl-x"))
    return cases


@pytest.mark.bad_input
@pytest.mark.parametrize("flag, where", _not_writable_cases())
def test_unwritable_outputs_fail_before_work(world, capsys, flag, where):
    tmp, config, u = world
    blocker = tmp / "a-file"
    blocker.write_text("not a directory\n")
    (tmp / "a-dir").mkdir()
    path = where.replace("FILE", str(blocker)).replace("DIR", str(tmp / "a-dir"))
    argv = {
        "output": ["base", "--config", config, "--output", path, *NT],
        "results": ["base", "--config", config, "--results", path, *NT],
        "report-dir": ["bench", "--config", config, "--model", f"base={u['base']}", "--report-dir", path, *NT],
        "judge-results": ["judge", "--config", config, "--model", f"base={u['base']}", "--results", path],
    }[flag]
    before = files_under(tmp)
    code, err, elapsed = cli(capsys, argv)
    shown = "--results" if flag == "judge-results" else f"--{flag}"
    assert_one_line(code, err, argv[0], shown, path)
    assert elapsed < 1.0, elapsed
    assert files_under(tmp) == before  # nothing committed, no stray file
    assert blocker.read_text() == "not a directory\n"


@pytest.mark.bad_input
def test_results_key_into_a_file_that_is_not_a_json_object(world, capsys):
    tmp, config, _ = world
    target = tmp / "results.json"
    target.write_text("[1, 2]\n")
    code, err, elapsed = cli(capsys, ["base", "--config", config, "--results", str(target),
                                      "--results-key", "smoke", *NT])
    assert_one_line(code, err, "base", "--results", str(target), "JSON object")
    assert elapsed < 1.0 and target.read_text() == "[1, 2]\n"


@pytest.mark.bad_input
def test_artifact_root_from_the_config_is_checked_too(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(flowrl.stages.base, "run_base", lambda *a, **k: pytest.fail("work started"))
    config = write_config(tmp_path, run={"artifact_root": "/proc/flowrl-root", "name": "smoke", "seed": 0,
                                         "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    code, err, _ = cli(capsys, ["base", "--config", str(config), *NT])
    assert_one_line(code, err, "base", "run.artifact_root", "/proc/flowrl-root")


# ------------------------------------------------------------------ the real process: exit status, stderr


def _flowrl(*argv: str, code: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-c", code, *argv] if code else [sys.executable, "-m", "flowrl.cli", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120, cwd=ROOT)


@pytest.mark.bad_input
def test_process_exit_status_and_stderr_of_a_user_error(tmp_path):
    config = write_config(tmp_path)
    done = _flowrl("base", "--config", str(config), "--output", "/proc/flowrl-x", *NT)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()  # nothing else either: no log line comes before the check
    assert len(lines) == 1 and lines[0].startswith("flowrl base: error: --output /proc/flowrl-x: "), done.stderr
    assert done.stdout == ""


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(flowrl.stages.base, "run_base", broken)
    with pytest.raises(ZeroDivisionError):
        main(["base", "--config", str(write_config(tmp_path)), *NT])


def test_a_bug_keeps_its_traceback_in_the_process(tmp_path):
    script = ("import sys, flowrl.stages.base as b\n"
              "def broken(*a, **k):\n    return 1 / 0\n"
              "b.run_base = broken\n"
              "from flowrl.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    done = _flowrl("base", "--config", str(write_config(tmp_path)), *NT, code=script)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr and "ZeroDivisionError" in done.stderr


# ------------------------------------------------------------------ the Flyte tasks' boundary


@pytest.mark.bad_input
def test_flyte_task_user_error_is_one_line(tmp_path):
    pytest.importorskip("flytekit")
    from flytekit.types.file import FlyteFile

    from tasks.base import validate_config
    from tasks.launch import FlowRLUserError

    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  seed: x\n")
    with pytest.raises(FlowRLUserError) as caught:
        validate_config(config=FlyteFile(str(bad)))
    assert "run.seed" in str(caught.value) and str(bad) in str(caught.value)
    assert caught.value.__cause__ is None  # no library traceback chained under it


def test_flyte_task_bug_is_not_mapped(tmp_path, monkeypatch):
    pytest.importorskip("flytekit")
    from flytekit.types.file import FlyteFile

    import tasks.base
    from tasks.launch import FlowRLUserError

    def broken(*args, **kwargs):
        return 1 / 0

    monkeypatch.setattr(tasks.base, "load_config", broken)
    with pytest.raises(Exception) as caught:
        tasks.base.validate_config(config=FlyteFile(str(write_config(tmp_path))))
    assert not isinstance(caught.value, FlowRLUserError)
    assert "ZeroDivisionError" in repr(caught.value) or isinstance(caught.value, ZeroDivisionError)
