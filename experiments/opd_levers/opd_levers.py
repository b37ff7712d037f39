"""OPD variants on the shapes world: the stage's cost against what the student keeps.

Not a test: it measures, it does not assert. From the repository root, with the
base, the two GRPO teachers and both curated prompt sets of one chain:

    .venv/bin/python -m experiments.opd_levers.opd_levers --base URI --teacher t2i_teacher=URI \\
        --teacher edit_teacher=URI --prompts t2i=URI edit=URI --output experiments/opd_levers/results/opd_levers.json

Issue 6 gives OPD 8 minutes on 2 CPU cores. An iteration of the config as it
was shipped until 2026-12-05 (32 prompts, the deployment sampler's 20 ODE
steps with CFG, K = 4 matched states per trajectory on both CFG branches) cost
about 1.5 s of rollouts and 1.1 s of teacher + student passes at 2 threads, so
200 iterations alone were over the budget. Each variant changes only the
``opd`` keys named below:

* ``config``: the ``opd`` section the table varies: configs/shapes.yaml's as
  it was when the table was made (K = 4; :data:`LEVERS_BASE` pins it, so the
  table measures the same runs whatever the shipped section is now);
* ``rollout_10steps``: the student's trajectories with 10 ODE steps instead of
  20 (the states lie on the same guided ODE, more coarsely; rollouts cost half);
* ``match_2states``: K = 2 matched states per trajectory instead of 4 (the
  N / K scaling keeps the loss unbiased; the passes cost half);
* ``rollout_10steps_match_2states``: both.

Each run writes a normal opd artifact under ``--artifacts``; the table holds,
per variant, the judge's scores of the student on the held-out sets, the share
of each teacher's gain it kept, the monitor curve, and the stage's training and
total wall time (``train_s``, ``wall_s``: sampling, updates, monitor, the final
judge; not the process start). ``--threads`` sets torch's threads (issue 6's
budget is read at 2, one variant at a time, nothing else running).

``--pipeline VARIANT`` runs that variant instead as the pipeline does:
`pyflyte run pipelines/post_train.py opd_stage` on the same inputs, the OPD
task in its Elastic worker, with artifacts and tracking in a temporary
directory (so nothing is reused). It records the command's wall time (Python
and Flyte start-up, the worker's spawn, loading, training, the final judge) and
the stage's own ``train_s`` / ``wall_s``, under the table's ``pipeline`` key.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from experiments.grpo_ablations.grpo_ablations import _merge, _parse_sets, with_section
from flowrl.config import load_config, name_value_pairs
from flowrl.machine import machine_info
from flowrl.models import set_torch_threads
from flowrl.stages.opd import HEADLINE, SECTIONS, TASKS, judge_metrics, run_opd
from flowrl.storage import fetch
from flowrl.tracking import NullTracker

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = {
    "config": {},
    "rollout_10steps": {"num_steps": 10},
    "match_2states": {"timesteps": {"per_trajectory": 2}},
    "rollout_10steps_match_2states": {"num_steps": 10, "timesteps": {"per_trajectory": 2}},
}
TABLES = {"levers": VARIANTS}
# The opd keys each table's variants are applied over (then the variant's own): the levers table was made on the
# section with K = 4 matched states, before the shipped config took ``match_2states`` (K = 2).
LEVERS_BASE = {"timesteps": {"per_trajectory": 4}}
TABLE_BASE = {"levers": LEVERS_BASE}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--teacher", action="append", required=True, metavar="NAME=URI")
    parser.add_argument("--prompts", nargs=2, required=True, metavar="TASK=URI")
    parser.add_argument("--config", default=str(ROOT / "configs" / "shapes.yaml"))
    parser.add_argument("--table", default="levers", choices=list(TABLES))
    parser.add_argument("--variants", nargs="+", default=None, help="a subset of the table's variants")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an opd key for every variant")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--output", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: run.torch_threads)")
    parser.add_argument("--pipeline", default=None, metavar="VARIANT",
                        help="run this variant through `pyflyte run pipelines/post_train.py opd_stage` instead")
    args = parser.parse_args(argv)
    config = with_section(load_config(args.config), "opd", TABLE_BASE[args.table])
    teachers = dict(name_value_pairs(args.teacher, "--teacher", "NAME=URI"))
    prompts = dict(name_value_pairs(args.prompts, "--prompts", "TASK=URI"))
    if set(prompts) != set(TASKS):
        raise SystemExit(f"--prompts: give t2i=URI edit=URI, got {sorted(prompts)}")
    specs = TABLES[args.table]
    names = args.variants or list(specs)
    unknown = sorted(set(names) - set(specs))
    if unknown:
        raise SystemExit(f"--variants: {unknown} not in the {args.table} table ({sorted(specs)})")
    common = _parse_sets(args.set)
    for name in names:
        clash = sorted(set(common) & set(specs[name]))
        if clash:
            raise SystemExit(f"--set {', '.join(clash)}: the variant {name} sets it itself (it is what the variant varies)")
    if args.pipeline is not None:
        if args.pipeline not in specs:
            raise SystemExit(f"--pipeline: {args.pipeline!r} not in the {args.table} table ({sorted(specs)})")
        return _pipeline_run(args, config, {**common, **specs[args.pipeline]}, teachers, prompts)
    if args.threads is not None:
        set_torch_threads(args.threads)
    base = judge_metrics(fetch(args.base))
    judged = {name: judge_metrics(fetch(uri)) for name, uri in teachers.items()}
    table = {}
    for name in names:
        keys = {**common, **specs[name]}
        variant = with_section(config, "opd", keys)
        if args.threads is not None:
            variant = with_section(variant, "run", {"torch_threads": args.threads})
        result = run_opd(variant, args.base, teachers, prompts, output_root=args.artifacts, tracker=NullTracker(),
                         progress=False)
        m = result.metrics
        student = m["student"]
        table[name] = {
            "opd": keys,
            "judge": student,
            "deltas": {task: student[HEADLINE[task]] - base[HEADLINE[task]] for task in TASKS},
            "fidelity_delta": student["fidelity"] - base["fidelity"],
            "gain_kept": m["gain_kept"],
            "final_loss": m["final_loss"],
            "monitor": [(e["iteration"], e["t2i"], e["edit"]) for e in m["monitor"]],
            "train_s": m["train_s"],
            "wall_s": m["wall_s"],
            "threads": variant.run.torch_threads,
            "reused": result.reused,
            "artifact": result.uri,
        }
        print(json.dumps({name: table[name]}, indent=1), flush=True)
    payload = {
        "config_hash": config.section_hash(*SECTIONS),
        "shared_config_hash": config.section_hash(*(s for s in SECTIONS if s != "opd")),
        "opd_config": dataclasses.asdict(config.opd),  # what every variant's keys are applied to
        "table": args.table,
        "command": " ".join(["python -m experiments.opd_levers.opd_levers", *(argv if argv is not None else sys.argv[1:])]),
        "base": base,
        "teachers": judged,
        "inputs": {"base": args.base, "teachers": teachers, "prompts": prompts},
        "variants": table,
        "machine": machine_info(),
    }
    if args.output:
        _merge(Path(args.output), args.table, payload)
    return payload


def _pipeline_run(args, config, keys: dict, teachers: dict, prompts: dict) -> dict:
    """The variant through `pyflyte run ... opd_stage`, timed, into the table's ``pipeline`` entry."""
    if set(teachers) != {"t2i_teacher", "edit_teacher"}:
        raise SystemExit(f"--pipeline: the pipeline's teachers are t2i_teacher and edit_teacher, got {sorted(teachers)}")
    data = yaml.safe_load(Path(args.config).read_text())
    data.setdefault("opd", {}).update({**TABLE_BASE[args.table], **keys})
    if args.threads is not None:
        data["run"]["torch_threads"] = args.threads
    with_section(config, "opd", keys)  # the keys are checked like a config file's before anything starts
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # a user's shell, as `make run` has it
    with tempfile.TemporaryDirectory(prefix="flowrl-opd-pipeline-") as tmp:
        tmp = Path(tmp)
        data["run"]["artifact_root"] = str(tmp / "artifacts")
        data["run"]["tracking_uri"] = f"sqlite:///{tmp / 'mlflow.db'}"
        path = tmp / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        env["HOME"] = str(tmp / "home")
        command = [str(Path(sys.executable).with_name("pyflyte")), "run", "pipelines/post_train.py", "opd_stage",
                   "--config", str(path), "--base_uri", args.base, "--t2i_teacher_uri", teachers["t2i_teacher"],
                   "--edit_teacher_uri", teachers["edit_teacher"], "--t2i_prompts_uri", prompts["t2i"],
                   "--edit_prompts_uri", prompts["edit"]]
        start = time.perf_counter()
        proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"pyflyte run ... opd_stage failed (exit {proc.returncode})")
        runs = sorted((tmp / "artifacts" / "opd").glob("*/metrics.json"))
        if len(runs) != 1:
            raise SystemExit(f"expected one opd artifact under {tmp / 'artifacts' / 'opd'}, found {len(runs)}")
        metrics = json.loads(runs[0].read_text())
    entry = {"variant": args.pipeline, "opd": keys, "command_wall_s": round(wall, 1), "train_s": metrics["train_s"],
             "wall_s": metrics["wall_s"], "threads": data["run"].get("torch_threads"), "student": metrics["student"],
             "machine": machine_info()}
    print(json.dumps({"pipeline": entry}, indent=1), flush=True)
    if args.output:
        _add_pipeline_entry(Path(args.output), args.table, entry)
    return entry


def _add_pipeline_entry(path: Path, table: str, entry: dict) -> None:
    import fcntl

    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {}
        data.setdefault(table, {})["pipeline"] = entry
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
