"""Every input check of the package, and its one progress-bar helper.

One error class per kind of bad value, the same in every module:

* a constructor or builder argument (bit-widths, layer names, hyper-parameters, a
  patch size, a step count, a region, an attack's ``mean``/``std``, a seed) raises
  [`ConfigError`][triqdef.errors.ConfigError], or
  [`LayerNotFoundError`][triqdef.errors.LayerNotFoundError] for a name that is not
  a module of the model;
* a tensor (images, labels, patches, corners, calibration batches, a model's
  output), wherever it is passed, a device, and any other argument of a call
  (``max_batches``, an evaluation's ``mean``/``std``, ``fit``'s ``epochs``,
  ``reseed``'s ``seed``) raises [`InputError`][triqdef.errors.InputError];
* a bit-width the model does not run at raises
  [`ConfigError`][triqdef.errors.ConfigError] wherever it is named, as the
  wrapper's ``set_bits`` does.

One policy for a missing ``tqdm``: ``progress=True`` warns and runs without a bar
(see `progress_bar`).
"""

from __future__ import annotations

import difflib
import fnmatch
import math
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import torch
from torch import Tensor, nn

from .errors import ConfigError, InputError, LayerNotFoundError

__all__ = [
    "act_grid",
    "available_devices",
    "check_act_bits",
    "check_bits",
    "check_bits_sequence",
    "check_calibration_batches",
    "check_channel_stats",
    "check_device",
    "check_dtype",
    "check_eval_device",
    "check_feature_inputs",
    "check_float",
    "check_images",
    "check_input_bits",
    "check_int",
    "check_label_range",
    "check_labels",
    "check_max_batches",
    "check_min_bits",
    "check_momentum",
    "check_names",
    "check_patch_tensor",
    "check_penalty_bits",
    "check_quantizer",
    "check_size2",
    "check_target",
    "is_label_dtype",
    "label_dtype_error",
    "label_range_error",
    "labels_out_of_range",
    "logits_of",
    "model_device",
    "model_dtype",
    "progress_bar",
    "resolve_device",
]


# --- constructor arguments ------------------------------------------------------------------
def check_bits(bits: Iterable[int]) -> tuple[int, ...]:
    """The bit-widths, each an int in [2, 32] listed once, sorted high to low."""
    try:
        bits = tuple(bits)
    except TypeError:
        raise ConfigError(f"bits must be a sequence of integers, got {bits!r}") from None
    if not bits:
        raise ConfigError("bits is empty; give at least one bit-width, e.g. bits=(32, 8, 4)")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int):
            raise ConfigError(f"bits must be integers, got {b!r} ({type(b).__name__}) in {bits}")
        if not 2 <= b <= 32:
            raise ConfigError(f"bit-width {b} is out of range: every bit-width must be in [2, 32]")
    dup = sorted({b for b in bits if bits.count(b) > 1})
    if dup:
        raise ConfigError(f"bits {bits} lists {dup} more than once")
    return tuple(sorted(bits, reverse=True))


def check_penalty_bits(m: Any) -> int | None:
    """``None`` or an int ``>= 2``: how many bit-widths the penalties sample."""
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, int) or m < 2:
        raise ConfigError(
            "penalty_bits must be None (every pair of active bit-widths) or an int >= 2 "
            f"(a pair needs two bit-widths), got {m!r}"
        )
    return m


def check_input_bits(b: Any) -> int | None:
    """``None`` or an int in [2, 32]: the fewest bits the model's own input gets."""
    if b is None:
        return None
    if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 32:
        raise ConfigError(
            "input_bits must be None (the model's input quantized like any layer input) or "
            f"an int in [2, 32] (the fewest bits its input is quantized to), got {b!r}"
        )
    return b


def check_momentum(momentum: Any) -> None:
    """The observers' moving-average weight must be a number in (0, 1]."""
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not 0.0 < float(momentum) <= 1.0
    ):
        raise ConfigError(f"momentum must be in (0, 1], got {momentum}")


def check_names(model: nn.Module, names: Any, what: str) -> tuple[str, ...]:
    """Layer names of ``model`` (one str counts as one name); the closest ones on a miss."""
    if isinstance(names, str):
        names = (names,)
    try:
        names = tuple(names)
    except TypeError:
        raise ConfigError(f"{what} must be a sequence of layer names, got {names!r}") from None
    known = dict(model.named_modules())
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"{what} must be layer names (str), got {name!r}")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
            hint = f" Closest names: {close}." if close else ""
            raise LayerNotFoundError(
                f"{what} names {name!r}, which is not a module of {type(model).__name__}.{hint}"
                " List them all with [n for n, _ in model.named_modules()]."
            )
    return names


def _layer_bits(what: str, b: Any) -> int:
    """A bit-width given in ``what``: an int in [2, 32]."""
    if isinstance(b, bool) or not isinstance(b, int) or not 2 <= b <= 32:
        raise ConfigError(f"{what} must be a bit-width, an int in [2, 32], got {b!r}")
    return b


def check_min_bits(model: nn.Module, min_bits: Any, quantized: list[str]) -> dict[str, int]:
    """``min_bits`` (``None`` or ``{layer name or fnmatch pattern: bits}``) as
    ``{quantized layer name: floor}``.

    A name is a module of ``model``: the floor applies to the quantized layers it is or
    contains (a container names everything inside it). A key holding ``*``, ``?`` or
    ``[`` is an ``fnmatch`` pattern matched against the names of the quantized layers
    (``*`` also crosses dots). A layer matched by several keys takes the highest floor.
    Every value is an int in [2, 32] (32: never quantized).

    Raises:
        ConfigError: ``min_bits`` is not a mapping, a key is not a str, a value not a
            bit-width, or a name is a module that holds no quantized layer.
        LayerNotFoundError: a name is no module of ``model`` or a pattern matches no
            quantized layer; the message lists the closest names.
    """
    if min_bits is None:
        return {}
    if not isinstance(min_bits, Mapping):
        raise ConfigError(
            "min_bits must be a mapping {layer name or fnmatch pattern: bits}, e.g. "
            f"{{'conv1': 8, 'fc': 8}}, got {type(min_bits).__name__} {min_bits!r}"
        )
    modules = dict(model.named_modules())
    floors: dict[str, int] = {}
    for key, b in min_bits.items():
        if not isinstance(key, str):
            raise ConfigError(f"min_bits keys must be layer names or patterns (str), got {key!r}")
        b = _layer_bits(f"min_bits[{key!r}]", b)
        if any(c in key for c in "*?["):
            hits = [n for n in quantized if fnmatch.fnmatchcase(n, key)]
            if not hits:
                close = difflib.get_close_matches(key, quantized, n=5, cutoff=0.3)
                hint = f" Closest quantized layers: {close}." if close else ""
                raise LayerNotFoundError(
                    f"min_bits pattern {key!r} matches no quantized layer of "
                    f"{type(model).__name__}.{hint} The quantized layers are the Conv, Linear "
                    "and MultiheadAttention modules outside `exclude` "
                    f"(here {quantized[:8]}{' ...' if len(quantized) > 8 else ''})."
                )
        elif key not in modules:
            close = difflib.get_close_matches(key, list(modules), n=5, cutoff=0.5)
            hint = f" Closest names: {close}." if close else ""
            raise LayerNotFoundError(
                f"min_bits names {key!r}, which is not a module of {type(model).__name__}.{hint}"
                " List them all with [n for n, _ in model.named_modules()]."
            )
        else:
            hits = [n for n in quantized if key in ("", n) or n.startswith(key + ".")]
            if not hits:
                raise ConfigError(
                    f"min_bits names {key!r} ({type(modules[key]).__name__}), which holds no "
                    "quantized layer (Conv, Linear or MultiheadAttention outside `exclude`); "
                    "name the quantized layers it feeds instead, e.g. "
                    f"{quantized[:3]}"
                )
        for name in hits:
            floors[name] = max(floors.get(name, 2), b)
    return {n: floors[n] for n in quantized if n in floors}


def check_act_bits(act_bits: Any, bits: tuple[int, ...]) -> int | dict[int, int] | None:
    """``act_bits`` as ``None``, an int floor, or ``{weight bits: activation bits}``.

    Raises:
        ConfigError: not ``None``, an int in [2, 32], or a mapping whose keys are the
            wrapper's bit-widths below 32 and whose values are ints in [2, 32].
    """
    rule = (
        "act_bits must be None (activations at the weight bit-width), an int in [2, 32] "
        "(the fewest bits of every layer input, e.g. 8 for W4A8 at 4 bits) or a mapping "
        "{active bit-width: activation bits} over this wrapper's bit-widths below 32, "
        "e.g. {4: 8, 2: 8}"
    )
    if act_bits is None:
        return None
    if isinstance(act_bits, Mapping):
        low = [b for b in bits if b < 32]
        out: dict[int, int] = {}
        for k, v in act_bits.items():
            if isinstance(k, bool) or not isinstance(k, int) or k not in low:
                raise ConfigError(f"{rule}; the key {k!r} is not one of {low}")
            out[k] = _layer_bits(f"act_bits[{k}]", v)
        return dict(sorted(out.items(), reverse=True)) or None
    if isinstance(act_bits, bool) or not isinstance(act_bits, int) or not 2 <= act_bits <= 32:
        raise ConfigError(f"{rule}, got {act_bits!r}")
    return act_bits


def act_grid(act_bits: int | Mapping[int, int] | None, bits: int) -> int:
    """The activation bit-width at the active bit-width ``bits`` under a checked
    ``act_bits`` (before any per-layer ``min_bits`` floor)."""
    if act_bits is None:
        return bits
    if isinstance(act_bits, Mapping):
        return act_bits.get(bits, bits)
    return max(bits, act_bits)


def check_quantizer(quantizer: Any) -> str:
    """``"minmax"`` or ``"lsq"``."""
    if not isinstance(quantizer, str) or quantizer not in ("minmax", "lsq"):
        raise ConfigError(
            "quantizer must be 'minmax' (scales from the weights' and the observers' ranges) "
            f"or 'lsq' (learned step sizes, LSQ), got {quantizer!r}"
        )
    return quantizer


def spatial_size(t: Tensor) -> tuple[int, int]:
    """``(H, W)``: the last two dimensions of an image, batch or patch tensor."""
    return t.shape[-2], t.shape[-1]


def check_size2(
    size: Any, what: str = "patch_size", error: type[Exception] = ConfigError
) -> tuple[int, int]:
    """An int or an ``(h, w)`` pair of positive ints, as ``(h, w)``."""
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


# --- tensors given to a call ----------------------------------------------------------------
def check_calibration_batches(model: nn.Module, batches: list) -> None:
    """Raise InputError for a batch that is not a non-empty tensor on the model's device, or
    a floating batch whose dtype differs from the model's or that holds NaN/Inf (checked
    before any statistic is reset). Integer batches (token ids) are accepted as they are."""
    param = next(model.parameters(), None)
    for i, x in enumerate(batches):
        if not isinstance(x, torch.Tensor) or x.numel() == 0:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x)
            raise InputError(f"calibrate: batch {i} must be a non-empty tensor, got {got}")
        if param is not None and x.device != param.device:
            raise InputError(f"calibrate: batch {i} is on {x.device}, the model on {param.device}")
        if not x.is_floating_point():
            continue
        if param is not None and x.dtype != param.dtype:
            raise InputError(f"calibrate: batch {i} is {x.dtype}, the model is {param.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise InputError(f"calibrate: batch {i} contains NaN or Inf")


def check_feature_inputs(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Raise InputError unless the first argument is a tensor and every tensor argument is
    on the model's device and, when floating, of its parameters' dtype (any dtype under
    autocast). The model may take several inputs; non-tensor extras are left to it."""
    if not args or not isinstance(args[0], torch.Tensor):
        got = type(args[0]).__name__ if args else "nothing"
        raise InputError(f"features: the first argument must be a tensor, got {got}")
    param = next(model.parameters(), None)
    if param is None:
        return
    named = [(f"argument {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            continue
        if t.device != param.device:
            raise InputError(
                f"features: {name} is on {t.device} but the model is on {param.device}"
            )
        if (
            t.is_floating_point()
            and t.dtype != param.dtype
            and not torch.is_autocast_enabled(t.device.type)
        ):
            raise InputError(
                f"features: {name} is {t.dtype} but the model's parameters are {param.dtype}"
            )


def logits_of(out: Any, what: str = "loss") -> torch.Tensor:
    """The ``(B, K)`` class scores in what a classifier returned.

    Accepted: a ``(B, K)`` tensor; a tuple or namedtuple (its first item, e.g.
    torchvision's ``GoogLeNetOutputs`` / ``InceptionOutputs`` in training mode, whose
    auxiliary logits are not used); a mapping (its ``"logits"`` entry, e.g. a Hugging
    Face ``ModelOutput``, else its ``"out"`` entry); a ``(B, K, 1, ..., 1)`` tensor
    (squeezed to ``(B, K)``).

    Raises:
        InputError: anything else, e.g. ``(B, K, H, W)`` per-pixel scores (segmentation
            is not image classification) or ``(B,)``; the message names what the model
            returned.
    """
    got = out
    if isinstance(out, Mapping):
        key = "logits" if "logits" in out else "out" if "out" in out else None
        if key is None:
            raise InputError(
                f"{what}: the model returned a {type(got).__name__} with keys "
                f"{list(out)[:8]}; a mapping needs a 'logits' (or 'out') entry holding "
                "(B, K) class scores"
            )
        out = out[key]
    elif isinstance(out, (tuple, list)):
        if not out:
            raise InputError(f"{what}: the model returned an empty {type(got).__name__}")
        out = out[0]
    if not isinstance(out, torch.Tensor):
        inner = "" if out is got else f" whose first item / logits entry is {type(out).__name__}"
        raise InputError(
            f"{what}: the model must return (B, K) logits (or a tuple, namedtuple or dict "
            f"holding them), got {type(got).__name__}{inner}"
        )
    if out.ndim > 2 and all(s == 1 for s in out.shape[2:]):
        out = out.flatten(1)  # (B, K, 1, 1): a classifier ending in a 1x1 convolution
    if out.ndim != 2:
        hint = (
            "; (B, K, H, W) holds per-pixel scores (segmentation), not one score per class "
            "and image: pool them in the model (e.g. nn.AdaptiveAvgPool2d(1) + nn.Flatten())"
            if out.ndim > 2
            else ""
        )
        raise InputError(
            f"{what}: the model returned a tensor of shape {tuple(out.shape)}, expected "
            f"(B, K) class scores{hint}"
        )
    return out


# --- labels, dtypes, devices: shared by the loss, the attacks and the evaluation --------------
def is_label_dtype(dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` can hold class indices: any integer dtype, not bool.

    Labels of every integer width (``int64``, ``int32``, ``int16``, ``int8``, ``uint8``)
    are accepted everywhere triqdef takes labels and used as ``int64``.
    """
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def label_dtype_error(what: str, y: Any) -> InputError:
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


def model_dtype(model: nn.Module) -> torch.dtype | None:
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


def resolve_device(device: Any, what: str = "device") -> torch.device:
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
            # torch takes any integral index (it calls __index__), not only int
            dev = torch.device(cast("str | int", device))
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


_TQDM_HINT = "progress=True needs tqdm (pip install tqdm); continuing without a progress bar"


# --- numbers and sizes -----------------------------------------------------------------------
def check_int(name: str, value: Any, low: int = 1, error: type[Exception] = ConfigError) -> int:
    """``value`` as an int ``>= low``; ``error`` (a constructor's by default) otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise error(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_float(name: str, value: Any, low: float = 0.0, strict: bool = True) -> float:
    """``value`` as a finite float ``> low`` (``>= low`` unless ``strict``); ConfigError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ConfigError(f"{name} must be finite and {'>' if strict else '>='} {low}, got {value}")
    return value


def check_channel_stats(
    name: str, value: Any, positive: bool = False, error: type[Exception] = ConfigError
) -> Tensor | None:
    """Per-channel ``mean``/``std`` as a flat float64 CPU tensor (``None`` stays ``None``);
    with ``positive``, every value must be ``> 0`` (a ``std``)."""
    if value is None:
        return None
    try:
        t = torch.as_tensor(value, dtype=torch.float64).detach().flatten().cpu()
    except (TypeError, ValueError, RuntimeError):
        raise error(f"{name} must be a sequence or tensor of numbers, got {value!r}") from None
    if t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise error(f"{name} must be a non-empty sequence of finite numbers, got {value!r}")
    if positive and not bool((t > 0).all()):
        raise error(f"{name} must be > 0, got {t.tolist()}")
    return t


def check_max_batches(max_batches: object) -> int | None:
    """``None`` or a positive int (an evaluation's ``max_batches=``)."""
    if max_batches is None:
        return None
    if isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral):
        raise InputError(f"max_batches must be None or a positive integer, got {max_batches!r}")
    if max_batches < 1:
        raise InputError(f"max_batches must be None or a positive integer, got {max_batches}")
    return int(max_batches)


def check_bits_sequence(
    fn: str, bits: object, what: str, default: tuple[int, ...], check_bit: Callable
) -> tuple[int, ...]:
    """``bits`` (None = ``default``) as a tuple of distinct bit-widths, each ``check_bit``-ed."""
    if bits is None:
        return default
    if isinstance(bits, numbers.Integral) and not isinstance(bits, bool):
        bits = (int(bits),)
    try:
        # a non-iterable raises TypeError here, reported below
        seq: tuple[Any, ...] = tuple(cast("Iterable[Any]", bits))
    except TypeError:
        raise InputError(f"{fn}: {what} must be a sequence of ints, got {bits!r}") from None
    if not seq:
        raise InputError(f"{fn}: {what} is empty")
    for b in seq:
        check_bit(b)
    if len(set(seq)) != len(seq):
        raise InputError(f"{fn}: {what} {seq} lists a bit-width more than once")
    return seq


# --- tensors ---------------------------------------------------------------------------------
def check_patch_tensor(patch: Any, what: str = "init_patch") -> Tensor:
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
    """Raise [`InputError`][triqdef.errors.InputError] if ``t`` holds no data (meta) or is
    not on ``device``."""
    if t.device.type == "meta":
        raise InputError(f"{what} is on the meta device, which holds no data")
    if device is not None and t.device != device:
        raise InputError(f"{what} is on {t.device} but the model is on {device}")


def check_images(
    x: Any,
    what: str = "x",
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Raise [`InputError`][triqdef.errors.InputError] unless ``x`` is a non-empty floating
    ``(B, C, H, W)`` in [0, 1] holding data, on ``device`` and of ``dtype`` when they are
    given (the model's; see ``check_dtype`` for the dtype rule)."""
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


def check_labels(y: Any, x: Tensor, what: str = "y") -> Tensor:
    """Raise [`InputError`][triqdef.errors.InputError] unless ``y`` is an integer ``(B,)``
    tensor on ``x``'s device.

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


def labels_out_of_range(y: Tensor, num_classes: int) -> Tensor:
    """0-dim bool device tensor: some label is outside ``[0, num_classes)`` (no host sync)."""
    return ((y < 0) | (y >= num_classes)).any()


def label_range_error(fn: str, y: Tensor, num_classes: int) -> InputError:
    """The error naming the first label of ``y`` outside ``[0, num_classes)``."""
    bad = ((y < 0) | (y >= num_classes)).nonzero()
    i = int(bad[0, 0]) if bad.numel() else 0
    return InputError(
        f"{fn}: label {int(y[i])} (sample {i} of the batch) is outside the model's "
        f"{num_classes} classes; labels must be class indices in [0, {num_classes}), "
        f"i.e. 0 to {num_classes - 1}"
    )


def check_label_range(fn: str, y: Tensor, num_classes: int) -> None:
    """Raise `label_range_error` when a label is outside the classes (one host sync)."""
    if bool(labels_out_of_range(y, num_classes)):
        raise label_range_error(fn, y, num_classes)


def check_target(fn: str, target: object, y: Tensor, num_classes: int) -> Tensor:
    """``target`` (an int or a (B,) tensor) as a (B,) long tensor, checked against the classes."""
    if isinstance(target, Tensor):
        if not is_label_dtype(target.dtype):
            raise InputError(f"{fn}: target must hold integer class indices, got {target.dtype}")
        if target.ndim == 0:
            t = target.to(y.device).long().expand_as(y)
        elif target.shape == y.shape:
            t = target.to(y.device).long()
        else:
            raise InputError(
                f"{fn}: target must be an int or a tensor of shape {tuple(y.shape)}, "
                f"got shape {tuple(target.shape)}"
            )
        if bool(((t < 0) | (t >= num_classes)).any()):
            bad = int(t[(t < 0) | (t >= num_classes)][0])
            raise InputError(
                f"{fn}: target class {bad} is outside the model's {num_classes} classes "
                f"(valid targets: 0 to {num_classes - 1})"
            )
        return t
    if isinstance(target, bool) or not isinstance(target, numbers.Integral):
        raise InputError(f"{fn}: target must be None, an int or a tensor, got {target!r}")
    if not 0 <= int(target) < num_classes:
        raise InputError(
            f"{fn}: target class {int(target)} is outside the model's {num_classes} classes "
            f"(valid targets: 0 to {num_classes - 1})"
        )
    return torch.full_like(y, int(target))


# --- devices ---------------------------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    """Where ``model`` lives: its first parameter's, else first buffer's device, else CPU."""
    for t in model.parameters():
        return t.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def check_eval_device(fn: str, device: object, model: nn.Module) -> torch.device:
    """An evaluation's ``device=`` checked (it must exist here, and be where the model is);
    default: the model's device."""
    home = model_device(model)
    if device is None:
        return home
    dev = resolve_device(device, f"{fn}: device")
    has_state = (
        next(model.parameters(), None) is not None or next(model.buffers(), None) is not None
    )
    if has_state and dev != home:
        raise InputError(
            f"{fn}: device={str(dev)!r} but the model is on {home}; the evaluation runs where "
            f"the model is, so move the model first (model.to({str(dev)!r})) or leave "
            "device=None"
        )
    return dev


# --- progress --------------------------------------------------------------------------------
def progress_bar(
    iterable: Iterable, enabled: bool, total: int | None = None, desc: str = ""
) -> Iterable:
    """``iterable`` in a tqdm bar when ``enabled``; ``iterable`` itself otherwise.

    tqdm is imported only when a bar is asked for. Without tqdm, ``progress=True``
    warns (a ``UserWarning``, shown once per call site by Python's default filter)
    and the work runs without a bar: a progress bar is cosmetic, never a reason to
    fail. ``total=None`` lets tqdm take ``len(iterable)`` where there is one.
    """
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm  # optional dependency (the vision extra)
    except ImportError:
        warnings.warn(_TQDM_HINT, stacklevel=3)
        return iterable
    return tqdm(iterable, total=total, desc=desc, leave=False)
