"""Flyte task for stage `annotate`."""

from flytekit import Resources, task
from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from flowrl.stages.annotate import run_annotate
from flowrl.stages.common import flat_metrics
from tasks.types import StageArtifact


@task(requests=Resources(cpu="2", mem="8Gi"), retries=1)
def annotate(config: FlyteFile, base: StageArtifact) -> StageArtifact:
    result = run_annotate(load_config(config.download()), base.uri)
    return StageArtifact(
        stage=result.stage, version=result.version, uri=result.uri,
        mlflow_run_id=result.run_id or "", metrics=flat_metrics(result.metrics),
    )
