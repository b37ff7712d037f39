"""Pipeline stages as plain functions: config + input artifact URIs in,
one committed artifact out. The CLI and the Flyte tasks both call these."""

from flowrl.stages.common import StageResult

__all__ = ["StageResult"]
