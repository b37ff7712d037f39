"""Stages filter_prompts, grpo (t2i, edit, mixed = Mix-RL) and opd on the smoke config: artifacts, resume."""

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from flowrl.models import load_checkpoint
from flowrl.stages.grpo import run_grpo
from flowrl.storage import fetch, read_manifest


def test_filter_keeps_the_spread_prompts_and_says_how_many(upstream):
    _, config, base, rm, prompts = upstream
    for task, result in prompts.items():
        frame = pd.read_parquet(fetch(result.uri) / "prompts.parquet")
        assert set(frame.task) == {task} and frame.kept.any()
        assert (frame[frame.kept].reward_range >= result.metrics["threshold"]).all()
        assert (frame[~frame.kept].reward_range < result.metrics["threshold"]).all()
        assert set(result.metrics["kept_fraction"]) == set(frame.category)
        assert (fetch(result.uri) / "ranges.png").read_bytes()[:4] == b"\x89PNG"
        assert read_manifest(result.uri).inputs == {"base": base.uri, "reward_model": rm.uri, "task": task}
        scales = result.metrics["calibration"]
        assert abs(sum(scales.values()) / len(scales) - 1.0) < 1e-6


def test_filter_per_category_cuts_each_category_at_its_own_quantile(upstream):
    import dataclasses

    import numpy as np

    from flowrl.stages.filter_prompts import run_filter_prompts

    _, config, base, rm, prompts = upstream
    config = dataclasses.replace(config, filter=dataclasses.replace(config.filter, threshold_scope="category"))
    result = run_filter_prompts(config, "t2i", base.uri, rm.uri)
    assert result.version != prompts["t2i"].version  # the scope is part of the stage's version
    frame = pd.read_parquet(fetch(result.uri) / "prompts.parquet")
    cuts = result.metrics["threshold"]
    assert set(cuts) == set(frame.category)
    for category, rows in frame.groupby("category"):
        assert cuts[category] == pytest.approx(np.quantile(rows.reward_range, config.filter.threshold))
        assert (rows[rows.kept].reward_range >= cuts[category]).all()
        assert (rows[~rows.kept].reward_range < cuts[category]).all()
        assert rows.kept.any(), category  # no category is emptied
    assert (fetch(result.uri) / "ranges.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_grpo_trains_and_writes_a_teacher(upstream, task):
    _, config, base, rm, prompts = upstream
    result = run_grpo(config, task, base.uri, rm.uri, prompts[task].uri, progress=False)
    local = fetch(result.uri)
    load_checkpoint(local, expected_family="shapes")
    m = result.metrics
    assert m["iterations"] == config.grpo.loop.iterations and m["task"] == task
    headline = "t2i/alignment" if task == "t2i" else "edit/accuracy"
    assert headline in m["base"] and headline in m["teacher"]
    # the monitor ran at iteration 0 and every eval_every iterations
    assert [e["iteration"] for e in m["monitor"]] == [0, 2, 4]
    history = json.loads((local / "history.json").read_text())["history"]
    assert len(history) == config.grpo.loop.iterations
    assert all(abs(h["train/ratio_dev"]) < 1.0 for h in history)
    for name in ("curves.png", "grid.png"):
        assert (local / name).read_bytes()[:4] == b"\x89PNG"
    assert "| base | teacher | delta |" in (local / "table.md").read_text()
    # the weights moved away from the base
    before = load_file(fetch(base.uri) / "model.safetensors")
    after = load_file(local / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_gain_over_time_judges_the_base_and_every_checkpoint(upstream, tmp_path):
    """experiments/grpo_ablations/grpo_curve.py reads the run's checkpoints back: the last one is the teacher
    the stage judged."""
    from experiments.grpo_ablations.grpo_curve import main

    root, config, base, rm, prompts = upstream
    result = run_grpo(config, "t2i", base.uri, rm.uri, prompts["t2i"].uri, progress=False)
    out = tmp_path / "curve.json"
    curve = main(["--config", str(root / "config.yaml"), "--run", str(fetch(result.uri)),
                  "--base", str(fetch(base.uri)) + "/", "--output", str(out), "--threads", "1"])  # any spelling
    assert json.loads(out.read_text()) == json.loads(json.dumps(curve))
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    points = curve["points"]
    assert [p["iteration"] for p in points] == [0, 2, 4]  # base, then checkpoint_every 2 of 4 iterations
    assert points[0]["t2i/alignment"] == pytest.approx(result.metrics["base"]["t2i/alignment"])
    assert points[-1]["t2i/alignment"] == pytest.approx(result.metrics["teacher"]["t2i/alignment"])
    assert points[-1]["fidelity"] == pytest.approx(result.metrics["teacher"]["fidelity"], abs=1e-4)
    assert points[0]["train_s"] == 0 < points[1]["train_s"] < points[2]["train_s"]
    assert curve["machine"]["cpu_capability"]
    with pytest.raises(SystemExit, match="started from"):
        main(["--config", str(root / "config.yaml"), "--run", str(fetch(result.uri)),
              "--base", str(tmp_path), "--output", str(out)])


def test_killed_run_resumes_to_the_uninterrupted_result(upstream, tmp_path):
    root, config, base, rm, prompts = upstream
    # the uninterrupted run is the t2i teacher of these inputs (reused where another test made it)
    whole = run_grpo(config, "t2i", base.uri, rm.uri, prompts["t2i"].uri, progress=False)
    with pytest.raises(InterruptedError):  # "killed" after iteration 3; the last checkpoint is at 2
        run_grpo(config, "t2i", base.uri, rm.uri, prompts["t2i"].uri, output_root=str(tmp_path / "b"),
                 progress=False, stop_after=3)
    resumed = run_grpo(config, "t2i", base.uri, rm.uri, prompts["t2i"].uri, output_root=str(tmp_path / "b"),
                       progress=False, resume=True)
    a = load_file(fetch(whole.uri) / "model.safetensors")
    b = load_file(fetch(resumed.uri) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for key in ("teacher", "monitor", "final_train_reward"):
        assert whole.metrics[key] == resumed.metrics[key]


def test_rewards_through_a_sidecar_reward_server(upstream, tmp_path):
    """reward_backend server: a real server process scores the rollouts over
    HTTP; the rewards match in-process scoring up to the 8-bit images."""
    import dataclasses

    _, config, base, rm, prompts = upstream
    two = dataclasses.replace(config.grpo.loop, iterations=2)
    served = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, reward_backend="server", loop=two))
    local = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, loop=two))
    remote = run_grpo(served, "t2i", base.uri, rm.uri, prompts["t2i"].uri, output_root=str(tmp_path / "s"),
                      progress=False)
    inproc = run_grpo(local, "t2i", base.uri, rm.uri, prompts["t2i"].uri, output_root=str(tmp_path / "l"),
                      progress=False)
    first = [json.loads((fetch(r.uri) / "history.json").read_text())["history"][0] for r in (remote, inproc)]
    assert first[0]["train/reward"] == pytest.approx(first[1]["train/reward"], abs=0.02)
    assert remote.metrics["iterations"] == 2


def test_mix_rl_trains_on_both_tasks_with_each_tasks_reward(upstream):
    _, config, base, rm, prompts = upstream
    uris = {task: prompts[task].uri for task in ("t2i", "edit")}
    result = run_grpo(config, "mixed", base.uri, rm.uri, uris, progress=False)
    assert result.stage == "grpo_mixed"
    assert read_manifest(result.uri).inputs == {"base": base.uri, "reward_model": rm.uri,
                                                "prompts_t2i": uris["t2i"], "prompts_edit": uris["edit"]}
    history = json.loads((fetch(result.uri) / "history.json").read_text())["history"]
    # each task scored by its own composite: T2I alignment/quality/fidelity, edit instruction/identity
    assert {"train/t2i/reward_alignment", "train/edit/reward_instruction", "train/edit/reward_identity"} <= set(history[0])
    monitor = result.metrics["monitor"][-1]
    assert monitor["heldout"] == pytest.approx((monitor["t2i"] + monitor["edit"]) / 2)
    assert "t2i/alignment" in result.metrics["teacher"] and "edit/accuracy" in result.metrics["teacher"]
    with pytest.raises(ValueError, match="mixed"):
        run_grpo(config, "mixed", base.uri, rm.uri, prompts["t2i"].uri, progress=False)


@pytest.mark.parametrize("states", ["on_policy", "off_policy"])
def test_opd_distils_both_teachers_into_a_student(upstream, teachers, states):
    from flowrl.stages.opd import run_opd

    _, config, base, _, prompts = upstream
    uris = {task: prompts[task].uri for task in ("t2i", "edit")}
    result = run_opd(config, base.uri, teachers, uris, states=states, progress=False)
    assert result.stage == ("opd" if states == "on_policy" else "opd_offpolicy")
    local = fetch(result.uri)
    load_checkpoint(local, expected_family="shapes")
    assert read_manifest(result.uri).inputs == {
        "base": base.uri, "teacher_t2i_teacher": teachers["t2i_teacher"],
        "teacher_edit_teacher": teachers["edit_teacher"], "prompts_edit": uris["edit"], "prompts_t2i": uris["t2i"]}
    m = result.metrics
    assert m["states"] == states and m["iterations"] == config.opd.loop.iterations
    assert [e["iteration"] for e in m["monitor"]] == [0, 2, 4]
    history = json.loads((local / "history.json").read_text())["history"]
    assert all(h["train/loss"] > 0 for h in history)
    assert set(m["gain_kept"]) == {"t2i_teacher (t2i/alignment)", "edit_teacher (edit/accuracy)"}
    for name in ("curves.png", "grid.png"):
        assert (local / name).read_bytes()[:4] == b"\x89PNG"
    table = (local / "table.md").read_text()
    assert "| metric | base | t2i_teacher | edit_teacher | student |" in table


def test_opd_resume_replays_the_uninterrupted_run(upstream, teachers, tmp_path):
    from flowrl.stages.opd import run_opd

    _, config, base, _, prompts = upstream
    uris = {task: prompts[task].uri for task in ("t2i", "edit")}
    whole = run_opd(config, base.uri, teachers, uris, progress=False)  # the student of these inputs
    with pytest.raises(InterruptedError):
        run_opd(config, base.uri, teachers, uris, output_root=str(tmp_path / "b"), progress=False, stop_after=3)
    resumed = run_opd(config, base.uri, teachers, uris, output_root=str(tmp_path / "b"), progress=False, resume=True)
    a = load_file(fetch(whole.uri) / "model.safetensors")
    b = load_file(fetch(resumed.uri) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.metrics["student"] == resumed.metrics["student"]


def test_opd_bad_inputs_fail_before_any_work(upstream, teachers):
    import dataclasses

    from flowrl.stages.opd import run_opd

    _, config, base, _, prompts = upstream
    uris = {task: prompts[task].uri for task in ("t2i", "edit")}
    with pytest.raises(ValueError, match="no teacher named 'edit_teacher'"):
        run_opd(config, base.uri, {"t2i_teacher": teachers["t2i_teacher"]}, uris, progress=False)
    with pytest.raises(ValueError, match="both tasks"):
        run_opd(config, base.uri, teachers, {"t2i": uris["t2i"]}, progress=False)
    bad = dataclasses.replace(config, opd=dataclasses.replace(config.opd, init="edit_teacher",
                                                              routes=("t2i=t2i_teacher", "edit=x")))
    with pytest.raises(ValueError, match="opd.init"):
        run_opd(bad, base.uri, {"t2i_teacher": teachers["t2i_teacher"], "x": teachers["edit_teacher"]},
                uris, progress=False)


def test_zero3_run_resumes_exactly_and_matches_plain_pytorch(upstream, tmp_path):
    """grpo.optim.zero_stage 3 in one process (DeepSpeed's CPU accelerator, a process group of one): the
    whole loop (rollouts through the partitioned weights, monitor on a gathered copy, checkpoints
    assembled from the partitions) gives a run that a kill + resume reproduces bit for bit and
    that equals plain PyTorch's to float precision."""
    import dataclasses

    import torch.distributed as dist

    import os

    _, config, base, rm, prompts = upstream
    zero = dataclasses.replace(config, grpo=dataclasses.replace(
        config.grpo, optim=dataclasses.replace(config.grpo.optim, zero_stage=3)))
    linear, local_rank = torch.nn.functional.linear, os.environ.get("LOCAL_RANK")
    plain = run_grpo(config, "t2i", base.uri, rm.uri, prompts["t2i"].uri, progress=False)  # the t2i teacher
    whole = run_grpo(zero, "t2i", base.uri, rm.uri, prompts["t2i"].uri, output_root=str(tmp_path / "a"),
                     progress=False)
    assert not dist.is_initialized()  # the engine's own group of one is gone with the run
    # and it left the process as it found it (DeepSpeed's ZeRO-3 would swap F.linear for good)
    assert torch.nn.functional.linear is linear and os.environ.get("LOCAL_RANK") == local_rank
    with pytest.raises(InterruptedError):
        run_grpo(zero, "t2i", base.uri, rm.uri, prompts["t2i"].uri, output_root=str(tmp_path / "b"),
                 progress=False, stop_after=3)
    resumed = run_grpo(zero, "t2i", base.uri, rm.uri, prompts["t2i"].uri, output_root=str(tmp_path / "b"),
                       progress=False, resume=True)
    a, b, p = (load_file(fetch(r.uri) / "model.safetensors") for r in (whole, resumed, plain))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.metrics["monitor"] == resumed.metrics["monitor"]
    for key in a:
        torch.testing.assert_close(a[key], p[key], atol=1e-4, rtol=1e-4)
    assert [e["iteration"] for e in whole.metrics["monitor"]] == [e["iteration"] for e in plain.metrics["monitor"]]


def test_two_process_zero3_grpo_stage_ends_where_ddp_does(upstream, tmp_path):
    """`torchrun --nproc_per_node 2 -m flowrl.cli grpo` with grpo.optim.zero_stage 3 (rollouts through
    partitioned weights on both ranks, the monitor on rank 0's gathered copy, checkpoints assembled
    from both ranks' partitions) trains the teacher DDP trains with the same two processes (each
    rank draws its own rollout noise, so one process would sample other trajectories)."""
    import os
    import subprocess
    import sys

    from flowrl.rewards.server import free_port
    from tests.conftest import ROOT, write_config

    _, config, base, rm, prompts = upstream
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    runs = {}
    for zero in (0, 3):
        path = write_config(tmp_path / str(zero), grpo={"optim": {"zero_stage": zero}, "reward_chunks": 1})
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "-m", "flowrl.cli", "grpo", "--config", str(path), "--task", "t2i",
               "--base", base.uri, "--reward-model", rm.uri, "--prompts", prompts["t2i"].uri,
               "--output", str(tmp_path / str(zero) / "out"), "--no-progress", "--no-tracking"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[zero] = proc.stdout.strip().splitlines()[-1]
        # only rank 0 reports: two ranks printing at once once glued two URIs into one line (CI)
        stage_dir = str(tmp_path / str(zero) / "out" / "grpo_t2i") + "/"
        assert runs[zero].startswith(stage_dir) and proc.stdout.count(stage_dir) == 1, proc.stdout[-2000:]
        assert len(list((tmp_path / str(zero) / "out" / "grpo_t2i.checkpoints").glob("*/manifest.json"))) == 2
    ddp, sharded = (json.loads((fetch(runs[z]) / "metrics.json").read_text()) for z in (0, 3))
    assert [e["iteration"] for e in sharded["monitor"]] == [e["iteration"] for e in ddp["monitor"]] == [0, 2, 4]
    a, b = (load_file(fetch(runs[z]) / "model.safetensors") for z in (0, 3))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
    # one checkpoint format: the iteration-2 checkpoints of both runs load into one plain process
    # and hold the same weights and AdamW moments
    from flowrl.rl.engine import TorchEngine
    from flowrl.rl.trainer import Checkpoints
    from flowrl.storage import ArtifactStore

    loaded = []
    for zero in (0, 3):
        (uri,) = (tmp_path / str(zero) / "out" / "grpo_t2i.checkpoints").glob("*-0000002")
        model = load_checkpoint(fetch(base.uri), expected_family="shapes")
        engine = TorchEngine(model.net, lr=config.grpo.optim.lr, weight_decay=0.0, grad_clip=1.0)
        state = Checkpoints(ArtifactStore(str(tmp_path)), "grpo_t2i", "x").load_into(str(uri), engine, None)
        assert state.iteration == 2
        loaded.append((engine.full_state_dict(), engine.optimizer_state()["state"]))
    (w0, s0), (w3, s3) = loaded
    for key in w0:
        torch.testing.assert_close(w3[key], w0[key], atol=1e-5, rtol=1e-4)
    for index, entry in s0.items():  # DDP's AdamW has no state for parameters no batch reached
        assert float(entry["step"]) == float(s3[index]["step"]) == 2
        torch.testing.assert_close(s3[index]["exp_avg"], entry["exp_avg"], atol=1e-6, rtol=1e-4)
