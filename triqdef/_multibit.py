"""`MultiBitModel`: the hooks half of the wrapper (bit-widths, observers, calibration, export)."""

from __future__ import annotations

import contextlib
import copy
import functools
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import cast

import torch
from torch import nn

from ._checks import (
    act_grid,
    check_act_bits,
    check_bits,
    check_calibration_batches,
    check_input_bits,
    check_min_bits,
    check_momentum,
    check_names,
    check_quantizer,
    logits_of,
)
from ._export import materialize, quantized_copy
from ._guard import BitsGuard
from ._statedict import check_state_dict
from .errors import ConfigError, DetachedError, InputError, NotCalibratedError
from .quant import (
    BatchNormStats,
    BitContext,
    CleanRowsBatchNorm,
    LayerQuantizer,
    _check_weights,
    _device_of,
    _key,
    _quant_points,
    _weight_owner,
    _weight_value,
    weight_access,
)
from .taps import FeatureTaps

__all__ = ["BN_ROWS", "MultiBitModel"]

BN_ROWS = ("all", "clean")


def _loss_logits_hook(ctx: BitContext, module: nn.Module, args: tuple, output):
    """Forward hook of the root model: inside the loss (``ctx.rows`` set), hand the
    objective the ``(B, K)`` logits of a model returning a tuple, dict or ``(B, K, 1, 1)``;
    outside it the model's output is left exactly as it is."""
    if ctx.rows is None or (isinstance(output, torch.Tensor) and output.ndim == 2):
        return None
    return logits_of(output, "loss")


def _channels(layer: nn.Module, weights: tuple[tuple[str, str], ...]) -> list[int]:
    """Output channels (first dimension) of each quantized weight of ``layer``."""
    return [int(_weight_value(_weight_owner(layer, path), name).shape[0]) for path, name in weights]


def _failed(checks: list[tuple[str, torch.Tensor]]) -> list[str]:
    """The labels whose 0-dim bool tensor is False, each once, in order (one host
    synchronisation per device)."""
    by_device: dict[torch.device, list] = {}
    for label, ok in checks:
        by_device.setdefault(ok.device, []).append((label, ok))
    bad: set[str] = set()
    for entries in by_device.values():
        flags = torch.stack([ok for _, ok in entries]).tolist()
        bad.update(label for (label, _), fine in zip(entries, flags) if not fine)
    return [label for label in dict.fromkeys(label for label, _ in checks) if label in bad]


class MultiBitModel(nn.Module):
    """One model run at several bit-widths by hooks: the base of
    [`TriQDefWrapper`][triqdef.TriQDefWrapper], which adds the objective.

    Args and errors as [`TriQDefWrapper`][triqdef.TriQDefWrapper]'s of the same names.
    """

    def __init__(
        self,
        model: nn.Module,
        bits: Sequence[int],
        layers: Sequence[str] = (),
        exclude: Sequence[str] = (),
        *,
        per_bit_bn: bool = True,
        momentum: float = 0.1,
        bn_rows: str = "all",
        input_bits: int | None = 8,
        min_bits: Mapping[str, int] | None = None,
        act_bits: int | Mapping[int, int] | None = None,
        quantizer: str = "minmax",
    ) -> None:
        bits, layers, exclude = self._check_model_args(model, bits, layers, exclude, momentum)
        if not isinstance(bn_rows, str) or bn_rows not in BN_ROWS:
            raise ConfigError(f"bn_rows must be one of {BN_ROWS}, got {bn_rows!r}")
        input_bits = check_input_bits(input_bits)
        act_bits = check_act_bits(act_bits, bits)
        quantizer = check_quantizer(quantizer)
        for module in model.modules():
            for hook in (*module._forward_pre_hooks.values(), *module._forward_hooks.values()):
                owner = getattr(hook, "__self__", None)
                if isinstance(owner, (LayerQuantizer, BatchNormStats)):
                    raise ConfigError(
                        "this model is already wrapped by a TriQDefWrapper; "
                        "call .detach() on that wrapper first"
                    )
        points = _quant_points(model, exclude)
        if not points:
            raise ConfigError(
                f"{type(model).__name__} has no Conv1d/2d/3d, Linear or MultiheadAttention "
                f"layer to quantize{' outside `exclude`' if exclude else ''}"
            )
        _check_weights(model, points)
        floors = check_min_bits(model, min_bits, list(points))

        super().__init__()
        self.model = model
        self.bits = bits
        self.layers = layers
        self.exclude = exclude
        self.per_bit_bn = bool(per_bit_bn)
        self.active_bits = bits
        self.bn_rows, self.input_bits = bn_rows, input_bits
        self.min_bits, self.act_bits, self.quantizer = floors, act_bits, quantizer
        self._ctx = BitContext(tuple(b for b in bits if b < 32), input_bits)
        self._bn_rows_hooks = CleanRowsBatchNorm(self._ctx)
        self._bits = bits[0]
        self._guard = BitsGuard()
        self._warned_uncalled: tuple[str, ...] = ()
        self._detached = False
        self._taps = FeatureTaps(layers)
        self._handles: list = []
        modules = dict(model.named_modules())
        qbits = self._ctx.qbits
        self.quantizers = nn.ModuleDict()
        for name, (weights, n) in points.items():
            floor = floors.get(name, 2)
            self.quantizers[_key(name)] = LayerQuantizer(
                self._ctx,
                weights,
                n,
                momentum,
                device=_device_of(modules[name]),
                weight_grid=[max(b, floor) for b in qbits],
                act_grid=[max(act_grid(act_bits, b), floor) for b in qbits],
                quantizer=quantizer,
                channels=_channels(modules[name], weights) if quantizer == "lsq" else (),
            )
        self.bn_stats = nn.ModuleDict()
        if self.per_bit_bn and self._ctx.qbits:
            for name, m in model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    self.bn_stats[_key(name)] = BatchNormStats(self._ctx, m)
        self._attach(points)
        self.training = model.training  # the wrapper starts in the model's mode
        self.set_bits(bits[0])

    @staticmethod
    def _check_model_args(
        model: nn.Module,
        bits: Sequence[int],
        layers: Sequence[str],
        exclude: Sequence[str],
        momentum: float,
    ) -> tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
        """The first checks of the constructor; ``bits``, ``layers``, ``exclude`` as tuples."""
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        bits = check_bits(bits)
        layers = check_names(model, layers, "layers")
        exclude = check_names(model, exclude, "exclude")
        check_momentum(momentum)
        return bits, layers, exclude

    # --- hooks -------------------------------------------------------------------------
    def _attach(self, points: dict) -> None:
        modules = dict(self.model.named_modules())
        for name in points:
            q, m = self._quantizer(name), modules[name]
            self._handles.append(m.register_forward_pre_hook(q.pre_hook, with_kwargs=True))
            self._handles.append(
                m.register_forward_hook(q.post_hook, with_kwargs=True, always_call=True)
            )
            for slot, (path, pname) in enumerate(q.weights):
                owner = _weight_owner(m, path)
                if weight_access(owner, pname) == "parametrized":
                    # torch.nn.utils.parametrize keeps a ModuleDict of ParametrizationLists
                    plist = cast(nn.ModuleDict, owner.parametrizations)[pname]
                    hook = functools.partial(q.weight_hook, slot=slot)
                    self._handles.append(plist.register_forward_hook(hook))
        for name, m in modules.items():
            tracked = isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            if self.bn_rows == "clean" and tracked:  # before `stats`: it swaps back after
                rows = self._bn_rows_hooks
                pre, post = (functools.partial(h, name) for h in (rows.pre_hook, rows.post_hook))
                self._handles.append(m.register_forward_pre_hook(pre))
                self._handles.append(m.register_forward_hook(post, always_call=True))
            stats = self._stats_of(name)
            if stats is None:
                continue
            self._handles.append(m.register_forward_pre_hook(stats.pre_hook))
            self._handles.append(m.register_forward_hook(stats.post_hook, always_call=True))
        floor = self.input_bits
        grids = [g for q in self._all_quantizers() for g in q.act_grid]
        if floor is not None and any(g < floor for g in grids):
            ctx = self._ctx  # the model's own input: held for the layers' pre-hooks
            self._handles.append(
                self.model.register_forward_pre_hook(
                    ctx.record_input, with_kwargs=True, prepend=True
                )
            )
            self._handles.append(
                self.model.register_forward_hook(
                    ctx.forget_input, with_kwargs=True, always_call=True
                )
            )
        for name in self.layers:
            hook = functools.partial(self._taps.hook, name)
            self._handles.append(modules[name].register_forward_hook(hook))
        logits = functools.partial(_loss_logits_hook, self._ctx)
        self._handles.append(self.model.register_forward_hook(logits))

    def detach(self) -> None:
        """Remove every hook from the model; idempotent.

        Afterwards the model's outputs, ``state_dict()`` and hook dictionaries
        are exactly those of the unwrapped model, and this wrapper refuses to run.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._detached = True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def _check_attached(self) -> None:
        if self._detached:
            raise DetachedError("this TriQDefWrapper was detached; wrap the model again to use it")

    # --- bit-widths --------------------------------------------------------------------
    @property
    def current_bits(self) -> int:
        """The active bit-width (a mode, like ``training``: not saved in checkpoints)."""
        return self._bits

    def _check_bits_arg(self, bits) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in self.bits:
            raise ConfigError(f"bit-width {bits!r} is not one of this wrapper's bits {self.bits}")

    def set_bits(self, bits: int):
        """Make ``bits`` the active bit-width; returns ``self``.

        The bit-width is one mode of the whole wrapper, shared by every thread (its
        hooks also swap the shared weights during a forward), so a wrapper serves one
        thread at a time. While another thread is inside
        [`at_bits`][triqdef.TriQDefWrapper.at_bits],
        [`calibrate`][triqdef.TriQDefWrapper.calibrate] or
        [`loss`][triqdef.TriQDefWrapper.loss], this raises instead of switching that
        thread's bit-width under it; give each thread its own ``copy.deepcopy(wrapper)``.

        Raises:
            ConfigError: ``bits`` is not one of the wrapper's bit-widths.
            ConcurrentUseError: another thread holds the bit-width; nothing is changed.
        """
        self._check_bits_arg(bits)
        self._guard.check("set_bits", self._bits)
        self._bits = int(bits)
        self._ctx.index = self._ctx.qbits.index(bits) if bits < 32 else None
        return self

    @contextlib.contextmanager
    def at_bits(self, bits: int) -> Iterator:
        """Context manager: run at ``bits`` inside the block, restore the previous one after.

        The block holds the wrapper's bit-width for the calling thread: ``at_bits``,
        ``set_bits``, ``calibrate`` or ``loss`` from another thread meanwhile raises
        ``ConcurrentUseError`` (a ``RuntimeError``; it changes nothing) instead of
        running one thread at the other's bit-width. Nesting in one thread is fine, and
        so is a backward inside the block (even one the autograd engine runs on its own
        thread). A plain ``wrapper(x)`` is not checked: from another thread it runs at
        whatever bit-width is active. A wrapper is not thread-safe: give each thread
        its own ``copy.deepcopy(wrapper)``.

        Raises:
            ConfigError: ``bits`` is not one of the wrapper's bit-widths.
            ConcurrentUseError: another thread holds the bit-width.
        """
        self._check_bits_arg(bits)
        with self._guard.hold("at_bits", self._bits):
            previous = self._bits
            self.set_bits(bits)
            try:
                yield self
            finally:
                self.set_bits(previous)

    # --- observers ---------------------------------------------------------------------
    def quantized_layers(self) -> list[str]:
        """Names of the layers that are quantized below 32 bits."""
        return [n for n, _ in self.model.named_modules() if _key(n) in self.quantizers]

    def _layer_quantizers(self) -> list[LayerQuantizer]:
        """The quantizers in the order of ``quantized_layers()``."""
        return [self._quantizer(n) for n in self.quantized_layers()]

    def _quantizer(self, name: str) -> LayerQuantizer:
        """The quantizer of quantized layer ``name`` (`quantizers` holds nothing else)."""
        return cast(LayerQuantizer, self.quantizers[_key(name)])

    def _stats_of(self, name: str) -> BatchNormStats | None:
        """The per-bit statistics of layer ``name``; ``None`` if it has none
        (`bn_stats` holds nothing else)."""
        key = _key(name)
        return cast(BatchNormStats, self.bn_stats[key]) if key in self.bn_stats else None

    def _all_quantizers(self) -> list[LayerQuantizer]:
        """Every quantizer, in `quantizers`' order."""
        return [cast(LayerQuantizer, q) for q in self.quantizers.values()]

    def _all_bn_stats(self) -> list[BatchNormStats]:
        """Every per-bit BatchNorm statistics module, in `bn_stats`' order."""
        return [cast(BatchNormStats, s) for s in self.bn_stats.values()]

    def _observed(self) -> dict[str, list[bool]]:
        """Layer name -> whether its observers have seen data, per bit-width below 32."""
        k = len(self._ctx.qbits)
        return {
            n: [self._quantizer(n).calibrated(i) for i in range(k)] for n in self.quantized_layers()
        }

    def calibrated_bits(self) -> tuple[int, ...]:
        """Bit-widths whose observers have all seen data (32 bits needs none).

        Layers that never ran (see
        [`uncalled_layers`][triqdef.TriQDefWrapper.uncalled_layers]) do not count.
        A bit-width missing here raises
        [`NotCalibratedError`][triqdef.errors.NotCalibratedError] in evaluation until a
        training-mode forward at it or [`calibrate`][triqdef.TriQDefWrapper.calibrate].
        """
        rows = [row for row in self._observed().values() if any(row)]
        qbits = self._ctx.qbits
        ready = [bool(rows) and all(row[i] for row in rows) for i in range(len(qbits))]
        return tuple(b for b in self.bits if b == 32 or ready[qbits.index(b)])

    def uncalled_layers(self) -> list[str]:
        """Quantized layers that never ran: their observers have seen no data at any
        bit-width while other layers' have (e.g. an ``nn.Linear`` the model defines but
        its ``forward`` never calls).

        They do not hold back [`calibrated_bits`][triqdef.TriQDefWrapper.calibrated_bits]
        or [`export`][triqdef.TriQDefWrapper.export] (which leaves them in full
        precision, having no input range for them); ``calibrate`` and ``export`` warn
        once naming them. Keep such a layer out with ``exclude=[...]`` to silence the
        warning. Empty before any layer has seen data.
        """
        seen = {n: any(row) for n, row in self._observed().items()}
        return [n for n, s in seen.items() if not s] if any(seen.values()) else []

    def _warn_uncalled(self) -> list[str]:
        """Warn (once per set of layers) about layers that never ran; return them."""
        names = self.uncalled_layers()
        if names and tuple(names) != getattr(self, "_warned_uncalled", ()):
            self._warned_uncalled = tuple(names)
            warnings.warn(
                f"layers {names} never ran: their observers have seen no data at any "
                "bit-width while the other layers' have. calibrated_bits() ignores them and "
                "export() leaves them in full precision; call them in the model's forward, or "
                "keep them out with exclude=[...]",
                UserWarning,
                stacklevel=3,
            )
        return names

    @torch.no_grad()
    def calibrate(
        self, batches: Iterable, bits: Iterable[int] | None = None, observers: bool = True
    ) -> None:
        """Reset and re-estimate observers and BatchNorm statistics at ``bits``.

        Each batch (a tensor, or a tuple whose first item is the input) is run
        in training mode without gradients; BatchNorm statistics become the
        plain average over the batches. Weights are not touched. If anything
        fails, every statistic is restored to what it was. Finite batches whose
        activations overflow (e.g. ``x * 3e38``) fail the call when NaN or Inf reaches
        a quantized layer's input (its observers would skip that batch) or the
        BatchNorm statistics being estimated. Layers the batches never reach are
        reported once in a warning (see
        [`uncalled_layers`][triqdef.TriQDefWrapper.uncalled_layers]).

        Args:
            batches: an iterable of inputs, e.g. a few batches of a held-out loader.
            bits: bit-widths to calibrate (default: every bit-width below 32).
            observers: also reset and re-estimate the activation observers (default).
                With ``False`` only the BatchNorm statistics are re-estimated and every
                observer buffer is left exactly as it was; each of ``bits`` must then be
                calibrated already
                ([`calibrated_bits`][triqdef.TriQDefWrapper.calibrated_bits]).

        Raises:
            ConfigError: ``bits``, ``observers`` or ``batches`` is not valid.
            InputError: a batch is not a valid input, the model fails on it, or NaN or
                Inf reached a quantized layer's input or a BatchNorm statistic (the
                message names them).
            NotCalibratedError: ``observers=False`` for a bit-width whose observers
                have never seen data. Nothing is changed.
            ConcurrentUseError: another thread holds the bit-width. Nothing is changed.
        """
        self._check_attached()
        if not isinstance(observers, bool):
            raise ConfigError(f"observers must be True or False, got {observers!r}")
        try:
            targets = [b for b in (self._ctx.qbits if bits is None else bits)]
        except TypeError:
            raise ConfigError(f"bits must be a sequence of bit-widths, got {bits!r}") from None
        for b in targets:
            if isinstance(b, bool) or not isinstance(b, int) or b not in self.bits:
                raise ConfigError(f"bit-width {b!r} is not one of this wrapper's bits {self.bits}")
        missing = [] if observers else [b for b in targets if b not in self.calibrated_bits()]
        if missing:
            raise NotCalibratedError(
                f"calibrate(observers=False) keeps the observers, but those of {missing} bits "
                "have never seen data; calibrate them with observers=True first"
            )
        if not targets:  # e.g. a 32-bit-only wrapper: nothing to estimate
            return
        try:
            batches = [(b[0] if isinstance(b, (tuple, list)) else b) for b in batches]
        except TypeError:
            raise ConfigError(
                f"calibrate() needs an iterable of batches, got {batches!r}"
            ) from None
        if not batches:
            raise ConfigError("calibrate() got no batches")
        check_calibration_batches(self.model, batches)
        with self._guard.hold("calibrate", self._bits):
            self._calibrate(batches, targets, observers)
        self._warn_uncalled()

    def _calibrate(self, batches: list, targets: list[int], observers: bool) -> None:
        # everything but the model's parameters (observers, BatchNorm statistics, and the
        # learned step sizes, which a recalibration sets afresh)
        params = {f"model.{k}" for k, _ in self.model.named_parameters()}
        saved = {k: v.clone() for k, v in self.state_dict().items() if k not in params}
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        was_training, previous, observing = self.training, self._bits, self._ctx.observe
        names = {id(q): n for n, q in zip(self.quantized_layers(), self._layer_quantizers())}
        try:
            self.train()
            self._ctx.observe = observers  # False: the observers see nothing, move nothing
            self._ctx.finite_log = []
            for m in bns:
                m.momentum = None  # cumulative average over the calibration batches
                if 32 in targets or not self.bn_stats:  # the model's own statistics
                    m.reset_running_stats()
            for b in targets:
                self.set_bits(b)
                index = self._ctx.index  # set below 32 bits
                if b < 32 and index is not None:
                    resets: list[LayerQuantizer | BatchNormStats]
                    resets = [*self._all_quantizers()] if observers else []
                    for module in (*resets, *self._all_bn_stats()):
                        module.reset(index)
                for i, x in enumerate(batches):
                    try:
                        self.model(x)
                    except Exception as exc:  # the model rejects this input: say which
                        raise InputError(
                            f"calibrate: the model failed on batch {i} at {b} bits "
                            f"({type(exc).__name__}: {exc}); statistics restored"
                        ) from exc
                if observers and index is not None:  # learned steps: from all the batches
                    for q in self._all_quantizers():
                        q.step_from_observer(index)
                checks = [(f"input of {names[id(q)]!r}", ok) for q, _, ok in self._ctx.finite_log]
                self._ctx.finite_log.clear()
                bad = _failed(checks + self._bn_finite(b))
                if bad:
                    raise InputError(
                        f"calibrate: at {b} bits NaN or Inf came out of finite batches in: "
                        f"{', '.join(bad)}. The model's activations overflow (e.g. inputs "
                        "scaled far beyond the training data); calibrate with data like the "
                        "training data. Statistics restored"
                    )
        except BaseException:
            # the wrapper's own statistics: restore them without the value checks
            nn.Module.load_state_dict(self, saved, strict=False)
            raise
        finally:
            self._ctx.finite_log = None
            for m, mom in zip(bns, momenta):
                m.momentum = mom
            self._ctx.observe = observing
            self.train(was_training)
            self.set_bits(previous)

    def _bn_finite(self, bits: int) -> list[tuple[str, torch.Tensor]]:
        """``(label, all finite)`` for the BatchNorm statistics ``bits`` runs with."""
        out = []
        for name, m in self.model.named_modules():
            if not isinstance(m, nn.modules.batchnorm._BatchNorm):
                continue
            if m.running_mean is None or m.running_var is None:  # both, or neither
                continue
            stats = self._stats_of(name)
            if bits < 32 and stats is not None:
                i = self._ctx.qbits.index(bits)
                mean, var = stats.running_mean[i], stats.running_var[i]
            else:
                mean, var = m.running_mean, m.running_var
            ok = torch.isfinite(mean).all() & torch.isfinite(var).all()
            out.append((f"the BatchNorm statistics of {name!r}", ok))
        return out

    # --- state -------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Like ``nn.Module.load_state_dict``, but checks everything before copying anything.

        Keys (when ``strict``), types, shapes, dtypes and the values of observers and
        BatchNorm statistics are checked first, as
        [`check_state_dict`][triqdef.io.check_state_dict] describes: a tensor of another
        kind (an integer tensor for float weights), a value that is not a tensor, NaN/Inf
        observers or BatchNorm statistics, a negative running variance or an out-of-range
        observer kind is refused, so a failed load leaves the wrapper unchanged. Within
        a kind, dtypes are cast as ``nn.Module.load_state_dict`` does; with
        ``assign=True`` (the tensors become the wrapper's) they must match exactly.

        Args:
            state_dict (Mapping[str, torch.Tensor]): a mapping from keys of
                ``state_dict()`` to tensors.
            strict: require exactly this wrapper's keys.
            assign: keep the given tensors instead of copying into the existing ones.

        Returns:
            keys (NamedTuple): ``missing_keys`` and ``unexpected_keys``, as
                ``nn.Module.load_state_dict`` returns them (both empty when ``strict``).

        Raises:
            InputError: ``state_dict`` is not a mapping with str keys.
            CheckpointError: ``state_dict`` does not fit this wrapper; nothing is changed.
        """
        check_state_dict(self, state_dict, strict=strict, exact_dtype=bool(assign))
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # --- export ------------------------------------------------------------------------
    def export(self, bits: int) -> nn.Module:
        """A standalone copy of the model that runs at ``bits`` without any triqdef hook.

        The copy holds already-quantized weights, the ``bits``-bit BatchNorm
        statistics and fixed input quantizers
        ([`QuantizedInputs`][triqdef.export.QuantizedInputs]), is in eval mode,
        reproduces this wrapper's eval-mode output at ``bits`` and is accepted by
        ``torch.export.export``. Each layer keeps its own precision (``min_bits``,
        ``act_bits``) and, with ``quantizer="lsq"``, its learned step sizes as fixed
        scales. A layer that reads the model's own input gets the input grid of
        ``max(its grid, input_bits)`` bits (none at 32), as in the wrapper; the user's
        own hooks are kept. Parameters of the copy do not require grad.

        A weight computed by a parametrization (``weight_norm``, ``spectral_norm``, new
        or old style) is stored in the copy as a plain quantized parameter (its
        eval-mode value). Layers that never ran
        ([`uncalled_layers`][triqdef.TriQDefWrapper.uncalled_layers]) are left in full
        precision, with a warning. The wrapper is not modified.

        Raises:
            ConfigError: ``bits`` is not one of the wrapper's bit-widths.
            NotCalibratedError: the ``bits``-bit observers have never seen data, or
                ``bits < input_bits`` and no forward below 32 bits has shown which layer
                reads the model's input yet (after ``load_state_dict``; a file from
                [`triqdef.load`][triqdef.io.load] records it).
            DetachedError: the wrapper was detached.
        """
        self._check_attached()
        if isinstance(bits, bool) or bits not in self.bits:
            return self._quantized_copy(bits)  # its ConfigError
        idle = self._warn_uncalled() if bits < 32 else []
        computed = [
            (_weight_owner(self.model.get_submodule(n), path), n, path, pname)
            for n, q in zip(self.quantized_layers(), self._layer_quantizers())
            for path, pname in q.weights
        ]
        computed = [c for c in computed if weight_access(c[0], c[3]) != "parameter"]
        if not idle and not computed:
            return self._quantized_copy(bits)
        # An old-style weight_norm attribute computed with grad is not a leaf, which
        # deepcopy refuses: the copy gets its value (recomputed before any forward anyway).
        memo = {
            id(t): t.detach().clone()
            for owner, *_, pname in computed
            if isinstance(t := owner.__dict__.get(pname), torch.Tensor)
        }
        if bits == 32:  # the model as it is; only an old-style attribute needs the copy
            return (copy.deepcopy(self, memo) if memo else self)._quantized_copy(bits)
        twin = copy.deepcopy(self, memo)  # this wrapper stays as it is
        twin.model.eval()  # spectral_norm: the eval-mode weight, no power iteration
        for name in idle:  # no quantizer: left in full precision (its hooks go with export's)
            del twin.quantizers[_key(name)]
        for _, name, path, pname in computed:
            materialize(_weight_owner(twin.model.get_submodule(name), path), pname)
        return twin._quantized_copy(bits)

    def _quantized_copy(self, bits: int) -> nn.Module:
        """The export of this wrapper's layers as they are (see `quantized_copy`)."""
        self._check_attached()
        if isinstance(bits, bool) or bits not in self.bits:
            raise ConfigError(f"bit-width {bits!r} is not one of this wrapper's bits {self.bits}")
        index = self._ctx.qbits.index(bits) if bits < 32 else None
        quantizers = {n: self._quantizer(n) for n in self.quantized_layers()}
        bn_stats = {
            n: cast(BatchNormStats, self.bn_stats[_key(n)])
            for n, _ in self.model.named_modules()
            if _key(n) in self.bn_stats
        }
        owners = [*self.quantizers.values(), *self.bn_stats.values(), self._taps]
        owners += [self._ctx, self._bn_rows_hooks]
        hook_ids = {h.id for h in self._handles}
        return quantized_copy(
            self.model, bits, index, quantizers, bn_stats, self.input_bits, owners, hook_ids
        )
