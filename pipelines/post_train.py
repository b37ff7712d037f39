"""The post-training workflow:
base -> annotate -> reward_model -> filter_prompts (t2i || edit) -> GRPO (t2i || edit) -> OPD -> bench,
with the optional Mix-RL baseline and off-policy OPD ablation switched by config (both benched when they ran).

With ``pipeline.annotation_rounds: 2`` GRPO runs in two rounds around a second annotation round:
GRPO round 1 (grpo.round1_iterations) -> annotate (the round-1 policies' samples, added to the first
round's rows) -> reward_model refreshed from the first round's -> GRPO round 2 from the round-1
weights (the rest of grpo.loop.iterations); OPD, the bench and the report read round 2's teachers
and reward models. Mix-RL, the baseline trained from the base on both tasks, is scored by the final
reward models (the refreshed ones with two rounds): it gets no annotation round of its own samples."""

from typing import NamedTuple

from flytekit import conditional, workflow
from flytekit.types.file import FlyteFile

from tasks.annotate import annotate, annotate_policies, annotation_rounds, passed_on
from tasks.base import base, fail_pipeline_run, start_pipeline_run, validate_config
from tasks.bench import bench, finish_pipeline_run
from tasks.filter_prompts import filter_prompts
from tasks.grpo import grpo, grpo_continued, grpo_mixed
from tasks.opd import branch_switches, opd, skipped
from tasks.reference import artifact_at
from tasks.reward_model import reward_model, reward_model_refresh
from tasks.types import StageArtifact

Models = NamedTuple("Models", [
    ("t2i_teacher", StageArtifact), ("edit_teacher", StageArtifact), ("student", StageArtifact),
    ("student_offpolicy", StageArtifact), ("mix_rl", StageArtifact), ("bench", StageArtifact), ("report", str),
])


@workflow(on_failure=fail_pipeline_run)  # ends the execution's MLflow runs still RUNNING as FAILED
def post_train(config: FlyteFile) -> Models:
    checked = validate_config(config=config)  # one config per stage, each cached on its own sections
    run = start_pipeline_run(config=checked.base)  # the MLflow run every stage's run nests under
    switches = branch_switches(config=checked.opd)
    rounds = annotation_rounds(config=checked.annotate)
    base_model = base(config=checked.base, parent_run=run)
    annotations = annotate(config=checked.annotate, parent_run=run, base=base_model)
    first_rewards = reward_model(config=checked.reward_model, parent_run=run, annotations=annotations)
    t2i_prompts = filter_prompts(config=checked.filter_prompts, parent_run=run, task_name="t2i", base=base_model,
                                 reward_model=first_rewards)
    edit_prompts = filter_prompts(config=checked.filter_prompts, parent_run=run, task_name="edit", base=base_model,
                                  reward_model=first_rewards)
    # one round: the whole loop; two: its first grpo.round1_iterations
    first_t2i = grpo(config=checked.grpo, parent_run=run, task_name="t2i", base=base_model,
                     reward_model=first_rewards, prompts=t2i_prompts, rl_round=rounds.first_grpo_round)
    first_edit = grpo(config=checked.grpo, parent_run=run, task_name="edit", base=base_model,
                      reward_model=first_rewards, prompts=edit_prompts, rl_round=rounds.first_grpo_round)
    more_annotations = (
        conditional("annotation_round_2")
        .if_(rounds.two.is_true())
        .then(annotate_policies(config=checked.annotate, parent_run=run, base=base_model, previous=annotations,
                                t2i_policy=first_t2i, edit_policy=first_edit))
        .else_()
        .then(skipped(stage="annotate_round2"))
    )
    rewards = (
        conditional("reward_model_refresh")
        .if_(rounds.two.is_true())
        .then(reward_model_refresh(config=checked.reward_model, parent_run=run, annotations=more_annotations,
                                   init=first_rewards))
        .else_()
        .then(passed_on(artifact=first_rewards))
    )
    t2i = (
        conditional("grpo_t2i_round_2")
        .if_(rounds.two.is_true())
        .then(grpo_continued(config=checked.grpo, parent_run=run, task_name="t2i", base=base_model,
                             reward_model=rewards, prompts=t2i_prompts, init=first_t2i))
        .else_()
        .then(passed_on(artifact=first_t2i))
    )
    edit = (
        conditional("grpo_edit_round_2")
        .if_(rounds.two.is_true())
        .then(grpo_continued(config=checked.grpo, parent_run=run, task_name="edit", base=base_model,
                             reward_model=rewards, prompts=edit_prompts, init=first_edit))
        .else_()
        .then(passed_on(artifact=first_edit))
    )
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
                                 outputs=[base_model, annotations, first_rewards, t2i_prompts, edit_prompts, first_t2i,
                                          first_edit, more_annotations, rewards, t2i, edit, mix, student, offpolicy])
    return Models(t2i_teacher=t2i, edit_teacher=edit, student=student, student_offpolicy=offpolicy, mix_rl=mix,
                  bench=benched, report=report)


# ---- one stage alone, on the URIs of earlier artifacts (each a Flyte cache hit when nothing changed) ----

@workflow
def base_stage(config: FlyteFile) -> StageArtifact:
    checked = validate_config(config=config)
    return base(config=checked.base, parent_run="")


@workflow
def annotate_stage(config: FlyteFile, base_uri: str) -> StageArtifact:
    checked = validate_config(config=config)
    return annotate(config=checked.annotate, parent_run="", base=artifact_at(uri=base_uri, expect="base"))


@workflow
def reward_model_stage(config: FlyteFile, annotations_uri: str) -> StageArtifact:
    checked = validate_config(config=config)
    return reward_model(config=checked.reward_model, parent_run="",
                        annotations=artifact_at(uri=annotations_uri, expect="annotate"))


@workflow
def filter_prompts_stage(config: FlyteFile, task_name: str, base_uri: str, reward_model_uri: str) -> StageArtifact:
    checked = validate_config(config=config)
    return filter_prompts(config=checked.filter_prompts, parent_run="", task_name=task_name,
                          base=artifact_at(uri=base_uri, expect="base"),
                          reward_model=artifact_at(uri=reward_model_uri, expect="reward_model"))


@workflow
def grpo_stage(config: FlyteFile, task_name: str, base_uri: str, reward_model_uri: str,
               prompts_uri: str) -> StageArtifact:
    checked = validate_config(config=config)
    return grpo(config=checked.grpo, parent_run="", task_name=task_name, base=artifact_at(uri=base_uri, expect="base"),
                reward_model=artifact_at(uri=reward_model_uri, expect="reward_model"),
                prompts=artifact_at(uri=prompts_uri, expect="filter_prompts"))


@workflow
def opd_stage(config: FlyteFile, base_uri: str, t2i_teacher_uri: str, edit_teacher_uri: str, t2i_prompts_uri: str,
              edit_prompts_uri: str, states: str = "on_policy") -> StageArtifact:
    checked = validate_config(config=config)
    return opd(config=checked.opd, parent_run="", base=artifact_at(uri=base_uri, expect="base"),
               t2i_teacher=artifact_at(uri=t2i_teacher_uri, expect="grpo_"),
               edit_teacher=artifact_at(uri=edit_teacher_uri, expect="grpo_"),
               t2i_prompts=artifact_at(uri=t2i_prompts_uri, expect="filter_prompts"),
               edit_prompts=artifact_at(uri=edit_prompts_uri, expect="filter_prompts"), states=states)


@workflow
def bench_stage(config: FlyteFile, base_uri: str, t2i_teacher_uri: str, edit_teacher_uri: str,
                reward_model_uri: str, mix_rl_uri: str = "", student_uri: str = "",
                student_offpolicy_uri: str = "") -> StageArtifact:
    checked = validate_config(config=config)
    return bench(config=checked.bench, parent_run="", base=artifact_at(uri=base_uri, expect="base"),
                 t2i_teacher=artifact_at(uri=t2i_teacher_uri, expect="grpo_"),
                 edit_teacher=artifact_at(uri=edit_teacher_uri, expect="grpo_"),
                 mix_rl=artifact_at(uri=mix_rl_uri, expect="grpo_mixed", optional=True),
                 student=artifact_at(uri=student_uri, expect="opd", optional=True),
                 student_offpolicy=artifact_at(uri=student_offpolicy_uri, expect="opd_offpolicy", optional=True),
                 reward_model=artifact_at(uri=reward_model_uri, expect="reward_model"))
