"""Studies of the project, each in its own folder (script, make fragment ``study.mk``, results, notes and the
checks of its results, run by ``make experiments-test``). Nothing in flowrl/ imports from here."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def provenance(module: str, argv: list[str] | None) -> dict:
    """The ``command`` that made a results file (``python -m MODULE ARGS``) and the ``machine`` it ran on."""
    from flowrl.machine import machine_info

    return {"command": " ".join([f"python -m {module}", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine_info()}


def write_result(path: str | Path, result: dict) -> None:
    """``result`` as sorted, indented JSON at ``path`` (its folder made if missing)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
