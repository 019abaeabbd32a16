"""The model under evaluation: bit-widths, eval mode, normalisation, device, validated batches."""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sized
from typing import cast

import torch
from torch import Tensor, nn

from .._checks import (
    check_bits_sequence,
    check_channel_stats,
    check_dtype,
    check_eval_device,
    is_label_dtype,
    label_dtype_error,
    model_dtype,
    progress_bar,
)
from ..attacks.base import _frozen_model
from ..errors import ConfigError, InputError
from ..losses import DescriptorConfig
from ..wrapper import TriQDefWrapper


class _Normalize:
    """``(x - mean) / std`` per channel; the identity when both are ``None``."""

    def __init__(self, mean: object, std: object) -> None:
        self.mean = check_channel_stats("mean", mean, error=InputError)
        self.std = check_channel_stats("std", std, positive=True, error=InputError)

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


def _bar_total(iterable: Iterable, max_batches: int | None) -> int | None:
    """How many batches a progress bar over ``iterable`` will show (``None``: unknown)."""
    try:
        total = len(cast(Sized, iterable))  # an unsized iterable: TypeError
    except TypeError:
        total = None
    if max_batches is not None:
        total = max_batches if total is None else min(total, max_batches)
    return total


def _batches(
    loader: Iterable,
    device: torch.device,
    max_batches: int | None,
    progress: bool,
    desc: str,
    dtype: torch.dtype | None = None,
) -> Generator[tuple[Tensor, Tensor], None, None]:
    """Validated ``(x, y)`` batches on ``device``, labels as int64; raises if the loader
    yields none. Images must have the model's parameter ``dtype`` (see
    ``triqdef._checks.check_dtype``); labels any integer dtype."""
    if not isinstance(loader, Iterable):
        raise InputError(
            f"{desc}: loader must be an iterable of (x, y) batches, got {type(loader).__name__}"
        )
    n = 0
    bar = progress_bar(loader, progress, _bar_total(loader, max_batches), desc)
    try:
        for batch in bar:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                got = type(batch).__name__
                raise InputError(f"{desc}: each batch must be an (x, y) pair, got {got}")
            x, y = batch[0], batch[1]
            if not isinstance(x, Tensor) or x.ndim != 4 or not x.is_floating_point():
                got_x = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x)
                raise InputError(f"{desc}: x must be a floating (B, C, H, W) tensor, got {got_x}")
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
        self.device = check_eval_device(fn, device, model)
        self.dtype = model_dtype(model)
        self.descriptor: DescriptorConfig = (
            self.wrapper.descriptor if self.wrapper is not None else DescriptorConfig()
        )

    def check_bits(self, bits: object, what: str) -> tuple[int, ...]:
        """``bits`` (None = all) as a tuple; unknown bit-widths raise like ``set_bits``."""
        return check_bits_sequence(self.fn, bits, what, self.bits, self.check_bit)

    def check_bit(self, b: object) -> int:
        """One bit-width the model runs at; ConfigError (as ``set_bits`` raises) otherwise."""
        if self.wrapper is not None:
            if isinstance(b, bool) or b not in self.wrapper.bits:
                raise ConfigError(
                    f"bit-width {b!r} is not one of this wrapper's bits {self.wrapper.bits}"
                )
        elif isinstance(b, bool) or b != 32:
            raise ConfigError(
                f"{self.fn}: a plain nn.Module runs at 32 bits only, got bit-width {b!r}; "
                "wrap it in a TriQDefWrapper to evaluate other bit-widths"
            )
        return int(b)

    def session(self) -> contextlib.AbstractContextManager:
        """Eval mode inside; every module's flag and the active bit-width restored after."""
        return _frozen_model(self.module, self.wrapper)

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
        return int(b)

    def check_bits(self, bits: object, what: str) -> tuple[int, ...]:
        return check_bits_sequence(self.fn, bits, what, self.bits, self.check_bit)

    def source_model(self, bits: int) -> nn.Module:
        return self.subs[bits].module

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for ev in self.subs.values():
                stack.enter_context(ev.session())
            yield

    def logits(self, x: Tensor, bits: int) -> Tensor:
        return self.subs[bits].logits(x, bits)

    def call_source(self, source: Callable, x: Tensor, y: Tensor, bits: int | None, what: str):
        ev = self.subs[bits] if bits is not None else next(iter(self.subs.values()))
        return ev.call_source(source, x, y, bits, what)
