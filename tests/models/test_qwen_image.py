"""The qwen_image adapter against diffusers' own Qwen-Image pipelines.

All on a tiny random checkpoint (tests/models/tiny_qwen_image.py) saved in the
production layout and loaded back with ``QwenImageModel.from_pretrained``.
Images are 32 x 64 (not square, so a swapped height/width shows up): 2 x 4
image tokens.

Adapter parity (docs/design.md, Invariants) is checked stage by stage: prompt
encoding, latent packing and noise, sigmas, VAE encode, the whole
deterministic sampling loop (with and without true CFG) and the VAE decode.
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImagePipeline
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from flowrl.models.base import Condition, FlowModel
from flowrl.models.qwen_image import (
    QwenImageModel,
    pack_latents,
    pad_condition,
    to_pil_images,
    unpack_latents,
    validate_pretrained,
)
from flowrl.sampling import sample
from tests.models.tiny_qwen_image import build_tiny_qwen_image

HEIGHT, WIDTH = 32, 64
STEPS = 4
TOL = 1e-4
T2I_PROMPTS = ["a red circle left of a blue square", "two green triangles"]
EDIT_PROMPTS = ["make the circle purple", "remove the square and add an orange triangle"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("tiny_qwen_image"), task="edit")


@pytest.fixture(scope="session")
def t2i(tiny_dir):
    return QwenImageModel.from_pretrained(tiny_dir, task="t2i", height=HEIGHT, width=WIDTH)


@pytest.fixture(scope="session")
def edit(tiny_dir):
    return QwenImageModel.from_pretrained(tiny_dir, task="edit", height=HEIGHT, width=WIDTH)


@pytest.fixture(scope="session")
def sources():
    """Edit sources on the 8-bit grid, so the pipeline's PIL input is lossless."""
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 3, HEIGHT, WIDTH), generator=generator).float() / 255


def make_pipeline(model: QwenImageModel, tiny_dir, processor=None):
    """diffusers' pipeline over the adapter's very modules (same weights)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_dir, subfolder="scheduler")
    parts = dict(
        scheduler=scheduler,
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        transformer=model.transformer,
    )
    if model.task == "t2i":
        pipe = QwenImagePipeline(**parts)
    else:
        pipe = QwenImageEditPipeline(processor=processor, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def source_size_as_is(monkeypatch):
    """The edit pipeline resizes its source to ~1024^2 pixels of area (fixed in
    its code); make it keep the tiny size, which is what the adapter does."""
    monkeypatch.setattr(
        pipeline_qwenimage_edit, "calculate_dimensions", lambda area, ratio: (WIDTH, HEIGHT, None)
    )


def qwen_vl_processor(model: QwenImageModel, monkeypatch):
    """transformers' real Qwen2_5_VLProcessor with the PIL image processor.

    Its constructor insists on a video processor class, which needs torchvision
    (broken here); images never touch it, so skip that type check.
    """
    from transformers import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    monkeypatch.setattr(
        ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None
    )
    return Qwen2_5_VLProcessor(
        image_processor=model.image_processor, tokenizer=model.tokenizer, video_processor=None
    )


def natural(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Trim padding shared by the whole batch; mask None when all valid, as the
    pipelines' encode_prompt returns them."""
    length = int(mask.sum(dim=1).max())
    embeds, mask = embeds[:, :length], mask[:, :length]
    return embeds, (None if mask.all() else mask)


def assert_same_prompt(
    ours: Condition, ref_embeds: torch.Tensor, ref_mask: torch.Tensor | None
) -> float:
    """Our (possibly longer) padded embeddings equal the pipeline's on its
    length and are masked zeros beyond it. Returns max |diff|."""
    embeds, mask = ours.tensors["prompt_embeds"], ours.tensors["prompt_mask"]
    length = ref_embeds.shape[1]
    ref_mask = torch.ones(ref_embeds.shape[:2], dtype=torch.long) if ref_mask is None else ref_mask
    assert torch.equal(mask[:, :length], ref_mask)
    assert not mask[:, length:].any() and not embeds[:, length:].any()
    diff = (embeds[:, :length] - ref_embeds).abs().max().item()
    assert diff < 1e-5, diff
    return diff


# --------------------------------------------------------------------------- protocol and loading


def test_adapter_is_a_flow_model(t2i, edit):
    assert isinstance(t2i, FlowModel) and isinstance(edit, FlowModel)
    assert t2i.latent_shape() == (2 * 4, 64)
    assert t2i.cfg_renorm_dim == -1


def test_templates_and_dropped_prefix_match_diffusers(t2i, edit, tiny_dir):
    pipe, edit_pipe = make_pipeline(t2i, tiny_dir), make_pipeline(edit, tiny_dir)
    assert t2i.template == pipe.prompt_template_encode
    assert edit.template == edit_pipe.prompt_template_encode
    # Counted from the tokenizer: equal to diffusers' constants because the tiny
    # tokenizer, like Qwen's, has one token per template word.
    assert t2i.prompt_drop_index == pipe.prompt_template_encode_start_idx == 34
    assert edit.prompt_drop_index == edit_pipe.prompt_template_encode_start_idx == 64


def test_validate_pretrained_summarises_without_loading(tiny_dir, t2i):
    summary = validate_pretrained(tiny_dir)
    assert summary["task"] == "edit" and summary["pipeline_class"] == "QwenImageEditPipeline"
    assert summary["latent_channels"] == 16 and summary["packed_channels"] == 64
    assert summary["vae_scale_factor"] == 8
    transformer = summary["components"]["transformer"]
    assert transformer["class"] == "QwenImageTransformer2DModel"
    assert transformer["num_parameters"] == sum(p.numel() for p in t2i.transformer.parameters())
    assert summary["components"]["text_encoder"]["num_parameters"] == sum(
        p.numel() for p in t2i.text_encoder.parameters()
    )


@pytest.mark.parametrize(
    "remove, message",
    [
        ("transformer", "missing component 'transformer'"),
        ("vae/diffusion_pytorch_model.safetensors", "component 'vae': no weights"),
        ("text_encoder", "missing component 'text_encoder'"),
        ("tokenizer/tokenizer.json", "component 'tokenizer'"),
        ("scheduler/scheduler_config.json", "component 'scheduler': missing scheduler_config.json"),
        ("processor", "missing component 'processor'"),
    ],
)
def test_validate_pretrained_names_the_missing_component(tiny_dir, tmp_path, remove, message):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    target = copy / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=message):
        validate_pretrained(copy)


def test_validate_pretrained_t2i_needs_no_processor(tiny_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy, ignore=shutil.ignore_patterns("processor"))
    assert validate_pretrained(copy, task="t2i")["task"] == "t2i"


# --------------------------------------------------------------------------- stage by stage


def test_encode_prompts_matches_pipeline_t2i(t2i, tiny_dir):
    pipe = make_pipeline(t2i, tiny_dir)
    cond = t2i.encode_prompts(T2I_PROMPTS)
    assert_same_prompt(cond, *pipe.encode_prompt(T2I_PROMPTS))
    null = t2i.null_condition(cond)
    assert null.tensors["prompt_embeds"].shape == cond.tensors["prompt_embeds"].shape
    assert_same_prompt(null, *pipe.encode_prompt([" ", " "]))


def test_encode_prompts_matches_pipeline_edit(edit, tiny_dir, sources, monkeypatch):
    """The edit pipeline's encode_prompt with transformers' real processor.

    diffusers 0.42.1 does not pass ``mm_token_type_ids`` to Qwen2.5-VL, so on
    transformers 5 its image tokens get 1-D positions: the adapter matches
    that with ``mrope_image_positions=False``, and its default (3-D M-RoPE
    positions, as Qwen2.5-VL computes them) matches the pipeline once that
    input is forwarded.
    """
    pipe = make_pipeline(edit, tiny_dir, processor=qwen_vl_processor(edit, monkeypatch))
    images = to_pil_images(sources)
    flat = QwenImageModel(
        edit.transformer, edit.vae, edit.text_encoder, edit.tokenizer, edit.scheduler_config,
        task="edit", height=HEIGHT, width=WIDTH, image_processor=edit.image_processor,
        mrope_image_positions=False,
    )
    flat_ref = pipe.encode_prompt(EDIT_PROMPTS, image=images)
    assert_same_prompt(flat.encode_prompts(EDIT_PROMPTS, sources), *flat_ref)

    cond = edit.encode_prompts(EDIT_PROMPTS, sources)
    null = edit.null_condition(cond)
    encoder, forward = edit.text_encoder, edit.text_encoder.forward
    image_id = encoder.config.image_token_id

    def forward_with_token_types(input_ids, **kwargs):
        token_types = (input_ids == image_id).int()
        return forward(input_ids=input_ids, mm_token_type_ids=token_types, **kwargs)

    monkeypatch.setattr(encoder, "forward", forward_with_token_types)
    assert_same_prompt(cond, *pipe.encode_prompt(EDIT_PROMPTS, image=images))
    assert_same_prompt(null, *pipe.encode_prompt([" ", " "], image=images))
    length = flat_ref[0].shape[1]
    assert (cond.tensors["prompt_embeds"][:, :length] - flat_ref[0]).abs().max() > 1e-3


def test_packing_and_noise_match_pipeline(t2i, tiny_dir):
    pipe = make_pipeline(t2i, tiny_dir)
    latents = torch.randn(2, 16, 4, 8)
    packed = pack_latents(latents)
    assert torch.equal(packed, QwenImagePipeline._pack_latents(latents, 2, 16, 4, 8))
    assert torch.equal(unpack_latents(packed, 4, 8), latents)
    generator = torch.Generator().manual_seed(3)
    ref = pipe.prepare_latents(2, 16, HEIGHT, WIDTH, torch.float32, "cpu", generator)
    assert torch.equal(t2i.prepare_noise(2, torch.Generator().manual_seed(3)), ref)


@pytest.mark.parametrize(
    "steps, size", [(2, (32, 64)), (4, (32, 64)), (28, (1024, 1024)), (50, (928, 1664))]
)
def test_schedule_matches_scheduler(tiny_dir, t2i, steps, size):
    model = QwenImageModel(
        t2i.transformer, t2i.vae, t2i.text_encoder, t2i.tokenizer, t2i.scheduler_config,
        height=size[0], width=size[1],
    )
    pipe = make_pipeline(model, tiny_dir)
    sigmas = model.schedule(steps)
    # What QwenImagePipeline.__call__ does before its loop.
    cfg = pipe.scheduler.config
    mu = calculate_shift(
        model.latent_shape()[0],
        cfg.base_image_seq_len,
        cfg.max_image_seq_len,
        cfg.base_shift,
        cfg.max_shift,
    )
    pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    torch.testing.assert_close(sigmas, pipe.scheduler.sigmas, rtol=0, atol=1e-6)
    if steps > 1:
        assert sigmas[-2].item() == pytest.approx(0.02)  # Qwen-Image's shift_terminal


def test_one_step_schedule_is_finite(t2i):
    """diffusers' shift_terminal stretch divides 0 by 0 for one step (NaN sigmas);
    the adapter keeps the plain [1, 0]."""
    assert t2i.schedule(1).tolist() == [1.0, 0.0]


def test_encode_images_matches_pipeline_source_latents(edit, tiny_dir, sources):
    pipe = make_pipeline(edit, tiny_dir)
    pixels = (sources * 2 - 1).unsqueeze(2)  # what the pipeline's preprocess + unsqueeze give
    _, ref = pipe.prepare_latents(pixels, 2, 16, HEIGHT, WIDTH, torch.float32, "cpu", None)
    torch.testing.assert_close(edit.encode_images(sources), ref, rtol=0, atol=1e-6)


def test_padding_the_prompt_leaves_velocity_unchanged(t2i):
    cond = t2i.encode_prompts(T2I_PROMPTS)
    x, t = torch.randn(2, *t2i.latent_shape()), torch.tensor([0.9, 0.3])
    with torch.no_grad():
        ref = t2i.velocity(x, t, cond)
        padded = t2i.velocity(x, t, pad_condition(cond, cond.tensors["prompt_mask"].shape[1] + 5))
    torch.testing.assert_close(padded, ref, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- the loop


def run_adapter(model: QwenImageModel, cond: Condition, scale: float, seed: int) -> torch.Tensor:
    """flowrl's deterministic sampler, CFG batched with the pipelines' renorm."""
    trajectory = sample(
        model,
        cond,
        model.schedule(STEPS),
        null_cond=model.null_condition(cond) if scale > 1 else None,
        guidance_scale=scale,
        renorm_dim=model.cfg_renorm_dim,
        initial_noise=model.prepare_noise(cond.batch_size, torch.Generator().manual_seed(seed)),
    )
    return trajectory.final


def pipeline_embeds(model: QwenImageModel, cond: Condition, scale: float) -> dict:
    """The adapter's embeddings in the form the pipeline's encode_prompt gives."""
    embeds, mask = natural(cond.tensors["prompt_embeds"], cond.tensors["prompt_mask"])
    kwargs = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, true_cfg_scale=scale)
    if scale > 1:
        null = model.null_condition(cond)
        kwargs["negative_prompt_embeds"], kwargs["negative_prompt_embeds_mask"] = natural(
            null.tensors["prompt_embeds"], null.tensors["prompt_mask"]
        )
    return kwargs


@pytest.mark.parametrize("scale", [4.0, 1.0])
def test_sampler_matches_qwen_image_pipeline(t2i, tiny_dir, scale):
    cond = t2i.encode_prompts(T2I_PROMPTS)
    ours = run_adapter(t2i, cond, scale, seed=7)
    ref = make_pipeline(t2i, tiny_dir)(
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
        **pipeline_embeds(t2i, cond, scale),
    ).images
    diff = (ours - ref).abs().max().item()
    print(f"t2i parity, true_cfg_scale={scale}: max |diff| = {diff:.2e}")
    assert diff < TOL


@pytest.mark.parametrize("scale", [4.0, 1.0])
def test_sampler_matches_qwen_image_edit_pipeline(
    edit, tiny_dir, sources, source_size_as_is, scale
):
    cond = edit.encode_prompts(EDIT_PROMPTS, sources)
    ours = run_adapter(edit, cond, scale, seed=11)
    ref = make_pipeline(edit, tiny_dir)(
        image=to_pil_images(sources),
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(11),
        output_type="latent",
        **pipeline_embeds(edit, cond, scale),
    ).images
    diff = (ours - ref).abs().max().item()
    print(f"edit parity, true_cfg_scale={scale}: max |diff| = {diff:.2e}")
    assert diff < TOL


def test_parity_is_not_vacuous(t2i, edit, sources):
    """Guidance and the edit source move the tiny model's latents by far more
    than the parity tolerance, so the comparisons above do test them."""
    cond = t2i.encode_prompts(T2I_PROMPTS)
    assert (run_adapter(t2i, cond, 4.0, 7) - run_adapter(t2i, cond, 1.0, 7)).abs().max() > 100 * TOL
    cond = edit.encode_prompts(EDIT_PROMPTS, sources)
    no_source = torch.zeros_like(cond.tensors["source_latents"])
    blank = Condition({**cond.tensors, "source_latents": no_source})
    moved = run_adapter(edit, cond, 1.0, 7) - run_adapter(edit, blank, 1.0, 7)
    assert moved.abs().max() > 100 * TOL


def test_decode_matches_pipeline(t2i, tiny_dir):
    cond = t2i.encode_prompts(T2I_PROMPTS)
    images = t2i.decode_latents(run_adapter(t2i, cond, 4.0, seed=5))
    ref = make_pipeline(t2i, tiny_dir)(
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(5),
        output_type="pt",
        **pipeline_embeds(t2i, cond, 4.0),
    ).images
    diff = (images - ref).abs().max().item()
    print(f"decode parity: max |diff| = {diff:.2e}")
    assert images.shape == (2, 3, HEIGHT, WIDTH) and diff < TOL


# --------------------------------------------------------------------------- plain sampling runs


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_sde_sampling_with_cfg_runs(task, t2i, edit, sources):
    model = t2i if task == "t2i" else edit
    if task == "t2i":
        cond = model.encode_prompts(T2I_PROMPTS)
    else:
        cond = model.encode_prompts(EDIT_PROMPTS, sources)
    trajectory = sample(
        model,
        cond,
        model.schedule(3),
        null_cond=model.null_condition(cond),
        guidance_scale=4.0,
        renorm_dim=model.cfg_renorm_dim,
        noise_level=0.7,
        generator=torch.Generator().manual_seed(0),
    )
    assert trajectory.states.shape == (2, 4, *model.latent_shape())
    assert torch.isfinite(trajectory.states).all()
    assert torch.isfinite(trajectory.log_probs).all()
    assert torch.isfinite(trajectory.cond_log_probs).all()
    images = model.decode_latents(trajectory.final)
    assert images.shape == (2, 3, HEIGHT, WIDTH)
    assert images.min() >= 0 and images.max() <= 1


def test_bfloat16_weights_take_float32_latents(tiny_dir, sources):
    model = QwenImageModel.from_pretrained(
        tiny_dir, task="edit", dtype=torch.bfloat16, height=HEIGHT, width=WIDTH
    )
    cond = model.encode_prompts(EDIT_PROMPTS, sources)
    assert cond.tensors["prompt_embeds"].dtype == torch.bfloat16
    with torch.no_grad():
        v = model.velocity(torch.randn(2, *model.latent_shape()), torch.tensor([1.0, 0.5]), cond)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_wrong_inputs_are_rejected(t2i, edit, sources):
    with pytest.raises(ValueError, match="sources must be None"):
        t2i.encode_prompts(["a"], sources[:1])
    with pytest.raises(ValueError, match="sources must be given"):
        edit.encode_prompts(["a"])
    with pytest.raises(ValueError, match="multiples of 16"):
        QwenImageModel(
            t2i.transformer, t2i.vae, t2i.text_encoder, t2i.tokenizer, {}, height=40, width=64
        )


def test_unsupported_scheduler_options_are_refused():
    from flowrl.models.qwen_image import qwen_image_sigmas

    with pytest.raises(ValueError, match="does not support: \\['use_karras_sigmas'\\]"):
        qwen_image_sigmas(4, 8, {"use_karras_sigmas": True})
