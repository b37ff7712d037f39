"""bench/gpu_check.py (`make gpu-check`), prepared on the CPU: it runs its checks in their own
processes, records each one's outcome, and fails when one fails. The GPU run itself needs a
lent GPU machine (`--device cuda`)."""

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

# a production-path test that needs no trained upstream (the fast one), in bfloat16 on the CPU
FAST = "held_out_rows_stay_held_out_when_the_file_grows"


def _check(tmp_path, *flags):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--output", str(out), *flags],
                          cwd=ROOT, capture_output=True, text=True)
    return proc, (json.loads(out.read_text()) if out.is_file() else None)


def test_the_check_records_each_part_and_passes(tmp_path):
    proc, result = _check(tmp_path, "--skip", "memory", "--path-select", FAST)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (path,) = result["checks"]
    assert path["name"] == "production_path" and path["ok"] and path["dtype"] == "bfloat16"
    assert "1 passed" in path["summary"]
    assert result["machine"]["device"] == "cpu" and result["ok"]


def test_a_failing_check_fails_the_run(tmp_path):
    proc, result = _check(tmp_path, "--skip", "memory", "--path-select", "no_such_test_anywhere")
    assert proc.returncode == 1 and result["ok"] is False and result["checks"][0]["ok"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the no-GPU message does not apply")
def test_no_gpu_is_said_before_anything_runs(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--output", str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "no CUDA device is visible" in proc.stderr
    assert not out.exists()
