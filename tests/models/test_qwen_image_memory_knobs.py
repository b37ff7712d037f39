"""Memory knobs of the qwen_image family: ``model.qwen_image.decode_batch`` (the VAE works
on at most that many images per call) and ``model.qwen_image.text_encoder_device: offload``
(the text encoder lives in host memory and visits the transformer's device per encoding).

Both must leave results unchanged; on the CPU the host and compute devices coincide, so the
offload tests make the move to the compute device observable by turning it into a copy.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from flowrl.config import ConfigError, FlowRLConfig, QwenImageModelConfig, _hash_payload, from_dict
from flowrl.models.qwen_image import QwenImageModel, module_tensors, set_module_tensors
from flowrl.stages.policy import place_text_encoders
from tests.models.tiny_qwen_image import build_tiny_qwen_image

HEIGHT, WIDTH = 32, 64
PROMPTS = ["a red circle left of a blue square", "two green triangles", "make the circle purple"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_qwen_image(tmp_path_factory.mktemp("tiny_qwen_image_knobs"), task="edit")


@pytest.fixture(scope="module")
def t2i(tiny_dir):
    return QwenImageModel.from_pretrained(tiny_dir, task="t2i", height=HEIGHT, width=WIDTH)


@pytest.fixture(scope="module")
def edit(tiny_dir):
    return QwenImageModel.from_pretrained(tiny_dir, task="edit", height=HEIGHT, width=WIDTH)


@pytest.fixture
def sources():
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (3, 3, HEIGHT, WIDTH), generator=generator).float() / 255


def record_vae_batches(monkeypatch, model: QwenImageModel) -> list[tuple[str, int]]:
    """Wrap the VAE's encode and decode on this instance to record the batch size of each call."""
    calls: list[tuple[str, int]] = []
    for name in ("encode", "decode"):
        original = getattr(model.vae, name)

        def wrapped(x, *args, _original=original, _name=name, **kwargs):
            calls.append((_name, x.shape[0]))
            return _original(x, *args, **kwargs)

        monkeypatch.setattr(model.vae, name, wrapped)
    return calls


# --------------------------------------------------------------------------- decode_batch


@pytest.mark.parametrize("decode_batch", [1, 2])
def test_decode_batch_gives_the_same_images_in_smaller_vae_calls(t2i, monkeypatch, decode_batch):
    latents = torch.randn(5, *t2i.latent_shape(), generator=torch.Generator().manual_seed(0))
    calls = record_vae_batches(monkeypatch, t2i)
    whole = t2i.decode_latents(latents)
    assert calls == [("decode", 5)]
    chunked_model = t2i.with_transformer(t2i.transformer)
    chunked_model.decode_batch = decode_batch
    calls.clear()
    chunked = chunked_model.decode_latents(latents)
    sizes = [size for _, size in calls]
    assert sum(sizes) == 5 and max(sizes) <= decode_batch and len(sizes) == -(-5 // decode_batch)
    assert chunked.shape == whole.shape == (5, 3, HEIGHT, WIDTH)
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-6), (chunked - whole).abs().max()
    assert whole.std() > 0.01  # not a constant image that any split reproduces


def test_decode_batch_bounds_the_source_encoding(edit, monkeypatch, sources):
    calls = record_vae_batches(monkeypatch, edit)
    whole = edit.encode_images(sources)
    chunked_model = edit.with_transformer(edit.transformer)
    chunked_model.decode_batch = 2
    chunked = chunked_model.encode_images(sources)
    assert calls == [("encode", 3), ("encode", 2), ("encode", 1)]
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-6), (chunked - whole).abs().max()


def test_decode_batch_none_or_covering_the_batch_is_one_call(t2i, monkeypatch):
    latents = torch.randn(3, *t2i.latent_shape(), generator=torch.Generator().manual_seed(1))
    calls = record_vae_batches(monkeypatch, t2i)
    view = t2i.with_transformer(t2i.transformer)
    for setting in (None, 3, 8):
        view.decode_batch = setting
        view.decode_latents(latents)
    assert calls == [("decode", 3)] * 3


def test_decode_batch_reaches_the_model_and_is_validated(tiny_dir, t2i):
    model = QwenImageModel.from_pretrained(tiny_dir, task="t2i", height=HEIGHT, width=WIDTH, transformer=t2i.transformer,
                                           vae=t2i.vae, text_encoder=t2i.text_encoder, tokenizer=t2i.tokenizer,
                                           decode_batch=2)
    assert model.decode_batch == 2 and model.with_transformer(model.transformer).decode_batch == 2
    with pytest.raises(ValueError, match="decode_batch"):
        QwenImageModel(t2i.transformer, t2i.vae, t2i.text_encoder, t2i.tokenizer, t2i.scheduler_config,
                       height=HEIGHT, width=WIDTH, decode_batch=0)


def with_qwen(config: FlowRLConfig, **change) -> FlowRLConfig:
    return dataclasses.replace(config, model=dataclasses.replace(
        config.model, qwen_image=dataclasses.replace(config.model.qwen_image, **change)))


def test_config_keys_are_opt_in():
    q = QwenImageModelConfig()
    assert q.decode_batch is None and q.text_encoder_device == "same"
    # at their defaults the keys are not part of the section's hash, so earlier results stay valid
    assert not {"decode_batch", "text_encoder_device"} & _hash_payload(q).keys()
    plain = FlowRLConfig()
    for change in (dict(decode_batch=1), dict(text_encoder_device="offload")):
        assert with_qwen(plain, **change).section_hash("model") != plain.section_hash("model")
    read = from_dict(QwenImageModelConfig, {"decode_batch": 2, "text_encoder_device": "offload"}, "model.qwen_image.")
    assert read.decode_batch == 2 and read.text_encoder_device == "offload"
    for bad, key in (({"decode_batch": 0}, "decode_batch"), ({"text_encoder_device": "gpu"}, "text_encoder_device")):
        with pytest.raises(ConfigError, match=f"model.qwen_image.{key}"):
            from_dict(QwenImageModelConfig, bad, "model.qwen_image.")


# --------------------------------------------------------------------------- text_encoder_device: offload


def fresh_view(model: QwenImageModel, tiny_dir) -> QwenImageModel:
    """A view of ``model``'s pipeline with its own text encoder (moving it leaves the fixture's alone)."""
    encoder = type(model.text_encoder).from_pretrained(str(tiny_dir / "text_encoder"))
    return QwenImageModel.from_pretrained(tiny_dir, task=model.task, height=HEIGHT, width=WIDTH,
                                          transformer=model.transformer, vae=model.vae, text_encoder=encoder,
                                          tokenizer=model.tokenizer)


def watch_encoder(monkeypatch, encoder: torch.nn.Module) -> dict[str, list]:
    """Make each ``encoder.to`` a copy (as a move to another device is) and record its calls, and
    record the weights the encoder's forward sees (the first parameter's storage)."""
    seen: dict[str, list] = {"to": [], "forward": []}
    original_to = encoder.to

    def copying_to(*args, **kwargs):
        seen["to"].append(args[0] if args else kwargs.get("device"))
        result = original_to(*args, **kwargs)
        set_module_tensors(encoder, {n: t.clone() for n, t in module_tensors(encoder).items()})
        return result

    monkeypatch.setattr(encoder, "to", copying_to)
    encoder.register_forward_pre_hook(
        lambda module, args: seen["forward"].append(next(module.parameters()).data_ptr()))
    return seen


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_offloaded_text_encoder_visits_the_compute_device_and_gives_the_same_embeddings(
        task, t2i, edit, tiny_dir, sources, monkeypatch):
    base = t2i if task == "t2i" else edit
    src = sources if task == "edit" else None
    reference = base.encode_prompts(PROMPTS, src)
    null_reference = base.null_condition(reference)

    model = fresh_view(base, tiny_dir)
    model.move_text_encoder("cpu", offload=True)
    assert model.text_encoder_offloaded and model.text_encoder_device == model.device
    home = {n: t.data_ptr() for n, t in module_tensors(model.text_encoder).items()}
    seen = watch_encoder(monkeypatch, model.text_encoder)
    cond = model.encode_prompts(PROMPTS, src)
    null = model.null_condition(cond)

    calls = 2  # the prompts and the negative prompt
    assert seen["to"] == [model.device] * calls
    # every forward ran on the copy made for it, never on the home weights
    assert len(seen["forward"]) == calls and not set(seen["forward"]) & set(home.values())
    # between calls the encoder holds its home weights again, aliases included
    assert {n: t.data_ptr() for n, t in module_tensors(model.text_encoder).items()} == home
    for ours, theirs in ((cond, reference), (null, null_reference)):
        assert ours.tensors.keys() == theirs.tensors.keys()
        for key in ours.tensors:
            assert torch.equal(ours.tensors[key], theirs.tensors[key]), key


def test_offload_puts_the_home_weights_back_after_a_failed_call(t2i, tiny_dir, monkeypatch):
    model = fresh_view(t2i, tiny_dir)
    model.move_text_encoder("cpu", offload=True)
    home = {n: t.data_ptr() for n, t in module_tensors(model.text_encoder).items()}
    watch_encoder(monkeypatch, model.text_encoder)

    def fail(module, args):
        raise RuntimeError("out of memory")

    handle = model.text_encoder.register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        model.encode_prompts(PROMPTS[:1])
    handle.remove()
    assert {n: t.data_ptr() for n, t in module_tensors(model.text_encoder).items()} == home


def test_without_offload_the_encoder_is_not_moved_per_call(t2i, tiny_dir, monkeypatch):
    model = fresh_view(t2i, tiny_dir)
    model.move_text_encoder("cpu")
    assert not model.text_encoder_offloaded
    seen = watch_encoder(monkeypatch, model.text_encoder)
    model.encode_prompts(PROMPTS[:1])
    assert seen["to"] == []


@pytest.mark.parametrize("setting, offloaded", [("same", False), ("cpu", False), ("offload", True)])
def test_place_text_encoders_follows_the_config(t2i, tiny_dir, setting, offloaded):
    config = with_qwen(FlowRLConfig(), text_encoder_device=setting)
    views = [fresh_view(t2i, tiny_dir)]
    views.append(views[0].with_transformer(views[0].transformer))  # a second view sharing the encoder
    place_text_encoders(config, views)
    assert [v.text_encoder_offloaded for v in views] == [offloaded] * 2
    later = views[0].with_transformer(views[0].transformer)  # views made after placement inherit it
    assert later.text_encoder_offloaded == offloaded


def test_from_pretrained_offload(tiny_dir, t2i):
    model = QwenImageModel.from_pretrained(tiny_dir, task="t2i", height=HEIGHT, width=WIDTH,
                                           transformer=t2i.transformer, text_encoder_device="offload")
    assert model.text_encoder_offloaded
    assert next(model.text_encoder.parameters()).device.type == "cpu"
    same = QwenImageModel.from_pretrained(tiny_dir, task="t2i", height=HEIGHT, width=WIDTH,
                                          transformer=t2i.transformer, text_encoder_device="same")
    assert not same.text_encoder_offloaded


@pytest.mark.gpu  # make test-gpu
def test_offload_on_cuda(tiny_dir):
    model = QwenImageModel.from_pretrained(tiny_dir, task="edit", height=HEIGHT, width=WIDTH, device="cuda")
    sources = torch.rand(2, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(0))
    reference = model.encode_prompts(PROMPTS[:2], sources)
    model.move_text_encoder("cpu", offload=True)
    assert all(t.device.type == "cpu" for t in module_tensors(model.text_encoder).values())
    devices = []
    model.text_encoder.register_forward_pre_hook(
        lambda module, args: devices.append({t.device.type for t in module_tensors(module).values()}))
    before = torch.cuda.memory_allocated()
    cond = model.encode_prompts(PROMPTS[:2], sources)
    assert devices == [{"cuda"}]
    assert all(t.device.type == "cpu" for t in module_tensors(model.text_encoder).values())
    assert torch.cuda.memory_allocated() - before < 1 << 20  # only the (tiny) embeddings stay
    for key in reference.tensors:
        assert torch.allclose(cond.tensors[key].float(), reference.tensors[key].float(), atol=1e-5), key


@pytest.mark.parametrize("task", ["t2i", "edit"])
def test_the_text_encoders_language_head_runs_on_the_last_position_only(t2i, edit, sources, task):
    """Prompt embeddings are hidden states: the vocabulary logits of every token (9 GB for a GRPO chunk at
    1024 x 1024) are never computed."""
    model = t2i if task == "t2i" else edit
    seen = []
    hook = model.text_encoder.lm_head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    try:
        model.encode_prompts(["a red square", "two blue circles in a row"], sources[:2] if task == "edit" else None)
    finally:
        hook.remove()
    assert seen and all(shape[1] == 1 for shape in seen), seen
