"""Label-preserving augmentations of shapes-world annotation rows.

A person's label does not change when the whole picture is mirrored left to
right and the words "left" and "right" trade places in its prompt, nor when the
palette is relabelled consistently in the image and in the words (every red
object painted blue and "red" read as "blue", and so on). Training a reward
model on such variants of its rows shows it far more prompt texts than the
annotators labelled, which is what it needs to score prompts it has not seen.

The recolouring keeps what a person would judge: each pixel is split into
an amount of one palette ink over the white background and a residual; the ink
is swapped for the permuted colour and the residual (noise, a colour cast, a
stray tint) is put back unchanged, so a faulty pixel stays faulty by as much.
"""

from __future__ import annotations

import itertools
import re
from typing import Callable, Sequence

import torch

from flowrl.shapes.scene import BACKGROUND, COLORS

COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
# every ordering of the palette (index 0 is the identity)
PERMUTATIONS: tuple[tuple[int, ...], ...] = tuple(itertools.permutations(range(len(COLOR_NAMES))))
_MIRRORED = {"left": "right", "right": "left"}
# a pixel whose best ink amount is below this is background (white, or a faint tint of it)
INK_FLOOR = 0.1
# a picture with an ink pixel this far (RGB distance, 0-1 units) from its nearest ink is not recoloured: its
# colours are not one palette colour plus a fault, and a permuted ink could read as another colour
MAX_RESIDUAL = 0.25
# a recolouring that would push a channel past black or white by more than this (1/255 per channel) loses part
# of the fault it carries (a cast on a channel near 0 or 255), so the picture keeps its colours
CLIP_TOLERANCE = 1.0 / 255


def _inks() -> torch.Tensor:
    """[C, 3] ink of each palette colour over white, in [0, 1] units: white minus the colour."""
    white = torch.tensor(BACKGROUND, dtype=torch.float32) / 255.0
    return white - torch.tensor([COLORS[c] for c in COLOR_NAMES], dtype=torch.float32) / 255.0


def ink_decomposition(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pixel of ``images`` [B, 3, H, W] in [0, 1]: (colour index [B, H, W], ink amount [B, H, W] in
    [0, 1], residual [B, 3, H, W]) such that white - amount * ink[colour] - residual = image, the colour
    being the one whose ink leaves the smallest residual."""
    inks = _inks().to(images)  # [C, 3]
    white = torch.tensor(BACKGROUND, dtype=images.dtype, device=images.device)[:, None, None] / 255.0
    deficit = white - images  # [B, 3, H, W]
    # least-squares amount of each ink, clipped to what a pixel can hold; the squared residual of ink k is
    # |d|^2 - 2 a_k (d . ink_k) + a_k^2 |ink_k|^2, so no [B, C, 3, H, W] tensor is needed to pick the best
    dots = torch.einsum("bchw,kc->bkhw", deficit, inks)  # [B, C, H, W]
    norms = (inks * inks).sum(-1)[None, :, None, None]
    amount = (dots / norms).clamp(0.0, 1.0)
    squared = amount * (amount * norms - 2.0 * dots)  # the residual's squared norm less |d|^2
    best = squared.argmin(1)  # [B, H, W]
    chosen_amount = amount.gather(1, best[:, None])[:, 0]  # [B, H, W]
    chosen_residual = deficit - chosen_amount[:, None] * inks[best].permute(0, 3, 1, 2)  # [B, 3, H, W]
    return best, chosen_amount, chosen_residual


def _recolored(images: torch.Tensor, permutations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` [B, 3, H, W] recoloured row by row, row b's palette colour i painted as colour
    ``permutations[b, i]`` (background pixels, under INK_FLOOR of any ink, as they are), and [B] bool: which
    rows keep what a person sees in them (:func:`recolorable`)."""
    inks = _inks().to(images)
    colour, amount, residual = ink_decomposition(images)
    white = torch.tensor(BACKGROUND, dtype=images.dtype, device=images.device)[:, None, None] / 255.0
    new_colour = permutations.gather(1, colour.flatten(1)).view_as(colour)  # [B, H, W]
    raw = white - amount[:, None] * inks[new_colour].permute(0, 3, 1, 2) - residual
    ink = (amount >= INK_FLOOR)[:, None]
    clipped = torch.where(ink, (raw - raw.clamp(0.0, 1.0)).abs(), torch.zeros_like(raw)).flatten(1).amax(1)
    stray = torch.where(ink[:, 0], residual.square().sum(1), torch.zeros_like(amount)).flatten(1).amax(1)
    keeps = (clipped <= CLIP_TOLERANCE) & (stray <= MAX_RESIDUAL**2)  # (squared norms: a sum is faster than a norm)
    return torch.where(ink, raw.clamp(0.0, 1.0), images), keeps


def _permutation_rows(permutation: Sequence[int], rows: int, device) -> torch.Tensor:
    perm = torch.as_tensor(list(permutation), dtype=torch.long, device=device)
    if sorted(perm.tolist()) != list(range(len(COLOR_NAMES))):
        raise ValueError(f"not a permutation of the {len(COLOR_NAMES)} palette colours: {list(permutation)}")
    return perm[None].expand(rows, -1)


def recolor_images(images: torch.Tensor, permutation: Sequence[int]) -> torch.Tensor:
    """``images`` [B, 3, H, W] in [0, 1] with palette colour i painted as colour permutation[i]; pixels
    with less than INK_FLOOR of any ink (the background) are left as they are. :func:`recolorable` says
    which pictures keep their label under this."""
    return _recolored(images, _permutation_rows(permutation, images.shape[0], images.device))[0]


def recolorable(images: torch.Tensor, permutation: Sequence[int]) -> torch.Tensor:
    """[B] bool: whether recolouring each picture keeps what a person sees in it: every ink pixel lies
    within MAX_RESIDUAL of its ink (a colour and a fault, not a colour between two), and the recoloured
    pixels stay inside the colour range (up to CLIP_TOLERANCE), so no part of a fault is cut off."""
    return _recolored(images, _permutation_rows(permutation, images.shape[0], images.device))[1]


def recolor_text(text: str, permutation: Sequence[int]) -> str:
    """``text`` with every palette colour word i replaced by colour word permutation[i]."""
    table = {COLOR_NAMES[i]: COLOR_NAMES[j] for i, j in enumerate(permutation)}
    return " ".join(table.get(word, word) for word in text.split(" "))


def mirror_text(text: str) -> str:
    """``text`` with "left" and "right" swapped (relations and move directions)."""
    return re.sub(r"\b(left|right)\b", lambda m: _MIRRORED[m.group(1)], text)


def augment_batch(
    images: torch.Tensor,
    prompts: list[str],
    sources: torch.Tensor | None,
    generator: torch.Generator,
    kinds: Sequence[str],
    allowed: Callable[[str], bool] | None = None,
) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    """One random variant per row: with ``"mirror"`` in ``kinds`` each row is mirrored with probability
    1/2, with ``"palette"`` its colours are relabelled by a uniformly drawn permutation (the identity
    included). A variant whose prompt ``allowed`` refuses (a text held out from training) is replaced by
    the row's mirror alone if that is allowed, else by the row as it is; a row whose pictures are not
    :func:`recolorable` keeps its colours. Draws come from ``generator``
    only, two per row whatever ``kinds`` holds, so the stream is the same across settings."""
    n = images.shape[0]
    flips = (torch.rand(n, generator=generator) < 0.5).tolist()
    perms = torch.randint(0, len(PERMUTATIONS), (n,), generator=generator).tolist()
    ok = allowed or (lambda text: True)
    plans = []  # (mirror, permutation index) per row
    for row, prompt in enumerate(prompts):
        mirror = "mirror" in kinds and flips[row]
        perm = perms[row] if "palette" in kinds else 0
        text = mirror_text(prompt) if mirror else prompt
        if perm and not ok(recolor_text(text, PERMUTATIONS[perm])):
            perm = 0
        if mirror and not perm and not ok(text):
            mirror = False
        plans.append((mirror, perm))
    images = images.clone()
    sources = None if sources is None else sources.clone()
    out_prompts = list(prompts)
    rows = [r for r, (mirror, _) in enumerate(plans) if mirror]
    if rows:
        images[rows] = images[rows].flip(-1)
        if sources is not None:
            sources[rows] = sources[rows].flip(-1)
        for r in rows:
            out_prompts[r] = mirror_text(out_prompts[r])
    index = torch.tensor([perm for _, perm in plans], dtype=torch.long)
    if not bool((index > 0).any()):
        return images, out_prompts, sources
    table = torch.tensor(PERMUTATIONS, dtype=torch.long, device=images.device)[index.to(images.device)]  # [B, C]
    recolored, keeps = _recolored(images, table)
    if sources is not None:
        recolored_sources, source_keeps = _recolored(sources, table)
        keeps &= source_keeps
    chosen = keeps & (index.to(keeps.device) > 0)  # rows whose recolouring keeps their label; the others as they are
    images = torch.where(chosen[:, None, None, None], recolored, images)
    if sources is not None:
        sources = torch.where(chosen[:, None, None, None], recolored_sources, sources)
    for r in chosen.nonzero()[:, 0].tolist():
        out_prompts[r] = recolor_text(out_prompts[r], PERMUTATIONS[plans[r][1]])
    return images, out_prompts, sources
