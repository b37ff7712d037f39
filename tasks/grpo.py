"""Flyte task for stages `grpo_t2i` / `grpo_edit`.

A retry resumes from the run's newest complete checkpoint (the artifact
store holds them), so a preempted pod loses at most ``grpo.checkpoint_every``
iterations.
"""

from flytekit import Resources, task
from flytekit.types.file import FlyteFile

from flowrl.config import load_config
from flowrl.stages.common import flat_metrics
from flowrl.stages.grpo import run_grpo
from tasks.types import StageArtifact


@task(requests=Resources(cpu="2", mem="8Gi"), retries=2)
def grpo(
    config: FlyteFile, task_name: str, base: StageArtifact, reward_model: StageArtifact, prompts: StageArtifact
) -> StageArtifact:
    result = run_grpo(
        load_config(config.download()), task_name, base.uri, reward_model.uri, prompts.uri,
        resume=True, progress=False,
    )
    return StageArtifact(
        stage=result.stage, version=result.version, uri=result.uri,
        mlflow_run_id=result.run_id or "", metrics=flat_metrics(result.metrics),
    )
