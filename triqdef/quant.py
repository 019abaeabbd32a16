"""Fake quantizers, observers, per-bit state, and which layers of a model get them.

Everything that decides *how* a tensor is quantized lives here, and which layers
are quantized (`_quant_points`); the wrapper only decides *when* (which
bit-width is active).

Grids (zero-point fixed at 0 everywhere):

* Weights, per output channel, signed narrow range
  ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` with ``scale = max|w_c| / (2^(b-1) - 1)``.
  At 2 bits that is the ternary grid ``{-1, 0, 1}``: symmetric, so a weight
  and its negation quantize to mirror images.
* Activations (a layer's input), per tensor. A tensor whose first observed
  batch is non-negative (post-ReLU features, images in ``[0, 1]``) uses the
  unsigned range ``[0, 2^b - 1]`` with ``scale = max / (2^b - 1)``; any other
  tensor uses the signed narrow range above with
  ``scale = max(|min|, |max|) / (2^(b-1) - 1)``. The choice is made once, at
  the first observation, and kept.
* 32 bits is the identity: no quantizer runs at all.
* The model's own input, read by a layer, uses the grid of ``max(bits, input_bits)``
  bits (``BitContext.input_bits``; none at 32), with the same observer.

The straight-through estimator comes from PyTorch's fused fake-quant ops:
the gradient is 1 where the value fell inside the grid's range and 0 where it
was clipped, and the op supports double backward.

Non-finite values: the activation quantizer turns NaN and +-Inf entries into
NaN (the fused op alone would clamp them onto the grid and hide them), so a NaN
or Inf input never gives a finite output, at no host synchronisation. An
observer never learns a non-finite value: a batch whose minimum or maximum is
NaN or +-Inf leaves it as it was (see
[`LayerQuantizer.observe`][triqdef.quant.LayerQuantizer.observe]).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, cast

import torch
from torch import nn
from torch.nn.utils import parametrize

from ._bnstats import BatchNormStats, CleanRowsBatchNorm
from .errors import ConfigError, NotCalibratedError

__all__ = [
    "quant_range",
    "weight_scale",
    "fake_quantize_weight",
    "activation_scale",
    "fake_quantize_activation",
    "LayerQuantizer",
    "BatchNormStats",
    "CleanRowsBatchNorm",
    "weight_access",
]

_UNSEEN, _UNSIGNED, _SIGNED = 0, 1, 2
_EPS = torch.finfo(torch.float32).eps


def quant_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of the grid used at ``bits`` bits.

    Args:
        bits: bit-width, 2 to 31.
        signed: signed narrow range when True, unsigned range when False.

    Returns:
        ``(quant_min, quant_max)``.

    Example:
        >>> quant_range(2, signed=True), quant_range(2, signed=False)
        ((-1, 1), (0, 3))
    """
    if signed:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def weight_scale(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scale of a weight at ``bits`` bits.

    Args:
        weight: ``(C_out, ...)`` weight tensor.
        bits: bit-width.

    Returns:
        ``(C_out,)`` float32 scales, at least float32 eps.
    """
    amax = weight.detach().abs().flatten(1).amax(dim=1)
    return (amax.float() / quant_range(bits, True)[1]).clamp_min(_EPS)


def fake_quantize_weight(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize-dequantize a weight per output channel (signed narrow grid, STE).

    Args:
        weight: ``(C_out, ...)`` weight tensor.
        bits: bit-width, 2 to 31.

    Returns:
        Tensor of the same shape and dtype whose channel ``c`` takes at most
        ``2^bits - 1`` distinct values, all multiples of that channel's scale.

    Example:
        >>> w = torch.tensor([[0.9, -0.2, 0.5, -0.6]])
        >>> tuple(round(v, 4) for v in fake_quantize_weight(w, 2)[0].tolist())  # ternary
        (0.9, 0.0, 0.9, -0.9)
    """
    scale = weight_scale(weight, bits)
    zero = torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
    qmin, qmax = quant_range(bits, True)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero, 0, qmin, qmax)


def activation_scale(lo: torch.Tensor, hi: torch.Tensor, bits: int, signed: bool) -> torch.Tensor:
    """Per-tensor scale from observed ``min``/``max`` (0-dim tensors)."""
    amax = torch.maximum(-lo, hi) if signed else hi.clamp_min(0)
    return (amax.float() / quant_range(bits, signed)[1]).clamp_min(_EPS)


def fake_quantize_activation(
    x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool
) -> torch.Tensor:
    """Quantize-dequantize a tensor with one scale (STE).

    Args:
        x: any shape.
        scale: 0-dim or ``(1,)`` scale.
        bits: bit-width.
        signed: which grid (see [`quant_range`][triqdef.quant.quant_range]).

    Returns:
        Tensor like ``x`` with at most ``2^bits`` distinct finite values; an entry
        that is NaN or +-Inf in ``x`` is NaN (no host synchronisation), so a
        non-finite input never becomes a finite grid value. The gradient of a
        finite entry is the clipped straight-through estimator, exactly as without
        that rule.
    """
    qmin, qmax = quant_range(bits, signed)
    zero = torch.zeros((), dtype=torch.int32, device=x.device)
    out = torch.fake_quantize_per_tensor_affine(x, scale.reshape(()), zero, qmin, qmax)
    # x - x is 0 where x is finite and NaN where it is not; as a constant it adds no
    # autograd node and saves nothing for backward (cheaper than torch.where + mask).
    xd = x.detach()
    return out + (xd - xd)


def weight_access(owner: nn.Module, name: str) -> str | None:
    """How the layer ``owner`` holds its weight ``name``, as the quantizer swaps it.

    Returns:
        ``"parameter"``: a plain ``nn.Parameter`` in ``owner._parameters``;
        ``"parametrized"``: computed by ``torch.nn.utils.parametrize`` (e.g.
        ``torch.nn.utils.parametrizations.weight_norm`` / ``spectral_norm``);
        ``"computed"``: a tensor attribute recomputed before every forward by a
        forward pre-hook object with ``.name == name`` and a ``remove(module)``
        method (the older ``torch.nn.utils.weight_norm`` / ``spectral_norm``);
        ``None``: none of these (the layer cannot be quantized).
    """
    if owner._parameters.get(name) is not None:
        return "parameter"
    if parametrize.is_parametrized(owner, name):
        return "parametrized"
    if isinstance(owner.__dict__.get(name), torch.Tensor) and _recomputing_hook(owner, name):
        return "computed"
    return None


def _recomputing_hook(owner: nn.Module, name: str):
    """The forward pre-hook object that recomputes ``owner.<name>`` (old-style weight_norm)."""
    for key, hook in owner._forward_pre_hooks.items():
        if getattr(hook, "name", None) == name and callable(getattr(hook, "remove", None)):
            return key, hook
    return None


class BitContext:
    """Which bit-width is active; one instance is shared by all hooks of a wrapper.

    ``index`` is the position in ``qbits`` (the bit-widths below 32), or ``None``
    when 32 bits (the identity) is active. ``observe=False`` freezes every
    observer (used while a memory-bounded backward replays a forward pass, and by
    ``calibrate(observers=False)``).

    ``input_bits`` is the floor of the grid of the model's own input (``None``: no
    floor); while a forward of the whole model runs, ``record_input`` holds its
    tensor arguments so that a layer can tell whether it reads them
    (``is_input``). ``rows`` is ``(n_clean, n_total)`` while the objective runs
    a mixed batch whose first ``n_clean`` rows are clean, else ``None``.

    ``finite_log`` is ``None``, or a list to which every observation appends
    ``(quantizer, index, ok)`` with ``ok`` a 0-dim bool tensor (on the device) saying
    whether the batch was finite; ``calibrate`` reads it with one synchronisation.
    """

    __slots__ = ("qbits", "index", "observe", "input_bits", "rows", "finite_log", "_inputs")

    def __init__(self, qbits: tuple[int, ...], input_bits: int | None = None) -> None:
        self.qbits = qbits
        self.index: int | None = None
        self.observe = True
        self.input_bits = input_bits
        self.rows: tuple[int, int] | None = None
        self.finite_log: list[tuple[LayerQuantizer, int, torch.Tensor]] | None = None
        self._inputs: dict[int, tuple[torch.Tensor, ...]] = {}

    def __getstate__(self) -> dict:
        return {"qbits": self.qbits, "index": self.index, "input_bits": self.input_bits}

    def __setstate__(self, state: dict) -> None:
        BitContext.__init__(self, state["qbits"], state.get("input_bits"))
        self.index = state["index"]

    def record_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the root model: hold its tensor arguments (below 32 bits)."""
        if self.index is not None and self.input_bits is not None:
            tensors = (*args, *kwargs.values())
            self._inputs[id(module)] = tuple(t for t in tensors if isinstance(t, torch.Tensor))
        return None

    def forget_input(self, module: nn.Module, args: tuple, kwargs: dict, output) -> None:
        """Forward hook of the root model (always called): drop what it held."""
        self._inputs.pop(id(module), None)
        return None

    def inside_model(self) -> bool:
        """Whether a forward of the whole model is running (below 32 bits)."""
        return bool(self._inputs)

    def is_input(self, x) -> bool:
        """Whether ``x`` is (the very object of) one of the model's own inputs."""
        return any(x is t for ts in self._inputs.values() for t in ts)


class LayerQuantizer(nn.Module):
    """Per-bit quantization state of one quantized layer and the hooks that apply it.

    Buffers (one row per bit-width below 32, in the wrapper's order):

    * ``act_min``, ``act_max``: ``(K,)`` moving-average min/max of the layer's input.
    * ``act_kind``: ``(K,)`` uint8; 0 = never observed, 1 = unsigned grid, 2 = signed grid.

    Weights need no buffer: their per-channel scale is read off the current
    shared weight at every call, so it always matches the weights being trained.
    A weight is swapped for its quantized value for the duration of the layer's
    forward: a plain ``nn.Parameter`` in the layer's parameter dict, a tensor
    attribute recomputed by an old-style ``torch.nn.utils.weight_norm`` /
    ``spectral_norm`` pre-hook, or, for a ``torch.nn.utils.parametrize``
    parametrization (``parametrizations.weight_norm``, ``spectral_norm``, ...), the
    value the parametrization computes, through
    [`weight_hook`][triqdef.quant.LayerQuantizer.weight_hook] (see ``weight_access``).

    ``reads_input`` (host side, not a buffer) says whether the layer was seen
    reading the model's own input: ``None`` until a forward of the whole model ran
    below 32 bits with an input-grid floor (``BitContext.input_bits``), then
    ``True`` once it has read it. Such a layer quantizes its inputs at
    ``max(bits, input_bits)`` bits (not at all at 32), with the same observer row.

    Args:
        ctx: the wrapper's `BitContext`.
        weights: ``(submodule path, parameter name)`` pairs quantized per output
            channel when the layer runs (``("", "weight")`` for Conv/Linear).
        num_inputs: how many leading positional inputs are activation-quantized.
        momentum: weight of the new batch in the moving average.
        device: where the buffers live (the layer's device).
    """

    act_min: torch.Tensor
    act_max: torch.Tensor
    act_kind: torch.Tensor

    def __init__(
        self,
        ctx: BitContext,
        weights: tuple[tuple[str, str], ...] = (("", "weight"),),
        num_inputs: int = 1,
        momentum: float = 0.1,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        k = len(ctx.qbits)
        self.register_buffer("act_min", torch.zeros(k, device=device))
        self.register_buffer("act_max", torch.zeros(k, device=device))
        self.register_buffer("act_kind", torch.zeros(k, dtype=torch.uint8, device=device))
        self._ctx = ctx
        self.weights = weights
        self.num_inputs = num_inputs
        self.momentum = momentum
        self._kind_cache: list[int | None] = [None] * k
        self._stash: list[list[tuple[dict, str, torch.Tensor]]] = []  # (dict, name, shared)
        self.reads_input: bool | None = None

    def extra_repr(self) -> str:
        return f"weights={[p if not m else f'{m}.{p}' for m, p in self.weights]}, " + (
            f"num_inputs={self.num_inputs}, momentum={self.momentum}"
        )

    # --- state -----------------------------------------------------------------------
    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._kind_cache = [None] * len(self._kind_cache)

    def reset(self, index: int) -> None:
        """Forget what the observers of bit-width number ``index`` have seen."""
        with torch.no_grad():
            self.act_min[index] = 0
            self.act_max[index] = 0
            self.act_kind[index] = _UNSEEN
        self._kind_cache[index] = None

    def calibrated(self, index: int) -> bool:
        """Whether the observers of bit-width number ``index`` have seen data."""
        return self._kind(index) != _UNSEEN

    def _kind(self, index: int) -> int:
        kind = self._kind_cache[index]
        if kind is None:  # read once from the buffer, then mirrored on the host
            kind = int(self.act_kind[index])
            if kind != _UNSEEN:
                self._kind_cache[index] = kind
        return kind

    def scale(self, index: int, bits: int | None = None) -> tuple[torch.Tensor, bool]:
        """``(scale, signed)`` of the input quantizer of bit-width number ``index``.

        ``bits`` sets the grid (default: that bit-width); the observed range is the same.
        """
        kind = self._kind(index)
        if kind == _UNSEEN:
            raise NotCalibratedError(
                f"the {self._ctx.qbits[index]}-bit observers have never seen data; run a "
                "training-mode forward at that bit-width or wrapper.calibrate(batches) first"
            )
        signed = kind == _SIGNED
        bits = self._ctx.qbits[index] if bits is None else bits
        return activation_scale(self.act_min[index], self.act_max[index], bits, signed), signed

    def observe(self, x: torch.Tensor, index: int) -> None:
        """Update the moving-average min/max of bit-width number ``index`` with ``x``.

        A batch holding NaN or +-Inf (its minimum or maximum is not finite) is
        skipped: the observer keeps what it had, so it never learns a non-finite
        value. After the first batch this costs no host synchronisation (the old
        value is selected on the device); the first batch, which decides the grid,
        synchronises once as before and leaves the observer unseen if it is not
        finite.
        """
        with torch.no_grad():
            lo, hi = torch.aminmax(x.detach())
            lo, hi = lo.to(self.act_min.dtype), hi.to(self.act_max.dtype)
            ok = torch.isfinite(lo) & torch.isfinite(hi)
            log = self._ctx.finite_log
            if log is not None:
                log.append((self, index, ok))
            if self._kind(index) == _UNSEEN:  # first batch: take it as is, pick the grid
                negative, finite = torch.stack([lo < 0, ok]).tolist()
                if not finite:
                    return
                kind = _SIGNED if negative else _UNSIGNED
                self.act_min[index] = lo
                self.act_max[index] = hi
                self.act_kind[index] = kind
                self._kind_cache[index] = kind
            else:  # a non-finite batch moves nothing: lerp to the old value is exact
                old_lo, old_hi = self.act_min[index], self.act_max[index]
                old_lo.lerp_(torch.where(ok, lo, old_lo), self.momentum)
                old_hi.lerp_(torch.where(ok, hi, old_hi), self.momentum)

    def quantize_input(
        self, x: torch.Tensor, index: int, training: bool, bits: int | None = None
    ) -> torch.Tensor:
        """Observe (in training mode) and fake-quantize one input tensor.

        ``bits`` sets the grid (default: bit-width number ``index``); at 32 the input
        is observed but passes unchanged. In training mode, an observer that has
        never seen finite data (its first batches held NaN or Inf) lets ``x`` pass
        unchanged instead of raising.
        """
        if training and self._ctx.observe:
            self.observe(x, index)
            if self._kind(index) == _UNSEEN:  # only a non-finite first batch gets here
                return x
        bits = self._ctx.qbits[index] if bits is None else bits
        scale, signed = self.scale(index, bits)
        if bits >= 32:
            return x
        return fake_quantize_activation(x, scale, bits, signed)

    def _input_grid(self, args: list, bits: int) -> int:
        """The grid of this call's inputs: ``bits``, or the input floor for a layer that
        reads the model's own input (recorded in ``reads_input``)."""
        ctx = self._ctx
        if ctx.input_bits is None or not ctx.inside_model():
            return bits
        n = min(self.num_inputs, len(args))
        if any(ctx.is_input(args[i]) for i in range(n)):
            self.reads_input = True
            return max(bits, ctx.input_bits)
        if self.reads_input is None:
            self.reads_input = False
        return bits

    # --- hooks -----------------------------------------------------------------------
    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        """Forward pre-hook: quantize the inputs, swap in quantized weights."""
        index = self._ctx.index
        if index is None:
            return None
        bits = self._ctx.qbits[index]
        inputs = list(args)
        grid = self._input_grid(inputs, bits)
        done: dict[int, torch.Tensor] = {}  # keeps `key is query` identity for attention
        for i in range(min(self.num_inputs, len(inputs))):
            x = inputs[i]
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                if id(x) not in done:
                    done[id(x)] = self.quantize_input(x, index, module.training, grid)
                inputs[i] = done[id(x)]
        swapped: list[tuple[dict, str, torch.Tensor]] = []
        self._stash.append(swapped)
        for path, name in self.weights:
            owner = module.get_submodule(path) if path else module
            # the parameter dict or the instance dict; `weight_access` checked that the entry
            # is a tensor either way (a parameter is never None here)
            where: dict[str, Any]
            if name in owner._parameters:
                where = cast("dict[str, Any]", owner._parameters)
            elif name in owner.__dict__:  # recomputed by an old-style weight_norm pre-hook
                where = owner.__dict__
            else:  # torch.nn.utils.parametrize: quantized by `weight_hook`
                continue
            w = where[name]
            swapped.append((where, name, w))
            where[name] = fake_quantize_weight(w, bits)
        return tuple(inputs), kwargs

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        """Forward hook (always called): put the shared weights back."""
        if self._stash:
            for where, name, w in self._stash.pop():
                where[name] = w
        return None

    def weight_hook(self, parametrization: nn.Module, args: tuple, output: torch.Tensor):
        """Forward hook of a parametrized weight's ``ParametrizationList``.

        While this layer's forward runs below 32 bits (between ``pre_hook`` and
        ``post_hook``), the weight the parametrization computes is returned
        fake-quantized; outside it (e.g. reading ``layer.weight`` between calls) it
        is left alone.
        """
        index = self._ctx.index
        if index is None or not self._stash:
            return None
        return fake_quantize_weight(output, self._ctx.qbits[index])


# --- which layers are quantized ------------------------------------------------------------
_QUANTIZABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _key(name: str) -> str:
    """Module-dict key for a layer name (dots are not allowed in module names)."""
    return name.replace(".", "/") if name else "<root>"


def _weight_owner(layer: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path`` inside ``layer`` that holds a quantized weight."""
    return layer.get_submodule(path) if path else layer


def _device_of(module: nn.Module) -> torch.device | None:
    """The device of a module's first parameter (its buffers follow it)."""
    p = next(module.parameters(), None)
    return None if p is None else p.device


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


def _check_weights(model: nn.Module, points: dict[str, tuple]) -> None:
    """Raise ConfigError for a layer whose weight the quantizer cannot swap."""
    modules = dict(model.named_modules())
    for name, (weights, _) in points.items():
        for path, pname in weights:
            owner = _weight_owner(modules[name], path)
            if weight_access(owner, pname) is None:
                full = f"{name}.{path}" if path else name
                raise ConfigError(
                    f"layer {full!r} ({type(owner).__name__}) holds its {pname!r} neither as an "
                    "nn.Parameter, nor through torch.nn.utils.parametrize, nor as an old-style "
                    "torch.nn.utils.weight_norm/spectral_norm attribute, so it cannot be "
                    f"quantized; keep it in full precision with exclude=[{name!r}]"
                )


# --- state that a failed step must not change ------------------------------------------------
class _Modular(Protocol):
    """What `_Snapshot` reads of a module (or of the objective's ``Wrapper`` protocol)."""

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]: ...
    def modules(self) -> Iterator[nn.Module]: ...


class _Snapshot:
    """Copies of every buffer of a module (observers, BatchNorm statistics) and of its
    quantizers' host-side observer kinds, restorable in place."""

    def __init__(self, module: _Modular) -> None:
        self.saved = [(b, b.clone()) for b in module.buffers()]
        quantizers = [m for m in module.modules() if isinstance(m, LayerQuantizer)]
        self.kinds = [(q, list(q._kind_cache)) for q in quantizers]

    def restore(self) -> None:
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)
        for q, kinds in self.kinds:
            q._kind_cache = kinds
