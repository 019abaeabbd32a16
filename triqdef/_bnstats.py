"""Per-bit BatchNorm state: running statistics per bit-width, and clean-row updates."""

from __future__ import annotations

from typing import Protocol, cast

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError

__all__ = ["BatchNormStats", "BitState", "CleanRowsBatchNorm"]

_BatchNorm = nn.modules.batchnorm._BatchNorm


def _stat(module: nn.Module, name: str) -> torch.Tensor:
    """The statistic buffer ``name`` of a BatchNorm layer; the hooks here are attached to
    (and `BatchNormStats` built for) layers with ``track_running_stats`` only, whose
    statistics are tensors, never ``None``."""
    return cast(torch.Tensor, module._buffers[name])


class BitState(Protocol):
    """What the BatchNorm hooks read of the wrapper's `BitContext` (see `triqdef.quant`)."""

    qbits: tuple[int, ...]
    index: int | None
    observe: bool
    rows: tuple[int, int] | None


class BatchNormStats(nn.Module):
    """Per-bit running statistics of one BatchNorm layer.

    The BatchNorm module's own buffers keep serving 32 bits, so the bare model
    is untouched; for each lower bit-width this module holds a copy (row ``i``
    for bit-width number ``i``) that is swapped in for the duration of the
    layer's forward and updated in place by BatchNorm itself. The affine
    parameters stay shared.

    The rows follow the dtype of the layer's own statistics: after
    ``wrapper.model.double()`` (or ``.half()``), which casts the model but not the
    wrapper's buffers, the first forward below 32 bits casts the rows to the new
    dtype, as ``wrapper.double()`` would have.

    Args:
        ctx: the wrapper's `BitContext`.
        bn: the BatchNorm layer; its current statistics initialize every row.
    """

    _names = ("running_mean", "running_var", "num_batches_tracked")
    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(self, ctx: BitState, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        k = len(ctx.qbits)
        for name in self._names:
            value = _stat(bn, name).detach()
            self.register_buffer(name, value.unsqueeze(0).repeat(k, *([1] * value.ndim)))
        self._ctx = ctx
        self._stash: list[list[torch.Tensor]] = []

    def reset(self, index: int) -> None:
        """Reset the statistics of bit-width number ``index`` to BatchNorm's initial values."""
        with torch.no_grad():
            self.running_mean[index] = 0
            self.running_var[index] = 1
            self.num_batches_tracked[index] = 0

    def copy_row_to(self, module: nn.Module, index: int) -> None:
        """Copy the statistics of bit-width number ``index`` into ``module``'s own buffers."""
        with torch.no_grad():
            for name in self._names:
                _stat(module, name).copy_(getattr(self, name)[index])

    def pre_hook(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook: swap in the active bit-width's statistics."""
        index = self._ctx.index
        if index is None:
            return None
        dtype = _stat(module, "running_mean").dtype
        if self.running_mean.dtype != dtype:  # the model alone was cast: follow it
            with torch.no_grad():
                self.running_mean = self.running_mean.to(dtype)
                self.running_var = self.running_var.to(dtype)
        self._stash.append([_stat(module, n) for n in self._names])
        for name in self._names:
            module._buffers[name] = getattr(self, name)[index]
        return None

    def post_hook(self, module: nn.Module, args: tuple, output):
        """Forward hook (always called): put the 32-bit statistics back."""
        if self._stash:
            for name, value in zip(self._names, self._stash.pop()):
                module._buffers[name] = value
        return None


class CleanRowsBatchNorm:
    """Hooks that update BatchNorm running statistics from the clean rows only.

    While the objective runs a mixed batch ``[clean rows; patched rows]``
    (``BitContext.rows = (n_clean, n_total)``) and the layer is in training mode,
    the pre-hook turns BatchNorm's own running-statistics update off for that call
    (the layer still normalises with the whole batch's statistics) and the forward
    hook applies the update BatchNorm would have made from the first ``n_clean``
    rows alone: to whichever statistics are in the layer at that moment (the
    active bit-width's rows, or the model's own at 32 bits), with BatchNorm's
    momentum or, for ``momentum=None``, its cumulative average. Nothing moves while
    observers are frozen (``BitContext.observe=False``: a memory-bounded replay),
    nor when fewer than two clean values per channel exist. Outside the objective
    (``rows is None``) the hooks do nothing.

    Register the forward hook before any hook that swaps statistics back
    ([`BatchNormStats`][triqdef.quant.BatchNormStats]), so that the update lands in the active ones.

    Args:
        ctx: the wrapper's ``BitContext``.
    """

    def __init__(self, ctx: BitState) -> None:
        self._ctx = ctx
        self._held: dict[int, torch.Tensor] = {}

    def __getstate__(self) -> dict:
        return {"ctx": self._ctx}

    def __setstate__(self, state: dict) -> None:
        CleanRowsBatchNorm.__init__(self, state["ctx"])

    def pre_hook(self, name: str, module: _BatchNorm, args: tuple) -> None:
        """Forward pre-hook: hold the input and switch BatchNorm's own update off."""
        rows = self._ctx.rows
        if rows is None or not module.training or not module.track_running_stats:
            return None
        n_clean, n_total = rows
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.shape[0] != n_total:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(
                f"bn_rows='clean': BatchNorm layer {name!r} got an input of shape {got}, "
                f"but the batch has {n_total} rows; it needs inputs whose first dimension "
                "is the batch (use bn_rows='all' for this model)"
            )
        if n_clean >= n_total:  # nothing patched: BatchNorm's own update is the clean one
            return None
        module.track_running_stats = False
        self._held[id(module)] = x
        return None

    def post_hook(self, name: str, module: _BatchNorm, args: tuple, output) -> None:
        """Forward hook (always called): switch the update back on, apply the clean one."""
        x = self._held.pop(id(module), None)
        if x is None:
            return None
        module.track_running_stats = True
        rows = self._ctx.rows
        if output is None or rows is None or not self._ctx.observe:
            return None
        clean = x[: rows[0]].detach()
        if clean.numel() < 2 * clean.shape[1]:  # no variance from one value per channel
            return None
        with torch.no_grad():
            tracked = _stat(module, "num_batches_tracked")
            tracked.add_(1)
            if module.momentum is None:  # cumulative moving average, as BatchNorm does
                factor = 1.0 / float(tracked)
            else:
                factor = module.momentum
            stats = (_stat(module, "running_mean"), _stat(module, "running_var"))
            F.batch_norm(clean, *stats, training=True, momentum=factor, eps=module.eps)
        return None
