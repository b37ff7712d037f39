"""Annotation datasets: schema, row validation, simulated annotators."""

import hashlib

import numpy as np
import pandas as pd
import pytest

from flowrl.rewards.annotations import AnnotationError, load_annotations, png_bytes
from flowrl.rewards.shapes_annotators import Annotator, Latents, annotator_pool, latents_for
from flowrl.rewards.shapes_dataset import DEGRADATIONS, annotate, degrade, draw_candidates
from flowrl.shapes import perturb
from flowrl.shapes.prompts import sample_t2i
from flowrl.shapes.render import render_scene


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    candidates = draw_candidates(rng, 2, 2, 32)
    return annotate(candidates, annotator_pool(rng, 4, 0.3, (0.3, 0.6)), rng, labels_per_image=2, pairs_per_prompt=3)


def test_datasets_roundtrip_through_parquet(tmp_path, frames):
    pointwise, pairwise = frames
    pointwise.to_parquet(tmp_path / "p.parquet")
    pairwise.to_parquet(tmp_path / "q.parquet")
    p, report = load_annotations(tmp_path / "p.parquet", "pointwise")
    assert report.rows == report.kept == len(pointwise) == 20 * 4 * 2
    q, _ = load_annotations(tmp_path / "q.parquet", "pairwise")
    assert len(q) == 20 * 3 and set(q["preference"]) <= {"a", "b", "tie"}
    assert set(p["task"]) == {"t2i", "edit"}
    assert p.loc[p.task == "t2i", "source_image"].isna().all()
    assert p.loc[p.task == "edit", "source_image"].notna().all()


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "column,value,message",
    [
        ("image", None, "row 3: image: missing image"),
        ("image", b"not an image", "row 3: image: not a readable PNG/JPEG image"),
        ("quality", 6, "row 3: quality: score must be an integer in 1..5, got 6"),
        ("fidelity", 0, "row 3: fidelity: score must be an integer in 1..5, got 0"),
        ("category", "juggling", "row 3: category: unknown t2i category 'juggling'"),
        ("prompt", "  ", "row 3: prompt: empty prompt"),
        ("task", "video", "row 3: task: unknown task 'video'"),
    ],
)
def test_bad_rows_are_named_and_fail_or_skip(tmp_path, frames, column, value, message):
    pointwise = frames[0].copy()
    pointwise[column] = pointwise[column].astype(object)
    pointwise.at[3, column] = value
    path = tmp_path / "bad.parquet"
    pointwise.to_parquet(path)
    with pytest.raises(AnnotationError) as err:
        load_annotations(path, "pointwise")
    assert f"{path}: row 3:" in str(err.value) and message in str(err.value)
    kept, report = load_annotations(path, "pointwise", on_bad_row="skip")
    assert report.kept == len(pointwise) - 1 == len(kept)
    assert any(message in e for e in report.skipped)


@pytest.mark.bad_input
def test_duplicate_ids_and_missing_columns(tmp_path, frames):
    pointwise = frames[0].copy()
    pointwise.at[5, "id"] = pointwise.at[2, "id"]
    pointwise.to_parquet(tmp_path / "dup.parquet")
    with pytest.raises(AnnotationError, match="row 5: id: duplicate id"):
        load_annotations(tmp_path / "dup.parquet", "pointwise")
    pointwise.drop(columns=["fidelity"]).to_parquet(tmp_path / "cols.parquet")
    with pytest.raises(AnnotationError, match=r"missing column\(s\) \['fidelity'\]"):
        load_annotations(tmp_path / "cols.parquet", "pointwise")
    (tmp_path / "junk.parquet").write_bytes(b"junk")
    with pytest.raises(AnnotationError, match="not a readable parquet file"):
        load_annotations(tmp_path / "junk.parquet", "pointwise")


@pytest.mark.bad_input
def test_bad_pairwise_preference(tmp_path, frames):
    pairwise = frames[1].copy()
    pairwise.at[1, "preference"] = "both"
    pairwise.to_parquet(tmp_path / "pairs.parquet")
    with pytest.raises(AnnotationError, match="row 1: preference: expected one of"):
        load_annotations(tmp_path / "pairs.parquet", "pairwise")


def test_latents_follow_the_judge():
    rng = np.random.default_rng(1)
    example = next(e for e in (sample_t2i(rng, "counting") for _ in range(50)) if len(e.scene.objects) < 4)
    clean = render_scene(example.scene, 32)
    wrong = render_scene(perturb.perturb_scene(rng, example.spec, example.scene, "extra_object"), 32)
    noisy = perturb.add_noise(clean, rng, std=0.06)
    blotched = perturb.add_blotches(clean, rng, count=3)
    ok, bad, tex, struct = latents_for(np.stack([clean, wrong, noisy, blotched]), [example.spec] * 4)
    assert ok == Latents(1.0, 1.0, 1.0)
    assert bad.alignment < 0.7 and bad.fidelity == 1.0
    assert tex.quality < 0.9 and tex.alignment == 1.0
    assert struct.fidelity < 0.9


def test_degradations_are_drawn_from_the_configured_kinds_only():
    """The default kinds give the candidates every earlier annotation set had; color_cast alone makes every
    degraded candidate an off-palette copy of its clean image that the annotators' quality latent sees."""
    from flowrl.config import AnnotateConfig

    default = draw_candidates(np.random.default_rng(5), 2, 1, 32)
    explicit = draw_candidates(np.random.default_rng(5), 2, 1, 32, ("noise", "blur", "blotches"))
    assert AnnotateConfig().degradations == ("noise", "blur", "blotches")
    assert all(np.array_equal(a, b) for c, d in zip(default, explicit) for a, b in zip(c.images, d.images))
    # the images the code drew before degradations were configurable (computed with it, commit aa0bce4)
    digest = hashlib.sha256(b"".join(im.tobytes() for c in default for im in c.images)).hexdigest()[:16]
    assert digest == "1757afd088325dc0"
    cast = draw_candidates(np.random.default_rng(5), 2, 0, 32, ("color_cast",))
    for c in cast:
        clean, degraded = c.images[0], c.images[2]  # [clean, wrong, degrade(clean), degrade(wrong)]
        assert ((degraded == 255).all(-1) == (clean == 255).all(-1)).all()
        ok, cast_latents = latents_for(np.stack([clean, degraded]), [c.spec] * 2)
        assert cast_latents.quality < ok.quality and cast_latents.alignment == ok.alignment, c.prompt
    for kind in DEGRADATIONS:  # every name the config accepts is one degrade knows
        assert degrade(np.random.default_rng(0), cast[0].images[0], (kind,)).shape == cast[0].images[0].shape
    with pytest.raises(ValueError, match="unknown degradation 'tint'"):
        degrade(np.random.default_rng(0), cast[0].images[0], ("tint",))


def test_annotators_are_noisy_biased_and_in_range():
    rng = np.random.default_rng(0)
    kind, harsh = Annotator("kind", 0.8, 0.3), Annotator("harsh", -0.8, 0.3)
    kind_labels = [kind.likert(0.5, rng) for _ in range(300)]
    harsh_labels = [harsh.likert(0.5, rng) for _ in range(300)]
    assert np.mean(kind_labels) > np.mean(harsh_labels) + 1.0
    assert set(kind_labels) | set(harsh_labels) <= {1, 2, 3, 4, 5}
    assert len(set(kind_labels)) > 1  # noise: not a deterministic copy


def test_preference_priority_consistency_first():
    rng = np.random.default_rng(0)
    person = Annotator("p", 0.0, 0.0)
    right_but_blotchy = Latents(alignment=1.0, quality=0.5, fidelity=0.3)
    wrong_but_clean = Latents(alignment=0.3, quality=1.0, fidelity=1.0)
    assert person.prefer(right_but_blotchy, wrong_but_clean, rng) == "a"
    same_but_blotchy = Latents(1.0, 1.0, 0.4)
    assert person.prefer(Latents(1.0, 0.5, 1.0), same_but_blotchy, rng) == "a"  # structure before texture
    assert person.prefer(Latents(1.0, 1.0, 1.0), Latents(1.0, 0.97, 1.0), rng) == "tie"


def test_png_roundtrip_is_lossless():
    from flowrl.rewards.annotations import decode_png

    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert np.array_equal(decode_png(png_bytes(image)), image)
    assert isinstance(pd.DataFrame({"x": [png_bytes(image)]}).x[0], bytes)


def test_optional_rationale_column(tmp_path, frames):
    pointwise = frames[0].copy()
    pointwise["rationale"] = "the circle is where the prompt says"
    pointwise.to_parquet(tmp_path / "ok.parquet")
    kept, _ = load_annotations(tmp_path / "ok.parquet", "pointwise")
    assert kept["rationale"].notna().all()
    pointwise["rationale"] = 3  # a numeric column where text belongs
    pointwise.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(AnnotationError, match="row 0: rationale: expected text or null, got int"):
        load_annotations(tmp_path / "bad.parquet", "pointwise")
