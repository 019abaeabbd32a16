"""Training methods compared in the reproduction, all through the same wrapper.

Each method is a recipe: which bit-widths one model trains, which loss terms
it uses, and where its patches come from.
[`make_method`][triqdef.baselines.make_method] turns a name into a
[`Method`][triqdef.baselines.Method] holding the wrapper, an optional curriculum and a
``loss`` function that a training loop calls once per batch.

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

from .errors import ConfigError
from .patches import PatchSource
from .schedule import BACTSchedule
from .wrapper import DEFAULT_BITS, TriQDefWrapper

__all__ = ["METHODS", "PER_BIT", "Method", "make_method"]

PER_BIT = ("qat", "pbat")
"""Methods that train one single-precision model per bit-width."""


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


@dataclass
class _Request:
    """What [`make_method`][triqdef.baselines.make_method] was asked for, beside the name."""

    bits: tuple[int, ...]
    layers: Sequence[str]
    pool: PatchSource | None
    pbat_attack: Callable | None
    epochs: int
    seed: int
    calib_loader: Iterable | None


def _clean(name: str, model: nn.Module, r: _Request, kwargs: dict) -> Method:
    """``qat`` and ``multibit``: clean cross-entropy at every bit-width, no penalty."""
    w = TriQDefWrapper(model, bits=r.bits, rho=0.0, lambda_fdp=0, lambda_gpdp=0, **kwargs)
    return Method(name, w, lambda x, y: w.loss(x, y), None, r.bits)


def _pbat(name: str, model: nn.Module, r: _Request, kwargs: dict) -> Method:
    """``pbat`` and ``pbat-shared``: patches crafted on the model itself, no penalty."""
    w = TriQDefWrapper(model, bits=r.bits, lambda_fdp=0, lambda_gpdp=0, **kwargs)
    if r.pbat_attack is None:
        raise ConfigError("pbat needs pbat_attack: a callable(wrapper) -> patch source")
    source = r.pbat_attack(w)
    return Method(name, w, lambda x, y: w.loss(x, y, patch=source), None, r.bits)


def _pool_of(name: str, r: _Request) -> PatchSource:
    if r.pool is None:
        raise ConfigError(f"{name} trains on an offline patch pool: pass pool=...")
    return r.pool


def _dwq(name: str, model: nn.Module, r: _Request, kwargs: dict) -> Method:
    """``dwq-train``: one random bit-width per iteration, pool patches, no penalty."""
    pool = _pool_of(name, r)
    bits = r.bits
    w = TriQDefWrapper(model, bits=bits, lambda_fdp=0, lambda_gpdp=0, **kwargs)
    rng = random.Random(r.seed)

    def dwq_loss(x: Tensor, y: Tensor) -> Tensor:
        w.set_active_bits([rng.choice(bits)])
        return w.loss(x, y, patch=pool)

    return Method(name, w, dwq_loss, None, bits)


# The wrapper settings each TriQDef ablation switches off.
_ABLATIONS: dict[str, dict[str, float]] = {
    "triqdef": {},
    "triqdef-no-fdp": {"lambda_fdp": 0.0},
    "triqdef-no-gpdp": {"lambda_gpdp": 0.0},
}


def _triqdef(name: str, model: nn.Module, r: _Request, kwargs: dict) -> Method:
    """``triqdef`` and its ablations: the full objective, BACT and pool patches."""
    pool = _pool_of(name, r)
    w = TriQDefWrapper(model, bits=r.bits, layers=r.layers, **{**kwargs, **_ABLATIONS[name]})
    schedule = BACTSchedule(w, total=max(1, r.epochs), calib_loader=r.calib_loader)
    return Method(name, w, lambda x, y: w.loss(x, y, patch=pool), schedule, r.bits)


# Every method's builder, in the order the reproduction reports them.
_BUILDERS: dict[str, Callable[[str, nn.Module, _Request, dict], Method]] = {
    "qat": _clean,
    "multibit": _clean,
    "pbat": _pbat,
    "pbat-shared": _pbat,
    "dwq-train": _dwq,
    "triqdef": _triqdef,
    "triqdef-no-fdp": _triqdef,
    "triqdef-no-gpdp": _triqdef,
}
METHODS = tuple(_BUILDERS)
"""The method names [`make_method`][triqdef.baselines.make_method] knows, in report order."""


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
        name: one of [`METHODS`][triqdef.baselines.METHODS].
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
        **wrapper_kwargs: more [`TriQDefWrapper`][triqdef.TriQDefWrapper] keywords.

    Returns:
        The [`Method`][triqdef.baselines.Method].
    """
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; choose one of {METHODS}")
    bits = tuple(bits)
    if name in PER_BIT and len(bits) != 1:
        raise ConfigError(f"{name} trains one bit-width at a time, got bits={bits}")
    request = _Request(bits, layers, pool, pbat_attack, epochs, seed, calib_loader)
    return _BUILDERS[name](name, model, request, dict(wrapper_kwargs))
