"""`flowrl` console script: one subcommand per pipeline stage.

Every stage subcommand takes ``--config FILE`` and ``--output DIR_OR_URI``
(the artifact root; default: ``run.artifact_root`` of the config), runs the
stage as a plain function, and prints the committed artifact's URI as its
last line. User errors (bad config, missing artifact) exit with status 2 and
a one-line message, without a traceback; a training run that cannot go on
(non-finite loss or rewards, the reward server gone) exits with status 1 and
a message naming the iteration and the last good checkpoint.

Before any work, :func:`preflight` checks that every place the command will
write (the artifact root, ``--results``, ``--report-dir``) is writable, and
for an object store that its credentials are found, so a bad path fails in
a second instead of after training. Any other exception is a bug and keeps
its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from flowrl.config import ConfigError, describe_fields, load_config, safe_name
from flowrl.machine import machine_info
from flowrl.models import CheckpointError
from flowrl.prompt_files import PromptFileError
from flowrl.rewards.annotations import AnnotationError
from flowrl.rewards.client import RewardClientError
from flowrl.rl.trainer import TrainingStopped
from flowrl.stages.registry import STAGES, by_command
from flowrl.storage import ArtifactError, url_to_fs
from flowrl.tracking import TrackingUnavailable

USER_ERRORS = (ConfigError, ArtifactError, CheckpointError, AnnotationError, PromptFileError, FileNotFoundError,
               TrackingUnavailable)
# a run that could not go on (exit 1): non-finite loss or rewards, the reward server gone past every retry
RUN_ERRORS = (TrainingStopped, RewardClientError)
# the subcommands that commit artifacts under --output (default run.artifact_root)
STORE_COMMANDS = (*(stage.command for stage in STAGES), "consolidate")


def _stage_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--config", required=True, help="scenario YAML (configs/*.yaml)")
    p.add_argument("--output", default=None, help="artifact root, a directory or fsspec URI (default: run.artifact_root)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override one config key after reading --config (dotted KEY, YAML VALUE, e.g. "
                   "grpo.loop.iterations=400 or 'annotate.degradations=[noise, color_cast]'); repeatable")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    p.add_argument(
        "--results", default=None, metavar="FILE",
        help="also write the metrics, wall time and machine to FILE (results/*.json)",
    )
    p.add_argument(
        "--results-key", default=None, metavar="KEY",
        help="write the results under KEY of FILE, keeping its other keys (one file for several runs)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowrl", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in STAGES:  # one subcommand per stage, its own arguments from the registry
        p = _stage_parser(sub, stage.command, stage.help)
        for arg in stage.cli:
            p.add_argument(arg.flag, **arg.argparse_kwargs())
    p = sub.add_parser("judge", help="the judge's held-out metrics of model artifacts, one results entry per model",
                       description="Evaluate model artifacts (base, grpo, opd) with the shapes judge on the held-out "
                       "sets and write one entry per model to FILE.")
    p.add_argument("--config", required=True, help="scenario YAML (configs/*.yaml)")
    p.add_argument("--model", required=True, action="append", metavar="NAME=URI", help="repeat per model")
    p.add_argument("--results", required=True, metavar="FILE", help="results/*.json to write")
    p = sub.add_parser("plan", help="per-GPU memory of the training stages and the cheapest setting that fits",
                       description="Estimate per-GPU memory of GRPO and OPD for a config (parameter counts from "
                       "the model's config files alone) and pick the cheapest ZeRO / offload / recompute / batch "
                       "setting that fits. Exits 1 (after the table) when a stage fits no setting, 2 on bad "
                       "flags.")
    p.add_argument("--config", required=True, help="scenario YAML (configs/*.yaml)")
    p.add_argument("--gpus", type=int, required=True, help="GPUs in the data-parallel group")
    p.add_argument("--gpu-mem", type=float, required=True, metavar="GIB", help="memory per GPU, GiB (finite, > 0)")
    p.add_argument("--margin", type=float, default=0.15,
                   help="share of memory kept free, in [0, 1) (default 0.15)")
    p = sub.add_parser("lineage", help="the runs and artifacts a model came from, from MLflow alone",
                       description="Print the tree from a run, an artifact URI or a registered model version "
                       "(models:/NAME/VERSION or models:/NAME@ALIAS) back to the base model, from the MLflow "
                       "tracking store alone.")
    p.add_argument("ref", help="run id, artifact URI, or registered model version (models:/NAME/VERSION, "
                   "models:/NAME@ALIAS)")
    p.add_argument("--config", default=None, help="scenario YAML whose run.tracking_uri is read (default, or when "
                   "the config leaves it empty: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    v = sub.add_parser("validate", help="check a config file and exit")
    v.add_argument("--config", required=True)
    sub.add_parser("config-doc", help="print every config key with its default and meaning")
    p = sub.add_parser("consolidate", help="turn a sharded (ZeRO) checkpoint into the full format, offline",
                       description="Assemble the per-rank shards of a ZeRO run's checkpoint into the full format "
                       "(weights, torch AdamW state, EMA) in one CPU process, and commit it under --output with the "
                       "same stage and version: a run resumes from it with any engine and number of ranks.")
    p.add_argument("checkpoint", metavar="CHECKPOINT_URI", help="the sharded checkpoint artifact")
    p.add_argument("--output", required=True, help="artifact root to commit the consolidated checkpoint under "
                   "(a directory or fsspec URI; not the one holding CHECKPOINT_URI)")
    return parser


def _tracker(args):
    from flowrl.tracking import NullTracker

    return NullTracker() if args.no_tracking else None


def main(argv: list[str] | None = None) -> int:
    from flowrl.redact import install_redaction, redact_url

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    install_redaction()  # no credential of a URL in a log line or a traceback
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except USER_ERRORS as exc:
        print(f"flowrl {args.command}: error: {one_line(redact_url(str(exc)))}", file=sys.stderr)
        return 2
    except RUN_ERRORS as exc:  # the run could not go on; no traceback, the message says what is kept
        print(f"flowrl {args.command}: error: {one_line(redact_url(str(exc)))}", file=sys.stderr)
        return 1


def one_line(message: object) -> str:
    """A message on one line (a YAML error spans several)."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _dispatch(args) -> int:
    if args.command == "config-doc":
        for key, default, doc in describe_fields():
            print(f"{key} = {default}\n    {doc}")
        return 0
    if args.command == "lineage":
        return _lineage(args)
    if args.command == "consolidate":
        from flowrl.rl.trainer import consolidate_checkpoint

        preflight(args, None)
        print(consolidate_checkpoint(args.checkpoint, args.output))
        return 0
    config = load_config(args.config, getattr(args, "overrides", ()))
    if args.command == "validate":
        print(f"{args.config}: ok")
        return 0
    named = {flag: _named(*spec) for flag, spec in _named_flags(args).items()}
    preflight(args, config)
    start = time.perf_counter()
    stage = by_command(args.command)
    if stage is not None:
        result = _run_stage(stage, args, config, named)
        if result is None:  # a rank other than 0: one URI on stdout and one results file per run, from rank 0
            return 0
        if getattr(args, "report_dir", None):
            _copy_report(result.uri, Path(args.report_dir))
    elif args.command == "plan":
        from flowrl.planner import plan_table

        if args.gpus < 1:
            raise ConfigError(f"--gpus: a plan needs at least one GPU, got {args.gpus}")
        if not (math.isfinite(args.gpu_mem) and args.gpu_mem > 0):
            raise ConfigError(f"--gpu-mem: GiB per GPU must be a finite number > 0, got {args.gpu_mem}")
        if not 0 <= args.margin < 1:  # false for nan too
            raise ConfigError(f"--margin: the share of GPU memory kept free must be in [0, 1), got {args.margin}")
        table = plan_table(config, args.gpus, args.gpu_mem, args.margin)
        print(table, end="")
        unfit = _unfit_stages(table)
        if unfit:
            print(f"flowrl plan: error: no setting fits {args.gpus} x {args.gpu_mem:g} GiB for "
                  f"{', '.join(unfit)}; use more or larger GPUs, or a smaller --margin", file=sys.stderr)
            return 1
        return 0
    elif args.command == "judge":
        return judge_models(config, named["--model"], args.results)
    else:  # pragma: no cover - argparse restricts the choices
        raise AssertionError(args.command)
    if result.reused:
        print(f"flowrl {args.command}: reusing the complete artifact {result.uri} "
              "(same config, code and inputs)", file=sys.stderr)
    if args.results:
        write_results(args.results, args, result, time.perf_counter() - start)
    print(json.dumps(result.metrics, indent=2, sort_keys=True))
    print(result.uri)
    return 0


def _run_stage(stage, args, config, named: dict[str, dict[str, str]]):
    """Run ``stage`` (:mod:`flowrl.stages.registry`) with the arguments its subcommand parsed; a
    training stage runs in a process group (each rank of torchrun trains its share) and returns
    None on ranks other than 0."""
    kwargs = {}
    for arg in stage.cli:
        if arg.param is None:
            continue
        if arg.flag in named:
            kwargs[arg.param] = named[arg.flag]
        elif arg.kind == "task_uris":
            values = getattr(args, arg.dest)
            if len(values) != 1:
                raise ConfigError(f"{arg.flag}: task {args.task} takes one artifact, got {len(values)}")
            kwargs[arg.param] = values[0]
        else:
            kwargs[arg.param] = getattr(args, arg.dest)
    kwargs.update(output_root=args.output, tracker=_tracker(args))
    if stage.progress:
        kwargs["progress"] = not args.no_progress
    run = stage.run_function()
    if not stage.training:
        return run(config, **kwargs)
    from flowrl.rl.distributed import process_group

    with process_group() as (rank, _):
        result = run(config, **kwargs)
    return result if rank == 0 else None


def _copy_report(uri: str, target: Path) -> None:
    """``--report-dir``: the bench report's files next to the results."""
    from flowrl.stages.bench import report_files

    target.mkdir(parents=True, exist_ok=True)
    for name, data in report_files(uri).items():
        (target / name).write_bytes(data)
    print(f"flowrl bench: report copied to {target / 'report.md'}", file=sys.stderr)


def _unfit_stages(table: str) -> list[str]:
    """The stages (first column) of the rows a plan table marks "does not fit"."""
    return [line.split("|")[1].strip() for line in table.splitlines()
            if line.startswith("|") and "does not fit" in line]


def _lineage(args) -> int:
    """`flowrl lineage REF`: the tree of runs and artifacts behind REF; a registered model reference
    (models:/NAME@ALIAS too) first prints the version it names."""
    from flowrl.lineage import lineage, render, resolve
    from flowrl.tracking import MLflowTracker, check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(load_config(args.config).run.tracking_uri if args.config else "")
    check_reachable(uri)
    tracker = MLflowTracker(uri)
    try:
        ref = args.ref
        if ref.startswith("models:/"):
            version = tracker.model_version(ref)
            if not version.run_id:
                raise LookupError(f"{ref}: model version {version.name}/{version.version} names no run")
            print(f"{ref}: {version.name} version {version.version}, run {version.run_id}")
            ref = version.run_id
        print(render(lineage(tracker, resolve(tracker, ref))), end="")
    except LookupError as exc:  # LineageError too
        raise ConfigError(str(exc)) from None
    return 0


def _named_flags(args) -> dict[str, tuple]:
    """The NAME=URI flags of this command: flag -> :func:`_named`'s arguments."""
    if args.command == "judge":
        return {"--model": (args.model, "--model")}
    stage = by_command(args.command)
    flags = {}
    for arg in stage.cli if stage is not None else ():
        if arg.kind == "named" and getattr(args, arg.dest) is not None:  # an optional one left out: None
            flags[arg.flag] = (getattr(args, arg.dest), arg.flag, *((arg.names,) if arg.names else ()))
        elif arg.kind == "task_uris" and args.task == "mixed":
            flags[arg.flag] = (getattr(args, arg.dest), arg.flag, arg.names)
    return flags


def _named(values: list[str], flag: str, required: tuple[str, ...] = ()) -> dict[str, str]:
    """``["a=URI", ...]`` -> {"a": "URI"}, with errors that name the flag; each NAME a
    :func:`flowrl.config.safe_name` (names become input keys and directories)."""
    out = {}
    for value in values:
        name, sep, uri = value.partition("=")
        if not sep or not name or not uri:
            raise ConfigError(f"{flag}: expected NAME=URI, got {value!r:.200}")
        safe_name(name, f"{flag}: {flag.lstrip('-')} name {name!r:.80}")
        if name in out:
            raise ConfigError(f"{flag}: {name!r} given twice")
        out[name] = uri
    if required and set(out) != set(required):
        raise ConfigError(f"{flag}: expected exactly {' '.join(f'{r}=URI' for r in required)}, got {' '.join(values)}")
    return out


def preflight(args, config) -> None:
    """Before any work: the artifact root (``--output``, else ``run.artifact_root``), ``--results``
    and ``--report-dir`` are writable, so that a bad path costs a second instead of the run; each
    problem a ConfigError naming the flag (or key) and the path."""
    results = getattr(args, "results", None)
    if getattr(args, "results_key", None) and not results:
        raise ConfigError("--results-key: needs --results FILE")
    if results:
        check_results_file(results, "--results", getattr(args, "results_key", None))
    if getattr(args, "report_dir", None):
        check_writable_dir(args.report_dir, "--report-dir")
    if args.command in STORE_COMMANDS:
        root = args.output or config.run.artifact_root
        check_writable_root(root, "--output" if args.output else "run.artifact_root")


def check_writable_root(root: str, flag: str) -> None:
    """An artifact root can take a commit: a local directory that is (or can be made) writable; an
    object store whose protocol is known and whose credentials are found."""
    if "://" not in root or root.startswith("file://"):
        check_writable_dir(root.removeprefix("file://"), flag)
        return
    try:
        fs, path = url_to_fs(root, skip_instance_cache=True)  # fresh: credentials as the environment has them now
    except ArtifactError as exc:
        raise ConfigError(f"{flag} {exc}") from None
    try:
        fs.info(path)
    except FileNotFoundError:
        pass  # a new root: the first commit makes it
    except Exception as exc:
        if isinstance(exc, PermissionError) or "Credentials" in type(exc).__name__:
            raise ConfigError(f"{flag} {root}: the store refuses access or no credentials were found "
                              f"({type(exc).__name__}: {one_line(exc):.200})") from None
        # a store that is unreachable right now: the commit's own retries decide (flowrl.storage)
        logging.getLogger(__name__).warning("%s %s: could not check the store now (%s: %.200s)", flag, root,
                                            type(exc).__name__, exc)


def check_writable_dir(path: str, flag: str) -> None:
    """``path`` is a directory this process can create files in, or can be made one: its nearest
    existing ancestor is a directory that takes a file (a probe file, removed at once). Nothing is
    created otherwise."""
    target = Path(path).expanduser().absolute()
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: not a writable directory ({existing} is not a directory)")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".flowrl-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: not a writable directory ({exc.strerror or type(exc).__name__}"
                          f"{'' if existing == target else f' in {existing}'})") from None


def check_results_file(path: str, flag: str, key: str | None) -> None:
    """A results file can be written (its directory writable, an existing file writable); with
    ``key`` an existing file is a JSON object that the entry is merged into."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"{flag} {path}: is a directory, not a file")
    check_writable_dir(str(target.parent), f"{flag} {path}: its directory")
    if not target.exists():
        return
    try:
        with open(target, "r+b") as handle:  # writable, left as it is
            text = handle.read() if key else b""
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: not writable ({exc.strerror or type(exc).__name__})") from None
    if key:
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise ConfigError(f"{flag} {path}: --results-key {key} merges into a JSON object, and the file "
                              "holds none")


def judge_models(config, models: dict[str, str], path: str) -> int:
    """One entry per model: the judge's held-out metrics of its weights, and the wall time of the stage that made it."""
    from flowrl.evaluation import evaluate_shapes
    from flowrl.models import load_checkpoint, set_torch_threads
    from flowrl.stages.common import relative_uri
    from flowrl.storage import fetch, read_manifest

    set_torch_threads(config.run.torch_threads)
    entries = {}
    if "meta" in models:
        raise ConfigError("--model: the name 'meta' is reserved for the file's metadata")
    for name, uri in models.items():
        local = fetch(uri)
        model = load_checkpoint(local, expected_family="shapes", cfg_renorm=config.sampler.cfg_renorm)
        m = evaluate_shapes(model, config).metrics
        made = json.loads((local / "metrics.json").read_text())
        entries[name] = {
            "artifact_uri": relative_uri(uri),  # a results file names the repository's files relatively
            "stage": read_manifest(uri).stage,
            "t2i_alignment": m["t2i/alignment"],
            "t2i_alignment_per_category": {k.split("/")[-1]: v for k, v in m.items() if k.startswith("t2i/alignment/")},
            "t2i_alignment_stderr": m["t2i/alignment_stderr"],
            "edit_accuracy": m["edit/accuracy"],
            "edit_accuracy_per_kind": {k.split("/")[-1]: v for k, v in m.items() if k.startswith("edit/accuracy/")},
            "edit_accuracy_stderr": m["edit/accuracy_stderr"],
            "identity": m["edit/identity"],
            "fidelity": m["fidelity"],
            "wall_s": made.get("wall_s"),
        }
        print(f"{name}: t2i {entries[name]['t2i_alignment']:.3f}  edit {entries[name]['edit_accuracy']:.3f}  "
              f"identity {entries[name]['identity']:.3f}  fidelity {entries[name]['fidelity']:.3f}")
    meta = {"config_hash": config.section_hash("run.seed", "world", "sampler", "eval"),
            "command": _command_line(), "machine": machine_info()}
    payload = {**entries, "meta": meta}
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return 0


def _command_line() -> str:
    """This run's command line for a results file, with the credentials of any URL in it masked."""
    from flowrl.redact import redact_url

    return redact_url(" ".join(["flowrl", *(_relative_arg(arg) for arg in sys.argv[1:])]))


def _relative_arg(arg: str) -> str:
    """A command-line word with a local path under the working directory made relative to it (also the
    URI of a NAME=URI flag), so a results file holds no checkout's absolute path."""
    from flowrl.stages.common import relative_uri

    name, sep, value = arg.rpartition("=") if "=" in arg and not arg.startswith("-") else ("", "", arg)
    if not value.startswith(("/", "file://")):
        return arg
    return f"{name}{sep}{relative_uri(value)}"


def write_results(path: str, args, result, wall_s: float) -> None:
    """A committed results file: the stage's metrics.json plus how it was made."""
    from flowrl.stages.common import relative_uri
    from flowrl.storage import read_manifest

    manifest = read_manifest(result.uri)
    payload = {
        "config_hash": manifest.config_hash,
        "command": _command_line(),
        "code_version": manifest.code_version,  # what made the artifact (the source may change mid-run)
        "version": result.version,
        "reused": result.reused,
        "artifact_uri": relative_uri(result.uri),
        "wall_s_total": round(wall_s, 1),
        "machine": machine_info(),
        "metrics": result.metrics,
    }
    target = Path(path)
    if getattr(args, "results_key", None):
        merged = json.loads(target.read_text()) if target.is_file() else {}
        merged[args.results_key] = payload
        payload = merged
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
