"""Label-preserving augmentations of annotation rows, and the label-noise ceiling of Spearman."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from flowrl.rewards.augment import (
    COLOR_NAMES,
    PERMUTATIONS,
    augment_batch,
    mirror_text,
    recolor_images,
    recolor_text,
)
from flowrl.rewards.shapes_annotators import latents_for
from flowrl.rewards.training import label_spearman_ceiling, pointwise_step_loss, PointwiseData
from flowrl.shapes import perturb
from flowrl.shapes.edits import sample_edit
from flowrl.shapes.prompts import parse_t2i, sample_t2i
from flowrl.shapes.render import render_scene, to_tensor
from flowrl.shapes.scene import Scene, ShapeObject


def _recolored_scene(scene: Scene, perm) -> Scene:
    return Scene(tuple(ShapeObject(o.shape, COLOR_NAMES[perm[COLOR_NAMES.index(o.color)]], o.row, o.col)
                       for o in scene.objects))


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1) * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def test_recolouring_a_rendered_scene_renders_the_recoloured_scene():
    rng = np.random.default_rng(0)
    for _ in range(10):
        scene = sample_t2i(rng, "color_attr").scene
        for perm in PERMUTATIONS:
            got = recolor_images(to_tensor(render_scene(scene))[None], perm)
            want = to_tensor(render_scene(_recolored_scene(scene, perm)))[None]
            assert torch.allclose(got, want, atol=1e-6)


def test_recolouring_keeps_a_colour_cast_and_the_background():
    rng = np.random.default_rng(1)
    scene = sample_t2i(rng, "color_attr").scene
    perm = PERMUTATIONS[7]
    clean = render_scene(scene)
    cast = perturb.color_cast(clean, np.random.default_rng(2), distance=20.0)
    got = _to_uint8(recolor_images(to_tensor(cast)[None], perm))[0].astype(int)
    want_clean = render_scene(_recolored_scene(scene, perm)).astype(int)
    objects = (clean < 255).any(-1)
    offset = cast.astype(int) - clean.astype(int)
    inside = objects & (want_clean + offset >= 0).all(-1) & (want_clean + offset <= 255).all(-1)
    assert inside.sum() > 20
    assert np.abs(got[inside] - (want_clean + offset)[inside]).max() <= 1  # the cast moved with the object
    assert (got[~objects] == 255).all()  # the white background is left alone


def test_text_rewrites():
    perm = (1, 0, 2, 3)  # red <-> green
    assert recolor_text("make the red circle green", perm) == "make the green circle red"
    assert recolor_text("a blue square", perm) == "a blue square"
    assert mirror_text("a circle left of a square") == "a circle right of a square"
    assert mirror_text("move the red circle right") == "move the red circle left"
    assert mirror_text("a red circle above a square") == "a red circle above a square"


def test_variants_keep_what_the_annotators_see():
    """The judge-derived latents the simulated annotators label are the same for a variant and its row."""
    rng = np.random.default_rng(3)
    examples = [sample_t2i(rng, c) for c in ("colors", "color_attr", "position", "two_objects") for _ in range(6)]
    images = torch.stack([to_tensor(render_scene(e.scene)) for e in examples])
    prompts = [e.prompt for e in examples]
    gen = torch.Generator().manual_seed(0)
    new_images, new_prompts, _ = augment_batch(images, prompts, None, gen, ("mirror", "palette"))
    assert new_prompts != prompts  # something was changed
    before = latents_for(_to_uint8(images), [parse_t2i(p) for p in prompts])
    after = latents_for(_to_uint8(new_images), [parse_t2i(p) for p in new_prompts])
    assert before == after


def test_edit_variants_move_source_and_output_together():
    rng = np.random.default_rng(4)
    examples = [sample_edit(rng, kind) for kind in ("recolor", "move") for _ in range(8)]
    outputs = torch.stack([to_tensor(render_scene(e.target)) for e in examples])
    sources = torch.stack([to_tensor(render_scene(e.source)) for e in examples])
    prompts = [e.instruction for e in examples]
    new_out, new_prompts, new_src = augment_batch(outputs, prompts, sources, torch.Generator().manual_seed(1),
                                                  ("mirror", "palette"))
    from flowrl.shapes.edits import parse_edit
    before = latents_for(_to_uint8(outputs), [parse_edit(p) for p in prompts], _to_uint8(sources))
    after = latents_for(_to_uint8(new_out), [parse_edit(p) for p in new_prompts], _to_uint8(new_src))
    assert before == after and new_prompts != prompts


def test_refused_prompts_fall_back_and_the_stream_is_the_same_for_every_setting():
    rng = np.random.default_rng(5)
    examples = [sample_t2i(rng, "color_attr") for _ in range(16)]
    images = torch.stack([to_tensor(render_scene(e.scene)) for e in examples])
    prompts = [e.prompt for e in examples]
    gen = torch.Generator().manual_seed(9)
    same_images, same_prompts, _ = augment_batch(images, prompts, None, gen, ("mirror", "palette"),
                                                 allowed=lambda text: text in prompts and False)
    assert same_prompts == prompts and torch.equal(same_images, images)
    states = []
    for kinds in ((), ("mirror",), ("palette",), ("mirror", "palette")):
        g = torch.Generator().manual_seed(9)
        augment_batch(images, prompts, None, g, kinds)
        states.append(torch.rand(1, generator=g).item())
    assert len(set(states)) == 1


def test_augmented_loss_needs_the_generator():
    example = sample_t2i(np.random.default_rng(6), "colors")
    data = PointwiseData(images=to_tensor(render_scene(example.scene))[None], sources=None,
                         prompts=[example.prompt], labels=torch.tensor([5]), rationales=None)
    with pytest.raises(ValueError, match="generator"):
        pointwise_step_loss(None, data, torch.tensor([0]), None, ("palette",))


def test_label_ceiling_matches_a_simulated_perfect_scorer():
    rng = np.random.default_rng(7)
    latent = rng.uniform(0, 1, 4000)
    labels = latent[:, None] + rng.normal(0, 0.3, (4000, 2))
    truth = spearmanr(latent, labels.mean(1)).statistic
    assert abs(label_spearman_ceiling(labels.tolist()) - truth) < 0.03
    noise_only = rng.normal(0, 1, (4000, 2))  # annotators who agree on nothing: a ceiling near 0
    assert label_spearman_ceiling(noise_only.tolist()) < 0.3
    with pytest.raises(ValueError, match="two labels"):
        label_spearman_ceiling([[1.0], [2.0, 3.0]])


def test_augment_is_refused_outside_the_shapes_world(tmp_path):
    from flowrl.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("reward_model:\n  backbone: vlm\n  vlm_pretrained: /nowhere\n  augment: [palette]\n")
    with pytest.raises(ConfigError, match=r"reward_model.augment: \['palette'\] rewrites shapes-world"):
        load_config(path)
    path.write_text("reward_model:\n  augment: [flip]\n")
    with pytest.raises(ConfigError, match="reward_model.augment"):
        load_config(path)


def test_a_variant_of_a_faulty_picture_keeps_its_labels_or_is_not_made():
    """Casts of 8-40 levels and noise on every permutation: a recoloured picture keeps what the annotators
    see (its alignment exactly, its texture and structure latents closely); one whose fault would be
    clipped at a channel's end keeps its colours."""
    from flowrl.rewards.augment import recolorable

    rng = np.random.default_rng(8)
    examples = [sample_t2i(rng, "color_attr") for _ in range(12)]
    pictures = []
    for e in examples:
        clean = render_scene(e.scene)
        pictures.append(perturb.color_cast(clean, rng, distance=float(rng.uniform(8, 40))))
        pictures.append(perturb.add_noise(clean, rng, std=0.05))
    images = torch.stack([to_tensor(p) for p in pictures])
    specs = [parse_t2i(e.prompt) for e in examples for _ in range(2)]
    before = latents_for(_to_uint8(images), specs)
    made = 0
    for perm in PERMUTATIONS[1:]:
        fit = recolorable(images, perm)
        made += int(fit.sum())
        rows = fit.nonzero()[:, 0].tolist()
        recolored = recolor_images(images[rows], perm)
        new_specs = [parse_t2i(recolor_text(examples[r // 2].prompt, perm)) for r in rows]
        after = latents_for(_to_uint8(recolored), new_specs)
        for r, lat in zip(rows, after):
            assert lat.alignment == before[r].alignment, (perm, r)
            # a fault keeps its size in RGB, and the judge measures it from the new palette colour, whose
            # distance from white differs: the texture latent moves a little (the annotators' own noise is
            # 0.3-0.7 Likert levels, about 0.08-0.18 of a latent)
            assert abs(lat.quality - before[r].quality) < 0.1 and abs(lat.fidelity - before[r].fidelity) < 0.03, \
                (perm, r, lat, before[r])
    assert made > len(pictures) * len(PERMUTATIONS[1:]) // 4  # most variants are still made


def test_a_picture_far_from_every_ink_is_not_recoloured():
    from flowrl.rewards.augment import recolorable

    image = torch.ones(1, 3, 8, 8)
    image[0, :, 2:6, 2:6] = torch.tensor([0.5, 0.2, 0.6])[:, None, None]  # purple: between red and blue
    assert not recolorable(image, PERMUTATIONS[5]).item()
    clean = to_tensor(render_scene(sample_t2i(np.random.default_rng(9), "colors").scene))[None]
    assert recolorable(clean, PERMUTATIONS[5]).item()
