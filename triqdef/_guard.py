"""The one-thread-at-a-time guard of a wrapper's bit-width."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

from .errors import ConcurrentUseError

__all__ = ["BitsGuard", "in_backward"]


def in_backward() -> bool:
    """Whether this thread is running an autograd backward (e.g. the memory-bounded
    replay, which the engine may run on its own device thread for the caller)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class BitsGuard:
    """Which thread holds a wrapper's bit-width (inside ``at_bits``, ``calibrate`` or
    ``loss``). Re-entrant for its thread; a new one after a copy or unpickling."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.holder: int | None = None
        self.depth = 0

    def __reduce__(self):
        return (BitsGuard, ())

    def _refuse(self, what: str, bits: int) -> ConcurrentUseError:
        return ConcurrentUseError(
            f"{what}: another thread (ident {self.holder}) is using this TriQDefWrapper at "
            f"{bits} bits (inside at_bits, calibrate or loss). The bit-width is one mode of "
            "the wrapper and its hooks swap the shared weights, so two threads cannot run it "
            "at once: give each thread its own copy (copy.deepcopy(wrapper)), or use "
            "DistributedDataParallel rather than DataParallel. Nothing was changed"
        )

    def check(self, what: str, bits: int) -> None:
        """Raise if another thread holds the bit-width (a plain read: no lock)."""
        holder = self.holder
        if holder is not None and holder != threading.get_ident() and not in_backward():
            raise self._refuse(what, bits)

    @contextlib.contextmanager
    def hold(self, what: str, bits: int) -> Iterator[None]:
        """Hold the bit-width for this thread inside the block, or raise if another does."""
        if in_backward():  # acting for the thread that called backward
            yield
            return
        me = threading.get_ident()
        with self._lock:
            if self.holder is not None and self.holder != me:
                raise self._refuse(what, bits)
            self.holder, self.depth = me, self.depth + 1
        try:
            yield
        finally:
            with self._lock:
                self.depth -= 1
                if not self.depth:
                    self.holder = None
