"""``make gpu-check``: the production path on one CUDA GPU, in at most 8 minutes.

Two checks, each in its own process with its own time budget:

1. ``production_path``: the Qwen-Image production path on tiny components (base reference, VLM
   reward models, prompt filtering, GRPO with a sidecar reward server, ZeRO-2, OPD, bench, LoRA
   adapters) through the stages' own code, on the GPU in bfloat16: the tests of
   ``tests/stages/test_production_path.py`` and ``tests/models/test_qwen_image_lora.py`` with
   ``FLOWRL_CHECK_DTYPE=bfloat16`` (the stages pick the GPU themselves).
2. ``memory``: ``bench.planner_validation``: Qwen-Image's transformer at its real width with a few
   blocks, one GRPO and one OPD iteration with a checkpoint, measured beside the planner's figure.
   It meters host memory (the CPU run); on a GPU this check fails saying so until the validation
   bench has a CUDA meter (``torch.cuda.max_memory_allocated`` against ``platform="cuda"``).

Writes ``results/gpu_check.json`` (what ran, on which device, pass/fail per check, the memory
rows). ``--device cpu`` runs the same on the CPU: how the script is tested where no GPU is lent
(``tests/test_gpu_check.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 8 * 60
PATH_TESTS = ["tests/stages/test_production_path.py", "tests/models/test_qwen_image_lora.py"]


def device_facts(device: str) -> dict:
    import torch

    facts = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("gpu-check: no CUDA device is visible (torch.cuda.is_available() is False); "
                             "run it on a GPU machine, or pass --device cpu to try the script here")
        props = torch.cuda.get_device_properties(0)
        facts.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 1024**3, 1),
                     cuda=torch.version.cuda, bf16=torch.cuda.is_bf16_supported())
    else:
        facts["cpu"] = platform.processor() or platform.machine()
    return facts


def _run(name: str, command: list[str], env: dict[str, str], budget_s: float) -> tuple[dict, str]:
    """Run one check with a deadline; its record and its output."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget_s)
        output, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output = (exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace")
        code = None
    record = {"name": name, "command": " ".join(command[1:]) if command[0] == sys.executable else " ".join(command),
              "ok": code == 0, "exit": code, "timed_out": code is None, "wall_s": round(time.perf_counter() - start, 1)}
    return record, output


def production_path(device: str, budget_s: float, select: str | None) -> dict:
    env = {**os.environ, "FLOWRL_CHECK_DTYPE": "bfloat16", "PYTHONPATH": str(ROOT)}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # the stages' local_device() then picks the CPU
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-m", "not gpu",
               *PATH_TESTS]
    if select:
        command += ["-k", select]
    record, output = _run("production_path", command, env, budget_s)
    summary = re.findall(r"^(?:FAILED|ERROR) .*$", output, re.M)
    counts = re.search(r"(\d+ passed[^\n]*)", output)
    record.update(summary=counts.group(1) if counts else output.strip().splitlines()[-1:],
                  failures=summary[:20], dtype="bfloat16")
    return record


def memory(device: str, budget_s: float, layers: int, heads: int, size: int) -> dict:
    if device == "cuda":
        # bench.planner_validation meters the resident set of CPU processes (VmHWM); on a GPU the meter must be
        # torch.cuda.max_memory_allocated against the planner's estimate(..., platform="cuda"): not built yet
        return {"name": "memory", "ok": False, "exit": None, "timed_out": False, "wall_s": 0.0,
                "error": "no CUDA memory meter in bench.planner_validation yet (it measures host memory)"}
    with tempfile.TemporaryDirectory(prefix="flowrl-gpu-check-") as tmp:
        out = Path(tmp) / "memory.json"
        command = [sys.executable, "-m", "bench.planner_validation", "--processes", "1", "--modes", "lora",
                   "--layers", str(layers), "--heads", str(heads), "--size", str(size), "--output", str(out)]
        record, output = _run("memory", command, {**os.environ, "PYTHONPATH": str(ROOT)}, budget_s)
        if out.is_file():
            record["rows"] = json.loads(out.read_text())["rows"]
        elif not record["ok"]:
            record["error"] = output.strip()[-2000:]
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--output", default="results/gpu_check.json")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole check's time (default 8 min)")
    parser.add_argument("--path-select", default=None, help="pytest -k expression for the production-path tests")
    parser.add_argument("--layers", type=int, default=2, help="transformer blocks of the memory check")
    parser.add_argument("--heads", type=int, default=24, help="attention heads of 128 (24: the real width)")
    parser.add_argument("--size", type=int, default=512, help="image side of the memory check, in pixels")
    parser.add_argument("--skip", nargs="*", default=[], choices=("production_path", "memory"))
    args = parser.parse_args(argv)
    if not (args.budget_s > 0):
        parser.error(f"--budget-s must be positive, got {args.budget_s}")
    output = Path(args.output)
    if not output.parent.is_dir() or not os.access(output.parent, os.W_OK):
        parser.error(f"--output {output}: its folder does not exist or is not writable")
    start = time.perf_counter()
    result = {"machine": device_facts(args.device), "checks": []}
    if "production_path" not in args.skip:
        result["checks"].append(production_path(args.device, args.budget_s * 0.6, args.path_select))
    if "memory" not in args.skip:
        left = args.budget_s - (time.perf_counter() - start)
        result["checks"].append(memory(args.device, max(left, 1.0), args.layers, args.heads, args.size))
    result["ok"] = all(c["ok"] for c in result["checks"])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["command"] = "python -m bench.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:])
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({c["name"]: c["ok"] for c in result["checks"]}), f"-> {output}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
