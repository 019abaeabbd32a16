"""Perceptual metrics on feature maps and input gradients (TriQDef, Algorithm 1).

Every function takes tensors of shape ``(B, C, H, W)`` and returns one value (or one
descriptor) per sample, so a training step can compute a descriptor once and compare it
with several others. The soft functions
([`sobel_edges`][triqdef.functional.sobel_edges],
[`soft_binarize`][triqdef.functional.soft_binarize],
[`soft_dice`][triqdef.functional.soft_dice], [`soft_hog`][triqdef.functional.soft_hog])
are differentiable to second order with finite gradients everywhere, including all-zero
and constant maps. The hard functions ([`edge_iou`][triqdef.functional.edge_iou],
[`hog`][triqdef.functional.hog], [`hog_cosine`][triqdef.functional.hog_cosine]) are for
analysis and reporting. The HOG functions live in `triqdef.hog` and are re-exported here.

Conventions shared by all functions:

* Inputs must be floating tensors with four dimensions, none of them empty; anything else
  raises [`InputError`][triqdef.errors.InputError] (a ``TypeError`` and a ``ValueError``).
* ``float16`` and ``bfloat16`` inputs are computed in ``float32`` and the result is cast
  back to the input dtype. The only convolutions, kornia's Sobel and central-difference
  filters, run with autocast disabled, and no other op that autocast lowers is called, so
  inside an autocast region ``float32`` inputs stay ``float32``.
* Nothing reads tensor values on the host: there is no ``.item()``, ``.cpu()`` or Python
  branching on data, only on shapes, and the filter kernels reach the device by a
  non-blocking copy, so the functions never synchronise a CUDA stream and trace cleanly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ._maps import _check_map, _check_pair, _check_real, _cosine_rows, _gradients, _work
from .errors import ConfigError
from .hog import SoftHOG, descriptor_cosine, hog, hog_cosine, soft_hog

__all__ = [  # in the order of the API reference
    "sobel_edges",
    "soft_binarize",
    "soft_dice",
    "soft_hog",
    "edge_iou",
    "hog",
    "descriptor_cosine",
    "hog_cosine",
    "gradient_cosine",
    "SobelEdges",
    "SoftBinarize",
    "SoftDice",
    "SoftHOG",
]

# torch.quantile refuses inputs above this many elements in some releases; larger inputs
# use two kthvalue calls instead (same linear interpolation, same result).
_QUANTILE_MAX_NUMEL = 2**24


# ----------------------------------------------------------------------------- helpers


def _sobel_edges(a: Tensor, eps: float) -> Tensor:
    """``sqrt(gx^2 + gy^2 + eps)`` of the channel mean: ``kornia.filters.sobel``'s formula."""
    x = _work(a).mean(dim=1, keepdim=True)
    gx, gy = _gradients(x, "sobel")
    return torch.sqrt(gx.square() + gy.square() + eps).to(a.dtype)


def _quantile_rows(x: Tensor, q: float) -> Tensor:
    """Per-row ``q``-quantile (linear interpolation) of a (B, N) tensor, shape (B, 1)."""
    if x.numel() <= _QUANTILE_MAX_NUMEL:
        return torch.quantile(x, q, dim=1, keepdim=True)
    n = x.shape[1]
    pos = q * (n - 1)
    lo = math.floor(pos)
    frac = pos - lo
    v_lo = x.kthvalue(lo + 1, dim=1, keepdim=True).values
    if frac == 0.0 or lo + 1 >= n:
        return v_lo
    v_hi = x.kthvalue(lo + 2, dim=1, keepdim=True).values
    return v_lo + (v_hi - v_lo) * frac


def _soft_binarize(a: Tensor, q: float, k: float) -> Tensor:
    x = _work(a)
    tau = _quantile_rows(x.flatten(1), q).view(-1, 1, 1, 1)
    return torch.sigmoid(k * (x - tau)).to(a.dtype)


def _soft_dice(a: Tensor, b: Tensor, eps: float) -> Tensor:
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    x, y = _work(a).flatten(1), _work(b).flatten(1)
    inter = (x * y).sum(dim=1)
    total = x.sum(dim=1) + y.sum(dim=1)
    return (2 * inter / (total + eps)).to(out_dtype)


# ------------------------------------------------------------------------ soft metrics


def sobel_edges(a: Tensor, eps: float = 1e-6) -> Tensor:
    """Sobel gradient magnitude of the channel mean.

    The map is first averaged over channels (TriQDef, Algorithm 1), then differentiated
    with kornia's normalised 3x3 Sobel kernels (``[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] / 8``
    and its transpose, replicated border, as ``kornia.filters.spatial_gradient``), and the
    magnitude is ``sqrt(gx^2 + gy^2 + eps)``, so flat regions give ``sqrt(eps)`` and the
    derivative is finite everywhere. The result equals
    ``kornia.filters.sobel(a.mean(1, keepdim=True), eps=eps)`` up to rounding; the kernels
    are applied with ``kornia.filters.filter2d`` from a copy kept on the CPU, so no call
    waits for the CUDA stream.

    Args:
        a: feature map or input gradient.
        eps: positive constant added inside the square root.

    Returns:
        the edge magnitude map, in the dtype of ``a``.

    Shape:
        - Input: ``(B, C, H, W)``
        - Output: ``(B, 1, H, W)``

    Example:
        >>> x = torch.zeros(1, 3, 4, 4)
        >>> x[..., 2:] = 1.0
        >>> e = sobel_edges(x)[0, 0]
        >>> tuple(round(v, 3) for v in e[0].tolist())  # rounded: the last bits vary by CPU
        (0.001, 0.5, 0.5, 0.001)
        >>> torch.allclose(e, e[0].expand_as(e))  # every row is the same
        True
    """
    _check_map("sobel_edges", "a", a)
    eps = _check_real("sobel_edges", "eps", eps)
    return _sobel_edges(a, eps)


def soft_binarize(a: Tensor, q: float = 0.85, k: float = 100.0) -> Tensor:
    """Soft threshold at each sample's ``q``-quantile: ``sigmoid(k * (a - tau))``.

    ``tau`` is the ``q``-quantile (linear interpolation, as ``torch.quantile``) of all
    ``C * H * W`` values of a sample; it is part of the graph, so gradients also flow into
    the elements that define it. Inputs above ``torch.quantile``'s size limit use
    ``kthvalue`` with the same interpolation. Larger ``k`` gives a harder threshold.

    Args:
        a: map to binarize, e.g. the output of [`sobel_edges`][triqdef.functional.sobel_edges].
        q: quantile level in (0, 1); about ``1 - q`` of each sample ends above 0.5.
        k: positive sharpness of the sigmoid (in units of ``1 / a``).

    Returns:
        values in (0, 1), in the dtype of ``a``.

    Shape:
        - Input: ``(B, C, H, W)``
        - Output: ``(B, C, H, W)``

    Example:
        >>> x = torch.arange(16.0).view(1, 1, 4, 4)
        >>> (soft_binarize(x, q=0.75, k=10.0) > 0.5).sum().item()
        4
    """
    _check_map("soft_binarize", "a", a)
    q = _check_real("soft_binarize", "q", q, high=1.0)
    k = _check_real("soft_binarize", "k", k)
    return _soft_binarize(a, q, k)


def soft_dice(a: Tensor, b: Tensor, eps: float = 1e-6) -> Tensor:
    """Soft Dice coefficient per sample: ``2 sum(a b) / (sum(a) + sum(b) + eps)``.

    Sums run over all non-batch elements. For non-negative inputs the result lies in
    [0, 1] (1 for identical binary maps, up to ``eps``); it is symmetric in ``a`` and
    ``b``, and 0 when both are all-zero.

    Args:
        a: first map, typically [`soft_binarize`][triqdef.functional.soft_binarize] output
            (values in [0, 1]).
        b: second map, same shape as ``a``.
        eps: positive constant added to the denominator.

    Returns:
        one coefficient per sample, in the promoted dtype of ``a`` and ``b``.

    Shape:
        - Input: ``(B, C, H, W)`` for both
        - Output: ``(B,)``

    Example:
        >>> m = torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
        >>> tuple(round(v, 4) for v in soft_dice(m, m).tolist())
        (1.0,)
        >>> tuple(round(v, 4) for v in soft_dice(m, 1 - m).tolist())
        (0.0,)
    """
    a, b = _check_pair("soft_dice", a, b)
    eps = _check_real("soft_dice", "eps", eps)
    return _soft_dice(a, b, eps)


# ----------------------------------------------------------------------- hard metrics


def edge_iou(a: Tensor, b: Tensor, q: float = 0.85) -> Tensor:
    """Intersection over union of hard-binarised Sobel edge maps, per sample.

    A pixel is an edge where its [`sobel_edges`][triqdef.functional.sobel_edges] value
    (channel mean, eps 1e-6) is strictly above its sample's ``q``-quantile, so ties at the
    quantile are not edges. Both maps empty (e.g. constant inputs) count as IoU 1. Not
    differentiable (inputs are detached).

    Args:
        a: first map.
        b: second map, same shape as ``a``.
        q: quantile level in (0, 1).

    Returns:
        IoU per sample in [0, 1], in the promoted dtype of ``a`` and ``b``.

    Shape:
        - Input: ``(B, C, H, W)`` for both
        - Output: ``(B,)``

    Example:
        >>> x = torch.zeros(1, 1, 8, 8)
        >>> x[..., 4:] = 1.0
        >>> same, crossed = edge_iou(x, x, q=0.5), edge_iou(x, x.transpose(-1, -2), q=0.5)
        >>> round(same.item(), 4), round(crossed.item(), 4)  # rounded: last bits vary by CPU
        (1.0, 0.1429)
    """
    a, b = _check_pair("edge_iou", a, b)
    q = _check_real("edge_iou", "q", q, high=1.0)
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    with torch.no_grad():
        masks = []
        for x in (a, b):
            e = _sobel_edges(x.detach(), 1e-6).flatten(1)
            masks.append(e > _quantile_rows(e, q))
        inter = (masks[0] & masks[1]).sum(dim=1)
        union = (masks[0] | masks[1]).sum(dim=1)
        iou = torch.where(union > 0, inter / union.clamp(min=1), 1.0)
    return iou.to(out_dtype)


def gradient_cosine(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine similarity of the flattened samples of ``a`` and ``b`` (e.g. input gradients).

    Each norm is floored at ``eps`` (zero samples give 0); the result is clamped to
    [-1, 1], is exactly symmetric and differentiable.

    Args:
        a: first tensor.
        b: second tensor, same shape as ``a``.
        eps: positive floor of each norm.

    Returns:
        cosine per sample, in the promoted dtype of ``a`` and ``b``.

    Shape:
        - Input: ``(B, C, H, W)`` for both
        - Output: ``(B,)``

    Example:
        >>> g = torch.ones(2, 1, 2, 2)
        >>> tuple(round(v, 4) for v in gradient_cosine(g, -g).tolist())
        (-1.0, -1.0)
    """
    a, b = _check_pair("gradient_cosine", a, b)
    eps = _check_real("gradient_cosine", "eps", eps)
    out_dtype = torch.promote_types(a.dtype, b.dtype)
    return _cosine_rows(_work(a).flatten(1), _work(b).flatten(1), eps).to(out_dtype)


# ------------------------------------------------------------------------ module twins


class SobelEdges(nn.Module):
    """Module form of [`sobel_edges`][triqdef.functional.sobel_edges].

    It holds no kernel: the Sobel kernels are kornia's, shared by all callers and kept on
    the CPU, so the module has no parameters or buffers and moves freely between devices.

    Args:
        eps: positive constant added inside the square root.

    Shape:
        - Input: ``(B, C, H, W)``
        - Output: ``(B, 1, H, W)``

    Example:
        >>> SobelEdges()(torch.rand(2, 3, 5, 5)).shape
        torch.Size([2, 1, 5, 5])
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = _check_real("SobelEdges", "eps", eps, err=ConfigError)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def forward(self, a: Tensor) -> Tensor:
        _check_map("SobelEdges", "a", a)
        return _sobel_edges(a, self.eps)


class SoftBinarize(nn.Module):
    """Module form of [`soft_binarize`][triqdef.functional.soft_binarize].

    Args:
        q: quantile level in (0, 1).
        k: positive sigmoid sharpness.

    Shape:
        - Input: ``(B, C, H, W)``
        - Output: ``(B, C, H, W)``

    Example:
        >>> SoftBinarize(q=0.9, k=50.0)
        SoftBinarize(q=0.9, k=50.0)
    """

    def __init__(self, q: float = 0.85, k: float = 100.0) -> None:
        super().__init__()
        self.q = _check_real("SoftBinarize", "q", q, high=1.0, err=ConfigError)
        self.k = _check_real("SoftBinarize", "k", k, err=ConfigError)

    def extra_repr(self) -> str:
        return f"q={self.q}, k={self.k}"

    def forward(self, a: Tensor) -> Tensor:
        _check_map("SoftBinarize", "a", a)
        return _soft_binarize(a, self.q, self.k)


class SoftDice(nn.Module):
    """Module form of [`soft_dice`][triqdef.functional.soft_dice].

    Args:
        eps: positive constant added to the denominator.

    Shape:
        - Input: ``(B, C, H, W)`` for both
        - Output: ``(B,)``

    Example:
        >>> m = torch.ones(1, 1, 2, 2)
        >>> tuple(round(v, 4) for v in SoftDice()(m, m).tolist())
        (1.0,)
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = _check_real("SoftDice", "eps", eps, err=ConfigError)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = _check_pair("SoftDice", a, b)
        return _soft_dice(a, b, self.eps)
