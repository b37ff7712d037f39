"""Typed values that flow between Flyte tasks."""

from dataclasses import dataclass


@dataclass
class StageArtifact:
    """A committed stage output.

    The bytes live in flowrl's artifact store (``uri``, write-once, manifest
    last); Flyte passes this reference. ``version`` is content-derived, so
    Flyte's cache keyed on it is stable across reruns.
    """

    stage: str
    version: str
    uri: str
    mlflow_run_id: str
