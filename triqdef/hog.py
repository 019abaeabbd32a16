"""Histograms of oriented gradients: differentiable `soft_hog`, hard `hog`, their cosines.

Everything here is re-exported by `triqdef.functional`, which documents the conventions
(input checks, half precision, no host synchronisation) shared by all perceptual metrics.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, reduce
from torch import Tensor, nn

from ._maps import _check_int, _check_map, _check_pair, _check_real, _cosine_rows, _gradients, _work
from .errors import ConfigError, InputError

__all__ = ["SoftHOG", "descriptor_cosine", "hog", "hog_cosine", "soft_hog"]

# L2-Hys clipping threshold and normalisation epsilon used by scikit-image's HOG.
_HYS_CLIP = 0.2
_SKIMAGE_EPS = 1e-5


# ----------------------------------------------------------------------------- helpers


def _hog_geometry(h: int, w: int, cell: int, block: int) -> tuple[int, int, int]:
    """Cell height, cell width and block size actually used for an ``h x w`` map.

    1. ``min(h, w) >= cell * block``: ``cell x cell`` cells, ``block x block`` blocks.
    2. else ``min(h, w) >= block``: cells shrink to ``c x c`` with ``c = min(h, w) // block``.
    3. else: one ``h x w`` cell covering the whole map and ``block = 1``.
    """
    m = min(h, w)
    if m >= cell * block:
        return cell, cell, block
    if m >= block:
        c = m // block
        return c, c, block
    return h, w, 1


def _cell_sums(v: Tensor, ch: int, cw: int) -> Tensor:
    """Sum (N, K, H, W) over non-overlapping ``ch x cw`` cells; trailing pixels dropped."""
    hc, wc = v.shape[2] // ch, v.shape[3] // cw
    v = v[..., : hc * ch, : wc * cw]
    return reduce(v, "n k (hc ch) (wc cw) -> n k hc wc", "sum", ch=ch, cw=cw)


def _block_normalize(hist: Tensor, block: int, eps: float, clip: float | None) -> Tensor:
    """(N, n, Hc, Wc) cell histograms -> (N, D) block descriptors.

    Blocks (stride one cell) are laid out as (n_blocks_row, n_blocks_col, block, block, n),
    like scikit-image.
    """
    windows = hist.unfold(2, block, 1).unfold(3, block, 1)  # (N, n, Br, Bc, block, block)
    blocks = rearrange(windows, "N n br bc kr kc -> N br bc (kr kc n)")
    e2 = eps * eps
    out = blocks / torch.sqrt(blocks.square().sum(dim=-1, keepdim=True) + e2)
    if clip is not None:
        out = out.clamp(max=clip)
        out = out / torch.sqrt(out.square().sum(dim=-1, keepdim=True) + e2)
    return out.flatten(1)


def _oriented_hog(
    a: Tensor,
    cell: int,
    block: int,
    orientations: int,
    eps: float,
    clip: float | None,
    soft: bool,
) -> Tensor:
    """HOG of every channel separately, concatenated per sample (see `soft_hog`)."""
    b, c, h, w = a.shape
    ch, cw, k = _hog_geometry(h, w, cell, block)
    x = rearrange(_work(a), "b c h w -> (b c) 1 h w")
    gx, gy = _gradients(x, "diff")  # central differences, replicated border
    r2 = gx.square() + gy.square()
    e2 = eps * eps
    # sqrt(r2 + eps^2) - eps, written without cancellation: exactly 0 on flat regions and
    # smooth at 0, so first and second derivatives stay finite.
    mag = r2 / (torch.sqrt(r2 + e2) + eps)
    # atan2 has a 0/0 derivative at the origin: feed it a fixed direction there (double
    # where), the magnitude weight of such pixels is below 0.42 * eps anyway.
    safe = r2 > e2
    theta = torch.atan2(torch.where(safe, gy, 0.0), torch.where(safe, gx, 1.0))
    # Unsigned orientation in [0, pi], in units of bins.
    t = torch.remainder(theta, math.pi) * (orientations / math.pi)
    bins = torch.arange(orientations, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    if soft:
        # Linear interpolation between the two nearest bin centres (centre i at t = i + 0.5).
        t = t - 0.5
        lo = torch.floor(t)
        frac = t - lo
        lo_bin = torch.remainder(lo, orientations)
        hi_bin = torch.remainder(lo + 1, orientations)
        votes = torch.where(lo_bin == bins, mag - mag * frac, 0.0)
        votes = votes + torch.where(hi_bin == bins, mag * frac, 0.0)
    else:
        votes = torch.where(torch.remainder(torch.floor(t), orientations) == bins, mag, 0.0)
    hist = _cell_sums(votes, ch, cw)  # (B*C, n, Hc, Wc)
    desc = _block_normalize(hist, k, eps, clip)  # (B*C, D_1)
    return rearrange(desc, "(b c) d -> b (c d)", b=b).to(a.dtype)


def _skimage_hog(a: Tensor, cell: int, block: int, orientations: int) -> Tensor:
    """Replicates ``skimage.feature.hog(..., block_norm='L2-Hys')`` (see `hog`)."""
    c, h, w = a.shape[1:]
    x = _work(a)
    zeros = torch.zeros_like(x)
    # np.empty + zero border rows/cols + interior central differences (no division by 2).
    g_row = F.pad(x[..., 2:, :] - x[..., :-2, :], (0, 0, 1, 1)) if h >= 3 else zeros
    g_col = F.pad(x[..., :, 2:] - x[..., :, :-2], (1, 1)) if w >= 3 else zeros
    if c > 1:
        # skimage with channel_axis: per pixel, the channel of largest gradient magnitude.
        idx = torch.hypot(g_row, g_col).argmax(dim=1, keepdim=True)
        g_row, g_col = g_row.gather(1, idx), g_col.gather(1, idx)
    mag = torch.hypot(g_row, g_col)
    ori = torch.remainder(torch.rad2deg(torch.atan2(g_row, g_col)), 180.0)
    # Bin edges are single-precision products in skimage's Cython code; reproduce them so
    # pixels right on an edge land in the same bin (and none lands above the last edge).
    step = torch.full((), 180.0 / orientations, dtype=torch.float32, device=x.device)
    edges = (torch.arange(orientations + 1, device=x.device, dtype=torch.float32) * step).to(
        x.dtype
    )
    lower = edges[:-1].view(1, -1, 1, 1)
    upper = edges[1:].view(1, -1, 1, 1)
    votes = torch.where((ori >= lower) & (ori < upper), mag, 0.0)  # (B, n, H, W)
    hist = _cell_sums(votes, cell, cell) / (cell * cell)
    return _block_normalize(hist, block, _SKIMAGE_EPS, _HYS_CLIP).to(a.dtype)


# ----------------------------------------------------------------------- descriptors


def soft_hog(
    a: Tensor,
    cell: int = 4,
    block: int = 2,
    orientations: int = 9,
    eps: float = 1e-6,
    clip: float | None = None,
) -> Tensor:
    """Differentiable histogram of oriented gradients, one descriptor per sample.

    Steps: central differences with replicated borders
    (`kornia.filters.spatial_gradient` in ``"diff"`` mode); magnitude
    ``sqrt(gx^2 + gy^2 + eps^2) - eps`` (0 on flat regions, smooth); unsigned orientation
    in ``[0, pi)``, because input gradients flip sign under small perturbations and an
    edge is the same edge either way; soft binning: each pixel splits its magnitude
    linearly between the two nearest of ``orientations`` bin centres (centre ``i`` at
    ``(i + 1/2) * pi / n``, circular, no argmax); cell histograms by sum pooling over
    ``cell x cell`` pixels (trailing rows/columns that do not fill a cell are ignored);
    each ``block x block`` group of cells (stride one cell) is L2 normalised,
    ``v / sqrt(||v||^2 + eps^2)``, and with ``clip`` set also clipped at ``clip`` and
    renormalised (L2-Hys). The default ``clip=None`` keeps the strongest orientations
    trainable (clipped entries have zero gradient).

    Channels: every channel is its own map. The descriptor is the concatenation of the
    per-channel descriptors (channel-major), so ``D = C * D_1``. Averaging channels first
    would let opposite-signed channels of an input gradient cancel and would mix unrelated
    feature channels into one edge field; per-channel HOG keeps that structure and costs
    linear time in ``C``. To get one HOG of the channel mean, pass
    ``a.mean(1, keepdim=True)``.

    Small maps: with ``m = min(H, W)``,

    1. ``m >= cell * block``: the given ``cell`` and ``block``;
    2. else if ``m >= block``: square cells of side ``m // block``, same ``block``;
    3. else: one ``H x W`` cell covering the whole map and ``block = 1`` (``D_1 = n``).

    Then ``D_1 = (H // ch - k + 1) * (W // cw - k + 1) * k * k * orientations`` with the
    cell ``ch x cw`` and block ``k`` chosen above; any map of at least 1 x 1 works and
    no division by zero can happen.

    Args:
        a: feature map or input gradient. ``eps`` is a length in the units of ``a``:
            rescale maps whose gradients are far below it (e.g. tiny input gradients).
        cell: cell side in pixels (positive).
        block: block side in cells (positive).
        orientations: number of orientation bins over ``[0, pi)`` (positive).
        eps: positive guard of the magnitude and of the block normalisation.
        clip: ``None`` for plain L2, or the L2-Hys threshold in (0, 1].

    Returns:
        non-negative descriptors, in the dtype of ``a``.

    Shape:
        - Input: ``(B, C, H, W)``
        - Output: ``(B, D)`` with ``D = C * D_1`` as above

    Example:
        >>> torch.manual_seed(0) is not None
        True
        >>> soft_hog(torch.rand(2, 3, 16, 16)).shape  # 3 channels x 3x3 blocks x 2x2 x 9
        torch.Size([2, 972])
        >>> soft_hog(torch.rand(1, 1, 1, 5)).shape  # smaller than one block: one cell
        torch.Size([1, 9])
    """
    _check_map("soft_hog", "a", a)
    cell = _check_int("soft_hog", "cell", cell)
    block = _check_int("soft_hog", "block", block)
    orientations = _check_int("soft_hog", "orientations", orientations)
    eps = _check_real("soft_hog", "eps", eps)
    if clip is not None:
        clip = _check_real("soft_hog", "clip", clip, high=1.0, closed_high=True)
    return _oriented_hog(a, cell, block, orientations, eps, clip, soft=True)


def hog(
    a: Tensor,
    cell: int = 8,
    block: int = 2,
    orientations: int = 9,
    skimage_compatible: bool = False,
) -> Tensor:
    """Histogram of oriented gradients with hard orientation binning (analysis).

    With ``skimage_compatible=False`` this is [`soft_hog`][triqdef.functional.soft_hog]
    with hard binning (bin ``i`` holds unsigned orientations in
    ``[i * pi / n, (i + 1) * pi / n)``), L2-Hys block normalisation (clip 0.2, guard
    1e-6), the same per-channel rule and the same small-map rule, so any map of at least
    1 x 1 works.

    With ``skimage_compatible=True`` it reproduces
    ``skimage.feature.hog(img, orientations, pixels_per_cell=(cell, cell),
    cells_per_block=(block, block), block_norm='L2-Hys', feature_vector=True)``:
    undivided central differences with zero gradient on the border rows/columns,
    orientations in degrees modulo 180 with skimage's single-precision bin edges, each
    pixel voting its magnitude into exactly one bin, cell histograms divided by the cell
    area, ``H // cell`` by ``W // cell`` cells (trailing pixels ignored), L2-Hys with
    eps 1e-5, blocks laid out as (n_blocks_row, n_blocks_col, block, block, n). For
    ``C > 1`` it matches skimage's ``channel_axis`` mode: at every pixel the channel of
    largest gradient magnitude supplies the gradient (so ``D`` does not grow with ``C``).
    Like skimage, it raises when ``H`` or ``W`` is below ``cell * block``.

    Args:
        a: map(s) to describe.
        cell: cell side in pixels (positive).
        block: block side in cells (positive).
        orientations: number of orientation bins (positive).
        skimage_compatible: reproduce scikit-image exactly (see above).

    Returns:
        non-negative descriptors, in the dtype of ``a``.

    Raises:
        InputError: bad input, or in compatible mode a map smaller than one block.

    Shape:
        - Input: ``(B, C, H, W)``
        - Output: ``(B, D)``; compatible mode:
          ``D = (H // cell - block + 1) * (W // cell - block + 1) * block**2 * n``

    Example:
        >>> torch.manual_seed(0) is not None
        True
        >>> hog(torch.rand(2, 1, 32, 24), skimage_compatible=True).shape  # 3x2 blocks
        torch.Size([2, 216])
    """
    _check_map("hog", "a", a)
    cell = _check_int("hog", "cell", cell)
    block = _check_int("hog", "block", block)
    orientations = _check_int("hog", "orientations", orientations)
    if not skimage_compatible:
        return _oriented_hog(a, cell, block, orientations, 1e-6, _HYS_CLIP, soft=False)
    h, w = a.shape[-2:]
    if min(h, w) < cell * block:
        raise InputError(
            f"hog: with skimage_compatible=True the map must be at least cell * block = "
            f"{cell * block} pixels high and wide, got shape {tuple(a.shape)}"
        )
    return _skimage_hog(a, cell, block, orientations)


def descriptor_cosine(da: Tensor, db: Tensor, eps: float = 1e-12) -> Tensor:
    """Cosine similarity of per-sample descriptors, e.g. precomputed HOG descriptors.

    Use it to compare one descriptor (say a [`soft_hog`][triqdef.functional.soft_hog]
    output) with several others without recomputing it.
    Each norm is floored at ``eps``, so all-zero rows give 0; the result is clamped to
    [-1, 1] and is exactly symmetric.

    Args:
        da: descriptors, shape (B, D) (more dims are flattened per sample).
        db: descriptors, same shape as ``da``.
        eps: positive floor of each norm.

    Returns:
        cosine per sample, in the promoted dtype.

    Shape:
        - Input: ``(B, D)`` for both
        - Output: ``(B,)``

    Example:
        >>> c = descriptor_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]))
        >>> tuple(round(v, 4) for v in c.tolist())
        (0.7071,)
    """
    fn = "descriptor_cosine"
    for name, d in (("da", da), ("db", db)):
        if not isinstance(d, Tensor):
            raise InputError(f"{fn}: `{name}` must be a torch.Tensor, got {type(d).__name__}")
        if d.ndim < 2 or not d.is_floating_point() or d.numel() == 0:
            raise InputError(
                f"{fn}: `{name}` must be a non-empty floating tensor of shape (B, D), got "
                f"{d.dtype} with shape {tuple(d.shape)}"
            )
    if da.shape != db.shape:
        raise InputError(
            f"{fn}: `da` and `db` must have the same shape, got {tuple(da.shape)} and "
            f"{tuple(db.shape)}"
        )
    eps = _check_real(fn, "eps", eps)
    out_dtype = torch.promote_types(da.dtype, db.dtype)
    return _cosine_rows(_work(da).flatten(1), _work(db).flatten(1), eps).to(out_dtype)


def hog_cosine(a: Tensor, b: Tensor, **hog_kwargs: Any) -> Tensor:
    """Cosine similarity of the [`hog`][triqdef.functional.hog] descriptors of ``a`` and ``b``.

    HOG descriptors are non-negative, so the result is in [0, 1]. To compare one map
    with many, compute [`hog`][triqdef.functional.hog] once and use
    [`descriptor_cosine`][triqdef.functional.descriptor_cosine].

    Args:
        a: first map.
        b: second map, same shape as ``a``.
        **hog_kwargs: ``cell``, ``block``, ``orientations``, ``skimage_compatible``,
            forwarded to [`hog`][triqdef.functional.hog].

    Returns:
        cosine per sample in [0, 1].

    Shape:
        - Input: ``(B, C, H, W)`` for both
        - Output: ``(B,)``

    Example:
        >>> torch.manual_seed(0) is not None
        True
        >>> x = torch.rand(2, 1, 16, 16)
        >>> tuple(round(v, 4) for v in hog_cosine(x, x, cell=4).tolist())  # rounded
        (1.0, 1.0)
    """
    a, b = _check_pair("hog_cosine", a, b)
    return descriptor_cosine(hog(a, **hog_kwargs), hog(b, **hog_kwargs))


# ------------------------------------------------------------------------- module twin


class SoftHOG(nn.Module):
    """Module form of [`soft_hog`][triqdef.functional.soft_hog].

    Same channel and small-map rules as the function.

    Args:
        cell: cell side in pixels.
        block: block side in cells.
        orientations: number of unsigned orientation bins.
        eps: positive guard of the magnitude and of the block normalisation.
        clip: ``None`` for L2, or the L2-Hys threshold in (0, 1].

    Shape:
        - Input: ``(B, C, H, W)``
        - Output: ``(B, D)``

    Example:
        >>> SoftHOG(cell=8)
        SoftHOG(cell=8, block=2, orientations=9, eps=1e-06, clip=None)
        >>> SoftHOG()(torch.rand(1, 2, 8, 8)).shape  # 2 channels x 1 block x 2x2 x 9
        torch.Size([1, 72])
    """

    def __init__(
        self,
        cell: int = 4,
        block: int = 2,
        orientations: int = 9,
        eps: float = 1e-6,
        clip: float | None = None,
    ) -> None:
        super().__init__()
        name = "SoftHOG"
        self.cell = _check_int(name, "cell", cell, err=ConfigError)
        self.block = _check_int(name, "block", block, err=ConfigError)
        self.orientations = _check_int(name, "orientations", orientations, err=ConfigError)
        self.eps = _check_real(name, "eps", eps, err=ConfigError)
        self.clip = (
            None
            if clip is None
            else _check_real(name, "clip", clip, high=1.0, closed_high=True, err=ConfigError)
        )

    def extra_repr(self) -> str:
        return (
            f"cell={self.cell}, block={self.block}, orientations={self.orientations}, "
            f"eps={self.eps}, clip={self.clip}"
        )

    def forward(self, a: Tensor) -> Tensor:
        _check_map("SoftHOG", "a", a)
        return _oriented_hog(
            a, self.cell, self.block, self.orientations, self.eps, self.clip, soft=True
        )
