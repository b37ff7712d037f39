"""`flowrl` console script: one subcommand per pipeline stage.

Every stage subcommand takes ``--config FILE`` and ``--output DIR_OR_URI``
(the artifact root; default: ``run.artifact_root`` of the config), runs the
stage as a plain function, and prints the committed artifact's URI as its
last line. User errors (bad config, missing artifact) exit with status 2 and
a one-line message, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

from flowrl.config import ConfigError, describe_fields, load_config
from flowrl.models import CheckpointError
from flowrl.rewards.annotations import AnnotationError
from flowrl.storage import ArtifactError

USER_ERRORS = (ConfigError, ArtifactError, CheckpointError, AnnotationError, FileNotFoundError)


def _stage_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--config", required=True, help="scenario YAML (configs/*.yaml)")
    p.add_argument("--output", default=None, help="artifact root, a directory or fsspec URI (default: run.artifact_root)")
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
    _stage_parser(sub, "base", "pretrain the shapes model, or validate Qwen-Image weights")
    p = _stage_parser(sub, "annotate", "build the annotation datasets (simulated annotators on the shapes world)")
    p.add_argument("--base", required=True, metavar="URI", help="the base stage's artifact")
    p = _stage_parser(sub, "reward-model", "train the reward models on the annotation datasets")
    p.add_argument("--annotations", required=True, metavar="URI", help="the annotate stage's artifact")
    p = _stage_parser(sub, "filter-prompts", "keep the prompts whose base-model rewards spread within a group")
    p.add_argument("--task", required=True, choices=("t2i", "edit"))
    p.add_argument("--base", required=True, metavar="URI", help="the base stage's artifact")
    p.add_argument("--reward-model", required=True, metavar="URI", help="the reward_model stage's artifact")
    p = _stage_parser(sub, "grpo", "GRPO from the base model on the curated prompts of one task")
    p.add_argument("--task", required=True, choices=("t2i", "edit"))
    p.add_argument("--base", required=True, metavar="URI", help="the base stage's artifact")
    p.add_argument("--reward-model", required=True, metavar="URI", help="the reward_model stage's artifact")
    p.add_argument("--prompts", required=True, metavar="URI", help="the filter_prompts stage's artifact of the task")
    p.add_argument("--resume", action="store_true", help="continue from the run's newest complete checkpoint")
    v = sub.add_parser("validate", help="check a config file and exit")
    v.add_argument("--config", required=True)
    sub.add_parser("config-doc", help="print every config key with its default and meaning")
    return parser


def _tracker(args):
    from flowrl.tracking import NullTracker

    return NullTracker() if args.no_tracking else None


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except USER_ERRORS as exc:
        print(f"flowrl {args.command}: error: {exc}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.command == "config-doc":
        for key, default, doc in describe_fields():
            print(f"{key} = {default}\n    {doc}")
        return 0
    config = load_config(args.config)
    if args.command == "validate":
        print(f"{args.config}: ok")
        return 0
    start = time.perf_counter()
    if args.command == "base":
        from flowrl.stages.base import run_base

        result = run_base(config, output_root=args.output, tracker=_tracker(args), progress=not args.no_progress)
    elif args.command == "annotate":
        from flowrl.stages.annotate import run_annotate

        result = run_annotate(config, args.base, output_root=args.output, tracker=_tracker(args))
    elif args.command == "reward-model":
        from flowrl.stages.reward_model import run_reward_model

        result = run_reward_model(config, args.annotations, output_root=args.output, tracker=_tracker(args))
    elif args.command == "filter-prompts":
        from flowrl.stages.filter_prompts import run_filter_prompts

        result = run_filter_prompts(config, args.task, args.base, args.reward_model,
                                    output_root=args.output, tracker=_tracker(args))
    elif args.command == "grpo":
        from flowrl.rl.distributed import dist_info, init_from_env, shutdown
        from flowrl.stages.grpo import run_grpo

        init_from_env()  # under torchrun: join the process group; each rank trains on its share
        try:
            result = run_grpo(config, args.task, args.base, args.reward_model, args.prompts, output_root=args.output,
                              tracker=_tracker(args), resume=args.resume, progress=not args.no_progress)
        finally:
            shutdown()
        if dist_info()[0] != 0:
            return 0
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


def machine_info() -> dict[str, object]:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }


def write_results(path: str, args, result, wall_s: float) -> None:
    """A committed results file: the stage's metrics.json plus how it was made."""
    from flowrl.storage import read_manifest

    manifest = read_manifest(result.uri)
    payload = {
        "config_hash": manifest.config_hash,
        "command": " ".join(["flowrl", *sys.argv[1:]]),
        "code_version": manifest.code_version,  # what made the artifact (the source may change mid-run)
        "version": result.version,
        "reused": result.reused,
        "artifact_uri": result.uri,
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
