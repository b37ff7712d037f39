"""A tiny random Stable Diffusion 3 checkpoint in the diffusers layout.

The production classes (``SD3Transformer2DModel`` with SD3.5's RMS q/k norm, ``AutoencoderKL`` with
SD3's 16 latent channels and 8x compression, two ``CLIPTextModelWithProjection``) at tiny widths,
written with each component's ``save_pretrained`` beside SD3.5's scheduler config, so loading it runs
the production code path. No T5 (``text_encoder_3``): the pipeline then fills T5's part of the prompt
with zeros. Nothing is downloaded: the CLIP tokenizers are a letter-level vocabulary written here
(``vocab.json`` / ``merges.txt``) with a short ``model_max_length`` so the tests stay fast.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

CLIP_LENGTH = 12  # tokens per CLIP prompt (77 in SD3): start, up to 10 letters/words, end or padding
T5_LENGTH = 6  # the pipeline's max_sequence_length in the tests (256 in SD3)
# joint width 64 >= the two CLIP widths (32 + 16); pooled 32 = the two projections (16 + 16);
# 4 heads x 8 = the caption projection 32
TRANSFORMER_CONFIG = dict(sample_size=4, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                          attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                          caption_projection_dim=32, pooled_projection_dim=32, pos_embed_max_size=16,
                          qk_norm="rms_norm")
VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 8, 16, 16),
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  layers_per_block=1, norm_num_groups=4, sample_size=32, use_quant_conv=False,
                  use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
# stabilityai/stable-diffusion-3.5-large's scheduler/scheduler_config.json
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
START, END = "<|startoftext|>", "<|endoftext|>"


def write_clip_vocab(directory: Path) -> tuple[Path, Path]:
    """A CLIP BPE vocabulary of single letters, digits and a few punctuation marks (each also as a
    word end ``x</w>``), with merges for some whole words; returns (vocab.json, merges.txt)."""
    symbols = list(string.ascii_lowercase + string.digits + ",.!'-")
    vocab = {s: i for i, s in enumerate(symbols)}
    for s in symbols:
        vocab[s + "</w>"] = len(vocab)
    merges = []
    for word in ("red", "blue", "circle", "square", "two", "green", "the"):
        left = word[0]
        for i, ch in enumerate(word[1:], 1):
            right = ch + ("</w>" if i == len(word) - 1 else "")
            merges.append(f"{left} {right}")
            merged = left + right
            vocab.setdefault(merged, len(vocab))
            left = merged
    vocab[START], vocab[END] = len(vocab), len(vocab) + 1
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory / "vocab.json", directory / "merges.txt"


def build_tokenizer(directory: Path, pad_token: str = END):
    """CLIPTokenizer on the letter vocabulary (SD3's second tokenizer pads with ``!``, the first with the
    end token)."""
    from transformers import CLIPTokenizer

    vocab_file, merges_file = write_clip_vocab(directory)
    vocab = json.loads(vocab_file.read_text())
    merges = [tuple(line.split()) for line in merges_file.read_text().splitlines()[1:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=CLIP_LENGTH)


def build_clip(tokenizer, hidden: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=CLIP_LENGTH,
                            projection_dim=16, hidden_act="gelu", bos_token_id=tokenizer.convert_tokens_to_ids(START),
                            eos_token_id=tokenizer.convert_tokens_to_ids(END),
                            pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(config).eval()


def build_tiny_sd3(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny random SD3 pipeline directory (no T5) to ``path`` and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    root = Path(path)
    torch.manual_seed(seed)
    SD3Transformer2DModel(**TRANSFORMER_CONFIG).save_pretrained(root / "transformer")
    AutoencoderKL(**VAE_CONFIG).save_pretrained(root / "vae")
    for i, (name, hidden, pad) in enumerate((("", 32, END), ("_2", 16, "!"))):
        tokenizer = build_tokenizer(root / f"tokenizer{name}", pad_token=pad)
        tokenizer.save_pretrained(root / f"tokenizer{name}")
        build_clip(tokenizer, hidden, seed + 1 + i).save_pretrained(root / f"text_encoder{name}")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(root / "scheduler")
    index = {
        "_class_name": "StableDiffusion3Pipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "text_encoder_3": [None, None],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": [None, None],
        "transformer": ["diffusers", "SD3Transformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


def pipeline_of(model):
    """diffusers' ``StableDiffusion3Pipeline`` around an :class:`~flowrl.models.sd3.SD3Model`'s own
    components (no T5), with a scheduler of the model's config and shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    config = dict(model.scheduler_config)
    if model.shift is not None:
        config["shift"] = model.shift
    return StableDiffusion3Pipeline(
        transformer=model.transformer, scheduler=FlowMatchEulerDiscreteScheduler.from_config(config), vae=model.vae,
        text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], text_encoder_2=model.text_encoders[1],
        tokenizer_2=model.tokenizers[1], text_encoder_3=None, tokenizer_3=None)
