"""Evaluation: clean accuracy, cross-bit transfer of patch attacks, alignment reports.

Attack success rate (ASR), the number every table of the paper reports, is defined
here once and used everywhere:

* **untargeted ASR** = among samples correctly classified when clean (at the target
  bit-width), the share misclassified when patched;
* **targeted ASR** = among samples whose label is not the target, the share predicted
  as the target.

A sample whose logits hold NaN or Inf is never a success for the model: it is not
correct when clean (so not eligible), and it counts as an attack success when patched.
Clean accuracy likewise never counts such a sample as correct.

Samples outside these sets (*ineligible*) count neither as successes nor as failures,
so a model that is wrong on clean images gets no credit for it. A cell with no
eligible sample has ASR ``nan`` (``None`` in JSON, ``n/a`` in tables).

What lives here:

* :func:`clean_accuracy`: accuracy per bit-width;
* :func:`asr_counts` (on logits) and :func:`attack_success_rate` (on images);
* :func:`transfer_matrix` -> :class:`TransferMatrix`: patches crafted at each *source*
  bit-width, evaluated at each *target* bit-width, with a *noise floor*: the ASR, at each
  target bit-width, of uniform-noise patches of the same size pasted at the same
  locations as the attack's (what any occluding patch achieves without optimisation);
* :func:`asr_by_condition`: one row per evaluation condition, e.g. seen and unseen
  patches (paper tables 2 and 5);
* :func:`alignment_report` -> :class:`AlignmentReport`: how similar input gradients
  and feature maps are across bit-widths (paper tables 3 and 12).

**Seen and unseen.** A condition is *unseen* when its patch size, its location region
or the bit-width the patch was generated at was not used to build the training pool
(paper table 5, "Unseen" rows); every other condition is *seen*. Which condition is
which is decided by the caller (e.g. the reproduction script), not here.

Every function runs the model in eval mode (BatchNorm statistics and quantizer
observers never move), without gradients except where an attack or an input gradient
needs them, and restores each module's train/eval flag and the wrapper's active
bit-width on exit, also when an error is raised. Weights are never written.

Example:
    >>> logits_clean = torch.tensor([[2.0, 0.0], [2.0, 0.0], [0.0, 2.0]])
    >>> logits_adv = torch.tensor([[0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
    >>> y = torch.tensor([0, 0, 0])   # the third sample is already wrong: not eligible
    >>> asr_counts(logits_clean, logits_adv, y)
    (1, 2)
    >>> asr_counts(logits_clean, logits_adv, y, target=1)  # targeted: label != 1
    (2, 3)
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attacks.patching import (
    apply_patch,
    check_dtype,
    is_label_dtype,
    label_dtype_error,
    model_dtype,
    resolve_device,
)
from .errors import ConfigError, InputError
from .functional import descriptor_cosine, edge_iou, gradient_cosine, hog, soft_dice
from .losses import DescriptorConfig, _as_map, describe
from .wrapper import TriQDefWrapper, _check_names

__all__ = [
    "AlignmentReport",
    "INPUT_GRAD",
    "METRICS",
    "TransferMatrix",
    "alignment_report",
    "asr_by_condition",
    "asr_counts",
    "attack_success_rate",
    "clean_accuracy",
    "transfer_matrix",
]

#: Metric keys of :class:`AlignmentReport`, in report order.
METRICS = ("cosine", "edge_iou", "hog_cosine", "soft_dice", "soft_hog")
_METRIC_LABELS = {
    "cosine": "Cosine",
    "edge_iou": "Edge IoU",
    "hog_cosine": "HOG cosine",
    "soft_dice": "SoftDice",
    "soft_hog": "SoftHOG cosine",
}
#: Name of the input-gradient map in :class:`AlignmentReport` (the others are layer names).
INPUT_GRAD = "input_grad"
_REDUCTIONS = ("pooled", "mean", "max", "diagonal")
_MPL_HINT = "pip install matplotlib (or pip install 'triqdef[vision]')"


# ------------------------------------------------------------------------------ helpers


def _fmt_pct(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}"


def _fmt(value: float, digits: int) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _rate(successes: int, eligible: int) -> float:
    return successes / eligible if eligible else float("nan")


def _json_float(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _from_json_float(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _bits_label(b: int) -> str:
    return f"{b}-bit"


def _pair_label(pair: tuple[int, int]) -> str:
    return f"{pair[0]}<->{pair[1]}"


def _check_max_batches(max_batches: object) -> int | None:
    if max_batches is None:
        return None
    if isinstance(max_batches, bool) or not isinstance(max_batches, numbers.Integral):
        raise InputError(f"max_batches must be None or a positive integer, got {max_batches!r}")
    if max_batches < 1:
        raise InputError(f"max_batches must be None or a positive integer, got {max_batches}")
    return int(max_batches)


def _progress(iterable: Iterable, enabled: bool, desc: str, max_batches: int | None) -> Iterable:
    """Wrap ``iterable`` in a tqdm bar when ``enabled`` (tqdm imported lazily)."""
    if not enabled:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:  # a progress bar is cosmetic: never fail an evaluation for it
        warnings.warn(
            "progress=True needs tqdm (pip install tqdm); continuing without a progress bar",
            stacklevel=3,
        )
        return iterable
    try:
        total = len(iterable)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return tqdm(iterable, total=total, desc=desc, leave=False)


def _batches(
    loader: Iterable,
    device: torch.device,
    max_batches: int | None,
    progress: bool,
    desc: str,
    dtype: torch.dtype | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Validated ``(x, y)`` batches on ``device``, labels as int64; raises if the loader
    yields none. Images must have the model's parameter ``dtype`` (see
    ``triqdef.attacks.patching.check_dtype``); labels any integer dtype."""
    if not isinstance(loader, Iterable):
        raise InputError(
            f"{desc}: loader must be an iterable of (x, y) batches, got {type(loader).__name__}"
        )
    n = 0
    bar = _progress(loader, progress, desc, max_batches)
    try:
        for batch in bar:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                got = type(batch).__name__
                raise InputError(f"{desc}: each batch must be an (x, y) pair, got {got}")
            x, y = batch[0], batch[1]
            if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
                got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x)
                raise InputError(f"{desc}: x must be a floating (B, C, H, W) tensor, got {got}")
            if not isinstance(y, Tensor) or not is_label_dtype(y.dtype):
                raise label_dtype_error(f"{desc}: y", y)
            if y.shape != (x.shape[0],):
                raise InputError(
                    f"{desc}: y must have shape ({x.shape[0]},) like the batch, got "
                    f"{tuple(y.shape)}"
                )
            if x.shape[0] == 0:
                raise InputError(f"{desc}: got an empty batch, x of shape {tuple(x.shape)}")
            for name, t in (("x", x), ("y", y)):
                if t.device.type == "meta":  # nothing to move to the model's device
                    raise InputError(f"{desc}: {name} is on the meta device, which holds no data")
            check_dtype(x, dtype, "x", f"{desc}: ")
            n += 1
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True).long()
            if max_batches is not None and n >= max_batches:
                break  # before asking the loader for one more batch
    finally:
        close = getattr(bar, "close", None)
        if bar is not loader and close is not None:
            close()
    if n == 0:
        raise InputError(f"{desc}: the loader yielded no batches")


def _labels_out_of_range(y: Tensor, num_classes: int) -> Tensor:
    """0-dim bool device tensor: some label is outside ``[0, num_classes)`` (no host sync)."""
    return ((y < 0) | (y >= num_classes)).any()


def _label_range_error(fn: str, y: Tensor, num_classes: int) -> InputError:
    """The error naming the first label of ``y`` outside ``[0, num_classes)``."""
    bad = ((y < 0) | (y >= num_classes)).nonzero()
    i = int(bad[0, 0]) if bad.numel() else 0
    return InputError(
        f"{fn}: label {int(y[i])} (sample {i} of the batch) is outside the model's "
        f"{num_classes} classes; labels must be class indices in [0, {num_classes}), "
        f"i.e. 0 to {num_classes - 1}"
    )


def _check_labels(fn: str, y: Tensor, num_classes: int) -> None:
    if bool(_labels_out_of_range(y, num_classes)):  # one host sync per batch
        raise _label_range_error(fn, y, num_classes)


def _target_tensor(fn: str, target: object, y: Tensor, num_classes: int) -> Tensor:
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


def _counts(
    logits_clean: Tensor | None, logits_adv: Tensor, y: Tensor, target: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(successes, eligible) as 0-dim device tensors (no host sync).

    A row with a NaN or Inf logit is never a success for the model: never correct when
    clean (so not eligible), and always a success for the attack when patched.
    """
    pred_adv = logits_adv.argmax(dim=1)
    broken = ~torch.isfinite(logits_adv).all(dim=1)
    if target is None:
        eligible = (logits_clean.argmax(dim=1) == y) & torch.isfinite(logits_clean).all(dim=1)
        success = eligible & ((pred_adv != y) | broken)
    else:
        eligible = y != target
        success = eligible & ((pred_adv == target) | broken)
    return success.sum(), eligible.sum()


class _Normalize:
    """``(x - mean) / std`` per channel; the identity when both are ``None``."""

    def __init__(self, mean: object, std: object) -> None:
        self.mean = self._check("mean", mean)
        self.std = self._check("std", std)
        if self.std is not None and not bool((self.std > 0).all()):
            raise InputError(f"std must be positive, got {self.std.tolist()}")

    @staticmethod
    def _check(name: str, value: object) -> Tensor | None:
        if value is None:
            return None
        try:
            t = torch.as_tensor(value, dtype=torch.float64).flatten()
        except (TypeError, ValueError, RuntimeError):
            raise InputError(f"{name} must be a sequence of numbers, got {value!r}") from None
        if t.numel() == 0 or not bool(torch.isfinite(t).all()):
            raise InputError(f"{name} must be a non-empty sequence of finite numbers, got {value}")
        return t

    def __call__(self, x: Tensor) -> Tensor:
        if self.mean is None and self.std is None:
            return x
        c = x.shape[1]
        out = x
        for name, t in (("mean", self.mean), ("std", self.std)):
            if t is not None and t.numel() not in (1, c):
                raise InputError(f"{name} has {t.numel()} values but the images have {c} channels")
        if self.mean is not None:
            out = out - self.mean.to(x.device, x.dtype).view(1, -1, 1, 1)
        if self.std is not None:
            out = out / self.std.to(x.device, x.dtype).view(1, -1, 1, 1)
        return out


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _check_device(fn: str, device: object, model: nn.Module) -> torch.device:
    """``device=`` checked (it must exist here, and be where the model is); default: the
    model's device."""
    home = _model_device(model)
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


def _bits_tuple(
    fn: str, bits: object, what: str, default: tuple[int, ...], check_bit: Callable
) -> tuple[int, ...]:
    """``bits`` (None = ``default``) as a tuple of distinct bit-widths, each checked."""
    if bits is None:
        return default
    if isinstance(bits, numbers.Integral) and not isinstance(bits, bool):
        bits = (int(bits),)
    try:
        bits = tuple(bits)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(f"{fn}: {what} must be a sequence of ints, got {bits!r}") from None
    if not bits:
        raise InputError(f"{fn}: {what} is empty")
    for b in bits:
        check_bit(b)
    if len(set(bits)) != len(bits):
        raise InputError(f"{fn}: {what} {bits} lists a bit-width more than once")
    return bits


class _Evaluated:
    """The model under evaluation: bit-widths, eval mode, normalisation, device."""

    def __init__(self, fn: str, model: object, mean: object, std: object, device: object) -> None:
        if isinstance(model, TriQDefWrapper):
            model._check_attached()
            self.wrapper: TriQDefWrapper | None = model
            self.bits: tuple[int, ...] = tuple(model.bits)
            self.net = model.model
        elif isinstance(model, nn.Module):
            self.wrapper = None
            self.bits = (32,)
            self.net = model
        else:
            raise InputError(
                f"{fn}: model must be a TriQDefWrapper or an nn.Module, got {type(model).__name__}"
            )
        self.fn = fn
        self.module = model
        self.norm = _Normalize(mean, std)
        self.device = _check_device(fn, device, model)
        self.dtype = model_dtype(model)
        self.descriptor = model.descriptor if self.wrapper is not None else DescriptorConfig()

    def check_bits(self, bits: object, what: str) -> tuple[int, ...]:
        """``bits`` (None = all) as a tuple; unknown bit-widths raise like ``set_bits``."""
        return _bits_tuple(self.fn, bits, what, self.bits, self.check_bit)

    def check_bit(self, b: object) -> int:
        if self.wrapper is not None:
            if isinstance(b, bool) or b not in self.wrapper.bits:
                raise ConfigError(
                    f"bit-width {b!r} is not one of this wrapper's bits {self.wrapper.bits}"
                )
        elif isinstance(b, bool) or b != 32:
            raise InputError(
                f"{self.fn}: a plain nn.Module runs at 32 bits only, got bit-width {b!r}; "
                "wrap it in a TriQDefWrapper to evaluate other bit-widths"
            )
        return int(b)  # type: ignore[call-overload]

    @contextlib.contextmanager
    def session(self) -> Iterator[_Evaluated]:
        """Eval mode inside; every module's flag and the active bit-width restored after."""
        modes = [(m, m.training) for m in self.module.modules()]
        previous = self.wrapper.current_bits if self.wrapper is not None else None
        try:
            self.module.eval()
            yield self
        finally:
            for m, training in modes:
                m.training = training
            if self.wrapper is not None:
                self.wrapper.set_bits(previous)

    def source_model(self, bits: int) -> nn.Module:
        """The model an attack crafted at ``bits`` runs on."""
        return self.module

    def at(self, bits: int) -> contextlib.AbstractContextManager:
        if self.wrapper is None:
            return contextlib.nullcontext()
        return self.wrapper.at_bits(bits)

    def logits(self, x: Tensor, bits: int) -> Tensor:
        with self.at(bits):
            out = self.module(self.norm(x))
        if not isinstance(out, Tensor) or out.ndim != 2:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise InputError(f"{self.fn}: the model must return (B, classes) logits, got {got}")
        return out

    def call_source(self, source: Callable, x: Tensor, y: Tensor, bits: int | None, what: str):
        """Run an attack or patch source ``source(x, y)`` with gradients on; back to eval after."""
        try:
            with (
                torch.enable_grad(),
                self.at(bits) if bits is not None else contextlib.nullcontext(),
            ):
                x_adv = source(x, y)
        finally:
            self.module.eval()  # whatever the attack did to the modes
        if not isinstance(x_adv, Tensor) or x_adv.shape != x.shape:
            got = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
            raise InputError(
                f"{self.fn}: {what} returned {got}, expected patched images of shape "
                f"{tuple(x.shape)}"
            )
        return x_adv.detach().to(device=x.device, dtype=x.dtype)


class _PerBitEvaluated:
    """Separately trained models, one per bit-width (e.g. QAT): source ``s`` is model ``s``."""

    def __init__(self, fn: str, models: Mapping, mean: object, std: object, device: object) -> None:
        if not models:
            raise InputError(f"{fn}: the mapping of bit-width -> model is empty")
        self.subs: dict[int, _Evaluated] = {}
        for b, m in models.items():
            if isinstance(b, bool) or not isinstance(b, numbers.Integral):
                raise InputError(f"{fn}: mapping keys must be bit-widths (int), got {b!r}")
            ev = _Evaluated(fn, m, mean, std, device)
            ev.check_bit(b)
            self.subs[int(b)] = ev
        dtypes = {ev.dtype for ev in self.subs.values()} - {None}
        if len(dtypes) > 1:
            raise InputError(
                f"{fn}: the models' parameters have different dtypes {sorted(map(str, dtypes))}; "
                "convert them to one dtype with model.to(dtype)"
            )
        self.fn = fn
        self.bits = tuple(self.subs)
        self.module = nn.ModuleList([ev.module for ev in self.subs.values()])
        self.device = next(iter(self.subs.values())).device
        self.dtype = dtypes.pop() if dtypes else None

    def check_bit(self, b: object) -> int:
        if isinstance(b, bool) or b not in self.subs:
            raise ConfigError(f"bit-width {b!r} has no model; the mapping has {self.bits}")
        return int(b)  # type: ignore[call-overload]

    def check_bits(self, bits: object, what: str) -> tuple[int, ...]:
        return _bits_tuple(self.fn, bits, what, self.bits, self.check_bit)

    def source_model(self, bits: int) -> nn.Module:
        return self.subs[bits].module

    @contextlib.contextmanager
    def session(self) -> Iterator[_PerBitEvaluated]:
        with contextlib.ExitStack() as stack:
            for ev in self.subs.values():
                stack.enter_context(ev.session())
            yield self

    def logits(self, x: Tensor, bits: int) -> Tensor:
        return self.subs[bits].logits(x, bits)

    def call_source(self, source: Callable, x: Tensor, y: Tensor, bits: int | None, what: str):
        ev = self.subs[bits] if bits is not None else next(iter(self.subs.values()))
        return ev.call_source(source, x, y, bits, what)


# ------------------------------------------------------------------------ clean accuracy


def clean_accuracy(
    wrapper_or_model: TriQDefWrapper | nn.Module,
    loader: Iterable,
    bits: Sequence[int] | int | None = None,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    max_batches: int | None = None,
) -> dict[int, float]:
    """Top-1 accuracy on clean images at each bit-width.

    The loader is read once; each batch is evaluated at every bit-width, in eval mode
    and without gradients. Modes and the active bit-width are restored afterwards.

    Args:
        wrapper_or_model: a :class:`~triqdef.TriQDefWrapper`, or a plain ``nn.Module``
            (which counts as 32 bits).
        loader: any iterable of ``(x, y)`` batches (a ``DataLoader``, a list of tuples),
            images in [0, 1].
        bits: bit-widths to evaluate (default: all of ``wrapper.bits``; ``(32,)`` for a
            plain module).
        mean: per-channel mean subtracted before the model (``None``: no shift).
        std: per-channel standard deviation divided out before the model (``None``: 1).
        device: where to run: the model's device (the default), named as a
            ``torch.device``, a string or a CUDA index; the model is not moved.
        progress: show a tqdm progress bar over batches.
        max_batches: stop after this many batches (default: the whole loader).

    Returns:
        ``{bits: accuracy in [0, 1]}`` in the order of ``bits``.

    Raises:
        InputError: empty loader, malformed batch (including one on the meta device,
            images holding NaN/Inf or of another dtype than the model's parameters,
            labels outside the model's classes), bits other than 32 for a plain module,
            a ``device`` this machine does not have or that is not the model's.
        ConfigError: a bit-width that the wrapper does not have.

    Shape:
        - x: :math:`(B, C, H, W)`, y: :math:`(B,)` per batch (any integer dtype)

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        >>> data = [(torch.rand(5, 1, 2, 2), torch.zeros(5, dtype=torch.long))]
        >>> list(clean_accuracy(net, data))
        [32]
    """
    ev = _Evaluated("clean_accuracy", wrapper_or_model, mean, std, device)
    bits = ev.check_bits(bits, "bits")
    max_batches = _check_max_batches(max_batches)
    correct = {b: torch.zeros((), dtype=torch.long, device=ev.device) for b in bits}
    total = 0
    batches = contextlib.closing(
        _batches(loader, ev.device, max_batches, progress, "clean_accuracy", ev.dtype)
    )
    with ev.session(), torch.no_grad(), batches as stream:
        for x, y in stream:
            for i, b in enumerate(bits):
                logits = ev.logits(x, b)  # a row with NaN/Inf is never correct
                if i == 0:  # eval mode: that forward changed nothing
                    k = logits.shape[1]
                    bad_x = ~torch.isfinite(x).all()
                    if bool(bad_x | _labels_out_of_range(y, k)):  # one host sync per batch
                        if bool(bad_x):
                            raise InputError(
                                "clean_accuracy: x contains NaN or Inf (batch of shape "
                                f"{tuple(x.shape)})"
                            )
                        raise _label_range_error("clean_accuracy", y, k)
                correct[b] += ((logits.argmax(dim=1) == y) & torch.isfinite(logits).all(1)).sum()
            total += y.shape[0]
    return {b: int(correct[b]) / total for b in bits}


# ------------------------------------------------------------------------------- ASR


def asr_counts(
    logits_clean: Tensor | None,
    logits_adv: Tensor,
    y: Tensor,
    target: int | Tensor | None = None,
) -> tuple[int, int]:
    """Attack-success counts of one batch, from logits.

    Untargeted ASR = among samples correctly classified when clean (at the target
    bit-width), the share misclassified when patched. Targeted ASR = among samples whose
    label is not the target, the share predicted as the target.

    So with ``target=None`` the eligible samples are those whose clean prediction is
    right, and a success is an eligible sample whose patched prediction is wrong; with a
    target, the eligible samples are those whose label differs from it, and a success is
    an eligible sample predicted as the target (``logits_clean`` is then unused and may
    be ``None``). ASR is ``successes / eligible``.

    Args:
        logits_clean: logits on the clean images, at the bit-width being attacked.
        logits_adv: logits on the patched images, same bit-width.
        y: true labels.
        target: ``None`` (untargeted), one class index, or one per sample.

    Returns:
        ``(successes, eligible)`` as Python ints.

    Raises:
        InputError: shapes disagree, labels or target outside ``[0, classes)``.

    Shape:
        - logits_clean, logits_adv: :math:`(B, K)`
        - y: :math:`(B,)`; target: int or :math:`(B,)`

    Example:
        >>> clean = torch.tensor([[3.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
        >>> adv = torch.tensor([[0.0, 0.0, 3.0], [0.0, 0.0, 3.0]])
        >>> asr_counts(clean, adv, torch.tensor([0, 1]), target=2)
        (2, 2)
    """
    fn = "asr_counts"
    for name, t in (("logits_clean", logits_clean), ("logits_adv", logits_adv)):
        if t is None and name == "logits_clean" and target is not None:
            continue
        if not isinstance(t, Tensor) or t.ndim != 2 or t.shape[1] == 0:
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise InputError(f"{fn}: {name} must be a (B, classes) tensor, got {got}")
    b, k = logits_adv.shape
    if logits_clean is not None and logits_clean.shape != logits_adv.shape:
        raise InputError(
            f"{fn}: logits_clean {tuple(logits_clean.shape)} and logits_adv "
            f"{tuple(logits_adv.shape)} differ in shape"
        )
    if not isinstance(y, Tensor) or not is_label_dtype(y.dtype):
        raise label_dtype_error(f"{fn}: y", y)
    if y.shape != (b,):
        raise InputError(f"{fn}: y must have shape ({b},) like the logits, got {tuple(y.shape)}")
    y = y.to(logits_adv.device).long()
    _check_labels(fn, y, k)
    t = None if target is None else _target_tensor(fn, target, y, k)
    if target is None and logits_clean is None:
        raise InputError(f"{fn}: an untargeted ASR needs logits_clean")
    s, e = _counts(logits_clean, logits_adv, y, t)
    return int(s), int(e)


def attack_success_rate(
    model: TriQDefWrapper | nn.Module,
    x_clean: Tensor,
    x_adv: Tensor,
    y: Tensor,
    target: int | Tensor | None = None,
    *,
    bits: int | None = None,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
) -> tuple[int, int]:
    """Attack-success counts of one batch of images (see :func:`asr_counts`).

    Untargeted ASR = among samples correctly classified when clean (at the target
    bit-width), the share misclassified when patched. Targeted ASR = among samples
    whose label is not the target, the share predicted as the target.

    The model runs in eval mode without gradients, at ``bits`` (default: the wrapper's
    active bit-width); modes and the active bit-width are restored afterwards.

    Args:
        model: a :class:`~triqdef.TriQDefWrapper` or a plain ``nn.Module`` returning logits.
        x_clean: clean images in [0, 1].
        x_adv: patched images in [0, 1].
        y: true labels.
        target: ``None`` (untargeted), one class index, or one per sample.
        bits: bit-width to evaluate at (wrapper only; default: the active one).
        mean: per-channel mean subtracted before the model.
        std: per-channel standard deviation divided out before the model.

    Returns:
        ``(successes, eligible)``; the ASR is their ratio.

    Raises:
        InputError: shapes disagree, images not on the model's device or of another
            dtype than its parameters, labels or target outside the model's classes.
        ConfigError: ``bits`` is not one of the wrapper's bit-widths.

    Shape:
        - x_clean, x_adv: :math:`(B, C, H, W)`
        - y: :math:`(B,)`; target: int or :math:`(B,)`
    """
    fn = "attack_success_rate"
    for name, t in (("x_clean", x_clean), ("x_adv", x_adv)):
        if not isinstance(t, Tensor) or t.ndim != 4 or not t.is_floating_point():
            got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise InputError(f"{fn}: {name} must be a floating (B, C, H, W) tensor, got {got}")
    if x_clean.shape != x_adv.shape:
        raise InputError(
            f"{fn}: x_clean {tuple(x_clean.shape)} and x_adv {tuple(x_adv.shape)} differ in shape"
        )
    if isinstance(model, nn.Module):
        has_state = next(model.parameters(), None) is not None
        has_state = has_state or next(model.buffers(), None) is not None
        home = _model_device(model) if has_state else None
        for name, t in (("x_clean", x_clean), ("x_adv", x_adv)):
            if t.device.type == "meta":
                raise InputError(f"{fn}: {name} is on the meta device, which holds no data")
            if home is not None and t.device != home:
                raise InputError(f"{fn}: {name} is on {t.device} but the model is on {home}")
            check_dtype(t, model_dtype(model), name, f"{fn}: ")
    ev = _Evaluated(fn, model, mean, std, x_clean.device)
    b = ev.wrapper.current_bits if (bits is None and ev.wrapper is not None) else bits
    b = 32 if b is None else ev.check_bit(b)
    with ev.session(), torch.no_grad():
        clean = ev.logits(x_clean, b) if target is None else None
        adv = ev.logits(x_adv, b)
    return asr_counts(clean, adv, y, target)


# -------------------------------------------------------------------- transfer matrix


@dataclass
class TransferMatrix:
    """ASR of patches crafted at each source bit-width, evaluated at each target bit-width.

    Cell ``asr[i][j]`` is the ASR (see the module docstring) at ``target_bits[j]`` of the
    patched images an attack produced against ``source_bits[i]``; the diagonal
    (``source == target``) is the direct, white-box ASR. ``noise_floor[j]`` is the ASR at
    ``target_bits[j]`` of uniform-noise patches of the same size at the same locations
    (pooled over the source rows): an attack is only as strong as its margin over it.

    Attributes:
        source_bits: rows.
        target_bits: columns.
        asr: ``[len(source_bits)][len(target_bits)]`` ASR in [0, 1] (``nan``: no eligible
            sample).
        counts: ``(successes, eligible)`` per cell.
        noise_floor: noise-patch ASR per target bit-width.
        noise_counts: ``(successes, eligible)`` of the noise patches per target bit-width.
        attack: attack name (the attack's ``name`` attribute, else its class name).
        targeted: whether the ASR is targeted.
        target: the target class of a targeted attack with one target, else ``None``.
        samples: number of images evaluated.

    Example:
        >>> m = TransferMatrix([32, 4], [32, 4], [[0.9, 0.5], [0.6, 0.8]],
        ...                    [[(9, 10), (5, 10)], [(6, 10), (8, 10)]], [0.1, 0.2],
        ...                    [(2, 20), (4, 20)], attack="LAVAN", samples=10)
        >>> print(m.to_markdown())
        | LAVAN ASR (%): source \\ target | 32-bit | 4-bit |
        |---|---|---|
        | 32-bit | 90.0 | 50.0 |
        | 4-bit | 60.0 | 80.0 |
        | noise floor | 10.0 | 20.0 |
        >>> m.diagonal()
        [0.9, 0.8]
    """

    source_bits: list[int]
    target_bits: list[int]
    asr: list[list[float]]
    counts: list[list[tuple[int, int]]]
    noise_floor: list[float]
    noise_counts: list[tuple[int, int]]
    attack: str = "attack"
    targeted: bool = False
    target: int | None = None
    samples: int = 0

    def asr_at(self, source: int, target: int) -> float:
        """ASR of patches crafted at ``source`` bits, evaluated at ``target`` bits.

        Args:
            source: a bit-width in ``source_bits``.
            target: a bit-width in ``target_bits``.

        Returns:
            the ASR in [0, 1] (``nan`` when no sample was eligible).
        """
        try:
            return self.asr[self.source_bits.index(source)][self.target_bits.index(target)]
        except ValueError:
            raise InputError(
                f"no cell ({source}, {target}): sources {self.source_bits}, "
                f"targets {self.target_bits}"
            ) from None

    def diagonal(self) -> list[float]:
        """Direct (white-box) ASR: source == target, for every source also among the targets.

        Returns:
            one ASR per such bit-width, in the order of ``source_bits``.
        """
        return [self.asr_at(s, s) for s in self.source_bits if s in self.target_bits]

    def per_target(self, reduce: str = "pooled") -> list[float]:
        """One ASR per target bit-width, reduced over the source rows.

        Args:
            reduce: ``"pooled"`` (successes and eligible samples summed over sources:
                the ASR of a patch from a random source bit-width), ``"mean"`` (mean of
                the rows, ``nan`` cells skipped), ``"max"`` (worst-case source) or
                ``"diagonal"`` (the source equal to the target; ``nan`` if absent).

        Returns:
            one value per entry of ``target_bits``.
        """
        if reduce not in _REDUCTIONS:
            raise InputError(f"reduce must be one of {_REDUCTIONS}, got {reduce!r}")
        out = []
        for j, t in enumerate(self.target_bits):
            column = [row[j] for row in self.asr]
            finite = [v for v in column if not math.isnan(v)]
            if reduce == "pooled":
                s = sum(row[j][0] for row in self.counts)
                e = sum(row[j][1] for row in self.counts)
                out.append(_rate(s, e))
            elif reduce == "mean":
                out.append(sum(finite) / len(finite) if finite else float("nan"))
            elif reduce == "max":
                out.append(max(finite) if finite else float("nan"))
            else:
                out.append(self.asr_at(t, t) if t in self.source_bits else float("nan"))
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (``nan`` becomes ``None``); :meth:`from_dict` inverts it.

        Returns:
            plain ``dict`` of lists, ints, floats, strings, booleans and ``None``.
        """
        return {
            "attack": self.attack,
            "targeted": bool(self.targeted),
            "target": self.target,
            "samples": int(self.samples),
            "source_bits": [int(b) for b in self.source_bits],
            "target_bits": [int(b) for b in self.target_bits],
            "asr": [[_json_float(v) for v in row] for row in self.asr],
            "counts": [[[int(s), int(e)] for s, e in row] for row in self.counts],
            "noise_floor": [_json_float(v) for v in self.noise_floor],
            "noise_counts": [[int(s), int(e)] for s, e in self.noise_counts],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TransferMatrix:
        """Rebuild a matrix from :meth:`to_dict` output (e.g. read back from JSON).

        Args:
            d: the dict.

        Returns:
            the :class:`TransferMatrix`.
        """
        return cls(
            source_bits=list(d["source_bits"]),
            target_bits=list(d["target_bits"]),
            asr=[[_from_json_float(v) for v in row] for row in d["asr"]],
            counts=[[(int(s), int(e)) for s, e in row] for row in d["counts"]],
            noise_floor=[_from_json_float(v) for v in d["noise_floor"]],
            noise_counts=[(int(s), int(e)) for s, e in d["noise_counts"]],
            attack=d.get("attack", "attack"),
            targeted=bool(d.get("targeted", False)),
            target=d.get("target"),
            samples=int(d.get("samples", 0)),
        )

    def to_markdown(self, digits: int = 1) -> str:
        """A markdown table: one column per target bit-width, one row per source bit-width.

        Values are ASR in percent with ``digits`` decimals (``n/a`` without eligible
        samples); the last row is the noise floor.

        Args:
            digits: decimals.

        Returns:
            the table, ``len(source_bits) + 3`` lines.
        """
        kind = "targeted " if self.targeted else ""
        head = [f"{self.attack} {kind}ASR (%): source \\ target"]
        head += [_bits_label(t) for t in self.target_bits]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for s, row in zip(self.source_bits, self.asr):
            cells = [_bits_label(s)] + [_fmt_pct(v, digits) for v in row]
            lines.append("| " + " | ".join(cells) + " |")
        cells = ["noise floor"] + [_fmt_pct(v, digits) for v in self.noise_floor]
        lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def heatmap(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write the matrix (and the noise-floor row below a line) as a PNG heatmap.

        Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).

        Args:
            path: output file; ``.png`` is written whatever the suffix.
            title: figure title (default: the attack name).

        Returns:
            the path written.

        Raises:
            ImportError: matplotlib is not installed (``pip install matplotlib``).
        """
        fig = _figure((1.2 + 0.9 * len(self.target_bits), 1.2 + 0.6 * (len(self.source_bits) + 1)))
        ax = fig.add_subplot(1, 1, 1)
        values = [[100 * v for v in row] for row in self.asr] + [
            [100 * v for v in self.noise_floor]
        ]
        image = ax.imshow(values, vmin=0, vmax=100, cmap="magma", aspect="auto")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                text = "n/a" if math.isnan(v) else f"{v:.1f}"
                color = "gray" if math.isnan(v) else ("black" if v > 60 else "white")
                ax.text(j, i, text, ha="center", va="center", color=color, fontsize=8)
        ax.axhline(len(self.source_bits) - 0.5, color="white", linewidth=2)
        ax.set_xticks(range(len(self.target_bits)))
        ax.set_xticklabels([_bits_label(t) for t in self.target_bits])
        ax.set_yticks(range(len(values)))
        ax.set_yticklabels([_bits_label(s) for s in self.source_bits] + ["noise"])
        ax.set_xlabel("target (evaluated at)")
        ax.set_ylabel("source (crafted at)")
        kind = "targeted " if self.targeted else ""
        ax.set_title(title if title is not None else f"{self.attack} {kind}ASR (%)")
        fig.colorbar(image, ax=ax)
        return _save(fig, path)


def _figure(size: tuple[float, float]):
    """A matplotlib Figure on an Agg canvas, imported lazily."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError(f"heatmap() needs matplotlib: {_MPL_HINT}") from e
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    fig.savefig(path, format="png", dpi=120)
    return path


def _attack_name(attack: object) -> str:
    name = getattr(attack, "name", None)
    return name if isinstance(name, str) and name else type(attack).__name__


def transfer_matrix(
    wrapper: TriQDefWrapper | nn.Module | Mapping[int, nn.Module],
    make_attack: Callable[[Any, int], Any],
    loader: Iterable,
    source_bits: Sequence[int] | None = None,
    target_bits: Sequence[int] | None = None,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
    max_batches: int | None = None,
    progress: bool = False,
    *,
    device: torch.device | str | None = None,
    seed: int | None = None,
) -> TransferMatrix:
    """Cross-bit transfer of a patch attack: craft at each source, evaluate at each target.

    For every batch and every source bit-width ``s``, the attack built by
    ``make_attack(wrapper, s)`` (once per source, before the first batch) crafts patched
    images ``x_adv = attack(x, y)``; those same images are then classified at every
    target bit-width ``t``, and counted with the ASR definitions of the module: untargeted
    ASR = among samples correctly classified when clean (at the target bit-width), the
    share misclassified when patched; targeted ASR = among samples whose label is not the
    target, the share predicted as the target. The diagonal is therefore exactly the
    direct attack's ASR at that bit-width.

    Noise floor: for each source, ``apply_patch(x, U, attack.locations)`` with ``U``
    uniform noise shaped like ``attack.patch`` (same size, same locations) is evaluated
    at every target with the same definition; counts are pooled over the sources.

    The attack protocol: ``attack(x, y)`` returns patched images like ``x``; afterwards
    ``attack.patch`` holds the patch(es) ``(C, h, w)`` or ``(B, C, h, w)`` and
    ``attack.locations`` their ``(B, 2)`` top-left corners (``None``: random locations
    for the noise patch); ``attack.targeted`` and ``attack.target`` say whether and where
    it aims. The attack is called with gradients enabled, the model in eval mode and the
    wrapper set to ``s``; the model is put back in eval mode after each call.

    Args:
        wrapper: a :class:`~triqdef.TriQDefWrapper` (a plain ``nn.Module`` gives a 1 x 1
            matrix at 32 bits), or a mapping ``{bits: model}`` of separately trained
            models, one per bit-width (e.g. per-bit QAT): then the attack of source ``s``
            runs on ``models[s]`` and target ``t`` is evaluated on ``models[t]``, so every
            off-diagonal cell is a transfer between two models.
        make_attack: factory ``make_attack(model, bits) -> attack`` (``model`` is the
            wrapper, or ``models[bits]`` for a mapping), e.g.
            ``lambda m, b: LAVAN(m, patch_size=6, bits=b, steps=40)``.
        loader: iterable of ``(x, y)`` batches, images in [0, 1]; read once.
        source_bits: bit-widths to craft at (default: all of the wrapper's).
        target_bits: bit-widths to evaluate at (default: all of the wrapper's).
        mean: per-channel mean subtracted before the model (the attack gets raw images and
            its own ``mean``/``std``).
        std: per-channel standard deviation divided out before the model.
        max_batches: stop after this many batches.
        progress: show a tqdm progress bar over batches.
        device: where to run: the model's device (the default), named as a
            ``torch.device``, a string or a CUDA index; the model is not moved.
        seed: seed of the noise-floor patches (default: the global RNG).

    Returns:
        the :class:`TransferMatrix`.

    Raises:
        InputError: empty loader, malformed batch (images of another dtype than the
            model's parameters, labels outside its classes) or attack output, a target
            class outside the model's outputs, attacks that disagree on being targeted,
            a ``device`` this machine does not have or that is not the model's.
        ConfigError: a bit-width the wrapper does not have.

    Shape:
        - x: :math:`(B, C, H, W)` in [0, 1], y: :math:`(B,)` per batch
    """
    fn = "transfer_matrix"
    if not callable(make_attack):
        raise InputError(
            f"{fn}: make_attack must be a callable (model, bits) -> attack, got {make_attack!r}"
        )
    ev: _Evaluated | _PerBitEvaluated
    if isinstance(wrapper, Mapping):
        ev = _PerBitEvaluated(fn, wrapper, mean, std, device)
    else:
        ev = _Evaluated(fn, wrapper, mean, std, device)
    sources = ev.check_bits(source_bits, "source_bits")
    targets = ev.check_bits(target_bits, "target_bits")
    max_batches = _check_max_batches(max_batches)
    gen = None
    if seed is not None:
        gen = torch.Generator(device=ev.device)
        gen.manual_seed(int(seed))

    n_s, n_t = len(sources), len(targets)
    zeros = functools.partial(torch.zeros, dtype=torch.long, device=ev.device)
    succ, elig = zeros(n_s, n_t), zeros(n_s, n_t)
    noise_succ, noise_elig = zeros(n_t), zeros(n_t)
    samples = 0
    batches = contextlib.closing(_batches(loader, ev.device, max_batches, progress, fn, ev.dtype))
    with ev.session(), batches as stream:
        attacks = {s: make_attack(ev.source_model(s), s) for s in sources}
        ev.module.eval()
        for s, attack in attacks.items():
            if not callable(attack):
                raise InputError(
                    f"{fn}: make_attack(model, {s}) returned {attack!r}, which is not callable"
                )
        flags = {bool(getattr(a, "targeted", False)) for a in attacks.values()}
        if len(flags) > 1:
            raise InputError(f"{fn}: the attacks disagree on being targeted")
        targeted = flags.pop()
        first = attacks[sources[0]]
        target = getattr(first, "target", None) if targeted else None
        if targeted and target is None:
            raise InputError(f"{fn}: a targeted attack must set attack.target")

        for x, y in stream:
            with torch.no_grad():
                clean = {t: ev.logits(x, t) for t in targets}
            k = clean[targets[0]].shape[1]
            _check_labels(fn, y, k)
            tgt = _target_tensor(fn, target, y, k) if targeted else None
            for i, s in enumerate(sources):
                attack = attacks[s]
                x_adv = ev.call_source(attack, x, y, s, f"the {s}-bit attack")
                patch, locations = (
                    getattr(attack, "patch", None),
                    getattr(attack, "locations", None),
                )
                if not isinstance(patch, Tensor):
                    raise InputError(
                        f"{fn}: after attack(x, y), attack.patch must hold the crafted patch "
                        f"(a tensor), got {type(patch).__name__}"
                    )
                if gen is not None:
                    noise = torch.rand(patch.shape, generator=gen, device=ev.device)
                else:
                    noise = torch.rand(patch.shape, device=ev.device)
                if isinstance(locations, Tensor):
                    locations = locations.to(ev.device)
                x_noise = apply_patch(x, noise.to(x.dtype), locations, generator=gen)
                with torch.no_grad():
                    for j, t in enumerate(targets):
                        ref = clean[t] if tgt is None else None
                        s_, e_ = _counts(ref, ev.logits(x_adv, t), y, tgt)
                        succ[i, j] += s_
                        elig[i, j] += e_
                        s_, e_ = _counts(ref, ev.logits(x_noise, t), y, tgt)
                        noise_succ[j] += s_
                        noise_elig[j] += e_
            samples += y.shape[0]

    succ_l, elig_l = succ.tolist(), elig.tolist()
    ns_l, ne_l = noise_succ.tolist(), noise_elig.tolist()
    single_target = None
    if targeted and isinstance(target, numbers.Integral) and not isinstance(target, bool):
        single_target = int(target)
    elif targeted and isinstance(target, Tensor) and target.numel() == 1:
        single_target = int(target)
    return TransferMatrix(
        source_bits=list(sources),
        target_bits=list(targets),
        asr=[[_rate(s, e) for s, e in zip(rs, re)] for rs, re in zip(succ_l, elig_l)],
        counts=[[(s, e) for s, e in zip(rs, re)] for rs, re in zip(succ_l, elig_l)],
        noise_floor=[_rate(s, e) for s, e in zip(ns_l, ne_l)],
        noise_counts=list(zip(ns_l, ne_l)),
        attack=_attack_name(first),
        targeted=targeted,
        target=single_target,
        samples=samples,
    )


def asr_by_condition(
    results: Mapping[str, TransferMatrix],
    seen: Callable[[str], bool] | Iterable[str] | None = None,
    reduce: str = "pooled",
    digits: int = 1,
) -> str:
    """One row per evaluation condition, one column per target bit-width (paper table 5).

    Each condition (e.g. ``"LAVAN 6x6"``, ``"LAVAN 8x8, 4-bit source (unseen)"``) is a
    :class:`TransferMatrix` reduced to one ASR per target bit-width with
    :meth:`TransferMatrix.per_target`. A condition is *unseen* when its patch size,
    location region or generation bit-width was not used to build the training pool;
    the caller decides which, with ``seen``. When ``seen`` is given, each row is labelled
    ``seen``/``unseen`` and three summary rows follow: the mean over seen conditions, the
    mean over unseen ones, and the gap ``unseen - seen`` in percentage points.

    Args:
        results: ``{condition name: matrix}``, in display order.
        seen: predicate ``name -> bool`` or a collection of the seen names.
        reduce: how a matrix becomes one row (see :meth:`TransferMatrix.per_target`).
        digits: decimals of the percentages.

    Returns:
        a markdown table; columns are the union of the target bit-widths (``n/a`` where a
        matrix lacks one).

    Example:
        >>> m = TransferMatrix([32], [32], [[0.5]], [[(1, 2)]], [0.0], [(0, 2)])
        >>> print(asr_by_condition({"6x6": m, "8x8": m}, seen={"6x6"}))
        | condition | setting | 32-bit |
        |---|---|---|
        | 6x6 | seen | 50.0 |
        | 8x8 | unseen | 50.0 |
        | mean (seen) | seen | 50.0 |
        | mean (unseen) | unseen | 50.0 |
        | gap (unseen - seen, pp) |  | 0.0 |
    """
    if not results:
        raise InputError("asr_by_condition: results is empty")
    for name, m in results.items():
        if not isinstance(m, TransferMatrix):
            raise InputError(
                f"asr_by_condition: {name!r} maps to {type(m).__name__}, not a TransferMatrix"
            )
    is_seen: Callable[[str], bool] | None
    if seen is None or callable(seen):
        is_seen = seen
    else:
        names = set(seen)
        is_seen = names.__contains__
    columns = sorted({t for m in results.values() for t in m.target_bits}, reverse=True)
    rows: dict[str, list[float]] = {}
    for name, m in results.items():
        values = dict(zip(m.target_bits, m.per_target(reduce)))
        rows[name] = [values.get(t, float("nan")) for t in columns]

    head = ["condition"] + (["setting"] if is_seen else []) + [_bits_label(t) for t in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def line(name: str, setting: str | None, values: list[float], pct: bool = True) -> None:
        cells = [name] + ([setting or ""] if is_seen else [])
        cells += [_fmt_pct(v, digits) if pct else _fmt(v, digits) for v in values]
        lines.append("| " + " | ".join(cells) + " |")

    def mean(group: list[list[float]]) -> list[float]:
        out = []
        for j in range(len(columns)):
            vals = [r[j] for r in group if not math.isnan(r[j])]
            out.append(sum(vals) / len(vals) if vals else float("nan"))
        return out

    for name, values in rows.items():
        line(name, None if is_seen is None else ("seen" if is_seen(name) else "unseen"), values)
    if is_seen is not None:
        s = mean([v for n, v in rows.items() if is_seen(n)])
        u = mean([v for n, v in rows.items() if not is_seen(n)])
        line("mean (seen)", "seen", s)
        line("mean (unseen)", "unseen", u)
        line("gap (unseen - seen, pp)", None, [100 * (b - a) for a, b in zip(s, u)], pct=False)
    return "\n".join(lines)


# ------------------------------------------------------------------------- alignment


@dataclass
class AlignmentReport:
    """Similarity of input gradients and feature maps between bit-widths (tables 3, 12).

    ``values[map][metric][k]`` is the mean over samples of ``metric`` between the two
    bit-widths of ``pairs[k]``, for ``map`` = ``"input_grad"`` (the input gradient of the
    cross-entropy) or a layer name (that layer's output). Ranges: ``cosine`` in [-1, 1];
    ``edge_iou``, ``hog_cosine``, ``soft_dice`` and ``soft_hog`` in [0, 1]; the two HOG
    metrics are ``nan`` (``None`` in JSON, ``n/a`` in tables) for maps one pixel high or
    wide. See :func:`alignment_report` for the definitions.

    Attributes:
        pairs: the compared bit-width pairs.
        maps: ``"input_grad"`` followed by the layer names.
        metrics: metric keys (:data:`METRICS`).
        values: ``{map: {metric: [value per pair]}}``.
        samples: number of images averaged over.
        patched: whether the inputs were patched.

    Example:
        >>> r = AlignmentReport([(32, 4)], ["input_grad"], ["cosine"],
        ...                     {"input_grad": {"cosine": [0.05]}}, samples=8)
        >>> r.value("input_grad", "cosine", (4, 32))
        0.05
        >>> print(r.to_markdown())
        | map | metric | 32<->4 |
        |---|---|---|
        | input_grad | Cosine | 0.050 |
    """

    pairs: list[tuple[int, int]]
    maps: list[str]
    metrics: list[str]
    values: dict[str, dict[str, list[float]]]
    samples: int = 0
    patched: bool = False
    labels: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.pairs = [(int(a), int(b)) for a, b in self.pairs]
        self.labels = [_pair_label(p) for p in self.pairs]

    def value(self, map: str, metric: str, pair: tuple[int, int]) -> float:
        """One value; ``pair`` may be given in either order (every metric is symmetric).

        Args:
            map: ``"input_grad"`` or a layer name.
            metric: a key of :data:`METRICS`.
            pair: two bit-widths.

        Returns:
            the sample mean.
        """
        a, b = pair
        for k, p in enumerate(self.pairs):
            if p in ((a, b), (b, a)):
                return self.values[map][metric][k]
        raise InputError(f"pair {pair} is not in this report's pairs {self.pairs}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_dict` inverts it.

        Returns:
            plain ``dict`` with ``pairs`` as ``[a, b]`` lists and ``labels`` like ``"32<->4"``.
        """
        return {
            "pairs": [[a, b] for a, b in self.pairs],
            "labels": list(self.labels),
            "maps": list(self.maps),
            "metrics": list(self.metrics),
            "values": {
                m: {k: [_json_float(v) for v in vs] for k, vs in per.items()}
                for m, per in self.values.items()
            },
            "samples": int(self.samples),
            "patched": bool(self.patched),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AlignmentReport:
        """Rebuild a report from :meth:`to_dict` output.

        Args:
            d: the dict.

        Returns:
            the :class:`AlignmentReport`.
        """
        return cls(
            pairs=[tuple(p) for p in d["pairs"]],
            maps=list(d["maps"]),
            metrics=list(d["metrics"]),
            values={
                m: {k: [_from_json_float(v) for v in vs] for k, vs in per.items()}
                for m, per in d["values"].items()
            },
            samples=int(d.get("samples", 0)),
            patched=bool(d.get("patched", False)),
        )

    def to_markdown(self, digits: int = 3) -> str:
        """A markdown table: one row per (map, metric), one column per pair like ``32<->4``.

        Args:
            digits: decimals.

        Returns:
            the table, ``len(maps) * len(metrics) + 2`` lines.
        """
        head = ["map", "metric"] + self.labels
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for m in self.maps:
            for k in self.metrics:
                cells = [m, _METRIC_LABELS.get(k, k)]
                cells += [_fmt(v, digits) for v in self.values[m][k]]
                lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def heatmap(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """Write one heatmap per map (rows = metrics, columns = pairs) to a PNG.

        Args:
            path: output file (PNG).
            title: figure title.

        Returns:
            the path written.

        Raises:
            ImportError: matplotlib is not installed (``pip install matplotlib``).
        """
        n = len(self.maps)
        width = 2.5 + 0.9 * len(self.pairs)
        fig = _figure((width, 0.6 + n * (0.5 + 0.4 * len(self.metrics))))
        for r, m in enumerate(self.maps):
            ax = fig.add_subplot(n, 1, r + 1)
            grid = [self.values[m][k] for k in self.metrics]
            image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    color = "gray" if math.isnan(v) else ("black" if v > 0.6 else "white")
                    ax.text(j, i, _fmt(v, 2), ha="center", va="center", color=color, fontsize=7)
            ax.set_xticks(range(len(self.pairs)))
            ax.set_xticklabels(self.labels if r == n - 1 else [""] * len(self.pairs))
            ax.set_yticks(range(len(self.metrics)))
            ax.set_yticklabels([_METRIC_LABELS.get(k, k) for k in self.metrics], fontsize=7)
            ax.set_title("input gradient" if m == INPUT_GRAD else f"layer {m}", fontsize=8)
            fig.colorbar(image, ax=ax)
        if title is not None:
            fig.suptitle(title)
        return _save(fig, path)


class _Capture:
    """Forward hooks that keep (detached) outputs of named layers for one forward."""

    def __init__(self) -> None:
        self.outputs: dict[str, Tensor] = {}

    def hook(self, name: str, module: nn.Module, args: tuple, output: object) -> None:
        if name in self.outputs:  # a module called twice: keep its first output
            return
        if isinstance(output, (tuple, list)):
            output = next((o for o in output if isinstance(o, Tensor)), None)
        if not isinstance(output, Tensor) or not output.is_floating_point():
            raise InputError(
                f"alignment_report: layer {name!r} returned no floating tensor "
                f"({type(output).__name__}); pick layers whose output is a feature map"
            )
        self.outputs[name] = output.detach()


def _channel_mean_rms(t: Tensor, eps: float) -> Tensor:
    """``(B, 1, H, W)`` channel mean divided by its per-sample RMS (as :func:`describe`)."""
    m = _as_map(t).float().mean(dim=1, keepdim=True)
    return m / m.square().mean(dim=(1, 2, 3), keepdim=True).add(eps * eps).sqrt()


def _hard_hog(m: Tensor, cfg: DescriptorConfig) -> Tensor:
    """scikit-image HOG, or triqdef's small-map HOG for maps smaller than one block."""
    if min(m.shape[-2:]) >= cfg.cell * cfg.block:
        return hog(m, cfg.cell, cfg.block, cfg.orientations, skimage_compatible=True)
    return hog(m, cfg.cell, cfg.block, cfg.orientations, skimage_compatible=False)


def _hard_hog_cosine(ha: Tensor, hb: Tensor) -> Tensor:
    """Cosine of hard HOG descriptors; two all-zero descriptors (flat maps) count as 1."""
    cos = descriptor_cosine(ha, hb)
    both_flat = (ha.abs().sum(dim=1) == 0) & (hb.abs().sum(dim=1) == 0)
    return torch.where(both_flat, torch.ones_like(cos), cos)


class _MapStats:
    """Per-bit descriptors of one map, computed once and compared pairwise."""

    def __init__(self, raw: Tensor, cfg: DescriptorConfig) -> None:
        self.raw = _as_map(raw).float()
        self.norm = _channel_mean_rms(raw, cfg.eps)
        self.soft = describe(raw, cfg)
        self.hog = _hard_hog(self.norm, cfg)
        self.q = cfg.q
        # a map one pixel high or wide has gradients along one axis only: every pixel votes
        # for the same orientation bin, so any two such maps have HOG cosine 1. Undefined.
        self.has_texture = min(self.norm.shape[-2:]) > 1

    def compare(self, other: _MapStats) -> dict[str, Tensor]:
        ea, eb = self.soft.edges, other.soft.edges
        out = {
            "cosine": gradient_cosine(self.raw, other.raw),
            "edge_iou": edge_iou(self.norm, other.norm, q=self.q),
            "hog_cosine": _hard_hog_cosine(self.hog, other.hog),
            "soft_dice": soft_dice(ea.view(ea.shape[0], 1, 1, -1), eb.view(eb.shape[0], 1, 1, -1)),
            "soft_hog": descriptor_cosine(self.soft.hog, other.soft.hog),
        }
        if not (self.has_texture and other.has_texture):
            for k in ("hog_cosine", "soft_hog"):
                out[k] = torch.full_like(out[k], float("nan"))
        return out


def _patched(ev: _Evaluated, patch: object, x: Tensor, y: Tensor, gen) -> Tensor:
    fn = ev.fn
    if isinstance(patch, Tensor):
        if patch.ndim not in (3, 4) or not patch.is_floating_point() or patch.numel() == 0:
            raise InputError(
                f"{fn}: patch must be a floating (C, h, w) or (N, C, h, w) tensor, got "
                f"{patch.dtype} {tuple(patch.shape)}"
            )
        p = patch.detach().to(x.device, x.dtype)
        if p.ndim == 4 and p.shape[0] not in (1, x.shape[0]):
            pick = torch.randint(0, p.shape[0], (x.shape[0],), generator=gen, device=gen.device)
            p = p[pick.to(x.device)]
        return apply_patch(x, p, generator=gen)
    if callable(patch):
        return ev.call_source(patch, x, y, None, "patch(x, y)")
    raise InputError(
        f"{fn}: patch must be None, a (C, h, w) tensor or a callable patch(x, y) -> x_adv, "
        f"got {type(patch).__name__}"
    )


def alignment_report(
    wrapper: TriQDefWrapper | nn.Module,
    loader: Iterable,
    bits: Sequence[int] | None = None,
    patch: Tensor | Callable[[Tensor, Tensor], Tensor] | None = None,
    layers: Sequence[str] | None = None,
    max_batches: int | None = 1,
    mean: Sequence[float] | Tensor | None = None,
    std: Sequence[float] | Tensor | None = None,
    *,
    pairs: Sequence[tuple[int, int]] | None = None,
    device: torch.device | str | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> AlignmentReport:
    """How alike input gradients and feature maps are across bit-widths (tables 3 and 12).

    For each batch and each bit-width, one eval-mode forward gives the input gradient
    ``d CE(f_b(x), y) / d x`` (summed over the batch, taken with respect to the images in
    [0, 1], before ``mean``/``std``) and the outputs of ``layers``. For every pair of
    bit-widths and every map, five per-sample similarities are averaged over samples:

    * ``cosine``: :func:`~triqdef.functional.gradient_cosine` of the raw maps, in [-1, 1]
      (the paper's "Cosine Sim.");
    * ``edge_iou``: hard Edge IoU, :func:`~triqdef.functional.edge_iou` (85th-percentile
      threshold), in [0, 1];
    * ``hog_cosine``: cosine of hard HOG descriptors, in [0, 1]:
      scikit-image's HOG (``hog(..., skimage_compatible=True)``, cell 4, block 2, 9 bins,
      L2-Hys) when the map is at least ``cell * block`` = 8 pixels high and wide.
      scikit-image refuses smaller maps, so those fall back to triqdef's own
      :func:`~triqdef.functional.hog` rule: cells shrink to ``min(H, W) // 2`` pixels, and
      a map smaller than one block (``min(H, W) < 2``) is one cell; its gradients use
      replicated borders, so even 2 x 2 maps have a texture. Two maps with no gradient at
      all (all-zero descriptors) count as 1, like :func:`edge_iou` counts two empty edge
      sets as 1. A map one pixel high or wide (e.g. a ``(B, D)`` vector) has gradients
      along one axis only, so every pixel votes for the same bin and the cosine would be
      1 whatever the maps: both HOG metrics are ``nan`` there;
    * ``soft_dice``: SoftDice of the soft edges ``soft_binarize(sobel_edges(.))``
      (q 0.85, k 100), in [0, 1];
    * ``soft_hog``: cosine of ``soft_hog`` descriptors, in [0, 1].

    Hard HOG, Edge IoU and both soft metrics look at the same map: the channel mean,
    divided by its per-sample root-mean-square, i.e. what FDP and GPDP see
    (:func:`~triqdef.losses.describe` with the wrapper's ``descriptor`` settings), so
    input gradients of order 1e-4 and feature maps of order 1 are on one scale.
    ``(B, N, D)`` and ``(B, D)`` outputs are viewed as one-channel maps. Identical maps
    give 1 everywhere except SoftDice, which is ``sum(s^2) / sum(s)`` < 1 for soft edges
    ``s`` that are not exactly 0 or 1 (about 0.9 in practice).

    Inputs are patched when ``patch`` is given: a ``(C, h, w)`` patch (or a bank
    ``(N, C, h, w)``, one drawn per image) pasted at uniformly random locations, or a
    callable ``patch(x, y) -> x_adv`` such as an attack (called with gradients on).
    Otherwise clean inputs are used. Weights, observers and BatchNorm statistics are not
    changed; modes and the active bit-width are restored.

    Args:
        wrapper: a :class:`~triqdef.TriQDefWrapper` (or a plain ``nn.Module`` at 32 bits,
            which needs explicit ``pairs=[(32, 32)]``).
        loader: iterable of ``(x, y)`` batches, images in [0, 1].
        bits: bit-widths whose unordered pairs are compared (default: all of the
            wrapper's, high to low).
        patch: ``None``, a patch tensor or a callable, see above.
        layers: layer names (``model.named_modules()``) whose outputs are compared
            (default: the wrapper's tapped ``layers``).
        max_batches: number of batches averaged over (default 1; ``None``: all).
        mean: per-channel mean subtracted before the model.
        std: per-channel standard deviation divided out before the model.
        pairs: explicit pairs instead of all pairs of ``bits``; may repeat a bit-width,
            e.g. ``(4, 4)`` as a self-similarity baseline.
        device: where to run: the model's device (the default), named as a
            ``torch.device``, a string or a CUDA index; the model is not moved.
        seed: seed of the random patch locations.
        progress: show a tqdm progress bar over batches.

    Returns:
        the :class:`AlignmentReport`.

    Raises:
        InputError: empty loader, malformed batch (including one on the meta device,
            images of another dtype than the model's parameters, labels outside its
            classes), fewer than one pair, ``bits`` and ``pairs`` both given, bad patch,
            a ``device`` this machine does not have or that is not the model's.
        ConfigError: a bit-width the wrapper does not have.
        LayerNotFoundError: a layer name that is not in the model.

    Shape:
        - x: :math:`(B, C, H, W)` in [0, 1], y: :math:`(B,)` per batch
        - patch: :math:`(C, h, w)` or :math:`(N, C, h, w)`
    """
    fn = "alignment_report"
    ev = _Evaluated(fn, wrapper, mean, std, device)
    if pairs is not None:
        if bits is not None:
            raise InputError(f"{fn}: give bits or pairs, not both")
        try:
            raw_pairs = [tuple(p) for p in pairs]
        except TypeError:
            raise InputError(f"{fn}: pairs must be (bits, bits) tuples, got {pairs!r}") from None
        if any(len(p) != 2 for p in raw_pairs):
            raise InputError(f"{fn}: pairs must be (bits, bits) tuples, got {pairs!r}")
        pair_list = [(ev.check_bit(a), ev.check_bit(b)) for a, b in raw_pairs]
    else:
        chosen = ev.check_bits(bits, "bits")
        pair_list = [
            (chosen[i], chosen[j]) for i in range(len(chosen)) for j in range(i + 1, len(chosen))
        ]
    if not pair_list:
        raise InputError(
            f"{fn}: nothing to compare: give at least two bit-widths, or pairs=[(b, b)]"
        )
    if layers is None:
        names = tuple(ev.wrapper.layers) if ev.wrapper is not None else ()
    else:
        names = _check_names(ev.net, layers, "layers")
    max_batches = _check_max_batches(max_batches)
    needed = list(dict.fromkeys(b for p in pair_list for b in p))
    maps = [INPUT_GRAD, *names]
    gen = torch.Generator(device=ev.device)
    if seed is not None:
        gen.manual_seed(int(seed))
    else:
        gen.seed()

    sums = {m: {k: torch.zeros(len(pair_list), device=ev.device) for k in METRICS} for m in maps}
    samples = 0
    capture = _Capture()
    modules = dict(ev.net.named_modules())
    handles = []
    batches = contextlib.closing(_batches(loader, ev.device, max_batches, progress, fn, ev.dtype))
    with ev.session(), batches as stream:
        try:
            for name in names:
                hook = functools.partial(capture.hook, name)
                handles.append(modules[name].register_forward_hook(hook))
            for x, y in stream:
                if patch is not None:
                    x = _patched(ev, patch, x, y, gen)
                stats: dict[int, dict[str, _MapStats]] = {}
                for b in needed:
                    capture.outputs = {}
                    x_in = x.detach().requires_grad_(True)
                    with torch.enable_grad():
                        logits = ev.logits(x_in, b)
                        if b == needed[0]:
                            _check_labels(fn, y, logits.shape[1])
                        loss = F.cross_entropy(logits.float(), y, reduction="sum")
                        (grad,) = torch.autograd.grad(loss, x_in)
                    del logits, loss
                    raw = {INPUT_GRAD: grad, **capture.outputs}
                    missing = [n for n in names if n not in raw]
                    if missing:
                        raise InputError(f"{fn}: layers {missing} did not run in the forward pass")
                    with torch.no_grad():
                        stats[b] = {m: _MapStats(raw[m], ev.descriptor) for m in maps}
                    capture.outputs = {}
                with torch.no_grad():
                    for k, (a, b) in enumerate(pair_list):
                        for m in maps:
                            for metric, v in stats[a][m].compare(stats[b][m]).items():
                                sums[m][metric][k] += v.float().sum()
                samples += y.shape[0]
        finally:
            for h in handles:
                h.remove()
            capture.outputs = {}
    values = {m: {k: (sums[m][k] / samples).tolist() for k in METRICS} for m in maps}
    return AlignmentReport(
        pairs=pair_list,
        maps=maps,
        metrics=list(METRICS),
        values=values,
        samples=samples,
        patched=patch is not None,
    )
