"""The post-training workflow:
base -> annotate -> reward_model -> filter_prompts (t2i || edit) -> GRPO (t2i || edit) -> OPD -> bench,
with the optional Mix-RL baseline and off-policy OPD ablation switched by config (both benched when they ran)."""

from typing import NamedTuple

from flytekit import conditional, workflow
from flytekit.types.file import FlyteFile

from tasks.annotate import annotate
from tasks.base import base, start_pipeline_run, validate_config
from tasks.bench import bench, finish_pipeline_run
from tasks.filter_prompts import filter_prompts
from tasks.grpo import grpo, grpo_mixed
from tasks.opd import branch_switches, opd, skipped
from tasks.reward_model import reward_model
from tasks.types import StageArtifact

Models = NamedTuple("Models", [
    ("t2i_teacher", StageArtifact), ("edit_teacher", StageArtifact), ("student", StageArtifact),
    ("student_offpolicy", StageArtifact), ("mix_rl", StageArtifact), ("bench", StageArtifact), ("report", str),
])


@workflow
def post_train(config: FlyteFile) -> Models:
    checked = validate_config(config=config)  # one config per stage, each cached on its own sections
    run = start_pipeline_run(config=checked.base)  # the MLflow run every stage's run nests under
    switches = branch_switches(config=checked.opd)
    base_model = base(config=checked.base, parent_run=run)
    annotations = annotate(config=checked.annotate, parent_run=run, base=base_model)
    rewards = reward_model(config=checked.reward_model, parent_run=run, annotations=annotations)
    t2i_prompts = filter_prompts(config=checked.filter_prompts, parent_run=run, task_name="t2i", base=base_model,
                                 reward_model=rewards)
    edit_prompts = filter_prompts(config=checked.filter_prompts, parent_run=run, task_name="edit", base=base_model,
                                  reward_model=rewards)
    t2i = grpo(config=checked.grpo, parent_run=run, task_name="t2i", base=base_model, reward_model=rewards,
               prompts=t2i_prompts)
    edit = grpo(config=checked.grpo, parent_run=run, task_name="edit", base=base_model, reward_model=rewards,
                prompts=edit_prompts)
    student = opd(config=checked.opd, parent_run=run, base=base_model, t2i_teacher=t2i, edit_teacher=edit,
                  t2i_prompts=t2i_prompts, edit_prompts=edit_prompts, states="on_policy")
    offpolicy = (
        conditional("offpolicy_ablation")
        .if_(switches.offpolicy.is_true())
        .then(opd(config=checked.opd, parent_run=run, base=base_model, t2i_teacher=t2i, edit_teacher=edit,
                  t2i_prompts=t2i_prompts, edit_prompts=edit_prompts, states="off_policy"))
        .else_()
        .then(skipped(stage="opd_offpolicy"))
    )
    mix = (
        conditional("mix_rl")
        .if_(switches.mix_rl.is_true())
        .then(grpo_mixed(config=checked.grpo, parent_run=run, base=base_model, reward_model=rewards,
                         t2i_prompts=t2i_prompts, edit_prompts=edit_prompts))
        .else_()
        .then(skipped(stage="grpo_mixed"))
    )
    benched = bench(config=checked.bench, parent_run=run, base=base_model, t2i_teacher=t2i, edit_teacher=edit,
                    mix_rl=mix, student=student, student_offpolicy=offpolicy, reward_model=rewards)
    report = finish_pipeline_run(config=checked.bench, parent_run=run, bench=benched,
                                 outputs=[base_model, annotations, rewards, t2i_prompts, edit_prompts, t2i, edit, mix,
                                          student, offpolicy])
    return Models(t2i_teacher=t2i, edit_teacher=edit, student=student, student_offpolicy=offpolicy, mix_rl=mix,
                  bench=benched, report=report)
