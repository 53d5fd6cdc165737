"""Subject masks: where in a frame each character stands, as small pure functions.

In a frame that names several characters, each character's bank may only be read by the query tokens
that draw that character (`consistent_attention` with `bank_owner`); tokens outside every mask — the
background — read no bank. The masks come either from the user (a box per character, in fractions of
the frame) or from the cross-attention maps of each character's description tokens, as ConsiStory
infers them: averaged over heads and layers at an early step, normalised, thresholded (Otsu) and
dilated, then resized to each CSA resolution and reused at every later step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

Box = tuple[float, float, float, float]  # (x0, y0, x1, y1) in fractions of the frame, y down


def grid_shape(num_tokens: int, frame_shape: Sequence[int]) -> tuple[int, int]:
    """(h, w) of a layer's token grid with `num_tokens` tokens, for a frame (or latent) of `frame_shape`
    (H, W): the factorisation whose aspect ratio is closest to the frame's."""
    aspect = frame_shape[0] / frame_shape[1]
    pairs = [(h, num_tokens // h) for h in range(1, num_tokens + 1) if num_tokens % h == 0]
    return min(pairs, key=lambda hw: abs(math.log(hw[0] / hw[1] / aspect)))


def normalise(soft: torch.Tensor) -> torch.Tensor:
    """A map scaled to [0, 1] (min -> 0, max -> 1); a flat map becomes zeros."""
    low, high = soft.min(), soft.max()
    return (soft - low) / (high - low) if high > low else torch.zeros_like(soft)


def otsu_threshold(values: torch.Tensor, bins: int = 64) -> float:
    """The threshold in [0, 1] that best splits `values` (in [0, 1]) into two classes (Otsu's method:
    the largest between-class variance over a histogram of `bins` bins)."""
    histogram = torch.histc(values.float().flatten(), bins=bins, min=0.0, max=1.0)
    probability = histogram / histogram.sum().clamp_min(1)
    centres = (torch.arange(bins, dtype=torch.float32) + 0.5) / bins
    weight_low = probability.cumsum(0)  # share of values at or below each bin
    mean_low = (probability * centres).cumsum(0)
    total_mean = mean_low[-1]
    between = (total_mean * weight_low - mean_low) ** 2 / (weight_low * (1 - weight_low)).clamp_min(1e-12)
    return float((between.argmax() + 1).item() / bins)


def dilate(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """A boolean (H, W) mask grown by `radius` tokens in every direction (a square structuring element)."""
    if radius <= 0:
        return mask
    grown = F.max_pool2d(mask[None, None].float(), 2 * radius + 1, stride=1, padding=radius)
    return grown[0, 0] > 0


def mask_from_map(soft: torch.Tensor, dilation: int = 1) -> torch.Tensor:
    """(H, W) soft attention map -> boolean mask: normalised, Otsu-thresholded, dilated by `dilation`."""
    scaled = normalise(soft)
    return dilate(scaled > otsu_threshold(scaled), dilation)


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A boolean (H, W) mask at another token grid (h, w): a cell is inside if any of it is (area max)."""
    if tuple(mask.shape) == tuple(size):
        return mask
    if mask.shape[0] >= size[0] and mask.shape[1] >= size[1]:
        return F.adaptive_max_pool2d(mask[None, None].float(), size)[0, 0] > 0
    return F.interpolate(mask[None, None].float(), size=size, mode="nearest")[0, 0] > 0


def box_mask(box: Box, size: tuple[int, int]) -> torch.Tensor:
    """A boolean (h, w) mask of the token cells a box (fractions of the frame) touches."""
    height, width = size
    x0, y0, x1, y1 = box
    rows = torch.arange(height, dtype=torch.float32)
    cols = torch.arange(width, dtype=torch.float32)
    inside_rows = (rows + 1 > y0 * height) & (rows < y1 * height)  # cell [r, r+1) overlaps [y0, y1)
    inside_cols = (cols + 1 > x0 * width) & (cols < x1 * width)
    return inside_rows[:, None] & inside_cols[None, :]


def exclusive(masks: Mapping[str, torch.Tensor], scores: Mapping[str, torch.Tensor] | None = None) -> dict:
    """Masks that do not overlap: a token inside several goes to the character whose soft map is strongest
    there (`scores`, same shapes) or, without scores, to the first character that claims it."""
    names = list(masks)
    if not names:
        return {}
    stacked = torch.stack([masks[n] for n in names])  # (C, H, W)
    if scores is None:
        first = stacked.float().argmax(0)  # the first True along C
        owner = torch.where(stacked.any(0), first, -1)
    else:
        strength = torch.stack([normalise(scores[n]) for n in names]).masked_fill(~stacked, -1.0)
        owner = torch.where(stacked.any(0), strength.argmax(0), -1)
    return {n: owner == i for i, n in enumerate(names)}


def grid_masks(image_masks: Mapping[str, torch.Tensor], num_tokens: int) -> dict[str, torch.Tensor]:
    """An image's masks at a layer's token grid, not overlapping, flattened: name -> (N,) bool."""
    if not image_masks:
        return {}
    size = grid_shape(num_tokens, next(iter(image_masks.values())).shape)
    resized = exclusive({name: resize_mask(mask, size) for name, mask in image_masks.items()})
    return {name: mask.flatten() for name, mask in resized.items()}


def token_owner(masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N,) long: for each token of a flattened grid, the index of the mask that holds it, -1 for none.
    Masks must not overlap (`exclusive`)."""
    owner = torch.full((masks[0].numel(),), -1, dtype=torch.long)
    for index, mask in enumerate(masks):
        owner[mask.flatten().to(owner.device)] = index
    return owner
