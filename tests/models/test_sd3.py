"""The sd3 family on tiny random Stable Diffusion 3 components: the adapter against diffusers'
``StableDiffusion3Pipeline`` (schedule, prompt encoding, the whole ODE sampler with and without CFG,
decoding), the rollout/training consistency (ratio 1 before any update), and the family behind the
registry (artifacts, config rules, planner figures)."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from flowrl.config import ConfigError, load_config
from flowrl.models import QWEN_REFERENCE, CheckpointError, load_policy, save_policy, trainable_module, trained_state
from flowrl.models.base import FlowModel
from flowrl.models.families import family_names, family_of, family_of_model
from flowrl.models.qwen_image import weights_fingerprint
from flowrl.models.sd3 import SD3Family, SD3Model, sd3_components, sd3_sigmas, validate_pretrained
from flowrl.sampling import gaussian_log_prob, sample, sde_step_mean
from tests.models.tiny_sd3 import SCHEDULER_CONFIG, T5_LENGTH, build_tiny_sd3, pipeline_of

ROOT = Path(__file__).resolve().parents[2]
SIZE = 32
TOL = 1e-4
PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny_sd3"))


def _model(tiny_dir, **kwargs) -> SD3Model:
    return SD3Model.from_pretrained(tiny_dir, height=SIZE, width=SIZE, max_sequence_length=T5_LENGTH, **kwargs)


@pytest.fixture(scope="module")
def model(tiny_dir):
    return _model(tiny_dir)


def sd3_config(tiny_dir, **sd3):
    """configs/sd3_tiny.yaml on the tiny weights."""
    config = load_config(ROOT / "configs" / "sd3_tiny.yaml", [f"model.sd3.pretrained={tiny_dir}"])
    return dataclasses.replace(config, model=dataclasses.replace(
        config.model, sd3=dataclasses.replace(config.model.sd3, **sd3)))


def test_an_sd3_config_needs_its_weights():
    with pytest.raises(ConfigError, match="model.sd3.pretrained: required"):
        load_config(ROOT / "configs" / "sd3_tiny.yaml", ['model.sd3.pretrained=""'])


# --------------------------------------------------------------------------- against the pipeline


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("scheduler", [SCHEDULER_CONFIG, {"shift": 1.0},
                                       {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.16}])
def test_schedule_matches_the_scheduler(steps, scheduler):
    reference = FlowMatchEulerDiscreteScheduler(**scheduler)
    kwargs = {}
    if scheduler.get("use_dynamic_shifting"):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        kwargs["mu"] = calculate_shift(64, 256, 4096, 0.5, 1.16)
    reference.set_timesteps(steps, **kwargs)
    ours = sd3_sigmas(steps, dict(reference.config), image_seq_len=64)
    torch.testing.assert_close(ours, reference.sigmas, rtol=0, atol=1e-7)
    assert ours[0] == 1.0 and ours[-1] == 0.0


def test_unsupported_scheduler_options_are_refused():
    with pytest.raises(ValueError, match="shift_terminal"):
        sd3_sigmas(4, {"shift": 3.0, "shift_terminal": 0.02})


def test_adapter_is_a_flow_model(model):
    assert isinstance(model, FlowModel)
    assert model.latent_shape() == (16, SIZE // 8, SIZE // 8) and model.image_tokens() == 4
    assert model.cfg_renorm_dim is None


def test_encode_prompts_matches_pipeline(model):
    pipe = pipeline_of(model)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        PROMPTS, None, None, do_classifier_free_guidance=True, max_sequence_length=T5_LENGTH, device="cpu")
    cond = model.encode_prompts(PROMPTS)
    null = model.null_condition(cond)
    assert cond.tensors["prompt_embeds"].shape == (2, 12 + T5_LENGTH, 64)
    torch.testing.assert_close(cond.tensors["prompt_embeds"], embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(cond.tensors["pooled_embeds"], pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(null.tensors["prompt_embeds"], negative, rtol=0, atol=1e-6)
    torch.testing.assert_close(null.tensors["pooled_embeds"], negative_pooled, rtol=0, atol=1e-6)


def _ours_and_pipelines(model, scale, steps=4):
    noise = model.prepare_noise(len(PROMPTS), torch.Generator().manual_seed(7))
    cond = model.encode_prompts(PROMPTS)
    traj = sample(model, cond, model.schedule(steps), null_cond=model.null_condition(cond), guidance_scale=scale,
                  renorm_dim=model.cfg_renorm_dim, initial_noise=noise)
    with torch.no_grad():
        ref = pipeline_of(model)(PROMPTS, num_inference_steps=steps, guidance_scale=scale, latents=noise.clone(),
                                 output_type="latent", max_sequence_length=T5_LENGTH).images
    return noise, traj.final, ref


@pytest.mark.parametrize("scale", [1.0, 4.5])
@pytest.mark.parametrize("shift", [None, 1.5])
def test_sampler_matches_the_sd3_pipeline(tiny_dir, model, scale, shift):
    model = model if shift is None else _model(tiny_dir, shift=shift)
    _, ours, ref = _ours_and_pipelines(model, scale)
    assert (ours - ref).abs().max() < TOL


def test_parity_is_not_vacuous(model):
    noise, guided, _ = _ours_and_pipelines(model, 4.5)
    _, plain, _ = _ours_and_pipelines(model, 1.0)
    assert (guided - noise).abs().max() > 100 * TOL  # the sampler moved
    assert (guided - plain).abs().max() > 100 * TOL  # and CFG changes where it ends


def test_decode_matches_pipeline(model):
    latents = model.prepare_noise(2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        pipe = pipeline_of(model)
        z = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        ref = pipe.image_processor.postprocess(pipe.vae.decode(z, return_dict=False)[0], output_type="pt")
    torch.testing.assert_close(model.decode_latents(latents), ref, rtol=0, atol=1e-6)
    # encoding is the decoder's inverse map of the pipeline's latent convention
    images = model.decode_latents(latents)
    assert model.encode_images(images).shape == latents.shape


def test_edits_are_refused(model):
    with pytest.raises(ValueError, match="text-to-image only"):
        model.encode_prompts(PROMPTS, torch.rand(2, 3, SIZE, SIZE))


@pytest.mark.parametrize("guidance", [1.0, 4.5])
def test_stored_log_probs_recompute_to_ratio_one(model, guidance):
    cond = model.encode_prompts(PROMPTS)
    sigmas = model.schedule(3)
    traj = sample(model, cond, sigmas, null_cond=model.null_condition(cond), guidance_scale=guidance,
                  renorm_dim=model.cfg_renorm_dim, noise_level=0.7, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for n in range(len(sigmas) - 1):
            t, t_next = sigmas[n].expand(2), sigmas[n + 1].expand(2)
            v = model.velocity(traj.states[:, n], t, cond)
            step = sde_step_mean(traj.states[:, n], v, t, t_next, 0.7, float(sigmas[1]))
            logp = gaussian_log_prob(traj.states[:, n + 1], step.mean, step.std)
            assert (torch.exp(logp - traj.cond_log_probs[:, n]) - 1).abs().max() < 1e-5


# --------------------------------------------------------------------------- the family


def test_sd3_is_a_registered_family(model):
    assert "sd3" in family_names()
    family = family_of("sd3")
    assert isinstance(family, SD3Family) and family_of_model(model) is family
    assert trainable_module(model) is model.transformer
    assert family.from_pretrained and family.prompt_files and not family.has_judge


def _artifact(tiny_dir, directory: Path) -> Path:
    """A base artifact as the base stage records pretrained weights: reference.json with the fingerprint."""
    directory.mkdir(parents=True)
    reference = {"family": "sd3", "pretrained": {"t2i": str(tiny_dir)},
                 "resolved": {"pretrained.t2i": f"{tiny_dir}#{weights_fingerprint(tiny_dir)}"}}
    (directory / QWEN_REFERENCE).write_text(json.dumps(reference))
    return directory


def test_a_trained_sd3_model_round_trips_through_its_artifact(tiny_dir, tmp_path):
    config = sd3_config(tiny_dir)
    family = family_of(config)
    base = _artifact(tiny_dir, tmp_path / "base")
    family.check_policy(base, config)
    model = load_policy(base, config)
    with torch.no_grad():
        for p in model.transformer.parameters():
            p.add_(0.01)
    save_policy(model, tmp_path / "trained", base)
    loaded = load_policy(tmp_path / "trained", config)
    state = trained_state(tmp_path / "trained", config)
    for key, value in model.transformer.state_dict().items():
        assert torch.equal(loaded.transformer.state_dict()[key], value) and torch.equal(state[key], value)
    frozen = family.load_frozen_network(tmp_path / "trained", config, "t2i")
    assert torch.equal(next(frozen.parameters()), next(model.transformer.parameters()))
    assert set(family.load_task_views(tmp_path / "trained", config)) == {"t2i"}
    with pytest.raises(CheckpointError, match="no 'edit' task"):
        load_policy(base, config, "edit")
    with pytest.raises(CheckpointError, match="needs the base artifact"):
        save_policy(model, tmp_path / "orphan", None)
    assert family.input_stamps(config) == {"model.sd3.pretrained": weights_fingerprint(tiny_dir)}
    assert family.image_size(config) == (SIZE, SIZE)


@pytest.mark.parametrize("change, key", [
    (lambda c: dataclasses.replace(c, model=dataclasses.replace(c.model, sd3=None)), "model.sd3"),
    (lambda c: dataclasses.replace(c, model=dataclasses.replace(
        c.model, sd3=dataclasses.replace(c.model.sd3, pretrained=""))), "model.sd3.pretrained"),
    (lambda c: dataclasses.replace(c, model=dataclasses.replace(
        c.model, sd3=dataclasses.replace(c.model.sd3, height=40))), "model.sd3.height"),
    (lambda c: dataclasses.replace(c, opd=dataclasses.replace(c.opd, t2i_fraction=0.5)), "opd.t2i_fraction"),
    (lambda c: dataclasses.replace(c, bench=dataclasses.replace(c.bench, scorer="judge")), "bench.scorer"),
    (lambda c: dataclasses.replace(c, grpo=dataclasses.replace(c.grpo, monitor_reward=None)), "grpo.monitor_reward"),
])
def test_sd3_config_rules_name_their_key(tiny_dir, change, key):
    config = sd3_config(tiny_dir)
    family_of(config).check_config(config)  # the good config passes
    with pytest.raises(ConfigError, match=f"^{key.replace('.', '[.]')}:"):
        family_of(config).check_config(change(config))


def test_planner_figures_are_the_architectures(tiny_dir, model):
    config = sd3_config(tiny_dir)
    common, grpo, opd = family_of(config).planner_figures(config, per_rank=2, opd_rows=2)
    net = common["network"]
    real = sum(p.numel() for p in model.transformer.parameters())
    assert net.parameters == real and net.layers == 2 and net.hidden == 32 and net.joint_dim == 64
    assert common["image_tokens"] == model.image_tokens() == 4
    assert common["text_tokens"] == 77 + T5_LENGTH  # CLIP's padded length, then T5's (zeros without T5)
    encoders = sum(p.numel() for e in model.text_encoders for p in e.parameters())
    assert common["text_encoder"] == encoders and common["vae"] == sum(p.numel() for p in model.vae.parameters())
    assert common["encoder"] == (3, 32, 64)  # the wider CLIP's layers, width and MLP width
    g = config.grpo
    assert grpo["decode_images"] == max(1, 2 // g.reward_chunks) * g.group_size  # one rollout chunk's images
    assert grpo["colocated_scorers"] == 2  # the two learned T2I components of configs/sd3_tiny.yaml
    assert opd["encode_rows"] == max(2, config.eval.batch_size)


def test_planner_names_the_key_when_weights_are_unreadable(tiny_dir, tmp_path):
    with pytest.raises(ConfigError, match="model.sd3.pretrained"):
        sd3_components(str(tmp_path / "nowhere"))


def test_validate_pretrained_names_the_missing_component(tiny_dir, tmp_path):
    summary = validate_pretrained(tiny_dir)
    assert summary["vae_scale_factor"] == 8 and summary["t5"] is False
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2"):
        validate_pretrained(broken)
