"""Training methods compared in the reproduction, all through the same wrapper.

Each method is a recipe: which bit-widths one model trains, which loss terms
it uses, and where its patches come from. :func:`make_method` turns a name into
a :class:`Method` holding the wrapper, an optional curriculum and a ``loss``
function that a training loop calls once per batch.

- ``qat``: standard QAT of one bit-width (``bits=(b,)``), clean cross-entropy only;
- ``multibit``: the shared backbone at every bit-width, clean cross-entropy only;
- ``pbat``: shared backbone, half of each batch patched with location-optimised
  LAVAN patches crafted on the 32-bit model, cross-entropy only;
- ``dwq``: one random bit-width per iteration, half of each batch patched from
  the pool, cross-entropy only;
- ``triqdef``: the full objective with the BACT curriculum and pool patches;
- ``triqdef-no-fdp`` / ``triqdef-no-gpdp``: ablations without one penalty.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .attacks.patching import PatchSource
from .errors import ConfigError
from .schedule import BACTSchedule
from .wrapper import DEFAULT_BITS, TriQDefWrapper

__all__ = ["METHODS", "Method", "make_method"]

METHODS = ("qat", "multibit", "pbat", "dwq", "triqdef", "triqdef-no-fdp", "triqdef-no-gpdp")


@dataclass
class Method:
    """A model being trained by one method.

    Attributes:
        name: the method's name.
        wrapper: the wrapped model.
        loss: ``loss(x, y) -> scalar`` for one batch.
        schedule: the curriculum to step once per epoch, when the method has one.
        eval_bits: the bit-widths this model is evaluated at.
    """

    name: str
    wrapper: TriQDefWrapper
    loss: Callable[[Tensor, Tensor], Tensor]
    schedule: BACTSchedule | None = None
    eval_bits: tuple[int, ...] = field(default_factory=tuple)


def make_method(
    name: str,
    model: nn.Module,
    *,
    bits: Sequence[int] = DEFAULT_BITS,
    layers: Sequence[str] = (),
    pool: PatchSource | None = None,
    pbat_attack: Callable | None = None,
    epochs: int = 1,
    seed: int = 0,
    **wrapper_kwargs: Any,
) -> Method:
    """Wrap ``model`` for the method ``name``.

    Args:
        name: one of :data:`METHODS`.
        model: a fresh model (it is wrapped, not copied).
        bits: the bit-widths; for ``qat`` exactly one.
        layers: layers tapped by FDP (TriQDef methods).
        pool: the offline patch source (``dwq`` and the TriQDef methods).
        pbat_attack: the patch source of ``pbat`` (a location-optimised LAVAN
            built on this method's wrapper at 32 bits); ``None`` is refused.
        epochs: training length, for the curriculum's default milestones.
        seed: seed of ``dwq``'s bit-width draws.
        **wrapper_kwargs: more :class:`TriQDefWrapper` keywords.

    Returns:
        The :class:`Method`.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {METHODS}")
    bits = tuple(bits)
    if name == "qat":
        if len(bits) != 1:
            raise ConfigError(f"qat trains one bit-width at a time, got bits={bits}")
        w = TriQDefWrapper(model, bits=bits, rho=0.0, lambda_fdp=0, lambda_gpdp=0, **wrapper_kwargs)
        return Method(name, w, lambda x, y: w.loss(x, y), None, bits)
    if name == "multibit":
        w = TriQDefWrapper(model, bits=bits, rho=0.0, lambda_fdp=0, lambda_gpdp=0, **wrapper_kwargs)
        return Method(name, w, lambda x, y: w.loss(x, y), None, bits)
    if name == "pbat":
        w = TriQDefWrapper(model, bits=bits, lambda_fdp=0, lambda_gpdp=0, **wrapper_kwargs)
        if pbat_attack is None:
            raise ConfigError("pbat needs pbat_attack: a callable(wrapper) -> patch source")
        source = pbat_attack(w)
        return Method(name, w, lambda x, y: w.loss(x, y, patch=source), None, bits)
    if pool is None:
        raise ConfigError(f"{name} trains on an offline patch pool: pass pool=...")
    if name == "dwq":
        w = TriQDefWrapper(model, bits=bits, lambda_fdp=0, lambda_gpdp=0, **wrapper_kwargs)
        rng = random.Random(seed)

        def dwq_loss(x: Tensor, y: Tensor) -> Tensor:
            w.set_active_bits([rng.choice(bits)])
            return w.loss(x, y, patch=pool)

        return Method(name, w, dwq_loss, None, bits)
    kwargs = dict(wrapper_kwargs)
    if name == "triqdef-no-fdp":
        kwargs["lambda_fdp"] = 0.0
    if name == "triqdef-no-gpdp":
        kwargs["lambda_gpdp"] = 0.0
    w = TriQDefWrapper(model, bits=bits, layers=layers, **kwargs)
    schedule = BACTSchedule(w, total=max(1, epochs))
    return Method(name, w, lambda x, y: w.loss(x, y, patch=pool), schedule, bits)
