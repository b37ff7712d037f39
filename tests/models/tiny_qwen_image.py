"""A tiny random Qwen-Image / Qwen-Image-Edit checkpoint in the diffusers layout.

Every component has the production classes and the production directory
layout (``transformer/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``, ``processor/``, ``model_index.json``), written with each
component's ``save_pretrained`` so that loading it exercises the same code
path as the real weights. Nothing is downloaded: the tokenizer is a byte-level
BPE trained here on the prompt templates, with Qwen's pre-tokenizer and special
tokens, so the templates' system prefixes tokenise to exactly the 34 / 64
tokens that diffusers' pipelines drop.

Later stages' tests reuse :func:`build_tiny_qwen_image`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from flowrl.models.qwen_image import EDIT_PROMPT_TEMPLATE, T2I_PROMPT_TEMPLATE

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Qwen2.5-VL's own template, minus tools: enough for reward models to score images.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS_PROMPTS = [
    "a red circle left of a blue square",
    "two green triangles above a yellow circle",
    "make the circle purple",
    "remove the square and add an orange triangle",
    "Score the image from 1 to 5: 1 2 3 4 5",
]

# Shapes from docs/design.md, Tiny test components: joint dim 64 = text hidden size, 4 heads x 32,
# RoPE axes (8, 12, 12) summing to the head size, 16 latent channels packed to 64.
TRANSFORMER_CONFIG = dict(
    patch_size=2,
    in_channels=64,
    out_channels=16,
    num_layers=2,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=64,
    axes_dims_rope=(8, 12, 12),
)
VAE_CONFIG = dict(
    base_dim=16,
    z_dim=16,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],  # 3 stages: the real 8x spatial compression
)
# Qwen/Qwen-Image's scheduler/scheduler_config.json (dynamic shift, terminal 0.02).
SCHEDULER_CONFIG = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    invert_sigmas=False,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    stochastic_sampling=False,
    time_shift_type="exponential",
    use_beta_sigmas=False,
    use_dynamic_shifting=True,
    use_exponential_sigmas=False,
    use_karras_sigmas=False,
)


def build_tokenizer():
    """Byte-level BPE with Qwen2's pre-tokenizer, wrapped in Qwen2TokenizerFast.

    Trained on the prompt templates (specials removed) so that each template
    word is one token, as in Qwen's 151k vocabulary.
    """
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers import Qwen2TokenizerFast
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    templates = (T2I_PROMPT_TEMPLATE, EDIT_PROMPT_TEMPLATE)
    texts = [template.format(p) for template in templates for p in _CORPUS_PROMPTS]
    corpus = [re.sub(r"<\|[a-z_]+\|>", "", text) for text in texts] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=1000,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2TokenizerFast(
        vocab=model["vocab"],
        merges=[tuple(m) for m in model["merges"]],
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_text_encoder(tokenizer, seed: int = 0):
    """A 2-layer Qwen2.5-VL (text hidden 64, 1-block vision tower, patch 14, merge 2)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    token_id = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            # M-RoPE sections (temporal, height, width) sum to half the head size 16.
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            bos_token_id=token_id("<|endoftext|>"),
            eos_token_id=token_id("<|im_end|>"),
            pad_token_id=token_id("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=1,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[0],
        ),
        image_token_id=token_id("<|image_pad|>"),
        video_token_id=token_id("<|video_pad|>"),
        vision_start_token_id=token_id("<|vision_start|>"),
        vision_end_token_id=token_id("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def build_tiny_qwen_image(path: str | Path, task: str = "edit", seed: int = 0) -> Path:
    """Write a tiny random pipeline directory to ``path`` and return it.

    The directory holds every component of both tasks (the image processor is
    only read for edit); ``task`` picks the pipeline class in model_index.json.
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2VLImageProcessorPil

    root = Path(path)
    torch.manual_seed(seed)
    QwenImageTransformer2DModel(**TRANSFORMER_CONFIG).save_pretrained(root / "transformer")
    AutoencoderKLQwenImage(**VAE_CONFIG).save_pretrained(root / "vae")
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(root / "tokenizer")
    build_text_encoder(tokenizer, seed).save_pretrained(root / "text_encoder")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
    Qwen2VLImageProcessorPil().save_pretrained(root / "processor")
    pipeline = "QwenImageEditPipeline" if task == "edit" else "QwenImagePipeline"
    index = {
        "_class_name": pipeline,
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }
    if task == "edit":
        index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root
