"""Feature taps: forward hooks that hold a layer's output only while asked to."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["FeatureTaps"]


class FeatureTaps:
    """A store for the outputs of named layers, filled only inside `capture`.

    The hook is a bound method (picklable, deep-copyable). Outputs are kept per
    device, so replicas of a ``DataParallel`` model do not overwrite each other,
    and everything is dropped when the ``capture`` block ends: nothing
    accumulates between steps.

    Args:
        names: the layer names to tap, as in ``model.named_modules()``.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self._depth = 0
        self._store: dict[torch.device, dict[str, torch.Tensor]] = {}

    def __getstate__(self) -> dict:
        return {"names": self.names}

    def __setstate__(self, state: dict) -> None:
        FeatureTaps.__init__(self, state["names"])

    def hook(self, name: str, module: nn.Module, args: tuple, output) -> None:
        """Forward hook: remember ``output`` while a capture is open."""
        if self._depth and isinstance(output, torch.Tensor):
            self._store.setdefault(output.device, {})[name] = output

    @contextlib.contextmanager
    def capture(self) -> Iterator[dict[torch.device, dict[str, torch.Tensor]]]:
        """Open a capture; yields the live store ``{device: {name: output}}``."""
        self._depth += 1
        try:
            yield self._store
        finally:
            self._depth -= 1
            if not self._depth:
                self._store.clear()

    def pop(self, device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """Take the outputs captured so far (on ``device``, or all), leaving none behind."""
        if device is None:
            out = {k: v for store in self._store.values() for k, v in store.items()}
            self._store.clear()
            return out
        return self._store.pop(device, {})
