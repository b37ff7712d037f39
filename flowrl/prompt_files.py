"""Production prompt files: the candidate prompts RL starts from.

The shapes world draws its candidates from its grammar; production reads
them from one parquet file per task (``filter.t2i_prompts``,
``filter.edit_prompts``), local or any fsspec URI:

``prompt``
    str, non-empty: the T2I prompt or the edit instruction.
``category``
    str, non-empty: the prompt's category (T2I) or edit kind. It picks the
    per-category reward weights (the ``categories`` of each ``rewards.t2i`` /
    ``rewards.edit`` component; other names get the default weights) and groups
    the filter's per-category statistics and quantile cuts.
``source_image`` (edit files only)
    bytes of the source image in any format PIL reads (PNG, JPEG, WebP, ...).
    Sources are resized to the model's ``height`` x ``width`` on loading, so
    one batch holds sources of one size.

Every row is checked before any model is loaded; the first bad row fails with
the file, row and field named. Repeated rows (same prompt, same source bytes)
are dropped, since one prompt's groups would otherwise count twice in the filter.

A fixed share of the prompts (``filter.heldout_fraction``, chosen by a hash of
the row, so it does not move when rows are added) is set aside as the held-out
set that GRPO's hacking monitor and the before/after evaluation score, and is
never filtered or trained on.
"""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from flowrl.rewards.annotations import png_bytes
from flowrl.rewards.training import images_of

REQUIRED = {"t2i": ("prompt", "category"), "edit": ("prompt", "category", "source_image")}


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable, or has a bad row; the message names it."""


def _read(path: str, key: str) -> pd.DataFrame:
    import fsspec

    try:
        with fsspec.open(path, "rb") as handle:
            data = handle.read()
        frame = pd.read_parquet(io.BytesIO(data))
        frame.attrs["sha256"] = hashlib.sha256(data).hexdigest()
        return frame
    except FileNotFoundError:
        raise PromptFileError(f"{key}: {path} does not exist") from None
    except Exception as exc:  # pyarrow and fsspec raise many types for a file that is not parquet
        raise PromptFileError(f"{key}: {path} is not a readable parquet file ({type(exc).__name__}: {exc})") from None


def _text(value: object) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _source(value: object, size: tuple[int, int]) -> bytes | str:
    """PNG bytes of the source resized to ``size`` (height, width), or the problem."""
    if not isinstance(value, (bytes, bytearray)) or not value:
        return "missing image bytes"
    try:
        with Image.open(io.BytesIO(value)) as img:
            rgb = img.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        return f"not a readable image ({exc})"
    height, width = size
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.LANCZOS)
    return png_bytes(np.asarray(rgb))


def load_prompt_file(path: str, task: str, key: str, size: tuple[int, int]) -> pd.DataFrame:
    """Rows ``prompt``, ``category``, ``source_image`` (PNG bytes at ``size``, or None for T2I), validated;
    ``attrs["sha256"]`` is the file's digest."""
    return _load_rows(path, task, key, size)[0]


def _load_rows(path: str, task: str, key: str, size: tuple[int, int]) -> tuple[pd.DataFrame, list[int]]:
    """:func:`load_prompt_file`, and each kept row's number in the file (for messages; kept out of
    ``attrs``, which pandas copies into every derived frame)."""
    if task not in REQUIRED:
        raise ValueError(f"task must be t2i or edit, got {task!r}")
    frame = _read(path, key)
    missing = [c for c in REQUIRED[task] if c not in frame.columns]
    if missing:
        raise PromptFileError(f"{key}: {path} has no column {missing[0]!r} (columns: {list(frame.columns)})")
    if frame.empty:
        raise PromptFileError(f"{key}: {path} has no rows")
    rows = []
    for i, record in enumerate(frame.to_dict("records")):
        prompt, category = _text(record["prompt"]), _text(record["category"])
        for name, value in (("prompt", prompt), ("category", category)):
            if value is None:
                raise PromptFileError(f"{key}: {path} row {i}: field {name!r} must be a non-empty string, "
                                      f"got {record[name]!r}")
        source = None
        if task == "edit":
            source = _source(record["source_image"], size)
            if isinstance(source, str):
                raise PromptFileError(f"{key}: {path} row {i}: field 'source_image': {source}")
        rows.append({"prompt": prompt, "category": category, "source_image": source})
    out = pd.DataFrame(rows).drop_duplicates(subset=["prompt", "source_image"])
    file_rows = [int(i) for i in out.index]
    out = out.reset_index(drop=True)
    out.attrs["sha256"] = frame.attrs["sha256"]  # the file's content: part of the filter's version
    return out, file_rows


def row_keys(frame: pd.DataFrame) -> list[str]:
    """A stable key per row: the prompt, and for edits a digest of the source."""
    keys = []
    for prompt, source in zip(frame["prompt"], frame["source_image"]):
        digest = "" if source is None else hashlib.sha256(source).hexdigest()[:16]
        keys.append(f"{prompt}\x00{digest}")
    return keys


def heldout_mask(frame: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """True for the rows set aside as the held-out set: those whose salted hash
    falls under ``fraction``; at least one row and never all of them."""
    if len(frame) < 2:
        raise PromptFileError(f"a prompt file needs at least 2 rows to hold one out, got {len(frame)}")
    draws = np.array([int.from_bytes(hashlib.sha256(f"{seed}:{k}".encode()).digest()[:8], "big") / 2.0**64
                      for k in row_keys(frame)])
    mask = draws < fraction
    if not mask.any():
        mask[np.argmin(draws)] = True
    if mask.all():
        mask[np.argmax(draws)] = False
    return mask


def check_prompt_files(config) -> dict[str, int]:
    """Read and check the prompt files of a qwen_image config, the filter's and the bench's
    ({task: rows, bench_<task>: bench items}): the pipeline's config check calls it so a bad
    file, or a bench prompt that training sees, fails before the first stage."""
    q = config.model.qwen_image
    counts = {}
    for task in ("t2i", "edit"):
        key = f"filter.{task}_prompts"
        path = getattr(config.filter, f"{task}_prompts")
        if not path:
            raise PromptFileError(f"{key}: required when model.family is qwen_image")
        frame = load_prompt_file(path, task, key, (q.height, q.width))
        heldout_mask(frame, config.filter.heldout_fraction, config.run.seed)  # at least 2 rows
        counts[task] = len(frame)
    for task in ("t2i", "edit"):
        counts[f"bench_{task}"] = len(load_bench_prompts(config, task))
    return counts


def first_per_category(frame: pd.DataFrame, per_category: int) -> pd.DataFrame:
    """The first ``per_category`` rows of each category, in file order, categories sorted."""
    return frame.groupby("category", sort=True, group_keys=False).head(per_category).reset_index(drop=True)


def _normalized(text: str) -> str:
    return " ".join(text.split()).casefold()


def _prompt_column(path: str, key: str, task: str, is_labels: bool) -> list[str]:
    """The prompts of ``task`` in a prompt or annotation (``is_labels``) file, read without its image columns."""
    import fsspec

    columns = ["task", "prompt"] if is_labels else ["prompt"]
    try:
        with fsspec.open(path, "rb") as handle:
            frame = pd.read_parquet(handle, columns=columns)
    except FileNotFoundError:
        raise PromptFileError(f"{key}: {path} does not exist") from None
    except Exception as exc:
        raise PromptFileError(f"{key}: {path}: cannot read its {columns} columns ({type(exc).__name__}: {exc})") from None
    if is_labels:
        frame = frame[frame["task"] == task]
    return [p for p in frame["prompt"] if isinstance(p, str)]


def seen_prompts(config, task: str) -> dict[str, str]:
    """{normalised prompt: the config key of the file it is in} over every file a training stage reads for
    ``task``: the filter's candidates (curated and held-out alike) and the human annotations."""
    sources = [(f"filter.{task}_prompts", getattr(config.filter, f"{task}_prompts"), False)]
    a = config.annotate
    sources += [(f"annotate.{kind}_path", path, True)
                for kind, path in (("pointwise", a.pointwise_path), ("pairwise", a.pairwise_path)) if path]
    seen: dict[str, str] = {}
    for key, path, is_labels in sources:
        if path:
            for prompt in _prompt_column(str(path), key, task, is_labels):
                seen.setdefault(_normalized(prompt), f"{key} ({path})")
    return seen


def load_bench_prompts(config, task: str, seen: dict[str, str] | None = None) -> pd.DataFrame:
    """The bench items of ``task`` from ``bench.<task>_prompts`` (first ``bench.t2i_per_category`` /
    ``bench.edit_per_kind`` rows per category), after checking that no prompt of the file occurs in a
    training, filtering or annotation file (``seen``, default :func:`seen_prompts`); case and spacing
    are ignored in that comparison, and an edit instruction counts as seen whatever its source image."""
    key = f"bench.{task}_prompts"
    path = getattr(config.bench, f"{task}_prompts")
    if not path:
        raise PromptFileError(f"{key}: required when model.family is qwen_image")
    q = config.model.qwen_image
    frame, file_rows = _load_rows(path, task, key, (q.height, q.width))
    seen = seen_prompts(config, task) if seen is None else seen
    for i, prompt in enumerate(frame["prompt"]):
        where = seen.get(_normalized(prompt))
        if where is not None:
            raise PromptFileError(f"{key}: {path} row {file_rows[i]}: prompt {prompt!r} also occurs in "
                                  f"{where}; a bench prompt must be unseen by every training, filtering and "
                                  "annotation stage")
    per_category = config.bench.t2i_per_category if task == "t2i" else config.bench.edit_per_kind
    chosen = first_per_category(frame, per_category)
    chosen.attrs["sha256"] = frame.attrs["sha256"]
    return chosen


def decode_sources(frame: pd.DataFrame) -> torch.Tensor | None:
    """The edit source images [P, 3, H, W] of a prompt frame, or None for T2I."""
    return None if frame["source_image"].isna().all() else images_of(frame["source_image"])
