"""Input checks, dtype handling and kornia gradients shared by `functional` and `hog`."""

from __future__ import annotations

import math
import numbers

import torch
from einops import rearrange
from kornia.filters import filter2d, get_spatial_gradient_kernel2d
from kornia.filters.kernels import normalize_kernel2d
from torch import Tensor

from .errors import InputError

_LOW_PRECISION = (torch.float16, torch.bfloat16)

# kornia's first-order kernels normalised as `spatial_gradient(normalized=True)` does,
# (2, 3, 3): d/dx then d/dy. "sobel" is [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] / 8, "diff"
# the central difference [-1, 0, 1] / 2. Built once, on the CPU: `filter2d` moves them to
# the input's device without blocking, where `spatial_gradient` would build its kernel on
# the device on every call (a blocking copy that waits for the CUDA stream).
_GRADIENT_KERNELS = {
    mode: normalize_kernel2d(get_spatial_gradient_kernel2d(mode, 1)) for mode in ("sobel", "diff")
}


# --------------------------------------------------------------------------- validation


def _check_map(fn: str, name: str, x: object) -> Tensor:
    """Check that ``x`` is a floating (B, C, H, W) tensor with no empty dimension."""
    if not isinstance(x, Tensor):
        raise InputError(f"{fn}: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    shape = tuple(x.shape)
    if x.ndim != 4:
        raise InputError(
            f"{fn}: `{name}` must have shape (B, C, H, W) (4 dims), got {x.ndim} dims, "
            f"shape {shape}"
        )
    if not x.is_floating_point():
        raise InputError(
            f"{fn}: `{name}` must have a floating dtype, got {x.dtype} with shape {shape}"
        )
    if x.numel() == 0:
        raise InputError(f"{fn}: `{name}` must not have an empty dimension, got shape {shape}")
    return x


def _check_pair(fn: str, a: object, b: object) -> tuple[Tensor, Tensor]:
    a = _check_map(fn, "a", a)
    b = _check_map(fn, "b", b)
    if a.shape != b.shape:
        raise InputError(
            f"{fn}: `a` and `b` must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.device != b.device:
        raise InputError(
            f"{fn}: `a` and `b` must be on the same device, got {a.device} and {b.device} "
            f"(shape {tuple(a.shape)})"
        )
    return a, b


def _check_int(fn: str, name: str, value: object, err: type[Exception] = InputError) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise err(f"{fn}: `{name}` must be a positive integer, got {value!r}")
    return int(value)


def _check_real(
    fn: str,
    name: str,
    value: object,
    *,
    low: float = 0.0,
    high: float = math.inf,
    closed_high: bool = False,
    err: type[Exception] = InputError,
) -> float:
    """Check ``low < value < high`` (``<= high`` when ``closed_high``) for a finite real."""
    if not isinstance(value, bool) and isinstance(value, numbers.Real):
        x = float(value)
        if math.isfinite(x) and low < x and (x <= high if closed_high else x < high):
            return x
    bracket = "]" if closed_high else ")"
    raise err(f"{fn}: `{name}` must be a real number in ({low}, {high}{bracket}, got {value!r}")


# ----------------------------------------------------------------------------- helpers


def _work(x: Tensor) -> Tensor:
    """Upcast half precision to float32 (quantile, atan2 and sums need the range)."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _gradients(x: Tensor, mode: str) -> tuple[Tensor, Tensor]:
    """``(d/dx, d/dy)`` of every channel of ``x``, as ``kornia.filters.spatial_gradient``.

    ``mode="sobel"``: the normalised 3x3 Sobel kernels; ``mode="diff"``: central
    differences ``(x[i+1] - x[i-1]) / 2``. Both replicate the border, like
    ``spatial_gradient(x, mode, normalized=True)``, with the same values. The
    convolutions run with autocast disabled, so inside an autocast region a ``float32``
    map stays ``float32``.
    """
    kernel = _GRADIENT_KERNELS[mode]
    # All B * C maps as the channels of one image: filter2d then runs one depthwise
    # convolution, several times faster on the CPU (backward included) than a batch of
    # B * C single-channel images.
    maps = rearrange(x, "b c h w -> 1 (b c) h w")
    with torch.autocast(x.device.type, enabled=False):
        gx = filter2d(maps, kernel[:1], border_type="replicate")
        gy = filter2d(maps, kernel[1:], border_type="replicate")
    return gx.view_as(x), gy.view_as(x)


def _cosine_rows(x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Cosine of the rows of two (B, N) tensors, each norm floored at ``eps``."""
    dot = (x * y).sum(dim=1)
    nx = torch.sqrt(x.square().sum(dim=1)).clamp(min=eps)
    ny = torch.sqrt(y.square().sum(dim=1)).clamp(min=eps)
    return (dot / (nx * ny)).clamp(-1.0, 1.0)
