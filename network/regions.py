"""Region expressions → masks on every layer grid (docs/design.md §3 "Regions").

A region is evaluated once per generation on a canvas the size of the image (8 × the latent),
where user masks are stretched and the built-ins are exact halves; the result is
area-resampled to each layer grid when a layer first asks, and cached:

    maps = RegionMaps(latent=(h, w), masks=store)
    maps.add(key, region, rest=...)
    maps.on_grid(key, (gh, gw), device)  → Grid: values (gh·gw,), indices inside, bounding box

Operators: `a + b` max, `a & b` min, `!a` 1 − a and `a*w` a·w (both clipped at 0; w > 1
strengthens).
`rest` is 1 − max(every other region of the prompt that does not use rest), so `rest` and the
others cover every token exactly once when the masks are hard.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Hashable, Iterable, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..parser import Mask, Not, Region, Scaled, Union_
from .region_error import RegionError

PIXELS_PER_LATENT = 8  # the VAE's downscale: masks are stretched to the image, not the latent
MAX_CANVAS = 1024  # longest canvas side; a larger image is evaluated at this size


def as_mask(value) -> np.ndarray:
    """A stored mask (PIL image, or array of uint8 0–255, bool, or float 0–1) as float32 in [0, 1].
    Colour images count by luminance; an alpha channel is ignored."""
    if isinstance(value, Image.Image):
        value = np.asarray(value.convert("L"), dtype=np.float32) / 255.0
    a = np.asarray(value)
    if a.ndim == 3 and a.shape[2] in (1, 3, 4):
        a = a[..., 0] if a.shape[2] == 1 else a[..., :3] @ np.array([0.299, 0.587, 0.114])
    if a.ndim != 2 or 0 in a.shape:
        raise RegionError(f"a mask must be a 2-D image, not an array of shape {list(a.shape)}")
    if a.dtype == np.uint8:
        a = a / 255.0
    a = a.astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise RegionError("a mask holds NaN or infinite values")
    return np.clip(a, 0.0, 1.0)


def resample(a: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Area-resample a map to (h, w): each output cell is the mean of the input it covers
    (a box filter, fractional coverage at the edges; stretches when growing)."""
    if a.shape == tuple(size):
        return a
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32), mode="F")
    return np.asarray(img.resize((size[1], size[0]), Image.Resampling.BOX), dtype=np.float32)


def canvas_size(latent: Tuple[int, int]) -> Tuple[int, int]:
    h, w = (int(v) * PIXELS_PER_LATENT for v in latent)
    shrink = max(1.0, max(h, w) / MAX_CANVAS)
    return max(1, round(h / shrink)), max(1, round(w / shrink))


def uses_rest(region: Region) -> bool:
    if isinstance(region, Mask):
        return region.name == "rest"
    if isinstance(region, (Not, Scaled)):
        return uses_rest(region.operand)
    return any(uses_rest(r) for r in region.operands)


def evaluate(region: Region, size: Tuple[int, int], masks: Mapping[str, object],
             rest: Optional[np.ndarray] = None) -> np.ndarray:
    """The region as a float32 map of `size` (h, w)."""
    h, w = size
    if isinstance(region, Mask):
        name = region.name
        if name == "full":
            return np.ones(size, np.float32)
        if name in ("left", "right", "top", "bottom"):
            a = np.zeros(size, np.float32)
            half = {"left": (slice(None), slice(0, w // 2)), "right": (slice(None), slice(w - w // 2, None)),
                    "top": (slice(0, h // 2), slice(None)), "bottom": (slice(h - h // 2, None), slice(None))}
            a[half[name]] = 1.0
            if w % 2 and name in ("left", "right"):  # an odd canvas: the middle column is shared
                a[:, w // 2] = 0.5
            if h % 2 and name in ("top", "bottom"):
                a[h // 2, :] = 0.5
            return a
        if name == "rest":
            return np.ones(size, np.float32) if rest is None else rest
        if name not in masks:
            raise RegionError(f"no mask named '{name}'")
        try:
            return resample(as_mask(masks[name]), size)
        except RegionError as exc:
            raise RegionError(f"mask '{name}': {exc}") from None
    if isinstance(region, Not):
        # clipped: the complement of a region scaled above 1 is empty there, not negative
        return np.maximum(1.0 - evaluate(region.operand, size, masks, rest), 0)
    if isinstance(region, Scaled):
        return np.maximum(evaluate(region.operand, size, masks, rest) * np.float32(region.weight), 0)
    parts = [evaluate(r, size, masks, rest) for r in region.operands]
    return np.maximum.reduce(parts) if isinstance(region, Union_) else np.minimum.reduce(parts)


def rest_of(regions: Iterable[Region], size: Tuple[int, int], masks: Mapping[str, object]) -> np.ndarray:
    """What no region of the prompt covers: 1 − max of the regions that do not use rest."""
    covered = np.zeros(size, np.float32)
    for r in regions:
        if not uses_rest(r):
            covered = np.maximum(covered, np.clip(evaluate(r, size, masks), 0, 1))
    return 1.0 - covered


def grids(latent: Tuple[int, int], depth: int = 8) -> Sequence[Tuple[int, int]]:
    """The grids a UNet's levels work on: the latent, then each stride-2 conv's ceil(n/2)."""
    h, w = latent
    out = [(h, w)]
    for _ in range(depth):
        h, w = (h + 1) // 2, (w + 1) // 2
        out.append((h, w))
    return out


def grid_for(tokens: int, latent: Tuple[int, int]) -> Optional[Tuple[int, int]]:
    """The (h, w) grid of a layer that sees `tokens` flattened positions (B, h·w, C), or None
    when no level of this latent has that many (then the layer is not spatial)."""
    for g in grids(latent):
        if g[0] * g[1] == tokens:
            return g
    return None


@dataclass(frozen=True)
class Grid:
    """A region on one layer grid: values (h·w,) fp32, the flat indices where it is non-zero,
    and its bounding box (top, bottom, left, right) exclusive at the end."""

    values: Tensor
    inside: Tensor
    box: Tuple[int, int, int, int]
    shape: Tuple[int, int]

    @property
    def full(self) -> bool:
        return self.inside.numel() == self.values.numel()

    @property
    def empty(self) -> bool:
        return self.inside.numel() == 0


class RegionMaps:
    """Every region of a generation on its canvas, and on each layer grid once asked."""

    def __init__(self, latent: Tuple[int, int]):
        self.latent = tuple(latent)
        self.size = canvas_size(self.latent)
        self._canvas: Dict[Hashable, np.ndarray] = {}
        self._grids: Dict[Tuple, Grid] = {}

    def add(self, key: Hashable, region: Region, masks: Mapping[str, object],
            rest: Optional[np.ndarray] = None) -> None:
        self._canvas[key] = evaluate(region, self.size, masks, rest)

    def canvas(self, key: Hashable) -> np.ndarray:
        return self._canvas[key]

    def on_grid(self, key: Hashable, shape: Tuple[int, int], device) -> Grid:
        cache_key = (key, tuple(shape), str(device))
        grid = self._grids.get(cache_key)
        if grid is None:
            a = resample(self._canvas[key], shape)
            rows, cols = np.nonzero(a)
            box = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1) \
                if rows.size else (0, 0, 0, 0)
            values = torch.from_numpy(a.reshape(-1).copy()).to(device)
            inside = torch.from_numpy(np.flatnonzero(a)).to(device)
            grid = self._grids[cache_key] = Grid(values, inside, box, tuple(shape))
        return grid
