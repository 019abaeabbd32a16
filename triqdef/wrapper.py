"""`TriQDefWrapper`: one shared backbone, switchable bit-widths, inserted by hooks."""

from __future__ import annotations

import contextlib
import difflib
import functools
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import ConfigError, DetachedError, LayerNotFoundError
from .quant import BatchNormStats, BitContext, LayerQuantizer
from .taps import FeatureTaps

__all__ = ["TriQDefWrapper", "DEFAULT_BITS"]

DEFAULT_BITS = (32, 8, 5, 4, 2)
_QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _key(name: str) -> str:
    """Module-dict key for a layer name (dots are not allowed in module names)."""
    return name.replace(".", "/") if name else "<root>"


def _check_bits(bits: Iterable[int]) -> tuple[int, ...]:
    try:
        bits = tuple(bits)
    except TypeError:
        raise ConfigError(f"bits must be a sequence of integers, got {bits!r}") from None
    if not bits:
        raise ConfigError("bits is empty; give at least one bit-width, e.g. bits=(32, 8, 4)")
    for b in bits:
        if isinstance(b, bool) or not isinstance(b, int):
            raise ConfigError(f"bits must be integers, got {b!r} ({type(b).__name__}) in {bits}")
        if not 2 <= b <= 32:
            raise ConfigError(f"bit-width {b} is out of range: every bit-width must be in [2, 32]")
    dup = sorted({b for b in bits if bits.count(b) > 1})
    if dup:
        raise ConfigError(f"bits {bits} lists {dup} more than once")
    return tuple(sorted(bits, reverse=True))


def _check_names(model: nn.Module, names, what: str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    known = dict(model.named_modules())
    for name in names:
        if not isinstance(name, str):
            raise ConfigError(f"{what} must be layer names (str), got {name!r}")
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
            hint = f" Closest names: {close}." if close else ""
            raise LayerNotFoundError(
                f"{what} names {name!r}, which is not a module of {type(model).__name__}.{hint}"
                " List them all with [n for n, _ in model.named_modules()]."
            )
    return names


def _quant_points(model: nn.Module, exclude: tuple[str, ...]) -> dict[str, tuple]:
    """Map layer name -> (weights, num_inputs) for every layer to quantize."""

    def excluded(name: str) -> bool:
        return any(name == e or name.startswith(e + ".") or e == "" for e in exclude)

    points: dict[str, tuple] = {}
    owned: set[str] = set()  # out_proj of attention is evaluated by its parent, not called
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            owned.add(prefix + "out_proj")
            if excluded(name):
                continue
            inp = (
                (("", "in_proj_weight"),)
                if module._qkv_same_embed_dim
                else tuple(("", f"{c}_proj_weight") for c in "qkv")
            )
            points[name] = (inp + (("out_proj", "weight"),), 3)
        elif isinstance(module, _QUANTIZABLE) and name not in owned and not excluded(name):
            points[name] = ((("", "weight"),), 1)
    return points


class TriQDefWrapper(nn.Module):
    """Run one model at several bit-widths with one shared set of weights.

    Hooks are attached to the model you pass (no copy, no edit of its class):

    * every ``nn.Conv1d/2d/3d`` and ``nn.Linear`` (and ``nn.MultiheadAttention``'s
      projections) gets its weight fake-quantized per output channel and its input
      fake-quantized per tensor at the active bit-width (see :mod:`triqdef.quant`);
    * every BatchNorm layer keeps one set of running statistics per bit-width;
    * the layers named in ``layers`` are tapped for the perceptual penalties.

    At 32 bits no hook does anything: the output is bit-for-bit the bare model's.

    Args:
        model: any ``nn.Module``.
        bits: the bit-widths to support, each in [2, 32]; sorted high to low.
        layers: names (from ``model.named_modules()``) whose outputs are tapped.
        exclude: names of layers kept in full precision (a container excludes
            everything inside it).
        per_bit_bn: keep BatchNorm running statistics per bit-width (default).
            With ``False`` every bit-width shares the model's own statistics.
        momentum: weight of a new batch in the activation observers' moving average.

    Example:
        >>> net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        ...                     nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
        >>> w = TriQDefWrapper(net, bits=(32, 4), layers=["2"])
        >>> _ = w(torch.rand(8, 1, 8, 8))            # 32 bits: the bare model
        >>> with w.at_bits(4):
        ...     logits = w(torch.rand(8, 1, 8, 8))   # training mode: observers update
        >>> logits.shape
        torch.Size([8, 10])
        >>> w.detach()
    """

    def __init__(
        self,
        model: nn.Module,
        bits: Sequence[int] = DEFAULT_BITS,
        layers: Sequence[str] = (),
        exclude: Sequence[str] = (),
        *,
        per_bit_bn: bool = True,
        momentum: float = 0.1,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
        bits = _check_bits(bits)
        layers = _check_names(model, layers, "layers")
        exclude = _check_names(model, exclude, "exclude")
        if not 0.0 < float(momentum) <= 1.0:
            raise ConfigError(f"momentum must be in (0, 1], got {momentum}")
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

        super().__init__()
        self.model = model
        self.bits = bits
        self.layers = layers
        self.exclude = exclude
        self.per_bit_bn = bool(per_bit_bn)
        self._ctx = BitContext(tuple(b for b in bits if b < 32))
        self._bits = bits[0]
        self._detached = False
        self._taps = FeatureTaps(layers)
        self._handles: list = []
        self.quantizers = nn.ModuleDict(
            {
                _key(name): LayerQuantizer(self._ctx, weights, n, momentum)
                for name, (weights, n) in points.items()
            }
        )
        self.bn_stats = nn.ModuleDict()
        if self.per_bit_bn and self._ctx.qbits:
            for name, m in model.named_modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                    self.bn_stats[_key(name)] = BatchNormStats(self._ctx, m)
        self._attach(points)
        self.training = model.training  # the wrapper starts in the model's mode
        self.set_bits(bits[0])

    # --- hooks -------------------------------------------------------------------------
    def _attach(self, points: dict) -> None:
        modules = dict(self.model.named_modules())
        for name in points:
            q, m = self.quantizers[_key(name)], modules[name]
            self._handles.append(m.register_forward_pre_hook(q.pre_hook, with_kwargs=True))
            self._handles.append(
                m.register_forward_hook(q.post_hook, with_kwargs=True, always_call=True)
            )
        for name, m in modules.items():
            stats = self.bn_stats[_key(name)] if _key(name) in self.bn_stats else None
            if stats is None:
                continue
            self._handles.append(m.register_forward_pre_hook(stats.pre_hook))
            self._handles.append(m.register_forward_hook(stats.post_hook, always_call=True))
        for name in self.layers:
            hook = functools.partial(self._taps.hook, name)
            self._handles.append(modules[name].register_forward_hook(hook))

    def detach(self) -> None:
        """Remove every hook from the model; idempotent.

        Afterwards the model's outputs, ``state_dict()`` and hook dictionaries
        are exactly those of the unwrapped model, and this wrapper refuses to run.
        """
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._detached = True

    def __enter__(self) -> TriQDefWrapper:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # --- bit-widths --------------------------------------------------------------------
    @property
    def current_bits(self) -> int:
        """The active bit-width (a mode, like ``training``: not saved in checkpoints)."""
        return self._bits

    def set_bits(self, bits: int) -> TriQDefWrapper:
        """Make ``bits`` the active bit-width; returns ``self``.

        Raises:
            ConfigError: ``bits`` is not one of the wrapper's bit-widths.
        """
        if isinstance(bits, bool) or bits not in self.bits:
            raise ConfigError(f"bit-width {bits!r} is not one of this wrapper's bits {self.bits}")
        self._bits = int(bits)
        self._ctx.index = self._ctx.qbits.index(bits) if bits < 32 else None
        return self

    @contextlib.contextmanager
    def at_bits(self, bits: int) -> Iterator[TriQDefWrapper]:
        """Context manager: run at ``bits`` inside the block, restore the previous one after."""
        previous = self._bits
        self.set_bits(bits)
        try:
            yield self
        finally:
            self.set_bits(previous)

    # --- running -----------------------------------------------------------------------
    def _check_attached(self) -> None:
        if self._detached:
            raise DetachedError("this TriQDefWrapper was detached; wrap the model again to use it")

    def forward(self, *args, **kwargs):
        """Run the model at the active bit-width."""
        self._check_attached()
        return self.model(*args, **kwargs)

    def features(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Run the model at the active bit-width and return the tapped outputs.

        Returns:
            ``{layer name: output}`` for every name in ``layers``; nothing is kept
            after the call.
        """
        self._check_attached()
        with self._taps.capture():
            self.model(*args, **kwargs)
            return self._taps.pop()

    def quantized_layers(self) -> list[str]:
        """Names of the layers that are quantized below 32 bits."""
        return [n for n, _ in self.model.named_modules() if _key(n) in self.quantizers]

    @torch.no_grad()
    def calibrate(self, batches: Iterable, bits: Iterable[int] | None = None) -> None:
        """Reset and re-estimate observers and BatchNorm statistics at ``bits``.

        Each batch (a tensor, or a tuple whose first item is the input) is run
        in training mode without gradients; BatchNorm statistics become the
        plain average over the batches. Weights are not touched. If anything
        fails, every statistic is restored to what it was.

        Args:
            batches: an iterable of inputs, e.g. a few batches of a held-out loader.
            bits: bit-widths to calibrate (default: every bit-width below 32).
        """
        self._check_attached()
        targets = [b for b in (self._ctx.qbits if bits is None else bits)]
        for b in targets:
            if b not in self.bits:
                raise ConfigError(f"bit-width {b!r} is not one of this wrapper's bits {self.bits}")
        batches = [(b[0] if isinstance(b, (tuple, list)) else b) for b in batches]
        if not batches:
            raise ConfigError("calibrate() got no batches")
        params = {k for k, _ in self.named_parameters()}
        saved = {k: v.clone() for k, v in self.state_dict().items() if k not in params}
        bns = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        was_training, previous = self.training, self._bits
        try:
            self.train()
            for m in bns:
                m.momentum = None  # cumulative average over the calibration batches
                if 32 in targets or not self.bn_stats:  # the model's own statistics
                    m.reset_running_stats()
            for b in targets:
                self.set_bits(b)
                if b < 32:
                    for module in (*self.quantizers.values(), *self.bn_stats.values()):
                        module.reset(self._ctx.index)
                for x in batches:
                    self.model(x)
        except BaseException:
            self.load_state_dict(saved, strict=False)
            raise
        finally:
            for m, mom in zip(bns, momenta):
                m.momentum = mom
            self.train(was_training)
            self.set_bits(previous)

    def extra_repr(self) -> str:
        return (
            f"bits={self.bits}, current_bits={self._bits}, layers={list(self.layers)}, "
            f"exclude={list(self.exclude)}, per_bit_bn={self.per_bit_bn}"
            + (", detached" if self._detached else "")
        )

    # --- state -------------------------------------------------------------------------
    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Like ``nn.Module.load_state_dict``, but checks keys and shapes first.

        A mismatching ``state_dict`` raises :class:`~triqdef.errors.CheckpointError`
        before anything is copied, so a failed load leaves the wrapper unchanged.
        """
        from .io import check_state_dict

        check_state_dict(self, state_dict, strict=strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def export(self, bits: int) -> nn.Module:
        """A standalone copy of the model that runs at ``bits`` without any triqdef hook.

        The copy holds already-quantized weights, the ``bits``-bit BatchNorm
        statistics and fixed input quantizers, is in eval mode, reproduces this
        wrapper's eval-mode output at ``bits`` and is accepted by
        ``torch.export.export``. See :func:`triqdef.export.export_model`.
        """
        from .export import export_model

        return export_model(self, bits)
