"""One stage alone, on the URIs of earlier artifacts: the single-stage
workflows of pipelines/post_train.py, in process and through `pyflyte run`."""

import os
import subprocess
import sys

import pytest
from flytekit.types.file import FlyteFile

from tests.conftest import ROOT, user_env


def _config(upstream) -> str:
    return str(upstream[0] / "config.yaml")


def test_a_stage_workflow_reuses_the_artifact_of_the_same_inputs(upstream):
    from pipelines.post_train import filter_prompts_stage

    _, _, base, rm, prompts = upstream
    out = filter_prompts_stage(config=FlyteFile(_config(upstream)), task_name="t2i", base_uri=base.uri,
                               reward_model_uri=rm.uri)
    assert out.uri == prompts["t2i"].uri and out.stage == "filter_prompts_t2i"
    assert out.metrics  # the stage's metrics travel with the reference


def test_pyflyte_runs_one_stage_from_earlier_uris(upstream, teachers, tmp_path):
    """`pyflyte run pipelines/post_train.py grpo_stage --base_uri ...` as the README shows it."""
    _, _, base, rm, prompts = upstream
    pyflyte = os.path.join(os.path.dirname(sys.executable), "pyflyte")
    env = user_env(HOME=str(tmp_path / "home"))
    args = [pyflyte, "run", "pipelines/post_train.py", "grpo_stage", "--config", _config(upstream),
            "--task_name", "t2i", "--base_uri", base.uri, "--reward_model_uri", rm.uri,
            "--prompts_uri", prompts["t2i"].uri]
    proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert teachers["t2i_teacher"] in proc.stdout  # the teacher of these inputs, reused


def test_a_uri_of_the_wrong_stage_is_named(upstream):
    from pipelines.post_train import annotate_stage

    _, _, _, rm, _ = upstream
    with pytest.raises(Exception, match=r"an artifact of stage reward_model, where base\* was expected"):
        annotate_stage(config=FlyteFile(_config(upstream)), base_uri=rm.uri)
