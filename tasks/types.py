"""Typed values that flow between Flyte tasks."""

from dataclasses import dataclass, field

from flowrl.stages.common import flat_metrics


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

    @classmethod
    def of(cls, result) -> "StageArtifact":
        """The reference to a stage's committed result (:class:`flowrl.stages.common.StageResult`)."""
        return cls(stage=result.stage, version=result.version, uri=result.uri,
                   mlflow_run_id=result.run_id or "", metrics=flat_metrics(result.metrics))
