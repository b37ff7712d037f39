"""The production path (model.family qwen_image) through the stages, on tiny random
Qwen-Image components and a tiny random Qwen2.5-VL reward backbone: the base
reference, human labels, VLM reward models, prompt-file filtering with a held-out
share, and GRPO for T2I (in-process rewards) and edit (a sidecar reward server),
each committing an artifact the next stage loads."""

import io
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from flowrl.config import ConfigError, load_config, merge_data
from flowrl.models import CheckpointError, load_policy, trainable_module
from flowrl.prompt_files import PromptFileError, heldout_mask, load_prompt_file
from flowrl.stages.base import run_base
from flowrl.stages.filter_prompts import load_heldout_set, load_prompt_set, run_filter_prompts
from flowrl.stages.grpo import run_grpo
from flowrl.stages.opd import run_opd
from flowrl.storage import fetch
from tests.conftest import write_config

T2I_PROMPTS = [("a red circle", "colors"), ("a blue square", "colors"), ("a green triangle", "colors"),
               ("two circles", "counting"), ("three squares", "counting"), ("four triangles", "counting"),
               ("a circle left of a square", "position"), ("a square above a triangle", "position")]
EDIT_PROMPTS = [("make the circle red", "recolor"), ("make the square blue", "recolor"),
                ("remove the circle", "remove"), ("remove the triangle", "remove"),
                ("add a green square", "add"), ("add a red circle", "add")]


# never in the filter files above nor in the annotations (the shapes grammar's train split)
BENCH_T2I = [("a violet hexagon beside a lamp", "colors"), ("an amber kite over dunes", "colors"),
             ("a teal vase", "colors"), ("five lanterns", "counting"), ("seven pebbles", "counting")]
BENCH_EDIT = [("paint the kite amber", "recolor"), ("tint the lamp teal", "recolor"),
              ("erase the hexagon", "remove"), ("drop the lantern", "remove")]
BENCH_SCORERS = ["t2i_alignment=t2i/pairwise", "edit_accuracy=edit/pairwise", "fidelity=t2i/pointwise_alignment",
                 "identity=ssim"]


def _png(seed: int, size=(40, 24)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _prompt_files(root) -> dict[str, str]:
    t2i = pd.DataFrame(T2I_PROMPTS, columns=["prompt", "category"])
    edit = pd.DataFrame(EDIT_PROMPTS, columns=["prompt", "category"]).assign(
        source_image=[_png(i) for i in range(len(EDIT_PROMPTS))])
    paths = {"t2i": root / "t2i.parquet", "edit": root / "edit.parquet"}
    t2i.to_parquet(paths["t2i"])
    edit.to_parquet(paths["edit"])
    paths["bench_t2i"], paths["bench_edit"] = root / "bench_t2i.parquet", root / "bench_edit.parquet"
    pd.DataFrame(BENCH_T2I, columns=["prompt", "category"]).to_parquet(paths["bench_t2i"])
    pd.DataFrame(BENCH_EDIT, columns=["prompt", "category"]).assign(
        source_image=[_png(100 + i, size=(32, 32)) for i in range(len(BENCH_EDIT))]).to_parquet(paths["bench_edit"])
    return {k: str(v) for k, v in paths.items()}


# the production path in another dtype (bench/gpu_check.py runs it in bfloat16 on a GPU): float32 by default
DTYPE = os.environ.get("FLOWRL_CHECK_DTYPE", "float32")


def _qwen_config(root, labels: dict[str, str], weights, vlm, prompts: dict[str, str], **overrides):
    sections = dict(
        model={"family": "qwen_image", "qwen_image": {"pretrained": str(weights), "edit_pretrained": str(weights),
                                                      "height": 32, "width": 32, "dtype": DTYPE}},
        run={"torch_threads": 1},
        sampler={"num_steps": 2, "guidance_scale": 2.0},
        eval={"t2i_per_category": 1, "edit_per_kind": 1, "batch_size": 4},
        annotate={"pointwise_path": labels["pointwise"], "pairwise_path": labels["pairwise"]},
        reward_model={"backbone": "vlm", "vlm_pretrained": str(vlm), "vlm_rationale": False, "steps": 2,
                      "easy_steps": 1, "batch_size": 2, "lr": 1e-4, "t2i_criteria": ["alignment"],
                      "edit_criteria": ["alignment"], "pairwise": True},
        rewards={"t2i": [{"name": "alignment", "scorer": "learned", "weight": 1.0}],
                 "edit": [{"name": "instruction", "scorer": "learned", "criterion": "alignment", "weight": 1.0}]},
        filter={"t2i_prompts": prompts["t2i"], "edit_prompts": prompts["edit"], "heldout_fraction": 0.3,
                "group_size": 2, "batch_size": 8, "threshold": 0.25},
        grpo={"loop": {"iterations": 2, "eval_every": 1, "monitor_per_category": 1, "checkpoint_every": 100,
                       "grid_every": 1},
              "prompts_per_iteration": 2, "group_size": 2, "rollout": {"num_steps": 2, "guidance_scale": 2.0},
              "timesteps": {"fraction": 1.0, "per_trajectory": 1}, "optim": {"lr": 1e-3, "zero_stage": 0},
              "kl_coef": 0.1, "minibatches": 1, "reward_chunks": 1, "reward_backend": "inprocess",
              "reward_gpus": 0, "monitor_reward": "pairwise", "balance_categories": False},
        opd={"loop": {"iterations": 2, "eval_every": 1, "monitor_per_category": 1, "checkpoint_every": 100,
                      "grid_every": 1},
             "prompts_per_iteration": 2, "num_steps": 2, "guidance_scale": 2.0, "timesteps": {"mode": "all"},
             "optim": {"lr": 1e-3, "ema_decay": 0.0, "zero_stage": 0}, "teacher_devices": ["edit_teacher=cpu"]},
        bench={"scorer": "reward_models", "t2i_prompts": prompts["bench_t2i"], "edit_prompts": prompts["bench_edit"],
               "t2i_per_category": 2, "edit_per_kind": 2, "batch_size": 4, "bootstrap": 50, "grid_items": 3,
               "scorers": BENCH_SCORERS},
    )
    return load_config(write_config(root, scenario="qwen_image.yaml", **merge_data(sections, overrides)))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny components train and score single-threaded (as on a CI core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_prompt_files_are_filtered_with_a_held_out_share_that_is_never_trained_on(production):
    _, config, _, _, filtered, _ = production
    for task, rows in (("t2i", T2I_PROMPTS), ("edit", EDIT_PROMPTS)):
        result = filtered[task]
        curated, heldout = load_prompt_set(result.uri), load_heldout_set(result.uri)
        scored = pd.read_parquet(fetch(result.uri) / "prompts.parquet")
        assert len(scored) + len(heldout) == len(rows) and len(heldout) == result.metrics["heldout"] >= 1
        assert not set(scored["prompt"]) & set(heldout["prompt"])  # the held-out share never sampled for filtering
        assert 1 <= len(curated) <= len(scored)
        assert {"reward_mean", "reward_range", "kept"} <= set(scored.columns)
        assert set(result.metrics["kept_fraction"]) == set(scored["category"])
        if task == "edit":  # sources resized to the model's size on loading
            assert Image.open(io.BytesIO(curated["source_image"][0])).size == (32, 32)


def test_grpo_trains_the_qwen_image_transformer_and_commits_a_loadable_teacher(production, monkeypatch):
    _, config, base, rm, filtered, _ = production
    t2i = run_grpo(config, "t2i", base.uri, rm.uri, filtered["t2i"].uri, progress=False)
    again = run_grpo(config, "t2i", base.uri, rm.uri, filtered["t2i"].uri, progress=False)
    assert again.reused and again.version == t2i.version
    local = fetch(t2i.uri)
    assert (local / "transformer" / "config.json").is_file() and (local / "reference.json").is_file()
    assert {"curves.png", "table.md", "grid.png", "history.json"} <= {p.name for p in local.iterdir()}
    m = t2i.metrics
    assert m["iterations"] == 2 and m["scored_by"] == {"components": ["alignment"], "heldout": "pairwise"}
    assert set(m["base"]) == set(m["teacher"]) >= {"t2i/alignment", "t2i/pairwise"}
    assert [e["iteration"] for e in m["monitor"]] == [0, 1, 2] and all("heldout" in e for e in m["monitor"])
    start = trainable_module(load_policy(fetch(base.uri), config, "t2i")).state_dict()
    from diffusers import QwenImageTransformer2DModel

    read = []  # transformers read from disk: a teacher's own, never the pretrained one beside it
    original = QwenImageTransformer2DModel.from_pretrained.__func__
    monkeypatch.setattr(QwenImageTransformer2DModel, "from_pretrained", classmethod(
        lambda cls, path, **kw: read.append(str(path)) or original(cls, path, **kw)))
    trained = trainable_module(load_policy(local, config, "t2i")).state_dict()
    assert read == [str(local / "transformer")]
    assert start.keys() == trained.keys() and any(not torch.equal(start[k], trained[k]) for k in start)


def test_edit_grpo_scores_through_a_sidecar_reward_server(production):
    root, config, base, rm, filtered, _ = production
    import dataclasses

    # one sidecar for the node on a GPU of its own (grpo.reward_gpus; on this CPU machine, the CPU)
    served = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, reward_backend="server", kl_coef=0.0,
                                                                  reward_gpus=1))
    edit = run_grpo(served, "edit", base.uri, rm.uri, filtered["edit"].uri, progress=False)
    assert edit.metrics["iterations"] == 2 and "edit/instruction" in edit.metrics["teacher"]
    history = json.loads((fetch(edit.uri) / "history.json").read_text())["history"]
    assert len(history) == 2 and all(np.isfinite(h["train/reward"]) for h in history)
    model = load_policy(fetch(edit.uri), config, "edit")
    assert model.task == "edit"


def test_changed_pretrained_weights_are_refused_when_loading(production, tmp_path):
    import shutil

    _, config, base, _, _, (_, weights, _, _) = production
    copy = tmp_path / "base"
    shutil.copytree(fetch(base.uri), copy)
    reference = json.loads((copy / "reference.json").read_text())
    reference["resolved"]["pretrained.t2i"] = reference["resolved"]["pretrained.t2i"].rsplit("#", 1)[0] + "#0000"
    (copy / "reference.json").write_text(json.dumps(reference))
    with pytest.raises(CheckpointError, match="changed since the base stage"):
        load_policy(copy, config, "t2i")


def test_a_bad_prompt_file_row_is_named_before_any_model_loads(production, tmp_path):
    import dataclasses

    _, config, base, rm, _, _ = production
    bad = pd.DataFrame({"prompt": ["make the circle red", "  "], "category": ["recolor", "recolor"],
                        "source_image": [_png(0), _png(1)]})
    bad.to_parquet(tmp_path / "bad.parquet")
    broken = dataclasses.replace(config, filter=dataclasses.replace(config.filter, edit_prompts=str(tmp_path / "bad.parquet")))
    with pytest.raises(PromptFileError, match=r"filter.edit_prompts: .*bad.parquet row 1: field 'prompt'"):
        run_filter_prompts(broken, "edit", base.uri, rm.uri)
    bad.assign(prompt=["a", "b"], source_image=[b"not an image", _png(1)]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(PromptFileError, match=r"row 0: field 'source_image': not a readable image"):
        run_filter_prompts(broken, "edit", base.uri, rm.uri)
    missing = dataclasses.replace(config, filter=dataclasses.replace(config.filter, t2i_prompts=None))
    with pytest.raises(ConfigError, match="filter.t2i_prompts: required"):
        run_filter_prompts(missing, "t2i", base.uri, rm.uri)


def test_a_monitor_that_the_policy_trains_on_is_refused(production):
    import dataclasses

    _, config, base, rm, filtered, _ = production
    watched = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, monitor_reward="pointwise_alignment"))
    with pytest.raises(ConfigError, match="grpo.monitor_reward: 'pointwise_alignment' is part of the t2i composite"):
        run_grpo(watched, "t2i", base.uri, rm.uri, filtered["t2i"].uri, progress=False)
    absent = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, monitor_reward="pointwise_quality"))
    with pytest.raises(ConfigError, match="has no t2i scorer 'pointwise_quality'"):
        run_grpo(absent, "t2i", base.uri, rm.uri, filtered["t2i"].uri, progress=False)


def test_held_out_rows_stay_held_out_when_the_file_grows(tmp_path):
    frame = pd.DataFrame({"prompt": [f"prompt {i}" for i in range(200)], "category": ["c"] * 200,
                          "source_image": [None] * 200})
    first = heldout_mask(frame, 0.1, seed=0)
    grown = pd.concat([frame, frame.assign(prompt=[f"new {i}" for i in range(200)])], ignore_index=True)
    second = heldout_mask(grown, 0.1, seed=0)
    assert (second[:200] == first).all() and 5 < first.sum() < 40


def test_prompt_file_rows_are_checked_and_repeats_dropped(tmp_path):
    path = tmp_path / "t2i.parquet"
    pd.DataFrame({"prompt": ["a cat", "a cat", "a dog"], "category": ["animal"] * 3}).to_parquet(path)
    frame = load_prompt_file(str(path), "t2i", "filter.t2i_prompts", (32, 32))
    assert list(frame["prompt"]) == ["a cat", "a dog"] and len(frame.attrs["sha256"]) == 64
    pd.DataFrame({"prompt": ["a cat"]}).to_parquet(path)
    with pytest.raises(PromptFileError, match="filter.t2i_prompts: .* has no column 'category'"):
        load_prompt_file(str(path), "t2i", "filter.t2i_prompts", (32, 32))
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompt_file(str(tmp_path / "none.parquet"), "t2i", "filter.t2i_prompts", (32, 32))


def test_grpo_stage_under_deepspeed_zero_2_ends_where_plain_pytorch_ends(production):
    """The production setting (grpo.optim.zero_stage 2) through the stage: same committed transformer
    as the plain run to a few percent of one Adam step (ZeRO sums gradients in another order)."""
    import dataclasses

    _, config, base, rm, filtered, _ = production
    plain = run_grpo(config, "t2i", base.uri, rm.uri, filtered["t2i"].uri, progress=False)
    zero = dataclasses.replace(config, grpo=dataclasses.replace(
        config.grpo, optim=dataclasses.replace(config.grpo.optim, zero_stage=2)))
    sharded = run_grpo(zero, "t2i", base.uri, rm.uri, filtered["t2i"].uri, progress=False)
    assert sharded.version != plain.version
    a = trainable_module(load_policy(fetch(plain.uri), config, "t2i")).state_dict()
    b = trainable_module(load_policy(fetch(sharded.uri), config, "t2i")).state_dict()
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, atol=3e-5, rtol=1e-4)
    assert sharded.metrics["base"] == pytest.approx(plain.metrics["base"])


def test_opd_distils_both_qwen_image_teachers_into_one_student(production):
    """OPD after the two GRPO runs above (their artifacts are reused): one student transformer,
    scored by the teachers' held-out reward model on both tasks' held-out prompts."""
    import dataclasses

    _, config, base, rm, filtered, _ = production
    served = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, reward_backend="server", kl_coef=0.0))
    teachers = {"t2i_teacher": run_grpo(config, "t2i", base.uri, rm.uri, filtered["t2i"].uri, progress=False),
                "edit_teacher": run_grpo(served, "edit", base.uri, rm.uri, filtered["edit"].uri, progress=False)}
    student = run_opd(config, base.uri, {k: v.uri for k, v in teachers.items()},
                      {t: filtered[t].uri for t in ("t2i", "edit")}, progress=False)
    m = student.metrics
    assert m["iterations"] == 2 and m["reward_model"] == rm.uri and m["scored_by"] == "pairwise"
    assert {"t2i/pairwise", "t2i/alignment", "edit/pairwise", "edit/instruction"} <= set(m["student"])
    assert set(m["gain_kept"]) == {"t2i_teacher (t2i/pairwise)", "edit_teacher (edit/pairwise)"}
    assert [e["iteration"] for e in m["monitor"]] == [0, 1, 2] and all({"t2i", "edit"} <= set(e) for e in m["monitor"])
    local = fetch(student.uri)
    assert {"transformer", "reference.json", "table.md", "curves.png", "grid.png"} <= {p.name for p in local.iterdir()}
    start = trainable_module(load_policy(fetch(base.uri), config, "t2i")).state_dict()
    trained = trainable_module(load_policy(local, config, "t2i")).state_dict()
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    bad = dataclasses.replace(config, opd=dataclasses.replace(config.opd, teacher_devices=("nobody=cpu",)))
    with pytest.raises(ConfigError, match="opd.teacher_devices: no teacher named 'nobody'"):
        run_opd(bad, base.uri, {k: v.uri for k, v in teachers.items()}, {t: filtered[t].uri for t in ("t2i", "edit")},
                progress=False)


def test_bench_scores_every_production_model_with_the_reward_models_and_ssim(production):
    """The bench of the production family on the tiny components: base, both GRPO teachers and the
    OPD student (all reused from the tests above), plus the base under a second name, which must get
    the same images, scores and rating as the base (same prompts, seeds and sampler)."""
    import dataclasses

    from flowrl.stages.bench import run_bench

    _, config, base, rm, filtered, (_, _, _, prompts) = production
    served = dataclasses.replace(config, grpo=dataclasses.replace(config.grpo, reward_backend="server", kl_coef=0.0))
    teachers = {"t2i_teacher": run_grpo(config, "t2i", base.uri, rm.uri, filtered["t2i"].uri, progress=False).uri,
                "edit_teacher": run_grpo(served, "edit", base.uri, rm.uri, filtered["edit"].uri, progress=False).uri}
    student = run_opd(config, base.uri, teachers, {t: filtered[t].uri for t in ("t2i", "edit")}, progress=False)
    models = {"base": base.uri, "base_again": base.uri, **teachers, "student": student.uri}
    result = run_bench(config, models, reward_model=rm.uri)
    m = result.metrics
    assert m["items"] == {"t2i": 4, "edit": 4}  # two per category, in file order
    assert m["scorer"].startswith("reward models (t2i_alignment: t2i/pairwise")
    assert m["battle_sources"] == {"t2i": "reward models", "edit": "reward models"}
    table = {name: entry["pillars"] for name, entry in m["models"].items()}
    for name, p in table.items():
        assert all(0 <= p[k] <= 100 for k in ("t2i_alignment", "edit_accuracy", "identity", "fidelity", "overall"))
        assert {"t2i_alignment/colors", "t2i_alignment/counting", "edit_accuracy/recolor", "edit_accuracy/remove"} <= set(p)
    assert table["base_again"] == table["base"]
    assert table["student"] != table["base"]  # the trained transformer samples other images
    for arena in ("t2i", "edit"):
        ratings = m["arenas"][arena]
        assert ratings["base"] == {"rating": 1000.0, "ci_low": 1000.0, "ci_high": 1000.0}
        assert ratings["base_again"]["rating"] == pytest.approx(1000.0, abs=0.5)  # ties only, same record
    local = fetch(result.uri)
    assert {"report.md", "report.html", "elo.png", "grid_t2i.png", "grid_edit.png", "bench.json"} <= {
        p.name for p in local.iterdir()}
    scores = pd.read_parquet(local / "scores.parquet")
    assert len(scores) == 5 * 8 and scores["prompt"].isin([p for p, _ in BENCH_T2I + BENCH_EDIT]).all()
    identity = scores[(scores["task"] == "edit")]["secondary"]
    assert ((identity > 0) & (identity < 1)).all()  # SSIM of a generated image and its source
    assert run_bench(config, models, reward_model=rm.uri).reused

    missing = dataclasses.replace(config, bench=dataclasses.replace(
        config.bench, scorers=(*BENCH_SCORERS[:3], "identity=edit/pointwise_identity")))
    with pytest.raises(ConfigError, match=r"bench.scorers: identity=edit/pointwise_identity: .* has no such scorer "
                                          r"\(its edit scorers: pairwise, pointwise_alignment\)"):
        run_bench(missing, models, reward_model=rm.uri)
    leaked = pd.DataFrame([*BENCH_T2I, (T2I_PROMPTS[3][0], "counting")], columns=["prompt", "category"])
    leaked.to_parquet(prompts["bench_t2i"] + ".leaked.parquet")
    seen = dataclasses.replace(config, bench=dataclasses.replace(
        config.bench, t2i_prompts=prompts["bench_t2i"] + ".leaked.parquet"))
    with pytest.raises(PromptFileError, match=r"row 5: prompt 'two circles' also occurs in filter.t2i_prompts"):
        run_bench(seen, models, reward_model=rm.uri)


def test_bench_samples_the_base_artifacts_edits_with_the_edit_pipeline(production):
    """A base artifact has no trained transformer: its edits come from the edit weights it records
    (Qwen-Image-Edit), its T2I images from the T2I weights. Two bases that share T2I weights but not
    edit weights get the same T2I scores and different edit scores."""
    from flowrl.stages.bench import run_bench
    from tests.models.tiny_qwen_image import build_tiny_qwen_image

    root, config, base, rm, _, (labels, weights, vlm, prompts) = production
    edit_weights = build_tiny_qwen_image(root / "qwen-edit-tiny", task="edit", seed=7)
    other = _qwen_config(root / "other-edit", labels, weights, vlm, prompts, model={"qwen_image": {
        "pretrained": str(weights), "edit_pretrained": str(edit_weights), "height": 32, "width": 32,
        "dtype": "float32"}})
    other_base = run_base(other, progress=False)
    result = run_bench(other, {"base": base.uri, "other_edit_base": other_base.uri}, reward_model=rm.uri)
    scores = pd.read_parquet(fetch(result.uri) / "scores.parquet").set_index(["model", "task", "prompt"])
    ours, theirs = scores.loc["base"], scores.loc["other_edit_base"]
    assert ours.loc["t2i"].equals(theirs.loc["t2i"])
    assert not np.allclose(ours.loc["edit"]["secondary"], theirs.loc["edit"]["secondary"])  # SSIM to the source


def test_opd_edit_view_is_the_recorded_edit_pipeline_sharing_only_identical_components(production):
    """OPD trains one transformer behind a T2I and an edit view. The edit view is the edit pipeline the
    base recorded (the one GRPO-edit and the bench load): it shares the T2I pipeline's VAE, text encoder and
    tokenizer only where the two weight directories hold the same files, and loads its own otherwise."""
    import shutil

    from flowrl.models import load_task_views
    from tests.models.tiny_qwen_image import build_tiny_qwen_image

    root, config, base, _, _, (labels, weights, vlm, prompts) = production
    shared = ("vae", "text_encoder", "tokenizer")

    def views_of(edit_weights, name):
        other = _qwen_config(root / name, labels, weights, vlm, prompts, model={"qwen_image": {
            "pretrained": str(weights), "edit_pretrained": str(edit_weights), "height": 32, "width": 32,
            "dtype": "float32"}})
        directory = fetch(run_base(other, progress=False).uri)
        return load_task_views(directory, other), load_policy(directory, other, "edit")

    same = load_task_views(fetch(base.uri), config)  # one directory for both tasks
    assert same["edit"].transformer is same["t2i"].transformer
    assert all(getattr(same["edit"], c) is getattr(same["t2i"], c) for c in shared)
    copied, _ = views_of(shutil.copytree(weights, root / "qwen-tiny-copy"), "copy")  # same files, another path
    assert all(getattr(copied["edit"], c) is getattr(copied["t2i"], c) for c in shared)
    # another edit checkpoint (its VAE and text encoder drawn from another seed, the same tokenizer files)
    views, edit_policy = views_of(build_tiny_qwen_image(root / "qwen-edit-tiny-opd", task="edit", seed=7), "other")
    assert views["edit"].transformer is views["t2i"].transformer  # still one network trained for both
    assert views["edit"].tokenizer is views["t2i"].tokenizer
    for component in ("vae", "text_encoder"):
        ours, theirs = getattr(views["edit"], component), getattr(views["t2i"], component)
        assert ours is not theirs, component
        expected = getattr(edit_policy, component).state_dict()
        assert all(torch.equal(v, expected[k]) for k, v in ours.state_dict().items()), component
