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


def tracker_for(config, parent_run: str):
    """The stage's MLflow tracker, its run nested under the pipeline's run ``parent_run``."""
    from flowrl.tracking import make_tracker

    return make_tracker(config, parent_run_id=parent_run or None)


def image(name: str) -> str:
    """The container image of a task: the image ``name`` given to pyflyte as
    ``--image NAME=REGISTRY/REPO:TAG`` (``make images`` prints those flags;
    ``make package`` passes them). Local runs ignore it."""
    return "{{.image.%s.fqn}}:{{.image.%s.version}}" % (name, name)


# The GPU every GPU task asks for (FLOWRL_ACCELERATOR: a name from flytekit.extras.accelerators).
def _accelerator():
    import os

    from flytekit.extras import accelerators

    name = os.environ.get("FLOWRL_ACCELERATOR", "H100")
    if not hasattr(accelerators, name):
        raise ValueError(f"FLOWRL_ACCELERATOR: {name!r} is not an accelerator of flytekit.extras.accelerators")
    return getattr(accelerators, name)


GPU = _accelerator()
