"""Stage `reward_model` on the smoke config."""

import pandas as pd
import pytest
import torch

from flowrl.config import load_config
from flowrl.rewards.annotations import AnnotationError
from flowrl.rewards.shapes_scorer import ShapesScorer
from flowrl.stages.annotate import run_annotate
from flowrl.stages.base import run_base
from flowrl.stages.reward_model import run_reward_model
from flowrl.storage import ArtifactStore, fetch, read_manifest


@pytest.fixture(scope="module")
def annotations(tmp_path_factory):
    from tests.conftest import write_config

    path = write_config(tmp_path_factory.mktemp("rm"))
    config = load_config(path)
    return config, run_annotate(config, run_base(config, progress=False).uri)


def test_reward_model_trains_every_model_and_reports_both_paradigms(annotations):
    config, annotated = annotations
    result = run_reward_model(config, annotated.uri)
    assert read_manifest(result.uri).inputs == {"annotations": annotated.uri}
    local = fetch(result.uri)
    for task, criteria in (("t2i", config.reward_model.t2i_criteria), ("edit", config.reward_model.edit_criteria)):
        for name in [f"pointwise_{c}" for c in criteria] + ["pairwise"]:
            ShapesScorer.load(local / task / name)  # loads back
            m = result.metrics[task][name]
            assert -1.0 <= m["spearman"] <= 1.0 and 0.0 <= m["pairwise_accuracy"] <= 1.0
    assert result.metrics["skipped_rows"] == {"pointwise": 0, "pairwise": 0}


def test_bad_rows_fail_or_are_skipped_by_config(annotations, tmp_path):
    config, annotated = annotations
    local = fetch(annotated.uri)
    frame = pd.read_parquet(local / "pointwise.parquet")
    frame.loc[2, "quality"] = 9
    staging = tmp_path / "staging"
    staging.mkdir()
    frame.to_parquet(staging / "pointwise.parquet")
    (staging / "pairwise.parquet").write_bytes((local / "pairwise.parquet").read_bytes())
    store = ArtifactStore(config.run.artifact_root)
    bad_uri = store.commit(staging, stage="annotate", version="with-bad-row", config_hash="x", inputs={})
    with pytest.raises(AnnotationError, match="row 2: quality: score must be an integer in 1..5, got 9"):
        run_reward_model(config, bad_uri)
    import dataclasses

    skipping = dataclasses.replace(config, reward_model=dataclasses.replace(config.reward_model, on_bad_row="skip"))
    result = run_reward_model(skipping, bad_uri)
    assert result.metrics["skipped_rows"] == {"pointwise": 1, "pairwise": 0}


def test_composite_rewards_from_the_artifact(annotations):
    import dataclasses

    import torch

    from flowrl.rewards import RewardModel
    from flowrl.rewards.shapes_rewards import load_shapes_rewards
    from flowrl.shapes import make_edit_set, make_t2i_set, render_batch

    config, annotated = annotations
    result = run_reward_model(config, annotated.uri)
    counting = {"alignment": 2.0, "quality": 0.0, "fidelity": 1.0}  # counting prompts weigh the parts otherwise
    t2i = tuple(dataclasses.replace(c, categories=(f"counting={counting[c.name]}",)) for c in config.rewards.t2i)
    config = dataclasses.replace(config, rewards=dataclasses.replace(config.rewards, t2i=t2i))
    rewards = load_shapes_rewards(config, result.uri)
    assert all(isinstance(r, RewardModel) for r in rewards.values())
    t2i = make_t2i_set(3, 1)
    images = render_batch([e.scene for e in t2i], 32)
    scores = rewards["t2i"].score_components(images, [e.prompt for e in t2i])
    assert set(scores.components) == {"alignment", "quality", "fidelity"}
    assert torch.isfinite(scores.total).all() and scores.total.shape == (len(t2i),)
    weights = rewards["t2i"].weight_matrix([e.prompt for e in t2i])
    rows = {e.spec.category: w.tolist() for e, w in zip(t2i, weights)}
    assert rows["counting"] == [2.0, 0.0, 1.0] and rows["colors"] == [1.0, 0.25, 0.5]
    edits = make_edit_set(3, 1)
    sources = render_batch([e.source for e in edits], 32)
    targets = render_batch([e.target for e in edits], 32)
    edit_scores = rewards["edit"].score_components(targets, [e.instruction for e in edits], sources)
    assert set(edit_scores.components) == {"instruction", "identity", "identity_gated"}
    assert torch.all(edit_scores.components["identity"] == 1.0)  # the exact targets keep every untouched object


def test_vlm_backbone_trains_through_the_same_stage(annotations, tmp_path):
    """The production backbone (a tiny random Qwen2.5-VL here) through the same
    stage code: pointwise per criterion and pairwise, saved with save_pretrained."""
    import dataclasses

    import torch
    from transformers import Qwen2VLImageProcessorPil

    from flowrl.rewards.vlm import QwenVLScorer
    from tests.models.tiny_qwen_image import build_text_encoder, build_tokenizer

    config, annotated = annotations
    vlm_dir = tmp_path / "tiny-vlm"
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(vlm_dir)
    build_text_encoder(tokenizer, seed=0).save_pretrained(vlm_dir)
    Qwen2VLImageProcessorPil().save_pretrained(vlm_dir)
    rm = dataclasses.replace(config.reward_model, backbone="vlm", vlm_pretrained=str(vlm_dir), steps=2,
                             easy_steps=1, batch_size=2, t2i_criteria=("alignment",))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_reward_model(dataclasses.replace(config, reward_model=rm), annotated.uri)
    finally:
        torch.set_num_threads(threads)
    local = fetch(result.uri)
    scorer = QwenVLScorer.from_pretrained(local / "edit" / "pointwise_alignment")
    assert scorer.settings.criterion == "instruction_following"
    assert set(result.metrics["t2i"]) == {"pointwise_alignment", "pairwise", "split"}


def test_without_a_judge_the_reference_is_the_human_labels(annotations):
    from flowrl.stages.reward_model import _reference

    config, annotated = annotations
    local = fetch(annotated.uri)
    points = pd.read_parquet(local / "pointwise.parquet")
    pairs = pd.read_parquet(local / "pairwise.parquet")
    unique, scores, prefs = _reference(points, pairs, "quality", judge=False)
    first = unique["image"].iloc[0]
    assert scores[0] == points.loc[points["image"] == first, "quality"].mean()
    assert prefs.tolist() == [{"a": 1.0, "b": 0.0, "tie": 0.5}[p] for p in pairs["preference"]]


def test_an_item_is_its_prompt_image_and_source():
    """The same picture under two prompts is two items with their own labels (metrics are per item)."""
    from flowrl.stages.reward_model import _unique_items

    frame = pd.DataFrame({"prompt": ["a circle", "a red circle", "a circle"], "image": [b"x", b"x", b"x"],
                          "source_image": [None, None, None], "quality": [5, 3, 4]})
    unique, means, labels = _unique_items(frame, "quality")
    assert list(unique["prompt"]) == ["a circle", "a red circle"]
    assert means.tolist() == [4.5, 3.0] and labels == [[5, 4], [3]]


def test_augmented_rows_never_carry_a_text_the_split_rule_holds_out():
    """Decided by the split's own rule, so a held-out text that no annotation holds yet (a later round may
    add it) is refused too, as are the bench's texts."""
    from flowrl.rewards.training import is_unseen_prompt, split_annotations
    from flowrl.shapes.splits import bench_texts, grammar
    from flowrl.stages.reward_model import _training_texts

    texts = [t for group in grammar("t2i").values() for t in group]
    bench = {t for group in bench_texts("t2i").values() for t in group}
    unseen = [t for t in texts if is_unseen_prompt(t, 0.1, 0) and t not in bench]
    kept = [t for t in texts if not is_unseen_prompt(t, 0.1, 0) and t not in bench]
    assert unseen and kept
    frame = pd.DataFrame({"prompt": kept[:6], "group": [f"g{i}" for i in range(6)]})
    split = split_annotations(frame, 0.2, 0.1, 0)
    allowed = _training_texts("t2i", split, 0.1, 0)
    assert not any(allowed(t) for t in unseen)  # none of them is in the data
    assert not any(allowed(t) for t in bench)
    assert all(allowed(t) for t in split.train["prompt"])


class _PaletteReader(torch.nn.Module):
    """A hand-made scorer for the probe's test: level 5 for pure palette colours, lower the farther an
    object pixel is from its nearest palette colour (what a scorer that sees casts does)."""

    def level_logits(self, images, prompts, sources=None):
        from flowrl.rewards.augment import ink_decomposition

        _, amount, residual = ink_decomposition(images)
        stray = torch.where(amount >= 0.1, residual.norm(dim=1), torch.zeros_like(amount)).flatten(1).amax(1)
        level = 5.0 - 20.0 * stray  # [B]
        return -(torch.arange(1, 6, dtype=images.dtype)[None] - level[:, None]).square()


class _Constant(torch.nn.Module):
    def level_logits(self, images, prompts, sources=None):
        return torch.zeros(images.shape[0], 5)


def test_the_colour_cast_probe_tells_a_scorer_that_sees_casts_from_one_that_does_not():
    from flowrl.stages.reward_model import colour_cast_probe

    seeing = colour_cast_probe(_PaletteReader(), 32, scenes=24)
    assert seeing["cast_below_clean"] == 1.0 and seeing["mean_gap"] > 0.5 and seeing["scenes"] == 24
    blind = colour_cast_probe(_Constant(), 32, scenes=24)
    assert blind["cast_below_clean"] == 0.0 and blind["mean_gap"] == 0.0
