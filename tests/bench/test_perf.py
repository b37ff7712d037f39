"""bench/perf.py: every key of results/perf.json is written, parts merge, and its helpers measure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch

from bench import perf
from flowrl.config import load_config

TINY_MICRO = ["--config", "configs/smoke.yaml", "--batch", "4", "--repeats", "1", "--matmul-sizes", "64",
              "--qwen-size", "32", "--qwen-steps", "2", "--qwen-batch", "1", "--reward-iterations", "1",
              "--reward-delay-s", "0.05"]


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.slow  # about 30 s of CPU: every measurement once, at tiny sizes
def test_micro_part_writes_every_key_and_keeps_other_parts(tmp_path):
    output = tmp_path / "perf.json"
    output.write_text(json.dumps({"make_run_cold_s": 12.5, "stages": {"base": 3.0}}))
    threads = torch.get_num_threads()
    try:
        data = perf.main(["--output", str(output), "--parts", "micro", "--threads", "1", *TINY_MICRO])
    finally:
        torch.set_num_threads(threads)  # the script sets this process's threads: the next test gets them back
    assert json.loads(output.read_text()) == data
    assert data["make_run_cold_s"] == 12.5 and data["stages"] == {"base": 3.0}  # another part's keys stay
    for key in ("matmul_peak_gflops", "update_peak_fraction", "reward_latency_ratio"):
        assert positive(data[key]), (key, data[key])
    for model in ("shapes", "qwen_image_tiny"):
        for key in ("rollout_vs_diffusers", "flowrl_images_per_s", "diffusers_images_per_s", "rollout_peak_fraction"):
            assert positive(data[model][key]), (model, key, data[model][key])
        assert data[model]["rollout_vs_diffusers"] == pytest.approx(
            data[model]["flowrl_images_per_s"] / data[model]["diffusers_images_per_s"])
    k_over_n = data["update_k_over_n"]
    smoke = load_config(perf.ROOT / "configs" / "smoke.yaml").grpo  # K and N: the config's, whatever they are
    assert (k_over_n["k"], k_over_n["n"]) == (smoke.timesteps.per_trajectory, smoke.rollout.num_steps)
    assert positive(k_over_n["subset_s"]) and positive(k_over_n["all_s"])
    latency = data["reward_latency"]
    assert latency["iteration_s_delayed"] / latency["iteration_s_no_delay"] == pytest.approx(
        data["reward_latency_ratio"])
    provenance = data["micro_provenance"]
    assert provenance["threads"] == 1 and provenance["machine"]["cpu_count"] >= 1
    assert len(provenance["git"]["commit"]) == 40 and isinstance(provenance["git"]["dirty"], bool)
    assert data["micro_config"] == "configs/smoke.yaml"  # relative to the repository


def test_merge_writes_whole_files_and_refuses_what_is_not_an_object(tmp_path):
    output = tmp_path / "nested" / "perf.json"
    assert perf.merge_into(output, {"a": 1}) == {"a": 1}
    assert perf.merge_into(output, {"b": 2, "a": 3}) == {"a": 3, "b": 2}
    assert json.loads(output.read_text()) == {"a": 3, "b": 2}
    assert [p.name for p in output.parent.iterdir()] == ["perf.json"]  # no temporary file left behind
    assert output.stat().st_mode & 0o777 == 0o644  # readable by all, as a results file is
    output.write_text("[1, 2]")
    with pytest.raises(ValueError, match="perf.json"):
        perf.merge_into(output, {"a": 1})
    output.write_text("{half")
    with pytest.raises(ValueError, match="not JSON"):
        perf.merge_into(output, {"a": 1})
    assert output.read_text() == "{half"  # left as it was


def test_tree_rss_counts_a_grandchild(tmp_path):
    """The sampler sums the tree: a shell whose child holds 200 MiB."""
    ready = tmp_path / "ready"
    child = (f"import pathlib, time; block = bytearray(200 * 2**20); pathlib.Path({json.dumps(str(ready))}).touch(); "
             "time.sleep(3)")
    proc = subprocess.Popen(["bash", "-c", f"{sys.executable} -c '{child}'; true"])
    with perf.TreeRSS(proc.pid, interval_s=0.1) as rss:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        proc.wait(timeout=30)
    assert ready.exists()
    assert rss.peak_bytes > 200 * 2**20


def test_tests_part_times_the_suite_command(tmp_path):
    output = tmp_path / "perf.json"
    data = perf.main(["--output", str(output), "--parts", "tests", "--test-workers", "0",
                      "--test-paths", "tests/test_machine.py"])
    assert positive(data["test_suite_s"])
    assert data["test_suite"]["returncode"] == 0 and "passed" in data["test_suite"]["summary"]
    assert data["test_suite"]["workers"] == "0"
    assert perf.suite_command("2", [])[1:] == ["-m", "pytest", "-m", "not gpu", "-q", "-n", "2", "--dist",
                                               "worksteal"]  # the Makefile's test target


def test_a_failing_suite_is_no_measurement(tmp_path):
    failing = tmp_path / "test_fails.py"
    failing.write_text("def test_fails():\n    assert 1 == 2\n")
    output = tmp_path / "perf.json"
    with pytest.raises(RuntimeError, match="test suite failed"):
        perf.main(["--output", str(output), "--parts", "tests", "--test-workers", "0", "--test-paths", str(failing)])
    assert not output.exists()  # no test_suite_s for a suite that did not pass


@pytest.mark.bad_input
@pytest.mark.parametrize("argv, message", [
    (["--parts", "micro,bogus"], "--parts"),
    (["--config", "configs/no_such.yaml"], "--config"),
    (["--repeats", "0"], "--repeats"),
])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        perf.parse_args(argv)
    assert message in capsys.readouterr().err
