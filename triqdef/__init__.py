"""triqdef: quantized networks that resist adversarial patches across bit-widths.

Public surface::

    TriQDefWrapper            one shared backbone at several bit-widths (hooks);
                              wrapper.loss(x, y, patch) is the TriQDef objective
    BACTSchedule              the bit-width curriculum, stepped in your loop
    save, load                the whole wrapper in safetensors
    save_quantized            integer weight codes of one bit-width, for deployment
    export_onnx               an ONNX QDQ model of one bit-width (extra [onnx])
    functional, losses        perceptual metrics and the cross-bit penalties
    attacks                   patch placement and patch sources
    models, data              reference models, datasets (torch Datasets)

The submodules ``attacks``, ``baselines``, ``data``, ``evaluate``, ``functional``,
``losses`` and ``models`` are imported on first access (``triqdef.models``).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from . import errors
from .errors import TriQDefError
from .io import load, save, save_quantized
from .onnx_export import export_onnx
from .schedule import BACTSchedule
from .wrapper import DEFAULT_BITS, TriQDefWrapper

__version__ = "0.1.0.dev0"

__all__ = [
    "BACTSchedule",
    "DEFAULT_BITS",
    "TriQDefError",
    "TriQDefWrapper",
    "errors",
    "export_onnx",
    "load",
    "save",
    "save_quantized",
    "__version__",
]

_LAZY = ("attacks", "baselines", "data", "evaluate", "functional", "losses", "models")


def __getattr__(name: str) -> ModuleType:
    """Import the submodules in ``_LAZY`` on first access (PEP 562)."""
    if name in _LAZY:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
