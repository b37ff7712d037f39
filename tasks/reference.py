"""A Flyte task that turns an artifact URI into the reference the stage tasks
take, so one stage runs alone on the outputs of earlier runs
(``pyflyte run pipelines/post_train.py grpo_stage --base s3://... ...``)."""

import json


from tasks.launch import stage_task
from tasks.types import StageArtifact


@stage_task("default", retries=2)
def artifact_at(uri: str, expect: str, optional: bool = False) -> StageArtifact:
    """The complete artifact at ``uri``; its stage must start with ``expect``
    (``grpo_`` takes either teacher). With ``optional``, an empty ``uri``
    gives the empty reference of a stage left out."""
    import fsspec

    from flowrl.stages.common import flat_metrics
    from flowrl.storage import ArtifactError, file_uri, read_manifest

    if not uri and optional:
        return StageArtifact(stage=expect, version="", uri="", mlflow_run_id="", metrics={})
    if not uri:
        raise ArtifactError(f"an artifact URI of stage {expect} is required")
    uri = uri.rstrip("/")
    manifest = read_manifest(uri)
    if not manifest.stage.startswith(expect):
        raise ArtifactError(f"{uri}: an artifact of stage {manifest.stage}, where {expect}* was expected")
    metrics = {}
    if "metrics.json" in manifest.files:
        with fsspec.open(file_uri(uri, "metrics.json"), "rb") as fh:
            metrics = flat_metrics(json.load(fh))
    return StageArtifact(stage=manifest.stage, version=manifest.version, uri=uri,
                         mlflow_run_id=manifest.extra.get("mlflow_run_id", ""), metrics=metrics)
