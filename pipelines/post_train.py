"""The post-training workflow:
base -> annotate -> reward_model -> filter_prompts (t2i || edit) -> GRPO (t2i || edit)
-> (later stages join here)."""

from typing import NamedTuple

from flytekit import workflow
from flytekit.types.file import FlyteFile

from tasks.annotate import annotate
from tasks.base import base, validate_config
from tasks.filter_prompts import filter_prompts
from tasks.grpo import grpo
from tasks.reward_model import reward_model
from tasks.types import StageArtifact

Teachers = NamedTuple("Teachers", [("t2i", StageArtifact), ("edit", StageArtifact)])


@workflow
def post_train(config: FlyteFile) -> Teachers:
    checked = validate_config(config=config)
    base_model = base(config=checked)
    annotations = annotate(config=checked, base=base_model)
    rewards = reward_model(config=checked, annotations=annotations)
    t2i_prompts = filter_prompts(config=checked, task_name="t2i", base=base_model, reward_model=rewards)
    edit_prompts = filter_prompts(config=checked, task_name="edit", base=base_model, reward_model=rewards)
    t2i = grpo(config=checked, task_name="t2i", base=base_model, reward_model=rewards, prompts=t2i_prompts)
    edit = grpo(config=checked, task_name="edit", base=base_model, reward_model=rewards, prompts=edit_prompts)
    return Teachers(t2i=t2i, edit=edit)
