"""The post-training workflow: base -> annotate -> reward_model -> (later stages join here)."""

from flytekit import workflow
from flytekit.types.file import FlyteFile

from tasks.annotate import annotate
from tasks.base import base, validate_config
from tasks.reward_model import reward_model
from tasks.types import StageArtifact


@workflow
def post_train(config: FlyteFile) -> StageArtifact:
    checked = validate_config(config=config)
    base_model = base(config=checked)
    annotations = annotate(config=checked, base=base_model)
    return reward_model(config=checked, annotations=annotations)
