"""The TriQDef objective behind ``wrapper.loss(x, y, patch)``: `TriQDefObjective`.

``L = L_clean + lambda_adv * L_adv + lambda_fdp * L_FDP + lambda_gpdp * L_GPDP``
over the wrapper's active bit-widths (paper section 3, Algorithms 1 and 2), plus the
optional GAL/TRS-style gradient-diversity terms ``lambda_cos * L_cos +
lambda_smooth * L_smooth`` and the DVERGE-style term ``lambda_dverge * L_dverge`` (all 0
by default).

The batch: the last ``round(rho * B)`` samples (at least one, and at least one
left clean when ``0 < rho < 1``) are patched; the other samples stay clean. A
batch of one sample is used twice, once clean and once patched. Each bit-width
runs **one** forward over the mixed batch; ``L_clean`` is the cross-entropy of the
clean rows and ``L_adv`` of the patched rows, each averaged over bit-widths. FDP
and GPDP (and the gradient-diversity terms) look at the patched rows only (see
[`triqdef.losses`][triqdef.losses]).
"""

from __future__ import annotations

import collections
import contextlib
import math
from typing import Any

import torch
from torch import Tensor, nn

from ._checks import check_dtype, check_penalty_bits, is_label_dtype, label_dtype_error, model_dtype
from ._replay import memory_bounded_loss
from ._terms import Wrapper, combine, dverge_term, needs_input_grad, run_bit, uses_dverge
from .errors import ConfigError, InputError
from .losses import PAIR_MODES, DescriptorConfig
from .patches import PatchSource, RandomPatch, apply_patch
from .quant import _Snapshot

__all__ = ["TriQDefObjective", "triqdef_loss"]


class TriQDefObjective:
    """The TriQDef loss: its settings, the terms of its last call, a window of recent inputs.

    [`TriQDefWrapper`][triqdef.TriQDefWrapper] builds one from its keyword arguments
    (the same names and defaults, documented there) and its
    [`loss`][triqdef.TriQDefWrapper.loss] calls it as ``objective(wrapper, x, y,
    patch)``; the wrapper's attributes of the same names (``wrapper.lambda_fdp``, ...)
    read and set these. The objective uses only public members of the wrapper:
    ``model``, ``layers``, ``active_bits``, ``at_bits``, ``capture_features``,
    ``mixed_batch``, ``frozen_observers``, ``parameters``, ``buffers``, ``modules``.

    Args:
        lambda_adv: weight of the cross-entropy on patched inputs.
        lambda_fdp: weight of the Feature Disalignment Penalty.
        lambda_gpdp: weight of the Gradient Perceptual Dissonance Penalty.
        alpha: weight of the edge SoftDice inside the penalties.
        beta: weight of the HOG cosine inside the penalties.
        rho: share of each batch that is patched, in [0, 1].
        pairs: ``"mean"`` over unordered pairs or ``"sum"`` over ordered pairs.
        patch_source: patches used when the loss gets ``patch=None``; default
            [`RandomPatch`][triqdef.patches.RandomPatch].
        memory_bounded: compute the gradient one bit-width at a time.
        check_finite: raise [`NonFiniteLossError`][triqdef.errors.NonFiniteLossError]
            instead of returning a NaN/Inf loss.
        descriptor: settings of the perceptual descriptors.
        penalty_bits: how many active bit-widths each call samples for the penalties
            (``None``: all of them).
        lambda_cos: weight of the gradient-alignment penalty.
        lambda_smooth: weight of the TRS smoothness term.
        lambda_dverge: weight of the DVERGE-style cross-bit distilled-feature term (needs
            tapped layers; not with ``memory_bounded``).

    Attributes:
        last_terms: the terms of the last call, as detached tensors (the keys of
            [`loss_terms`][triqdef.TriQDefWrapper.loss_terms]); `terms` gives them as
            floats.

    Raises:
        ConfigError: an argument is not valid.
    """

    def __init__(
        self,
        *,
        lambda_adv: float = 1.0,
        lambda_fdp: float = 0.8,
        lambda_gpdp: float = 0.5,
        alpha: float = 0.5,
        beta: float = 1.0,
        rho: float = 0.5,
        pairs: str = "mean",
        patch_source: PatchSource | None = None,
        memory_bounded: bool = False,
        check_finite: bool = True,
        descriptor: DescriptorConfig | None = None,
        penalty_bits: int | None = 2,
        lambda_cos: float = 0.0,
        lambda_smooth: float = 0.0,
        lambda_dverge: float = 0.0,
    ) -> None:
        if patch_source is not None and not callable(patch_source):
            raise ConfigError(
                f"patch_source must be callable(x, y, wrapper) -> x_adv, got {patch_source!r}"
            )
        if descriptor is not None and not isinstance(descriptor, DescriptorConfig):
            raise ConfigError(f"descriptor must be a DescriptorConfig, got {descriptor!r}")
        # each assignment below is checked by __setattr__ (weights, rho, pairs, DVERGE
        # with memory_bounded); a fresh objective that fails is simply discarded
        self._penalty_bits = check_penalty_bits(penalty_bits)
        self.lambda_adv, self.lambda_fdp, self.lambda_gpdp = lambda_adv, lambda_fdp, lambda_gpdp
        self.lambda_cos, self.lambda_smooth = lambda_cos, lambda_smooth
        self.lambda_dverge, self.alpha, self.beta = lambda_dverge, alpha, beta
        self.rho, self.pairs = rho, pairs
        self.patch_source = RandomPatch() if patch_source is None else patch_source
        self.memory_bounded, self.check_finite = bool(memory_bounded), bool(check_finite)
        self.descriptor = descriptor or DescriptorConfig()
        self.last_terms: dict[str, Tensor] = {}  # the last call's terms, detached tensors
        self._recent: collections.deque | None = None  # recent inputs, for BACT calibration

    _WEIGHTS = frozenset(
        ("lambda_adv", "lambda_fdp", "lambda_gpdp", "lambda_cos", "lambda_smooth")
        + ("lambda_dverge", "alpha", "beta")
    )

    def __setattr__(self, name: str, value: Any) -> None:
        """Settings are checked on every assignment, in the constructor and after it (a
        refused value raises [`ConfigError`][triqdef.errors.ConfigError] and keeps the old
        one)."""
        if name in self._WEIGHTS:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{name} must be finite and >= 0, got {value}")
            value = float(value)
        elif name == "rho":
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not 0 <= value <= 1:
                raise ConfigError(
                    f"rho (patched share of the batch) must be in [0, 1], got {value!r}"
                )
            value = float(value)
        elif name == "pairs" and value not in PAIR_MODES:
            raise ConfigError(f"pairs must be one of {PAIR_MODES}, got {value!r}")
        if name in ("lambda_dverge", "memory_bounded") and self._dverge_bounded(name, value):
            raise ConfigError(
                "lambda_dverge > 0 is not supported with memory_bounded=True (the DVERGE "
                "term distils features at each bit-width of the sample in one pass); use "
                "one of them"
            )
        super().__setattr__(name, value)

    def _dverge_bounded(self, name: str, value: Any) -> bool:
        """Whether assigning ``value`` to ``name`` would run DVERGE with memory_bounded."""
        dverge = value if name == "lambda_dverge" else getattr(self, "lambda_dverge", 0.0)
        bounded = value if name == "memory_bounded" else getattr(self, "memory_bounded", False)
        return dverge != 0 and bool(bounded)

    @property
    def penalty_bits(self) -> int | None:
        """How many active bit-widths each call samples for the penalties (``None``: all);
        assigning a value other than ``None`` or an int ``>= 2`` raises
        [`ConfigError`][triqdef.errors.ConfigError] and keeps the old one."""
        return self._penalty_bits

    @penalty_bits.setter
    def penalty_bits(self, m: int | None) -> None:
        self._penalty_bits = check_penalty_bits(m)

    def __call__(self, wrapper: Wrapper, x: Tensor, y: Tensor, patch: Any = None) -> Tensor:
        """The loss of ``wrapper`` on ``(x, y)``; see
        [`TriQDefWrapper.loss`][triqdef.TriQDefWrapper.loss].

        Under ``torch.no_grad()`` the loss is computed as in training (observers,
        BatchNorm statistics and the terms move; GPDP still takes its input gradients)
        and returned without a graph, in either backward mode. Under
        ``torch.inference_mode()`` it raises [`InputError`][triqdef.errors.InputError]
        before anything changes.
        """
        _check_grad_mode()
        x, y = _check_inputs(wrapper.model, x, y, patch)
        value_only = not torch.is_grad_enabled()
        bits = wrapper.active_bits
        sample = _draw_penalty_bits(self, bits) if _uses_sample(self, wrapper) else bits
        snapshot = _Snapshot(wrapper)
        try:
            x_mixed, y_mixed, n_clean = _mix(self, wrapper, x, y, patch)
            run = memory_bounded_loss if self.memory_bounded else _exact
            loss = run(self, wrapper, bits, sample, x, x_mixed, y_mixed, n_clean, value_only)
        except BaseException:
            snapshot.restore()
            raise
        if self._recent is not None:  # a bounded window of recent inputs, for BACT
            self._recent.append(x.detach())
        return loss

    def terms(self) -> dict[str, float]:
        """Breakdown of the last call as plain floats (synchronises only when called); see
        [`TriQDefWrapper.loss_terms`][triqdef.TriQDefWrapper.loss_terms]."""
        if not self.last_terms:
            return {}
        names = list(self.last_terms)
        values = torch.stack([t.float() for t in self.last_terms.values()]).tolist()
        return dict(zip(names, values))

    def keep_recent(self, n: int | None) -> None:
        """Keep the inputs of the last ``n`` successful calls (``None``: keep none); starts
        an empty window.

        Raises:
            ConfigError: ``n`` is neither ``None`` nor a positive int.
        """
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ConfigError(f"the recent-input window needs None or an int >= 1, got {n!r}")
        self._recent = None if n is None else collections.deque(maxlen=n)

    def recent(self) -> list[Tensor]:
        """The kept inputs, oldest first (detached; empty when none are kept)."""
        return list(self._recent or ())


def triqdef_loss(w: Any, x: Tensor, y: Tensor, patch: Any = None) -> Tensor:
    """``w.loss(x, y, patch)``; see [`TriQDefWrapper.loss`][triqdef.TriQDefWrapper.loss]."""
    return w.loss(x, y, patch)


# --- input checks ------------------------------------------------------------------------
def _check_grad_mode() -> None:
    """The loss differentiates through the model; ``torch.inference_mode`` forbids that."""
    if torch.is_inference_mode_enabled():
        raise InputError(
            "loss: called under torch.inference_mode(), but the TriQDef loss needs autograd "
            "(it is a training objective, and GPDP takes input gradients even to compute "
            "its value); call it outside inference_mode. Under torch.no_grad() it returns "
            "the loss value without a graph; for accuracy use triqdef.evaluate.clean_accuracy"
        )


def _check_inputs(model: nn.Module, x: Any, y: Any, patch: Any) -> tuple[Tensor, Tensor]:
    """Validate the call; returns ``x`` and ``y`` ready for use (labels as int64)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim != 4:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise InputError(f"loss: x must be a floating (B, C, H, W) tensor, got {got}")
    if x.shape[0] == 0 or x.numel() == 0:
        raise InputError(f"loss: x is empty, shape {tuple(x.shape)}")
    if not isinstance(y, Tensor) or not is_label_dtype(y.dtype):
        raise label_dtype_error("loss: y", y)
    if y.shape != (x.shape[0],):
        raise InputError(f"loss: y must have shape ({x.shape[0]},), got {tuple(y.shape)}")
    param = next(model.parameters(), None)
    for name, t in (("x", x), ("y", y)):
        if param is not None and t.device != param.device:
            raise InputError(f"loss: {name} is on {t.device} but the model is on {param.device}")
    check_dtype(x, model_dtype(model), "x", "loss: ")
    _check_patch(x, patch)
    # tensors made under inference_mode cannot be saved for backward: plain copies
    x = x.clone() if x.is_inference() else x
    return x, (y.clone() if y.is_inference() else y).long()


def _check_patch(x: Tensor, patch: Any) -> None:
    if patch is None or isinstance(patch, PatchSource):
        return
    if not isinstance(patch, Tensor):
        raise InputError(
            "loss: patch must be None, a (C, h, w) or (N, C, h, w) tensor, or a patch source "
            f"(callable(x, y, wrapper) -> x_adv), got {type(patch).__name__}"
        )
    if patch.ndim not in (3, 4) or not patch.is_floating_point() or patch.numel() == 0:
        raise InputError(
            f"loss: patch must be a floating (C, h, w) or (N, C, h, w) tensor, got "
            f"{patch.dtype} {tuple(patch.shape)}"
        )
    if patch.device != x.device:
        raise InputError(f"loss: patch is on {patch.device} but x is on {x.device}")
    if patch.shape[-3] != x.shape[1]:
        raise InputError(f"loss: patch has {patch.shape[-3]} channels, x has {x.shape[1]}")
    if patch.shape[-2] > x.shape[2] or patch.shape[-1] > x.shape[3]:
        raise InputError(
            f"loss: patch {tuple(patch.shape[-2:])} is larger than the images {tuple(x.shape[2:])}"
        )


# --- the batch -------------------------------------------------------------------------------
def _mix(o: TriQDefObjective, w: Wrapper, x: Tensor, y: Tensor, patch: Any):
    """Mixed batch ``[clean rows; patched rows]``, its labels and the number of clean rows."""
    b = x.shape[0]
    if o.rho == 0:
        return x, y, b
    if b == 1:
        src_x, src_y, clean_x, clean_y = x, y, x, y
    else:
        n_adv = b if o.rho == 1 else min(max(round(o.rho * b), 1), b - 1)
        cut = b - n_adv
        src_x, src_y, clean_x, clean_y = x[cut:], y[cut:], x[:cut], y[:cut]
    if patch is None:
        patch = o.patch_source
    if isinstance(patch, Tensor):
        if patch.ndim == 4 and patch.shape[0] != src_x.shape[0]:
            pick = torch.randint(0, patch.shape[0], (src_x.shape[0],), device=patch.device)
            patch = patch[pick]
        x_adv = apply_patch(src_x, patch)
    else:
        x_adv = patch(src_x, src_y, w)
        if not isinstance(x_adv, Tensor) or x_adv.shape != src_x.shape:
            got = tuple(x_adv.shape) if isinstance(x_adv, Tensor) else type(x_adv).__name__
            raise InputError(
                f"loss: the patch source returned {got}, expected images of shape "
                f"{tuple(src_x.shape)}"
            )
        x_adv = x_adv.to(x.dtype)
    return torch.cat([clean_x, x_adv]), torch.cat([clean_y, src_y]), clean_x.shape[0]


# --- penalty_bits: the sampled pair penalty -------------------------------------------------
def _uses_sample(o: TriQDefObjective, w: Wrapper) -> bool:
    """Some term is computed over the penalty_bits sample (so drawing one matters): FDP with
    tapped layers, GPDP, ``lambda_cos``, ``lambda_smooth`` (not e.g. the QAT and multi-bit
    baselines)."""
    return bool((o.lambda_fdp != 0 or o.lambda_dverge != 0) and w.layers) or needs_input_grad(o)


def _draw_penalty_bits(o: TriQDefObjective, bits: tuple[int, ...]) -> tuple[int, ...]:
    """The active bit-widths whose pairs enter FDP and GPDP in this call (drawn only when
    `_uses_sample` says some term reads them).

    All of ``bits`` (and no random number drawn) when ``o.penalty_bits`` is None or at
    least ``len(bits)``; otherwise ``penalty_bits`` of them, uniformly without
    replacement, from torch's global CPU generator (so identically seeded DDP ranks draw
    the same), kept in the order of ``bits``.
    """
    m = o.penalty_bits
    if m is None or m >= len(bits):
        return bits
    picked = sorted(torch.randperm(len(bits), device="cpu")[:m].tolist())
    return tuple(bits[i] for i in picked)


# --- the exact objective --------------------------------------------------------------------
def _exact(o, w, bits, sample, x, x_mixed, y_mixed, n_clean, value_only=False) -> Tensor:
    gpdp = needs_input_grad(o)
    x_in = x_mixed
    if gpdp and not x_in.requires_grad:
        x_in = x_in.detach().requires_grad_()
    ce_clean, ce_adv, f_desc, g_desc, g_raw = {}, {}, [], [], []
    grad_ctx = torch.enable_grad() if gpdp else contextlib.nullcontext()
    with grad_ctx:
        for i, b in enumerate(bits):
            on = b in sample  # outside the penalty_bits sample: a plain forward
            _, ce_clean[b], ce_adv[b], fd, gd, gr = run_bit(
                o,
                w,
                b,
                x_in if on else x_mixed,
                y_mixed,
                n_clean,
                graph=not value_only,  # under no_grad: values, no double-backward graph
                check=x if i == 0 else None,
                penalties=on,
            )
            if on:
                f_desc.append(fd)
                g_desc.append(gd)
                g_raw.append(gr)
        n_adv = x_mixed.shape[0] - n_clean
        dverge = None
        if uses_dverge(o, w, n_clean, len(sample)):
            dverge = dverge_term(w, sample, x_mixed[:n_clean], y_mixed[:n_clean])
        total = combine(o, w, bits, sample, ce_clean, ce_adv, f_desc, g_desc, g_raw, n_adv, dverge)
    return total.detach() if value_only else total
