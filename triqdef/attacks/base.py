"""What every patch attack shares: :class:`PatchAttack`, location regions and the EOT warp.

An attack is built on a model (any ``nn.Module`` or a
:class:`~triqdef.TriQDefWrapper`) and called torchattacks-style,
``x_adv = attack(x, y)``; ``attack(x, y, wrapper)`` also works, so every attack
is a :class:`~triqdef.attacks.PatchSource` for ``wrapper.loss(x, y, patch=attack)``.

The attack never changes the model: it runs every module in eval mode (BatchNorm
statistics and triqdef observers are only read), restores each module's
train/eval flag and the wrapper's bit-width afterwards, and takes gradients
with ``torch.autograd.grad`` with respect to the patch only, so no ``.grad`` is
left on any parameter.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, InputError
from .patching import (
    check_dtype,
    check_locations,
    is_label_dtype,
    label_dtype_error,
    model_dtype,
    paste_patch,
)

__all__ = [
    "PatchAttack",
    "UniversalPatchAttack",
    "REGIONS",
    "resolve_region",
    "region_bounds",
    "sample_eot",
    "warp_patch",
]


def seeded_generator(owner: PatchAttack | Any, device: torch.device) -> torch.Generator | None:
    """The generator ``owner`` draws from on ``device``.

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


Box = tuple[float, float, float, float]
RegionLike = str | Box | None

#: Named location regions, as ``(top, left, bottom, right)`` fractions of the image.
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


# --- small validators ------------------------------------------------------------------------
def _is_wrapper(model) -> bool:
    from ..wrapper import TriQDefWrapper

    return isinstance(model, TriQDefWrapper)


def _int(name: str, value, low: int = 1, error=ConfigError) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise error(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _float(name: str, value, low: float = 0.0, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ConfigError(f"{name} must be finite and {'>' if strict else '>='} {low}, got {value}")
    return value


def _size2(size, what: str = "patch_size", error=ConfigError) -> tuple[int, int]:
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        size = (size, size)
    try:
        h, w = size
    except (TypeError, ValueError):
        raise error(f"{what} must be an int or an (h, w) pair, got {size!r}") from None
    for s in (h, w):
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise error(f"{what} must be positive ints, got {size!r}")
    return int(h), int(w)


def _channel_stats(name: str, value) -> Tensor | None:
    if value is None:
        return None
    try:
        t = torch.as_tensor(value, dtype=torch.float64).detach().flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise ConfigError(
            f"{name} must be a sequence or tensor of numbers, got {value!r}"
        ) from None
    if t.numel() == 0 or not torch.isfinite(t).all():
        raise ConfigError(f"{name} must be finite per-channel values, got {value!r}")
    return t


def check_patch_tensor(patch, what: str = "init_patch") -> Tensor:
    """Check a user-given patch: a floating ``(C, h, w)`` tensor with values in [0, 1].

    Raises:
        InputError: wrong type, shape or dtype, NaN/Inf, or values outside [0, 1].
    """
    if not isinstance(patch, Tensor) or patch.ndim != 3 or not patch.is_floating_point():
        got = f"{patch.dtype} {tuple(patch.shape)}" if isinstance(patch, Tensor) else patch
        raise InputError(f"{what} must be a floating (C, h, w) tensor, got {got}")
    if patch.numel() == 0:
        raise InputError(f"{what} is empty, shape {tuple(patch.shape)}")
    if not bool(torch.isfinite(patch).all()):
        raise InputError(f"{what} contains NaN or Inf")
    lo, hi = float(patch.min()), float(patch.max())
    if lo < 0 or hi > 1:
        raise InputError(
            f"{what} values must lie in [0, 1] (patches live in pixel space), "
            f"got [{lo:.4g}, {hi:.4g}]"
        )
    return patch.detach()


def check_device(t: Tensor, device: torch.device | None = None, what: str = "x") -> None:
    """Raise :class:`InputError` if ``t`` holds no data (meta) or is not on ``device``."""
    if t.device.type == "meta":
        raise InputError(f"{what} is on the meta device, which holds no data")
    if device is not None and t.device != device:
        raise InputError(f"{what} is on {t.device} but the model is on {device}")


def check_images(
    x,
    what: str = "x",
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Raise :class:`InputError` unless ``x`` is a non-empty floating ``(B, C, H, W)`` in [0, 1]
    holding data, on ``device`` and of ``dtype`` when they are given (the model's; see
    ``triqdef.attacks.patching.check_dtype`` for the dtype rule)."""
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"{what} must be a floating (B, C, H, W) tensor, got {got}")
    if x.numel() == 0:
        raise InputError(f"{what} is empty, shape {tuple(x.shape)}")
    check_device(x, device, what)
    check_dtype(x, dtype, what)
    lo, hi = torch.aminmax(x.detach())
    if not bool((lo >= 0) & (hi <= 1)):  # NaN fails this too
        raise InputError(
            f"{what} values must lie in [0, 1], got [{float(lo):.4g}, {float(hi):.4g}]; pass "
            "unnormalized images and give the attack mean=/std= to normalize inside"
        )


def check_labels(y, x: Tensor, what: str = "y") -> Tensor:
    """Raise :class:`InputError` unless ``y`` is an integer ``(B,)`` tensor on ``x``'s device.

    Returns:
        ``y`` as int64 (labels of any integer width are accepted).
    """
    if not isinstance(y, Tensor) or not is_label_dtype(y.dtype):
        raise label_dtype_error(what, y)
    if y.shape != (x.shape[0],):
        raise InputError(f"{what} must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    if y.device != x.device:
        raise InputError(f"{what} is on {y.device} but x is on {x.device}")
    return y.long()


# --- regions ---------------------------------------------------------------------------------
def resolve_region(
    region: RegionLike, error: type[Exception] = ConfigError
) -> tuple[str | None, tuple[float, ...]]:
    """Normalise a location region to ``(name or None, (top, left, bottom, right))``.

    Args:
        region: ``None`` or ``"any"`` (the whole image), a name of :data:`REGIONS`,
            or ``(top, left, bottom, right)`` fractions of the image height/width
            with ``0 <= top < bottom <= 1`` and ``0 <= left < right <= 1``.
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


def region_pixels(box, image_size: tuple[int, int]) -> tuple[int, int, int, int]:
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
        box: ``(top, left, bottom, right)`` fractions (see :func:`resolve_region`).
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
    t, lft, b, r = region_pixels(box, image_size)

    def axis(lo: int, hi: int, size: int, full: int) -> tuple[int, int]:
        if hi - lo >= size:
            return lo, hi - size
        start = min(max(round((lo + hi - size) / 2), 0), full - size)
        return start, start

    rmin, rmax = axis(t, b, h, hh)
    cmin, cmax = axis(lft, r, w, ww)
    return rmin, rmax, cmin, cmax


def draw_in_range(low: Tensor, high: Tensor, u: Tensor) -> Tensor:
    """Integers uniform in ``[low, high]`` (inclusive, per element) from uniforms ``u``."""
    span = (high - low + 1).to(u.dtype)
    return (low + torch.floor(u * span).long()).minimum(high).maximum(low)


# --- the EOT warp ----------------------------------------------------------------------------
def sample_eot(
    n: int,
    image_size: tuple[int, int],
    patch_size: tuple[int, int],
    max_rotation: float,
    scale_range: tuple[float, float],
    rand: Callable[[int], Tensor],
    box: Box = (0.0, 0.0, 1.0, 1.0),
) -> tuple[Tensor, Tensor, Tensor]:
    """Draw ``n`` random rotations, scales and centres for :func:`warp_patch`.

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
    top, left, bottom, right = region_pixels(box, image_size)

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
    from kornia.geometry.transform import warp_affine

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
    from kornia.geometry.transform import get_rotation_matrix2d

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


# --- model state -----------------------------------------------------------------------------
@contextlib.contextmanager
def frozen_model(model: nn.Module, wrapper=None) -> Iterator[None]:
    """Eval mode and gradients on inside the block; every module's mode and the bit-width after.

    The flags are restored one module at a time, so a model with some modules
    deliberately in eval mode (frozen BatchNorm) comes back exactly as it was.
    """
    modes = [(m, m.training) for m in model.modules()]
    previous = wrapper.current_bits if wrapper is not None else None
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        for m, flag in modes:
            m.training = flag
        if wrapper is not None:
            wrapper.set_bits(previous)


def progress_bar(iterable, enabled: bool, total: int | None = None, desc: str = ""):
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` (tqdm is imported only then)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with the vision extra
        raise ConfigError("progress=True needs tqdm: pip install tqdm") from None
    return tqdm(iterable, total=total, desc=desc, leave=False)


# --- the base class --------------------------------------------------------------------------
class PatchAttack:
    """Base class of the patch attacks: validation, normalisation, RNG, model state.

    Subclasses implement :meth:`_attack`. Calling an attack checks its inputs
    (raising :class:`~triqdef.errors.InputError` before anything runs), puts the
    model in eval mode, runs the attack and restores every module's mode and the
    wrapper's bit-width.

    Args:
        model: any ``nn.Module`` returning ``(B, K)`` logits, or a
            :class:`~triqdef.TriQDefWrapper`.
        patch_size: side (int) or ``(h, w)``. ``None``: the side of ``init_patch``
            when given, else ``round(0.1875 * min(H, W))`` of the images (6 on
            32x32, like :class:`~triqdef.attacks.RandomPatch`).
        bits: bit-width the attack runs at when ``model`` is a wrapper (default:
            the wrapper's current bit-width at call time); must be ``None`` or 32
            for a plain model.
        steps: optimisation steps per call.
        step_size: step of the sign-gradient update (learning rate for Adam).
        targeted: minimise the cross-entropy to ``target`` instead of maximising
            the cross-entropy to the true labels.
        target: the target class (an int), required when ``targeted``.
        mean: per-channel means; with ``std``, the model sees ``(x - mean) / std``.
        std: per-channel standard deviations (> 0).
        generator: random generator for locations, initialisations and EOT draws.
        seed: seed of a generator created on the input's device at the first call
            (and again by :meth:`reseed`); exclusive with ``generator``.
        region: where patches go: ``None``/``"any"``, a name of :data:`REGIONS` or
            ``(top, left, bottom, right)`` fractions of the image.
        init_patch: starting patch ``(C, h, w)`` with values in [0, 1].
        progress: show a tqdm bar over the optimisation steps.

    Attributes:
        patch: the crafted patch(es) after a call: ``(C, h, w)`` for universal
            attacks, ``(B, C, h, w)`` for per-sample ones.
        locations: ``(B, 2)`` int64 top-left ``(row, col)`` of the last call's
            patches; ``apply_patch(x, attack.patch, attack.locations)`` gives the
            returned images exactly.
        last_loss: cross-entropy (to the labels, or to the target when targeted)
            of the last call's final patches, or ``None`` before a call.

    Raises:
        ConfigError: an invalid constructor argument.
    """

    #: short name recorded in patch metadata
    name = "patch"

    def __init__(
        self,
        model: nn.Module | None,
        patch_size: int | tuple[int, int] | None = None,
        *,
        bits: int | None = None,
        steps: int = 100,
        step_size: float = 0.05,
        targeted: bool = False,
        target: int | None = None,
        mean: Sequence[float] | Tensor | None = None,
        std: Sequence[float] | Tensor | None = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        region: RegionLike = None,
        init_patch: Tensor | None = None,
        progress: bool = False,
    ) -> None:
        if model is not None and not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.patch_size = None if patch_size is None else _size2(patch_size)
        if init_patch is not None:
            init_patch = check_patch_tensor(init_patch, "init_patch")
            if self.patch_size is None:
                self.patch_size = tuple(init_patch.shape[-2:])
            elif tuple(init_patch.shape[-2:]) != self.patch_size:
                raise InputError(
                    f"init_patch is {tuple(init_patch.shape[-2:])} but patch_size is "
                    f"{self.patch_size}"
                )
        self.init_patch = init_patch
        self.bits = self._check_bits(bits)
        self.steps = _int("steps", steps, low=0 if self._zero_steps_ok else 1)
        self.step_size = _float("step_size", step_size)
        if not isinstance(targeted, bool):
            raise ConfigError(f"targeted must be a bool, got {targeted!r}")
        self.targeted = targeted
        if targeted:
            if target is None:
                raise ConfigError("targeted=True needs target=<class index>")
            self.target = _int("target", target, low=0)
        elif target is not None:
            raise ConfigError("target is given but targeted=False; pass targeted=True")
        else:
            self.target = None
        self.mean, self.std = _channel_stats("mean", mean), _channel_stats("std", std)
        if (self.mean is None) != (self.std is None):
            self.mean = torch.zeros(1) if self.mean is None else self.mean
            self.std = torch.ones(1) if self.std is None else self.std
        if self.std is not None and not bool((self.std > 0).all()):
            raise ConfigError(f"std must be > 0, got {std!r}")
        if generator is not None and seed is not None:
            raise ConfigError("give generator= or seed=, not both")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ConfigError(f"generator must be a torch.Generator, got {generator!r}")
        if seed is not None:
            seed = _int("seed", seed, low=0)
        self.generator, self.seed = generator, seed
        self._generators: dict[str, torch.Generator] = {}
        self.region_name, self.region = resolve_region(region)
        if not isinstance(progress, bool):
            raise ConfigError(f"progress must be a bool, got {progress!r}")
        self.progress = progress
        self.patch: Tensor | None = None
        self.locations: Tensor | None = None
        self.last_loss = None
        self._classes: dict[int, int] = {}

    _zero_steps_ok = False

    def _check_bits(self, bits) -> int | None:
        if bits is None:
            return None
        if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
            raise ConfigError(f"bits must be an int or None, got {bits!r}")
        if self.model is not None and _is_wrapper(self.model):
            if bits not in self.model.bits:
                raise ConfigError(
                    f"bit-width {bits} is not one of the wrapper's bits {self.model.bits}"
                )
        elif bits != 32:
            raise ConfigError(
                f"bits={bits} needs a TriQDefWrapper; a plain model only runs at 32 bits"
            )
        return int(bits)

    def __repr__(self) -> str:
        size = self.patch_size
        tgt = f", targeted=True, target={self.target}" if self.targeted else ""
        return (
            f"{type(self).__name__}(patch_size={size}, bits={self.bits}, steps={self.steps}, "
            f"step_size={self.step_size}{tgt}, region={self.region_name or self.region})"
        )

    # --- randomness -------------------------------------------------------------------
    def reseed(self, seed: int | None = None) -> None:
        """Start the random stream over (from ``seed``, or the constructor's ``seed``)."""
        if seed is not None:
            self.seed = _int("seed", seed, low=0)
            self.generator = None
        self._generators.clear()

    def _gen(self, device: torch.device) -> torch.Generator | None:
        return seeded_generator(self, device)

    def _rand(self, shape, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
        g = self._gen(device)
        where = g.device if g is not None else device
        return torch.rand(shape, generator=g, device=where, dtype=dtype).to(device)

    def _random_locations(
        self, n: int, image_size: tuple[int, int], patch_size: tuple[int, int], device
    ) -> Tensor:
        rmin, rmax, cmin, cmax = region_bounds(self.region, image_size, patch_size)
        u = self._rand((n, 2), device, torch.float64)
        low = torch.tensor([rmin, cmin], device=device)
        high = torch.tensor([rmax, cmax], device=device)
        return draw_in_range(low, high, u)

    # --- the model --------------------------------------------------------------------
    def _resolve_model(self, wrapper) -> nn.Module:
        if self.model is None:
            if wrapper is None or not isinstance(wrapper, nn.Module):
                raise InputError(
                    f"{type(self).__name__} was built without a model; call it as "
                    "attack(x, y, wrapper) or build it on a model"
                )
            return wrapper
        return self.model

    def _logits(self, model: nn.Module, x: Tensor, bits: int | None = None) -> Tensor:
        """Run ``model`` on pixel-space images ``x`` (normalised here) at ``bits``."""
        if self.mean is not None:
            c = x.shape[1]
            mean = self.mean.to(x.device, x.dtype)
            std = self.std.to(x.device, x.dtype)
            if mean.numel() not in (1, c) or std.numel() not in (1, c):
                raise InputError(
                    f"mean/std have {mean.numel()}/{std.numel()} values but the images have "
                    f"{c} channels"
                )
            x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        if bits is not None and _is_wrapper(model):
            with model.at_bits(bits):
                out = model(x)
        else:
            out = model(x)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise InputError(f"the model must return (B, K) logits, got {got}")
        return out

    def _objective(self, logits: Tensor, y: Tensor) -> Tensor:
        """Per-sample quantity to maximise: CE to ``y``, or minus CE to the target."""
        if self.targeted:
            target = torch.full_like(y, self.target)
            return -F.cross_entropy(logits.float(), target, reduction="none")
        return F.cross_entropy(logits.float(), y, reduction="none")

    def _loss_value(self, objective: Tensor) -> Tensor:
        """The reported cross-entropy of an objective tensor (kept on device until read)."""
        value = objective.detach().float().mean()
        return -value if self.targeted else value

    @property
    def last_loss(self) -> float | None:
        """Cross-entropy of the last call's final patches (``None`` before a call).

        Kept as a device tensor until read, so the attack loop never waits for
        the device just to record it.
        """
        value = self._last_loss
        if isinstance(value, Tensor):
            value = self._last_loss = float(value)
        return value

    @last_loss.setter
    def last_loss(self, value) -> None:
        self._last_loss = value

    def _run_bits(self, model: nn.Module) -> int | None:
        if not _is_wrapper(model):
            return None
        return self.bits if self.bits is not None else model.current_bits

    def _check_bits_for(self, model: nn.Module):
        """Bit-width of the class-count forward (``False``: none can run)."""
        return self._run_bits(model)

    def _check_classes(self, model: nn.Module, x: Tensor, y: Tensor) -> None:
        """Check labels and target against the model's class count (one tiny forward)."""
        key = id(model)
        if key not in self._classes:
            bits = self._check_bits_for(model)
            if bits is False:  # no bit-width can run yet: nothing to check against
                return
            with torch.no_grad():
                self._classes[key] = self._logits(model, x[:1], bits).shape[1]
        k = self._classes[key]
        if self.targeted and not 0 <= self.target < k:
            raise InputError(
                f"target class {self.target} is out of range: the model has {k} classes "
                f"(0..{k - 1})"
            )
        lo, hi = torch.aminmax(y)
        if int(lo) < 0 or int(hi) >= k:
            raise InputError(
                f"labels must be in [0, {k}) (the model has {k} classes), "
                f"got [{int(lo)}, {int(hi)}]"
            )

    # --- the call ---------------------------------------------------------------------
    def _size_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        if self.patch_size is not None:
            return self.patch_size
        side = max(1, round(0.1875 * min(image_size)))
        return side, side

    def _check_call(self, model: nn.Module, x, y, locations) -> tuple[Tensor, Tensor]:
        param = next(model.parameters(), None)
        check_images(x, device=None if param is None else param.device, dtype=model_dtype(model))
        y = check_labels(y, x)
        hh, ww = x.shape[-2:]
        h, w = self._size_for((hh, ww))
        if h > hh or w > ww:
            raise InputError(
                f"{type(self).__name__}: patch {(h, w)} is larger than the images {(hh, ww)}"
            )
        if self.init_patch is not None and self.init_patch.shape[0] != x.shape[1]:
            raise InputError(
                f"init_patch has {self.init_patch.shape[0]} channels, the images {x.shape[1]}"
            )
        if locations is not None:
            check_locations(locations, x, (h, w))
        if x.is_inference():
            x = x.clone()
        return x.detach(), y

    def __call__(
        self,
        x: Tensor,
        y: Tensor,
        wrapper: nn.Module | None = None,
        *,
        locations: Tensor | None = None,
    ) -> Tensor:
        """Craft patches for ``x`` and return the patched images.

        Args:
            x: images ``(B, C, H, W)`` with values in [0, 1].
            y: true labels ``(B,)`` (integer).
            wrapper: ignored (it makes the attack a patch source for
                ``wrapper.loss(x, y, patch=attack)``), unless the attack was
                built with ``model=None``.
            locations: optional ``(B, 2)`` top-left corners to use instead of
                random ones.

        Returns:
            Patched images, shape and dtype of ``x``, detached, in [0, 1].

        Raises:
            InputError: bad images, labels, locations, target or patch size.
        """
        model = self._resolve_model(wrapper)
        x, y = self._check_call(model, x, y, locations)
        if locations is not None:
            locations = locations.to(x.device, torch.long)
        wrap = model if _is_wrapper(model) else None
        with frozen_model(model, wrap):
            self._check_classes(model, x, y)
            x_adv = self._attack(model, x, y, locations)
        return x_adv.detach()

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, locations: Tensor | None) -> Tensor:
        raise NotImplementedError


class UniversalPatchAttack(PatchAttack):
    """A :class:`PatchAttack` whose single patch ``(C, h, w)`` persists across calls.

    Each call continues from the current patch; :meth:`apply` pastes it without
    optimising and :meth:`reset` starts over. Subclasses implement the update.
    """

    _zero_steps_ok = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._param: Tensor | None = None
        self._opt: torch.optim.Optimizer | None = None

    def reset(self) -> None:
        """Forget the patch and any optimizer state; restart the seeded random stream."""
        self._param, self._opt, self.patch = None, None, None
        self.locations, self.last_loss = None, None
        self.reseed()

    def _ensure_patch(self, x: Tensor) -> Tensor:
        """The persistent patch (a leaf requiring grad) on ``x``'s device and dtype."""
        c, (h, w) = x.shape[1], self._size_for(tuple(x.shape[-2:]))
        p = self._param
        if p is not None and p.shape != (c, h, w):
            raise InputError(
                f"the current patch is {tuple(p.shape)} but these images need {(c, h, w)}; "
                "call reset() to start a new patch"
            )
        if p is None:
            if self.init_patch is not None:
                p = self.init_patch.to(x.device, x.dtype).clone()
            else:
                p = self._rand((c, h, w), x.device, x.dtype)
        elif p.device != x.device or p.dtype != x.dtype:
            p = p.detach().to(x.device, x.dtype)
        if p is not self._param:
            self._param = p.requires_grad_(True)
            self._opt = None
        return self._param

    def apply(self, x: Tensor, locations: Tensor | None = None) -> Tensor:
        """Paste the current patch (untransformed) on ``x`` without optimising.

        Args:
            x: images ``(B, C, H, W)`` in [0, 1].
            locations: ``(B, 2)`` corners; random inside the region when ``None``.

        Returns:
            Patched images ``(B, C, H, W)``; the corners are kept in :attr:`locations`
            and the patch in :attr:`patch`.

        Raises:
            InputError: no patch yet (call the attack first), or bad ``x`` / ``locations``.
        """
        if self._param is None:
            raise InputError(f"{type(self).__name__} has no patch yet: call the attack first")
        check_images(x)
        p = self._param.detach().to(x.device, x.dtype)
        if p.shape[0] != x.shape[1]:
            raise InputError(f"the patch has {p.shape[0]} channels, the images {x.shape[1]}")
        if p.shape[1] > x.shape[2] or p.shape[2] > x.shape[3]:
            raise InputError(
                f"the patch {tuple(p.shape[1:])} is larger than the images {tuple(x.shape[2:])}"
            )
        if locations is None:
            locations = self._random_locations(
                x.shape[0], tuple(x.shape[-2:]), tuple(p.shape[-2:]), x.device
            )
        else:
            locations = check_locations(locations, x, tuple(p.shape[-2:]))
        self.patch = p.clone()
        self.locations = locations.to(x.device, torch.long)
        return paste_patch(x.detach(), self.patch, self.locations)
