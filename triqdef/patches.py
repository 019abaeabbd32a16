"""Patches on images: pasting them, random corners, and the loss's patch-source protocol."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ._checks import check_size2, resolve_device
from .errors import InputError

__all__ = ["PatchSource", "RandomPatch", "apply_patch", "random_locations"]


@runtime_checkable
class PatchSource(Protocol):
    """Anything ``wrapper.loss(x, y, patch=source)`` can draw patched images from.

    A patch source is called once per loss call with the images to patch, their
    labels and the wrapper (so a source can attack the model at its active
    bit-widths), and returns the patched images:

    ``source(x, y, wrapper) -> x_adv`` with ``x_adv.shape == x.shape``, on the
    device and dtype of ``x``.

    The returned tensor should not require grad (detach a crafted patch); the
    loss takes input gradients of its own.
    """

    def __call__(self, x: Tensor, y: Tensor, wrapper: Any) -> Tensor: ...


def random_locations(
    n: int,
    image_size: tuple[int, int],
    patch_size: tuple[int, int],
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniformly random top-left corners so that a patch fits inside the image.

    Args:
        n: number of locations.
        image_size: ``(H, W)``.
        patch_size: ``(h, w)`` with ``h <= H`` and ``w <= W``.
        generator: optional generator (its device decides where the draw happens).
        device: device of the result.

    Returns:
        ``(n, 2)`` int64 ``(row, col)`` corners.

    Raises:
        InputError: ``device`` is not a device this machine has.
    """
    if device is not None:
        device = resolve_device(device)
    return _draw_locations(n, image_size, patch_size, generator, device)


def _draw_locations(n, image_size, patch_size, generator, device) -> Tensor:
    """[`random_locations`][triqdef.patches.random_locations] without the check of
    ``device`` (one triqdef already uses)."""
    (hh, ww), (h, w) = image_size, patch_size
    gen_device = generator.device if generator is not None else device
    rows = torch.randint(0, hh - h + 1, (n,), generator=generator, device=gen_device)
    cols = torch.randint(0, ww - w + 1, (n,), generator=generator, device=gen_device)
    return torch.stack([rows, cols], dim=1).to(device)


def _check_locations(locations, x: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """Check ``(B, 2)`` integer top-left corners that keep the patch inside ``x``.

    Returns:
        The corners as int64 on ``x``'s device.

    Raises:
        InputError: wrong type, shape or dtype, or a patch that would leave the image.
    """
    (hh, ww), (h, w) = x.shape[-2:], patch_size
    if not isinstance(locations, Tensor) or locations.shape != (x.shape[0], 2):
        got = tuple(locations.shape) if isinstance(locations, Tensor) else locations
        raise InputError(f"locations must be a ({x.shape[0]}, 2) tensor, got {got}")
    if locations.is_floating_point() or locations.is_complex() or locations.dtype == torch.bool:
        raise InputError(f"locations must be integer (row, col) corners, got {locations.dtype}")
    loc = locations.to(x.device, torch.long)
    outside = (loc < 0).any(dim=1) | (loc[:, 0] > hh - h) | (loc[:, 1] > ww - w)
    if bool(outside.any()):  # one host sync, on user-given corners only
        i = int(outside.nonzero()[0, 0])
        raise InputError(
            f"locations put a {(h, w)} patch outside the {(hh, ww)} images: corner "
            f"{tuple(loc[i].tolist())} of image {i} (rows must be in [0, {hh - h}], "
            f"columns in [0, {ww - w}])"
        )
    return loc


def apply_patch(
    x: Tensor,
    patch: Tensor,
    locations: Tensor | None = None,
    mask: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Paste patches into images: ``x * (1 - M) + P * M``.

    Without ``mask``, ``M`` is 1 on each patch's ``h x w`` box and 0 elsewhere. A
    ``mask`` lives in the patch's frame: for a full-size patch given without
    ``locations`` it covers the whole image; otherwise it is the patch's own
    ``(h, w)`` mask, pasted with the patch at ``locations`` (a shaped patch such as
    [`DPR`][triqdef.attacks.DPR]'s), and the images stay unchanged outside the box.

    Args:
        x: images ``(B, C, H, W)``.
        patch: one patch ``(C, h, w)`` for every image or one per image
            ``(B, C, h, w)``; with ``mask`` and no ``locations``, a full-size
            ``(C, H, W)`` or ``(B, C, H, W)`` canvas, or a smaller patch placed at
            random locations.
        locations: ``(B, 2)`` integer top-left ``(row, col)`` of each patch. When
            ``locations`` is not given and the patch is smaller than the images,
            locations are random.
        mask: values in [0, 1] weighting the pixels taken from ``patch``: with a
            full-size patch and no ``locations``, ``(B, 1, H, W)``, ``(1, H, W)`` or
            ``(H, W)``; otherwise ``(B, 1, h, w)``, ``(1, h, w)`` or ``(h, w)``, the
            patch's own shape. ``None``: the whole ``h x w`` box.
        generator: random generator for random locations.

    Returns:
        Patched images ``(B, C, H, W)``. Gradients reach ``patch`` only inside the
        mask, ``x`` only outside it, and ``mask`` wherever it is pasted.

    Raises:
        InputError: bad ``x`` or ``patch`` (an empty patch included); ``locations``
            that are not integer ``(B, 2)`` corners keeping the patch inside the
            images; a ``mask`` that is not a tensor on ``x``'s device or does not
            broadcast to ``(B, 1, H, W)`` (full-size canvas) or ``(B, 1, h, w)`` (a
            patch's own mask).

    Example:
        >>> x = torch.zeros(2, 1, 4, 4)
        >>> out = apply_patch(x, torch.ones(1, 2, 2), locations=torch.tensor([[0, 0], [2, 1]]))
        >>> out[1, 0]
        tensor([[0., 0., 0., 0.],
                [0., 0., 0., 0.],
                [0., 1., 1., 0.],
                [0., 1., 1., 0.]])
    """
    return _apply_patch(x, patch, locations, mask, generator, check=True)


def _paste_patch(x: Tensor, patch: Tensor, locations: Tensor, mask: Tensor | None = None) -> Tensor:
    """[`apply_patch`][triqdef.patches.apply_patch] at corners that triqdef drew inside
    the images itself.

    Skips the bounds check of ``locations`` (a host sync), so attack loops can paste
    at their own corners every step; user-given corners go through
    [`apply_patch`][triqdef.patches.apply_patch]. ``mask`` is the patch's own
    ``(B | 1, 1, h, w)`` mask, or ``None`` for the whole box.
    """
    return _apply_patch(x, patch, locations, mask, None, check=False)


def _apply_patch(
    x: Tensor,
    patch: Tensor,
    locations: Tensor | None,
    mask: Tensor | None,
    generator: torch.Generator | None,
    check: bool,
) -> Tensor:
    if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"apply_patch: x must be a floating (B, C, H, W) tensor, got {shape}")
    if not isinstance(patch, Tensor) or patch.ndim not in (3, 4):
        shape = tuple(patch.shape) if isinstance(patch, Tensor) else type(patch).__name__
        raise InputError(f"apply_patch: patch must be (C, h, w) or (B, C, h, w), got {shape}")
    if patch.numel() == 0:
        raise InputError(
            f"apply_patch: patch is empty, shape {tuple(patch.shape)}; a patch needs at least "
            "one channel and one pixel"
        )
    b, c, hh, ww = x.shape
    if patch.device != x.device:
        raise InputError(f"apply_patch: patch is on {patch.device} but x is on {x.device}")
    p = patch.unsqueeze(0) if patch.ndim == 3 else patch
    if p.shape[1] != c:
        raise InputError(f"apply_patch: patch has {p.shape[1]} channels, images have {c}")
    if p.shape[0] not in (1, b):
        raise InputError(f"apply_patch: {p.shape[0]} patches for {b} images")
    p = p.to(x.dtype)

    h, w = p.shape[-2:]
    if h > hh or w > ww:
        raise InputError(f"apply_patch: patch {(h, w)} is larger than the images {(hh, ww)}")
    if mask is not None:
        # a full-size patch without corners: the mask covers the image (a canvas)
        canvas_mask = locations is None and (h, w) == (hh, ww)
        m = _check_mask(mask, x, (b, 1, hh, ww) if canvas_mask else (b, 1, h, w))
        if canvas_mask:
            return x * (1 - m) + p * m
    if locations is None:
        locations = _draw_locations(b, (hh, ww), (h, w), generator, x.device)
    elif check:
        try:
            locations = _check_locations(locations, x, (h, w))
        except InputError as exc:
            raise InputError(f"apply_patch: {exc}") from None
    loc = locations.to(device=x.device, dtype=torch.long)
    rows = loc[:, :1] + torch.arange(h, device=x.device)  # (B, h)
    cols = loc[:, 1:] + torch.arange(w, device=x.device)  # (B, w)
    bi = torch.arange(b, device=x.device).view(b, 1, 1)
    index = (bi, rows.view(b, h, 1), cols.view(b, 1, w))
    values = p.expand(b, c, h, w).permute(0, 2, 3, 1)  # (B, h, w, C)
    canvas = torch.zeros(b, hh, ww, c, device=x.device, dtype=x.dtype).index_put(index, values)
    if mask is None:
        weights = torch.ones((), device=x.device, dtype=x.dtype).expand(b, h, w, 1)
    else:
        weights = m.expand(b, 1, h, w).permute(0, 2, 3, 1)  # (B, h, w, 1)
    m = torch.zeros(b, hh, ww, 1, device=x.device, dtype=x.dtype).index_put(index, weights)
    canvas, m = canvas.permute(0, 3, 1, 2), m.permute(0, 3, 1, 2)
    return x * (1 - m) + canvas * m


def _check_mask(mask: object, x: Tensor, shape: tuple[int, int, int, int]) -> Tensor:
    """``mask`` as a 4-d tensor of ``x``'s dtype broadcasting to ``shape``.

    Raises:
        InputError: not a tensor, on another device than ``x``, or not broadcasting.
    """
    if not isinstance(mask, Tensor):
        raise InputError(f"apply_patch: mask must be a tensor, got {type(mask).__name__}")
    if mask.device != x.device:
        raise InputError(f"apply_patch: mask is on {mask.device} but x is on {x.device}")
    try:
        fits = mask.ndim <= 4 and torch.broadcast_shapes(mask.shape, shape) == shape
    except RuntimeError:
        fits = False
    if not fits:
        what = "the images" if shape[-2:] == x.shape[-2:] else "the patch"
        raise InputError(
            f"apply_patch: mask of shape {tuple(mask.shape)} does not broadcast to "
            f"{shape} ({what}: (B, 1, {shape[2]}, {shape[3]}))"
        )
    m = mask.to(dtype=x.dtype)
    while m.ndim < 4:
        m = m.unsqueeze(0)
    return m


class RandomPatch:
    """Uniform-noise patches at random locations: the default source of ``wrapper.loss``.

    It stands in for an adversarial patch until a crafted source is given (see
    `triqdef.attacks`), and is the floor every attack is compared against.

    Args:
        patch_size: side (int) or ``(h, w)``; ``None`` scales with the image: a
            square of side ``round(0.1875 * min(H, W))`` (6 pixels on 32x32, the
            paper's CIFAR-10 setting), at least 1.
        generator: optional random generator.

    Raises:
        ConfigError: ``patch_size`` is not a positive int or ``(h, w)`` pair of them.
    """

    def __init__(
        self,
        patch_size: int | tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.patch_size = None if patch_size is None else check_size2(patch_size)
        self.generator = generator

    def __repr__(self) -> str:
        return f"RandomPatch(patch_size={self.patch_size})"

    def size_for(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """Patch size used on images of ``image_size``."""
        if self.patch_size is not None:
            return self.patch_size
        side = max(1, round(0.1875 * min(image_size)))
        return side, side

    def __call__(self, x: Tensor, y: Tensor | None = None, wrapper=None) -> Tensor:
        b, c, hh, ww = x.shape
        h, w = self.size_for((hh, ww))
        if h > hh or w > ww:
            raise InputError(f"RandomPatch: patch {(h, w)} is larger than the images {(hh, ww)}")
        gen_device = self.generator.device if self.generator is not None else x.device
        patches = torch.rand(b, c, h, w, generator=self.generator, device=gen_device)
        return apply_patch(x.detach(), patches.to(x.device, x.dtype), generator=self.generator)
