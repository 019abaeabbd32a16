"""Training methods compared in the reproduction, all through the same wrapper.

Each method is a recipe: which bit-widths one model trains, which loss terms
it uses, and where its patches come from. :func:`make_method` turns a name into
a :class:`Method` holding the wrapper, an optional curriculum and a ``loss``
function that a training loop calls once per batch.

- ``qat``: standard QAT of one bit-width (``bits=(b,)``), clean cross-entropy only;
- ``multibit``: the shared backbone at every bit-width, clean cross-entropy only
  (the undefended reference);
- ``pbat``: patch-based adversarial training of **one single-precision model per
  bit-width** (``bits=(b,)``, like ``qat``; Rao et al., the paper's table 2): half
  of each batch patched with location-optimised LAVAN patches crafted on the model
  itself;
- ``pbat-shared``: the same recipe on the shared multi-bit backbone, patches
  crafted on its 32-bit view (this project's earlier ``pbat``);
- ``dwq-train``: the *training* half of Double-Win Quant (Fu et al.): one random
  bit-width per iteration, half of each batch patched from the pool. DWQ also
  draws a random precision for every query at test time; that half is not
  implemented, because a random-precision model has no fixed target bit-width for a
  transfer matrix. Its models are evaluated at fixed bit-widths like every other;
- ``triqdef``: the full objective with the BACT curriculum and pool patches;
- ``triqdef-no-fdp`` / ``triqdef-no-gpdp``: ablations without one penalty.

``qat`` and ``pbat`` train one model per bit-width
(`PER_BIT`); the others train one shared backbone.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from .attacks.patching import PatchSource
from .errors import ConfigError
from .schedule import BACTSchedule
from .wrapper import DEFAULT_BITS, TriQDefWrapper

__all__ = ["METHODS", "PER_BIT", "Method", "make_method"]

METHODS = (
    "qat",
    "multibit",
    "pbat",
    "pbat-shared",
    "dwq-train",
    "triqdef",
    "triqdef-no-fdp",
    "triqdef-no-gpdp",
)
#: Methods that train one single-precision model per bit-width.
PER_BIT = ("qat", "pbat")


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
    calib_loader: Iterable | None = None,
    **wrapper_kwargs: Any,
) -> Method:
    """Wrap ``model`` for the method ``name``.

    Args:
        name: one of :data:`METHODS`.
        model: a fresh model (it is wrapped, not copied).
        bits: the bit-widths; for the `PER_BIT` methods exactly one.
        layers: layers tapped by FDP (TriQDef methods).
        pool: the patch source of ``dwq-train`` and the TriQDef methods (the paper's
            offline pool, or any patch source).
        pbat_attack: the patch source of ``pbat`` and ``pbat-shared``: a callable
            ``pbat_attack(wrapper) -> patch source``, e.g. a location-optimised LAVAN
            built on the wrapper at its highest bit-width; ``None`` is refused.
        epochs: training length in the unit the caller steps the curriculum
            (epochs or iterations), for its default milestones.
        seed: seed of ``dwq-train``'s bit-width draws.
        calib_loader: held-out batches the curriculum calibrates joining
            bit-widths on (the paper calibrates on a held-out subset); ``None``
            uses recent training inputs.
        **wrapper_kwargs: more :class:`TriQDefWrapper` keywords.

    Returns:
        The :class:`Method`.
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {METHODS}")
    bits = tuple(bits)
    if name in PER_BIT and len(bits) != 1:
        raise ConfigError(f"{name} trains one bit-width at a time, got bits={bits}")
    if name == "qat":
        w = TriQDefWrapper(model, bits=bits, rho=0.0, lambda_fdp=0, lambda_gpdp=0, **wrapper_kwargs)
        return Method(name, w, lambda x, y: w.loss(x, y), None, bits)
    if name == "multibit":
        w = TriQDefWrapper(model, bits=bits, rho=0.0, lambda_fdp=0, lambda_gpdp=0, **wrapper_kwargs)
        return Method(name, w, lambda x, y: w.loss(x, y), None, bits)
    if name in ("pbat", "pbat-shared"):
        w = TriQDefWrapper(model, bits=bits, lambda_fdp=0, lambda_gpdp=0, **wrapper_kwargs)
        if pbat_attack is None:
            raise ConfigError("pbat needs pbat_attack: a callable(wrapper) -> patch source")
        source = pbat_attack(w)
        return Method(name, w, lambda x, y: w.loss(x, y, patch=source), None, bits)
    if pool is None:
        raise ConfigError(f"{name} trains on an offline patch pool: pass pool=...")
    if name == "dwq-train":
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
    schedule = BACTSchedule(w, total=max(1, epochs), calib_loader=calib_loader)
    return Method(name, w, lambda x, y: w.loss(x, y, patch=pool), schedule, bits)
