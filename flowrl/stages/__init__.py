"""Pipeline stages as plain functions: config + input artifact URIs in,
one committed artifact out. The CLI and the Flyte tasks both call these.

The package imports nothing heavy itself, so the stage registry (flowrl/stages/registry.py, standard
library only) loads without torch."""

__all__ = ["StageResult"]


def __getattr__(name: str):
    if name == "StageResult":
        from flowrl.stages.common import StageResult

        return StageResult
    raise AttributeError(f"module 'flowrl.stages' has no attribute {name!r}")
