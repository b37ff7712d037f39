"""Stage `bench`: pillar scores, T2I and edit arenas, and the report (:mod:`flowrl.bench`).

Inputs: any number of model artifacts by name (base, teachers, student, or
any checkpoint a user points at; ``bench.anchor`` names the one pinned at
Elo 1000) and optionally a parquet of human votes (schema in
:func:`flowrl.arena.validate_votes`) whose battles replace the judge's in the
arenas they cover. Every model samples the same bench items with the same
seeds and the deployment sampler, one model loaded at a time; the scorers
read the images after the last model is unloaded.

Bench items: the shapes world's come from the bench split of its grammar
and are scored by the judge (or, ``bench.scorer: reward_models``, by the
reward_model stage's models). Production (``qwen_image``) reads them from
``bench.t2i_prompts`` / ``bench.edit_prompts``, refused if any prompt occurs
in a filter or annotation file, and scores each pillar with the source
``bench.scorers`` names (reward-model scorers; SSIM for identity).

Outputs: ``bench.json`` (per model the pillars and overall; per arena the
Elo rating and interval of every model; ``gains``: per model but the anchor
and per pillar, the gain over the anchor on the 0-1 scale with a paired
bootstrap interval over bench items, ``{delta, ci_low, ci_high, stderr}``;
``gains_by_category``: the same per ``t2i_alignment/<category>`` and
``edit_accuracy/<kind>``; ``arena_flags``: per arena the models that won or
lost every battle against some opponent, whose rating the fit's prior sets;
``two_task``: each model's mean of T2I alignment and edit accuracy and every
pair's difference ``a-b`` with a paired bootstrap interval),
``scores.parquet`` (every model's per-item scores), ``battles.parquet``, and
the report: ``report.md``, ``report.html`` (self-contained) and its PNGs.
Each model's training curves come from the ``history.json`` its artifact
carries (GRPO and OPD runs); a second GRPO round's artifact names the first
round's as its ``init`` input, looked up as ``<stage>/<version>`` in the
store holding the second round, and the report shows the two rounds as one
run (:func:`model_history`). Local artifact paths under the working
directory are recorded relative to it.
When a model named ``student`` is benched, the ``champion`` alias of the
registered model ``<run.name>-student`` moves to it if its overall score
beats the current holder's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from flowrl.arena import Battle, arena_flags, validate_votes
from flowrl.bench import (
    ARENAS,
    BenchImages,
    BenchSet,
    FileBenchScorer,
    ItemScores,
    RewardModelScorer,
    ShapesJudgeScorer,
    arena_battles,
    arena_ratings,
    bench_gains,
    bench_set,
    group_gains,
    pillars,
    sample_bench,
    two_task_difference,
    win_rates,
)
from flowrl.config import ConfigError, FlowRLConfig, clip_text, pillar_sources, shown_value
from flowrl.evaluation import to_uint8
from flowrl.models import check_policy, load_policy
from flowrl.models.families import family_of
from flowrl.report import Grid, ReportData, chain_rounds, write_report
from flowrl.stages.common import (StageResult, commit_stage, committed_result, flat_metrics, progress_bar,
                                  relative_uri, stage_context)
from flowrl.stages.registry import stage_sections
from flowrl.storage import (ArtifactError, ArtifactStore, Manifest, content_stamps, fetch, file_uri, input_identity,
                            read_manifest, sha256_file, url_to_fs)
from flowrl.tracking import Tracker

log = logging.getLogger(__name__)

STAGE = "bench"
SECTIONS = stage_sections(STAGE)  # production adds the model section (_model_key) to its inputs


def input_stamps(config: FlowRLConfig) -> dict[str, str]:
    """{config key: content stamp} of the files this stage reads besides artifacts (the bench prompt
    files, and the filter and annotation files they are checked against): part of its Flyte cache key."""
    from flowrl.stages import annotate, filter_prompts

    paths = {f"bench.{t}_prompts": getattr(config.bench, f"{t}_prompts") for t in ("t2i", "edit")}
    stamps = content_stamps(paths)
    return {**stamps, **filter_prompts.input_stamps(config), **annotate.input_stamps(config), **_model_key(config)}


def _model_key(config: FlowRLConfig) -> dict[str, str]:
    """Production: the model section (pretrained weights, height, width, dtype) shapes the images of a
    model artifact at bench time, so it is part of the bench's key; a shapes checkpoint carries its model."""
    return family_of(config).model_key(config)


REPORT_FILES = ("report.md", "report.html", "elo.png", "curves.png", "rl_curves.png", "grid_t2i.png", "grid_edit.png")
GROUP_GRIDS = re.compile(r"^grid_(t2i|edit)_[A-Za-z0-9_-]+\.png$")  # the per-category and per-kind grids
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def _check_models(config: FlowRLConfig, models: dict[str, str]) -> None:
    if len(models) < 2:
        raise ConfigError(f"bench: needs at least two models to compare, got {sorted(models)}")
    for name in models:
        if not _NAME.match(name):
            raise ConfigError(f"bench: model name {name!r} must be letters, digits, '_', '.', '-'")
    if config.bench.anchor not in models:
        raise ConfigError(f"bench.anchor: {config.bench.anchor!r} is not one of the benched models "
                          f"({', '.join(models)})")


def _grid_columns(n: int, k: int) -> list[int]:
    """``k`` item indices spread evenly over ``n`` (one per category when they divide)."""
    return sorted({i * n // k for i in range(min(k, n))})


def _group_columns(labels: list[str], k: int) -> dict[str, list[int]]:
    """{category: up to ``k`` indices of its items, spread evenly over them}, categories in bench order."""
    labels = np.asarray(labels)
    out = {}
    for label in dict.fromkeys(labels.tolist()):
        items = np.flatnonzero(labels == label)
        out[label] = [int(items[i]) for i in _grid_columns(len(items), k)]
    return out


GRID_PIXELS = 256  # the per-category grids keep every k-th pixel of larger images, to at most this many a side


def _thumbnails(images: np.ndarray) -> np.ndarray:
    """[K, H, W, 3] -> a strided copy at most :data:`GRID_PIXELS` a side (a production bench's grids hold
    hundreds of images; a grid cell shows about 150 pixels)."""
    step = max(1, -(-max(images.shape[1:3]) // GRID_PIXELS))
    return np.ascontiguousarray(images[:, ::step, ::step])


def _category_grids(bench: BenchSet, columns: dict[str, dict[str, list[int]]],
                    images: dict[str, dict[str, dict[str, np.ndarray]]], scores: dict[str, ItemScores],
                    marked: bool) -> dict[str, dict[str, Grid]]:
    """task -> category (or kind) -> its grid: the same items and seeds in every model's row, the sources
    first for edits, framed by the judge's verdict when ``marked``."""
    texts = {"t2i": bench.t2i_prompts, "edit": bench.edit_instructions}
    correct = {"t2i": "t2i_correct", "edit": "edit_correct"}
    out: dict[str, dict[str, Grid]] = {}
    for task, groups in columns.items():
        out[task] = {}
        for group, cols in groups.items():
            rows = {name: images[task][name][group] for name in images[task]}
            marks = ({name: getattr(scores[name], correct[task])[cols] >= 0.5 for name in rows} if marked else None)
            sources = to_uint8(bench.sources[cols]) if task == "edit" else None
            out[task][group] = Grid([texts[task][i] for i in cols], rows, sources, marks)
    return out


def _rounded(table: dict[str, dict[str, dict[str, float]]]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Gains for bench.json: 4 decimals, an undefined standard error (one item) as null."""
    return {model: {key: {field: round(value, 4) if np.isfinite(value) else None for field, value in gain.items()}
                    for key, gain in by_key.items()} for model, by_key in table.items()}


HISTORY = "history.json"
# an earlier round's history.json is read whole into memory: one larger than this is refused (a GRPO run's
# is a few hundred bytes per iteration, so this is far above any real run's)
MAX_HISTORY_BYTES = 64 * 2**20
_NUMBERS = {"history": ("train/reward", "train/loss"), "monitor": ("heldout", "fidelity", "train_reward")}


def _history(model_dir: Path) -> dict | None:
    path = model_dir / HISTORY
    return json.loads(path.read_text()) if path.is_file() else None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_history(data: object) -> dict:
    """``data`` when it has the shape :func:`flowrl.stages.common.write_history` writes (an object whose
    "history" is a list of objects and whose "monitor" is a list of objects, each with an integer
    "iteration"; the metrics the report draws numbers or null), else ValueError saying what is wrong."""
    if not isinstance(data, dict):
        raise ValueError(f"{HISTORY} holds a JSON {type(data).__name__}, not an object")
    for key, numbers in _NUMBERS.items():
        rows = data.get(key)
        if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
            raise ValueError(f'{HISTORY}: "{key}" is not a list of objects')
        for index, row in enumerate(rows):
            if key == "monitor" and not (isinstance(row.get("iteration"), int)
                                         and not isinstance(row.get("iteration"), bool)):
                raise ValueError(f'{HISTORY}: monitor point {index} has no integer "iteration"')
            bad = [name for name in numbers if row.get(name) is not None and not _is_number(row[name])]
            if bad:
                raise ValueError(f'{HISTORY}: {key} entry {index}: "{bad[0]}" is not a number')
    return data


def _stored_history(uri: str, manifest: Manifest) -> dict | None:
    """The ``history.json`` of the artifact at ``uri`` read on its own, not the whole checkpoint (a
    pretrained model's weights are far larger), checked against its manifest, its size (at most
    :data:`MAX_HISTORY_BYTES`) and its shape (:func:`_check_history`); None when it has none."""
    meta = manifest.files.get(HISTORY)
    if meta is None:
        return None
    if meta["bytes"] > MAX_HISTORY_BYTES:
        raise ValueError(f"its {HISTORY} is {meta['bytes']} bytes, over the {MAX_HISTORY_BYTES} read")
    fs, path = url_to_fs(file_uri(uri, HISTORY))
    with fs.open(path, "rb") as handle:
        blob = handle.read(MAX_HISTORY_BYTES + 1)  # no more than that, whatever the file has become
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise ArtifactError(f"{uri}: checksum mismatch for {HISTORY}")
    return _check_history(json.loads(blob))


def _store_root(uri: str) -> str:
    """The root of the artifact store holding the artifact at ``uri`` (``<root>/<stage>/<version>``,
    :meth:`flowrl.storage.ArtifactStore.uri`): ``uri`` less its last two parts."""
    if "://" not in uri:
        return str(Path(uri).resolve().parent.parent)
    scheme, _, path = uri.partition("://")
    parts = path.rstrip("/").split("/")
    if len(parts) < 3:
        raise ValueError(f"{uri} is not <store>/<stage>/<version>")
    return f"{scheme}://{'/'.join(parts[:-2])}"


def _first_round_uri(uri: str, manifest: Manifest, init: str) -> str:
    """Where the first round that the artifact at ``uri`` (its ``manifest``) continues lies: its ``init``
    input read as ``<stage>/<version>`` only (:func:`flowrl.storage.input_identity`, however the
    pipeline spelled it) in the store that holds ``uri``, whatever other path, bucket or URL it names;
    the stage must be the model's own. ValueError otherwise."""
    tail = input_identity(init)
    if not tail.startswith("artifact:"):
        raise ValueError("not an artifact's <stage>/<version>")
    stage, version = tail.removeprefix("artifact:").split("/")
    if stage != manifest.stage or not re.fullmatch(r"[0-9a-f]{16}", version):
        raise ValueError(f"not an artifact of the model's own stage {manifest.stage}")
    return ArtifactStore(_store_root(uri)).uri(stage, version)


def _earlier_round(uri: str) -> dict | None:
    """The history of the first round that the artifact at ``uri`` continues when it is a second GRPO
    round (its ``init`` input, :func:`_first_round_uri`); None when it has no init. None with a warning
    when the init cannot be followed or read, is not a first round of the same stage, or has no
    history: the report then shows the model's own round only, never a run with a round missing."""
    shown = "?"
    try:
        manifest = read_manifest(uri)
        init = manifest.inputs.get("init")
        if not init:
            return None
        shown = shown_value(init)
        first_uri = _first_round_uri(uri, manifest, init)
        first = read_manifest(first_uri)
        if first.stage != manifest.stage or first.inputs.get("round") != "1":
            raise ValueError(f"not a first round of {manifest.stage} (stage {shown_value(first.stage)}, round "
                             f"{shown_value(first.inputs.get('round'))})")
        history = _stored_history(first_uri, first)
        if history is None:
            raise ValueError(f"it has no {HISTORY}")
    # deliberately broad: a hostile or damaged earlier round (deep JSON: RecursionError; an fsspec
    # backend's own errors) may only cost the report its first round, never the bench its results
    except Exception as exc:  # noqa: BLE001 - see above
        log.warning("bench: %s: its init %s cannot be shown (%s); showing the model's own training only",
                    uri, shown, clip_text(" ".join(str(exc).split()), 300))
        return None
    return history


def model_history(uri: str, model_dir: Path) -> dict | None:
    """The training history the report shows for the model at ``uri`` (fetched to ``model_dir``): its own
    ``history.json``, after the first round's when it is a second round's (:func:`_earlier_round`,
    :func:`flowrl.report.chain_rounds`); None when its artifact carries no history."""
    own = _history(model_dir)
    if own is None:
        return None
    first = _earlier_round(uri)
    return chain_rounds([own] if first is None else [first, own])


def run_bench(
    config: FlowRLConfig,
    models: dict[str, str],
    *,
    votes: str | None = None,
    reward_model: str | None = None,
    output_root: str | None = None,
    tracker: Tracker | None = None,
    progress: bool = True,
) -> StageResult:
    """Bench ``models`` ({name: artifact URI}) and write the report. ``reward_model``:
    the reward_model stage's artifact, used (and required) when ``bench.scorer`` is
    ``reward_models``. ``progress``: bars over the models as they are sampled, then scored."""
    # long: the bench's flow in order: inputs and cache, each model sampled and scored, the votes,
    # the arenas and the report; each step is short and they share the per-model results
    _check_models(config, models)
    production = not family_of(config).has_judge
    inputs = {f"model_{name}": uri for name, uri in models.items()}
    if config.bench.scorer == "reward_models":
        if not reward_model:
            raise ConfigError("bench.scorer: reward_models needs the reward_model stage's artifact "
                              "(--reward-model URI)")
        inputs["reward_model"] = reward_model
    elif production:
        raise ConfigError(f"bench.scorer: {config.model.family} has no judge; set it to reward_models")
    vote_battles: dict[str, list[Battle]] = {}
    if votes is not None:
        try:
            vote_battles = validate_votes(pd.read_parquet(votes), list(models))
        except (ValueError, OSError) as exc:
            raise ConfigError(f"{votes}: {exc}") from None
        inputs["votes"] = f"{votes}#sha256={sha256_file(votes)}"
    # the bench items (production: the prompt files, checked unseen by training) before anything loads
    bench = bench_set(config)
    if production:
        inputs.update(bench_items=bench.version, **_model_key(config))
    done = committed_result(STAGE, config, SECTIONS, inputs, output_root)
    if done is not None:
        return done
    # Every input is checked (manifest, checksums, weights) before any sampling.
    dirs = {name: fetch(uri) for name, uri in models.items()}
    for directory in dirs.values():
        check_policy(directory, config)
    names = list(models)
    if production:
        scorer = FileBenchScorer(reward_model, pillar_sources(config.bench.scorers), config.bench.tie_tolerance,
                                 batch_size=config.bench.batch_size)
    elif config.bench.scorer == "reward_models":
        from flowrl.rewards.shapes_rewards import load_shapes_rewards

        scorer = RewardModelScorer(load_shapes_rewards(config, reward_model), config.bench.tie_tolerance)
    else:
        scorer = ShapesJudgeScorer()
    with stage_context(STAGE, config, SECTIONS, inputs, tracker=tracker) as ctx, \
            tempfile.TemporaryDirectory(prefix="flowrl-bench-") as spill:
        start = time.perf_counter()
        t_cols = _grid_columns(len(bench.t2i_prompts), config.bench.grid_items)
        e_cols = _grid_columns(len(bench.edit_instructions), config.bench.grid_items)
        group_cols = {"t2i": _group_columns(bench.t2i_categories, config.bench.grid_items),
                      "edit": _group_columns(bench.edit_kinds, config.bench.grid_items)}
        # every model samples first, one loaded at a time; the scorers load after the last one
        images, t2i_grid, edit_grid, per_model_s = {}, {}, {}, {}
        group_images: dict[str, dict[str, dict[str, np.ndarray]]] = {"t2i": {}, "edit": {}}
        quiet = logging.DEBUG if progress else logging.INFO  # a line per model where no bar shows the models
        for name in progress_bar(names, desc="bench: sample", enabled=progress, unit="model"):
            t0 = time.perf_counter()
            # each task's own model: the base artifact's edit model is the edit pipeline, not the T2I one
            sampled = sample_bench(partial(load_policy, dirs[name], config), bench, config, release=_release_memory)
            t2i_grid[name], edit_grid[name] = sampled.t2i[t_cols].copy(), sampled.edit[e_cols].copy()
            for task in group_images:
                part = getattr(sampled, task)
                group_images[task][name] = {g: _thumbnails(part[cols]) for g, cols in group_cols[task].items()}
            images[name] = _spilled(sampled, Path(spill) / name) if production else sampled
            del sampled
            per_model_s[name] = time.perf_counter() - t0
            log.log(quiet, "bench: %s sampled in %.1f s", name, per_model_s[name])
        scores = {}
        for name in progress_bar(names, desc="bench: score", enabled=progress, unit="model"):
            t0 = time.perf_counter()
            scores[name] = scorer(bench, images[name])
            per_model_s[name] = round(per_model_s[name] + time.perf_counter() - t0, 1)
            log.log(quiet, "bench: %s scored (%s)", name, scorer.name)
        table = {name: pillars(scores[name], bench) for name in names}
        battles = arena_battles(scores, config.bench.tie_tolerance, scorer.primary_tolerance)
        sources = {arena: "judge" if isinstance(scorer, ShapesJudgeScorer) else "reward models" for arena in ARENAS}
        for arena, arena_votes in vote_battles.items():
            battles[arena], sources[arena] = arena_votes, "human votes"
        ratings = arena_ratings(battles, names, config)
        settings = config.bench
        gains = _rounded(bench_gains(scores, settings.anchor, settings.bootstrap, settings.confidence, settings.seed))
        by_category = _rounded(group_gains(scores, bench, settings.anchor, settings.bootstrap, settings.confidence,
                                           settings.seed))
        flags = {arena: arena_flags(battles[arena], names) for arena in ARENAS}
        two_task = _two_task(scores, names, settings)
        data = ReportData(
            title="flowrl bench",
            models=names,
            anchor=config.bench.anchor,
            pillars=table,
            ratings=ratings,
            win_rates={arena: win_rates(battles[arena], names) for arena in ARENAS},
            battles={arena: len(battles[arena]) for arena in ARENAS},
            t2i_grid=([bench.t2i_prompts[i] for i in t_cols], t2i_grid),
            edit_grid=([bench.edit_instructions[i] for i in e_cols], to_uint8(bench.sources[e_cols]), edit_grid),
            histories={name: h for name, d in dirs.items() if (h := model_history(models[name], d)) is not None},
            # a frame marks the judge's verdict; continuous reward-model scores have no verdict to show
            grid_marks={} if production else {
                "t2i": {n: scores[n].t2i_correct[t_cols] >= 0.5 for n in names},
                "edit": {n: scores[n].edit_correct[e_cols] >= 0.5 for n in names}},
            notes=[
                f"Bench {bench.version}: {len(bench.t2i_prompts)} T2I prompts and {len(bench.edit_instructions)} "
                f"edits {_ITEMS_FROM[production]}; one seed per item, the same for every model; deployment sampler "
                f"({config.sampler.num_steps} steps, CFG {config.sampler.guidance_scale}).",
                f"Scores: {scorer.name}. Battles: T2I {sources['t2i']}, edit {sources['edit']}.",
                "Models: " + ", ".join(f"{n} ({read_manifest(models[n]).stage})" for n in names) + ".",
            ],
            gains=gains,
            group_gains=by_category,
            confidence=settings.confidence,
            arena_flags=flags,
            category_grids=_category_grids(bench, group_cols, group_images, scores, marked=not production),
        )
        written = write_report(data, ctx.staging)
        pd.DataFrame(
            [{"model": name, **row, **_item_scores(scores[name], k)}
             for name in names for k, row in enumerate(bench.rows())]
        ).to_parquet(ctx.staging / "scores.parquet", index=False)
        pd.DataFrame(
            [{"arena": arena, "model_a": b.model_a, "model_b": b.model_b, "outcome": b.outcome}
             for arena in ARENAS for b in battles[arena]]
        ).to_parquet(ctx.staging / "battles.parquet", index=False)
        metrics = {
            "bench_version": bench.version,
            "items": {"t2i": len(bench.t2i_prompts), "edit": len(bench.edit_instructions)},
            "scorer": scorer.name,
            "battle_sources": sources,
            "models": {name: {"artifact_uri": relative_uri(models[name]), "pillars": table[name],
                              "sample_and_score_s": per_model_s[name]} for name in names},
            "arenas": {arena: {name: {"rating": round(r.rating, 1), "ci_low": round(r.ci_low, 1),
                                      "ci_high": round(r.ci_high, 1)} for name, r in ratings[arena].items()}
                       for arena in ARENAS},
            "arena_flags": flags,
            "battles": {arena: len(battles[arena]) for arena in ARENAS},
            "gains": gains,
            "gains_by_category": by_category,
            "two_task": two_task,
            "gains_bootstrap": {"anchor": settings.anchor, "replicates": settings.bootstrap,
                                "confidence": settings.confidence,
                                "scale": "0-1", "resampled": "bench items, the same draw for both models"},
            "wall_s": round(time.perf_counter() - start, 1),
        }
        if "student" in models:  # the registry's champion alias follows the best student benched so far
            moved = ctx.tracker.promote("student", models["student"], table["student"]["overall"], config.run.name)
            metrics["champion"] = {"alias": "champion", "moved_to_student": moved}
        (ctx.staging / "bench.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        ctx.tracker.log_metrics(flat_metrics({name: table[name] for name in names}))
        ctx.tracker.log_metrics(flat_metrics({f"elo_{a}": {n: r.rating for n, r in ratings[a].items()}
                                              for a in ARENAS}))
        for path in written:
            ctx.tracker.log_artifact(path, subdir="report")
        result = commit_stage(ctx, STAGE, SECTIONS, inputs, metrics, output_root)
    log.info("bench: report at %s", file_uri(result.uri, 'report.html'))
    return result


_ITEMS_FROM = {
    False: "from the bench split of the grammar, which no training, filtering or annotation stage draws from",
    True: "from the bench prompt files, none of whose prompts occurs in the filter or annotation files",
}


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _spilled(images: BenchImages, directory: Path) -> BenchImages:
    """The images written to ``directory`` and mapped back read-only: a production bench holds
    gigabytes of images per model, which stay on disk until their batch is scored."""
    directory.mkdir(parents=True)
    arrays = {}
    for part in ("t2i", "edit"):
        np.save(directory / f"{part}.npy", getattr(images, part))
        arrays[part] = np.load(directory / f"{part}.npy", mmap_mode="r")
    return BenchImages(**arrays)


def _name_words(name: str) -> list[int]:
    """A model name as seed words: a pair's draws do not depend on which other models are benched."""
    return [int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "big")]


def _two_task(scores: dict, names: list[str], settings) -> dict:
    """Each model's two-task mean (T2I alignment and edit accuracy weighed equally, 0-1) and, for every
    pair of models ``a-b`` (``a`` listed first), the difference with its paired bootstrap interval
    (:func:`flowrl.bench.two_task_difference`): how the student compares with Mix-RL, one model trained
    on both tasks with the same budget."""
    means = {n: round(0.5 * (float(np.mean(scores[n].t2i_correct)) + float(np.mean(scores[n].edit_correct))), 4)
             for n in names}
    differences = {}
    for i, a in enumerate(names):
        for j, b in enumerate(names[i + 1:], start=i + 1):
            rng = np.random.default_rng([settings.seed, *_name_words(a), *_name_words(b)])
            d = two_task_difference(scores[a], scores[b], settings.bootstrap, settings.confidence, rng)
            differences[f"{a}-{b}"] = {k: round(v, 4) for k, v in d.items()}
    return {"means": means, "differences": differences}


def _item_scores(scores, k: int) -> dict[str, float]:
    n = len(scores.t2i_correct)
    if k < n:
        return {"correct": scores.t2i_correct[k], "secondary": scores.t2i_fidelity[k],
                "fidelity": scores.t2i_fidelity[k]}
    j = k - n
    return {"correct": scores.edit_correct[j], "secondary": scores.edit_identity[j],
            "fidelity": scores.edit_fidelity[j]}


def report_files(uri: str) -> dict[str, bytes]:
    """The report files of a bench artifact (those present, the per-category grids too), checksums verified."""
    local = fetch(uri)
    names = [name for name in REPORT_FILES if (local / name).is_file()]
    names += sorted(p.name for p in local.iterdir() if p.is_file() and GROUP_GRIDS.match(p.name))
    return {name: (local / name).read_bytes() for name in names}
