"""Annotation datasets: their schema, validation, and simulated annotators.

Two parquet datasets, in the layout real human labels are loaded into:

pointwise (one row per image and annotator)
    ``id`` str unique, ``task`` "t2i" | "edit", ``prompt`` str (the edit
    instruction for edits), ``category`` (a T2I category or an edit kind),
    ``image`` PNG bytes, ``source_image`` PNG bytes (edits) or null (T2I),
    ``alignment`` / ``quality`` / ``fidelity`` int 1..5 (Likert: prompt or
    instruction adherence; texture and aesthetics; structural correctness),
    ``annotator`` str; optional ``rationale`` str or null (why the annotator
    scored as they did: the chain-of-thought target of a VLM scorer).

both datasets may carry an optional ``group`` str column: the prompt
instance an image belongs to (one prompt, one seed or source image, all the
images made for it). Held-out splits never cut a group; without the column
they never cut a prompt.

pairwise (one row per judged pair)
    ``id``, ``task``, ``prompt``, ``category``, ``source_image`` as above,
    ``image_a`` / ``image_b`` PNG bytes, ``preference`` "a" | "b" | "tie",
    auxiliary labels ``valid_a`` / ``valid_b`` (the sample follows the
    prompt), ``text_distortion_a`` / ``_b``, ``figure_distortion_a`` / ``_b``
    (bool), ``annotator``. Preferences follow the priority order
    consistency > structural distortion > texture > aesthetics.

In the shapes world the images come from the base model and from clean,
perturbed and degraded renderings, and the labels from simulated annotators:
each reads the judge's latent scores through its own bias and noise, so a
reward model trained on them cannot just copy the judge.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from flowrl.config import clip_text, shown_value
from flowrl.shapes.edits import EDIT_KINDS
from flowrl.shapes.prompts import T2I_CATEGORIES

log = logging.getLogger(__name__)

TASKS = ("t2i", "edit")
LIKERT_COLUMNS = ("alignment", "quality", "fidelity")
PREFERENCES = ("a", "b", "tie")
POINTWISE_COLUMNS = ("id", "task", "prompt", "category", "image", "source_image", *LIKERT_COLUMNS, "annotator")
PAIRWISE_COLUMNS = (
    "id", "task", "prompt", "category", "source_image", "image_a", "image_b", "preference",
    "valid_a", "valid_b", "text_distortion_a", "text_distortion_b",
    "figure_distortion_a", "figure_distortion_b", "annotator",
)
CATEGORIES = {"t2i": T2I_CATEGORIES, "edit": EDIT_KINDS}


class AnnotationError(ValueError):
    """Bad annotation data; the message names the file, and the row and field."""


def png_bytes(image: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (lossless, so labels refer to exact pixels)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 [H, W, 3]."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _image_problem(value: object) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "missing image"
    if not isinstance(value, (bytes, bytearray)) or len(value) == 0:
        return "missing image"
    try:
        with Image.open(io.BytesIO(value)) as img:
            img.verify()
    except (UnidentifiedImageError, OSError, SyntaxError):
        return "not a readable PNG/JPEG image"
    return None


def _is_collection(value: object) -> bool:
    """A cell holding several values (parquet list columns read back as arrays) where one is expected."""
    return isinstance(value, (list, tuple, dict, set, np.ndarray))


def _row_problems(row: pd.Series, kind: Literal["pointwise", "pairwise"]) -> list[tuple[str, str]]:
    """(field, message) for every problem of one row."""
    columns = POINTWISE_COLUMNS if kind == "pointwise" else PAIRWISE_COLUMNS
    nested = [(name, f"expected a single value, got a {type(row[name]).__name__} of {len(row[name])} item(s)")
              for name in (*columns, "group", "rationale") if name in row.index and _is_collection(row[name])]
    if nested:  # the checks below compare single values
        return nested
    problems = []
    task = row["task"]
    if task not in TASKS:
        return [("task", f"unknown task {task!r} (expected one of {list(TASKS)})")]
    if row["category"] not in CATEGORIES[task]:
        problems.append(("category", f"unknown {task} category {row['category']!r}"))
    if not isinstance(row["prompt"], str) or not row["prompt"].strip():
        problems.append(("prompt", "empty prompt"))
    image_fields = ("image",) if kind == "pointwise" else ("image_a", "image_b")
    for name in image_fields + (("source_image",) if task == "edit" else ()):
        problem = _image_problem(row[name])
        if problem:
            problems.append((name, problem))
    group = row.get("group")
    if group is not None and not (isinstance(group, str) and group.strip()) and not pd.isna(group):
        problems.append(("group", f"expected non-empty text or null, got {group!r}"))
    if kind == "pointwise":
        rationale = row.get("rationale")
        if rationale is not None and not isinstance(rationale, str) and not pd.isna(rationale):
            problems.append(("rationale", f"expected text or null, got {type(rationale).__name__}"))
        for name in LIKERT_COLUMNS:
            value = row[name]
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 1 <= value <= 5:
                problems.append((name, f"score must be an integer in 1..5, got {value!r}"))
    elif row["preference"] not in PREFERENCES:
        problems.append(("preference", f"expected one of {list(PREFERENCES)}, got {row['preference']!r}"))
    return problems


@dataclass(frozen=True)
class LoadReport:
    """What loading found: rows read, rows kept, and each skipped row's reason."""

    path: str
    rows: int
    kept: int
    skipped: tuple[str, ...]


def _read_parquet(path: str) -> pd.DataFrame:
    """A label table from a local path or an fsspec URI (``s3://...``: what a pod can read)."""
    import fsspec

    fs, local = fsspec.core.url_to_fs(path)
    try:
        if not fs.isfile(local):
            raise AnnotationError(f"{path}: annotation file not found")
        with fs.open(local, "rb") as handle:
            return pd.read_parquet(io.BytesIO(handle.read()))
    except AnnotationError:
        raise
    except Exception as exc:  # pyarrow and fsspec raise several types for a missing or non-parquet file
        raise AnnotationError(f"{path}: not a readable parquet file ({exc})") from None


def load_annotations(
    path: str | Path,
    kind: Literal["pointwise", "pairwise"],
    on_bad_row: Literal["fail", "skip"] = "fail",
) -> tuple[pd.DataFrame, LoadReport]:
    """Read and validate every row; fail on the first bad rows or skip them,
    as configured, and always say which and why."""
    frame = _read_parquet(str(path))
    columns = POINTWISE_COLUMNS if kind == "pointwise" else PAIRWISE_COLUMNS
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise AnnotationError(f"{path}: missing column(s) {missing} for a {kind} dataset")
    errors, bad = [], set()
    for index, (_, row) in enumerate(frame.iterrows()):
        for field, message in _row_problems(row, kind):
            errors.append(clip_text(f"{path}: row {index}: {field}: {message}", 500))  # a value may be huge
            bad.add(index)
    # a list-valued id is already a bad row; it stands in as a value equal to no other
    ids = pd.Series([object() if _is_collection(v) else v for v in frame["id"]], dtype=object)
    duplicated = ids.duplicated(keep="first").to_numpy()
    for index in np.flatnonzero(duplicated):
        errors.append(f"{path}: row {index}: id: duplicate id {shown_value(frame['id'].iloc[index])}")
        bad.add(int(index))
    if errors and on_bad_row == "fail":
        shown = "\n  ".join(errors[:10])
        more = f"\n  ... and {len(errors) - 10} more" if len(errors) > 10 else ""
        raise AnnotationError(f"{path}: {len(bad)} bad row(s) of {len(frame)}:\n  {shown}{more}")
    if errors:
        log.warning("%s: skipping %d bad row(s) of %d (first: %s)", path, len(bad), len(frame), errors[0])
    kept = frame.drop(index=frame.index[sorted(bad)]).reset_index(drop=True)
    if kept.empty:
        why = f"all {len(frame)} rows are bad (first: {errors[0][:300]})" if errors else "the table has no rows"
        raise AnnotationError(f"{path}: 0 usable rows: {why}; a {kind} dataset needs at least one")
    return kept, LoadReport(str(path), len(frame), len(kept), tuple(errors))
