"""Location regions of patches: named boxes, their pixel bounds, and random corners inside them."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError

__all__ = ["REGIONS", "resolve_region", "region_bounds"]

Box = tuple[float, float, float, float]
RegionLike = str | Box | None

REGIONS: dict[str, tuple[float, float, float, float]] = {
    "any": (0.0, 0.0, 1.0, 1.0),
    "center": (0.25, 0.25, 0.75, 0.75),
    "top-left": (0.0, 0.0, 0.5, 0.5),
    "top-right": (0.0, 0.5, 0.5, 1.0),
    "bottom-left": (0.5, 0.0, 1.0, 0.5),
    "bottom-right": (0.5, 0.5, 1.0, 1.0),
    "top": (0.0, 0.0, 0.5, 1.0),
    "bottom": (0.5, 0.0, 1.0, 1.0),
    "left": (0.0, 0.0, 1.0, 0.5),
    "right": (0.0, 0.5, 1.0, 1.0),
}
"""Named location regions, as ``(top, left, bottom, right)`` fractions of the image."""


def resolve_region(
    region: RegionLike, error: type[Exception] = ConfigError
) -> tuple[str | None, Box]:
    """Normalise a location region to ``(name or None, (top, left, bottom, right))``.

    Args:
        region: ``None`` or ``"any"`` (the whole image), a name of
            [`REGIONS`][triqdef.attacks.regions.REGIONS], or ``(top, left, bottom, right)``
            fractions of the image height/width with ``0 <= top < bottom <= 1`` and
            ``0 <= left < right <= 1``.
        error: exception class raised for a bad region.

    Returns:
        ``(name, box)``: the region's name (``None`` for a custom box that is no
        named region) and its box as floats rounded to 6 decimals.

    Example:
        >>> resolve_region("center")
        ('center', (0.25, 0.25, 0.75, 0.75))
        >>> resolve_region((0, 0, 1, 1))
        ('any', (0.0, 0.0, 1.0, 1.0))
    """
    if region is None:
        region = "any"
    if isinstance(region, str):
        if region not in REGIONS:
            raise error(f"unknown region {region!r}; known regions: {', '.join(REGIONS)}")
        return region, REGIONS[region]
    try:
        box = tuple(round(float(v), 6) for v in region)
    except (TypeError, ValueError):
        raise error(
            f"region must be a name or (top, left, bottom, right), got {region!r}"
        ) from None
    if len(box) != 4:
        raise error(f"region must be (top, left, bottom, right), got {region!r}")
    top, left, bottom, right = box
    if not (0 <= top < bottom <= 1 and 0 <= left < right <= 1):
        raise error(
            f"region {region!r} must satisfy 0 <= top < bottom <= 1 and 0 <= left < right <= 1 "
            "(fractions of the image)"
        )
    name = next((k for k, v in REGIONS.items() if v == box), None)
    return name, box


def _region_pixels(box, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Pixel rectangle ``(top, left, bottom, right)`` (bottom/right exclusive) of a region box."""
    hh, ww = image_size
    top, left, bottom, right = box
    t, b = math.floor(top * hh + 1e-9), math.ceil(bottom * hh - 1e-9)
    lft, r = math.floor(left * ww + 1e-9), math.ceil(right * ww - 1e-9)
    return t, lft, max(b, t + 1), max(r, lft + 1)


def region_bounds(
    box: Box, image_size: tuple[int, int], patch_size: tuple[int, int]
) -> tuple[int, int, int, int]:
    """Range of top-left corners that keep a patch inside a region.

    Args:
        box: ``(top, left, bottom, right)`` fractions (see
            [`resolve_region`][triqdef.attacks.regions.resolve_region]).
        image_size: ``(H, W)``.
        patch_size: ``(h, w)``, at most ``(H, W)``.

    Returns:
        ``(row_min, row_max, col_min, col_max)``, inclusive. A region smaller than
        the patch gives the single corner that centres the patch on the region
        (moved inside the image).

    Example:
        >>> region_bounds(REGIONS["bottom-right"], (16, 16), (4, 4))
        (8, 12, 8, 12)
    """
    (hh, ww), (h, w) = image_size, patch_size
    t, lft, b, r = _region_pixels(box, image_size)

    def axis(lo: int, hi: int, size: int, full: int) -> tuple[int, int]:
        if hi - lo >= size:
            return lo, hi - size
        start = min(max(round((lo + hi - size) / 2), 0), full - size)
        return start, start

    rmin, rmax = axis(t, b, h, hh)
    cmin, cmax = axis(lft, r, w, ww)
    return rmin, rmax, cmin, cmax


def _draw_in_range(low: Tensor, high: Tensor, u: Tensor) -> Tensor:
    """Integers uniform in ``[low, high]`` (inclusive, per element) from uniforms ``u``."""
    span = (high - low + 1).to(u.dtype)
    return (low + torch.floor(u * span).long()).minimum(high).maximum(low)


def _corners_in_region(
    box: Box, image_size: tuple[int, int], patch_size: tuple[int, int], u: Tensor
) -> Tensor:
    """``(n, 2)`` top-left corners uniform in the region, from ``(n, 2)`` uniforms ``u``."""
    rmin, rmax, cmin, cmax = region_bounds(box, image_size, patch_size)
    low = torch.tensor([rmin, cmin], device=u.device)
    high = torch.tensor([rmax, cmax], device=u.device)
    return _draw_in_range(low, high, u)


def _seeded_generator(owner: Any, device: torch.device) -> torch.Generator | None:
    """The generator ``owner`` (an attack or a pool) draws from on ``device``.

    ``owner.generator`` when the user gave one; else, with ``owner.seed`` set, one
    generator per device seeded with it and kept in ``owner._generators`` (so the
    stream continues across calls); else ``None`` (the global generator).
    """
    if owner.generator is not None:
        return owner.generator
    if owner.seed is None:
        return None
    key = str(device)
    if key not in owner._generators:
        owner._generators[key] = torch.Generator(device=device).manual_seed(owner.seed)
    return owner._generators[key]
