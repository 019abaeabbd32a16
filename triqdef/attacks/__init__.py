"""Patch attacks and patch sources.

:func:`apply_patch` places patches; a :class:`PatchSource` is what
``wrapper.loss(x, y, patch=source)`` draws patched images from;
:class:`RandomPatch` (uniform noise) is the default source and the floor that
attacks are compared against.

Attacks (all built as ``Attack(model, patch_size, ...)`` and called as
``attack(x, y)`` or ``attack(x, y, wrapper)``, so each is a patch source):

* :class:`LAVAN`: one patch per image, projected sign-gradient ascent, random
  restarts and optional location search (Karmon et al., 2018);
* :class:`AdversarialPatch` (GAP): one universal patch trained with
  Expectation over Transformation (Brown et al., 2017);
* :class:`OnTheFlyPatch`: the paper's on-the-fly source, one persistent patch
  updated across sampled bit-widths at every training step;
* :class:`PatchPool`: an offline pool of crafted patches with metadata, saved
  in safetensors, sampled as the paper's default source.
"""

from .base import REGIONS, PatchAttack, UniversalPatchAttack, resolve_region, warp_patch
from .gap import AdversarialPatch
from .lavan import LAVAN
from .onthefly import OnTheFlyPatch
from .patching import PatchSource, RandomPatch, apply_patch, random_locations
from .pool import PatchPool

__all__ = [
    "PatchSource",
    "RandomPatch",
    "apply_patch",
    "random_locations",
    "PatchAttack",
    "UniversalPatchAttack",
    "LAVAN",
    "AdversarialPatch",
    "OnTheFlyPatch",
    "PatchPool",
    "REGIONS",
    "resolve_region",
    "warp_patch",
]
