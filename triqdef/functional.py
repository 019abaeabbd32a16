"""Perceptual metrics on feature maps and input gradients (TriQDef, Algorithm 1).

Every function takes tensors of shape ``(B, C, H, W)`` and returns one value (or one
descriptor) per sample, so a training step can compute a descriptor once and compare it
with several others. The soft functions (:func:`sobel_edges`, :func:`soft_binarize`,
:func:`soft_dice`, :func:`soft_hog`) are differentiable to second order with finite
gradients everywhere, including all-zero and constant maps. The hard functions
(:func:`edge_iou`, :func:`hog`, :func:`hog_cosine`) are for analysis and reporting.

Conventions shared by all functions:

* Inputs must be floating tensors with four dimensions, none of them empty; anything else
  raises :class:`~triqdef.errors.InputError` (a ``TypeError`` and a ``ValueError``).
* ``float16`` and ``bfloat16`` inputs are computed in ``float32`` and the result is cast
  back to the input dtype. No function calls an op that autocast lowers (there is no
  convolution or matmul: the Sobel filter is applied in separable form), so inside an
  autocast region ``float32`` inputs stay ``float32``.
* Nothing reads tensor values on the host: there is no ``.item()``, ``.cpu()`` or Python
  branching on data, only on shapes, so the functions never synchronise a CUDA stream
  and trace cleanly.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, InputError

__all__ = [
    "SobelEdges",
    "SoftBinarize",
    "SoftDice",
    "SoftHOG",
    "descriptor_cosine",
    "edge_iou",
    "gradient_cosine",
    "hog",
    "hog_cosine",
    "sobel_edges",
    "soft_binarize",
    "soft_dice",
    "soft_hog",
]

# torch.quantile refuses inputs above this many elements in some releases; larger inputs
# use two kthvalue calls instead (same linear interpolation, same result).
_QUANTILE_MAX_NUMEL = 2**24
# L2-Hys clipping threshold and normalisation epsilon used by scikit-image's HOG.
_HYS_CLIP = 0.2
_SKIMAGE_EPS = 1e-5
_LOW_PRECISION = (torch.float16, torch.bfloat16)


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
    ok = (
        not isinstance(value, bool)
        and isinstance(value, numbers.Real)
        and math.isfinite(float(value))
        and low < float(value)
        and (float(value) <= high if closed_high else float(value) < high)
    )
    if not ok:
        bracket = "]" if closed_high else ")"
        raise err(f"{fn}: `{name}` must be a real number in ({low}, {high}{bracket}, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------- helpers


def _work(x: Tensor) -> Tensor:
    """Upcast half precision to float32 (quantile, atan2 and sums need the range)."""
    return x.float() if x.dtype in _LOW_PRECISION else x


def _replicate_pad(x: Tensor) -> Tensor:
    """Pad the last two dims by one replicated pixel on every side.

    Concatenation instead of ``F.pad(mode='replicate')``: differentiable to any order and
    cheap on tiny maps.
    """
    x = torch.cat([x[..., :1], x, x[..., -1:]], dim=-1)
    return torch.cat([x[..., :1, :], x, x[..., -1:, :]], dim=-2)


def _sobel_xy(x: Tensor) -> tuple[Tensor, Tensor]:
    """Normalised 3x3 Sobel derivatives (d/dx, d/dy) with replicated borders.

    Separable form of the kernels ``[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]] / 8`` (and their
    transpose) that ``kornia.filters.spatial_gradient(x, 'sobel', normalized=True)``
    applies: equal results, but no convolution, so no kernel tensor is copied to the
    device on every call (a stream sync on CUDA) and autocast leaves the dtype alone.
    """
    xp = _replicate_pad(x)  # (..., H + 2, W + 2)
    dx = xp[..., :, 2:] - xp[..., :, :-2]  # (..., H + 2, W)
    dy = xp[..., 2:, :] - xp[..., :-2, :]  # (..., H, W + 2)
    gx = (dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]) / 8
    gy = (dy[..., :-2] + 2 * dy[..., 1:-1] + dy[..., 2:]) / 8
    return gx, gy


def _sobel_edges(a: Tensor, eps: float) -> Tensor:
    x = _work(a).mean(dim=1, keepdim=True)
    gx, gy = _sobel_xy(x)
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


def _central_gradients(x: Tensor) -> tuple[Tensor, Tensor]:
    """Central differences ``(x[i+1] - x[i-1]) / 2`` with replicated borders."""
    xp = _replicate_pad(x)
    gx = (xp[..., 1:-1, 2:] - xp[..., 1:-1, :-2]) / 2
    gy = (xp[..., 2:, 1:-1] - xp[..., :-2, 1:-1]) / 2
    return gx, gy


def _cell_sums(v: Tensor, ch: int, cw: int) -> Tensor:
    """Sum (N, K, H, W) over non-overlapping ``ch x cw`` cells; trailing pixels dropped."""
    n, k, h, w = v.shape
    hc, wc = h // ch, w // cw
    v = v[..., : hc * ch, : wc * cw]
    return v.reshape(n, k, hc, ch, wc, cw).sum(dim=(3, 5))


def _block_normalize(hist: Tensor, block: int, eps: float, clip: float | None) -> Tensor:
    """(N, n, Hc, Wc) cell histograms -> (N, D) block descriptors.

    Blocks are laid out as (n_blocks_row, n_blocks_col, block, block, n), like scikit-image.
    """
    blocks = hist.unfold(2, block, 1).unfold(3, block, 1)  # (N, n, Br, Bc, k, k)
    blocks = blocks.permute(0, 2, 3, 4, 5, 1)  # (N, Br, Bc, k, k, n)
    dims = (3, 4, 5)
    e2 = eps * eps
    out = blocks / torch.sqrt(blocks.square().sum(dim=dims, keepdim=True) + e2)
    if clip is not None:
        out = out.clamp(max=clip)
        out = out / torch.sqrt(out.square().sum(dim=dims, keepdim=True) + e2)
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
    """HOG of every channel separately, concatenated per sample (see :func:`soft_hog`)."""
    b, c, h, w = a.shape
    ch, cw, k = _hog_geometry(h, w, cell, block)
    x = _work(a).reshape(b * c, 1, h, w)
    gx, gy = _central_gradients(x)
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
    desc = _block_normalize(hist, k, eps, clip)
    return desc.reshape(b, -1).to(a.dtype)


def _skimage_hog(a: Tensor, cell: int, block: int, orientations: int) -> Tensor:
    """Replicates ``skimage.feature.hog(..., block_norm='L2-Hys')`` (see :func:`hog`)."""
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


def _cosine_rows(x: Tensor, y: Tensor, eps: float) -> Tensor:
    dot = (x * y).sum(dim=1)
    nx = torch.sqrt(x.square().sum(dim=1)).clamp(min=eps)
    ny = torch.sqrt(y.square().sum(dim=1)).clamp(min=eps)
    return (dot / (nx * ny)).clamp(-1.0, 1.0)


# ------------------------------------------------------------------------ soft metrics


def sobel_edges(a: Tensor, eps: float = 1e-6) -> Tensor:
    r"""Sobel gradient magnitude of the channel mean.

    The map is first averaged over channels (TriQDef, Algorithm 1), then differentiated
    with the normalised 3x3 Sobel kernels of ``kornia.filters.spatial_gradient``
    (replicated border), and the magnitude is :math:`\sqrt{g_x^2 + g_y^2 + \epsilon}`, so
    flat regions give :math:`\sqrt{\epsilon}` and the derivative is finite everywhere. The
    result equals ``kornia.filters.sobel(a.mean(1, keepdim=True), eps=eps)`` up to
    rounding; the filter is applied in separable form (slices, no convolution), so no
    kernel is copied to the device on each call.

    Args:
        a: feature map or input gradient.
        eps: positive constant added inside the square root.

    Returns:
        the edge magnitude map, in the dtype of ``a``.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, 1, H, W)`

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
    r"""Soft threshold at each sample's ``q``-quantile: :math:`\sigma(k (a - \tau))`.

    :math:`\tau` is the ``q``-quantile (linear interpolation, as ``torch.quantile``) of all
    ``C * H * W`` values of a sample; it is part of the graph, so gradients also flow into
    the elements that define it. Inputs above ``torch.quantile``'s size limit use
    ``kthvalue`` with the same interpolation. Larger ``k`` gives a harder threshold.

    Args:
        a: map to binarize, e.g. the output of :func:`sobel_edges`.
        q: quantile level in (0, 1); about ``1 - q`` of each sample ends above 0.5.
        k: positive sharpness of the sigmoid (in units of ``1 / a``).

    Returns:
        values in (0, 1), in the dtype of ``a``.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`

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
    r"""Soft Dice coefficient per sample: :math:`2 \sum ab / (\sum a + \sum b + \epsilon)`.

    Sums run over all non-batch elements. For non-negative inputs the result lies in
    [0, 1] (1 for identical binary maps, up to ``eps``); it is symmetric in ``a`` and
    ``b``, and 0 when both are all-zero.

    Args:
        a: first map, typically :func:`soft_binarize` output (values in [0, 1]).
        b: second map, same shape as ``a``.
        eps: positive constant added to the denominator.

    Returns:
        one coefficient per sample, in the promoted dtype of ``a`` and ``b``.

    Shape:
        - Input: :math:`(B, C, H, W)` for both
        - Output: :math:`(B,)`

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


def soft_hog(
    a: Tensor,
    cell: int = 4,
    block: int = 2,
    orientations: int = 9,
    eps: float = 1e-6,
    clip: float | None = None,
) -> Tensor:
    r"""Differentiable histogram of oriented gradients, one descriptor per sample.

    Steps: central differences with replicated borders; magnitude
    :math:`\sqrt{g_x^2 + g_y^2 + \epsilon^2} - \epsilon` (0 on flat regions, smooth);
    unsigned orientation in :math:`[0, \pi)`, because input gradients flip sign under
    small perturbations and an edge is the same edge either way; soft binning: each pixel
    splits its magnitude linearly between the two nearest of ``orientations`` bin centres
    (centre ``i`` at :math:`(i + 1/2)\pi / n`, circular, no argmax); cell histograms by
    sum pooling over ``cell x cell`` pixels (trailing rows/columns that do not fill a cell
    are ignored); each ``block x block`` group of cells (stride one cell) is L2
    normalised, :math:`v / \sqrt{\|v\|^2 + \epsilon^2}`, and with ``clip`` set also
    clipped at ``clip`` and renormalised (L2-Hys). The default ``clip=None`` keeps the
    strongest orientations trainable (clipped entries have zero gradient).

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
        orientations: number of orientation bins over :math:`[0, \pi)` (positive).
        eps: positive guard of the magnitude and of the block normalisation.
        clip: ``None`` for plain L2, or the L2-Hys threshold in (0, 1].

    Returns:
        non-negative descriptors, in the dtype of ``a``.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, D)` with ``D = C * D_1`` as above

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


# ----------------------------------------------------------------------- hard metrics


def edge_iou(a: Tensor, b: Tensor, q: float = 0.85) -> Tensor:
    r"""Intersection over union of hard-binarised Sobel edge maps, per sample.

    A pixel is an edge where its :func:`sobel_edges` value (channel mean, eps 1e-6) is
    strictly above its sample's ``q``-quantile, so ties at the quantile are not edges.
    Both maps empty (e.g. constant inputs) count as IoU 1. Not differentiable (inputs are
    detached).

    Args:
        a: first map.
        b: second map, same shape as ``a``.
        q: quantile level in (0, 1).

    Returns:
        IoU per sample in [0, 1], in the promoted dtype of ``a`` and ``b``.

    Shape:
        - Input: :math:`(B, C, H, W)` for both
        - Output: :math:`(B,)`

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


def hog(
    a: Tensor,
    cell: int = 8,
    block: int = 2,
    orientations: int = 9,
    skimage_compatible: bool = False,
) -> Tensor:
    r"""Histogram of oriented gradients with hard orientation binning (analysis).

    With ``skimage_compatible=False`` this is :func:`soft_hog` with hard binning (bin
    ``i`` holds unsigned orientations in :math:`[i\pi/n, (i+1)\pi/n)`), L2-Hys block
    normalisation (clip 0.2, guard 1e-6), the same per-channel rule and the same
    small-map rule, so any map of at least 1 x 1 works.

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
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, D)`; compatible mode:
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
    r"""Cosine similarity of per-sample descriptors, e.g. precomputed :func:`soft_hog`.

    Use it to compare one descriptor with several others without recomputing it.
    Each norm is floored at ``eps``, so all-zero rows give 0; the result is clamped to
    [-1, 1] and is exactly symmetric.

    Args:
        da: descriptors, shape (B, D) (more dims are flattened per sample).
        db: descriptors, same shape as ``da``.
        eps: positive floor of each norm.

    Returns:
        cosine per sample, in the promoted dtype.

    Shape:
        - Input: :math:`(B, D)` for both
        - Output: :math:`(B,)`

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


def hog_cosine(a: Tensor, b: Tensor, **hog_kwargs: object) -> Tensor:
    r"""Cosine similarity of the :func:`hog` descriptors of ``a`` and ``b``.

    HOG descriptors are non-negative, so the result is in [0, 1]. To compare one map
    with many, compute :func:`hog` once and use :func:`descriptor_cosine`.

    Args:
        a: first map.
        b: second map, same shape as ``a``.
        **hog_kwargs: ``cell``, ``block``, ``orientations``, ``skimage_compatible``,
            forwarded to :func:`hog`.

    Returns:
        cosine per sample in [0, 1].

    Shape:
        - Input: :math:`(B, C, H, W)` for both
        - Output: :math:`(B,)`

    Example:
        >>> torch.manual_seed(0) is not None
        True
        >>> x = torch.rand(2, 1, 16, 16)
        >>> tuple(round(v, 4) for v in hog_cosine(x, x, cell=4).tolist())  # rounded
        (1.0, 1.0)
    """
    a, b = _check_pair("hog_cosine", a, b)
    return descriptor_cosine(hog(a, **hog_kwargs), hog(b, **hog_kwargs))


def gradient_cosine(a: Tensor, b: Tensor, eps: float = 1e-12) -> Tensor:
    r"""Cosine similarity of the flattened samples of ``a`` and ``b`` (e.g. input gradients).

    Each norm is floored at ``eps`` (zero samples give 0); the result is clamped to
    [-1, 1], is exactly symmetric and differentiable.

    Args:
        a: first tensor.
        b: second tensor, same shape as ``a``.
        eps: positive floor of each norm.

    Returns:
        cosine per sample, in the promoted dtype of ``a`` and ``b``.

    Shape:
        - Input: :math:`(B, C, H, W)` for both
        - Output: :math:`(B,)`

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
    r"""Module form of :func:`sobel_edges`.

    It holds no kernel: the Sobel filter is applied in separable form, so there is no
    constant tensor to register and the module has no parameters or buffers.

    Args:
        eps: positive constant added inside the square root.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, 1, H, W)`

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
    r"""Module form of :func:`soft_binarize`.

    Args:
        q: quantile level in (0, 1).
        k: positive sigmoid sharpness.

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, C, H, W)`

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
    r"""Module form of :func:`soft_dice`.

    Args:
        eps: positive constant added to the denominator.

    Shape:
        - Input: :math:`(B, C, H, W)` for both
        - Output: :math:`(B,)`

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


class SoftHOG(nn.Module):
    r"""Module form of :func:`soft_hog` (same channel and small-map rules).

    Args:
        cell: cell side in pixels.
        block: block side in cells.
        orientations: number of unsigned orientation bins.
        eps: positive guard of the magnitude and of the block normalisation.
        clip: ``None`` for L2, or the L2-Hys threshold in (0, 1].

    Shape:
        - Input: :math:`(B, C, H, W)`
        - Output: :math:`(B, D)`

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
