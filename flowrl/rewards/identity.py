"""Identity preservation: does the edit keep what the instruction leaves alone?

Both scorers compare an embedding of the source with an embedding of the
edited image and map the cosine similarity to [0, 1]. They are rewards used
during RL, so they never call the shapes judge (``flowrl/shapes/judge.py``,
``detect.py``): RL optimises rewards, the judge stays held out, and the gap
between the two is how reward hacking shows.

Shapes world (:class:`ShapesIdentityScorer`). The regions are the grid cells
of the source that hold an object the instruction does not touch; each is
embedded with a fixed, training-free object embedding (see
:func:`cell_embeddings`) and the score is the mean similarity over them.

Production (:class:`FaceIdentityScorer`). Identity means the person's face:
the scorer embeds the face of the source and of the edit with a face
recognition model behind the :class:`FaceEmbedder` protocol. The model to use:

- InsightFace ArcFace (the ``buffalo_l`` pack: ``w600k_r50.onnx``, 512-D,
  112x112 crops, pixels ``(x - 127.5) / 127.5`` in BGR order; its
  ``det_10g.onnx`` RetinaFace detector gives the boxes). Copy the pack into
  the artifact store, convert the ONNX graph to torch with
  ``onnx2torch.convert(local_path)``, put a channel flip (RGB -> BGR) in front
  of it, and wrap it as ``TorchFaceEmbedder(module, face_box_fn=detector,
  input_size=(112, 112))``; or implement ``FaceEmbedder`` directly on an
  ``onnxruntime.InferenceSession(local_path)``. The pretrained InsightFace
  weights are licensed for non-commercial research only: check before use.
- facenet-pytorch's ``InceptionResnetV1`` (VGGFace2 weights, 512-D, 160x160
  crops, pixels ``(255 x - 127.5) / 128``, i.e. about ``2 x - 1``): build it
  with ``InceptionResnetV1(pretrained=None, classify=False)``, load the
  weights with ``load_state_dict(torch.load(local_path, weights_only=True))``
  (never a plain ``torch.load``: a pickle can run code; ``pretrained=``
  would download), take boxes from ``facenet_pytorch.MTCNN(...).detect``, and
  wrap it as ``TorchFaceEmbedder(module, face_box_fn=..., input_size=(160, 160))``.

Nothing real is loaded in this repository (this machine has no network); the
tests use a tiny random conv net.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from flowrl.rewards.base import RewardScores
from flowrl.shapes.edits import DIRECTIONS, EditSpec, parse_edit
from flowrl.shapes.render import nominal_area
from flowrl.shapes.scene import COLORS, GRID, SHAPES, cell_size

EMBED_GRID = 8  # cells are pooled to 8x8 so the embedding does not depend on the resolution
FOREGROUND_COVERAGE = 0.5  # a pixel at least half covered by a colour belongs to an object
PALETTE: tuple[str, ...] = tuple(COLORS)


def _check_images(images: torch.Tensor, name: str, square: bool) -> None:
    """ValueError unless ``images`` is a float [B, 3, H, W] batch (H == W when ``square``)."""
    if images.ndim != 4 or images.shape[1] != 3 or (square and images.shape[2] != images.shape[3]):
        raise ValueError(f"{name} must be [B, 3, H, {'H' if square else 'W'}], got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point in [0, 1], got {images.dtype}")


def _check_pair(
    images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None, square: bool
) -> torch.Tensor:
    """Validate an (images, prompts, sources) call of an identity scorer; return the sources."""
    if sources is None:
        raise ValueError("identity preservation compares with the source image: sources are required")
    _check_images(images, "images", square)
    _check_images(sources, "sources", square)
    if sources.shape != images.shape:
        raise ValueError(f"sources {tuple(sources.shape)} must match images {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
    return sources


# --- shapes world: pixels -> colour memberships -> cell embeddings ------------------


def colour_memberships(images: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Per-pixel soft membership in each palette colour and the background.

    A crisp or blurred pixel is ``white + a (colour - white)`` with coverage
    ``a``, so its direction away from white names the colour and its length
    along that colour gives ``a``. Directions of the palette are at least 30
    degrees apart (scene.COLORS), so a softmax of the cosines with
    ``sharpness`` ~20 is nearly one-hot on rendered colours yet moves
    smoothly when a model drifts between colours.
    Returns [B, K + 1, H, W]: K colour coverages then the background; each
    pixel's memberships sum to 1.
    """
    palette = torch.tensor([COLORS[name] for name in PALETTE], dtype=images.dtype, device=images.device) / 255.0
    away = 1.0 - palette  # [K, 3] palette directions away from white
    length = away.norm(dim=1, keepdim=True)  # [K, 1]
    projections = torch.cat([sharpness * away / length, away / length**2])  # [2K, 3]
    ink = 1.0 - images.clamp(0.0, 1.0)  # [B, 3, H, W]
    logits, coverages = F.conv2d(ink, projections[:, :, None, None]).chunk(2, dim=1)  # [B, K, H, W] each
    # Softmax over K by hand (torch's kernel is slow on a dim of 4). Ink and the
    # palette directions are non-negative, so cosines lie in [0, 1] and the
    # logits minus ``sharpness`` are <= 0: no max shift needed.
    logits = logits * (1.0 / (ink.norm(dim=1, keepdim=True) + 1e-6)) - sharpness  # [B, K, H, W]
    weights = logits.exp()  # [B, K, H, W]
    weights = weights * (1.0 / weights.sum(dim=1, keepdim=True))  # [B, K, H, W]
    coverage = (weights * coverages).sum(dim=1, keepdim=True).clamp(0.0, 1.0)  # [B, 1, H, W]
    return torch.cat([coverage * weights, 1.0 - coverage], dim=1)  # [B, K + 1, H, W]


def grid_cells(maps: torch.Tensor) -> torch.Tensor:
    """[B, C, H, H] -> [B, GRID * GRID, C, h, h], cells in row-major order."""
    batch, channels, height, _ = maps.shape
    side = cell_size(height)
    cells = maps.reshape(batch, channels, GRID, side, GRID, side)  # [B, C, R, h, Q, h]
    return cells.permute(0, 2, 4, 1, 3, 5).reshape(batch, GRID * GRID, channels, side, side)


def cell_embeddings(cells: torch.Tensor, background_weight: float, outline_weight: float) -> torch.Tensor:
    """The object embedding of grid cells: memberships [M, K + 1, h, h] -> [M, D], unit norm.

    Two blocks on the cell's memberships pooled to an 8x8 grid:
    - coverage: where each colour (and the background, scaled by
      ``background_weight``) lies. Colour changes zero the overlap of the
      colour channels; empty space matches only the background channel.
    - outline: horizontal and vertical differences of the colour channels,
      scaled by ``outline_weight``. The three shapes share about two thirds
      of their pixels, so coverage alone keeps a changed shape at ~0.8; the
      outlines differ much more.
    The cosine of two embeddings lies in [-1, 1] but in practice >= 0 (the
    coverage block is non-negative); the scorer clamps it into [0, 1]. At
    32x32 an untouched red circle scores 1.0 against itself, ~0.93 blurred
    (sigma 0.6 px), ~0.5-0.6 as another shape or shifted by one pixel, ~0.35
    when it left its cell and ~0.2 in another colour.
    """
    pooled = cells if cells.shape[-1] == EMBED_GRID else F.adaptive_avg_pool2d(cells, EMBED_GRID)  # [M, K + 1, 8, 8]
    colours = pooled[:, :-1]  # [M, K, 8, 8]
    coverage = torch.cat([colours, background_weight * pooled[:, -1:]], dim=1).flatten(1)  # [M, (K + 1) 64]
    across = (colours[..., :, 1:] - colours[..., :, :-1]).flatten(1)  # [M, K 8 7]
    down = (colours[..., 1:, :] - colours[..., :-1, :]).flatten(1)  # [M, K 7 8]
    embedding = torch.cat([coverage, outline_weight * across, outline_weight * down], dim=1)  # [M, D]
    return F.normalize(embedding, dim=1)  # [M, D]


def occupied_cells(memberships: torch.Tensor, min_pixels: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Which cells hold an object, and which colour each cell's object mostly is.

    Returns ``occupied`` [B, N] bool (at least ``min_pixels`` foreground
    pixels) and ``mostly`` [B, N, K] bool (over half of the cell's foreground
    membership is that colour; all False for a cell with no clear colour).
    """
    cells = grid_cells(memberships)  # [B, N, K + 1, h, h]
    colours = cells[:, :, :-1].flatten(3)  # [B, N, K, P]
    foreground = (colours.sum(dim=2) >= FOREGROUND_COVERAGE).unsqueeze(2)  # [B, N, 1, P]
    count = foreground.sum(dim=(2, 3))  # [B, N]
    colour_mass = (colours * foreground).sum(dim=3)  # [B, N, K]
    share = colour_mass / colour_mass.sum(dim=2, keepdim=True).clamp(min=1e-6)  # [B, N, K]
    return count >= min_pixels, share > 0.5


@lru_cache(maxsize=4096)
def _parsed(instruction: str) -> EditSpec:
    """Parse once per distinct instruction (a GRPO group repeats its prompt G times)."""
    return parse_edit(instruction)


def _shift(grid: torch.Tensor, step: tuple[int, int]) -> torch.Tensor:
    """Move every True of [B, GRID, GRID] one cell by (dr, dc); what leaves the grid is dropped."""
    rows, cols = step
    padded = F.pad(grid.float(), (1, 1, 1, 1))  # [B, GRID + 2, GRID + 2]
    return padded[:, 1 - rows : 1 - rows + GRID, 1 - cols : 1 - cols + GRID] > 0.5  # [B, GRID, GRID]


def touched_cells(occupied: torch.Tensor, mostly: torch.Tensor, specs: list[EditSpec]) -> torch.Tensor:
    """Cells the instructions may change: [B, N] bool, from colours only (no shape reading).

    recolor / remove / move touch every occupied cell that is mostly the named
    colour: when two source objects share that colour both count as touched,
    which is conservative (an untouched object may go unchecked, a legitimate
    edit is never penalised). move also touches the cell each of those moves
    into. add touches nothing: the new object may land in any empty cell, and
    empty cells are not regions.
    """
    batch = occupied.shape[0]
    named = torch.tensor([PALETTE.index(spec.color) for spec in specs], device=occupied.device)  # [B]
    acts = torch.tensor([spec.kind != "add" for spec in specs], device=occupied.device)  # [B]
    is_named = mostly.gather(2, named.view(batch, 1, 1).expand(batch, occupied.shape[1], 1)).squeeze(2)  # [B, N]
    touched = (occupied & is_named & acts[:, None]).view(batch, GRID, GRID)  # [B, GRID, GRID]
    destinations = torch.zeros_like(touched)
    for name, step in DIRECTIONS.items():
        moves = torch.tensor([spec.direction == name for spec in specs], device=occupied.device)  # [B]
        destinations |= _shift(touched, step) & moves[:, None, None]
    return (touched | destinations).view(batch, GRID * GRID)


@dataclass(frozen=True)
class ShapesIdentityScorer:
    """Mean object-embedding similarity over the source's untouched objects, in [0, 1].

    ``prompts`` are shapes edit instructions (``parse_edit``); ``sources``
    are required. A source with no untouched object scores 1.0: nothing the
    instruction leaves alone was changed, and since every sample of a GRPO
    group shares its source, that constant gives zero normalised advantage,
    i.e. no signal rather than a wrong one (the shapes edit sets always keep
    at least one untouched object, so it arises only for off-grammar sources).
    """

    color_sharpness: float = 20.0  # softmax scale on palette cosines (palette >= 30 degrees apart)
    background_weight: float = 0.5  # how much shared empty space counts in the coverage block
    outline_weight: float = 1.0  # weight of the outline block against the coverage block
    min_object_fraction: float = 0.25  # of the smallest nominal shape area: fewer foreground pixels is no object

    uses_sources: ClassVar[bool] = True
    score_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    def __post_init__(self) -> None:
        for name in ("color_sharpness", "background_weight", "outline_weight", "min_object_fraction"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
        if not 0 < self.min_object_fraction <= 1:
            raise ValueError(f"min_object_fraction must be in (0, 1], got {self.min_object_fraction!r}")

    def regions(self, sources: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """[B, GRID^2] bool: source cells holding an object the instruction does not touch."""
        _check_images(sources, "sources", square=True)
        memberships = colour_memberships(sources, self.color_sharpness)  # [B, K + 1, H, H]
        return self._regions(memberships, prompts)

    def _regions(self, memberships: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        resolution = memberships.shape[-1]
        min_pixels = self.min_object_fraction * min(nominal_area(shape, resolution) for shape in SHAPES)
        occupied, mostly = occupied_cells(memberships, min_pixels)  # [B, N], [B, N, K]
        touched = touched_cells(occupied, mostly, [_parsed(prompt) for prompt in prompts])  # [B, N]
        return occupied & ~touched

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None) -> torch.Tensor:
        """[B] in [0, 1]: 1 when every untouched source object is unchanged."""
        sources = _check_pair(images, prompts, sources, square=True)
        batch = images.shape[0]
        pairs = torch.cat([sources, images]).float()  # [2B, 3, H, H]
        memberships = colour_memberships(pairs, self.color_sharpness)  # [2B, K + 1, H, H]
        regions = self._regions(memberships[:batch], prompts)  # [B, N]
        cells = grid_cells(memberships)  # [2B, N, K + 1, h, h]
        kept_source = cell_embeddings(cells[:batch][regions], self.background_weight, self.outline_weight)  # [M, D]
        kept_output = cell_embeddings(cells[batch:][regions], self.background_weight, self.outline_weight)  # [M, D]
        similarity = (kept_source * kept_output).sum(dim=1).clamp(0.0, 1.0)  # [M]
        rows = regions.nonzero()[:, 0]  # [M] the batch row of each region
        total = torch.zeros(batch, device=images.device).index_add_(0, rows, similarity)  # [B]
        count = regions.sum(dim=1)  # [B]
        return torch.where(count > 0, total / count.clamp(min=1), torch.ones_like(total))

    def score_components(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> RewardScores:
        total = self.score(images, prompts, sources)
        return RewardScores(total=total, components={"identity": total})


# --- production: face embeddings --------------------------------------------------


@runtime_checkable
class FaceEmbedder(Protocol):
    """Finds the main face of each image and embeds it."""

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] float in [0, 1] -> [B, D], row i the face of image i."""


FaceBoxFn = Callable[[torch.Tensor], torch.Tensor]
"""[B, 3, H, W] in [0, 1] -> [B, 4] pixel boxes (x0, y0, x1, y1) of each image's main face.

It must return a box for every image: a detector that finds no face decides
itself what to return (e.g. the whole frame); the embedder does not guess.
"""


@dataclass(frozen=True)
class TorchFaceEmbedder:
    """Any torch module that maps face crops to embeddings, as a FaceEmbedder.

    Each image is cropped to ``face_box_fn``'s box (the whole image when it is
    None: pre-aligned portraits), resized to ``input_size`` (height, width)
    and mapped to [-1, 1], the input range of both ArcFace and FaceNet; wrap
    the module to reorder channels if it wants BGR. The module is put in eval
    mode (face nets use batch norm) and run without gradients.
    """

    module: nn.Module
    face_box_fn: FaceBoxFn | None = None
    input_size: tuple[int, int] = (112, 112)

    def __post_init__(self) -> None:
        self.module.eval()

    def _resize(self, images: torch.Tensor) -> torch.Tensor:
        return F.interpolate(images, size=self.input_size, mode="bilinear", antialias=True, align_corners=False)

    def crops(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, 3, h, w] face crops in [0, 1]."""
        if self.face_box_fn is None:
            return self._resize(images)
        boxes = self.face_box_fn(images)  # [B, 4]
        if boxes.shape != (images.shape[0], 4) or not torch.isfinite(boxes).all():
            raise ValueError(f"face_box_fn must return finite [B, 4] boxes, got {tuple(boxes.shape)}")
        height, width = images.shape[-2:]
        crops = []
        for row, (x0, y0, x1, y1) in enumerate(boxes.round().long().tolist()):
            x0, x1 = max(x0, 0), min(x1, width)
            y0, y1 = max(y0, 0), min(y1, height)
            if x1 <= x0 or y1 <= y0:
                raise ValueError(f"face box of image {row} is empty inside the image: {boxes[row].tolist()}")
            face = images[row : row + 1, :, y0:y1, x0:x1]  # [1, 3, y1 - y0, x1 - x0]
            crops.append(self._resize(face))
        return torch.cat(crops)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] -> [B, D] on the images' device."""
        device = next(self.module.parameters(), images).device
        crops = self.crops(images.float().clamp(0.0, 1.0)).to(device)  # [B, 3, h, w]
        embeddings = self.module(crops * 2.0 - 1.0)  # [B, D]
        if embeddings.shape[0] != images.shape[0] or embeddings.ndim != 2:
            shape = tuple(embeddings.shape)
            raise ValueError(f"the face module must return [B, D] for B={images.shape[0]}, got {shape}")
        return embeddings.float().to(images.device)


@dataclass(frozen=True)
class FaceIdentityScorer:
    """(1 + cos(face(source), face(edit))) / 2 per row, in [0, 1]; prompts are unused.

    The affine map keeps every difference of the cosine (GRPO normalises each
    component within a group, so only the order and spread matter). Same-
    person ArcFace cosines are typically ~0.5-0.8 and different people ~0-0.3,
    so the useful range is about 0.5-0.9.
    """

    embedder: FaceEmbedder

    uses_sources: ClassVar[bool] = True
    score_range: ClassVar[tuple[float, float]] = (0.0, 1.0)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None) -> torch.Tensor:
        """[B] in [0, 1]; sources and edits go through the embedder in one batch."""
        sources = _check_pair(images, prompts, sources, square=False)
        batch = images.shape[0]
        embeddings = self.embedder.embed(torch.cat([sources, images]))  # [2B, D]
        cosine = F.cosine_similarity(embeddings[:batch], embeddings[batch:], dim=1, eps=1e-8)  # [B]
        return ((1.0 + cosine) / 2.0).clamp(0.0, 1.0)

    def score_components(
        self, images: torch.Tensor, prompts: list[str], sources: torch.Tensor | None = None
    ) -> RewardScores:
        total = self.score(images, prompts, sources)
        return RewardScores(total=total, components={"identity": total})
