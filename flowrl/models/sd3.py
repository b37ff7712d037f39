"""The ``sd3`` family: Stable Diffusion 3 / 3.5 (text-to-image) behind :class:`FlowModel`.

The adapter wraps diffusers' ``SD3Transformer2DModel`` and ``AutoencoderKL`` and transformers' two CLIP
text encoders (``CLIPTextModelWithProjection``) and, when present, the T5 encoder, and does what
diffusers' ``StableDiffusion3Pipeline`` does around them, so that :func:`flowrl.sampling.sample` (plain
CFG, ``cfg_renorm_dim`` None) gives the pipeline's latents (tests/models/test_sd3.py holds it to that):

* prompts: each CLIP encoder's penultimate hidden states ([B, 77, 768] and [B, 77, 1280] for SD3.5),
  joined along the channels and zero-padded to the transformer's joint width, then the T5 states
  ([B, max_sequence_length, 4096]; zeros when the T5 encoder is left out, as the pipeline does with
  ``text_encoder_3=None``) appended along the sequence; the pooled vector is the two CLIP projections
  joined ([B, 2048]). The negative prompt is the empty string.
* latents: the VAE latent [B, 16, H/8, W/8] as the transformer takes it (``(z - shift_factor) *
  scaling_factor``); the transformer cuts its own 2x2 patches.
* schedule: ``FlowMatchEulerDiscreteScheduler.set_timesteps`` with the scheduler config's static shift
  (3.0 for SD3.5) applied to a linspace that already ends at the shifted training sigma_min
  (:func:`sd3_sigmas`); the transformer takes the sigma times 1000.

Stable Diffusion 3 has no edit task: :meth:`SD3Model.encode_prompts` refuses source images.

The family (:class:`SD3Family`, ``model.family: sd3``) keeps a model artifact as Qwen-Image does: a
``reference.json`` naming the pretrained weights (``pretrained.t2i``) and, once trained, the
transformer (``transformer/``, diffusers ``save_pretrained``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from flowrl.config import ConfigError
from flowrl.models import _DTYPES, QWEN_TRANSFORMER, CheckpointError, local_device, pretrained_path
from flowrl.models.base import Condition, unwrap_network
from flowrl.models.families import ModelFamily, register_family, save_referencing_policy
from flowrl.sampling import qwen_image_mu, shift_sigmas

# --------------------------------------------------------------------------- pure helpers


def sd3_sigmas(num_steps: int, scheduler_config: dict, image_seq_len: int = 0,
               shift: float | None = None) -> torch.Tensor:
    """The N + 1 sigmas (float32, last 0) ``StableDiffusion3Pipeline`` steps through for ``num_steps`` steps.

    The scheduler first shifts its training sigmas ``k / T`` (k = T..1); the inference linspace runs from
    the largest to the smallest of those, and is shifted again: so the last step does not end at 1/N as
    :func:`flowrl.sampling.flow_match_sigmas` does. ``shift`` replaces the config's static shift (None:
    the config's). With ``use_dynamic_shifting`` the shift is instead resolution-dependent (``mu`` linear
    in ``image_seq_len``, the pipeline's defaults) and the training sigmas are unshifted.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    cfg = dict(scheduler_config)
    options = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas", "shift_terminal")
    unsupported = [k for k in options if cfg.get(k)]
    if cfg.get("time_shift_type", "exponential") != "exponential":
        unsupported.append(f"time_shift_type={cfg['time_shift_type']}")
    if unsupported:
        raise ValueError(f"scheduler/scheduler_config.json: options the SD3 sampler does not support: {unsupported}")
    steps = int(cfg.get("num_train_timesteps", 1000))
    static = float(cfg.get("shift", 1.0) if shift is None else shift)
    dynamic = bool(cfg.get("use_dynamic_shifting", False))
    # the training sigmas' ends, in float32 as the scheduler keeps them
    train = torch.tensor([1.0, 1.0 / steps], dtype=torch.float32)
    if not dynamic:
        train = shift_sigmas(train, shift=static)
    sigma_max, sigma_min = (float(s) for s in train)
    base = torch.linspace(sigma_max * steps, sigma_min * steps, num_steps, dtype=torch.float64) / steps
    if dynamic:
        mu = qwen_image_mu(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        shifted = shift_sigmas(base, mu=mu)
    else:
        shifted = shift_sigmas(base, shift=static)
    return torch.cat([shifted.to(torch.float32), torch.zeros(1)])


def join_prompt_embeddings(clip_states: list[torch.Tensor], t5_states: torch.Tensor) -> torch.Tensor:
    """CLIP states [B, L, D_i] joined along channels, zero-padded to the T5 width, then the T5 states
    [B, L5, D5] appended along the sequence -> [B, L + L5, D5]."""
    clip = torch.cat(clip_states, dim=-1)  # [B, L, sum D_i]
    if clip.shape[-1] > t5_states.shape[-1]:
        raise ValueError(f"the CLIP embeddings ({clip.shape[-1]} channels) are wider than the transformer's joint "
                         f"width {t5_states.shape[-1]}")
    clip = torch.nn.functional.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))  # [B, L, D5]
    return torch.cat([clip, t5_states.to(clip.dtype)], dim=-2)  # [B, L + L5, D5]


# --------------------------------------------------------------------------- the adapter


class SD3Model:
    """Stable Diffusion 3 / 3.5 as a :class:`flowrl.models.base.FlowModel` (text-to-image only).

    ``transformer`` is the trainable policy; the VAE and text encoders are frozen (eval, no grad).
    ``text_encoder_3`` None: no T5, its part of the prompt is zeros (the pipeline's behaviour).
    ``shift``: the schedule's static shift (None: the scheduler config's). Images are ``height`` x
    ``width`` pixels, multiples of the VAE factor times the patch size (16 for SD3).
    """

    cfg_renorm_dim = None  # the pipeline's CFG is plain
    task = "t2i"

    def __init__(self, transformer: torch.nn.Module, vae: torch.nn.Module, text_encoder: torch.nn.Module,
                 tokenizer: Any, text_encoder_2: torch.nn.Module, tokenizer_2: Any, scheduler_config: dict, *,
                 text_encoder_3: torch.nn.Module | None = None, tokenizer_3: Any = None, height: int = 1024,
                 width: int = 1024, negative_prompt: str = "", max_sequence_length: int = 256,
                 shift: float | None = None):
        if (text_encoder_3 is None) != (tokenizer_3 is None):
            raise ValueError("text_encoder_3 and tokenizer_3: give both (T5 on) or neither (T5 off)")
        if not 1 <= max_sequence_length <= 512:
            raise ValueError(f"max_sequence_length must be in 1..512 (the pipeline's limit), got {max_sequence_length}")
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        multiple = self.vae_scale_factor * transformer.config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}: {height}x{width}")
        self.transformer, self.vae = transformer, vae
        self.text_encoders = [text_encoder, text_encoder_2]
        self.tokenizers = [tokenizer, tokenizer_2]
        self.text_encoder_3, self.tokenizer_3 = text_encoder_3, tokenizer_3
        self.scheduler_config = dict(scheduler_config)
        sd3_sigmas(1, self.scheduler_config)  # refuse unsupported scheduler options now
        self.height, self.width = height, width
        self.negative_prompt = negative_prompt
        self.max_sequence_length = max_sequence_length
        self.shift = shift
        for frozen in (vae, text_encoder, text_encoder_2, text_encoder_3):
            if frozen is not None:
                frozen.requires_grad_(False).eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", height: int = 1024, width: int = 1024,
                        transformer: torch.nn.Module | None = None, text_encoder_3: bool = True,
                        **kwargs: Any) -> "SD3Model":
        """Load a diffusers-layout SD3 directory with each component's own ``from_pretrained``.

        Subfolders: ``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``text_encoder_2``,
        ``tokenizer_2``, ``scheduler`` and optionally ``text_encoder_3`` / ``tokenizer_3`` (T5), read when
        ``text_encoder_3`` is true and the directory has them. ``transformer``: a network to use instead
        of the directory's (a trained one), which is then never read."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        path = str(path)
        if transformer is None:
            transformer = SD3Transformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype)
        encoders = [CLIPTextModelWithProjection.from_pretrained(path, subfolder=name, dtype=dtype)
                    for name in ("text_encoder", "text_encoder_2")]
        tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder=name) for name in ("tokenizer", "tokenizer_2")]
        t5 = t5_tokenizer = None
        if text_encoder_3 and (Path(path) / "text_encoder_3").is_dir():
            from transformers import T5EncoderModel, T5TokenizerFast

            t5 = T5EncoderModel.from_pretrained(path, subfolder="text_encoder_3", dtype=dtype).to(device)
            t5_tokenizer = T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_3")
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        return cls(transformer.to(device), vae.to(device), encoders[0].to(device), tokenizers[0],
                   encoders[1].to(device), tokenizers[1], dict(scheduler.config), text_encoder_3=t5,
                   tokenizer_3=t5_tokenizer, height=height, width=width, **kwargs)

    def with_transformer(self, transformer: torch.nn.Module) -> "SD3Model":
        """The same model (frozen VAE and encoders shared, not copied) around another transformer."""
        view = copy.copy(self)
        view.transformer = transformer
        return view

    def with_trainable(self, module: torch.nn.Module) -> "SD3Model":
        return self.with_transformer(module)

    def network(self) -> torch.nn.Module:
        """The diffusers transformer behind ``transformer`` (unwrapping DDP / DeepSpeed ``module`` and a
        LoRA adapter view's ``network``)."""
        return unwrap_network(self.transformer)

    @property
    def device(self) -> torch.device:
        return next(self.network().parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.network().parameters()).dtype

    # ------------------------------------------------------------------ shapes and schedule

    def latent_shape(self) -> tuple[int, ...]:
        f = self.vae_scale_factor
        return (self.network().config.in_channels, self.height // f, self.width // f)

    def image_tokens(self) -> int:
        """Tokens of one image in the transformer: its latent cut into patches."""
        _, h, w = self.latent_shape()
        p = self.network().config.patch_size
        return (h // p) * (w // p)

    def schedule(self, num_steps: int, shift: float = 1.0) -> torch.Tensor:
        """The pipeline's N + 1 sigmas. The ``shift`` argument is ignored: SD3's shift belongs to the
        weights (its scheduler config, or the model's ``shift`` override)."""
        return sd3_sigmas(num_steps, self.scheduler_config, self.image_tokens(), self.shift)

    def prepare_noise(self, batch_size: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Initial noise [B, C, h, w] drawn as the pipeline's ``prepare_latents`` draws it on the CPU."""
        return torch.randn((batch_size, *self.latent_shape()), generator=generator)

    # ------------------------------------------------------------------ VAE

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [0, 1] -> the transformer's latents [B, C, h, w] (the distribution's mode)."""
        pixels = (images * 2.0 - 1.0).to(self.device, self.vae.dtype)  # [B, 3, H, W]
        z = self.vae.encode(pixels).latent_dist.mode()  # [B, C, h, w]
        return (z - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, C, h, w] -> images [B, 3, H, W] in [0, 1], as the pipeline decodes them."""
        z = latents.to(self.device, self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        pixels = self.vae.decode(z, return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
        return (pixels.float() / 2.0 + 0.5).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ text encoders

    def _clip_states(self, index: int, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """CLIP encoder ``index``'s penultimate hidden states [B, L, D] and projected pooled vector [B, P]."""
        tokenizer, encoder = self.tokenizers[index], self.text_encoders[index]
        length = self.tokenizers[0].model_max_length  # the pipeline pads both to the first tokenizer's length
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids.to(encoder.device), output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _t5_states(self, prompts: list[str]) -> torch.Tensor:
        """T5's last hidden states [B, max_sequence_length, D5], or zeros of the joint width without T5."""
        if self.text_encoder_3 is None:
            joint = self.network().config.joint_attention_dim
            return torch.zeros(len(prompts), self.max_sequence_length, joint, device=self.device)
        ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length, truncation=True,
                               add_special_tokens=True, return_tensors="pt").input_ids
        return self.text_encoder_3(ids.to(self.text_encoder_3.device))[0]

    @torch.no_grad()
    def _encode_text(self, prompts: list[str]) -> Condition:
        first, pooled_1 = self._clip_states(0, prompts)
        second, pooled_2 = self._clip_states(1, prompts)
        t5 = self._t5_states(prompts).to(first.device)
        embeds = join_prompt_embeddings([first, second], t5)  # [B, L + L5, D5]
        pooled = torch.cat([pooled_1, pooled_2], dim=-1)  # [B, P]
        return Condition({"prompt_embeds": embeds.to(self.device, self.dtype),
                          "pooled_embeds": pooled.to(self.device, self.dtype)})

    def encode_prompts(self, prompts: list[str], sources: torch.Tensor | None = None) -> Condition:
        """Prompt embeddings [B, L, D] and pooled embeddings [B, P] as the pipeline's ``encode_prompt``
        (every prompt padded to the same length, so no mask)."""
        if sources is not None:
            raise ValueError("the sd3 family is text-to-image only: it takes no source images")
        return self._encode_text(list(prompts))

    def null_condition(self, cond: Condition) -> Condition:
        """The negative (empty) prompt's condition, repeated to ``cond``'s batch (same shapes)."""
        null = self._encode_text([self.negative_prompt])
        return Condition({k: v.expand(cond.batch_size, *v.shape[1:]) for k, v in null.tensors.items()})

    # ------------------------------------------------------------------ transformer

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        """Velocity [B, C, h, w] at latents ``x`` and sigmas ``t`` [B]; the transformer takes the 0..1000
        timestep (the scheduler's, kept in float32 whatever the model dtype, as in the pipeline)."""
        hidden = x.to(self.device, self.dtype)
        out = self.transformer(
            hidden_states=hidden,
            timestep=(t.float() * 1000.0).to(self.device),  # [B]
            encoder_hidden_states=cond.tensors["prompt_embeds"].to(hidden),  # [B, L, D]
            pooled_projections=cond.tensors["pooled_embeds"].to(hidden),  # [B, P]
            return_dict=False,
        )[0]  # [B, C, h, w]
        return out.to(x.device, x.dtype)


# --------------------------------------------------------------------------- the family

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


def _settings(config):
    """The ``model.sd3`` section, which an sd3 config must have."""
    s = getattr(config.model, "sd3", None)
    if s is None:
        raise ConfigError("model.sd3: required when model.family is sd3 (at least model.sd3.pretrained)")
    return s


def _artifact_transformer(directory: Path, config) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(str(directory / QWEN_TRANSFORMER),
                                                 torch_dtype=_DTYPES[_settings(config).dtype])


def _no_edit(task: str) -> None:
    if task != "t2i":
        raise CheckpointError(f"the sd3 family has no {task!r} task (Stable Diffusion 3 is text-to-image only)")


@register_family("sd3")
class SD3Family(ModelFamily):
    """Stable Diffusion 3 / 3.5 from published diffusers weights (``model.sd3``): the model artifact
    references them, RL trains the transformer. Text-to-image only; no judge (scored by reward models)."""

    from_pretrained = True
    prompt_files = True

    def owns(self, model):
        return isinstance(model, SD3Model)

    def pretrained_sources(self, config):
        return {"t2i": ("model.sd3.pretrained", _settings(config).pretrained)}

    def validate_pretrained(self, path, task):
        _no_edit(task)
        return validate_pretrained(path)

    def trainable_module(self, model):
        return model.transformer

    def load_policy(self, directory, config, task):
        _no_edit(task)
        s = _settings(config)
        path = pretrained_path(directory, "t2i")
        trained = _artifact_transformer(directory, config) if (directory / QWEN_TRANSFORMER).is_dir() else None
        return SD3Model.from_pretrained(path, dtype=_DTYPES[s.dtype], device=local_device(), height=s.height,
                                        width=s.width, transformer=trained, text_encoder_3=s.text_encoder_3,
                                        max_sequence_length=s.max_sequence_length, shift=s.shift)

    def check_policy(self, directory, config):
        pretrained_path(directory, "t2i")
        if (directory / QWEN_TRANSFORMER).is_dir() and not (directory / QWEN_TRANSFORMER / "config.json").is_file():
            raise CheckpointError(f"{directory / QWEN_TRANSFORMER}: no config.json (not a saved transformer)")

    def trained_state(self, directory, config, task):
        _no_edit(task)
        if (directory / QWEN_TRANSFORMER).is_dir():
            return _artifact_transformer(directory, config).state_dict()
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel.from_pretrained(pretrained_path(directory, "t2i"), subfolder="transformer",
                                                     torch_dtype=_DTYPES[_settings(config).dtype]).state_dict()

    def save_policy(self, model, directory, base_dir):
        save_referencing_policy(model, self.trainable_module(model), directory, base_dir)

    def load_task_views(self, directory, config):
        return {"t2i": self.load_policy(directory, config, "t2i")}  # no edit view: the family has no edit task

    def load_frozen_network(self, directory, config, task):
        _no_edit(task)
        if not (directory / QWEN_TRANSFORMER).is_dir():
            raise CheckpointError(f"{directory}: no trained {QWEN_TRANSFORMER}/ (not a GRPO or OPD artifact)")
        return _artifact_transformer(directory, config)

    def input_stamps(self, config):
        from flowrl.models.qwen_image import weights_fingerprint

        local = Path(_settings(config).pretrained).expanduser()
        return {"model.sd3.pretrained": weights_fingerprint(local)} if local.is_dir() else {}

    def model_key(self, config):
        return {"model": config.section_hash("model")}

    def image_size(self, config):
        s = _settings(config)
        return (s.height, s.width)

    def reward_request_images(self, config):
        return config.grpo.group_size  # one prompt group of large images per request, as for Qwen-Image

    def reward_server_kwargs(self, prompts_uri, spread):
        return {"prompts_uri": prompts_uri, **({"spread": True} if spread else {})}

    def check_config(self, config):
        from flowrl.config import pillar_sources

        s = _settings(config)
        if not s.pretrained:
            raise ConfigError("model.sd3.pretrained: required when model.family is sd3")
        for key in ("height", "width"):
            if getattr(s, key) % 16:
                raise ConfigError(f"model.sd3.{key}: expected a multiple of 16 (8x VAE, 2x2 patches), "
                                  f"got {getattr(s, key)}")
        if config.opd.t2i_fraction != 1.0:
            raise ConfigError(f"opd.t2i_fraction: the sd3 family is text-to-image only; set it to 1.0 "
                              f"(got {config.opd.t2i_fraction})")
        if not config.filter.t2i_prompts:
            raise ConfigError("filter.t2i_prompts: required when model.family is sd3 (the candidate prompt file)")
        if config.bench.scorer != "reward_models":
            raise ConfigError("bench.scorer: sd3 has no judge; set it to reward_models")
        if not config.bench.t2i_prompts:
            raise ConfigError("bench.t2i_prompts: required when model.family is sd3 (the bench prompt file)")
        pillar_sources(config.bench.scorers)
        if not config.grpo.monitor_reward:
            raise ConfigError("grpo.monitor_reward: required when model.family is sd3 (there is no judge: name the "
                              "held-out reward model that watches for hacking)")

    def memory_setting(self, config):
        return {"lora_rank": 0, "text_encoder_device": "same", "decode_batch": None,
                "monitor_batch": config.eval.batch_size}

    def planner_figures(self, config, per_rank, opd_rows):
        """The transformer, encoders and VAE counted from the weights' config files (built on the meta
        device), the image and text tokens of one row, and the decoding and scoring beside training."""
        from flowrl.planner import scorer_dtype, scorer_parameters

        s = _settings(config)
        g = config.grpo
        parts = sd3_components(s.pretrained, s.text_encoder_3)
        net = sd3_network(parts["transformer"])
        tc = parts["transformer"].config
        f = 2 ** (len(parts["vae"].config.block_out_channels) - 1)
        image = (s.height // (f * tc.patch_size)) * (s.width // (f * tc.patch_size))
        clip_length = 77  # CLIP's model_max_length, the pipeline's padded length
        text = clip_length + s.max_sequence_length
        encoders = [parts[n] for n in TEXT_ENCODERS if n in parts]
        widest = max(encoders, key=lambda m: m.config.hidden_size)
        scorer = scorer_parameters(config.reward_model.vlm_pretrained) if config.reward_model.vlm_pretrained else 0
        chunk = max(1, per_rank // g.reward_chunks) * g.group_size
        common = dict(network=net, dtype=s.dtype, image_tokens=image, text_tokens=text,
                      text_encoder=sum(_count(m) for m in encoders), vae=_count(parts["vae"]), scorer=scorer,
                      scorer_dtype=scorer_dtype(), pixels=s.height * s.width,
                      vae_base_dim=parts["vae"].config.block_out_channels[0], monitor_images=config.eval.batch_size,
                      encoder=(widest.config.num_hidden_layers, widest.config.hidden_size,
                               getattr(widest.config, "intermediate_size", 0) or widest.config.d_ff),
                      encode_tokens=max(clip_length, s.max_sequence_length))
        # the reward models the rank loads beside training: the T2I composite's learned scorers
        learned = sum(1 for component in config.rewards.t2i if component.scorer == "learned")
        colocated = 0 if g.reward_backend == "server" and g.reward_url is not None else learned
        monitors = 1 if g.monitor_reward else 0
        grpo = dict(decode_images=chunk, encode_rows=max(chunk, config.eval.batch_size), colocated_scorers=colocated,
                    monitor_scorers=monitors, no_grad_in_train=g.kl_coef > 0)
        opd = dict(encode_rows=max(opd_rows, config.eval.batch_size), monitor_scorers=monitors)
        return common, grpo, opd


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def sd3_components(pretrained: str, t5: bool = True) -> dict[str, torch.nn.Module]:
    """The transformer, VAE and text encoders of an SD3 weights directory built on the meta device from
    their config files alone (no weights read): what the planner counts. T5 when ``t5`` and present."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from flowrl.models.qwen_image_specs import component_configs

    required = ("transformer", "vae", "text_encoder", "text_encoder_2")
    try:
        configs = component_configs(pretrained, key="model.sd3.pretrained", required=required)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    with torch.device("meta"):
        parts = {"transformer": SD3Transformer2DModel.from_config(configs["transformer"]),
                 "vae": AutoencoderKL.from_config(configs["vae"])}
        for name in ("text_encoder", "text_encoder_2"):
            parts[name] = CLIPTextModelWithProjection(CLIPTextConfig(**_model_config(configs[name])))
        if t5 and "text_encoder_3" in configs:
            parts["text_encoder_3"] = T5EncoderModel(T5Config(**_model_config(configs["text_encoder_3"])))
    return parts


def _model_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def sd3_network(transformer: torch.nn.Module):
    """The planner's :class:`~flowrl.planner.Network` of an SD3 transformer: its tensors, and the block
    geometry its generic activation model takes (blocks, width = heads x head size, joint width)."""
    from flowrl.planner import Network

    c = transformer.config
    params = list(transformer.parameters())
    fan = width = 0
    for name, layer in transformer.named_modules():  # the attention projections LoRA would target
        if isinstance(layer, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            fan += layer.in_features + layer.out_features
            width = max(width, layer.in_features, layer.out_features)
    return Network(parameters=sum(p.numel() for p in params), tensors=len(params),
                   largest=max(p.numel() for p in params), layers=c.num_layers,
                   hidden=c.num_attention_heads * c.attention_head_dim, joint_dim=c.joint_attention_dim,
                   in_channels=c.in_channels, qwen=False, lora_fan=fan, lora_width=width)


def validate_pretrained(path: str | Path) -> dict[str, Any]:
    """Check a local SD3 weights directory without loading weights: the components the adapter reads
    exist and fit together (CLIP widths within the joint width, pooled width, latent channels).
    FileNotFoundError / ValueError name the component."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{path} is not a local directory")
    configs = {}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        file = root / name / ("scheduler_config.json" if name == "scheduler" else "config.json")
        if not file.is_file():
            raise FileNotFoundError(f"component {name!r}: missing {file}")
        configs[name] = json.loads(file.read_text())
    for name in ("tokenizer", "tokenizer_2"):
        if not (root / name / "tokenizer.json").is_file() and not all(
                (root / name / f).is_file() for f in ("vocab.json", "merges.txt")):
            raise FileNotFoundError(f"component {name!r}: missing tokenizer.json (or vocab.json + merges.txt) in "
                                    f"{root / name}")
    t, v = configs["transformer"], configs["vae"]
    clip = [configs[n].get("hidden_size", 0) for n in ("text_encoder", "text_encoder_2")]
    pooled = sum(configs[n].get("projection_dim", 0) for n in ("text_encoder", "text_encoder_2"))
    if sum(clip) > t.get("joint_attention_dim", 4096):
        raise ValueError(f"text encoders' widths {clip} exceed the transformer's joint_attention_dim")
    if pooled != t.get("pooled_projection_dim", 2048):
        raise ValueError(f"the CLIP projections ({pooled}) != the transformer's pooled_projection_dim")
    if v.get("latent_channels") != t.get("in_channels"):
        raise ValueError(f"vae latent_channels {v.get('latent_channels')} != transformer in_channels "
                         f"{t.get('in_channels')}")
    sd3_sigmas(1, configs["scheduler"])
    return {"path": str(root), "t5": (root / "text_encoder_3").is_dir(),
            "vae_scale_factor": 2 ** (len(v.get("block_out_channels", [0])) - 1),
            "patch_size": t.get("patch_size", 2)}
