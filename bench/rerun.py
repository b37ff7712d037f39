"""Benchmark of a rerun with nothing changed: `pyflyte run ... post_train` twice.

Not a test: it measures, it does not assert. Run from the repository root:

    .venv/bin/python -m bench.rerun --output results/rerun_bench.json [--config configs/smoke.yaml]
    .venv/bin/python -m bench.rerun --in-place --config configs/shapes.yaml --output results/rerun_shapes.json

Both runs go through the `pyflyte` command line, as `make run` does, with a
Flyte local cache, an artifact root and an MLflow store of their own (a
temporary HOME and directory). The first run trains every stage; the second
finds every stage in Flyte's cache and only runs the uncached bookkeeping
tasks (config check, the pipeline's MLflow run, the check that every output
still exists). The second run's time does not depend on the model's size, so
the smoke config stands in for configs/shapes.yaml, whose first run takes
hours on 2 cores. Which stages ran is read from MLflow (stage runs nested
under each pipeline run).

``--in-place`` times one more run of a config as it stands, with its own
artifact root and tracking store and the user's Flyte cache (~/.flyte): run
right after a completed `make run`, it is the second `make run` of that
config, nothing changed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from flowrl.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]


def _stages_of_last_pipeline(tracking_uri: str) -> list[str]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if r.data.tags.get("flowrl.stage") == "pipeline").info.run_id
    return sorted(r.data.tags["flowrl.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--output", default="results/rerun_bench.json")
    parser.add_argument("--in-place", action="store_true",
                        help="one run of the config as it stands (after a completed `make run` of it)")
    args = parser.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a user's shell, as `make run` has it
    if args.in_place:
        data = yaml.safe_load((ROOT / args.config).read_text())
        run = _timed_run(args.config, env, data["run"]["tracking_uri"], "again")
        return 1 if run is None else _write(args, [run])
    with tempfile.TemporaryDirectory(prefix="flowrl-rerun-") as tmp:
        tmp = Path(tmp)
        data = yaml.safe_load((ROOT / args.config).read_text())
        data["run"]["artifact_root"] = str(tmp / "artifacts")
        data["run"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
        config = tmp / "config.yaml"
        config.write_text(yaml.safe_dump(data))
        env["HOME"] = str(tmp / "home")
        runs = []
        for attempt in ("first", "second"):
            runs.append(_timed_run(str(config), env, data["run"]["tracking_uri"], attempt))
            if runs[-1] is None:
                return 1
    return _write(args, runs)


def _timed_run(config: str, env: dict[str, str], tracking_uri: str, name: str) -> dict | None:
    """One `pyflyte run ... post_train`: its wall time and the stages that ran (None when it failed)."""
    pyflyte = str(Path(sys.executable).with_name("pyflyte"))
    start = time.perf_counter()
    proc = subprocess.run([pyflyte, "run", "pipelines/post_train.py", "post_train", "--config", config],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        return None
    run = {"run": name, "wall_s": round(wall, 1), "stages_run": _stages_of_last_pipeline(tracking_uri)}
    print(f"{name} run: {wall:.1f} s, stages run: {run['stages_run']}", flush=True)
    return run


def _write(args, runs: list[dict]) -> int:
    result = {
        "config": args.config,
        "runs": runs,
        "machine": {**machine_info(), "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
