"""``python -m tasks.package --config FILE --output flyte-package.tgz``: the workflow's remote bundle
(``pyflyte package``), every task launched as FILE's ``launch`` section says (``make package
CONFIG=FILE``). Offline: the memory planner reads the component sizes from the weights' config files
or the specs shipped with flowrl, never from a model hub."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.package", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the scenario YAML whose launch section the tasks get")
    parser.add_argument("--output", default="flyte-package.tgz", help="the bundle to write")
    parser.add_argument("--fast", action="store_true", help="a fast-registration bundle (code shipped beside it)")
    args = parser.parse_args(argv)

    from flowrl.config import ConfigError, load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if config.launch.registry is None:
        print(f"error: {args.config}: launch.registry: a bundle names its images; set the registry `make images "
              "PUSH=1` pushed to", file=sys.stderr)
        return 2
    import tasks.launch

    if "tasks.grpo" in sys.modules:  # the task modules read the registration's config once, on import
        raise RuntimeError("tasks.package must run before any task module is imported")
    tasks.launch.use_config(args.config)
    tasks.launch.REGISTRATION = tasks.launch.Registration(config)
    from flytekit.clis.sdk_in_container.pyflyte import main as pyflyte

    pyflyte_args = ["--pkgs", "pipelines", "package", "--output", args.output, "--force"]
    if args.fast:
        pyflyte_args.append("--fast")
    try:
        pyflyte.main(pyflyte_args, standalone_mode=False)
    except ValueError as exc:  # a planner or launch error while the task modules are imported
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
