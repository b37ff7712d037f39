"""Registry and lineage on the smoke stages, read back from MLflow alone."""

import subprocess
import sys

from mlflow.tracking import MlflowClient

from tests.conftest import ROOT


def _student(upstream, teachers):
    from flowrl.stages.opd import run_opd

    _, config, base, _, prompts = upstream
    return run_opd(config, base.uri, teachers, {t: prompts[t].uri for t in ("t2i", "edit")}, progress=False)


def test_models_are_registered_and_lineage_reaches_the_base(upstream, teachers):
    root, config, base, rm, prompts = upstream
    student = _student(upstream, teachers)
    client = MlflowClient(config.run.tracking_uri)
    name = f"{config.run.name}"
    for role, uri in (("reward_model", rm.uri), ("t2i_teacher", teachers["t2i_teacher"]),
                      ("edit_teacher", teachers["edit_teacher"]), ("student", student.uri)):
        versions = client.search_model_versions(f"name = '{name}-{role}'")
        assert uri in {v.source for v in versions}, role
    proc = subprocess.run([sys.executable, "-m", "flowrl.cli", "lineage", student.uri, "--config",
                           str(root / "config.yaml")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    tree = proc.stdout
    assert tree.splitlines()[0].startswith(f"opd [{name}-student/")
    for needle in ("teacher_t2i_teacher: grpo_t2i", "teacher_edit_teacher: grpo_edit", "prompts_t2i: filter_prompts_t2i",
                   "prompts_edit: filter_prompts_edit", "reward_model: reward_model", "annotations: annotate",
                   "base: base run", base.uri, rm.uri, f"[{name}-t2i_teacher/", f"[{name}-reward_model/"):
        assert needle in tree, needle
    # the same tree from the registered model version and from the run id
    version = next(v for v in client.search_model_versions(f"name = '{name}-student'") if v.source == student.uri)
    from flowrl.lineage import lineage, render, resolve
    from flowrl.tracking import MLflowTracker

    tracker = MLflowTracker(config.run.tracking_uri)
    assert render(lineage(tracker, resolve(tracker, f"models:/{name}-student/{version.version}"))) == tree
    assert render(lineage(tracker, resolve(tracker, version.run_id))) == tree


def test_lineage_of_something_unknown_is_a_one_line_error(upstream):
    root = upstream[0]
    proc = subprocess.run([sys.executable, "-m", "flowrl.cli", "lineage", "/no/such/artifact", "--config",
                           str(root / "config.yaml")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "not a run id" in proc.stderr and "Traceback" not in proc.stderr
