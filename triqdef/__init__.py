"""triqdef: quantized networks that resist adversarial patches across bit-widths.

Public surface::

    TriQDefWrapper            one shared backbone at several bit-widths (hooks);
                              wrapper.loss(x, y, patch) is the TriQDef objective
    BACTSchedule              the bit-width curriculum, stepped in your loop
    save, load                the whole wrapper in safetensors
    save_quantized            integer weight codes of one bit-width, for deployment
    functional, losses        perceptual metrics and the cross-bit penalties
    attacks                   patch placement and patch sources
    models, data              reference models, offline datasets
"""

from . import errors
from .errors import TriQDefError
from .io import load, save, save_quantized
from .schedule import BACTSchedule
from .wrapper import DEFAULT_BITS, TriQDefWrapper

__version__ = "0.1.0.dev0"

__all__ = [
    "BACTSchedule",
    "DEFAULT_BITS",
    "TriQDefError",
    "TriQDefWrapper",
    "errors",
    "load",
    "save",
    "save_quantized",
    "__version__",
]
