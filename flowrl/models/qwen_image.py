"""The ``qwen_image`` family: Qwen-Image (T2I) and Qwen-Image-Edit behind :class:`FlowModel`.

The adapter wraps diffusers' ``QwenImageTransformer2DModel`` and
``AutoencoderKLQwenImage`` and transformers' Qwen2.5-VL text encoder, and
reproduces what diffusers' ``QwenImagePipeline`` / ``QwenImageEditPipeline``
do around them (prompt template and dropped prefix, latent packing and
normalisation, ``img_shapes``, source tokens for edits, the sigma schedule) so
that :func:`flowrl.sampling.sample` with ``renorm_dim=model.cfg_renorm_dim``
gives the pipelines' latents (tests/models/test_qwen_image.py holds it to that).

Latents are the pipelines' packed form: a [B, 16, H/8, W/8] VAE latent,
normalised with the VAE's ``latents_mean`` / ``latents_std``, cut into 2x2
patches -> [B, (H/16)(W/16), 64].

Differences from the pipelines, on purpose:

* the edit source is used at its own size (it must be a multiple of 16); the
  pipeline first resizes it to about 1024x1024 pixels of area, which is the
  same thing for the production resolution;
* for edits the text encoder receives ``mm_token_type_ids`` so Qwen2.5-VL
  gives the image tokens their 3-D (M-RoPE) positions, as it did when
  Qwen-Image-Edit was released. diffusers 0.42.1 on transformers 5 drops that
  input and the image tokens get 1-D positions; ``mrope_image_positions=False``
  reproduces that.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from flowrl.models.base import Condition, unwrap_network
from flowrl.sampling import flow_match_sigmas, qwen_image_mu

T2I_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, "
    "texture, objects, background), then explain how the user's text instruction should alter "
    "or modify the image. Generate a new image that meets the user's requirements while "
    "maintaining consistency with the original input where appropriate.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
IMAGE_PAD_TOKEN = "<|image_pad|>"
# The pipelines tokenise with max_length = 1024 + dropped prefix.
TOKENIZER_MAX_LENGTH = 1024
TASKS = ("t2i", "edit")


# --------------------------------------------------------------------------- pure helpers


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] VAE latents -> [B, (h/2)(w/2), 4C] tokens, one per 2x2 patch.

    Token order is row-major over patches; within a token the channels vary
    slowest, then the patch row, then the patch column (the transformer's
    ``patch_size=2`` layout).
    """
    b, c, h, w = latents.shape
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2)  # [B, C, h/2, 2, w/2, 2]
    patches = patches.permute(0, 2, 4, 1, 3, 5)  # [B, h/2, w/2, C, 2, 2]
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)  # [B, (h/2)(w/2), 4C]


def unpack_latents(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents`: [B, (h/2)(w/2), 4C] -> [B, C, h, w]."""
    b, _, d = tokens.shape
    patches = tokens.reshape(b, h // 2, w // 2, d // 4, 2, 2)  # [B, h/2, w/2, C, 2, 2]
    patches = patches.permute(0, 3, 1, 4, 2, 5)  # [B, C, h/2, 2, w/2, 2]
    return patches.reshape(b, d // 4, h, w)  # [B, C, h, w]


def stretch_to_terminal(sigmas: torch.Tensor, terminal: float) -> torch.Tensor:
    """Stretch an N-step schedule (no trailing 0) affinely in ``1 - sigma`` so
    its last value becomes ``terminal`` while the first stays 1: the
    scheduler's ``shift_terminal`` option, which Qwen-Image sets to 0.02."""
    one_minus = 1.0 - sigmas.double()  # [N]
    scale = one_minus[-1] / (1.0 - terminal)
    return (1.0 - one_minus / scale).to(sigmas.dtype)  # [N]


def qwen_image_sigmas(num_steps: int, image_seq_len: int, scheduler_config: dict) -> torch.Tensor:
    """The N + 1 sigmas the Qwen-Image pipelines step through for ``num_steps``
    steps at ``image_seq_len`` image tokens, from the scheduler's config."""
    cfg = dict(scheduler_config)
    options = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas")
    unsupported = [k for k in options if cfg.get(k)]
    if cfg.get("time_shift_type", "exponential") != "exponential":
        unsupported.append(f"time_shift_type={cfg['time_shift_type']}")
    if unsupported:
        raise ValueError(f"scheduler/scheduler_config.json: options the Qwen-Image sampler does not support: {unsupported}")
    if cfg.get("use_dynamic_shifting", False):
        mu = qwen_image_mu(
            image_seq_len,
            cfg.get("base_image_seq_len", 256),
            cfg.get("max_image_seq_len", 4096),
            cfg.get("base_shift", 0.5),
            cfg.get("max_shift", 1.15),
        )
        sigmas = flow_match_sigmas(num_steps, mu=mu)  # [N + 1]
    else:
        sigmas = flow_match_sigmas(num_steps, shift=cfg.get("shift", 1.0))  # [N + 1]
    # With one step the stretch is 0 / 0 (diffusers returns NaN): keep [1, 0].
    if cfg.get("shift_terminal") and num_steps > 1:
        sigmas = torch.cat([stretch_to_terminal(sigmas[:-1], cfg["shift_terminal"]), sigmas[-1:]])
    return sigmas


def pad_prompt_rows(rows: list[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad variable-length [L_i, D] embeddings with zeros to [B, length, D]
    and return them with their [B, length] 0/1 mask (long, like the pipelines).

    Padding is exact for the transformer: padded keys are masked out and text
    RoPE positions of the real tokens do not depend on the padded length.
    """
    embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])  # [B, length, D]
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)  # [B, length]
    for i, row in enumerate(rows):
        embeds[i, : row.shape[0]] = row
        mask[i, : row.shape[0]] = 1
    return embeds, mask


def pad_condition(cond: Condition, length: int) -> Condition:
    """``cond`` with its prompt embeddings and mask right-padded to ``length``."""
    embeds, mask = cond.tensors["prompt_embeds"], cond.tensors["prompt_mask"]
    extra = length - embeds.shape[1]
    if extra < 0:
        raise ValueError(f"cannot pad a prompt of {embeds.shape[1]} tokens to {length}")
    tensors = dict(cond.tensors)
    tensors["prompt_embeds"] = torch.nn.functional.pad(embeds, (0, 0, 0, extra))  # [B, length, D]
    tensors["prompt_mask"] = torch.nn.functional.pad(mask, (0, extra))  # [B, length]
    return Condition(tensors, dict(cond.extras))


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's data and buffer of ``module`` by qualified name, aliases included
    (a tied tensor appears under each of its names)."""
    params = ((n, p.data) for n, p in module.named_parameters(remove_duplicate=False))
    return dict(itertools.chain(params, module.named_buffers(remove_duplicate=False)))


def set_module_tensors(module: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` (as :func:`module_tensors` names them) back into ``module``: a parameter
    keeps its object and gets the tensor as its data, a buffer is replaced."""
    for name, tensor in tensors.items():
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner)
        if leaf in sub._parameters:
            sub._parameters[leaf].data = tensor
        else:
            sub._buffers[leaf] = tensor


def to_pil_images(images: torch.Tensor) -> list[PIL.Image.Image]:
    """[B, 3, H, W] in [0, 1] -> 8-bit RGB PIL images (what the pipelines feed
    the Qwen2.5-VL image processor)."""
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)  # [B, 3, H, W]
    return [PIL.Image.fromarray(p.permute(1, 2, 0).cpu().numpy()) for p in pixels]


# --------------------------------------------------------------------------- the adapter


class QwenImageModel:
    """Qwen-Image / Qwen-Image-Edit as a :class:`flowrl.models.base.FlowModel`.

    ``transformer`` is the trainable policy; the VAE and text encoder are
    frozen (eval mode, no grad). Images are ``height`` x ``width`` pixels,
    multiples of 16 (8x VAE, then 2x2 patches).

    ``decode_batch``: the VAE decodes (and encodes) at most this many images
    per call, to bound its working set (``model.qwen_image.decode_batch``;
    None: the whole batch in one call).
    """

    cfg_renorm_dim = -1  # the pipelines rescale guided velocity per token over channels

    def __init__(
        self,
        transformer: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer: Any,
        scheduler_config: dict,
        *,
        task: str = "t2i",
        height: int = 1024,
        width: int = 1024,
        image_processor: Any = None,
        negative_prompt: str = " ",
        max_sequence_length: int = 512,
        mrope_image_positions: bool = True,
        decode_batch: int | None = None,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if task == "edit" and image_processor is None:
            raise ValueError("task 'edit' needs the Qwen2.5-VL image processor")
        if decode_batch is not None and decode_batch < 1:
            raise ValueError(f"decode_batch must be at least 1 (or None), got {decode_batch}")
        if transformer.config.guidance_embeds:
            raise ValueError("transformer/config.json: guidance_embeds is set; guidance-distilled transformers are not supported")
        self.vae_scale_factor = 2 ** len(vae.temperal_downsample)
        multiple = self.vae_scale_factor * 2
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}: {height}x{width}")
        self.transformer, self.vae, self.text_encoder = transformer, vae, text_encoder
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.scheduler_config = dict(scheduler_config)
        self.task, self.height, self.width = task, height, width
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length
        self.mrope_image_positions = mrope_image_positions
        self.decode_batch = decode_batch
        # Offloaded text encoder (move_text_encoder(..., offload=True)): its weights in host memory,
        # put back after each call; None: it runs wherever its parameters are.
        self._text_encoder_host: dict[str, torch.Tensor] | None = None
        self.template = T2I_PROMPT_TEMPLATE if task == "t2i" else EDIT_PROMPT_TEMPLATE
        self.prompt_drop_index = self._count_prefix_tokens()
        for frozen in (vae, text_encoder):
            frozen.requires_grad_(False).eval()
        z_dim = vae.config.z_dim
        self._latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
        self._latents_std = torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        task: str = "t2i",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        height: int = 1024,
        width: int = 1024,
        transformer: torch.nn.Module | None = None,
        vae: torch.nn.Module | None = None,
        text_encoder: torch.nn.Module | None = None,
        tokenizer: Any = None,
        text_encoder_device: str | torch.device | None = None,
        **kwargs: Any,
    ) -> "QwenImageModel":
        """Load a diffusers-layout directory (or hub id) with each component's
        own ``from_pretrained``, as for the production weights.

        Subfolders: ``transformer``, ``vae``, ``text_encoder``, ``tokenizer``,
        ``scheduler`` and, for edit, ``processor`` (its image processor).
        ``transformer``: use this network instead of the directory's (a trained
        one), which is then never read: two 20B transformers never share a GPU.
        ``vae``, ``text_encoder``, ``tokenizer``: components already loaded
        (another task's pipeline, checked to hold the same files) used instead
        of the directory's, which are then never read.
        ``text_encoder_device``: where the text encoder runs (None or ``same``: ``device``);
        ``cpu`` keeps Qwen2.5-VL off the accelerator (see :meth:`_encode_text`); ``offload``
        keeps it in host memory and runs it on ``device`` (:meth:`move_text_encoder`), so it
        never occupies the accelerator between calls, not even at load time.
        """
        # long: each component is loaded, checked against the task and placed in turn; the steps share
        # the arguments and are clearer in order than spread over helpers
        from diffusers import (
            AutoencoderKLQwenImage,
            FlowMatchEulerDiscreteScheduler,
            QwenImageTransformer2DModel,
        )
        from transformers import (
            Qwen2_5_VLForConditionalGeneration,
            Qwen2Tokenizer,
            Qwen2VLImageProcessorPil,
        )

        path = str(path)
        if transformer is None:
            transformer = QwenImageTransformer2DModel.from_pretrained(
                path, subfolder="transformer", torch_dtype=dtype
            )
        if vae is None:
            vae = AutoencoderKLQwenImage.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        if text_encoder is None:
            text_encoder = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                path, subfolder="text_encoder", dtype=dtype
            )
        if tokenizer is None:
            tokenizer = Qwen2Tokenizer.from_pretrained(path, subfolder="tokenizer")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        image_processor = None
        if task == "edit":
            # The PIL backend: the torchvision one (and Qwen2_5_VLProcessor) need torchvision.
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(path, subfolder="processor")
        offload = text_encoder_device == "offload"
        if offload:
            text_encoder_device = "cpu"
        elif text_encoder_device is None or text_encoder_device == "same":
            text_encoder_device = device
        model = cls(
            transformer.to(device),
            vae.to(device),
            text_encoder.to(text_encoder_device),
            tokenizer,
            dict(scheduler.config),
            task=task,
            height=height,
            width=width,
            image_processor=image_processor,
            **kwargs,
        )
        if offload:
            model.move_text_encoder("cpu", offload=True)
        return model

    def with_transformer(self, transformer: torch.nn.Module) -> "QwenImageModel":
        """The same pipeline view (task, size, frozen VAE and text encoder,
        shared, not copied) around another transformer: a reference policy,
        a teacher, or the trained weights of a GRPO / OPD artifact."""
        view = copy.copy(self)
        view.transformer = transformer
        return view

    def with_trainable(self, module: torch.nn.Module) -> "QwenImageModel":
        """:meth:`with_transformer` under the name every family's model answers to."""
        return self.with_transformer(module)

    def move_text_encoder(self, device: str | torch.device, *, offload: bool = False) -> None:
        """Keep the text encoder on ``device`` from now on. Without ``offload`` it also runs there
        (``cpu``: off the accelerator, slowly; the embeddings it gives are moved to the transformer's
        device). With ``offload`` ``device`` is only its home (host memory): each :meth:`_encode_text`
        copies it to the transformer's device, runs it there and puts the home weights back (no copy
        back: the encoder is frozen). The home is not page-locked: torch's pinned allocator rounds
        each tensor up to a power of two, nearly doubling Qwen2.5-VL's footprint. The module is moved
        for every view sharing it; the offload setting is this view's (views made later inherit it),
        so call this on each view that encodes."""
        self.text_encoder.to(device)
        self._text_encoder_host = module_tensors(self.text_encoder) if offload else None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the encoder's accelerator memory goes back for the transformer

    @contextlib.contextmanager
    def _text_encoder_running(self):
        """The block runs with the text encoder where :attr:`text_encoder_device` says: an offloaded
        encoder is copied to the transformer's device for it and its home weights are put back
        after (its accelerator copy freed, and the cache emptied on CUDA)."""
        home = self._text_encoder_host
        if home is None:
            yield
            return
        device = self.device
        self.text_encoder.to(device)
        try:
            yield
        finally:
            set_module_tensors(self.text_encoder, home)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    # ------------------------------------------------------------------ shapes and schedule

    def network(self) -> torch.nn.Module:
        """The diffusers transformer behind ``transformer``, which may be a wrapper: DDP or DeepSpeed
        (``module``), or a LoRA adapter view (``network``, :mod:`flowrl.models.lora`)."""
        return unwrap_network(self.transformer)

    @property
    def device(self) -> torch.device:
        return next(self.network().parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network().parameters()).dtype

    @property
    def text_encoder_device(self) -> torch.device:
        """Where the text encoder runs (``model.qwen_image.text_encoder_device``): where its
        parameters are, or the transformer's device when it is offloaded."""
        if self._text_encoder_host is not None:
            return self.device
        return next(self.text_encoder.parameters()).device

    @property
    def text_encoder_offloaded(self) -> bool:
        """Whether the text encoder lives in host memory and visits the accelerator per call."""
        return self._text_encoder_host is not None

    def _token_grid(self, height: int, width: int) -> tuple[int, int]:
        """Image-token grid (rows, cols) of a ``height`` x ``width`` image."""
        multiple = self.vae_scale_factor * 2
        return height // multiple, width // multiple

    def latent_shape(self) -> tuple[int, ...]:
        rows, cols = self._token_grid(self.height, self.width)
        return (rows * cols, self.network().config.in_channels)

    def schedule(self, num_steps: int, shift: float = 1.0) -> torch.Tensor:
        """The pipelines' N + 1 sigmas for this image size (first 1.0, last 0).

        ``shift`` is ignored: Qwen-Image's shift is resolution-dependent and
        comes from its scheduler config."""
        return qwen_image_sigmas(num_steps, self.latent_shape()[0], self.scheduler_config)

    def prepare_noise(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Initial noise [B, *latent] drawn as the pipelines draw it (unpacked
        [B, 1, C, h, w] layout, then packed), so a seed gives diffusers' image."""
        channels = self.network().config.in_channels // 4
        h, w = (2 * g for g in self._token_grid(self.height, self.width))
        noise = torch.randn((batch_size, 1, channels, h, w), generator=generator)  # [B, 1, C, h, w]
        return pack_latents(noise[:, 0])  # [B, (h/2)(w/2), 4C]

    # ------------------------------------------------------------------ VAE

    def _vae_parts(self, batch: torch.Tensor, run) -> torch.Tensor:
        """``run`` over consecutive parts of at most ``decode_batch`` rows of ``batch``, joined in
        row order (None, or a part covering the batch: one call on the whole batch)."""
        if self.decode_batch is None or batch.shape[0] <= self.decode_batch:
            return run(batch)
        return torch.cat([run(part) for part in batch.split(self.decode_batch)])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> packed normalised latents [B, N, 64]
        (the distribution's mode, as the edit pipeline encodes its source); at most
        ``decode_batch`` images per VAE call."""
        return self._vae_parts(images, self._encode_images)

    def _encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images * 2.0 - 1.0).to(self.device, self.vae.dtype)  # [B, 3, H, W]
        pixels = pixels.unsqueeze(2)  # [B, 3, 1, H, W]: a one-frame video
        latents = self.vae.encode(pixels).latent_dist.mode()  # [B, C, 1, h, w]
        mean = self._latents_mean.to(latents)
        std = self._latents_std.to(latents)
        latents = (latents - mean) / std  # [B, C, 1, h, w]
        return pack_latents(latents[:, :, 0])  # [B, (h/2)(w/2), 4C]

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed latents [B, N, 64] -> images [B, 3, H, W] in [0, 1]; at most
        ``decode_batch`` images per VAE call."""
        return self._vae_parts(latents, self._decode_latents)

    def _decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        rows, cols = self._token_grid(self.height, self.width)
        latents = latents.to(self.device, self.vae.dtype)  # [B, N, 64]
        z = unpack_latents(latents, 2 * rows, 2 * cols)  # [B, C, h, w]
        z = z.unsqueeze(2) * self._latents_std.to(z) + self._latents_mean.to(z)  # [B, C, 1, h, w]
        pixels = self.vae.decode(z, return_dict=False)[0][:, :, 0]  # [B, 3, H, W] in [-1, 1]
        return (pixels.float() / 2.0 + 0.5).clamp(0.0, 1.0)  # [B, 3, H, W]

    # ------------------------------------------------------------------ text encoder

    def _count_prefix_tokens(self) -> int:
        """Tokens of the template before the user's content, which the pipelines
        drop from the encoder output (34 for T2I and 64 for edit with Qwen's
        tokenizer: diffusers' ``prompt_template_encode_start_idx``)."""
        prefix = self.template.split("{}")[0].split("<|vision_start|>")[0]
        return len(self.tokenizer(prefix).input_ids)

    def _vision_inputs(self, sources: torch.Tensor) -> tuple[dict[str, torch.Tensor], list[int]]:
        """Qwen2.5-VL pixel inputs for the sources and the number of
        ``<|image_pad|>`` tokens each one expands to (patches / merge_size^2)."""
        vision = self.image_processor(images=to_pil_images(sources), return_tensors="pt")
        merge = self.image_processor.merge_size
        counts = [int(thw.prod()) // merge**2 for thw in vision["image_grid_thw"]]
        return dict(vision), counts

    def _format_prompts(self, prompts: list[str], image_tokens: list[int] | None) -> list[str]:
        texts = [self.template.format(p) for p in prompts]
        if image_tokens is None:
            return texts
        return [
            text.replace(IMAGE_PAD_TOKEN, IMAGE_PAD_TOKEN * n, 1)
            for text, n in zip(texts, image_tokens)
        ]

    @torch.no_grad()
    def _encode_text(
        self, prompts: list[str], sources: torch.Tensor | None, min_length: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states of the templated prompts without the dropped
        prefix, right-padded to at least ``min_length``: [B, L, D] and [B, L].

        The encoder runs on its own device (the CPU with ``text_encoder_device: cpu``; the
        transformer's, visited for this call only, with ``offload``) and the results move to the
        transformer's: a rollout encodes its prompts once and stores them, so training never
        re-encodes."""
        inputs: dict[str, torch.Tensor] = {}
        image_tokens = None
        if sources is not None:
            inputs, image_tokens = self._vision_inputs(sources)
        tokens = self.tokenizer(
            self._format_prompts(prompts, image_tokens),
            max_length=TOKENIZER_MAX_LENGTH + self.prompt_drop_index,
            padding=True,
            truncation=True,
            return_tensors="pt",
        )
        inputs.update(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        if sources is not None and self.mrope_image_positions:
            image_id = self.text_encoder.config.image_token_id
            inputs["mm_token_type_ids"] = (tokens.input_ids == image_id).int()  # [B, T]
        encoder_device = self.text_encoder_device
        inputs = {k: v.to(encoder_device) for k, v in inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.text_encoder.dtype)
        with self._text_encoder_running():
            # logits_to_keep=1: the language head runs on the last position only (its logits over the whole
            # vocabulary at every token would be 16 rows x 1,881 tokens x 152,064 x 2 bytes = 9 GB, unused)
            hidden = self.text_encoder(**inputs, output_hidden_states=True,
                                       logits_to_keep=1).hidden_states[-1]  # [B, T, D]
            valid = tokens.attention_mask.bool().to(encoder_device)  # [B, T]
            rows = [h[m][self.prompt_drop_index :] for h, m in zip(hidden, valid)]  # [L_i, D] each
            del hidden  # the other layers' states went with the output: only the rows stay
        if self.task == "t2i":  # QwenImagePipeline truncates, the edit pipeline does not
            rows = [r[: self.max_sequence_length] for r in rows]
        length = max(min_length, *(r.shape[0] for r in rows))
        embeds, mask = pad_prompt_rows(rows, length)
        return embeds.to(self.device, self.dtype), mask.to(self.device)

    def _null_prompt_length(self, image_tokens: list[int] | None) -> int:
        """Encoded length of the negative prompt, without running the encoder."""
        text = self._format_prompts([self.negative_prompt], image_tokens)[0]
        return len(self.tokenizer(text).input_ids) - self.prompt_drop_index

    def encode_prompts(self, prompts: list[str], sources: torch.Tensor | None = None) -> Condition:
        """Prompt embeddings and mask as the pipelines' ``encode_prompt``; for
        edits also the source images [B, 3, H, W] in [0, 1] and their packed
        latents, which :meth:`velocity` appends to the image tokens.

        Embeddings are padded to at least the negative prompt's length so that
        :meth:`null_condition` can always pad to this condition's shape.
        """
        if (sources is None) != (self.task == "t2i"):
            expected = "None" if self.task == "t2i" else "given"
            raise ValueError(f"task {self.task!r}: sources must be {expected}")
        if sources is not None and sources.shape[0] != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {sources.shape[0]} sources")
        image_tokens = None
        if sources is not None:
            patches = self.image_processor.get_number_of_image_patches(*sources.shape[-2:], {})
            image_tokens = [patches // self.image_processor.merge_size**2]
        min_length = self._null_prompt_length(image_tokens)
        embeds, mask = self._encode_text(list(prompts), sources, min_length)
        tensors = {"prompt_embeds": embeds, "prompt_mask": mask}  # [B, L, D], [B, L]
        if sources is not None:
            tensors["source_images"] = sources.to(self.device, torch.float32)  # [B, 3, H, W]
            tensors["source_latents"] = self.encode_images(sources).to(self.dtype)  # [B, S, 64]
        return Condition(tensors)

    def null_condition(self, cond: Condition) -> Condition:
        """The negative-prompt condition, padded to ``cond``'s prompt length;
        for edits the source (seen by the text encoder too) stays."""
        batch, length = cond.tensors["prompt_mask"].shape
        if self.task == "t2i":
            embeds, mask = self._encode_text([self.negative_prompt], None)
            null = Condition({
                "prompt_embeds": embeds.expand(batch, -1, -1),  # [B, L_null, D]
                "prompt_mask": mask.expand(batch, -1),  # [B, L_null]
            })
        else:
            sources = cond.tensors["source_images"]
            embeds, mask = self._encode_text([self.negative_prompt] * batch, sources)
            null = Condition({
                "prompt_embeds": embeds,
                "prompt_mask": mask,
                "source_images": sources,
                "source_latents": cond.tensors["source_latents"],
            })
        return pad_condition(null, length)

    # ------------------------------------------------------------------ transformer

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Velocity [B, N, 64] at packed states ``x`` [B, N, 64] and sigmas ``t`` [B].

        The transformer takes the sigma in [0, 1] (the pipelines pass their
        0..1000 scheduler timesteps divided by 1000). For edits the source tokens are
        appended after the target tokens with their own RoPE grid, and the
        output is cut back to the target tokens.
        """
        batch, num_tokens = x.shape[:2]
        hidden = x.to(self.device, self.dtype)  # [B, N, 64]
        shapes = [(1, *self._token_grid(self.height, self.width))]
        if "source_latents" in cond.tensors:
            source = cond.tensors["source_latents"].to(hidden)  # [B, S, 64]
            hidden = torch.cat([hidden, source], dim=1)  # [B, N + S, 64]
            shapes.append((1, *self._token_grid(*cond.tensors["source_images"].shape[-2:])))
        # The pipelines round the 0..1000 timestep to the model dtype, then divide:
        # the same rounding keeps bf16 runs identical to theirs (fp32: within 1 ulp).
        timestep = (t.float() * 1000.0).to(self.device, self.dtype) / 1000.0  # [B]
        out = self.transformer(
            hidden_states=hidden,
            timestep=timestep,  # [B]
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(hidden),  # [B, L, D]
            encoder_hidden_states_mask=cond.tensors["prompt_mask"].to(self.device),  # [B, L]
            img_shapes=[shapes] * batch,
            return_dict=False,
        )[0]  # [B, N (+ S), 64]
        return out[:, :num_tokens].to(x.device, x.dtype)  # [B, N, 64]


# --------------------------------------------------------------------------- validation

# component -> (config file, accepted weight files or their shard indexes)
_COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "transformer": (
        "config.json",
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    ),
    "vae": (
        "config.json",
        ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
    ),
    "text_encoder": ("config.json", ("model.safetensors", "model.safetensors.index.json")),
    "scheduler": ("scheduler_config.json", ()),
    "tokenizer": ("tokenizer_config.json", ()),
    "processor": ("preprocessor_config.json", ()),
}


def _weight_files(folder: Path, accepted: tuple[str, ...]) -> list[Path]:
    """The safetensors files holding a component's weights (all shards)."""
    for name in accepted:
        candidate = folder / name
        if not candidate.is_file():
            continue
        if not name.endswith(".index.json"):
            return [candidate]
        shards = sorted(set(json.loads(candidate.read_text())["weight_map"].values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"component '{folder.name}': missing weight shards {missing}")
        return [folder / s for s in shards]
    raise FileNotFoundError(
        f"component '{folder.name}': no weights, expected one of {list(accepted)} in {folder}"
    )


def _count_parameters(files: list[Path]) -> int:
    """Parameter count from the safetensors headers only (no tensor data read)."""
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(k).get_shape()) for k in handle.keys())
    return total


def validate_pretrained(path: str | Path, task: str | None = None) -> dict[str, Any]:
    """Check a local diffusers-layout Qwen-Image directory without loading weights.

    Raises FileNotFoundError naming the first missing component or file, and
    ValueError when the components do not fit together. ``task`` None reads
    it from ``model_index.json`` (an ``...Edit...`` pipeline class means edit).
    Returns classes, parameter counts and latent geometry.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(
            f"{path} is not a local directory; download it first "
            "(huggingface_hub.snapshot_download) to validate it"
        )
    index_file = root / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    pipeline_class = index.get("_class_name")
    if task is None:
        task = "edit" if pipeline_class and "Edit" in pipeline_class else "t2i"
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    names = [n for n in _COMPONENTS if n != "processor" or task == "edit"]
    configs, components = {}, {}
    for name in names:
        config_name, weights = _COMPONENTS[name]
        folder = root / name
        if not folder.is_dir():
            raise FileNotFoundError(f"missing component '{name}': no directory {folder}")
        if not (folder / config_name).is_file():
            raise FileNotFoundError(f"component '{name}': missing {config_name} in {folder}")
        configs[name] = json.loads((folder / config_name).read_text())
        info: dict[str, Any] = {"class": _config_class(configs[name])}
        if weights:
            info["num_parameters"] = _count_parameters(_weight_files(folder, weights))
        components[name] = info
    tokenizer_dir = root / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file() and not all(
        (tokenizer_dir / f).is_file() for f in ("vocab.json", "merges.txt")
    ):
        raise FileNotFoundError(
            "component 'tokenizer': missing tokenizer.json (or vocab.json + merges.txt)"
        )
    geometry = _check_geometry(configs)
    return {
        "path": str(root),
        "task": task,
        "pipeline_class": pipeline_class,
        "components": components,
        **geometry,
    }


def _config_class(config: dict) -> str | None:
    if "_class_name" in config:
        return config["_class_name"]
    for key in ("architectures", "image_processor_type", "tokenizer_class"):
        value = config.get(key)
        if value:
            return value[0] if isinstance(value, list) else value
    return None


def _check_geometry(configs: dict[str, dict]) -> dict[str, int]:
    """Latent channels and widths must agree across transformer, VAE and encoder."""
    z_dim = configs["vae"].get("z_dim", 16)
    transformer = configs["transformer"]
    in_channels = transformer.get("in_channels", 64)
    encoder = configs["text_encoder"]  # transformers 5 nests it in text_config, 4.x kept it flat
    text_hidden = encoder.get("text_config", {}).get("hidden_size", encoder.get("hidden_size"))
    joint_dim = transformer.get("joint_attention_dim", 3584)
    if in_channels != 4 * z_dim:
        raise ValueError(f"transformer in_channels {in_channels} != 4 x vae z_dim {z_dim}")
    if text_hidden is not None and text_hidden != joint_dim:
        raise ValueError(
            f"text encoder hidden size {text_hidden} != transformer joint_attention_dim {joint_dim}"
        )
    downsample = configs["vae"].get("temperal_downsample", [False, True, True])
    return {
        "latent_channels": z_dim,
        "packed_channels": in_channels,
        "vae_scale_factor": 2 ** len(downsample),
        "text_hidden_size": joint_dim,
    }


# --------------------------------------------------------------------------- weights on disk

def same_component(a: str | Path, b: str | Path, subfolder: str) -> bool:
    """Whether two pipeline directories hold the same ``subfolder`` (e.g. Qwen-Image and Qwen-Image-Edit
    share their VAE and text encoder): the same file names, and each file the same file on disk (a hub
    cache links both snapshots to one content-addressed blob) or, failing that, equal in size and SHA-256."""
    import os

    from flowrl.storage import sha256_file

    roots = Path(a) / subfolder, Path(b) / subfolder
    if not all(r.is_dir() for r in roots):
        return False
    files = [sorted(p.relative_to(r).as_posix() for p in r.rglob("*") if p.is_file()) for r in roots]
    if files[0] != files[1]:
        return False
    for rel in files[0]:
        x, y = roots[0] / rel, roots[1] / rel
        if os.path.samefile(x, y):  # one file behind both paths (links followed)
            continue
        if x.stat().st_size != y.stat().st_size or sha256_file(x) != sha256_file(y):
            return False
    return True


def weights_fingerprint(path: str | Path) -> str:
    """Hash of a weights directory's file listing (names, sizes) and its JSON
    configs: cheap for tens of GB, and changes when the checkpoint does."""
    digest = hashlib.sha256()
    root = Path(path)
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = file.relative_to(root).as_posix()
        digest.update(f"{rel}:{file.stat().st_size}\n".encode())
        if file.suffix == ".json":
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]
