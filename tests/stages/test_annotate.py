"""Stage `annotate` on the smoke config."""

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
    prompts = 6 * a.t2i_per_category + 4 * a.edits_per_kind
    images_per_prompt = 4 + a.model_samples
    assert len(pointwise) == prompts * images_per_prompt * a.labels_per_image
    assert len(pairwise) == prompts * a.pairs_per_prompt
    assert result.metrics["t2i/pointwise_rows"] + result.metrics["edit/pointwise_rows"] == len(pointwise)
    assert run_annotate(config, base.uri).reused


def test_annotate_needs_a_complete_base(smoke_config, tmp_path):
    with pytest.raises(ArtifactError, match="no manifest.json"):
        run_annotate(load_config(smoke_config), str(tmp_path / "nowhere"))
