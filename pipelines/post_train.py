"""The post-training workflow: base -> (later stages join here, in order)."""

from flytekit import workflow
from flytekit.types.file import FlyteFile

from tasks.base import base, validate_config
from tasks.types import StageArtifact


@workflow
def post_train(config: FlyteFile) -> StageArtifact:
    checked = validate_config(config=config)
    return base(config=checked)
