"""Reading images back into objects: the perception half of the judge.

Each pixel is modelled as a palette colour blended with the white background,
``pixel = white - alpha * (white - colour)``: its colour is the palette entry
whose direction away from white it follows, and it belongs to an object when
``alpha >= 0.5``. Blur only mixes objects with white (neighbours never touch),
so this keeps edge pixels from turning into a third colour. Connected
components per colour become objects; their shape is the best-matching
template at the component's own bounding box, or ``unknown`` when nothing
matches well (merged blobs, smears, upside-down triangles).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence, Union

import numpy as np
import torch
from scipy import ndimage

from flowrl.shapes.render import nominal_area, shape_mask
from flowrl.shapes.scene import COLORS, SHAPES, cell_size, object_size

# One image: uint8 [H, W, 3] or float [3, H, W] in [0, 1].
Image = Union[np.ndarray, torch.Tensor]
# A batch: uint8 [B, H, W, 3], float [B, 3, H, W] in [0, 1], or a list of single images.
ImageBatch = Union[np.ndarray, torch.Tensor, Sequence[Image]]

UNKNOWN = "unknown"
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)  # [K, 3]
_DEFICITS = 255.0 - _PALETTE  # [K, 3] direction of each colour away from white
_UNIT_DEFICITS = _DEFICITS / np.linalg.norm(_DEFICITS, axis=1, keepdims=True)

FOREGROUND_ALPHA = 0.5  # half-covered pixels belong to the object, as in a crisp render
STRAY_FRACTION = 0.25  # components under this share of the smallest nominal area are strays
MIN_SIDE_FRACTION = 2 / 3  # smaller components cannot be classified reliably, so they are unknown
MIN_TEMPLATE_IOU = 0.75  # clean shapes match their own template at 1.0 and others at <= 0.67


@dataclass(frozen=True)
class DetectedObject:
    """A component big enough to be an object; ``shape`` may be ``unknown``."""

    shape: str
    color: str
    row: int
    col: int
    center: tuple[float, float]  # (y, x) in pixels
    area: int

    @property
    def cell(self) -> tuple[int, int]:
        return (self.row, self.col)


@dataclass(frozen=True)
class Stray:
    """A component too small to be an object: no meaning, but it hurts fidelity."""

    color: str
    center: tuple[float, float]
    area: int


@dataclass(frozen=True)
class DetectedScene:
    objects: tuple[DetectedObject, ...]
    strays: tuple[Stray, ...]


@dataclass(frozen=True)
class Reading:
    """Everything the judge takes from one image."""

    scene: DetectedScene
    resolution: int
    background_error: float  # mean distance of background pixels from white, in units of 255
    color_error: float  # mean distance of object pixels from their palette colour, in units of 255


def as_pixels(images: ImageBatch) -> np.ndarray:
    """Any image or batch -> float32 [B, H, W, 3] in 0..255.

    uint8 arrays are [H, W, 3] or [B, H, W, 3]; float arrays and tensors are
    [3, H, W] or [B, 3, H, W] in [0, 1] (clamped, as saving an image would).
    """
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("got an empty list of images")
        return np.concatenate([as_pixels(image) for image in images])
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if images.dtype == np.uint8:
        pixels = images.astype(np.float32)
    else:
        pixels = np.moveaxis(np.clip(images.astype(np.float32), 0.0, 1.0) * 255.0, -3, -1)
    if pixels.ndim == 3:
        pixels = pixels[None]
    if pixels.ndim != 4 or pixels.shape[-1] != 3 or pixels.shape[1] != pixels.shape[2]:
        raise ValueError(f"images must be square RGB images, got array of shape {images.shape}")
    return pixels


@lru_cache(maxsize=None)
def _template(shape: str, height: int, width: int) -> np.ndarray:
    """The shape's mask stretched to a height x width box (nearest neighbour)."""
    cols = ((np.arange(width) + 0.5) * height / width).astype(int)
    return shape_mask(shape, height)[:, cols]


def classify_shape(mask: np.ndarray, resolution: int) -> str:
    """Shape of a component given its bounding-box-cropped mask, or ``unknown``."""
    height, width = mask.shape
    min_side = math.ceil(MIN_SIDE_FRACTION * object_size(resolution))
    if max(height, width) > cell_size(resolution) or min(height, width) < min_side:
        return UNKNOWN
    templates = [_template(s, height, width) for s in SHAPES]
    ious = [(t & mask).sum() / (t | mask).sum() for t in templates]
    best = int(np.argmax(ious))
    return SHAPES[best] if ious[best] >= MIN_TEMPLATE_IOU else UNKNOWN


def _classify_pixels(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-pixel colour index [B,H,W], foreground mask [B,H,W] and deficit [B,H,W,3]."""
    deficit = 255.0 - pixels  # [B, H, W, 3]
    along = deficit @ _UNIT_DEFICITS.T  # [B, H, W, K] length along each colour's direction
    color_index = along.argmax(-1)  # [B, H, W]
    along_chosen = np.take_along_axis(along, color_index[..., None], -1)[..., 0]  # [B, H, W]
    alpha = along_chosen / np.linalg.norm(_DEFICITS, axis=1)[color_index]  # 1 = the palette colour itself
    return color_index, alpha >= FOREGROUND_ALPHA, deficit


def read_images(images: ImageBatch) -> list[Reading]:
    """Detect objects and strays in every image of a batch (one labelling pass for all)."""
    pixels = as_pixels(images)
    batch, resolution = pixels.shape[0], pixels.shape[1]
    color_index, foreground, deficit = _classify_pixels(pixels)
    n_colors = len(COLOR_NAMES)
    # One [B, K, H, W] mask labelled at once; the structure joins 8-neighbours
    # within an image and colour plane only.
    planes = (color_index[:, None] == np.arange(n_colors)[None, :, None, None]) & foreground[:, None]
    structure = np.zeros((3, 3, 3, 3), dtype=bool)
    structure[1, 1] = True
    labels, n_components = ndimage.label(planes, structure)
    flat = labels.ravel()
    areas = np.bincount(flat, minlength=n_components + 1)
    ys, xs = np.indices((resolution, resolution), dtype=np.float64) + 0.5  # pixel centres
    sum_y = np.bincount(flat, np.broadcast_to(ys, labels.shape).ravel(), minlength=n_components + 1)
    sum_x = np.bincount(flat, np.broadcast_to(xs, labels.shape).ravel(), minlength=n_components + 1)

    stray_limit = STRAY_FRACTION * min(nominal_area(s, resolution) for s in SHAPES)
    cell = cell_size(resolution)
    objects: list[list[DetectedObject]] = [[] for _ in range(batch)]
    strays: list[list[Stray]] = [[] for _ in range(batch)]
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        image, color = box[0].start, COLOR_NAMES[box[1].start]
        area = int(areas[index])
        center = (float(sum_y[index] / area), float(sum_x[index] / area))
        if area < stray_limit:
            strays[image].append(Stray(color, center, area))
            continue
        shape = classify_shape(labels[box][0, 0] == index, resolution)
        row, col = (int(v // cell) for v in center)
        objects[image].append(DetectedObject(shape, color, row, col, center, area))

    readings = []
    for b in range(batch):
        fg, distance = foreground[b], np.linalg.norm(deficit[b], axis=-1)
        off_palette = np.linalg.norm(pixels[b][fg] - _PALETTE[color_index[b][fg]], axis=-1)
        scene = DetectedScene(tuple(sorted(objects[b], key=_order)), tuple(strays[b]))
        background_error = float(distance[~fg].mean()) / 255.0 if (~fg).any() else 0.0
        color_error = float(off_palette.mean()) / 255.0 if fg.any() else 0.0
        readings.append(Reading(scene, resolution, background_error, color_error))
    return readings


def _order(obj: DetectedObject) -> tuple:
    return (obj.row, obj.col, obj.color, obj.shape)


def read_scenes(images: ImageBatch) -> list[DetectedScene]:
    return [reading.scene for reading in read_images(images)]


def read_scene(image: Image) -> DetectedScene:
    """One image (uint8 [H, W, 3] or float [3, H, W] in [0, 1]) -> its objects."""
    (scene,) = read_scenes(image[None] if image.ndim == 3 else image)
    return scene
