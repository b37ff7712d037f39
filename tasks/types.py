"""Typed values that flow between Flyte tasks."""

from dataclasses import dataclass, field


@dataclass
class StageArtifact:
    """A committed stage output.

    The bytes live in flowrl's artifact store at ``uri`` (write-once, manifest
    written last); Flyte passes this reference between tasks. ``version`` is
    content-derived: the same config, code and inputs give the same URI.
    """

    stage: str
    version: str
    uri: str
    mlflow_run_id: str
    metrics: dict[str, float] = field(default_factory=dict)
