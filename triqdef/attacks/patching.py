"""Placing patches on images, and the patch-source protocol of ``wrapper.loss``."""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..errors import InputError

if TYPE_CHECKING:
    from ..wrapper import TriQDefWrapper

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

    def __call__(self, x: Tensor, y: Tensor, wrapper: TriQDefWrapper) -> Tensor: ...


def _size2(size, what: str = "patch_size") -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be an int or an (h, w) pair, got {size!r}") from None
    if h < 1 or w < 1:
        raise InputError(f"{what} must be positive, got {(h, w)}")
    return h, w


# --- checks shared by the loss, the attacks and the evaluation functions ----------------------
def is_label_dtype(dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` can hold class indices: any integer dtype, not bool.

    Labels of every integer width (``int64``, ``int32``, ``int16``, ``int8``, ``uint8``)
    are accepted everywhere triqdef takes labels and used as ``int64``.
    """
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def label_dtype_error(what: str, y) -> InputError:
    """The [`InputError`][triqdef.errors.InputError] for labels that are no integer tensor."""
    got = y.dtype if isinstance(y, Tensor) else type(y).__name__
    hint = ""
    if isinstance(y, Tensor) and (y.is_floating_point() or y.dtype == torch.bool):
        hint = (
            "; labels are class indices: convert whole-number labels with y.long(), and "
            "one-hot or soft targets with y.argmax(1)"
        )
    return InputError(
        f"{what} must be an integer tensor of class indices (int64, int32, int16, int8 or "
        f"uint8), got {got}{hint}"
    )


def model_dtype(model) -> torch.dtype | None:
    """The dtype of a model's first floating parameter (``None``: it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def check_dtype(x: Tensor, dtype: torch.dtype | None, what: str = "x", prefix: str = "") -> None:
    """Raise [`InputError`][triqdef.errors.InputError] unless the floating images ``x`` have the
    model's parameter ``dtype``.

    Triqdef never casts images behind the caller's back (a silent cast would hide a
    float64 pipeline running at float32 or a float16 one losing its memory savings):
    the caller converts one side. Under ``torch.autocast`` any floating dtype is
    accepted, as autocast casts per operation. ``dtype=None`` (a model without
    floating parameters) accepts anything. ``prefix`` starts the message (e.g.
    ``"clean_accuracy: "``).
    """
    if dtype is None or x.dtype == dtype or torch.is_autocast_enabled(x.device.type):
        return
    raise InputError(
        f"{prefix}{what} is {x.dtype} but the model's parameters are {dtype}; convert the "
        f"images with {what}.to({dtype}) (or the model with model.to({x.dtype}))"
    )


def available_devices() -> list[str]:
    """The devices this machine can run on: ``cpu``, then each CUDA / MPS / XPU device."""
    out = ["cpu"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    xpu = getattr(torch, "xpu", None)
    if xpu is not None and xpu.is_available():
        out += [f"xpu:{i}" for i in range(xpu.device_count())]
    return out


def resolve_device(device, what: str = "device") -> torch.device:
    """Check a user-given ``device=`` and return it with its index filled in (``cuda:0``).

    Args:
        device: a ``torch.device``, a string such as ``"cpu"`` or ``"cuda:1"``, or a
            CUDA device index.
        what: how error messages name the argument.

    Returns:
        The device, as tensors created on it report it.

    Raises:
        InputError: not a device, an unknown device type, the meta device (it holds
            no data), or a device this machine does not have (no GPU, index too
            high); the message lists the devices that exist.
    """
    if isinstance(device, torch.device):
        dev = device
    elif isinstance(device, str) or (
        isinstance(device, numbers.Integral) and not isinstance(device, bool)
    ):
        try:
            dev = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise InputError(
                f"{what}={device!r} is not a device; available devices: "
                f"{', '.join(available_devices())}"
            ) from None
    else:
        raise InputError(
            f"{what} must be a torch.device, a string such as 'cpu' or 'cuda:0', or None; "
            f"got {type(device).__name__}"
        )
    if dev.type == "meta":
        raise InputError(
            f"{what}='meta' holds no data and cannot run an evaluation; available devices: "
            f"{', '.join(available_devices())}"
        )
    try:
        return torch.empty(0, device=dev).device  # the only test every backend answers
    except (RuntimeError, AssertionError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"{what}={str(dev)!r} is not available on this machine ({reason}); available "
            f"devices: {', '.join(available_devices())}"
        ) from None


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
    """:func:`random_locations` without the check of ``device`` (one triqdef already uses)."""
    (hh, ww), (h, w) = image_size, patch_size
    gen_device = generator.device if generator is not None else device
    rows = torch.randint(0, hh - h + 1, (n,), generator=generator, device=gen_device)
    cols = torch.randint(0, ww - w + 1, (n,), generator=generator, device=gen_device)
    return torch.stack([rows, cols], dim=1).to(device)


def check_locations(locations, x: Tensor, patch_size: tuple[int, int]) -> Tensor:
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

    Args:
        x: images ``(B, C, H, W)``.
        patch: one patch ``(C, h, w)`` for every image or one per image
            ``(B, C, h, w)``; with ``mask``, a full-size ``(C, H, W)`` or
            ``(B, C, H, W)`` canvas.
        locations: ``(B, 2)`` integer top-left ``(row, col)`` of each patch. When
            neither ``locations`` nor ``mask`` is given, locations are random.
        mask: binary ``(B, 1, H, W)``, ``(1, H, W)`` or ``(H, W)`` mask selecting the
            pixels taken from ``patch``.
        generator: random generator for random locations.

    Returns:
        Patched images ``(B, C, H, W)``. Gradients reach ``patch`` only inside the
        mask and ``x`` only outside it.

    Raises:
        InputError: bad ``x`` or ``patch`` (an empty patch included); ``locations``
            that are not integer ``(B, 2)`` corners keeping the patch inside the
            images; a ``mask`` that is not on ``x``'s device or does not broadcast to
            ``(B, 1, H, W)``.

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


def paste_patch(x: Tensor, patch: Tensor, locations: Tensor) -> Tensor:
    """:func:`apply_patch` at corners that triqdef drew inside the images itself.

    Skips the bounds check of ``locations`` (a host sync), so attack loops can paste
    at their own corners every step; user-given corners go through :func:`apply_patch`.
    """
    return _apply_patch(x, patch, locations, None, None, check=False)


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

    if mask is not None:
        if locations is not None:
            raise InputError("apply_patch: give locations or mask, not both")
        if p.shape[-2:] != (hh, ww):
            raise InputError(
                f"apply_patch: with a mask the patch must be full-size {(hh, ww)}, "
                f"got {tuple(p.shape[-2:])}"
            )
        if not isinstance(mask, Tensor):
            raise InputError(f"apply_patch: mask must be a tensor, got {type(mask).__name__}")
        if mask.device != x.device:
            raise InputError(f"apply_patch: mask is on {mask.device} but x is on {x.device}")
        try:
            fits = torch.broadcast_shapes(mask.shape, (b, 1, hh, ww)) == (b, 1, hh, ww)
        except RuntimeError:
            fits = False
        if not fits:
            raise InputError(
                f"apply_patch: mask of shape {tuple(mask.shape)} does not broadcast to "
                f"{(b, 1, hh, ww)}"
            )
        m = mask.to(dtype=x.dtype)
        while m.ndim < 4:
            m = m.unsqueeze(0)
        return x * (1 - m) + p * m

    h, w = p.shape[-2:]
    if h > hh or w > ww:
        raise InputError(f"apply_patch: patch {(h, w)} is larger than the images {(hh, ww)}")
    if locations is None:
        locations = _draw_locations(b, (hh, ww), (h, w), generator, x.device)
    elif check:
        try:
            locations = check_locations(locations, x, (h, w))
        except InputError as exc:
            raise InputError(f"apply_patch: {exc}") from None
    loc = locations.to(device=x.device, dtype=torch.long)
    rows = loc[:, :1] + torch.arange(h, device=x.device)  # (B, h)
    cols = loc[:, 1:] + torch.arange(w, device=x.device)  # (B, w)
    bi = torch.arange(b, device=x.device).view(b, 1, 1)
    index = (bi, rows.view(b, h, 1), cols.view(b, 1, w))
    values = p.expand(b, c, h, w).permute(0, 2, 3, 1)  # (B, h, w, C)
    canvas = torch.zeros(b, hh, ww, c, device=x.device, dtype=x.dtype).index_put(index, values)
    m = torch.zeros(b, hh, ww, 1, device=x.device, dtype=x.dtype)
    m = m.index_put(index, torch.ones((), device=x.device, dtype=x.dtype).expand(b, h, w, 1))
    canvas, m = canvas.permute(0, 3, 1, 2), m.permute(0, 3, 1, 2)
    return x * (1 - m) + canvas * m


class RandomPatch:
    """Uniform-noise patches at random locations: the default source of ``wrapper.loss``.

    It stands in for an adversarial patch until a crafted source is given (see
    :mod:`triqdef.attacks`), and is the floor every attack is compared against.

    Args:
        patch_size: side (int) or ``(h, w)``; ``None`` scales with the image: a
            square of side ``round(0.1875 * min(H, W))`` (6 pixels on 32x32, the
            paper's CIFAR-10 setting), at least 1.
        generator: optional random generator.
    """

    def __init__(
        self,
        patch_size: int | tuple[int, int] | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self.patch_size = None if patch_size is None else _size2(patch_size)
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
