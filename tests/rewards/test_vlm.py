"""The Qwen2.5-VL reward backbone on a tiny random checkpoint.

The checkpoint is written with each component's save_pretrained (tiny random
``Qwen2_5_VLForConditionalGeneration``, the locally trained byte-level BPE
tokenizer, ``Qwen2VLImageProcessorPil``) and every test loads it back through
:meth:`QwenVLScorer.from_pretrained`, the production code path. Nothing is
downloaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from flowrl.rewards.backbone import ScoreBackbone
from flowrl.rewards.losses import bradley_terry_loss, expected_score, pointwise_loss
from flowrl.rewards.vlm import SETTINGS_FILE, QwenVLScorer, VLMScorerSettings
from tests.models.tiny_qwen_image import build_text_encoder, build_tokenizer

PROMPTS = [
    "a red circle left of a blue square",
    "two green triangles above a yellow circle",
    "make the circle purple",
    "remove the square and add an orange triangle",
]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny models run faster on one intra-op thread on the shared 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL judge directory, as save_pretrained writes it."""
    from transformers import Qwen2VLImageProcessorPil

    root = tmp_path_factory.mktemp("tiny_vlm_judge")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(root)
    build_text_encoder(tokenizer, seed=0).save_pretrained(root)
    Qwen2VLImageProcessorPil().save_pretrained(root)
    return root


def images(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """[B, 3, size, size] in [0, 1]: flat colours plus a little noise, distinct per row."""
    generator = torch.Generator().manual_seed(seed)
    colours = torch.rand(batch, 3, 1, 1, generator=generator)  # [B, 3, 1, 1]
    noise = 0.1 * torch.rand(batch, 3, size, size, generator=generator)  # [B, 3, S, S]
    return (colours * 0.9 + noise).clamp(0, 1)  # [B, 3, S, S]


def test_loads_from_pretrained_and_round_trips_with_settings(checkpoint, tmp_path):
    scorer = QwenVLScorer.from_pretrained(checkpoint, dtype=torch.float32, device="cpu")
    assert isinstance(scorer, ScoreBackbone)
    assert scorer.settings == VLMScorerSettings()  # no settings file: the defaults
    settings = VLMScorerSettings.for_criterion("quality", max_rationale_tokens=5)
    scorer.settings = settings
    scorer.save(tmp_path / "judge")
    stored = json.loads((tmp_path / "judge" / SETTINGS_FILE).read_text())
    assert stored["criterion"] == "quality"
    again = QwenVLScorer.from_pretrained(tmp_path / "judge", dtype=torch.float32, device="cpu")
    assert again.settings == settings
    x, prompts = images(2), PROMPTS[:2]
    with torch.no_grad():
        torch.testing.assert_close(again.level_logits(x, prompts), scorer.level_logits(x, prompts))
    overridden = QwenVLScorer.from_pretrained(tmp_path / "judge", rationale=True)
    assert overridden.settings.rationale and overridden.settings.criterion == "quality"


def test_prompt_shows_image_and_ends_at_the_answer(checkpoint):
    scorer = QwenVLScorer.from_pretrained(checkpoint)
    batch = scorer.build_inputs(images(2), ["short", PROMPTS[1]])
    tokenizer = scorer.tokenizer
    ids = batch.inputs["input_ids"]  # [B, T]
    assert ids.shape[0] == 2 and not batch.target_mask.any()
    assert batch.inputs["attention_mask"][0, 0] == 0  # the shorter chat is left-padded
    for row, mask in zip(ids, batch.inputs["attention_mask"]):
        text = tokenizer.decode(row[mask.bool()])
        assert text.endswith("<|im_start|>assistant\nScore: ")
        assert "Rate the alignment of the image" in text
    # A 32x32 image is upsampled to 56x56 by the processor: 4x4 patches -> 4 tokens.
    assert batch.inputs["image_grid_thw"].tolist() == [[1, 4, 4], [1, 4, 4]]
    assert (batch.inputs["mm_token_type_ids"].sum(dim=1) == 4).all()


def test_score_is_the_expectation_over_the_five_digit_probabilities(checkpoint):
    scorer = QwenVLScorer.from_pretrained(checkpoint)
    x, prompts = images(4, size=56), PROMPTS
    scores = scorer.score(x, prompts)  # [B]
    with torch.no_grad():
        batch = scorer.build_inputs(x, prompts)
        full = scorer.model(**batch.inputs).logits[:, -1].float()  # [B, V]: the same forward
    digits = scorer.tokenizer.convert_tokens_to_ids(["1", "2", "3", "4", "5"])
    probs = full.softmax(dim=-1)[:, digits]  # [B, 5]
    manual = (probs / probs.sum(dim=-1, keepdim=True) * torch.arange(1.0, 6.0)).sum(dim=-1)  # [B]
    torch.testing.assert_close(scores, manual, rtol=1e-5, atol=1e-5)
    assert scores.shape == (4,) and ((scores >= 1) & (scores <= 5)).all()
    assert scores.std() > 0  # the images and prompts reach the answer


def test_score_loss_is_pointwise_loss_on_the_teacher_forced_level_logits(checkpoint):
    scorer = QwenVLScorer.from_pretrained(checkpoint)
    x, rationales, labels = images(2), ["the circle is red.", "no triangles."], torch.tensor([4, 1])
    with torch.no_grad():
        terms = scorer.loss_terms(x, PROMPTS[:2], rationales, labels)
        forced = scorer.answer_logits(x, PROMPTS[:2], rationales=rationales)  # [B, V]
    digits = scorer.tokenizer.convert_tokens_to_ids(["1", "2", "3", "4", "5"])
    torch.testing.assert_close(terms.score, pointwise_loss(forced[:, digits], labels))
    expected = terms.score + scorer.settings.rationale_loss_weight * terms.rationale
    torch.testing.assert_close(terms.total, expected)
    assert terms.rationale > 0
    without = scorer.loss_terms(x, PROMPTS[:2], None, labels)
    assert without.rationale == 0 and without.total == without.score


def train(scorer: QwenVLScorer, loss_fn, steps: int, lr: float) -> tuple[float, float]:
    """AdamW on all of the judge's weights; the first and last loss."""
    scorer.train()
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    scorer.eval()
    return losses[0], losses[-1]


def test_pointwise_loss_with_rationales_falls(checkpoint):
    scorer = QwenVLScorer.from_pretrained(checkpoint)
    torch.manual_seed(0)
    x = images(8, seed=1)
    prompts = PROMPTS * 2
    rationales = [f"the shapes look {w}." for w in ("wrong", "fine", "off", "right") * 2]
    labels = torch.tensor([1, 4, 2, 5, 3, 5, 1, 2])
    def loss() -> torch.Tensor:
        return scorer.training_loss(x, prompts, rationales, labels)

    first, last = train(scorer, loss, 60, 3e-3)
    print(f"pointwise + rationale loss: {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first
    with torch.no_grad():
        terms = scorer.loss_terms(x, prompts, rationales, labels)
        # The judge now writes the taught rationales and stops at its own "Score:"
        # and, with rationale=True, scores from them.
        scorer.settings = dataclasses.replace(scorer.settings, rationale=True)
        assert scorer.generate_rationales(x, prompts) == rationales
        assert (scorer.level_logits(x, prompts).argmax(dim=-1) + 1).tolist() == labels.tolist()
    uniform = pointwise_loss(torch.zeros(8, 5), labels)  # log 5
    print(f"score term after training: {terms.score.item():.3f} (uniform {uniform.item():.3f})")
    assert terms.score < 0.5 * uniform  # the digits are learnt too, not only the rationales


def test_pairwise_bradley_terry_loss_falls(checkpoint):
    scorer = QwenVLScorer.from_pretrained(checkpoint)
    torch.manual_seed(0)
    a, b = images(4, seed=2), images(4, seed=3)
    preference = torch.tensor([1.0, 0.0, 1.0, 0.0])

    def loss() -> torch.Tensor:
        reward_a = expected_score(scorer.level_logits(a, PROMPTS))  # [B]
        reward_b = expected_score(scorer.level_logits(b, PROMPTS))  # [B]
        return bradley_terry_loss(reward_a, reward_b, preference)

    first, last = train(scorer, loss, 25, 3e-3)
    print(f"Bradley-Terry loss: {first:.3f} -> {last:.3f}")
    assert last < 0.5 * first


def test_rationale_scoring_generates_then_scores_in_range(checkpoint):
    scorer = QwenVLScorer.from_pretrained(checkpoint, rationale=True, max_rationale_tokens=6)
    x = images(3)
    prompts = ["short", PROMPTS[1], PROMPTS[3]]
    rationales = scorer.generate_rationales(x, prompts)
    assert len(rationales) == 3 and all(isinstance(r, str) for r in rationales)
    for i in range(3):  # left padding: a row generates the same alone as in the batch
        assert scorer.generate_rationales(x[i : i + 1], prompts[i : i + 1]) == rationales[i : i + 1]
    scores = scorer.score(x, prompts)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    assert ((scores >= 1) & (scores <= 5)).all()
    with torch.no_grad():  # the scored sequence is the one with those rationales
        forced = scorer.answer_logits(x, prompts, rationales=rationales)  # [B, V]
    torch.testing.assert_close(scores, expected_score(forced[:, scorer.level_ids]))


def test_a_digit_that_is_not_one_token_is_a_clear_error(checkpoint):
    """A SentencePiece-style tokenizer that writes "3" as "▁" + "3"."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil

    chars = sorted(set("Score: 12345abcdefghijklmnopqrstuvwxyz"))
    vocab = {"<pad>": 0, "\u2581": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")
    model = build_text_encoder(build_tokenizer(), seed=0)
    with pytest.raises(ValueError, match="'1' is not exactly one token"):
        QwenVLScorer(model, tokenizer, Qwen2VLImageProcessorPil())


def test_edit_inputs_show_source_then_edit_and_change_the_score(checkpoint):
    scorer = QwenVLScorer.from_pretrained(checkpoint)
    edited, sources = images(2, size=32, seed=4), images(2, size=84, seed=5)
    prompts = PROMPTS[2:]
    batch = scorer.build_inputs(edited, prompts, sources)
    # Per example: the 84x84 source (6x6 patches, 9 tokens), then the edited image (4 tokens).
    assert batch.inputs["image_grid_thw"].tolist() == [[1, 6, 6], [1, 4, 4]] * 2
    text = scorer.tokenizer.decode(batch.inputs["input_ids"][0])
    assert text.index("Source image:") < text.index("Edited image:") < text.index(prompts[0])
    assert "Rate the alignment of the edited image" in text
    with_source = scorer.score(edited, prompts, sources)
    without = scorer.score(edited, prompts)
    other_source = scorer.score(edited, prompts, images(2, size=84, seed=6))
    assert ((with_source >= 1) & (with_source <= 5)).all()
    assert not torch.allclose(with_source, without)
    assert not torch.allclose(with_source, other_source)
    assert scorer.score_components(edited, prompts, sources).components["alignment"].shape == (2,)


def test_bad_inputs_are_refused(checkpoint):
    scorer = QwenVLScorer.from_pretrained(checkpoint)
    with pytest.raises(ValueError, match="reserved"):
        scorer.score(images(1), ["a <|image_pad|> sneaks in"])
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(images(2), PROMPTS[:1])
    with pytest.raises(ValueError, match="labels"):
        scorer.training_loss(images(1), PROMPTS[:1], None, torch.tensor([6]))
    with pytest.raises(ValueError, match="unknown criterion"):
        VLMScorerSettings.for_criterion("vibes")
