"""triqdef: quantized networks that resist adversarial patches across bit-widths.

Public surface::

    TriQDefWrapper            one shared backbone at several bit-widths (hooks)
    save, load                the whole wrapper in safetensors
    save_quantized            integer weight codes of one bit-width, for deployment
    functional, models, data  metrics, reference models, offline datasets
"""

from . import errors
from .errors import TriQDefError
from .io import load, save, save_quantized
from .wrapper import DEFAULT_BITS, TriQDefWrapper

__version__ = "0.1.0.dev0"

__all__ = [
    "DEFAULT_BITS",
    "TriQDefError",
    "TriQDefWrapper",
    "errors",
    "load",
    "save",
    "save_quantized",
    "__version__",
]
