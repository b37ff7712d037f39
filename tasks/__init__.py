"""Flyte tasks: thin typed wrappers around flowrl.stages."""

import sys
from pathlib import Path

# The Elastic plugin (GRPO, OPD) starts its workers with the "spawn" method: each is a fresh interpreter
# that takes the parent's sys.path and unpickles the task by module name, ``tasks.<stage>``. `pyflyte run`
# puts the project root on sys.path only while it loads the workflow file and then removes that entry, so
# the workers could not import this package. A second, lasting entry (at the end, so it shadows nothing)
# keeps the root importable. Runs once per process: Python imports a package once.
sys.path.append(str(Path(__file__).resolve().parent.parent))
