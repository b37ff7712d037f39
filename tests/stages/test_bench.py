"""Stage bench on the smoke config: pillars, arenas, report, votes, the bench
partition kept away from every training set, and bad inputs."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flowrl.bench import PILLARS, bench_set
from flowrl.config import ConfigError
from flowrl.pretrain import draw_batch
from flowrl.shapes.splits import bench_texts, grammar
from flowrl.stages.bench import REPORT_FILES, run_bench
from flowrl.storage import ArtifactError, fetch


@pytest.fixture(scope="module")
def benched(upstream, teachers):
    _, config, base, _, _ = upstream
    models = {"base": base.uri, **teachers}
    return config, models, run_bench(config, models)


def test_bench_scores_every_model_and_fits_both_arenas(benched):
    config, models, result = benched
    local = fetch(result.uri)
    m = json.loads((local / "bench.json").read_text())
    assert m == result.metrics
    bench = bench_set(config)
    assert m["items"] == {"t2i": len(bench.t2i_prompts), "edit": len(bench.edit_instructions)} == {"t2i": 12, "edit": 8}
    for name in models:
        p = m["models"][name]["pillars"]
        assert all(0 <= p[k] <= 100 for k in PILLARS)
        assert p["overall"] == pytest.approx(np.mean([p[k] for k in PILLARS]), abs=1e-3)
        assert {k for k in p if k.startswith("t2i_alignment/")} == {
            f"t2i_alignment/{c}" for c in grammar("t2i")}
        assert {k for k in p if k.startswith("edit_accuracy/")} == {f"edit_accuracy/{k}" for k in grammar("edit")}
    for arena in ("t2i", "edit"):
        ratings = m["arenas"][arena]
        assert set(ratings) == set(models)
        assert ratings["base"]["rating"] == 1000.0
        for r in ratings.values():
            assert r["ci_low"] <= r["rating"] <= r["ci_high"]
        # every pair of models on every item
        assert m["battles"][arena] == 3 * m["items"][arena]
    scores = pd.read_parquet(local / "scores.parquet")
    assert len(scores) == len(models) * (12 + 8) and set(scores.model) == set(models)
    battles = pd.read_parquet(local / "battles.parquet")
    assert len(battles) == 3 * 20 and set(battles.outcome) <= {0.0, 0.5, 1.0}


def test_bench_records_gains_flags_and_relative_paths(benched):
    """``gains``: every model but the anchor, each pillar's paired gain on the 0-1 scale, its delta the
    difference of the pillars; ``gains_by_category`` per T2I category and edit kind; ``arena_flags``: the
    unanimous pairs of each arena's battles; artifact paths under the working directory relative to it."""
    from flowrl.arena import Battle, arena_flags

    config, models, result = benched
    m = result.metrics
    assert set(m["gains"]) == set(models) - {"base"}
    for name, gains in m["gains"].items():
        assert set(gains) == set(PILLARS)
        for pillar, g in gains.items():
            assert set(g) == {"delta", "ci_low", "ci_high", "stderr"}
            assert g["ci_low"] <= g["delta"] <= g["ci_high"], (name, pillar)
            expected = (m["models"][name]["pillars"][pillar] - m["models"]["base"]["pillars"][pillar]) / 100
            assert g["delta"] == pytest.approx(expected, abs=1e-3), (name, pillar)
        assert set(m["gains_by_category"][name]) == (
            {f"t2i_alignment/{c}" for c in grammar("t2i")} | {f"edit_accuracy/{k}" for k in grammar("edit")})
    assert m["gains_bootstrap"]["replicates"] == config.bench.bootstrap
    battles = pd.read_parquet(fetch(result.uri) / "battles.parquet")
    for arena in ("t2i", "edit"):
        rows = battles[battles.arena == arena]
        expected = arena_flags([Battle(a, b, o) for a, b, o in zip(rows.model_a, rows.model_b, rows.outcome)],
                               list(models))
        assert m["arena_flags"][arena] == expected
    for name, uri in models.items():
        recorded = m["models"][name]["artifact_uri"]
        assert not recorded.startswith("/") or not uri.startswith(str(Path.cwd())), recorded
        assert (Path.cwd() / recorded).resolve() == Path(uri).resolve()


def test_bench_writes_the_report(benched):
    _, models, result = benched
    local = fetch(result.uri)
    for name in REPORT_FILES:
        assert (local / name).is_file(), name
    groups = [f"grid_t2i_{c}.png" for c in grammar("t2i")] + [f"grid_edit_{k}.png" for k in grammar("edit")]
    for name in ("elo.png", "curves.png", "rl_curves.png", "grid_t2i.png", "grid_edit.png", *groups):
        assert (local / name).read_bytes()[:4] == b"\x89PNG", name
    md = (local / "report.md").read_text()
    for heading in ("## Pillars", "## Arena ratings", "## T2I alignment by category", "## Edit accuracy by kind",
                    "## Training curves", "![Elo per arena](elo.png)", "## Reward vs judge during training",
                    "## Gains over base (paired bootstrap 95 % intervals over bench items)",
                    "## T2I, category counting: same prompts and seeds", "## Edits, kind recolor: same prompts"):
        assert heading in md
    for name in models:
        assert f"| {name} |" in md
    html = (local / "report.html").read_text()
    # pillars, gains, the recipe's claims, the two breakdowns and their gains, Elo, two win-rate tables
    assert html.count("<table>") == 10 and html.count("data:image/png;base64,") == 5 + len(groups)
    assert "src='elo.png'" not in html  # self-contained
    from flowrl.stages.bench import report_files

    assert set(report_files(result.uri)) >= {"rl_curves.png", *groups}  # --report-dir copies them all


def test_same_weights_under_two_names_tie_every_battle(upstream):
    """Sampling is deterministic per (prompt, seed) and identical across models."""
    root, config, base, _, _ = upstream
    result = run_bench(config, {"base": base.uri, "copy": base.uri}, output_root=str(root / "same"))
    m = result.metrics
    assert m["models"]["base"]["pillars"] == m["models"]["copy"]["pillars"]
    battles = pd.read_parquet(fetch(result.uri) / "battles.parquet")
    assert (battles.outcome == 0.5).all()
    for arena in ("t2i", "edit"):
        assert m["arenas"][arena]["copy"]["rating"] == pytest.approx(1000.0, abs=1e-6)


def test_human_votes_replace_the_judge_in_their_arena(upstream, teachers, tmp_path):
    _, config, base, _, _ = upstream
    models = {"base": base.uri, **teachers}
    votes = pd.DataFrame([{"arena": "t2i", "prompt": "a circle", "model_a": "t2i_teacher", "model_b": other,
                           "winner": "a"} for other in ("base", "edit_teacher") for _ in range(5)]
                         + [{"arena": "t2i", "prompt": "a square", "model_a": "base", "model_b": "edit_teacher",
                             "winner": "tie"}])
    path = tmp_path / "votes.parquet"
    votes.to_parquet(path)
    result = run_bench(config, models, votes=str(path), output_root=str(tmp_path / "art"))
    m = result.metrics
    assert m["battle_sources"] == {"t2i": "human votes", "edit": "judge"} and m["battles"]["t2i"] == 11
    t2i = m["arenas"]["t2i"]
    assert t2i["t2i_teacher"]["rating"] > max(t2i["base"]["rating"], t2i["edit_teacher"]["rating"]) + 100
    votes.loc[3, "winner"] = "both"
    votes.to_parquet(path)
    with pytest.raises(ConfigError, match="row 3.*winner"):
        run_bench(config, models, votes=str(path), output_root=str(tmp_path / "art2"))


def test_bad_inputs_fail_before_any_sampling(upstream, tmp_path):
    _, config, base, _, _ = upstream
    with pytest.raises(ConfigError, match="at least two models"):
        run_bench(config, {"base": base.uri}, output_root=str(tmp_path))
    with pytest.raises(ConfigError, match="bench.anchor"):
        run_bench(config, {"a": base.uri, "b": base.uri}, output_root=str(tmp_path))
    with pytest.raises(ConfigError, match="model name"):
        run_bench(config, {"base": base.uri, "a b": base.uri}, output_root=str(tmp_path))
    with pytest.raises(ArtifactError, match="no manifest.json"):
        run_bench(config, {"base": base.uri, "gone": str(tmp_path / "missing")}, output_root=str(tmp_path))
    assert not (tmp_path / "bench").exists()  # nothing written


def _texts_in(frame: pd.DataFrame, column: str) -> set[str]:
    return set(frame[column].dropna().astype(str))


def test_no_bench_prompt_occurs_in_any_training_filtering_or_annotation_set(upstream, teachers):
    """The bench split is disjoint from every set a stage trains, filters,
    annotates or monitors on: the artifacts' own prompt tables, the held-out
    judge sets, and the pretraining stream."""
    from flowrl.evaluation import heldout_sets
    from flowrl.storage import read_manifest

    _, config, base, rm, prompts = upstream
    reserved = set().union(*bench_texts("t2i").values(), *bench_texts("edit").values())
    bench = bench_set(config)
    assert set(bench.t2i_prompts) | set(bench.edit_instructions) <= reserved
    seen: dict[str, set[str]] = {}
    annotations = fetch(read_manifest(rm.uri).inputs["annotations"])
    for path in sorted(annotations.rglob("*.parquet")):
        frame = pd.read_parquet(path)
        for column in ("prompt", "instruction"):
            if column in frame:
                seen[f"annotate:{path.name}:{column}"] = _texts_in(frame, column)
    assert seen, "the annotation artifact holds no prompt tables"
    for task, result in prompts.items():
        seen[f"filter_prompts_{task}"] = _texts_in(pd.read_parquet(fetch(result.uri) / "prompts.parquet"), "prompt")
    t2i, edits = heldout_sets(config)
    seen["eval heldout"] = {e.prompt for e in t2i} | {e.instruction for e in edits}
    rng = np.random.default_rng(0)
    seen["pretraining stream"] = {p for _ in range(100) for p in draw_batch(rng, 64, 0.5, 32).prompts}
    for name, texts in seen.items():
        assert texts, name
        assert not texts & reserved, f"{name} holds bench prompts: {sorted(texts & reserved)[:5]}"
    # the stream covers the rest of the grammar, so the check above is not vacuous
    train_texts = {t for task in ("t2i", "edit") for ts in grammar(task).values() for t in ts} - reserved
    assert len(seen["pretraining stream"]) > 0.9 * len(train_texts)


def test_bench_refuses_the_judge_for_a_family_without_one(upstream):
    _, config, base, _, _ = upstream
    other = dataclasses.replace(config, model=dataclasses.replace(config.model, family="qwen_image"))
    with pytest.raises(ConfigError, match="bench.scorer: qwen_image has no judge"):
        run_bench(other, {"base": base.uri, "b": base.uri})


CHECK_SCRIPT = """
<script>
window.addEventListener('load', () => {
  const images = Array.from(document.images);
  const tables = Array.from(document.querySelectorAll('table'));
  const out = {
    images: images.length,
    decoded: images.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
    tables: tables.length,
    rows: tables.map(t => t.querySelectorAll('tbody tr').length),
    headings: Array.from(document.querySelectorAll('h2')).map(h => h.textContent),
  };
  const pre = document.createElement('pre');
  pre.id = 'flowrl-check';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>
"""


def _chromium() -> str:
    import shutil

    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise AssertionError("no headless browser: install Debian's chromium (apt-get install chromium; `make test` does, through its browser target)")


def test_report_renders_in_a_real_browser(benched, tmp_path):
    """Every image of report.html decodes and every table is there, in headless chromium."""
    import re
    import subprocess

    _, models, result = benched
    page = (fetch(result.uri) / "report.html").read_text()
    checked = tmp_path / "report.html"
    checked.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    run = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom",
         checked.as_uri()], capture_output=True, text=True, timeout=120)
    found = re.search(r'<pre id="flowrl-check">(.*?)</pre>', run.stdout)
    assert found, f"the check script did not run (rc {run.returncode}): {run.stderr[-2000:]}"
    out = json.loads(found.group(1).replace("&quot;", '"'))
    images = 5 + len(grammar("t2i")) + len(grammar("edit"))  # elo, both curves, two overall grids, one per group
    assert out["images"] == images and out["decoded"] == images
    # the gains tables have a row per model but the anchor (the second, and the two by category and kind)
    assert out["tables"] == 10
    claims = 2 + 4  # the T2I teacher's gain and fidelity; the edit teacher's gain, fidelity, identity and kinds
    assert out["rows"] == [len(models), len(models) - 1, claims, len(models), len(models), len(models) - 1,
                           len(models) - 1, len(models), len(models), len(models)]
    assert {"Pillars", "Arena ratings", "Elo per arena", "Training curves",
            "Reward vs judge during training"} <= set(out["headings"])


def test_bench_moves_the_champion_alias_only_to_a_better_student(upstream, teachers, tmp_path):
    from mlflow.tracking import MlflowClient

    from flowrl.stages.opd import run_opd

    _, config, base, _, prompts = upstream
    student = run_opd(config, base.uri, teachers, {t: prompts[t].uri for t in ("t2i", "edit")}, progress=False)
    first = run_bench(config, {"base": base.uri, "student": student.uri}, output_root=str(tmp_path / "a"))
    client = MlflowClient(config.run.tracking_uri)
    holder = client.get_model_version_by_alias(f"{config.run.name}-student", "champion")
    assert holder.source == student.uri
    assert float(holder.tags["flowrl.bench_overall"]) == pytest.approx(
        first.metrics["models"]["student"]["pillars"]["overall"], abs=1e-4)
    again = run_bench(config, {"base": base.uri, "student": student.uri}, output_root=str(tmp_path / "b"))
    assert again.metrics["champion"] == {"alias": "champion", "moved_to_student": False}  # not better than itself


def test_reward_models_score_the_bench_through_the_same_path(upstream, teachers, tmp_path):
    """bench.scorer: reward_models (production, no judge): the smoke reward models give the pillars and battles."""
    _, config, base, rm, _ = upstream
    scored = dataclasses.replace(config, bench=dataclasses.replace(config.bench, scorer="reward_models"))
    models = {"base": base.uri, **teachers}
    with pytest.raises(ConfigError, match="reward_model"):
        run_bench(scored, models, output_root=str(tmp_path))
    result = run_bench(scored, models, reward_model=rm.uri, output_root=str(tmp_path))
    m = result.metrics
    assert m["scorer"] == "reward_models" and m["battles"]["t2i"] == 3 * 12
    for name in models:
        p = m["models"][name]["pillars"]
        assert all(0 <= p[k] <= 100 for k in PILLARS)
        assert p["t2i_alignment"] not in (0.0, 100.0)  # continuous scores, not the judge's 0/1
    judged = run_bench(config, models, output_root=str(tmp_path / "judge")).metrics
    assert judged["models"]["base"]["pillars"] != m["models"]["base"]["pillars"]


def test_relative_uri_names_local_artifacts_under_the_working_directory_relatively(tmp_path, monkeypatch):
    from flowrl.stages.common import relative_uri

    (tmp_path / "artifacts" / "base" / "v1").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert relative_uri(str(tmp_path / "artifacts" / "base" / "v1")) == "artifacts/base/v1"
    assert relative_uri(f"file://{tmp_path}/artifacts/base/v1") == "artifacts/base/v1"
    assert relative_uri("artifacts/base/v1") == "artifacts/base/v1"
    assert relative_uri("/elsewhere/base/v1") == "/elsewhere/base/v1"
    assert relative_uri("s3://bucket/base/v1") == "s3://bucket/base/v1"


def test_a_results_command_line_names_local_paths_relatively(tmp_path, monkeypatch):
    import sys

    from flowrl.cli import _command_line

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["flowrl", "bench", "--model", f"base={tmp_path}/artifacts/base/v1",
                                      "--annotations", f"{tmp_path}/artifacts/annotate/v2", "--results",
                                      "results/b.json", "--model", "t=s3://bucket/grpo/v3", "/elsewhere/x"])
    assert _command_line() == ("flowrl bench --model base=artifacts/base/v1 --annotations artifacts/annotate/v2 "
                               "--results results/b.json --model t=s3://bucket/grpo/v3 /elsewhere/x")


def _grpo_round(root: Path, version: str, history, init: str | None = None, stage: str = "grpo_t2i",
                rnd: str | None = None, store: str = "artifacts") -> str:
    """A committed ``stage`` artifact in ``root/store`` holding only ``history`` as its history.json;
    ``init``: the artifact whose policy it continues (a second round's); ``rnd``: its round input."""
    from flowrl.storage import ArtifactStore

    staging = root / f"staging-{store}-{version}"
    staging.mkdir(parents=True)
    (staging / "history.json").write_text(json.dumps(history))
    inputs = {"round": rnd or "1"} if init is None else {"round": rnd or "2", "init": init}
    return ArtifactStore(str(root / store)).commit(staging, stage=stage, version=version, config_hash="x",
                                                   inputs=inputs)


def _round_history(iterations: int, reward: float) -> dict:
    return {"history": [{"train/reward": reward}] * iterations,
            "monitor": [{"iteration": 0, "heldout": 0.4}, {"iteration": iterations, "heldout": 0.5}]}


def test_a_second_round_is_benched_after_the_first_it_continues(tmp_path, monkeypatch):
    """The round-2 artifact's init is read as <stage>/<version> in the store holding round 2, however it
    was recorded (relative to the working directory, or the absolute URI grpo records as given), and the
    report gets both rounds: round 2's iterations after round 1's 3, where it began recorded."""
    from flowrl.stages.bench import model_history
    from flowrl.stages.common import relative_uri

    monkeypatch.chdir(tmp_path)
    first, second = _round_history(3, 1.0), _round_history(2, 5.0)
    round1 = _grpo_round(tmp_path, "a" * 16, first)
    assert round1.startswith("/") and not relative_uri(round1).startswith("/")
    for version, init in (("b" * 16, relative_uri(round1)), ("c" * 16, round1)):
        round2 = _grpo_round(tmp_path, version, second, init=init)
        run = model_history(round2, fetch(round2))
        assert run["rounds"] == [{"round": 1, "start": 0}, {"round": 2, "start": 3}], init
        assert [row["train/reward"] for row in run["history"]] == [1.0, 1.0, 1.0, 5.0, 5.0]
        assert [m["iteration"] for m in run["monitor"]] == [0, 3, 3, 5]
    assert model_history(round1, fetch(round1)) == first  # one round: its own history.json, as it was


def test_a_moved_store_still_finds_the_first_round(tmp_path, monkeypatch):
    """The init recorded as an absolute path of the store's old place is re-rooted in the store holding
    round 2, so a store moved (or copied) elsewhere still shows both rounds."""
    from flowrl.stages.bench import model_history

    monkeypatch.chdir(tmp_path)
    old = tmp_path / "old"
    round1 = _grpo_round(old, "a" * 16, _round_history(3, 1.0))
    round2 = _grpo_round(old, "b" * 16, _round_history(2, 5.0), init=round1)
    (old / "artifacts").rename(tmp_path / "moved")
    moved = str(tmp_path / "moved" / "grpo_t2i" / ("b" * 16))
    assert not Path(round1).exists() and round2 != moved
    assert model_history(moved, fetch(moved))["rounds"][-1] == {"round": 2, "start": 3}


def test_an_init_that_cannot_be_followed_leaves_the_model_its_own_history(tmp_path, monkeypatch, caplog):
    """An init outside the store (../.., an absolute path elsewhere, another store's artifact the model's
    store lacks), missing, of another stage, not a first round, corrupt, too large, or with a history of
    the wrong shape: the model's own round only, with a warning, never a run with a round missing and
    never a bench that fails."""
    import hashlib
    import logging

    import flowrl.stages.bench as bench_stage
    from flowrl.storage import file_uri

    monkeypatch.chdir(tmp_path)
    own = _round_history(2, 5.0)
    good = _grpo_round(tmp_path, "1" * 16, _round_history(3, 1.0))
    corrupt = _grpo_round(tmp_path, "c" * 16, _round_history(3, 1.0))
    Path(file_uri(corrupt, "history.json")).write_text("{}")
    elsewhere = _grpo_round(tmp_path, "e" * 16, _round_history(3, 1.0), store="other")
    other_stage = _grpo_round(tmp_path, "d" * 16, _round_history(3, 1.0), stage="grpo_edit")
    second = _grpo_round(tmp_path, "2" * 16, _round_history(3, 1.0), init=good)
    listed = _grpo_round(tmp_path, "3" * 16, [{"iteration": 0}])
    no_iteration = _grpo_round(tmp_path, "4" * 16, {"history": [], "monitor": [{"heldout": 0.4}]})
    bool_iteration = _grpo_round(tmp_path, "5" * 16, {"history": [], "monitor": [{"iteration": True}]})
    deep = _grpo_round(tmp_path, "6" * 16, {"history": [], "monitor": []})
    blob = ("[" * 100_000 + "]" * 100_000).encode()  # JSON nested past Python's recursion limit
    Path(file_uri(deep, "history.json")).write_bytes(blob)
    manifest_path = Path(deep) / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["history.json"] = {"sha256": hashlib.sha256(blob).hexdigest(),
                                         "bytes": len(blob)}
    manifest_path.write_text(json.dumps(manifest))
    big = _grpo_round(tmp_path, "7" * 16, _round_history(3, 1.0))
    cases = [("../../x", "not an artifact's <stage>/<version>"),
             ("/etc/passwd", "not an artifact's <stage>/<version>"),
             (f"../../../{Path(good).name}", "not an artifact of the model's own stage"),  # stage ".."
             (elsewhere, "no manifest.json"),  # re-rooted: this store has no such version
             ("http://example.invalid/grpo_t2i/" + "9" * 16, "no manifest.json"),
             (str(tmp_path / "gone"), "not an artifact's <stage>/<version>"),
             (other_stage, "not an artifact of the model's own stage grpo_t2i"),
             (good.replace("grpo_t2i/", "grpo_t2i.checkpoints/") + "-5", "not an artifact of the model's own stage"),
             (second, "not a first round of grpo_t2i"),
             (corrupt, "checksum mismatch"),
             (listed, "holds a JSON list, not an object"),
             (no_iteration, 'monitor point 0 has no integer "iteration"'),
             (bool_iteration, 'monitor point 0 has no integer "iteration"'),
             (deep, "cannot be shown"),
             (big, "bytes, over the 100 read"),
             ("x" * 5000 + "\n" * 50, "(5050 characters)")]  # a hostile value, cut short in the log line
    for index, (init, why) in enumerate(cases):
        uri = _grpo_round(tmp_path, f"{0xf000 + index:016x}", own, init=init)
        monkeypatch.setattr(bench_stage, "MAX_HISTORY_BYTES", 100 if init == big else 64 * 2**20)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flowrl.stages.bench"):
            assert bench_stage.model_history(uri, fetch(uri)) == own, why
        assert why in caplog.text and "showing the model's own training only" in caplog.text, caplog.text
        assert len(caplog.text) < 1500 and "\n" not in caplog.messages[0], caplog.text
    monkeypatch.setattr(bench_stage, "MAX_HISTORY_BYTES", 64 * 2**20)
    uri = _grpo_round(tmp_path, "abcdabcdabcdabcd", own, init=good)  # the same store, in reach
    assert bench_stage.model_history(uri, fetch(uri))["rounds"][-1] == {"round": 2, "start": 3}


def test_the_pipeline_run_carries_overall_scores_ratings_and_gains():
    from flowrl.stages.common import flat_metrics
    from tasks.bench import pipeline_headline

    metrics = {"models": {"base": {"pillars": {"overall": 50.0, "identity": 60.0}, "sample_and_score_s": 3.0}},
               "arenas": {"t2i": {"base": {"rating": 1000.0, "ci_low": 990.0, "ci_high": 1010.0}}},
               "gains": {"student": {"fidelity": {"delta": -0.01, "ci_low": -0.02, "ci_high": 0.0, "stderr": None}}},
               "wall_s": 9.0}
    assert pipeline_headline(flat_metrics(metrics)) == {
        "models/base/pillars/overall": 50.0, "arenas/t2i/base/rating": 1000.0, "arenas/t2i/base/ci_low": 990.0,
        "arenas/t2i/base/ci_high": 1010.0, "gains/student/fidelity/delta": -0.01,
        "gains/student/fidelity/ci_low": -0.02, "gains/student/fidelity/ci_high": 0.0}


def test_grid_thumbnails_keep_small_images_and_stride_large_ones():
    from flowrl.stages.bench import GRID_PIXELS, _thumbnails

    small = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
    assert np.array_equal(_thumbnails(small), small)
    large = np.zeros((1, 1024, 600, 3), np.uint8)
    large[0, ::4, ::4] = 255  # the pixels a stride of 4 keeps
    thumb = _thumbnails(large)
    assert thumb.shape == (1, GRID_PIXELS, 150, 3) and (thumb == 255).all()
