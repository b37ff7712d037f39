"""Human labels that cannot make a dataset: the annotate stage fails before any work, with an error
naming the file (or URI), and commits nothing; the reward-model stage refuses an empty dataset."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flowrl.cli import main
from flowrl.config import load_config
from flowrl.rewards.annotations import AnnotationError, load_annotations
from flowrl.rewards.shapes_annotators import annotator_pool
from flowrl.rewards.shapes_dataset import annotate, draw_candidates
from flowrl.stages.annotate import run_annotate
from flowrl.stages.reward_model import run_reward_model
from flowrl.storage import ArtifactError, ArtifactStore
from tests.conftest import write_config


@pytest.fixture(scope="module")
def frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """Valid pointwise and pairwise labels of both tasks (one prompt per category and edit kind)."""
    rng = np.random.default_rng(0)
    candidates = draw_candidates(rng, 1, 1, 32)
    return annotate(candidates, annotator_pool(rng, 3, 0.3, (0.3, 0.6)), rng, labels_per_image=1, pairs_per_prompt=1)


class Labels:
    """Label files and a config naming them, artifacts under ``root / artifacts``, a base artifact there."""

    def __init__(self, root: Path, pointwise: pd.DataFrame, pairwise: pd.DataFrame, on_bad_row: str = "fail"):
        self.root = root
        self.pointwise, self.pairwise = root / "human_pointwise.parquet", root / "human_pairwise.parquet"
        pointwise.to_parquet(self.pointwise)
        pairwise.to_parquet(self.pairwise)
        self.config_path = write_config(root, annotate={"pointwise_path": str(self.pointwise),
                                                        "pairwise_path": str(self.pairwise),
                                                        "on_bad_row": on_bad_row})
        self.config = load_config(self.config_path)
        self.store = ArtifactStore(self.config.run.artifact_root)
        staging = root / "base-staging"
        staging.mkdir()
        (staging / "reference.json").write_text("{}")  # the labels path reads no weights of the base
        self.base = self.store.commit(staging, stage="base", version="b0", config_hash="h", inputs={})

    def committed(self, stage: str) -> list[str]:
        """Complete versions of ``stage`` in the store (those with a manifest)."""
        root = Path(self.config.run.artifact_root) / stage
        return sorted(p.parent.name for p in root.glob("*/manifest.json"))


@pytest.mark.bad_input
def test_labels_against_a_missing_base_fail_naming_the_uri(tmp_path, frames):
    labels = Labels(tmp_path, *frames)
    missing = str(tmp_path / "artifacts" / "base" / "does-not-exist")
    with pytest.raises(ArtifactError) as err:
        run_annotate(labels.config, missing)
    assert str(err.value).startswith(missing) and "no manifest.json" in str(err.value)
    assert labels.committed("annotate") == []


@pytest.mark.bad_input
def test_cli_labels_against_a_missing_base_exit_2_in_one_line(tmp_path, frames, capsys):
    labels = Labels(tmp_path, *frames)
    missing = str(tmp_path / "nowhere")
    code = main(["annotate", "--config", str(labels.config_path), "--base", missing, "--no-tracking"])
    err = capsys.readouterr().err
    assert code == 2 and missing in err and "Traceback" not in err and err.count("\n") == 1, err
    assert labels.committed("annotate") == []


def _all_bad(frame: pd.DataFrame) -> pd.DataFrame:
    bad = frame.copy()
    bad["category"] = "juggling"
    return bad


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["pointwise", "pairwise"])
def test_every_row_skipped_is_zero_usable_rows(tmp_path, frames, kind):
    pointwise, pairwise = frames
    pointwise, pairwise = (_all_bad(pointwise), pairwise) if kind == "pointwise" else (pointwise, _all_bad(pairwise))
    labels = Labels(tmp_path, pointwise, pairwise, on_bad_row="skip")
    with pytest.raises(AnnotationError) as err:
        run_annotate(labels.config, labels.base)
    path = labels.pointwise if kind == "pointwise" else labels.pairwise
    text = str(err.value)
    assert text.startswith(f"{path}: 0 usable rows") and "unknown" in text and "juggling" in text, text
    assert labels.committed("annotate") == []


@pytest.mark.bad_input
@pytest.mark.parametrize("kind", ["pointwise", "pairwise"])
def test_empty_label_table_is_zero_usable_rows(tmp_path, frames, kind):
    pointwise, pairwise = frames
    pointwise, pairwise = (pointwise.iloc[:0], pairwise) if kind == "pointwise" else (pointwise, pairwise.iloc[:0])
    labels = Labels(tmp_path, pointwise, pairwise, on_bad_row="skip")
    with pytest.raises(AnnotationError) as err:
        run_annotate(labels.config, labels.base)
    path = labels.pointwise if kind == "pointwise" else labels.pairwise
    assert str(err.value).startswith(f"{path}: 0 usable rows: the table has no rows"), str(err.value)
    assert labels.committed("annotate") == []


LIST_COLUMNS = [("pointwise", "alignment"), ("pointwise", "task"), ("pointwise", "id"), ("pointwise", "prompt"),
                ("pointwise", "category"), ("pointwise", "annotator"), ("pairwise", "preference"),
                ("pairwise", "valid_a"), ("pairwise", "task")]


@pytest.mark.bad_input
@pytest.mark.parametrize("kind,column", LIST_COLUMNS)
def test_list_valued_label_column_names_file_row_and_column(tmp_path, frames, kind, column):
    pointwise, pairwise = (frame.copy() for frame in frames)
    frame = pointwise if kind == "pointwise" else pairwise
    frame[column] = [[value, value] for value in frame[column]]  # a parquet list column
    labels = Labels(tmp_path, pointwise, pairwise)
    path = labels.pointwise if kind == "pointwise" else labels.pairwise
    with pytest.raises(AnnotationError) as err:
        run_annotate(labels.config, labels.base)
    assert f"{path}: row 0: {column}: expected a single value, got a ndarray of 2 item(s)" in str(err.value)
    assert labels.committed("annotate") == []
    # skipping bad rows leaves none
    with pytest.raises(AnnotationError, match="0 usable rows"):
        load_annotations(path, kind, on_bad_row="skip")


def test_valid_labels_load(tmp_path, frames):
    """The control of the cases above: the same files, untouched, are a dataset."""
    labels = Labels(tmp_path, *frames)
    for kind, path, frame in (("pointwise", labels.pointwise, frames[0]), ("pairwise", labels.pairwise, frames[1])):
        kept, report = load_annotations(path, kind)
        assert report.kept == report.rows == len(frame) == len(kept) > 0


def _annotations_artifact(labels: Labels, pointwise: pd.DataFrame, pairwise: pd.DataFrame) -> str:
    """An annotate artifact holding these tables, as a stage that let them through would have committed."""
    staging = labels.root / "annotate-staging"
    staging.mkdir()
    pointwise.to_parquet(staging / "pointwise.parquet")
    pairwise.to_parquet(staging / "pairwise.parquet")
    (staging / "metrics.json").write_text("{}")
    return labels.store.commit(staging, stage="annotate", version="a0", config_hash="h", inputs={})


@pytest.mark.bad_input
def test_reward_model_refuses_an_empty_dataset(tmp_path, frames):
    labels = Labels(tmp_path, *frames)
    uri = _annotations_artifact(labels, frames[0].iloc[:0], frames[1])
    with pytest.raises(AnnotationError) as err:
        run_reward_model(labels.config, uri)
    assert "pointwise.parquet: 0 usable rows: the table has no rows" in str(err.value)
    assert labels.committed("reward_model") == []


@pytest.mark.bad_input
def test_reward_model_refuses_a_dataset_without_one_task(tmp_path, frames):
    labels = Labels(tmp_path, *frames)
    pointwise, pairwise = frames
    uri = _annotations_artifact(labels, pointwise, pairwise[pairwise.task == "t2i"])
    with pytest.raises(AnnotationError) as err:
        run_reward_model(labels.config, uri)
    assert str(err.value).startswith(f"{uri}: pairwise.parquet has 0 usable edit rows"), str(err.value)
    assert labels.committed("reward_model") == []
