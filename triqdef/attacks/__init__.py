"""Patch attacks and patch sources.

[`apply_patch`][triqdef.attacks.apply_patch] places patches; a
[`PatchSource`][triqdef.attacks.PatchSource] is what ``wrapper.loss(x, y, patch=source)``
draws patched images from; [`RandomPatch`][triqdef.attacks.RandomPatch] (uniform noise) is
the default source and the floor that attacks are compared against.

Attacks (all built as ``Attack(model, patch_size, ...)`` and called as
``attack(x, y)`` or ``attack(x, y, wrapper)``, so each is a patch source):

* [`LAVAN`][triqdef.attacks.LAVAN]: one patch per image, projected sign-gradient ascent,
  random restarts and optional location search (Karmon et al., 2018);
* [`AdversarialPatch`][triqdef.attacks.AdversarialPatch] (GAP): one universal patch trained
  with Expectation over Transformation (Brown et al., 2017);
* [`DPR`][triqdef.attacks.DPR]: one shape-deformable patch per image, shape and texture
  optimised jointly (Chen et al., 2022);
* [`PatchAttack`][triqdef.attacks.PatchAttack]: black-box textured patches; a REINFORCE
  agent picks each patch's position, class texture and crop from the model's output
  probabilities only, within a query budget per image (Yang et al., 2020);
* [`OnTheFlyPatch`][triqdef.attacks.OnTheFlyPatch]: the paper's on-the-fly source, one
  persistent patch updated across sampled bit-widths at every training step;
* [`PatchPool`][triqdef.attacks.PatchPool]: an offline pool of crafted patches with
  metadata, saved in safetensors, sampled as the paper's default source.

The modules: `base` (the attack base classes), `lavan`, `gap`, `dpr`, `patchattack`, `onthefly`
(one per attack), `pool` (the pool and its file), `craft` (crafting a pool), `regions`
(location regions and random corners in them) and `warp` (the EOT warp).
"""

from ..patches import PatchSource, RandomPatch, apply_patch, random_locations
from .base import BasePatchAttack, UniversalPatchAttack
from .dpr import DPR
from .gap import AdversarialPatch
from .lavan import LAVAN
from .onthefly import OnTheFlyPatch
from .patchattack import PatchAttack
from .pool import PatchPool
from .regions import REGIONS, resolve_region
from .warp import warp_patch

__all__ = [
    "PatchSource",
    "RandomPatch",
    "apply_patch",
    "random_locations",
    "BasePatchAttack",
    "UniversalPatchAttack",
    "LAVAN",
    "AdversarialPatch",
    "DPR",
    "OnTheFlyPatch",
    "PatchAttack",
    "PatchPool",
    "REGIONS",
    "resolve_region",
    "warp_patch",
]
