"""One error family for triqdef.

Every error triqdef raises on purpose derives from
[`TriQDefError`][triqdef.errors.TriQDefError], and also from the builtin a caller
would naturally catch (``ValueError``, ``KeyError``, ``TypeError``,
``RuntimeError``), so ``except ValueError`` keeps working in code that does not
know about triqdef.
"""

from __future__ import annotations

__all__ = [
    "TriQDefError",
    "ConfigError",
    "LayerNotFoundError",
    "InputError",
    "CheckpointError",
    "NotCalibratedError",
    "DetachedError",
    "NonFiniteLossError",
    "CheckpointFileError",
    "ConcurrentUseError",
]


class TriQDefError(Exception):
    """Base class of every error triqdef raises on purpose."""


class ConfigError(TriQDefError, ValueError):
    """A constructor argument is invalid (bit-widths, names, hyper-parameters)."""


class LayerNotFoundError(TriQDefError, KeyError):
    """A layer name is not in ``model.named_modules()``."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class InputError(TriQDefError, TypeError, ValueError):
    """A call received a tensor of the wrong type, shape, dtype, device or values."""


class CheckpointError(TriQDefError, ValueError):
    """A checkpoint does not match the wrapper, or the file is truncated or corrupt."""


class NotCalibratedError(TriQDefError, RuntimeError):
    """An evaluation ran at a bit-width whose observers have never seen data."""


class DetachedError(TriQDefError, RuntimeError):
    """The wrapper was detached from its model and can no longer run it."""


class NonFiniteLossError(TriQDefError, ValueError):
    """A loss term came out NaN or Inf; the message names the term and bit-width."""


class CheckpointFileError(CheckpointError, OSError):
    """A checkpoint file could not be written or read (a directory, a missing folder,
    no permission, a read-only or full disk).

    A [`CheckpointError`][triqdef.errors.CheckpointError] that is also an ``OSError``,
    so ``except OSError`` keeps catching what the operating system reported;
    ``errno`` is the system's error number where there was one. The message names the
    path.
    """


class ConcurrentUseError(TriQDefError, RuntimeError):
    """A second thread tried to change the bit-width of a wrapper another thread is using.

    The quantizers swap the shared weights in place, so one wrapper runs at one
    bit-width at a time; give each thread its own wrapper (or use DDP).
    """
