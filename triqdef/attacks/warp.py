"""The EOT warp: patches rotated, scaled and placed in one batch, with a deterministic backward."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from kornia.geometry.transform import get_rotation_matrix2d, warp_affine
from torch import Tensor

from .regions import Box, _region_pixels

__all__ = ["sample_eot", "warp_patch"]


def sample_eot(
    n: int,
    image_size: tuple[int, int],
    patch_size: tuple[int, int],
    max_rotation: float,
    scale_range: tuple[float, float],
    rand: Callable[[int], Tensor],
    box: Box = (0.0, 0.0, 1.0, 1.0),
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``n`` random rotations, scales and centres for ``warp_patch``.

    The centre is drawn so that the rotated, scaled patch lies inside the region
    ``box`` when it fits (sub-pixel translations included).

    Args:
        n: number of transforms.
        image_size: ``(H, W)``.
        patch_size: ``(h, w)``.
        max_rotation: angles are uniform in ``[-max_rotation, max_rotation]`` degrees.
        scale_range: scales are uniform in ``[lo, hi]``.
        rand: ``rand(n) -> Tensor`` of uniforms in [0, 1) on the target device.
        box: location region, ``(top, left, bottom, right)`` fractions.

    Returns:
        ``(centers, angles, scales)`` of shapes ``(n, 2)`` (x, y pixels), ``(n,)``, ``(n,)``.
    """
    (h, w), (lo, hi) = patch_size, scale_range
    angles = (rand(n) * 2 - 1) * max_rotation
    scales = lo + rand(n) * (hi - lo)
    rad = torch.deg2rad(angles)
    cos, sin = rad.cos().abs(), rad.sin().abs()
    ext_x = scales * (cos * (w - 1) + sin * (h - 1)) / 2
    ext_y = scales * (sin * (w - 1) + cos * (h - 1)) / 2
    top, left, bottom, right = _region_pixels(box, image_size)

    def axis(lo_px: int, hi_px: int, ext: Tensor) -> Tensor:
        low, high = lo_px + ext, hi_px - 1 - ext
        mid = torch.full_like(ext, (lo_px + hi_px - 1) / 2)
        fits = high >= low
        low, high = torch.where(fits, low, mid), torch.where(fits, high, mid)
        return low + rand(n) * (high - low)

    centers = torch.stack([axis(left, right, ext_x), axis(top, bottom, ext_y)], dim=1)
    return centers, angles, scales


def _warp_forward(p: Tensor, matrix: Tensor, image_size: tuple[int, int]) -> Tensor:
    """``(N, C + 1, H, W)``: the patch ``p`` (``(1|N, C, h, w)``) and its ones-mask, warped."""
    n, (c, h, w) = matrix.shape[0], p.shape[1:]
    ones = torch.ones((1, 1, h, w), device=p.device, dtype=p.dtype)
    src = torch.cat([p, ones.expand(p.shape[0], 1, h, w)], dim=1).expand(n, c + 1, h, w)
    return warp_affine(src, matrix.to(p.dtype), image_size, mode="bilinear", align_corners=True)


def _warp_adjoint(grad: Tensor, matrix: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """Gradient of the bilinear warp w.r.t. the patch, as a gather (no atomic adds).

    Patch pixel ``k`` feeds canvas pixel ``q`` with the tent weight
    ``relu(1 - |s_x - k_x|) * relu(1 - |s_y - k_y|)``, ``s = M^-1 q``; such ``q`` lie
    in the open box ``M k +- e`` (``e``: half-extent of ``M`` applied to
    ``[-1, 1]^2``), which holds at most ``ceil(2 e)`` integers per axis, so each
    patch pixel gathers a few candidates. Deterministic on every device, unlike
    ``grid_sample``'s backward, which adds atomically on GPUs.

    Args:
        grad: ``(N, C, H, W)`` gradient of the warped patch channels.
        matrix: ``(N, 2, 3)`` source-to-canvas pixel maps.
        patch_size: ``(h, w)``.

    Returns:
        ``(N, C, h, w)``.
    """
    n, c, hh, ww = grad.shape
    h, w = patch_size
    dev = grad.device
    m = matrix.to(torch.float64 if grad.dtype == torch.float64 else torch.float32)
    lin, shift = m[:, :, :2], m[:, :, 2]  # (N, 2, 2), (N, 2)
    det = lin[:, 0, 0] * lin[:, 1, 1] - lin[:, 0, 1] * lin[:, 1, 0]
    inv = torch.stack([lin[:, 1, 1], -lin[:, 0, 1], -lin[:, 1, 0], lin[:, 0, 0]], dim=1)
    inv = (inv / det[:, None]).view(n, 2, 2)
    ext = lin.abs().sum(2)  # (N, 2): half-extent along x and y
    lx, ly = (max(1, math.ceil(2 * float(v))) for v in ext.amax(0))
    ky, kx = torch.meshgrid(
        torch.arange(h, device=dev, dtype=m.dtype),
        torch.arange(w, device=dev, dtype=m.dtype),
        indexing="ij",
    )
    k = torch.stack([kx.flatten(), ky.flatten()], dim=1)  # (hw, 2) as (x, y)
    centre = torch.einsum("nij,kj->nki", lin, k) + shift[:, None]  # M k, (N, hw, 2)
    base = torch.floor(centre - ext[:, None]) + 1  # first integer of the open box
    oy, ox = torch.meshgrid(
        torch.arange(ly, device=dev, dtype=m.dtype),
        torch.arange(lx, device=dev, dtype=m.dtype),
        indexing="ij",
    )
    offsets = torch.stack([ox.flatten(), oy.flatten()], dim=1)  # (J, 2)
    q = base[:, :, None] + offsets  # (N, hw, J, 2)
    src = (
        torch.einsum("nij,nkj->nki", inv, base - shift[:, None])[:, :, None]
        + torch.einsum("nij,pj->npi", inv, offsets)[:, None]
    )  # M^-1 q
    d = (src - k[None, :, None]).abs()
    inside = (q[..., 0] >= 0) & (q[..., 0] <= ww - 1) & (q[..., 1] >= 0) & (q[..., 1] <= hh - 1)
    weight = ((1 - d[..., 0]).clamp(min=0) * (1 - d[..., 1]).clamp(min=0) * inside).to(grad.dtype)
    index = (q[..., 1].clamp(0, hh - 1) * ww + q[..., 0].clamp(0, ww - 1)).long()
    j = offsets.shape[0]
    flat = grad.reshape(n, c, hh * ww)
    picked = flat.gather(2, index.reshape(n, 1, h * w * j).expand(n, c, h * w * j))
    out = (picked.view(n, c, h * w, j) * weight[:, None]).sum(-1)
    return out.view(n, c, h, w)


class _Warp(torch.autograd.Function):
    """kornia's bilinear warp forward, a deterministic gather-based adjoint backward."""

    @staticmethod
    def forward(ctx, p: Tensor, matrix: Tensor, image_size: tuple[int, int]) -> Tensor:
        ctx.save_for_backward(matrix)
        ctx.shape = p.shape
        return _warp_forward(p, matrix, image_size)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        (matrix,) = ctx.saved_tensors
        b, c, h, w = ctx.shape
        g = _warp_adjoint(grad[:, :c], matrix, (h, w))
        return (g.sum(0, keepdim=True) if b == 1 else g), None, None


def warp_patch(
    patch: Tensor,
    image_size: tuple[int, int],
    centers: Tensor,
    angles: Tensor,
    scales: Tensor,
) -> tuple[Tensor, Tensor]:
    """Rotate, scale and place patches on image-size canvases in one batched warp.

    Built on ``kornia.geometry.transform.get_rotation_matrix2d`` (rotation and
    scale about the patch centre) plus a shift of the patch centre to ``centers``,
    and one bilinear ``warp_affine`` of the patch stacked with its all-ones mask.
    The canvas is premultiplied by the mask, so the patched images are
    ``x * (1 - mask) + canvas``. Gradients reach the patch through the exact
    adjoint of the bilinear sampling, computed as a gather so that it is
    deterministic on GPUs too (``grid_sample``'s own backward adds atomically).

    Args:
        patch: one patch ``(C, h, w)`` shared by all transforms, or ``(N, C, h, w)``.
        image_size: ``(H, W)`` of the canvas.
        centers: ``(N, 2)`` ``(x, y)`` pixel positions of the patch centre.
        angles: ``(N,)`` rotations in degrees (counter-clockwise).
        scales: ``(N,)`` scale factors.

    Returns:
        ``(canvas, mask)``: ``(N, C, H, W)`` premultiplied patch and ``(N, 1, H, W)``
        soft mask in [0, 1].

    Example:
        >>> p = torch.rand(1, 3, 3)
        >>> canvas, mask = warp_patch(p, (8, 8), torch.tensor([[4.0, 2.0]]),
        ...                           torch.zeros(1), torch.ones(1))
        >>> torch.allclose(canvas[0, :, 1:4, 3:6], p, atol=1e-5), round(float(mask.sum()), 3)
        (True, 9.0)
    """
    n = centers.shape[0]
    p = patch.unsqueeze(0) if patch.ndim == 3 else patch
    c, h, w = p.shape[1:]
    dtype = centers.dtype
    pc = torch.tensor([(w - 1) / 2, (h - 1) / 2], device=centers.device, dtype=dtype)
    matrix = get_rotation_matrix2d(
        pc.expand(n, 2).contiguous(), angles.to(dtype), scales.to(dtype)[:, None].expand(n, 2)
    )
    matrix = torch.cat([matrix[:, :, :2], matrix[:, :, 2:] + (centers - pc)[:, :, None]], dim=2)
    out = _Warp.apply(p, matrix.detach(), tuple(image_size))
    return out[:, :c], out[:, c:].clamp(0, 1)
