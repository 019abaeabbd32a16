"""Patch attacks and patch sources.

:func:`apply_patch` places patches; a :class:`PatchSource` is what
``wrapper.loss(x, y, patch=source)`` draws patched images from;
:class:`RandomPatch` (uniform noise) is the default source and the floor that
attacks are compared against.
"""

from .patching import PatchSource, RandomPatch, apply_patch, random_locations

__all__ = ["PatchSource", "RandomPatch", "apply_patch", "random_locations"]
