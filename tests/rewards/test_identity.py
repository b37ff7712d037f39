"""Identity preservation: the shapes object-embedding scorer and the face-embedding interface."""

import time

import pytest
import torch
from torch import nn

from flowrl.rewards.base import RewardModel
from flowrl.rewards.identity import FaceEmbedder, FaceIdentityScorer, ShapesIdentityScorer, TorchFaceEmbedder
from flowrl.shapes.edits import make_edit_set
from flowrl.shapes.render import render_batch
from flowrl.shapes.scene import GRID, Scene, ShapeObject


@pytest.fixture(autouse=True)
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def scene(*objects: tuple[str, str, int, int]) -> Scene:
    return Scene(tuple(ShapeObject(*obj) for obj in objects))


def image(*objects: tuple[str, str, int, int], resolution: int = 32) -> torch.Tensor:
    """[1, 3, H, H] rendering of one scene."""
    return render_batch([scene(*objects)], resolution)


def cell_index(row: int, col: int) -> int:
    return row * GRID + col


RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE = ("circle", "red", 0, 1), ("square", "blue", 2, 2), ("triangle", "green", 3, 0)


# --- shapes world --------------------------------------------------------------------


def test_is_a_reward_model_that_needs_sources():
    scorer = ShapesIdentityScorer()
    assert isinstance(scorer, RewardModel) and scorer.uses_sources
    with pytest.raises(ValueError, match="sources are required"):
        scorer.score(image(RED_CIRCLE), ["remove the red circle"])
    with pytest.raises(ValueError, match="must match"):
        scorer.score(image(RED_CIRCLE), ["remove the red circle"], image(RED_CIRCLE, resolution=64))
    with pytest.raises(ValueError, match="prompts"):
        scorer.score(image(RED_CIRCLE), ["a", "b"], image(RED_CIRCLE))
    with pytest.raises(ValueError, match="cannot parse edit instruction 'paint it black'"):
        scorer.score(image(RED_CIRCLE), ["paint it black"], image(RED_CIRCLE))


@pytest.mark.parametrize("resolution", [32, 64])
def test_correct_edits_and_unchanged_outputs_score_one(resolution):
    examples = make_edit_set(seed=3, n_per_kind=25)
    sources = render_batch([e.source for e in examples], resolution)
    targets = render_batch([e.target for e in examples], resolution)
    prompts = [e.instruction for e in examples]
    scorer = ShapesIdentityScorer()
    torch.testing.assert_close(scorer.score(targets, prompts, sources), torch.ones(len(examples)))
    torch.testing.assert_close(scorer.score(sources, prompts, sources), torch.ones(len(examples)))


@pytest.mark.parametrize(
    ("instruction", "touched"),
    [
        ("make the red circle blue", [(0, 1)]),
        ("remove the red circle", [(0, 1)]),
        ("move the red circle down", [(0, 1), (1, 1)]),
        ("add a red circle", []),
    ],
)
def test_regions_are_the_untouched_objects(instruction, touched):
    objects = [RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE]
    regions = ShapesIdentityScorer().regions(image(*objects), [instruction])[0]
    expected = {cell_index(r, c) for _, _, r, c in objects} - {cell_index(r, c) for r, c in touched}
    assert set(regions.nonzero()[:, 0].tolist()) == expected


def test_two_objects_of_the_named_colour_are_both_left_unchecked():
    # Colour alone decides "touched" (no shape reading), so the red square that
    # "make the red circle blue" leaves alone goes unchecked: conservative.
    source = image(RED_CIRCLE, ("square", "red", 3, 3), BLUE_SQUARE)
    regions = ShapesIdentityScorer().regions(source, ["make the red circle blue"])[0]
    assert regions.nonzero()[:, 0].tolist() == [cell_index(2, 2)]


def test_move_touches_the_destination_cell_and_drops_moves_off_the_grid():
    # The grammar never moves into an occupied cell; if a source had one, the
    # object there is where the moved one must land, so it is not checked.
    scorer = ShapesIdentityScorer()
    regions = scorer.regions(image(RED_CIRCLE, ("square", "blue", 1, 1), BLUE_SQUARE), ["move the red circle down"])
    assert regions[0].nonzero()[:, 0].tolist() == [cell_index(2, 2)]
    regions = scorer.regions(image(RED_CIRCLE, BLUE_SQUARE), ["move the red circle up"])  # row -1: off the grid
    assert regions[0].nonzero()[:, 0].tolist() == [cell_index(2, 2)]


def test_changing_an_untouched_object_lowers_the_score_clearly():
    source = image(RED_CIRCLE, BLUE_SQUARE)
    instruction = "remove the blue square"  # the red circle is the one untouched object
    edited = {
        "kept": image(RED_CIRCLE),
        "recoloured": image(("circle", "green", 0, 1)),
        "reshaped": image(("triangle", "red", 0, 1)),
        "moved away": image(("circle", "red", 1, 1)),
        "erased": torch.ones_like(source),
    }
    scores = {name: ShapesIdentityScorer().score(out, [instruction], source).item() for name, out in edited.items()}
    assert scores["kept"] == pytest.approx(1.0, abs=1e-6)
    assert scores["reshaped"] < 0.7
    assert scores["moved away"] < 0.5 and scores["erased"] < 0.5
    assert scores["recoloured"] < 0.3


def test_score_is_the_mean_over_untouched_objects():
    source = image(RED_CIRCLE, BLUE_SQUARE, GREEN_TRIANGLE)
    instruction = "add a yellow circle"  # every object is a region
    scorer = ShapesIdentityScorer()
    recolour_one = image(("circle", "green", 0, 1), BLUE_SQUARE, GREEN_TRIANGLE)
    single = scorer.score(image(("circle", "green", 0, 1)), [instruction], image(RED_CIRCLE))
    assert scorer.score(recolour_one, [instruction], source).item() == pytest.approx((single.item() + 2.0) / 3.0)


def test_no_untouched_object_scores_one():
    source = image(RED_CIRCLE)
    assert ShapesIdentityScorer().score(torch.ones_like(source), ["remove the red circle"], source).item() == 1.0


def test_scores_lie_in_unit_interval_and_keep_batch_order():
    generator = torch.Generator().manual_seed(0)
    examples = make_edit_set(seed=1, n_per_kind=8)
    sources = render_batch([e.source for e in examples])
    noise = torch.rand(sources.shape, generator=generator)
    prompts = [e.instruction for e in examples]
    scorer = ShapesIdentityScorer()
    scores = scorer.score(noise, prompts, sources)
    assert scores.shape == (len(examples),) and ((scores >= 0) & (scores <= 1)).all()
    order = torch.randperm(len(examples), generator=generator)
    shuffled = scorer.score(noise[order], [prompts[i] for i in order], sources[order])
    torch.testing.assert_close(shuffled, scores[order])
    parts = scorer.score_components(noise, prompts, sources)
    torch.testing.assert_close(parts.components["identity"], parts.total)


def _timed(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def test_throughput_is_well_above_a_thousand_images_per_second():
    examples = make_edit_set(seed=0, n_per_kind=64)
    sources = render_batch([e.source for e in examples])
    targets = render_batch([e.target for e in examples])
    prompts = [e.instruction for e in examples]
    scorer = ShapesIdentityScorer()
    scorer.score(targets, prompts, sources)
    elapsed = min(_timed(lambda: scorer.score(targets, prompts, sources)) for _ in range(3))  # a busy CI core
    assert len(examples) / elapsed > 1000, f"{len(examples) / elapsed:.0f} images/s"


# --- production: face embeddings -------------------------------------------------------


def tiny_face_net(seed: int = 0) -> nn.Module:
    """A random 2-layer conv net on 16x16 crops -> [B, 32] (batch norm, as real face nets have)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 32),
    )


def faces(batch: int, seed: int) -> torch.Tensor:
    return torch.rand(batch, 3, 24, 20, generator=torch.Generator().manual_seed(seed))


def test_face_identity_of_identical_images_is_one_and_changes_lower_it():
    embedder = TorchFaceEmbedder(tiny_face_net(), input_size=(16, 16))
    assert isinstance(embedder, FaceEmbedder) and not embedder.module.training  # batch norm on running stats
    scorer = FaceIdentityScorer(embedder)
    sources = faces(3, seed=1)
    prompts = ["keep the face"] * 3
    torch.testing.assert_close(scorer.score(sources, prompts, sources), torch.ones(3))
    changed = scorer.score(faces(3, seed=2), prompts, sources)
    assert (changed < 0.97).all() and ((changed >= 0) & (changed <= 1)).all()
    with pytest.raises(ValueError, match="sources are required"):
        scorer.score(sources, prompts)


def test_face_identity_keeps_batch_order():
    scorer = FaceIdentityScorer(TorchFaceEmbedder(tiny_face_net(), input_size=(16, 16)))
    sources, edits, prompts = faces(4, seed=3), faces(4, seed=4), ["p"] * 4
    batched = scorer.score(edits, prompts, sources)
    one_by_one = torch.cat([scorer.score(edits[i : i + 1], ["p"], sources[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, one_by_one)
    order = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(scorer.score(edits[order], prompts, sources[order]), batched[order])


def test_face_boxes_restrict_identity_to_the_face():
    def top_left_box(images: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[0.0, 0.0, 10.0, 12.0]]).expand(images.shape[0], 4)  # x0, y0, x1, y1

    scorer = FaceIdentityScorer(TorchFaceEmbedder(tiny_face_net(), face_box_fn=top_left_box, input_size=(16, 16)))
    sources = faces(2, seed=5)
    background_changed = sources.clone()
    background_changed[:, :, 12:, :] = 0.0  # below the face box
    face_changed = sources.clone()
    face_changed[:, :, :12, :10] = 1.0 - face_changed[:, :, :12, :10]
    torch.testing.assert_close(scorer.score(background_changed, ["p", "p"], sources), torch.ones(2))
    assert (scorer.score(face_changed, ["p", "p"], sources) < 0.95).all()


def test_face_embedder_rejects_bad_boxes_and_outputs():
    empty = TorchFaceEmbedder(tiny_face_net(), face_box_fn=lambda images: torch.zeros(images.shape[0], 4))
    with pytest.raises(ValueError, match="face box of image 0 is empty"):
        empty.embed(faces(1, seed=0))
    flat = TorchFaceEmbedder(nn.Identity(), input_size=(4, 4))
    with pytest.raises(ValueError, match=r"\[B, D\]"):
        flat.embed(faces(2, seed=0))
