"""The production reward-model backbone: a Qwen2.5-VL judge that rates an image 1..5.

:class:`QwenVLScorer` wraps transformers' ``Qwen2_5_VLForConditionalGeneration``
(the class Qwen-Image's own text encoder uses) and implements
:class:`flowrl.rewards.backbone.ScoreBackbone`. The judge sees a chat prompt
with the image (for edits: the source image, then the edited image) and the
text prompt or instruction, is asked to rate one named criterion from 1 to 5,
and the assistant turn ends right where it would write the digit
(``"Score: "``). The level logits are the next-token logits of the tokens
"1".."5" there; the reward is their renormalised expectation
(:func:`flowrl.rewards.losses.expected_score`), which is smoother than the
arg-max digit and differentiable, so both pointwise cross-entropy and
Bradley-Terry on rewards train the same weights.

Sequence layout, identical for training and scoring so that what the model
learns is what it is asked::

    <|im_start|>system ... <|im_end|>
    <|im_start|>user <image(s)> prompt + question <|im_end|>
    <|im_start|>assistant
    [rationale "\\n"] "Score: " -> next token read here (the digit)

With ``rationale=True`` the judge first writes a rationale greedily (up to
``max_rationale_tokens``, stopping early at an end-of-turn token or once it
writes "Score:" itself), then "\\nScore: " is appended and the five logits are
read. The whole text is tokenised in one piece (so the real model sees the
tokenisation it was pretrained on) and the rationale's tokens are located
through the tokenizer's character offsets.

Images go through ``Qwen2VLImageProcessorPil`` directly, not through
``Qwen2_5_VLProcessor`` (which needs a torchvision video processor that does
not import on the CPU torch used here), and ``<|image_pad|>`` is expanded to
``grid_t * grid_h * grid_w / merge_size**2`` tokens by hand, as
:mod:`flowrl.models.qwen_image` does. The processor resizes every image to
sides that are multiples of ``patch_size * merge_size`` (28) with an area
within [min_pixels, max_pixels] (56*56 .. 28*28*1280 by default), keeping the
aspect ratio: a 32x32 or 56x56 image becomes 56x56 (bicubic upsampling for
32x32), i.e. a 4x4 patch grid and 4 image tokens. Aspect ratios above 200:1
are refused by the processor.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flowrl.models.qwen_image import IMAGE_PAD_TOKEN, to_pil_images
from flowrl.rewards.base import RewardScores
from flowrl.rewards.losses import LEVELS, expected_score, pointwise_loss

SETTINGS_FILE = "flowrl_vlm_scorer.json"
LEVEL_TOKENS = tuple(str(level) for level in range(1, LEVELS + 1))
ANSWER_PREFIX = "Score: "
# Text that must not come from prompts or rationales: it would be read as chat
# structure or as image placeholders and break the image-token count.
_RESERVED = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", IMAGE_PAD_TOKEN)
_IMAGE = "<|vision_start|>" + IMAGE_PAD_TOKEN + "<|vision_end|>"

# What each named criterion asks the judge to look at; any other name works too
# when its description is given in the settings.
CRITERIA: dict[str, str] = {
    "alignment": "how faithfully the image shows what the text prompt asks for "
    "(objects, counts, colours, positions, text)",
    "quality": "the visual quality of the image: structure without distortions, "
    "clean textures, no artifacts, pleasing aesthetics",
    "fidelity": "how plausible and free of structural or texture distortions the image is",
    "instruction_following": "how completely and precisely the edited image carries out "
    "the editing instruction",
    "identity_preservation": "how well the edited image keeps everything the instruction "
    "does not ask to change",
}


@dataclass(frozen=True)
class VLMScorerSettings:
    """How the judge is asked and trained; saved next to the weights.

    ``rationale_loss_weight`` scales the token-averaged LM loss of the
    rationale against the per-example score cross-entropy: both are mean
    negative log-likelihoods of the order of log(vocab) at the start, and the
    weight 1.0 treats one rationale token like one answer digit on average.
    """

    criterion: str = "alignment"
    criterion_description: str = CRITERIA["alignment"]
    rationale: bool = False
    max_rationale_tokens: int = 128
    rationale_loss_weight: float = 1.0
    system_prompt: str = "You are a careful and strict judge of generated and edited images."

    @classmethod
    def for_criterion(cls, criterion: str, **kwargs: Any) -> "VLMScorerSettings":
        """Settings for one of :data:`CRITERIA`, with its stock description."""
        if criterion not in CRITERIA:
            raise ValueError(
                f"unknown criterion {criterion!r}: pick one of {sorted(CRITERIA)} or give "
                "criterion_description explicitly"
            )
        return cls(criterion=criterion, criterion_description=CRITERIA[criterion], **kwargs)


@dataclass(frozen=True)
class ScorerBatch:
    """Model inputs for a batch (left-padded) and which tokens are LM targets.

    The answer position, where the digit is predicted, is the last column for
    every row thanks to the left padding.
    """

    inputs: dict[str, torch.Tensor]  # input_ids / attention_mask / mm_token_type_ids [B, T], vision
    target_mask: torch.Tensor  # [B, T] bool: rationale and answer-prefix tokens


@dataclass(frozen=True)
class LossTerms:
    """The parts of :meth:`QwenVLScorer.training_loss`, for logging."""

    total: torch.Tensor  # scalar
    score: torch.Tensor  # scalar: cross-entropy of the label digit over the five levels
    rationale: torch.Tensor  # scalar: mean token NLL of rationale + "\nScore: " (0 without)


def question_text(settings: VLMScorerSettings, *, edit: bool, with_rationale: bool) -> str:
    """The instruction to the judge, after the image(s) and the prompt."""
    subject = "the edited image" if edit else "the image"
    name = settings.criterion.replace("_", " ")
    question = (
        f"Rate the {name} of {subject} on a scale from 1 (worst) to 5 (best), judging "
        f"{settings.criterion_description}."
    )
    answer = f"answer '{ANSWER_PREFIX}' and one digit."
    if with_rationale:
        return question + " First explain your reasoning briefly, then " + answer
    return question + " Then " + answer


def prompt_text(
    prompt: str, image_tokens: tuple[int, ...], settings: VLMScorerSettings, *, with_rationale: bool
) -> str:
    """The chat up to the assistant header, with each ``<|image_pad|>``
    expanded to its image's token count; one count for T2I, (source, edited)
    for edits."""
    pads = [_IMAGE.replace(IMAGE_PAD_TOKEN, IMAGE_PAD_TOKEN * n) for n in image_tokens]
    if len(pads) == 1:
        shown = f"{pads[0]}\nText prompt: {prompt}\n"
    elif len(pads) == 2:
        shown = f"Source image: {pads[0]}\nEdited image: {pads[1]}\nEditing instruction: {prompt}\n"
    else:
        raise ValueError(f"one image (T2I) or two (source, edited) per prompt, got {len(pads)}")
    question = question_text(settings, edit=len(pads) == 2, with_rationale=with_rationale)
    return (
        f"<|im_start|>system\n{settings.system_prompt}<|im_end|>\n"
        f"<|im_start|>user\n{shown}{question}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def level_token_ids(tokenizer: Any) -> list[int]:
    """Ids of "1".."5", each of which must be one token right after "Score: ".

    Checked in context because a tokenizer may merge a digit with the space
    before it (then the model would never predict the bare digit there).
    """
    prefix = tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False)
    ids = []
    for digit in LEVEL_TOKENS:
        alone = tokenizer.encode(digit, add_special_tokens=False)
        after = tokenizer.encode(ANSWER_PREFIX + digit, add_special_tokens=False)
        if len(alone) != 1 or after != prefix + alone:
            pieces = tokenizer.convert_ids_to_tokens(after)
            raise ValueError(
                f"the level {digit!r} is not exactly one token after {ANSWER_PREFIX!r} with this "
                f"tokenizer ({digit!r} -> {alone}, {ANSWER_PREFIX + digit!r} -> {pieces}); the VLM "
                "scorer reads the next-token logits of the digits 1..5 at the answer position, "
                "so it needs a tokenizer that keeps each digit a single token (as Qwen's does)"
            )
        ids.append(alone[0])
    return ids


def _check_text(texts: list[str], what: str) -> None:
    """Refuse prompts or rationales that smuggle in chat or image markers."""
    for i, text in enumerate(texts):
        found = [marker for marker in _RESERVED if marker in text]
        if found:
            raise ValueError(f"{what} {i} contains reserved chat/image markers {found}: {text!r}")


class QwenVLScorer(torch.nn.Module):
    """A :class:`~flowrl.rewards.backbone.ScoreBackbone` on Qwen2.5-VL.

    ``images`` / ``sources`` are [B, 3, H, W] floats in [0, 1]. As an
    ``nn.Module`` its ``parameters()`` are the VLM's (all trainable) and
    ``train()`` / ``eval()`` reach the VLM.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        image_processor: Any,
        settings: VLMScorerSettings = VLMScorerSettings(),
    ):
        super().__init__()
        self.level_ids = level_token_ids(tokenizer)
        vision = model.config.vision_config
        if (image_processor.patch_size, image_processor.merge_size) != (
            vision.patch_size,
            vision.spatial_merge_size,
        ):
            raise ValueError(
                f"image processor patch/merge {image_processor.patch_size}/"
                f"{image_processor.merge_size} != vision tower {vision.patch_size}/"
                f"{vision.spatial_merge_size}"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a pad token for batched (left-padded) inputs")
        if settings.max_rationale_tokens < 1:
            raise ValueError(
                f"max_rationale_tokens must be >= 1, got {settings.max_rationale_tokens}"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.settings = settings

    # ------------------------------------------------------------------ persistence

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        **overrides: Any,
    ) -> "QwenVLScorer":
        """Load a save_pretrained directory holding model, tokenizer and image
        processor (the layout of the Qwen2.5-VL-Instruct repositories).

        Settings come from :data:`SETTINGS_FILE` when present (a directory
        written by :meth:`save`), else the defaults; ``overrides`` replace
        single fields (e.g. ``rationale=True``).
        """
        from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration
        from transformers import Qwen2VLImageProcessorPil

        root = Path(path)
        settings_file = root / SETTINGS_FILE
        stored = json.loads(settings_file.read_text()) if settings_file.is_file() else {}
        settings = VLMScorerSettings(**{**stored, **overrides})
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(root), dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(str(root))
        # The PIL backend: the torchvision one (and Qwen2_5_VLProcessor) need torchvision.
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(root))
        return cls(model.to(device).eval(), tokenizer, image_processor, settings)

    def save(self, directory: str | Path) -> None:
        """save_pretrained of the three components plus the settings JSON."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(str(root))
        self.tokenizer.save_pretrained(str(root))
        self.image_processor.save_pretrained(str(root))
        (root / SETTINGS_FILE).write_text(json.dumps(dataclasses.asdict(self.settings), indent=2))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ inputs

    def _vision_inputs(
        self, images: torch.Tensor, sources: torch.Tensor | None
    ) -> tuple[dict[str, torch.Tensor], list[tuple[int, ...]]]:
        """Pixel inputs in the order the images appear in the chats (per
        example: source, then edited) and each example's image-token counts."""
        batch = images.shape[0]
        if sources is not None and sources.shape[0] != batch:
            raise ValueError(f"{batch} images but {sources.shape[0]} sources")
        shown = [images] if sources is None else [sources, images]
        pils = [to_pil_images(group) for group in shown]  # per group: B PIL images
        ordered = [pil[i] for i in range(batch) for pil in pils]
        vision = self.image_processor(images=ordered, return_tensors="pt")
        merge = self.image_processor.merge_size
        counts = [int(thw.prod()) // merge**2 for thw in vision["image_grid_thw"]]  # [B * n]
        per_image = len(shown)
        grouped = [tuple(counts[i * per_image : (i + 1) * per_image]) for i in range(batch)]
        return dict(vision), grouped

    def _tokenize(self, texts: list[str], target_starts: list[int]) -> tuple[torch.Tensor, ...]:
        """Left-padded ids and attention mask [B, T], plus the [B, T] mask of
        tokens starting at or after each row's ``target_starts`` character."""
        encoded = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        length = max(len(ids) for ids in encoded["input_ids"])
        input_ids = torch.full((len(texts), length), self.tokenizer.pad_token_id)  # [B, T]
        attention = torch.zeros(len(texts), length, dtype=torch.long)  # [B, T]
        targets = torch.zeros(len(texts), length, dtype=torch.bool)  # [B, T]
        for row, (ids, offsets, start) in enumerate(
            zip(encoded["input_ids"], encoded["offset_mapping"], target_starts)
        ):
            pad = length - len(ids)
            input_ids[row, pad:] = torch.tensor(ids)
            attention[row, pad:] = 1
            targets[row, pad:] = torch.tensor([begin >= start for begin, _ in offsets])
        return input_ids, attention, targets

    def build_inputs(
        self,
        images: torch.Tensor,
        prompts: list[str],
        sources: torch.Tensor | None = None,
        rationales: list[str] | None = None,
        *,
        answer: bool = True,
    ) -> ScorerBatch:
        """The model inputs of the judge's chats.

        ``rationales`` None means no rationale in the sequence; ``answer``
        False stops at the assistant header (the input for rationale
        generation). The LM targets are the rationale and the answer prefix
        after it: what the judge writes itself before the digit.
        """
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        if rationales is not None and len(rationales) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(rationales)} rationales")
        _check_text(list(prompts), "prompt")
        _check_text(list(rationales or []), "rationale")
        vision, counts = self._vision_inputs(images, sources)
        with_rationale = rationales is not None
        heads = [
            prompt_text(p, n, self.settings, with_rationale=with_rationale or not answer)
            for p, n in zip(prompts, counts)
        ]
        if not answer:
            texts = heads
        elif rationales is None:
            texts = [head + ANSWER_PREFIX for head in heads]
        else:
            texts = [head + r.strip() + "\n" + ANSWER_PREFIX for head, r in zip(heads, rationales)]
        starts = [len(head) if with_rationale else len(text) for head, text in zip(heads, texts)]
        input_ids, attention, targets = self._tokenize(texts, starts)
        image_id = self.model.config.image_token_id
        inputs = dict(vision)
        inputs.update(
            input_ids=input_ids,  # [B, T]
            attention_mask=attention,  # [B, T]
            mm_token_type_ids=(input_ids == image_id).int(),  # [B, T]: 3-D M-RoPE for image tokens
        )
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return ScorerBatch(inputs, targets.to(self.device))

    # ------------------------------------------------------------------ scoring

    @torch.no_grad()
    def generate_rationales(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> list[str]:
        """Greedy rationales, up to ``max_rationale_tokens`` each, batched with
        left padding; each ends at an end-of-turn token or before the first
        "Score:" the judge writes itself."""
        batch = self.build_inputs(images, prompts, sources, answer=False)
        vocab = self.tokenizer.get_vocab()
        stops = {vocab[t] for t in ("<|im_end|>", "<|endoftext|>") if t in vocab}
        stops.add(self.tokenizer.pad_token_id)
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                **batch.inputs,
                max_new_tokens=self.settings.max_rationale_tokens,
                do_sample=False,
                eos_token_id=sorted(stops),
                pad_token_id=self.tokenizer.pad_token_id,
                stop_strings=[ANSWER_PREFIX.strip()],
                tokenizer=self.tokenizer,
            )  # [B, T + n]
        finally:
            self.model.train(was_training)
        new = out[:, batch.inputs["input_ids"].shape[1] :].tolist()  # [B, n]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        rationales = [text.split(ANSWER_PREFIX.strip())[0].strip() for text in texts]
        for marker in _RESERVED:  # decoded pieces can spell a marker: keep it out of the chat
            rationales = [r.replace(marker, "") for r in rationales]
        return rationales

    def _answer_hidden(self, batch: ScorerBatch) -> torch.Tensor:
        """Last-layer hidden states of the judge's chats: [B, T, D]."""
        out = self.model.model(**batch.inputs, use_cache=False)
        return out.last_hidden_state  # [B, T, D]

    def answer_logits(
        self,
        images: torch.Tensor,
        prompts: list[str],
        sources: torch.Tensor | None = None,
        rationales: list[str] | None = None,
    ) -> torch.Tensor:
        """Full-vocabulary next-token logits at the answer position: [B, V].

        With ``rationale=True`` in the settings and no ``rationales`` given,
        the judge writes its own first.
        """
        if rationales is None and self.settings.rationale:
            rationales = self.generate_rationales(images, prompts, sources)
        batch = self.build_inputs(images, prompts, sources, rationales)
        hidden = self._answer_hidden(batch)  # [B, T, D]
        return self.model.lm_head(hidden[:, -1]).float()  # [B, V]

    def level_logits(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, 5] of the tokens "1".."5" at the answer position
        (differentiable: the Bradley-Terry path trains through it)."""
        return self.answer_logits(images, prompts, sources)[:, self.level_ids]  # [B, 5]

    def forward(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Same as :meth:`level_logits` (so wrappers that call the module work)."""
        return self.level_logits(images, prompts, sources)

    @torch.no_grad()
    def score(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Reward [B] in [1, 5]: the expected level under the renormalised
        probabilities of the five digit tokens."""
        return expected_score(self.level_logits(images, prompts, sources))  # [B]

    def score_components(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> RewardScores:
        """One component, named after the criterion (the RewardModel protocol)."""
        total = self.score(images, prompts, sources)  # [B]
        return RewardScores(total, {self.settings.criterion: total})

    # ------------------------------------------------------------------ training

    def loss_terms(
        self,
        images: torch.Tensor,
        prompts: list[str],
        rationales: list[str] | None,
        labels: torch.Tensor,
        sources: torch.Tensor | None = None,
    ) -> LossTerms:
        """Teacher-forced losses of (image, prompt, rationale, score) targets.

        ``score`` is :func:`pointwise_loss` on the level logits of the
        teacher-forced sequence (cross-entropy of the label digit over the
        five renormalised digits); ``rationale`` is the mean token NLL of the
        rationale and the "\\nScore: " after it (so the judge also learns to
        end its rationale); ``total = score + rationale_loss_weight * rationale``.
        """
        labels = torch.as_tensor(labels)
        if labels.shape != (len(prompts),) or bool(((labels < 1) | (labels > LEVELS)).any()):
            raise ValueError(f"labels must be {len(prompts)} levels in 1..{LEVELS}, got {labels}")
        batch = self.build_inputs(images, prompts, sources, rationales)
        hidden = self._answer_hidden(batch)  # [B, T, D]
        levels = self.model.lm_head(hidden[:, -1]).float()[:, self.level_ids]  # [B, 5]
        score = pointwise_loss(levels, labels.to(levels.device))
        targets = batch.target_mask[:, 1:]  # [B, T-1]: token t+1 is predicted at t
        if not bool(targets.any()):
            return LossTerms(score, score, score.new_zeros(()))
        predicted = self.model.lm_head(hidden[:, :-1][targets]).float()  # [N, V]
        rationale = F.cross_entropy(predicted, batch.inputs["input_ids"][:, 1:][targets])
        total = score + self.settings.rationale_loss_weight * rationale
        return LossTerms(total, score, rationale)

    def training_loss(
        self,
        images: torch.Tensor,
        prompts: list[str],
        rationales: list[str] | None,
        labels: torch.Tensor,
        sources: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Scalar loss to minimise: see :meth:`loss_terms`."""
        return self.loss_terms(images, prompts, rationales, labels, sources).total
