"""Stage `annotate` on the smoke config."""

import os

import pytest

from flowrl.config import load_config
from flowrl.rewards.annotations import load_annotations
from flowrl.stages.annotate import run_annotate
from flowrl.stages.base import run_base
from flowrl.storage import ArtifactError, fetch, read_manifest


def test_annotate_writes_valid_datasets_with_lineage(smoke_config):
    config = load_config(smoke_config)
    base = run_base(config, progress=False)
    result = run_annotate(config, base.uri)
    manifest = read_manifest(result.uri)
    assert manifest.inputs == {"base": base.uri}
    local = fetch(result.uri)
    pointwise, report = load_annotations(local / "pointwise.parquet", "pointwise")
    pairwise, _ = load_annotations(local / "pairwise.parquet", "pairwise")
    a = config.annotate
    prompts = 6 * a.t2i_per_category + 4 * a.edit_per_kind
    images_per_prompt = 4 + a.model_samples
    assert len(pointwise) == prompts * images_per_prompt * a.labels_per_image
    assert len(pairwise) == prompts * a.pairs_per_prompt
    assert result.metrics["t2i/pointwise_rows"] + result.metrics["edit/pointwise_rows"] == len(pointwise)
    assert run_annotate(config, base.uri).reused
    # the same base named by a relative path with a trailing slash: the same version, reused
    again = run_annotate(config, os.path.relpath(base.uri) + "/")
    assert again.reused and again.uri == result.uri
    # other degraded candidates (a --set on the command line): a new version with other images, as many rows
    cast = run_annotate(load_config(smoke_config, ["annotate.degradations=[color_cast]"]), base.uri)
    assert not cast.reused and cast.uri != result.uri
    cast_pointwise, _ = load_annotations(fetch(cast.uri) / "pointwise.parquet", "pointwise")
    assert len(cast_pointwise) == len(pointwise)
    assert read_manifest(cast.uri).files["pointwise.parquet"] != manifest.files["pointwise.parquet"]


def test_annotate_needs_a_complete_base(smoke_config, tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        run_annotate(load_config(smoke_config), str(tmp_path / "nowhere"))


def test_human_labels_are_validated_and_versioned(smoke_config, tmp_path):
    """The production path: parquet files in the documented schema, no simulation."""
    import dataclasses

    import pandas as pd

    from flowrl.rewards.annotations import AnnotationError

    config = load_config(smoke_config)
    base = run_base(config, progress=False)
    simulated = fetch(run_annotate(config, base.uri).uri)
    points = pd.read_parquet(simulated / "pointwise.parquet")
    points.loc[1, "category"] = "portraits"
    points.to_parquet(tmp_path / "human_pointwise.parquet")
    (tmp_path / "human_pairwise.parquet").write_bytes((simulated / "pairwise.parquet").read_bytes())
    given = dataclasses.replace(config.annotate, pointwise_path=str(tmp_path / "human_pointwise.parquet"),
                                pairwise_path=str(tmp_path / "human_pairwise.parquet"))
    with pytest.raises(AnnotationError, match="row 1: category: unknown"):
        run_annotate(dataclasses.replace(config, annotate=given), base.uri)
    skipping = dataclasses.replace(config, annotate=dataclasses.replace(given, on_bad_row="skip"))
    result = run_annotate(skipping, base.uri)
    assert result.metrics["pointwise/skipped_rows"] == 1.0
    kept, _ = load_annotations(fetch(result.uri) / "pointwise.parquet", "pointwise")
    assert len(kept) == len(points) - 1
    assert read_manifest(result.uri).inputs["labels.pointwise"].startswith(str(tmp_path / "human_pointwise.parquet"))
