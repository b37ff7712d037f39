"""Flyte task for stage `reward_model`."""

from flytekit import Resources, task
from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from flowrl.stages.common import flat_metrics
from flowrl.stages.reward_model import run_reward_model
from tasks.types import StageArtifact


@task(requests=Resources(cpu="2", mem="8Gi"), retries=1)
def reward_model(config: FlyteFile, annotations: StageArtifact) -> StageArtifact:
    result = run_reward_model(load_config(config.download()), annotations.uri)
    return StageArtifact(
        stage=result.stage, version=result.version, uri=result.uri,
        mlflow_run_id=result.run_id or "", metrics=flat_metrics(result.metrics),
    )
