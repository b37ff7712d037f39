"""Typed, validated configuration.

Each YAML file (``configs/*.yaml``) maps 1:1 onto :class:`FlowRLConfig`: one
frozen dataclass per section, one documented field per key. Loading rejects
unknown keys, wrong types and out-of-range values *before* any work starts,
naming the full key path, e.g.
``base.lr: expected float > 0, got 'fast'``.

Field documentation lives in ``field(metadata={"doc": ...})`` so that
``flowrl config-doc`` (and the README) can print it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import reprlib
import shlex
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from flowrl.redact import redact_url


class ConfigError(ValueError):
    """A configuration problem; the message starts with the key path."""

    def __init__(self, *args: object) -> None:  # no credential of a URL in an error line (flowrl.redact)
        super().__init__(*(redact_url(a) if isinstance(a, str) else a for a in args))


# Limits on what a config may ask for, so that a hostile or mistaken file fails at load with a short
# message instead of allocating, overflowing or printing megabytes later.
CONFIG_MAX_BYTES = 1 << 20  # a config file (and one --set value); the shipped ones are a few KB
YAML_MAX_NODES = 10_000  # values of a document, aliases expanded (each use counts its whole target); shipped: ~300
YAML_MAX_DEPTH = 64  # nesting of lists and mappings
SHOWN_MAX = 200  # characters of a user's value quoted in an error message
SEED_MAX = 2**32 - 1  # stages derive seeds as seed * 1_000_003 + item, which must stay in torch's 64-bit range
INT_MAX = 2**31 - 1  # an integer key without an upper bound of its own
BATCH_MAX = 65_536  # items in one batch, group or micro-batch (each allocates its images at once)
STEPS_MAX = 10_000  # sampler steps of one trajectory (a trajectory keeps its states)
MODEL_WIDTH_MAX = 8192  # transformer width of the shapes-world DiT and scorer
MODEL_DEPTH_MAX = 256  # transformer blocks of those
LORA_RANK_MAX = 4096  # above the width of any layer it adapts
IMAGE_SIDE_MAX = 4096  # model.qwen_image height / width in pixels (Qwen-Image works near 1 megapixel)


def param(
    default: Any, doc: str, *, gt=None, ge=None, lt=None, le=None, nonempty: bool = False, added: bool = False,
    operational: bool = False, cap: int | None = None,
) -> Any:
    """A documented config field with optional numeric bounds (or, for
    strings, ``nonempty``).

    ``added``: a key added after results and caches were keyed on its
    section, whose default reproduces the earlier behaviour; at its default
    it is left out of :meth:`FlowRLConfig.section_hash`, so those stay valid.

    ``operational``: a key that changes how a stage runs but not what it
    produces (where a service is, its retries and timeouts, on which GPUs a
    sidecar runs, how often checkpoints are saved or images logged to the
    tracker). :meth:`FlowRLConfig.section_hash` counts it at its default
    whatever its value, so the version, hence ``--resume`` and caching, does
    not depend on it, and a config at the default hashes as before.

    ``cap``: for an integer, the largest value taken where a larger one would only exhaust memory or
    time (a batch size, an image side); checked after the bounds. An integer key without ``le``,
    ``lt`` or ``cap`` is capped at :data:`INT_MAX`.
    """
    bounds = {k: v for k, v in dict(gt=gt, ge=ge, lt=lt, le=le, cap=cap).items() if v is not None}
    if nonempty:
        bounds["nonempty"] = True
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples / nested dataclasses for config defaults")
    if operational:
        doc += " Operational: not part of the stage's version (a run may --resume with another value)."
    return field(default=default, metadata={"doc": doc, "bounds": bounds, "added": added, "operational": operational})


def _hash_payload(value: Any) -> Any:
    """Plain data of a config value for hashing: ``operational`` keys count at their default whatever
    their value, and ``added`` keys at their default are left out."""
    if dataclasses.is_dataclass(value):
        items = {f.name: (f.default if f.metadata.get("operational") else getattr(value, f.name), f)
                 for f in dataclasses.fields(value)}
        return {
            name: _hash_payload(item)
            for name, (item, f) in items.items()
            if not (f.metadata.get("added") and item == _field_default(f))
        }
    if isinstance(value, (list, tuple)):
        return [_hash_payload(v) for v in value]
    return value


def _field_default(f: dataclasses.Field) -> Any:
    """A field's default value (a subsection's: a fresh default instance)."""
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def section(factory: type, doc: str) -> Any:
    """A nested config section (a dataclass) with a default instance."""
    return field(default_factory=factory, metadata={"doc": doc, "bounds": {}})


def _moved_keys(data: dict, prefix: str, moved: dict[str, str]) -> None:
    """A key of ``data`` that is a key of ``moved`` (an earlier config's key, without the section) is a
    ConfigError naming it and its new full key path, ``moved[key]``."""
    for key, new in moved.items():
        if key in data:
            raise ConfigError(f"{prefix}{key}: this key moved; write {new} instead")


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RunConfig:
    """Where a run writes and how it is identified."""

    name: str = param("shapes", "Run name; the MLflow experiment is named after it.", nonempty=True)
    seed: int = param(0, "Global seed: every stage derives its own seeds from it.", ge=0, le=SEED_MAX)
    artifact_root: str = param(
        "artifacts",
        "Root of the artifact store: a local directory (relative to the working "
        "directory) or a fsspec URI such as s3://bucket/prefix.",
        nonempty=True,
    )
    tracking_uri: str = param(
        "",
        "MLflow tracking URI: http(s)://host:port or sqlite:///FILE; empty (the default): "
        "$MLFLOW_TRACKING_URI, else the local sqlite:///mlflow.db (MLflow's convention).",
    )
    torch_threads: int | None = param(2, "CPU threads torch may use (null: torch's own default).", ge=1)


@dataclass(frozen=True)
class WorldConfig:
    """The shapes world: the synthetic domain of the CPU default."""

    resolution: Literal[32, 64] = param(32, "Image side in pixels (a 4x4 grid of cells).")


@dataclass(frozen=True)
class ShapesModelConfig:
    """The shapes-world DiT: pixel-space, patch tokens + prompt tokens + source tokens."""

    width: int = param(128, "Transformer width.", gt=0, cap=MODEL_WIDTH_MAX)
    depth: int = param(6, "Number of transformer blocks.", ge=1, cap=MODEL_DEPTH_MAX)
    heads: int = param(4, "Attention heads (must divide width).", ge=1)
    patch: int = param(8, "Patch size in pixels (must divide the resolution).", ge=1)
    prediction: Literal["x", "v"] = param(
        "x", "Network output: the clean image (x, converted to a velocity) or the velocity (v)."
    )
    head_channels: int = param(
        16, "Channels of the unpatchified map fed to the final 3x3 conv head.", ge=1, cap=MODEL_WIDTH_MAX
    )


@dataclass(frozen=True)
class QwenImageLoraConfig:
    """LoRA adapters (peft) on the Qwen-Image transformer, trained instead of its weights (docs/lora.md)."""

    rank: int = param(0, "Adapter rank (0: off, full-parameter training).", ge=0, cap=LORA_RANK_MAX)
    alpha: float | None = param(None, "LoRA alpha: the adapter's output is scaled by alpha / rank (null: the rank, "
                                "a scale of 1).", gt=0)
    dropout: float = param(0.0, "Dropout on the adapter's input while training. Above 0 the training forward no "
                           "longer reproduces the rollout's, so GRPO's ratio is not 1 before the first update.",
                           ge=0, lt=1)
    target_modules: tuple[str, ...] = param(
        ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"),
        "Linear layers that get an adapter, by the end of their module path as peft matches them: by default the "
        "attention projections of both streams; add img_mlp.net.0.proj, img_mlp.net.2, txt_mlp.net.0.proj, "
        "txt_mlp.net.2 (MLPs) or img_mod.1, txt_mod.1 (modulation) for more capacity. A name matching no layer "
        "is an error.", nonempty=True)


@dataclass(frozen=True)
class QwenImageModelConfig:
    """Production family: diffusers Qwen-Image / Qwen-Image-Edit weights."""

    pretrained: str = param("", "Local directory in the diffusers layout, or a hub id.")
    edit_pretrained: str | None = param(
        None, "Weights used for the edit task (Qwen-Image-Edit); null: the same as pretrained."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = param("bfloat16", "Compute dtype.")
    height: int = param(1024, f"Image height in pixels (multiple of 16, at most {IMAGE_SIDE_MAX}).", ge=16,
                         cap=IMAGE_SIDE_MAX)
    width: int = param(1024, f"Image width in pixels (multiple of 16, at most {IMAGE_SIDE_MAX}).", ge=16,
                        cap=IMAGE_SIDE_MAX)
    lora: QwenImageLoraConfig | None = param(
        None, "GRPO and OPD train LoRA adapters on the transformer (rank > 0): the reference and the OPD starting "
        "point are the base with adapters off (no copy), teachers are adapters; artifacts hold the adapter and the "
        "merged transformer. Keys: rank (0: off), alpha (null: the rank), dropout (0.0), target_modules (default: "
        "the 8 attention projections); docs/lora.md. grpo/opd.optim.zero_stage 0-2 (not 3). null or rank 0: "
        "full-parameter training.", added=True)
    text_encoder_device: Literal["same", "cpu", "offload"] = param(
        "same", "Where the Qwen2.5-VL text encoder of the RL stages runs: same (the transformer's device), cpu "
        "(off the GPU; prompts are encoded once per rollout, slowly, and the embeddings moved over) or offload "
        "(kept in host memory and copied to the transformer's GPU for each prompt encoding, then dropped there: "
        "off the GPU while sampling and training, encoding at GPU speed plus one host-to-GPU copy of its weights "
        "per call).", added=True)
    decode_batch: int | None = param(
        None, "Images per VAE call when decoding latents (and encoding edit sources): a batch is decoded in parts "
        "of at most this many, joined in order, to bound the VAE's working set (about 4 GiB per 1024x1024 image). "
        "null: the whole batch in one call.", ge=1, cap=BATCH_MAX, added=True)


@dataclass(frozen=True)
class SD3ModelConfig:
    """Stable Diffusion 3 / 3.5 (text-to-image) from diffusers weights (flowrl/models/sd3.py)."""

    pretrained: str = param("", "Local directory in the diffusers layout (StableDiffusion3Pipeline), or a hub id.")
    dtype: Literal["float32", "bfloat16", "float16"] = param("bfloat16", "Compute dtype.")
    height: int = param(1024, f"Image height in pixels (multiple of 16, at most {IMAGE_SIDE_MAX}).", ge=16,
                         cap=IMAGE_SIDE_MAX)
    width: int = param(1024, f"Image width in pixels (multiple of 16, at most {IMAGE_SIDE_MAX}).", ge=16,
                        cap=IMAGE_SIDE_MAX)
    text_encoder_3: bool = param(True, "Load the T5 encoder when the weights have it; false: its part of the "
                                 "prompt is zeros, as the pipeline does with text_encoder_3=None.")
    max_sequence_length: int = param(256, "T5 tokens of a prompt (the pipeline's max_sequence_length).", ge=1, le=512)
    shift: float | None = param(None, "Static shift of the sigma schedule (null: the scheduler config's, 3.0 for "
                                "SD3.5).", gt=0)


@dataclass(frozen=True)
class ModelConfig:
    """Which model family and its settings."""

    family: Literal["shapes", "qwen_image", "sd3"] = param("shapes", "Model family (one adapter each).")
    shapes: ShapesModelConfig = section(ShapesModelConfig, "Settings of the shapes family.")
    qwen_image: QwenImageModelConfig = section(
        QwenImageModelConfig, "Settings of the qwen_image family."
    )
    sd3: SD3ModelConfig | None = param(None, "Settings of the sd3 family (required when model.family is sd3; keys: "
                                       "pretrained, dtype, height, width, text_encoder_3, max_sequence_length, "
                                       "shift).", added=True)


@dataclass(frozen=True)
class SamplerConfig:
    """The deployment sampler (bench, evaluation, OPD student rollouts)."""

    num_steps: int = param(20, "Number of denoising steps.", ge=1, cap=STEPS_MAX)
    shift: float = param(1.0, "Static timestep shift s t / (1 + (s - 1) t).", gt=0)
    guidance_scale: float = param(3.0, "Classifier-free guidance scale (1 = off).", ge=1)
    cfg_renorm: bool = param(
        False,
        "Rescale the guided velocity to the conditional norm per position "
        "(always on for qwen_image, as its pipelines do).",
    )


@dataclass(frozen=True)
class EvalConfig:
    """The fixed held-out prompt sets scored by the judge."""

    seed: int = param(1234, "Seed of the held-out prompt sets (never used for training).", ge=0, le=SEED_MAX)
    t2i_per_category: int = param(50, "Held-out T2I prompts per category.", ge=1)
    edit_per_kind: int = param(50, "Held-out edit instructions per kind.", ge=1)
    batch_size: int = param(100, "Sampling batch size for evaluation.", ge=1, cap=BATCH_MAX)


@dataclass(frozen=True)
class BaseConfig:
    """Stage `base`: pretrain the shapes model (or validate production weights)."""

    steps: int = param(3000, "Optimizer steps.", ge=1)
    batch_size: int = param(32, "Images per step.", ge=1, cap=BATCH_MAX)
    lr: float = param(1e-3, "Peak AdamW learning rate.", gt=0)
    warmup_steps: int = param(100, "Linear warm-up steps.", ge=0)
    weight_decay: float = param(0.0, "AdamW weight decay.", ge=0)
    ema_decay: float = param(
        0.99, "EMA decay of the saved weights (0 saves the raw weights: an average over one step).", ge=0, lt=1
    )
    edit_fraction: float = param(0.5, "Fraction of each batch that is edit triples.", ge=0, le=1)
    cond_dropout: float = param(0.1, "Probability of dropping the prompt (trains the CFG null branch).", ge=0, lt=1)
    grad_clip: float = param(1.0, "Gradient norm clip.", gt=0)
    log_every: int = param(50, "Log training metrics every N steps.", ge=1, operational=True)
    checkpoint_every: int = param(
        500, "Checkpoint to the artifact store every N steps (and after the last); `--resume` continues from the "
        "newest.", ge=1, operational=True, added=True)


# The faults a degraded annotation candidate can show (flowrl.rewards.shapes_dataset.degrade).
Degradation = Literal["noise", "blur", "blotches", "color_cast"]


@dataclass(frozen=True)
class PolicyRoundConfig:
    """The second annotation round (pipeline.annotation_rounds: 2): fresh prompts with samples of the first
    round's RL policies, labelled by the same simulated annotators."""

    seed: int = param(707, "Seed of the round's prompts and labels (disjoint use from annotate.seed).", ge=0,
                      le=SEED_MAX)
    t2i_per_category: int = param(100, "Fresh T2I prompts per category, each with samples of the T2I policy.", ge=1)
    edit_per_kind: int = param(100, "Fresh edit instructions per kind, each with samples of the edit policy.", ge=1)
    model_samples: int = param(2, "Samples of the task's round-1 RL policy per prompt.", ge=1)
    rendered: bool = param(
        True, "Also show the annotators the rendered candidates of round 1's kind (clean, contradicting, "
        "degraded), so the pairs compare policy samples with known-good and known-bad images.")
    degradations: tuple[Degradation, ...] | None = param(
        None, "The faults of this round's degraded candidates (names as annotate.degradations); null: "
        "annotate.degradations.")


@dataclass(frozen=True)
class AnnotateConfig:
    """Stage `annotate`: candidate images and simulated annotators (shapes world)."""

    seed: int = param(101, "Seed of the annotation prompts (disjoint use from eval.seed).", ge=0, le=SEED_MAX)
    t2i_per_category: int = param(300, "Fresh T2I prompts per category.", ge=1)
    edit_per_kind: int = param(300, "Fresh edit instructions per kind.", ge=1)
    model_samples: int = param(2, "Base-model samples per prompt added to the rendered candidates.", ge=0)
    annotators: int = param(8, "Simulated annotators in the pool.", ge=1)
    bias_std: float = param(0.3, "Std of an annotator's bias, in Likert levels.", ge=0)
    noise_min: float = param(0.3, "Smallest annotator noise std, in Likert levels.", ge=0)
    noise_max: float = param(0.7, "Largest annotator noise std, in Likert levels.", ge=0)
    labels_per_image: int = param(2, "Annotators labelling each image (pointwise).", ge=1)
    pairs_per_prompt: int = param(4, "Judged pairs per prompt (pairwise).", ge=0)
    pointwise_path: str | None = param(
        None, "Human labels instead of simulated ones: a pointwise parquet in the documented schema."
    )
    pairwise_path: str | None = param(None, "Human labels: the pairwise parquet (with pointwise_path).")
    on_bad_row: Literal["fail", "skip"] = param("fail", "Bad rows in the given parquet files: fail, or skip them (counted).")
    degradations: tuple[Degradation, ...] = param(
        ("noise", "blur", "blotches"),
        "The degraded candidates' faults, one drawn per image: noise, blur (texture), blotches (stray blobs), "
        "color_cast (object pixels moved off their palette colour). A reward model only learns to see the faults "
        "its annotators were shown.", added=True)
    policy_round: PolicyRoundConfig = field(
        default_factory=PolicyRoundConfig, metadata={
            "doc": "The second annotation round, on samples of the first round's RL checkpoints (run when "
                   "pipeline.annotation_rounds is 2; the first round's artifact does not depend on it).",
            "bounds": {}, "added": True})

    @staticmethod
    def check_data_shape(data: dict, prefix: str) -> None:
        """(:func:`from_dict` calls it before reading the keys.) The earlier spelling is a ConfigError naming
        the key that replaced it."""
        _moved_keys(data, prefix, {"edits_per_kind": "annotate.edit_per_kind"})


@dataclass(frozen=True)
class RewardModelConfig:
    """Stage `reward_model`: pointwise scorers per criterion, and a pairwise one to compare."""

    backbone: Literal["shapes", "vlm"] = param(
        "shapes", "Scorer backbone: the small shapes scorer, or a Qwen2.5-VL model (vlm_pretrained)."
    )
    vlm_pretrained: str | None = param(
        None, "vlm backbone: a Qwen2.5-VL directory (model, tokenizer, image processor) or hub id."
    )
    vlm_rationale: bool = param(False, "vlm backbone: generate a rationale before scoring (chain of thought).")
    width: int = param(96, "Scorer width.", ge=8, cap=MODEL_WIDTH_MAX)
    depth: int = param(4, "Scorer transformer blocks.", ge=1, cap=MODEL_DEPTH_MAX)
    heads: int = param(4, "Scorer attention heads.", ge=1)
    stem: int = param(0, "Channels of the shapes scorer's convolutional stem (two 3x3 convolutions before the "
                      "patches: local texture and colour features); 0: the patches' pixels only.", ge=0, le=64,
                      added=True)
    steps: int = param(2000, "Optimizer steps of the alignment and pairwise models.", ge=1)
    easy_steps: int = param(
        1000, "Optimizer steps of the quality and fidelity models (texture and structure learn much faster).", ge=1
    )
    batch_size: int = param(64, "Rows per step.", ge=1, cap=BATCH_MAX)
    lr: float = param(1e-3, "AdamW learning rate.", gt=0)
    weight_decay: float = param(0.01, "AdamW weight decay.", ge=0, added=True)
    grad_clip: float = param(1.0, "Gradient norm clip.", gt=0, added=True)
    checkpoint_every: int | None = param(
        None, "Checkpoint each scorer's training to the artifact store every N steps (and after its last), so "
        "`resume` continues a stopped stage; null: no checkpoints.", ge=1, operational=True, added=True)
    heldout_fraction: float = param(
        0.2, "Share of annotation groups (prompt instances) held out for the metrics.", gt=0, lt=1
    )
    unseen_prompt_fraction: float = param(
        0.1, "Share of prompt texts held out entirely (metrics prefixed unseen_prompt_; 0: none).", ge=0, lt=1
    )
    on_bad_row: Literal["fail", "skip"] = param("fail", "Bad annotation rows: fail the stage, or skip them (counted).")
    t2i_criteria: tuple[str, ...] = param(("alignment", "quality", "fidelity"), "Likert columns with a T2I pointwise model.")
    edit_criteria: tuple[str, ...] = param(("alignment",), "Likert columns with an edit pointwise model.")
    pairwise: bool = param(True, "Also train the pairwise (Bradley-Terry) model per task, for comparison.")
    augment: tuple[Literal["mirror", "palette"], ...] = param(
        (), "Label-preserving variants of the training rows (shapes backbone): mirror (the picture flipped left "
        "to right, 'left' and 'right' swapped in the prompt), palette (the colours relabelled alike in the "
        "picture and the words). A variant whose prompt is held out (an unseen or bench text) is not used.",
        added=True)
    refresh_steps: int = param(
        500, "The refreshed reward model (second annotation round): optimizer steps of every scorer, each "
        "starting from the first round's weights, on both rounds' rows (0: the first round's weights "
        "unchanged). The first round's artifact does not depend on it.", ge=0, added=True)


@dataclass(frozen=True, repr=False)
class RewardComponent:
    """One component of a composite reward: a scorer, its weight, and its weight for some prompt categories.
    A YAML entry reads ``{name: quality, scorer: learned, weight: 0.25, categories: [counting=0.5]}``."""

    name: str = param("", "The component's name, unique within its task (required): its scores are logged under "
                      "it and GRPO normalises each component's rewards apart before weighting them.", nonempty=True)
    scorer: str = param(
        "learned", "Scorer type, a name in the scorer registry (flowrl/rewards/registry.py): learned (the "
        "reward_model artifact's pointwise scorer of `criterion`, in reward_model.backbone's model), identity "
        "(how well an edit keeps the objects its instruction leaves alone; shapes family only) or "
        "jpeg_compressibility (rule-based: the negated JPEG size in kB).", nonempty=True)
    criterion: str | None = param(
        None, "learned: the reward_model criterion (reward_model.t2i_criteria / edit_criteria) whose pointwise "
        "scorer this is; null: the component's name. Other scorer types take none.")
    weight: float = param(1.0, "Weight in the composite's sum for prompts of a category not in `categories`.", ge=0)
    categories: tuple[str, ...] = param(
        (), "CATEGORY=WEIGHT entries: this component's weight for prompts of that category (a T2I category or an "
        "edit kind; qwen_image: the prompt files' categories) instead of `weight`. A category named by one "
        "component takes the other components' `weight`.")
    gate: str | None = param(
        None, "Name of another component of the same task whose score, mapped onto [0, 1] through its score "
        "range (0 up to the middle of the range, then rising linearly to 1 at the top: (level - 3) / 2 for a "
        "learned Likert scorer, 0 at level 3 or less), multiplies this component's score row by row; the product is logged and weighted as `<name>_gated`, the raw score is still logged (weight 0). "
        "A gate is itself ungated. E.g. identity gated by instruction: keeping the source pays only as far as "
        "the instruction was carried out. null: ungated.", added=True)

    def __repr__(self) -> str:  # the YAML flow form, as the config reference shows the defaults
        keys = [f"name: {self.name}", f"scorer: {self.scorer}"]
        if self.criterion is not None:
            keys.append(f"criterion: {self.criterion}")
        keys.append(f"weight: {self.weight}")
        if self.categories:
            keys.append(f"categories: [{', '.join(self.categories)}]")
        if self.gate is not None:
            keys.append(f"gate: {self.gate}")
        return "{" + ", ".join(keys) + "}"

    @staticmethod
    def check_data_shape(data: dict, prefix: str) -> None:
        """(:func:`from_dict` calls it before reading the keys.) ``categories`` given as a mapping is a
        ConfigError showing it as the list of entries it takes."""
        given = data.get("categories")
        if isinstance(given, dict):
            entries = ", ".join(f"{_clip(str(k)) if isinstance(k, str) else _shown(k)}={_shown(v)}"
                                for k, v in list(given.items())[:6])
            raise ConfigError(f"{prefix}categories: expected a list of CATEGORY=WEIGHT entries, here [{entries}]")

    def category_weights(self, key: str) -> dict[str, float]:
        """``categories`` as {category: weight}; a malformed entry is a ConfigError naming ``key.categories[i]``."""
        out: dict[str, float] = {}
        for i, (category, value) in enumerate(name_value_pairs(self.categories, f"{key}.categories",
                                                               "CATEGORY=WEIGHT")):
            try:
                weight = float(value)
            except ValueError:
                weight = math.nan
            if not math.isfinite(weight) or weight < 0:
                raise ConfigError(f"{key}.categories[{i}]: expected CATEGORY=WEIGHT with a weight >= 0, got "
                                  f"{_shown(self.categories[i])}")
            if category in out:
                raise ConfigError(f"{key}.categories[{i}]: category {_shown(category)} is given twice")
            out[category] = weight
        return out


REWARD_TASKS = ("t2i", "edit")
_DEFAULT_T2I = (
    RewardComponent(name="alignment", scorer="learned", weight=1.0),
    RewardComponent(name="quality", scorer="learned", weight=0.25),
    RewardComponent(name="fidelity", scorer="learned", weight=0.5),
)
_DEFAULT_EDIT = (
    RewardComponent(name="instruction", scorer="learned", criterion="alignment", weight=1.0),
    RewardComponent(name="identity", scorer="identity", weight=0.5, gate="instruction"),
)
# what a weight of the earlier mapping shape (rewards.t2i: {alignment: 1.0, ...}) became, for its error message
_OLD_COMPONENT = {"instruction": ("learned", "alignment"), "identity": ("identity", None)}


@dataclass(frozen=True)
class RewardsConfig:
    """The composite rewards RL optimises: per task, a list of components whose scores are summed with their
    weights (per prompt category). Each component is {name, scorer, criterion, weight, categories}
    (rewards.<task>[].* below); the composite keeps the list's order."""

    t2i: tuple[RewardComponent, ...] = param(_DEFAULT_T2I, "The T2I composite's components, in order.")
    edit: tuple[RewardComponent, ...] = param(_DEFAULT_EDIT, "The edit composite's components, in order.")

    def __post_init__(self) -> None:
        for task in REWARD_TASKS:
            self.weights(task)  # names, categories and weights checked now, naming the key
            self.gates(task)

    def gates(self, task: str) -> dict[str, str]:
        """{gated component: its gate} of ``task``, in component order. ConfigError naming
        ``rewards.<task>[i].gate`` for a gate that names the component itself, a component not in this
        task's list (one of the other task's included), a gated component (gates do not chain), or a
        gated component whose logged name ``<name>_gated`` is another component's name."""
        key = f"rewards.{task}"
        components = getattr(self, task)
        names = [c.name for c in components]
        gated = {c.name for c in components if c.gate is not None}
        out = {}
        for i, component in enumerate(components):
            gate = component.gate
            if gate is None:
                continue
            where = f"{key}[{i}].gate"
            if not isinstance(gate, str) or not gate:
                raise ConfigError(f"{where}: expected the name of another component of {key}, got {_shown(gate)}")
            if gate == component.name:
                raise ConfigError(f"{where}: component {_shown(gate)} cannot gate itself")
            if gate not in names:
                others = [c.name for t in REWARD_TASKS if t != task for c in getattr(self, t)]
                where_else = " (a component of another task: a gate must score the same rows)" \
                    if gate in others else ""
                raise ConfigError(f"{where}: no component {_shown(gate)} in {key}{where_else}; components are "
                                  f"{names}")
            if gate in gated:
                raise ConfigError(f"{where}: component {_shown(gate)} is gated itself; a gate must be ungated "
                                  "(gates do not chain)")
            column = f"{component.name}_gated"
            if column in names:
                raise ConfigError(f"{where}: the gated score is logged as {_shown(column)}, which is the name of "
                                  f"another component of {key}; rename one of them")
            out[component.name] = gate
        return out

    def weights(self, task: str) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """(default weights, {category: weights}) of ``task``'s components, each a {component: weight} in
        component order; a category's weights are the components' `weight` where they do not name it."""
        key = f"rewards.{task}"
        components = getattr(self, task)
        if not components:
            raise ConfigError(f"{key}: give at least one component, e.g. [{_DEFAULT_T2I[0]!r}]")
        seen: set[str] = set()
        by_component = []
        for i, component in enumerate(components):
            if not isinstance(component, RewardComponent):
                raise ConfigError(f"{key}[{i}]: expected a component {{name, scorer, weight, ...}}, got "
                                  f"{_show(component)}")
            if not component.name:
                raise ConfigError(f"{key}[{i}].name: required (the component's name, e.g. alignment)")
            safe_name(component.name, f"{key}[{i}].name")  # a metric key
            if component.name in seen:
                raise ConfigError(f"{key}[{i}].name: {_shown(component.name)} is given twice in {key}")
            seen.add(component.name)
            if component.criterion is not None:
                safe_name(component.criterion, f"{key}[{i}].criterion")  # part of a scorer's directory name
            by_component.append(component.category_weights(f"{key}[{i}]"))
        default = {c.name: c.weight for c in components}
        if not any(default.values()):
            raise ConfigError(f"{key}: every weight is zero; give at least one component a positive weight")
        categories = list(dict.fromkeys(category for weights in by_component for category in weights))
        rows = {}
        for category in categories:
            rows[category] = {c.name: w.get(category, c.weight) for c, w in zip(components, by_component)}
            if not any(rows[category].values()):
                raise ConfigError(f"{key}: every weight of category {_shown(category)} is zero; give one "
                                  "component a positive weight there")
        return default, rows

    @staticmethod
    def check_data_shape(data: dict, prefix: str) -> None:
        """(:func:`from_dict` calls it before reading the keys.) The earlier shape (a mapping of weights per task, t2i_categories / edit_kinds) is a ConfigError that
        names the new key and shows the given weights in the new shape."""
        for old, task in (("t2i_categories", "t2i"), ("edit_kinds", "edit")):
            if old in data:
                raise ConfigError(
                    f"{prefix}{old}: per-category weights moved into the components of {prefix}{task}: each "
                    f"component takes `categories: [CATEGORY=WEIGHT, ...]`, e.g. {prefix}{task}: "
                    f"[{RewardComponent(name='alignment', weight=1.0, categories=('counting=2.0',))!r}, ...]")
        for task in REWARD_TASKS:
            given = data.get(task)
            if not isinstance(given, dict):
                continue
            shown = []
            for name, weight in list(given.items())[:6]:
                scorer, criterion = _OLD_COMPONENT.get(name, ("learned", None)) if isinstance(name, str) else (
                    "learned", None)
                shown.append(f"{{name: {_clip(name) if isinstance(name, str) else _shown(name)}, scorer: {scorer}"
                             f"{f', criterion: {criterion}' if criterion else ''}, weight: {_shown(weight)}}}")
            raise ConfigError(
                f"{prefix}{task}: a mapping of weights is the earlier shape; {prefix}{task} is now a list of "
                f"components {{name, scorer, criterion, weight, categories}}, here: [{', '.join(shown)}]")


@dataclass(frozen=True)
class FilterConfig:
    """Stage `filter_prompts`: keep the prompts whose base-model rewards spread within a group."""

    seed: int = param(202, "Seed of the candidate prompts and of the base model's samples.", ge=0, le=SEED_MAX)
    t2i_per_category: int = param(100, "Candidate T2I prompts per category (shapes world).", ge=1)
    edit_per_kind: int = param(100, "Candidate edit instructions per kind (shapes world).", ge=1)
    group_size: int = param(8, "Samples per candidate prompt; each is drawn with GRPO's rollout sampler "
                            "(grpo.rollout), whose reward spread the filter measures.", ge=2, cap=BATCH_MAX)
    threshold_mode: Literal["absolute", "quantile"] = param(
        "quantile", "absolute: keep ranges >= threshold; quantile: drop the lowest `threshold` share of ranges."
    )
    threshold: float = param(0.25, "The range threshold (reward units) or the share of prompts to drop.", ge=0)
    threshold_scope: Literal["all", "category"] = param(
        "all", "quantile mode: the quantile is taken over all candidates, or within each category (edit kind), so "
        "a category whose groups spread less than the others' still keeps its most informative prompts.",
        added=True)
    batch_size: int = param(256, "Samples per generation batch.", ge=1, cap=BATCH_MAX)
    t2i_prompts: str | None = param(
        None, "qwen_image: the T2I candidate prompt file (parquet with prompt and category; local path or fsspec "
        "URI; schema in flowrl/prompt_files.py). The shapes world draws from its grammar instead.", added=True)
    edit_prompts: str | None = param(
        None, "qwen_image: the edit candidate file (parquet with prompt, category and source_image bytes).",
        added=True)
    heldout_fraction: float = param(
        0.1, "qwen_image: share of each prompt file set aside (by a hash of the row) as the held-out set that "
        "GRPO's hacking monitor and before/after evaluation score; never filtered or trained on.",
        gt=0, lt=1, added=True)

    @staticmethod
    def check_data_shape(data: dict, prefix: str) -> None:
        """(:func:`from_dict` calls it before reading the keys.) The earlier spelling is a ConfigError naming
        the key that replaced it; the earlier copies of the rollout sampler's keys name GRPO's, which the
        filter samples with."""
        _moved_keys(data, prefix, {"edits_per_kind": f"{prefix}edit_per_kind"})
        for key in ("num_steps", "noise_level"):
            if key in data:
                raise ConfigError(f"{prefix}{key}: this key was removed; the filter samples its candidates with "
                                  f"GRPO's rollout sampler: write grpo.rollout.{key} instead")


def subsection(factory: type, doc: str, *, added: bool = False, **defaults: Any) -> Any:
    """A nested config subsection of type ``factory`` whose default instance takes ``defaults`` (a stage's
    own defaults of a class several stages share). ``added``: as :func:`param`'s, for a whole subsection
    added later (left out of the hash while it equals its default instance)."""
    return field(default_factory=lambda: factory(**defaults), metadata={"doc": doc, "bounds": {}, "added": added})


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer and how the trained network runs forward and backward (grpo.optim, opd.optim)."""

    lr: float = param(1e-4, "AdamW learning rate.", gt=0)
    weight_decay: float = param(0.0, "AdamW weight decay.", ge=0)
    grad_clip: float = param(1.0, "Gradient norm clip.", gt=0)
    ema_decay: float = param(0.0, "EMA of the weights that are evaluated and saved (0: off).", ge=0, lt=1)
    zero_stage: int = param(
        0, "0: plain PyTorch (DDP across processes); 1, 2, 3: DeepSpeed ZeRO partitions the optimizer states, "
        "+ gradients, + weights across the data-parallel ranks (the production path for full-parameter training "
        "of large models; needs DeepSpeed, requirements/gpu.txt). The update is the same at every stage.",
        ge=0, le=3, added=True)
    gradient_checkpointing: bool = param(
        False, "Recompute the trained network's activations in the backward instead of keeping them (diffusers' "
        "per-block checkpointing for the pretrained families, torch.utils.checkpoint per block for shapes): the "
        "same update, one more forward of the trained part.", added=True)
    micro_batch: int | None = param(
        None, "Trajectories per forward / backward (GRPO: of the policy; OPD: of the student and of each "
        "teacher): a batch's rows run in parts of this many (each part holds micro_batch x the steps trained per "
        "trajectory states, x 2 for OPD's CFG branches) and their gradients accumulate, weighted so the update "
        "is the whole batch's. null: the whole batch in one forward.", ge=1, cap=BATCH_MAX, added=True)


@dataclass(frozen=True)
class LoopConfig:
    """The iterations of a training loop and what runs every so many of them (grpo.loop, opd.loop)."""

    iterations: int = param(200, "Iterations (rollouts or student samples, then the update).", ge=1)
    eval_every: int = param(25, "Score the held-out monitor sets every N iterations (GRPO: the hacking monitor).",
                            ge=1)
    monitor_per_category: int = param(10, "Monitor prompts per category / edit kind.", ge=1)
    checkpoint_every: int = param(50, "Checkpoint to the artifact store every N iterations.", ge=1, operational=True)
    grid_every: int = param(100, "Image grid of the monitor prompts every N iterations.", ge=1, operational=True)
    time_budget_s: float | None = param(
        None, "Stop after the iteration in which the iterations' own seconds (monitor evaluations and checkpoints "
        "not counted) reach this, keeping what was trained (the run records why it stopped; the monitor scores "
        "the last iteration). For comparisons on an equal wall-clock budget: where a run stops depends on the "
        "machine's speed. Part of the stage's version when set (a cut-short run is never reused for a whole "
        "one). null: run every iteration.", gt=0, added=True)


@dataclass(frozen=True)
class TimestepsConfig:
    """Which steps of each trajectory the loss is taken at (opd.timesteps; grpo.timesteps adds a window)."""

    mode: Literal["subset", "all"] = param(
        "subset", "subset: K steps per trajectory (OPD scales its loss by N/K); all: all N.")
    per_trajectory: int = param(2, "subset: K steps per trajectory.", ge=1)


@dataclass(frozen=True)
class WindowTimestepsConfig(TimestepsConfig):
    """GRPO's trained steps: K per trajectory, drawn from a window of the schedule (grpo.timesteps)."""

    fraction: float = param(
        0.5, "subset: steps are drawn from a window this share of the schedule wide (see start).", gt=0, le=1)
    start: float = param(
        0.0, "subset: the window begins this share into the schedule (0: the noisiest steps; 0.5 with fraction "
        "0.5: the second half).", ge=0, lt=1, added=True)


@dataclass(frozen=True)
class RolloutConfig:
    """GRPO's rollout sampler (grpo.rollout): the SDE sampler of the trained trajectories, and of the prompt
    filter's candidate samples, whose reward spread is what GRPO will see."""

    num_steps: int = param(10, "Sampler steps (N).", ge=1, cap=STEPS_MAX)
    noise_level: float = param(0.7, "SDE noise level a.", gt=0)
    guidance_scale: float = param(3.0, "CFG scale (cfg_mode none ignores it).", ge=1)
    cfg_mode: Literal["hybrid", "both", "none"] = param(
        "hybrid",
        "hybrid: guided rollouts, objective on the conditional branch; both: objective on the guided "
        "velocity; none: unguided rollouts and objective.",
    )
    micro_batch: int | None = param(
        None, "Trajectories per sampling forward (twice that many rows under CFG) and per VAE decode of a rollout "
        "chunk: its prompts x group_size rows are sampled in parts of at most this many. The noise is drawn for "
        "the whole chunk, so the rollouts are the same (up to float differences of smaller batches). null: the "
        "whole chunk in one forward per step.", ge=1, cap=BATCH_MAX, added=True)
    compile: bool = param(
        False, "Sample with the policy's network compiled by torch.compile (inductor; one compilation per "
        "batch shape, tens of seconds on a CPU). The same function up to float rounding, so the "
        "rollout/training ratio before an update is 1 only to that rounding; the training forward stays eager.",
        added=True)
    dynamics: Literal["flow", "dance", "cps"] = param(
        "flow", "The stochastic transition of an SDE step (noise level a): flow: Flow-GRPO's SDE, sigma_t = "
        "a sqrt(t / (1 - t)); dance: DanceGRPO's, the same SDE with a constant sigma_t = a; cps: coefficient-"
        "preserving sampling, std t' sin(a pi / 2), which needs a <= 1 and whose last step (into t = 0) is "
        "deterministic, never trained nor a KL anchor.", added=True)
    sde_steps: int | None = param(
        None, "Only this many consecutive steps (the SDE window, W) are stochastic; the rest are ODE steps "
        "(ode_solver), as in MixGRPO. GRPO then trains grpo.timesteps.per_trajectory steps drawn from the window "
        "of the iteration (which replaces grpo.timesteps.fraction and start) and takes its KL anchor steps from "
        "outside it. null: every step is stochastic.", ge=1, cap=STEPS_MAX, added=True)
    sde_start: int = param(
        0, "With sde_steps: the window's first step (0: the noisiest) at iteration 0.", ge=0, cap=STEPS_MAX,
        added=True)
    sde_slide_every: int | None = param(
        None, "With sde_steps: the window moves one step later (towards the clean end) every this many "
        "iterations: at iteration i (from 0) it starts at min(sde_start + i // sde_slide_every, num_steps - "
        "sde_steps), and stays at the last position once there. null: a fixed window.", ge=1, added=True)
    ode_solver: Literal["euler", "ab2"] = param(
        "euler", "With sde_steps: the solver of the deterministic steps outside the window: euler, or ab2 "
        "(second-order Adams-Bashforth in t on the velocity, one forward per step like euler; its first step "
        "and the first after a stochastic one are euler steps).", added=True)

    def __post_init__(self) -> None:
        key = "grpo.rollout"
        if self.dynamics == "cps" and self.noise_level > 1:
            raise ConfigError(f"{key}.noise_level: {self.noise_level} is above 1, and {key}.dynamics: cps needs a "
                              "noise level in (0, 1] (its std is t' sin(a pi / 2))")
        if self.sde_steps is None:
            for name, default in (("sde_start", 0), ("sde_slide_every", None), ("ode_solver", "euler")):
                if getattr(self, name) != default:
                    raise ConfigError(f"{key}.{name}: {getattr(self, name)} places or solves around an SDE window, "
                                      f"and {key}.sde_steps is null (every step is stochastic); set "
                                      f"{key}.sde_steps or drop {key}.{name}")
        elif self.sde_start + self.sde_steps > self.num_steps:
            raise ConfigError(f"{key}.sde_steps: a window of {self.sde_steps} steps from {key}.sde_start "
                              f"{self.sde_start} is past the end of the {self.num_steps}-step schedule "
                              f"({key}.num_steps)")


@dataclass(frozen=True)
class NFTConfig:
    """DiffusionNFT's own settings (grpo.nft; used with grpo.algorithm: nft, flowrl/rl/nft.py): the rollouts'
    sampler noise, the noised copies of each clean sample the loss is taken on, the implicit policies' strength
    and the soft update of the sampling policy."""

    noise_level: float = param(
        0.0, "Noise level of the rollout sampler that draws the clean samples (0: the deterministic ODE "
        "sampler; > 0: the SDE of grpo.rollout.dynamics on grpo.rollout's SDE window). Steps, guidance, ODE "
        "solver and micro-batch are grpo.rollout's.", ge=0, added=True)
    timesteps_per_sample: int = param(
        2, "Noise levels t per clean sample (K): each sample is noised K times, each with fresh noise, and the "
        "loss is the mean over all of them.", ge=1, cap=STEPS_MAX, added=True)
    timestep_mode: Literal["schedule", "uniform"] = param(
        "schedule", "schedule: each t is one of the rollout schedule's noisy sigmas within [t_min, t_max], "
        "uniformly; uniform: t uniform in [t_min, t_max).", added=True)
    t_min: float = param(0.0, "Lowest noise level t trained.", ge=0, lt=1, added=True)
    t_max: float = param(1.0, "Highest noise level t trained (above t_min).", gt=0, le=1, added=True)
    beta: float = param(
        1.0, "Strength of the implicit policies v+- = v_old +- beta (v - v_old) the loss fits to the positive and "
        "the negative samples.", gt=0, added=True)
    adv_max: float = param(
        5.0, "The advantage that maps to certainty: a sample's optimality probability is "
        "r = 0.5 + 0.5 clip(A / adv_max, -1, 1).", gt=0, added=True)
    adaptive_weight: bool = param(
        True, "Weigh each term in x0-prediction space by the inverse of its detached mean absolute x0 error "
        "(DiffusionNFT's adaptive weighting); false: the plain squared velocity error.", added=True)
    decay_rate: float = param(
        0.001, "Soft update of the sampling policy after iteration i: theta_old <- eta theta_old + (1 - eta) theta "
        "with eta = min(decay_rate i, decay_max) (0: theta_old follows theta exactly).", ge=0, added=True)
    decay_max: float = param(0.5, "The cap of eta (see decay_rate).", ge=0, lt=1, added=True)


# the keys an earlier config gave flat in grpo / opd: where each one is now (below the section)
_MOVED_TO_SUBSECTIONS = {
    **{key: f"optim.{key}" for key in ("lr", "weight_decay", "grad_clip", "ema_decay", "zero_stage",
                                       "gradient_checkpointing", "micro_batch")},
    **{key: f"loop.{key}" for key in ("iterations", "eval_every", "monitor_per_category", "checkpoint_every",
                                      "grid_every")},
    "timesteps_per_trajectory": "timesteps.per_trajectory",
}
_GRPO_MOVED = {**_MOVED_TO_SUBSECTIONS, "timestep_fraction": "timesteps.fraction",
               "timestep_start": "timesteps.start",
               **{key: f"rollout.{key}" for key in ("num_steps", "noise_level", "guidance_scale", "cfg_mode")},
               "rollout_micro_batch": "rollout.micro_batch"}


def _check_flat_keys(data: dict, prefix: str, moved: dict[str, str]) -> None:
    """An earlier config's flat key of grpo / opd (``moved``: key -> its path below the section) is a
    ConfigError naming the new key; so is ``timesteps`` given as the earlier string."""
    _moved_keys(data, prefix, {key: f"{prefix}{new}" for key, new in moved.items()})
    if isinstance(data.get("timesteps"), str):
        raise ConfigError(f"{prefix}timesteps: {_shown(data['timesteps'])} is the earlier shape; timesteps is now a "
                          f"subsection: write {prefix}timesteps.mode: {_clip(data['timesteps'])}")


@dataclass(frozen=True)
class GRPOConfig:
    """Stages `grpo_t2i` / `grpo_edit`: Flow-GRPO on the learned composite rewards."""

    seed: int = param(303, "Seed of prompt draws and rollout noise (per iteration, so resumes replay exactly).", ge=0,
                     le=SEED_MAX)
    loop: LoopConfig = subsection(LoopConfig, "Iterations, and the monitor, checkpoint and grid intervals.")
    round1_iterations: int = param(
        80, "pipeline.annotation_rounds 2: the first GRPO round's iterations (from the base); the second round "
        "continues its weights for loop.iterations minus these, scored by the refreshed reward model, and "
        "loop.time_budget_s is split in the same proportion. Unused with one round.", ge=1, added=True)
    algorithm: str = param("grpo", "The registered reward algorithm the GRPO stages train with "
                           "(flowrl/rl/algorithms.py; grpo: Flow-GRPO, and Mix-RL on both tasks).", added=True)
    prompts_per_iteration: int = param(8, "Prompt groups per iteration.", ge=1, cap=BATCH_MAX)
    group_size: int = param(8, "Samples per prompt (G).", ge=2, cap=BATCH_MAX)
    rollout: RolloutConfig = subsection(
        RolloutConfig, "The rollout sampler: steps, SDE noise, CFG and sampling micro-batch (the prompt filter "
        "samples its candidates with it too).")
    timesteps: WindowTimestepsConfig = subsection(
        WindowTimestepsConfig, "The K early steps (subset) trained per trajectory, or all N.")
    optim: OptimConfig = subsection(OptimConfig, "AdamW, EMA, ZeRO, and the forward / backward's memory knobs.")
    nft: NFTConfig = subsection(
        NFTConfig, "DiffusionNFT (algorithm: nft): rollout noise, the noise levels trained, the implicit policies' "
        "strength and the soft update of the sampling policy.", added=True)
    clip_range: float = param(1e-3, "PPO clip range of the ratio.", gt=0)
    ratio_norm: bool = param(
        False, "GRPO-Guard's ratio normalisation: the clipped objective reads, per trained step, the log-ratio "
        "times the step's std plus the squared mean shift over twice the std (centred on 0 at every step, its "
        "spread no longer divided by the step's noise; flowrl.rl.objectives.guard_log_ratio). The rollouts keep "
        "each step's mean for it (one more latent per step in memory). Before an update the ratio is still 1.",
        added=True)
    advantage_clip: float = param(5.0, "Advantages are clipped to +- this.", gt=0)
    kl_coef: float = param(0.0, "Weight of the closed-form KL to the reference (base) policy.", ge=0)
    kl_anchor_steps: int = param(
        0,
        "subset: per trajectory, this many extra steps from the low-noise rest of the schedule carry only the "
        "KL term (the policy drifts there too, though no advantage reaches them). Needs kl_coef > 0.",
        ge=0,
    )
    kl_anchor_coef: float | None = param(
        None, "Weight of the KL on the anchor steps (null: kl_coef, as on the trained steps); the loss's KL term is "
        "the mean over all KL steps of each step's weight times its KL. Needs kl_coef > 0, kl_anchor_steps > 0 "
        "and timesteps.mode: subset.",
        ge=0, added=True)
    ptx_coef: float = param(
        0.0, "Weight of the base's own flow-matching loss on fresh examples of the grammar's train split (drawn "
        "as the base stage draws them: its edit_fraction and cond_dropout), added to every optimizer step: "
        "PPO-ptx's pretraining mix. The RL prompts hold a few texts per kind; this keeps what the base learned "
        "of all the others. Families whose base trains on a synthetic stream (shapes) only; 0: off.",
        ge=0, added=True)
    ptx_batch_size: int = param(32, "Examples in each optimizer step's pretraining-mix batch (ptx_coef > 0), "
                                "split over the processes: its T2I and its edit rows (base.edit_fraction) must each "
                                "be a multiple of their number.",
                                ge=1, cap=BATCH_MAX, added=True)
    minibatches: int = param(1, "Optimizer steps per iteration (the rollouts split evenly).", ge=1)
    epochs: int = param(
        1, "Passes over each iteration's rollouts (PPO epochs), each split into `minibatches` in a new order: "
        "epochs x minibatches optimizer steps per iteration. Past the first step the ratio leaves 1 and the clip "
        "range starts to bind.", ge=1, added=True)
    trainable: tuple[str, ...] = param(
        (), "Shell-style patterns over the trained network's parameter names (e.g. 'blocks.*.qkv.*'): only the "
        "parameters matching one are trained, the rest stay at the base's values. Empty: all are trained. A "
        "pattern matching no parameter is an error. Needs optim.zero_stage 0.", added=True)
    reference_device: Literal["same", "cpu"] = param(
        "same", "Full-parameter training with kl_coef > 0: where the frozen copy of the base that the KL compares "
        "against lives: same (the policy's device) or cpu (off the GPU; its forwards run on the CPU, slowly). With "
        "LoRA there is no copy (the base is the transformer with adapters off): leave it at same.", added=True)
    calibrate: bool = param(
        False, "Scale each category's advantages by its reward headroom at filtering (5 - the mean alignment "
        "level of its samples), normalised to mean 1 (flowrl.stages.filter_prompts)."
    )
    sampling_weights: tuple[str, ...] = param(
        (),
        "CATEGORY=WEIGHT entries: prompts of that category (or edit kind) are drawn this many times as often "
        "(others 1; drawing is then with replacement). Empty: uniform over the curated prompts.",
        added=True,
    )
    balance_categories: bool = param(
        False, "Draw every category (edit kind) of the curated set equally often, however many prompts it kept "
        "(with replacement; sampling_weights then scale each category's share).", added=True)
    monitor_reward: str | None = param(
        None, "qwen_image (no judge): the reward_model artifact's scorer that watches the held-out prompts, by its "
        "directory name (pairwise, or pointwise_CRITERION of a criterion the composite gives no weight). It must "
        "not be one the policy is trained on, or the monitor cannot see hacking.", added=True)
    hacking_threshold: float = param(
        0.05, "Warn when the held-out score falls this much below its best while the training reward rose.", gt=0
    )
    stop_on_hacking: bool = param(False, "Stop the run (keeping the best checkpoint) when hacking is seen.")
    reward_chunks: int = param(2, "Rollouts are generated in this many chunks; chunk i is scored while i+1 is sampled.", ge=1)
    reward_backend: Literal["inprocess", "server"] = param(
        "inprocess",
        "inprocess: score in a worker thread; server: through the reward server's client (reward_url, or a "
        "sidecar server started from the reward_model artifact when reward_url is null).",
    )
    reward_url: str | None = param(None, "server backend: base URL of a running reward server serving the task.",
                                   operational=True)
    reward_gpus: int = param(
        0, "server backend with reward_url null: 0 starts a sidecar reward server per rank, its scorers on the "
        "rank's GPU; k > 0 starts one sidecar per node (by local rank 0) on k GPUs of its own, those after the "
        "node's training processes' (the Flyte task asks for launch.grpo.procs + k GPUs per node), its scorers "
        "spread over them; every rank of the node scores through it.", ge=0, added=True, operational=True)
    reward_token_env: str | None = param(None, "server backend: environment variable holding the bearer token.",
                                         operational=True)
    reward_timeout_s: float = param(120.0, "server backend: per-request timeout before a retry.", gt=0,
                                    operational=True)
    reward_retries: int = param(
        3, "server backend: retries of a failed request (connection refused, timeout, 5xx) with exponential backoff "
        "(0.5 s doubling, at most 10 s) before the iteration fails with a clear error; the last checkpoint is kept.",
        ge=0, added=True, operational=True)

    @staticmethod
    def check_data_shape(data: dict, prefix: str) -> None:
        """(:func:`from_dict` calls it before reading the keys.) A key of the earlier flat shape is a
        ConfigError naming the key that replaced it."""
        _check_flat_keys(data, prefix, _GRPO_MOVED)


# the keys of opd in an earlier config: where each one is now
_OPD_MOVED = {"mix_rl": "pipeline.mix_rl", "offpolicy_ablation": "pipeline.offpolicy_ablation"}


@dataclass(frozen=True)
class OPDConfig:
    """Stage `opd`: on-policy distillation of the task teachers into one student (and the Mix-RL switch)."""

    seed: int = param(404, "Seed of prompt draws and of the student's initial noise (per iteration).", ge=0,
                     le=SEED_MAX)
    loop: LoopConfig = subsection(LoopConfig, "Iterations, and the monitor, checkpoint and grid intervals.",
                                  iterations=150)
    algorithm: str = param("opd", "The registered distillation algorithm of the stage (flowrl/rl/algorithms.py).",
                           added=True)
    prompts_per_iteration: int = param(32, "Prompts (one trajectory each) per iteration, over both tasks.", ge=1,
                                        cap=BATCH_MAX)
    t2i_fraction: float = param(0.5, "Share of each iteration's prompts drawn from the T2I set (the rest: edit).",
                                ge=0, le=1)
    init: Literal["base", "t2i_teacher", "edit_teacher"] = param(
        "base", "The student's initial weights: the base model or one of the teachers."
    )
    routes: tuple[str, ...] = param(
        ("t2i=t2i_teacher", "edit=edit_teacher"),
        "SELECTOR=TEACHER bindings: a task (t2i, edit) or a prompt category / edit kind to a teacher name; "
        "category bindings win over task bindings. The pipeline names its teachers t2i_teacher and edit_teacher.",
    )
    states: Literal["on_policy", "off_policy"] = param(
        "on_policy", "on_policy: states from the student's own trajectories; off_policy: from the teacher's (ablation)."
    )
    num_steps: int | None = param(
        None, "Steps of the student's (ODE) trajectories (null: sampler.num_steps, the deployment sampler's).", ge=1,
        cap=STEPS_MAX
    )
    guidance_scale: float | None = param(None, "CFG scale of those trajectories (null: sampler.guidance_scale).", ge=1)
    timesteps: TimestepsConfig = subsection(
        TimestepsConfig, "Match at K of the N visited states (subset, the loss scaled N/K) or at all N.",
        per_trajectory=4)
    optim: OptimConfig = subsection(OptimConfig, "AdamW, EMA, ZeRO, and the forward / backward's memory knobs.")
    states_per_forward: int | None = param(
        None, "(trajectory, matched state) pairs per forward / backward of the student and of each teacher (each "
        "part holds 2 x states_per_forward rows: both CFG branches of each pair), below one trajectory. With "
        "micro_batch it splits each micro_batch part further (a forward holds at most min(states_per_forward, "
        "micro_batch x matched states) pairs). Gradients accumulate, weighted so the update and the reported losses "
        "are the whole batch's. null: parts of whole trajectories (micro_batch).", ge=1, cap=BATCH_MAX, added=True)
    teacher_devices: tuple[str, ...] = param(
        (), "qwen_image: TEACHER=DEVICE entries placing a teacher's transformer on its own device (cuda:1, ...) or "
        "offloading it to cpu; others share the student's device. Teachers share the student's frozen VAE and "
        "text encoder. With LoRA a teacher named here is loaded as its whole merged transformer on that device; "
        "one not named is an adapter on the student's transformer when it was trained with LoRA on the same "
        "pretrained weights (else its whole transformer, on the student's device).", added=True)

    @staticmethod
    def check_data_shape(data: dict, prefix: str) -> None:
        """(:func:`from_dict` calls it before reading the keys.) A key of the earlier shape is a ConfigError
        naming the key that replaced it."""
        _check_flat_keys(data, prefix, _MOVED_TO_SUBSECTIONS)
        _moved_keys(data, prefix, _OPD_MOVED)


@dataclass(frozen=True)
class PipelineConfig:
    """Which optional branches the post-training pipeline runs (read when it starts; no stage's results
    depend on them)."""

    offpolicy_ablation: bool = param(False, "Also run the off-policy OPD ablation (stage opd_offpolicy).")
    mix_rl: bool = param(False, "Also run the Mix-RL baseline (grpo --task mixed, stage grpo_mixed).")
    annotation_rounds: Literal[1, 2] = param(
        1, "1: annotate -> reward_model -> GRPO. 2: GRPO stops after grpo.round1_iterations, its checkpoints' "
        "samples are annotated (annotate.policy_round), the reward models are refreshed on both rounds' rows "
        "(reward_model.refresh_steps) and GRPO continues from them for the remaining iterations; OPD and the "
        "bench read the second round's teachers and reward models.", added=True)


@dataclass(frozen=True)
class BenchConfig:
    """Stage `bench`: pillar scores, T2I and edit arenas, and the report over any set of models."""

    seed: int = param(505, "Seed of the bench sets (drawn from the bench split of the grammar) and of each item's noise.",
                      ge=0, le=SEED_MAX)
    t2i_per_category: int = param(50, "Bench T2I prompts per category (one seed each).", ge=1)
    edit_per_kind: int = param(50, "Bench edits per kind (instruction + source, one seed each).", ge=1)
    batch_size: int = param(100, "Sampling batch size.", ge=1, cap=BATCH_MAX)
    scorer: Literal["judge", "reward_models"] = param(
        "judge", "Who scores the bench: the shapes world's held-out judge, or the reward_model stage's models "
        "(production, where there is no judge; the stage then takes the reward_model artifact).")
    anchor: str = param("base", "The model pinned at Elo 1000 (must be one of the benched models).", nonempty=True)
    tie_tolerance: float = param(
        0.05, "Arena: when both images are equally correct, a secondary score (fidelity for T2I, identity for "
        "edits) gap above this decides; else a tie. With scorer reward_models the primary (alignment) score, "
        "being continuous, also decides only beyond this gap.", ge=0)
    bootstrap: int = param(1000, "Bootstrap resamples: of the battles for the Elo intervals, and of the bench items "
                           "for the paired intervals of each model's gain over the anchor.", ge=0)
    confidence: float = param(0.95, "Coverage of the Elo intervals and of the gain intervals.", gt=0, lt=1)
    grid_items: int = param(6, "Prompts (and edits) shown in the report's overall image grids, and per T2I category "
                            "and edit kind in each category's grid.", ge=1)
    t2i_prompts: str | None = param(
        None, "qwen_image: the T2I bench prompt file (parquet with prompt and category, the schema of "
        "filter.t2i_prompts). No prompt of it may occur in the filter or annotation files (checked). The first "
        "t2i_per_category rows of each category are benched.", added=True)
    edit_prompts: str | None = param(
        None, "qwen_image: the edit bench file (prompt, category, source_image), unseen like t2i_prompts; the first "
        "edit_per_kind rows of each category are benched.", added=True)
    scorers: tuple[str, ...] = param(
        ("t2i_alignment=t2i/pairwise", "edit_accuracy=edit/pairwise", "fidelity=t2i/pointwise_fidelity",
         "identity=ssim"),
        "qwen_image: PILLAR=SOURCE for each of the four pillars. SOURCE is a scorer of the reward_model artifact "
        "as TASK/DIRECTORY (its expected Likert level mapped to 0-100), or for identity 'ssim' (structural "
        "similarity of output to source). Arena battles: the primary pillar (t2i_alignment, edit_accuracy) beyond "
        "tie_tolerance, else the secondary (fidelity, identity). The default fidelity scorer is also a GRPO reward "
        "(not held out).", added=True)


@dataclass(frozen=True)
class StageLaunchConfig:
    """How one stage's Flyte task is launched. Read when the workflow is registered and
    serialized into the task's spec (tasks/launch.py); null keeps the task's own default."""

    nodes: int = param(1, "Nodes (grpo / opd only; more than 1 is a PyTorchJob across nodes).", ge=1)
    procs: int = param(1, "Worker processes per node, one per GPU (grpo / opd only).", ge=1)
    gpus: int | None = param(None, "GPUs per node (null: the task's default; grpo / opd: one per process). The "
                             "grpo task asks for grpo.reward_gpus more, for its reward sidecar.", ge=0)
    cpu: str | None = param(None, "CPU request per node, a Kubernetes quantity such as '8' or '500m'.")
    mem: str | None = param(
        None, "Memory request per node, a Kubernetes quantity such as '64Gi' (null: the task's default; grpo / opd "
        "with model.family qwen_image: from the memory planner).")
    disk: str | None = param(None, "Ephemeral storage request per node, a Kubernetes quantity such as '200Gi'.")


def _stage_launch(**defaults: Any) -> Any:
    return field(default_factory=lambda: StageLaunchConfig(**defaults),
                 metadata={"doc": "Launch settings of the stage's task.", "bounds": {}})


@dataclass(frozen=True)
class LaunchConfig:
    """Where and how the workflow's tasks run on a cluster. Fixed when the workflow is
    registered (``pyflyte run --remote ... --config FILE``, ``make package CONFIG=FILE``):
    a pod never reads the submitter's environment. No stage's results depend on it."""

    registry: str | None = param(
        None, "Container registry the stage images were pushed to (`make images PUSH=1`); each task names its "
        "image REGISTRY/flowrl-STAGE:TAG, TAG derived from the image's contents (null: images come from pyflyte's "
        "--image flags).")
    accelerator: str = param("H100", "GPU kind of the GPU tasks: a name in flytekit.extras.accelerators.",
                             nonempty=True)
    gpu_mem_gib: float = param(80.0, "Memory of one GPU in GiB, for the memory planner.", gt=0)
    secrets: tuple[str, ...] = param(
        (), "Flyte secrets every task requests, as ENV_VAR=GROUP/KEY: the secret GROUP/KEY of the cluster is "
        "set as ENV_VAR in the pod (e.g. MLFLOW_TRACKING_TOKEN=mlflow/token).")
    base: StageLaunchConfig = _stage_launch()
    annotate: StageLaunchConfig = _stage_launch()
    reward_model: StageLaunchConfig = _stage_launch()
    filter_prompts: StageLaunchConfig = _stage_launch()
    grpo: StageLaunchConfig = _stage_launch()
    opd: StageLaunchConfig = _stage_launch()
    bench: StageLaunchConfig = _stage_launch()


@dataclass(frozen=True)
class FlowRLConfig:
    """A whole scenario: one YAML file."""

    run: RunConfig = section(RunConfig, "Run identity, storage and tracking.")
    world: WorldConfig = section(WorldConfig, "The shapes world.")
    model: ModelConfig = section(ModelConfig, "Model family and architecture.")
    sampler: SamplerConfig = section(SamplerConfig, "Deployment sampler.")
    eval: EvalConfig = section(EvalConfig, "Held-out evaluation sets.")
    base: BaseConfig = section(BaseConfig, "Stage base.")
    annotate: AnnotateConfig = section(AnnotateConfig, "Stage annotate.")
    reward_model: RewardModelConfig = section(RewardModelConfig, "Stage reward_model.")
    rewards: RewardsConfig = section(RewardsConfig, "Composite rewards used by RL.")
    filter: FilterConfig = section(FilterConfig, "Stage filter_prompts.")
    grpo: GRPOConfig = section(GRPOConfig, "Stages grpo_t2i, grpo_edit and grpo_mixed (Mix-RL).")
    opd: OPDConfig = section(OPDConfig, "Stage opd (and opd_offpolicy).")
    pipeline: PipelineConfig = section(PipelineConfig, "Optional branches of the post-training pipeline.")
    bench: BenchConfig = section(BenchConfig, "Stage bench.")
    launch: LaunchConfig = section(LaunchConfig, "How the tasks run on a cluster (read at registration).")

    def section_hash(self, *names: str) -> str:
        """Stable hash of the given sections (what a stage's output depends on)."""
        payload = {}
        for name in names:
            value: Any = self
            for part in name.split("."):
                value = getattr(value, part)
            payload[name] = _hash_payload(value)
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading


class _YAMLLimit(yaml.YAMLError):
    """A YAML document past one of :class:`_BoundedLoader`'s limits."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that counts a document's values while composing it, an alias counting the
    whole value it names each time it is used, and stops past :data:`YAML_MAX_NODES` values, past
    :data:`YAML_MAX_DEPTH` levels of nesting, or at an alias inside the value it names (a recursive
    structure). A "billion laughs" file of a few KB then fails after YAML_MAX_NODES values instead of
    building (or printing, in an error message) billions."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._values = 0  # values composed so far, aliases expanded
        self._depth = 0
        self._sizes: dict[str, int] = {}  # anchor -> values of the node it names, aliases expanded
        self._open: set[str] = set()  # anchors whose node is being composed

    def _count(self, n: int, mark: Any) -> None:
        self._values += n
        if self._values > YAML_MAX_NODES:
            raise _YAMLLimit(f"more than {YAML_MAX_NODES} values once aliases are expanded (at line {mark.line + 1}; "
                             "each use of an alias counts the whole value it names)")

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            if event.anchor in self._open:
                raise _YAMLLimit(f"the alias *{_clip(event.anchor)} at line {event.start_mark.line + 1} is inside the "
                                 "value it names (a recursive structure)")
            self._count(self._sizes.get(event.anchor, 0), event.start_mark)  # an unknown one: the composer's error
            return super().compose_node(parent, index)
        if self._depth >= YAML_MAX_DEPTH:
            raise _YAMLLimit(f"lists and mappings nested more than {YAML_MAX_DEPTH} deep (at line "
                             f"{event.start_mark.line + 1})")
        anchor, before = event.anchor, self._values
        self._count(1, event.start_mark)
        self._depth += 1
        if anchor is not None:
            self._open.add(anchor)
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
            self._open.discard(anchor)
        if anchor is not None:
            self._sizes[anchor] = self._values - before
        return node


def parse_yaml(text: str, where: str) -> Any:
    """The plain data of one YAML document, read within the limits of :class:`_BoundedLoader`; any
    problem is a short ConfigError starting with ``where``."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader refuses control characters already
        return loader.get_single_data()
    except _YAMLLimit as exc:
        raise ConfigError(f"{where}: refused: {exc}") from None
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: a timestamp like 2001-13-45, an int of 5000 digits
        raise ConfigError(f"{where}: invalid YAML: {_clip(_yaml_problem(exc), 2 * SHOWN_MAX)}") from None
    finally:
        if loader is not None:
            loader.dispose()


def _yaml_problem(exc: Exception) -> str:
    """A YAML error on one line: what is wrong and where (PyYAML's own message spans several, with a
    snippet of the text)."""
    mark = getattr(exc, "problem_mark", None)
    if isinstance(exc, yaml.MarkedYAMLError) and mark is not None:
        said = "; ".join(str(part) for part in (exc.context, exc.problem) if part)
        return f"{said} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(exc).split())


def read_config_text(path: Path) -> str:
    """The text of config file ``path``: at most :data:`CONFIG_MAX_BYTES` bytes of UTF-8 without NUL
    bytes, else a ConfigError naming the file (its size, or the first bad byte)."""
    try:
        size = path.stat().st_size
        raw = b""
        if size <= CONFIG_MAX_BYTES:
            with path.open("rb") as fh:
                raw = fh.read(CONFIG_MAX_BYTES + 1)  # bounded: the file may have grown, or report no size (/proc)
            size = max(size, len(raw))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    if size > CONFIG_MAX_BYTES:
        raise ConfigError(f"{path}: the file has {size} bytes, more than the {CONFIG_MAX_BYTES} a config file "
                          "may have")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not a UTF-8 text file (byte {exc.start} is {raw[exc.start]:#04x}); a config "
                          "is YAML text") from None
    if "\x00" in text:
        raise ConfigError(f"{path}: a NUL byte at offset {raw.index(0)}: a binary file, not YAML text")
    return text


def parse_overrides(entries: typing.Sequence[str], flag: str = "--set") -> dict[str, Any]:
    """``["annotate.seed=7", "grpo.rollout.cfg_mode=both"]`` -> nested plain data ``{"annotate": {"seed": 7}, ...}``;
    each value is read as YAML (``[a, b]`` is a list, ``null`` None). A malformed entry is a ConfigError
    naming ``flag``."""
    out: dict[str, Any] = {}
    for entry in entries:
        key, sep, text = entry.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            raise ConfigError(f"{flag} {_shown(entry)}: expected KEY=VALUE (a dotted KEY for a nested key)")
        if len(text) > CONFIG_MAX_BYTES:
            raise ConfigError(f"{flag} {_shown(entry)}: the value has {len(text)} characters, more than the "
                              f"{CONFIG_MAX_BYTES} of a whole config file")
        value = parse_yaml(text, f"{flag} {_shown(entry)}")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{flag} {_shown(entry)}: {_clip(part)} is given a value and keys")
        node[parts[-1]] = value
    return out


def merge_data(base: dict, overrides: dict) -> dict:
    """``base`` with ``overrides`` laid over it, nested mappings key by key."""
    out = dict(base)
    for key, value in overrides.items():
        out[key] = merge_data(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path, overrides: typing.Sequence[str] = ()) -> FlowRLConfig:
    """Read and validate a YAML scenario file, with ``overrides`` (``KEY=VALUE``, see
    :func:`parse_overrides`) laid over it before validation."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = parse_yaml(read_config_text(path), str(path))
    if data is None:
        raise ConfigError(f"{path}: config file is empty")
    where = str(path)
    if overrides:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections, got {_show(data)}")
        data = merge_data(data, parse_overrides(overrides))
        given = ' '.join(f'--set {shlex.quote(_clip(o))}' for o in overrides)
        where = f"{path} with {_clip(given, 2 * SHOWN_MAX)}"
    try:
        config = from_dict(FlowRLConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    check_consistency(config)
    return config


def name_value_pairs(entries: tuple[str, ...], key: str, form: str = "NAME=VALUE") -> list[tuple[str, str]]:
    """``("a=1", "b = x")`` -> [("a", "1"), ("b", "x")]; an entry without a
    name or value is a ConfigError naming ``key[i]`` and the expected ``form``."""
    pairs = []
    for i, entry in enumerate(entries):
        name, sep, value = entry.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ConfigError(f"{key}[{i}]: expected {form}, got {_shown(entry)}")
        pairs.append((name.strip(), value.strip()))
    return pairs


SAFE_NAME_MAX = 128
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def safe_name(value: Any, key: str) -> str:
    """``value`` when it may become part of a path (an MLflow experiment's artifact directory, a
    scorer directory of an artifact, a teacher): letters, digits, '.', '_' and '-', not starting
    with '.' or '-', at most :data:`SAFE_NAME_MAX` characters; else a ConfigError naming ``key``."""
    if not isinstance(value, str) or len(value) > SAFE_NAME_MAX or not _SAFE_NAME.fullmatch(value):
        raise ConfigError(f"{key}: {value!r:.80} is not a safe name (letters, digits, '.', '_', '-', not starting "
                          f"with '.' or '-', at most {SAFE_NAME_MAX} characters; it becomes part of a path)")
    return value


BENCH_PILLARS: tuple[str, ...] = ("t2i_alignment", "edit_accuracy", "identity", "fidelity")


# the reward_model task whose scorers may score a pillar (fidelity: a T2I scorer reads any output alone)
_PILLAR_TASK = {"t2i_alignment": "t2i", "edit_accuracy": "edit", "identity": "edit", "fidelity": "t2i"}


def pillar_sources(entries: tuple[str, ...], key: str = "bench.scorers") -> dict[str, tuple[str, str]]:
    """``bench.scorers`` -> {pillar: (task, scorer directory)}, or ("", "ssim") for identity by
    structural similarity. Every pillar must be given exactly once."""
    out: dict[str, tuple[str, str]] = {}
    for i, (pillar, source) in enumerate(name_value_pairs(entries, key, "PILLAR=SOURCE")):
        if pillar not in BENCH_PILLARS:
            raise ConfigError(f"{key}[{i}]: unknown pillar {_shown(pillar)} (pillars: {', '.join(BENCH_PILLARS)})")
        if pillar in out:
            raise ConfigError(f"{key}[{i}]: pillar {_shown(pillar)} is given twice")
        task, sep, name = source.partition("/")
        if source == "ssim":
            if pillar != "identity":
                raise ConfigError(f"{key}[{i}]: 'ssim' measures identity (output against source), not {pillar}")
            out[pillar] = ("", "ssim")
        elif sep and task in ("t2i", "edit") and name and "/" not in name:
            if task != _PILLAR_TASK[pillar]:
                raise ConfigError(f"{key}[{i}]: {pillar} is scored by a {_PILLAR_TASK[pillar]} scorer "
                                  f"({_PILLAR_TASK[pillar]}/DIRECTORY), got {_shown(entries[i])}")
            out[pillar] = (task, safe_name(name, f"{key}[{i}]"))  # a directory of the reward_model artifact
        else:
            raise ConfigError(f"{key}[{i}]: expected {pillar}=TASK/DIRECTORY (TASK t2i or edit, e.g. t2i/pairwise)"
                              f"{' or identity=ssim' if pillar == 'identity' else ''}, got {_shown(entries[i])}")
    missing = [p for p in BENCH_PILLARS if p not in out]
    if missing:
        raise ConfigError(f"{key}: no source for pillar {missing[0]!r} (every one of {', '.join(BENCH_PILLARS)} "
                          "needs one)")
    return out


def category_weights(entries: tuple[str, ...], key: str) -> dict[str, float]:
    """``("move=3", "recolor=1.5")`` -> {"move": 3.0, "recolor": 1.5}; weights must be positive numbers."""
    out = {}
    for i, (name, value) in enumerate(name_value_pairs(entries, key, "CATEGORY=POSITIVE_WEIGHT")):
        try:
            weight = float(value)
        except ValueError:
            weight = -1.0
        if weight <= 0:
            raise ConfigError(f"{key}[{i}]: expected CATEGORY=POSITIVE_WEIGHT, got {_shown(entries[i])}")
        out[name] = weight
    return out


def _check_sde_window(g: GRPOConfig) -> None:
    """With an SDE window (grpo.rollout.sde_steps), GRPO trains K of its stochastic steps at every
    iteration: K must fit the fewest it ever holds (cps's last step, once inside, is not stochastic)."""
    r, ts = g.rollout, g.timesteps
    if r.dynamics == "cps" and r.num_steps == 1:
        raise ConfigError("grpo.rollout.num_steps: 1 with grpo.rollout.dynamics: cps leaves no stochastic step "
                          "(cps's step into t = 0 is deterministic); use 2 or more steps")
    if r.sde_steps is None:
        if r.dynamics == "cps" and ts.mode == "subset":
            from flowrl.rl.rollout import timestep_window

            lo, hi = timestep_window(r.num_steps, ts.fraction, ts.start)
            if hi == r.num_steps and ts.per_trajectory > hi - lo - 1:
                raise ConfigError(
                    f"grpo.timesteps.per_trajectory: {ts.per_trajectory} is more than the {hi - lo - 1} stochastic "
                    f"steps in the window [{lo}, {hi}) (grpo.timesteps.fraction {ts.fraction}, start {ts.start}): "
                    "with grpo.rollout.dynamics: cps the last step is deterministic")
        return
    reaches_end = r.sde_slide_every is not None or r.sde_start + r.sde_steps == r.num_steps
    fewest = r.sde_steps - (1 if r.dynamics == "cps" and reaches_end else 0)
    needed = ts.per_trajectory if ts.mode == "subset" else 1
    if needed > fewest:
        cps = " (with grpo.rollout.dynamics: cps the last step, inside the window, is deterministic)" \
            if fewest < r.sde_steps else ""
        raise ConfigError(
            f"grpo.timesteps.per_trajectory: {ts.per_trajectory} steps to train, and the SDE window of "
            f"grpo.rollout.sde_steps = {r.sde_steps} holds {fewest} stochastic step(s){cps}; lower "
            "grpo.timesteps.per_trajectory or widen grpo.rollout.sde_steps")


def check_consistency(config: FlowRLConfig) -> None:
    """Rules that involve more than one key."""
    # long: a flat list of independent rules, each a few lines naming its keys; read top to bottom
    _check_names(config)
    m = config.model
    if m.shapes.width % m.shapes.heads:
        raise ConfigError(
            f"model.shapes.heads: {m.shapes.heads} does not divide model.shapes.width {m.shapes.width}"
        )
    if (m.shapes.width // m.shapes.heads) % 4:
        raise ConfigError(
            f"model.shapes.heads: head size width/heads = {m.shapes.width // m.shapes.heads} "
            "must be a multiple of 4 (2D rotary embedding)"
        )
    if config.world.resolution % m.shapes.patch:
        raise ConfigError(
            f"model.shapes.patch: {m.shapes.patch} does not divide world.resolution {config.world.resolution}"
        )
    r = config.reward_model
    if r.backbone == "vlm" and not r.vlm_pretrained:
        raise ConfigError("reward_model.vlm_pretrained: required when reward_model.backbone is vlm")
    a = config.annotate
    if a.policy_round.seed == a.seed:
        raise ConfigError(f"annotate.policy_round.seed: {a.seed} is annotate.seed too; the second round would draw "
                          "the first round's prompts and scenes again")
    if r.augment and r.backbone != "shapes":  # (the family's part is checked by the stage: family_of)
        raise ConfigError(
            f"reward_model.augment: {_shown(list(r.augment))} rewrites shapes-world prompts and pictures; it needs "
            f"reward_model.backbone: shapes (got {r.backbone})"
        )
    if r.width % r.heads or (r.width // r.heads) % 4:
        raise ConfigError(
            f"reward_model.heads: {r.heads} must divide reward_model.width {r.width} into heads of a multiple of 4"
        )
    for key in ("t2i_criteria", "edit_criteria"):
        for name in getattr(r, key):
            if name not in ("alignment", "quality", "fidelity"):
                raise ConfigError(f"reward_model.{key}: unknown criterion {_shown(name)} (alignment, quality, "
                                  "fidelity)")
    g = config.grpo
    ts = g.timesteps
    _check_sde_window(g)
    if ts.mode == "subset" and g.rollout.sde_steps is None:
        from flowrl.rl.rollout import timestep_window  # the one definition of the window (imports torch)

        if ts.start + ts.fraction > 1 + 1e-9:
            raise ConfigError(
                f"grpo.timesteps.start: {ts.start} + grpo.timesteps.fraction {ts.fraction} "
                "is past the end of the schedule (at most 1)"
            )
        lo, hi = timestep_window(g.rollout.num_steps, ts.fraction, ts.start)
        if ts.per_trajectory > hi - lo:
            raise ConfigError(
                f"grpo.timesteps.per_trajectory: {ts.per_trajectory} is more than the {hi - lo} steps in "
                f"the window [{lo}, {hi}) that grpo.timesteps.start = {ts.start} and "
                f"grpo.timesteps.fraction = {ts.fraction} cut from grpo.rollout.num_steps = {g.rollout.num_steps}"
            )
    if g.kl_anchor_coef is not None and (g.kl_coef <= 0 or g.kl_anchor_steps <= 0 or ts.mode != "subset"):
        raise ConfigError(
            f"grpo.kl_anchor_coef: {g.kl_anchor_coef} weighs the KL on anchor steps, and there are none: it needs "
            f"grpo.kl_coef > 0 (got {g.kl_coef}), grpo.kl_anchor_steps > 0 (got {g.kl_anchor_steps}) and "
            f"grpo.timesteps.mode: subset (got {ts.mode})"
        )
    if g.trainable and g.optim.zero_stage > 0:
        raise ConfigError(
            f"grpo.trainable: {_shown(list(g.trainable))} trains a subset of the parameters, which "
            f"grpo.optim.zero_stage = {g.optim.zero_stage} does not support (its checkpoints hold AdamW moments for "
            "every parameter); use grpo.optim.zero_stage 0 or leave trainable empty"
        )
    if g.reward_url is not None and g.reward_token_env and "@" in g.reward_url.split("://", 1)[-1].split("/", 1)[0]:
        raise ConfigError("grpo.reward_url: carries user:password credentials and grpo.reward_token_env names a "
                          "bearer token; a request can carry one of them: drop one")
    if g.reward_gpus and (g.reward_backend != "server" or g.reward_url is not None):
        raise ConfigError(
            f"grpo.reward_gpus: {g.reward_gpus} GPUs for a sidecar reward server, which only "
            "grpo.reward_backend: server with grpo.reward_url null starts (got reward_backend "
            f"{g.reward_backend}, reward_url {_clip(g.reward_url or 'null')}); set "
            "grpo.reward_gpus to 0"
        )
    if g.reward_gpus and config.launch.grpo.gpus == 0:
        raise ConfigError(f"grpo.reward_gpus: {g.reward_gpus} GPUs after the training processes' GPUs, and "
                          "launch.grpo.gpus is 0 (CPU workers); set grpo.reward_gpus to 0")
    if g.nft.t_min >= g.nft.t_max:
        raise ConfigError(f"grpo.nft.t_min: {g.nft.t_min} must be below grpo.nft.t_max {g.nft.t_max}")
    if g.algorithm == "nft" and g.ratio_norm:
        raise ConfigError("grpo.ratio_norm: GRPO-Guard's ratio is GRPO's (grpo.algorithm grpo); nft has no ratio")
    if g.algorithm == "nft" and g.optim.zero_stage > 0:
        raise ConfigError(
            f"grpo.optim.zero_stage: {g.optim.zero_stage} with grpo.algorithm nft, whose sampling policy (a whole "
            "copy of the trained weights, in its checkpoints) is kept by the plain engine only; use zero_stage 0")
    if g.prompts_per_iteration % g.reward_chunks:
        raise ConfigError(
            f"grpo.reward_chunks: {g.reward_chunks} does not divide grpo.prompts_per_iteration {g.prompts_per_iteration}"
        )
    if g.prompts_per_iteration % g.minibatches:
        raise ConfigError(
            f"grpo.minibatches: {g.minibatches} does not divide grpo.prompts_per_iteration {g.prompts_per_iteration}"
        )
    o = config.opd
    opd_steps = o.num_steps or config.sampler.num_steps
    if o.timesteps.mode == "subset" and o.timesteps.per_trajectory > opd_steps:
        raise ConfigError(
            f"opd.timesteps.per_trajectory: {o.timesteps.per_trajectory} is more than the {opd_steps} steps of "
            "the student's trajectories (opd.num_steps, or sampler.num_steps when it is null)"
        )
    name_value_pairs(o.routes, "opd.routes", "SELECTOR=TEACHER")
    name_value_pairs(o.teacher_devices, "opd.teacher_devices", "TEACHER=DEVICE")
    category_weights(g.sampling_weights, "grpo.sampling_weights")
    f = config.filter
    if f.threshold_mode == "quantile" and f.threshold >= 1:
        raise ConfigError(f"filter.threshold: a quantile must be below 1, got {f.threshold}")
    a = config.annotate
    if (a.pointwise_path is None) != (a.pairwise_path is None):
        raise ConfigError("annotate.pairwise_path: give both annotate.pointwise_path and annotate.pairwise_path, or neither")
    if not a.degradations:
        raise ConfigError(f"annotate.degradations: name at least one ({', '.join(typing.get_args(Degradation))})")
    if a.noise_min > a.noise_max:
        raise ConfigError(f"annotate.noise_min: {a.noise_min} is above annotate.noise_max {a.noise_max}")
    if a.labels_per_image > a.annotators:
        raise ConfigError(
            f"annotate.labels_per_image: {a.labels_per_image} is more than annotate.annotators {a.annotators}"
        )
    check_launch(config)
    from flowrl.models.families import family_of  # the models import this module: imported here

    family_of(config).check_config(config)  # the family's own rules (qwen_image: weights, prompt files, judge)
    from flowrl.rewards.registry import check_rewards

    check_rewards(config)  # each reward component's scorer type exists, for this family
    from flowrl.rl.algorithms import algorithm

    # the registered algorithms (built in, or registered before the config loads)
    trainer = algorithm(config.grpo.algorithm, "reward", multitask=config.pipeline.mix_rl).trainer
    algorithm(config.opd.algorithm, "distill")
    if config.grpo.ptx_coef > 0:
        from flowrl.rl.grpo import GRPOTrainer

        if family_of(config).from_pretrained:
            raise ConfigError(f"grpo.ptx_coef = {config.grpo.ptx_coef}: the pretraining mix draws the base's "
                              f"training examples from the shapes grammar; {config.model.family} has none: set it "
                              "to 0")
        if not issubclass(trainer, GRPOTrainer):
            raise ConfigError(f"grpo.ptx_coef = {config.grpo.ptx_coef}: grpo.algorithm {config.grpo.algorithm!r} "
                              "takes no pretraining mix: set it to 0")


def _check_names(config: FlowRLConfig) -> None:
    """The name-like keys that are joined into paths follow :func:`safe_name` (the bench's scorer
    directories: :func:`pillar_sources`)."""
    safe_name(config.run.name, "run.name")  # the MLflow experiment, whose artifacts live under its name
    for i, (_, teacher) in enumerate(name_value_pairs(config.opd.routes, "opd.routes", "SELECTOR=TEACHER")):
        safe_name(teacher, f"opd.routes[{i}]")
    for i, (teacher, _) in enumerate(name_value_pairs(config.opd.teacher_devices, "opd.teacher_devices",
                                                       "TEACHER=DEVICE")):
        safe_name(teacher, f"opd.teacher_devices[{i}]")
    if config.grpo.monitor_reward is not None:
        safe_name(config.grpo.monitor_reward, "grpo.monitor_reward")  # a scorer directory of the artifact
    safe_name(config.bench.anchor, "bench.anchor")


def _check_lora(config: FlowRLConfig) -> None:
    """LoRA (model.qwen_image.lora) against the RL stages' settings."""
    lora = config.model.qwen_image.lora
    if lora is None or lora.rank == 0:
        return
    if not lora.target_modules:
        raise ConfigError("model.qwen_image.lora.target_modules: name at least one linear layer (or set rank 0)")
    for section in ("grpo", "opd"):
        stage = getattr(config, section).optim.zero_stage
        if stage == 3:
            raise ConfigError(
                f"{section}.optim.zero_stage: 3 with LoRA (model.qwen_image.lora.rank {lora.rank}): ZeRO-3 would "
                "partition the adapters while the frozen base they sit in stays whole on every rank; use optim.zero_stage 0 "
                "(DDP) or 1-2 (the adapters' AdamW states and gradients partitioned), or rank 0 for full-parameter "
                "ZeRO-3")
    if config.grpo.trainable:
        raise ConfigError(f"grpo.trainable: {_shown(list(config.grpo.trainable))} selects transformer weights to "
                          "train, and "
                          f"with LoRA (model.qwen_image.lora.rank {lora.rank}) only the adapters train; leave it empty")
    if config.grpo.reference_device != "same":
        raise ConfigError(f"grpo.reference_device: {config.grpo.reference_device} places the full-parameter "
                          "reference copy, and with LoRA the reference is the base with adapters off (no copy); "
                          "leave it at same")


_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$")
_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_PART = re.compile(r"^[a-z0-9]([-a-z0-9._]*[a-z0-9])?$")


def secret_requests(entries: tuple[str, ...], key: str = "launch.secrets") -> list[tuple[str, str, str]]:
    """``("MLFLOW_TRACKING_TOKEN=mlflow/token",)`` -> [(env var, group, key)]; a malformed entry is a
    ConfigError naming ``key[i]``."""
    out, seen = [], set()
    for i, (env, ref) in enumerate(name_value_pairs(entries, key, "ENV_VAR=GROUP/KEY")):
        group, sep, name = ref.partition("/")
        if not _ENV_VAR.match(env):
            raise ConfigError(f"{key}[{i}]: {_shown(env)} is not an environment variable name")
        if not sep or not _SECRET_PART.match(group) or not _SECRET_PART.match(name):
            raise ConfigError(f"{key}[{i}]: expected ENV_VAR=GROUP/KEY (lower-case Kubernetes names), got "
                              f"{_shown(entries[i])}")
        if env in seen:
            raise ConfigError(f"{key}[{i}]: {env} is given twice")
        seen.add(env)
        out.append((env, group, name))
    return out


def is_local_path(value: str) -> bool:
    """True for a path on this machine's disk (no ``scheme://``)."""
    return "://" not in value


def check_launch(config: FlowRLConfig) -> None:
    """The launch section, and the rule that a remote scenario names no file on the submitter's disk."""
    from flowrl.stages.registry import STAGE_NAMES, TRAINING_STAGES  # the standard library only

    launch = config.launch
    secret_requests(launch.secrets)
    for stage in STAGE_NAMES:
        sec: StageLaunchConfig = getattr(launch, stage)
        for name in ("cpu", "mem", "disk"):
            value = getattr(sec, name)
            if value is not None and not _QUANTITY.match(value):
                raise ConfigError(f"launch.{stage}.{name}: expected a Kubernetes quantity such as "
                                  f"{'8' if name == 'cpu' else '64Gi'}, got {_shown(value)}")
        if stage not in TRAINING_STAGES:
            for name in ("nodes", "procs"):
                if getattr(sec, name) != 1:
                    raise ConfigError(f"launch.{stage}.{name}: only the training stages ({', '.join(TRAINING_STAGES)}) "
                                      f"run several workers; {stage} runs in one process (got {getattr(sec, name)})")
        elif sec.gpus is not None and sec.gpus not in (0, sec.procs):
            raise ConfigError(f"launch.{stage}.gpus: {sec.gpus} GPUs for launch.{stage}.procs = {sec.procs} workers; "
                              "each worker drives one GPU (give the same number, 0 for CPU workers, or null)")
    if launch.registry is not None and (not launch.registry.strip() or launch.registry != launch.registry.strip()
                                        or launch.registry.endswith("/") or "://" in launch.registry):
        raise ConfigError(f"launch.registry: expected a registry and path such as ghcr.io/acme/flowrl, got "
                          f"{_shown(launch.registry)}")
    if is_local_path(config.run.artifact_root):
        return
    # the artifacts live in object storage: the stages run in pods, which see none of the submitter's files
    files = {
        "annotate.pointwise_path": config.annotate.pointwise_path,
        "annotate.pairwise_path": config.annotate.pairwise_path,
        "filter.t2i_prompts": config.filter.t2i_prompts,
        "filter.edit_prompts": config.filter.edit_prompts,
        "bench.t2i_prompts": config.bench.t2i_prompts,
        "bench.edit_prompts": config.bench.edit_prompts,
    }
    for key, value in files.items():
        if value and is_local_path(value):
            raise ConfigError(f"{key}: {_shown(value)} is a path on this machine, and run.artifact_root "
                              f"({config.run.artifact_root}) is object storage: the stages run in pods that cannot "
                              "read it; upload the file and give its URI (s3://...)")


def from_dict(cls: type, data: Any, prefix: str = "", defaults: Any = None) -> Any:
    """Build dataclass ``cls`` from plain data, validating every key. ``defaults``: the instance whose
    values the keys not given keep (a subsection's default, with its stage's own defaults); None: the
    class's defaults."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {_show(data)}")
    check_shape = getattr(cls, "check_data_shape", None)  # a section whose keys changed shape says what to write
    if check_shape is not None:
        check_shape(data, prefix)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(map(str, set(data) - set(fields)))
    if unknown:
        raise ConfigError(
            f"{prefix}{_clip(unknown[0])}: unknown key (allowed: {', '.join(sorted(fields))})"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        f = fields[name]
        if dataclasses.is_dataclass(hints[name]) and f.default_factory is not dataclasses.MISSING:
            # a subsection: the keys given replace those of its default instance
            values[name] = from_dict(hints[name], value, f"{prefix}{name}.", f.default_factory())
        else:
            values[name] = _convert(hints[name], value, f"{prefix}{name}", f.metadata)
    return cls(**values) if defaults is None else dataclasses.replace(defaults, **values)


def _convert(tp: Any, value: Any, key: str, meta: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or type(value) is not type(choices[0]):
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {_show(value)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) != 1:
            raise TypeError(f"{key}: only Optional[X] unions are supported in configs, got {tp}")
        if value is None:
            return None
        return _convert(args[0], value, key, meta)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_show(value)}")
        (item_tp, *_rest) = typing.get_args(tp)
        return tuple(_convert(item_tp, v, f"{key}[{i}]", meta) for i, v in enumerate(value))
    return _scalar(tp, value, key, meta.get("bounds", {}) if meta else {})


def _scalar(tp: type, value: Any, key: str, bounds: dict[str, float]) -> Any:
    expected = f"{tp.__name__}{_describe(bounds)}"
    if tp is str and bounds.get("nonempty"):
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}: expected a non-empty string, got {_show(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected bool, got {_show(value)}")
        return value
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    else:
        raise TypeError(f"{key}: unsupported config type {tp}")
    if not ok or not _in_bounds(value, bounds):
        raise ConfigError(f"{key}: expected {expected}, got {_show(value)}")
    cap = bounds.get("cap", INT_MAX if "le" not in bounds and "lt" not in bounds else None)
    if tp is int and cap is not None and abs(value) > cap:
        raise ConfigError(f"{key}: expected int{_describe({**bounds, 'le': cap})}, got {_show(value)}")
    return value


def _in_bounds(value: float, b: dict[str, float]) -> bool:
    if isinstance(value, float) and not math.isfinite(value):  # NaN and inf are never valid
        return False
    if isinstance(value, str):
        return True
    return (
        ("gt" not in b or value > b["gt"])
        and ("ge" not in b or value >= b["ge"])
        and ("lt" not in b or value < b["lt"])
        and ("le" not in b or value <= b["le"])
    )


def _describe(b: dict[str, float]) -> str:
    b = {k: v for k, v in b.items() if k not in ("nonempty", "cap")}
    if not b:
        return ""
    lo = f"({b['gt']}" if "gt" in b else f"[{b['ge']}" if "ge" in b else None
    hi = f"{b['lt']})" if "lt" in b else f"{b['le']}]" if "le" in b else None
    if lo and hi:
        return f" in {lo}, {hi}"
    if lo:
        return f" > {b['gt']}" if "gt" in b else f" >= {b['ge']}"
    return f" < {b['lt']}" if "lt" in b else f" <= {b['le']}"


def _show(value: Any) -> str:
    return _shown(value) if isinstance(value, str) else f"{_shown(value)} ({type(value).__name__})"


_REPR = reprlib.Repr()  # containers show their first items, a few levels deep
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 3, SHOWN_MAX, SHOWN_MAX, SHOWN_MAX
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 6


def _head(text: str, limit: int = SHOWN_MAX) -> str:
    """The first ``limit`` characters of ``text``. A cut inside a URL's authority masks what it kept of
    it, which may be part of a password that flowrl.redact no longer recognises as one."""
    head = text[:limit]
    scheme = head.rfind("://")
    if len(text) > limit and scheme >= 0 and not re.search(r"[\s/?#@]", head[scheme + 3:]):
        head = head[:scheme + 3] + "***"
    return head


def _clip(text: str, limit: int = SHOWN_MAX) -> str:
    """``text`` cut to ``limit`` characters (:func:`_head`), saying how long it was."""
    return text if len(text) <= limit else f"{_head(text, limit)}... ({len(text)} characters)"


def _shown(value: Any) -> str:
    """The repr of a user's value for an error message, about :data:`SHOWN_MAX` characters at most
    whatever its size: a long string is cut (saying how long it was), a large list or mapping shows
    its first items (saying how many it had)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= SHOWN_MAX else f"{_head(value)!r}... ({len(value)} characters)"
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int past Python's limit of digits for str()
        return f"<an integer of {value.bit_length()} bits>"
    if len(text) > SHOWN_MAX:
        text = text[:SHOWN_MAX] + "..."
    if isinstance(value, (list, tuple, dict)) and len(value) > 6:
        text += f" ({len(value)} items)"
    return text


def describe_fields(cls: type = FlowRLConfig, prefix: str = "", defaults: Any = None) -> list[tuple[str, str, str]]:
    """(key path, default, doc) for every leaf field: the config reference. ``defaults``: the instance
    whose values are the defaults shown (a subsection's, with its stage's own defaults); None: the
    class's."""
    rows = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.type) or (isinstance(f.type, str) and f.default_factory is not dataclasses.MISSING):
            sub = typing.get_type_hints(cls)[f.name]
            given = getattr(defaults, f.name) if defaults is not None else f.default_factory()
            rows.extend(describe_fields(sub, f"{prefix}{f.name}.", given))
        else:
            default = getattr(defaults, f.name) if defaults is not None else f.default
            rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("doc", "")))
            hint = typing.get_type_hints(cls)[f.name]
            item = typing.get_args(hint) if typing.get_origin(hint) is tuple else ()
            if item and dataclasses.is_dataclass(item[0]):  # a list of entries: each entry's keys
                rows.extend(describe_fields(item[0], f"{prefix}{f.name}[]."))
    return rows


# for other modules' error messages (label tables, manifests): the same cuts
clip_text = _clip
shown_value = _shown
