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
* Per-layer precision: each `LayerQuantizer` holds, per bit-width row, the grid of
  its weights (``weight_grid``) and of its inputs (``act_grid``); by default both are
  that row's bit-width. ``min_bits`` and ``act_bits`` of the wrapper raise them (see
  [`TriQDefWrapper`][triqdef.TriQDefWrapper]); the observer row stays the active
  bit-width's, read on the layer's grid.
* Learned step sizes (``quantizer="lsq"``, LSQ, Esser et al. 2020): the scale of
  each grid above becomes a learnable step size
  ([`lsq_fake_quantize`][triqdef.quant.lsq_fake_quantize]), one per row, per output
  channel for weights and per tensor for activations.

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

import math
from collections.abc import Iterator, Sequence
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
    "lsq_grad_scale",
    "lsq_fake_quantize",
    "lsq_step",
    "LSQFakeQuantize",
    "LayerQuantizer",
    "BatchNormStats",
    "CleanRowsBatchNorm",
    "weight_access",
]

_UNSEEN, _UNSIGNED, _SIGNED = 0, 1, 2
_EPS = torch.finfo(torch.float32).eps
QUANTIZERS = ("minmax", "lsq")


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


# --- learned step sizes (LSQ) -----------------------------------------------------------------
def _along(step: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    """``step`` shaped to broadcast against ``x``: 0-dim per tensor, ``(C,)`` along ``axis``."""
    if axis is None:
        return step.reshape(())
    shape = [1] * x.ndim
    shape[axis] = -1
    return step.reshape(shape)


class _LSQ(torch.autograd.Function):
    """LSQ's quantize-dequantize with its gradients (Esser et al., 2020, eq. 3 and 5).

    Forward: ``clamp(round(x * (1 / s)), qmin, qmax) * s`` (``x * (1 / s)`` as torch's
    fused fake-quant ops compute it, so that a frozen export reproduces it bit for bit).
    Backward, with ``v = x / s``: ``dx = g`` where ``qmin <= v <= qmax``, else 0;
    ``ds = grad_scale * sum(g * c)`` over the elements that share ``s``, with ``c = qmin``
    below the grid, ``qmax`` above it and ``round(v) - v`` inside. The backward is made of
    differentiable ops, so a double backward (the gradient penalty's) goes through it.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        step: torch.Tensor,
        qmin: int,
        qmax: int,
        grad_scale: float,
        axis: int | None,
    ) -> torch.Tensor:
        s = _along(step, x, axis)
        ctx.save_for_backward(x, step)
        ctx.grid, ctx.grad_scale, ctx.axis = (qmin, qmax), grad_scale, axis
        return torch.round(x * (1.0 / s)).clamp_(qmin, qmax) * s

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        x, step = ctx.saved_tensors
        (qmin, qmax), axis = ctx.grid, ctx.axis
        v = x / _along(step, x, axis)
        below, above = v < qmin, v > qmax
        grad_x = grad_step = None
        if ctx.needs_input_grad[0]:
            grad_x = grad * ~(below | above)
        if ctx.needs_input_grad[1]:
            coef = torch.where(below, float(qmin), torch.where(above, float(qmax), v.round() - v))
            per = grad * coef
            if axis is None:
                summed = per.sum()
            else:
                summed = per.sum(dim=[d for d in range(x.ndim) if d != axis])
            grad_step = (summed * ctx.grad_scale).reshape(step.shape)
        return grad_x, grad_step, None, None, None, None


def lsq_grad_scale(x: torch.Tensor, bits: int, signed: bool, axis: int | None = None) -> float:
    """LSQ's gradient scale ``g = 1 / sqrt(N * Qp)`` for the step size of ``x``.

    ``Qp`` is the grid's largest code (``quant_range(bits, signed)[1]``); ``N`` is the
    number of elements one step size scales in one sample: ``x[0].numel()`` per tensor
    (the features of one sample, the batch being averaged by the loss; ``x.numel()`` for
    a tensor of fewer than 2 dimensions), ``x.numel() / x.shape[axis]`` per channel (the
    weights of one output channel).
    """
    if axis is not None:
        n = x.numel() // max(x.shape[axis], 1)
    else:
        n = x[0].numel() if x.ndim >= 2 else x.numel()
    return 1.0 / math.sqrt(max(n, 1) * quant_range(bits, signed)[1])


def lsq_fake_quantize(
    x: torch.Tensor,
    step: torch.Tensor,
    bits: int,
    signed: bool,
    axis: int | None = None,
    grad_scale: float | None = None,
) -> torch.Tensor:
    """Quantize-dequantize with a learnable step size (LSQ, Esser et al., 2020).

    ``out = clamp(round(x / step), qmin, qmax) * step`` on the grid of
    [`quant_range`][triqdef.quant.quant_range]. The gradient w.r.t. ``x`` is the clipped
    straight-through estimator (1 where ``qmin <= x / step <= qmax``, else 0); the
    gradient w.r.t. ``step`` is LSQ's: ``round(x / step) - x / step`` inside the grid,
    ``qmin`` / ``qmax`` where ``x`` was clipped, summed over the elements sharing the step
    and multiplied by ``grad_scale``. Supports double backward.

    Args:
        x: any shape (``(C, ...)`` for a per-channel weight).
        step: positive step size: 0-dim (or one element) per tensor, ``(x.shape[axis],)``
            per channel. Cast to ``x``'s dtype. Not checked here;
            [`LSQFakeQuantize`][triqdef.quant.LSQFakeQuantize] and the wrapper learn it
            in the log domain ([`lsq_step`][triqdef.quant.lsq_step]), so it is positive.
        bits: bit-width of the grid, 2 to 31.
        signed: signed narrow grid, or unsigned grid.
        axis: the channel dimension of a per-channel ``step``; ``None``: per tensor.
        grad_scale: multiplies the step's gradient; ``None``: LSQ's
            ``1 / sqrt(N * Qp)`` ([`lsq_grad_scale`][triqdef.quant.lsq_grad_scale]).

    Returns:
        Tensor like ``x`` whose entries are multiples of the step on the grid; an entry
        that is NaN or +-Inf in ``x`` is NaN, as in
        [`fake_quantize_activation`][triqdef.quant.fake_quantize_activation].

    Example:
        >>> x = torch.tensor([-1.0, 0.26, 0.4, 3.0])
        >>> lsq_fake_quantize(x, torch.tensor(0.25), 2, signed=False).tolist()
        [0.0, 0.25, 0.5, 0.75]
    """
    qmin, qmax = quant_range(bits, signed)
    scale = lsq_grad_scale(x, bits, signed, axis) if grad_scale is None else float(grad_scale)
    out = cast(torch.Tensor, _LSQ.apply(x, step.to(x.dtype), qmin, qmax, scale, axis))
    xd = x.detach()
    return out + (xd - xd)


class _LogStep(torch.autograd.Function):
    """``exp(log_step)``, whose gradient w.r.t. ``log_step`` is the step's gradient divided
    by the step (a positive preconditioning of the exact ``step * grad``): plain SGD then
    moves the step by LSQ's ``-lr * grad`` to first order, never past zero."""

    @staticmethod
    def forward(ctx: Any, log_step: torch.Tensor) -> torch.Tensor:
        step = log_step.exp()
        ctx.save_for_backward(step)
        return step

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (step,) = ctx.saved_tensors
        return grad / step


def lsq_step(log_step: torch.Tensor) -> torch.Tensor:
    """The step size a learnable ``log_step`` parameter holds: ``exp(log_step)``, at least
    float32 eps.

    The step is learned in the log domain so that it stays positive and an optimizer
    that normalises its updates (Adam) changes it by a relative amount: a step of an
    8-bit grid (about 1/255 of the range) would otherwise cross zero within a few Adam
    steps at a usual learning rate. The gradient passed to ``log_step`` is the step's
    gradient divided by the step, so that SGD moves the step as LSQ does, by
    ``-lr * dL/ds`` to first order.
    """
    return cast(torch.Tensor, _LogStep.apply(log_step)).clamp_min(_EPS)


class LSQFakeQuantize(nn.Module):
    """A fake quantizer with a learnable step size: the module twin of
    [`lsq_fake_quantize`][triqdef.quant.lsq_fake_quantize].

    The parameter is ``log_step``, the step's natural logarithm (see
    [`lsq_step`][triqdef.quant.lsq_step]); ``step`` reads the step size.

    Args:
        bits: bit-width of the grid, 2 to 31.
        signed: signed narrow grid (weights, signed activations) or unsigned grid.
        channels: ``None`` for one step per tensor, else the number of channels along
            ``axis`` (one step each).
        axis: the channel dimension (per-channel only).
        init: initial step size, positive.

    Shape:
        - Input: any shape; ``(..., channels, ...)`` with ``channels`` at ``axis``
          when per channel.
        - Output: same as the input.

    Example:
        >>> q = LSQFakeQuantize(4, signed=True, channels=3, init=0.1)
        >>> q(torch.randn(3, 5)).shape
        torch.Size([3, 5])
    """

    def __init__(
        self,
        bits: int,
        signed: bool = True,
        channels: int | None = None,
        axis: int = 0,
        init: float = 1.0,
    ) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 31:
            raise ConfigError(f"bits must be an int in [2, 31], got {bits!r}")
        if channels is not None and (
            isinstance(channels, bool) or not isinstance(channels, int) or channels < 1
        ):
            raise ConfigError(f"channels must be None or a positive int, got {channels!r}")
        if not isinstance(init, (int, float)) or not math.isfinite(init) or init <= 0:
            raise ConfigError(f"init must be a positive finite step size, got {init!r}")
        shape = () if channels is None else (channels,)
        self.log_step = nn.Parameter(torch.full(shape, math.log(init)))
        self.bits, self.signed, self.axis = bits, bool(signed), axis
        self.per_channel = channels is not None

    @property
    def step(self) -> torch.Tensor:
        """The step size(s), ``exp(log_step)`` (with gradient)."""
        return lsq_step(self.log_step)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, channels={tuple(self.log_step.shape)}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        axis = self.axis if self.per_channel else None
        return lsq_fake_quantize(x, self.step, self.bits, self.signed, axis)


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


@torch.no_grad()
def _weight_value(owner: nn.Module, name: str) -> torch.Tensor:
    """The current value of the weight ``name`` of ``owner``, without side effects: a
    ``torch.nn.utils.parametrize`` weight is computed with its parametrizations in eval
    mode (``spectral_norm`` runs no power iteration)."""
    access = weight_access(owner, name)
    if access == "parameter":
        return cast(torch.Tensor, owner._parameters[name])
    if access == "computed":
        return cast(torch.Tensor, owner.__dict__[name])
    plist = cast(nn.ModuleDict, owner.parametrizations)[name]
    was = plist.training
    plist.train(False)
    try:
        return cast(torch.Tensor, getattr(owner, name))
    finally:
        plist.train(was)


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
    ``max(grid, input_bits)`` bits (not at all at 32), with the same observer row.

    Per-layer precision (host side, fixed at construction): row ``i`` quantizes the
    weights on a ``weight_grid[i]``-bit grid and the inputs on an ``act_grid[i]``-bit
    grid (both ``ctx.qbits[i]`` by default; 32 leaves them unquantized). The observer
    row is row ``i`` whatever the grid: it sees the inputs of the model running at
    bit-width ``ctx.qbits[i]``, and the scale is read off its range on the layer's grid.

    With ``quantizer="lsq"`` (LSQ, Esser et al. 2020) the scales are learned instead,
    one row per bit-width, as natural logarithms (see [`lsq_step`][triqdef.quant.lsq_step]):

    * ``act_log_step``: ``(K,)`` parameter, the log step size of the inputs (per tensor);
    * ``weight_log_steps[j]``: ``(K, C_out_j)`` parameter, the log step sizes of weight
      ``j`` (per output channel).

    A row's steps are set when its observer sees its first finite batch: the input
    step to the observer's scale on the layer's grid, the weight steps to the current
    weights' ``max|w_c| / Qp`` (the min/max quantizer's scales), so that the first
    forward equals the min/max quantizer's (up to the float rounding of the logarithm);
    a row that has seen no data quantizes its weights with that min/max scale.
    [`calibrate`][triqdef.TriQDefWrapper.calibrate] (with ``observers=True``) sets the
    steps of the bit-widths it calibrates afresh, the input steps from the observers'
    average over its batches. The step's gradient carries LSQ's gradient scale
    ``1 / sqrt(N * Qp)`` (see [`lsq_grad_scale`][triqdef.quant.lsq_grad_scale]).

    Args:
        ctx: the wrapper's `BitContext`.
        weights: ``(submodule path, parameter name)`` pairs quantized per output
            channel when the layer runs (``("", "weight")`` for Conv/Linear).
        num_inputs: how many leading positional inputs are activation-quantized.
        momentum: weight of the new batch in the moving average.
        device: where the buffers live (the layer's device).
        weight_grid: bit-width of the weights' grid per row (default ``ctx.qbits``).
        act_grid: bit-width of the inputs' grid per row (default ``ctx.qbits``).
        quantizer: ``"minmax"`` (scales from the weights and the observers) or
            ``"lsq"`` (learned step sizes).
        channels: output channels of each of ``weights`` (needed for ``"lsq"``).
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
        *,
        weight_grid: Sequence[int] | None = None,
        act_grid: Sequence[int] | None = None,
        quantizer: str = "minmax",
        channels: Sequence[int] = (),
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
        self.weight_grid = tuple(ctx.qbits if weight_grid is None else weight_grid)
        self.act_grid = tuple(ctx.qbits if act_grid is None else act_grid)
        if len(self.weight_grid) != k or len(self.act_grid) != k:
            raise ConfigError(f"weight_grid and act_grid need one bit-width per row ({k})")
        if quantizer not in QUANTIZERS:
            raise ConfigError(f"quantizer must be one of {QUANTIZERS}, got {quantizer!r}")
        self.lsq = quantizer == "lsq"
        if self.lsq:
            if len(channels) != len(weights):
                raise ConfigError("quantizer='lsq' needs the output channels of every weight")
            self.act_log_step = nn.Parameter(torch.zeros(k, device=device))
            self.weight_log_steps = nn.ParameterList(
                [nn.Parameter(torch.zeros(k, c, device=device)) for c in channels]
            )

    def extra_repr(self) -> str:
        text = f"weights={[p if not m else f'{m}.{p}' for m, p in self.weights]}, " + (
            f"num_inputs={self.num_inputs}, momentum={self.momentum}"
        )
        if self.weight_grid != self._ctx.qbits:
            text += f", weight_grid={self.weight_grid}"
        if self.act_grid != self._ctx.qbits:
            text += f", act_grid={self.act_grid}"
        return text + (", quantizer='lsq'" if self.lsq else "")

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

    def _signed(self, index: int) -> bool:
        """Whether row ``index`` uses the signed grid; raises if it has never seen data."""
        kind = self._kind(index)
        if kind == _UNSEEN:
            raise NotCalibratedError(
                f"the {self._ctx.qbits[index]}-bit observers have never seen data; run a "
                "training-mode forward at that bit-width or wrapper.calibrate(batches) first"
            )
        return kind == _SIGNED

    def scale(self, index: int, bits: int | None = None) -> tuple[torch.Tensor, bool]:
        """``(scale, signed)`` of the input quantizer of bit-width number ``index``.

        ``bits`` sets the grid (default: that row's ``act_grid``); the observed range is
        the same. With ``quantizer="lsq"`` the scale is the learned step size of the row
        (detached, float32), whatever ``bits``.
        """
        signed = self._signed(index)
        if self.lsq:
            return lsq_step(self.act_log_step[index]).detach().float(), signed
        bits = self.act_grid[index] if bits is None else bits
        return activation_scale(self.act_min[index], self.act_max[index], bits, signed), signed

    def input_grid(self, index: int) -> int:
        """The grid of row ``index``'s inputs: ``act_grid[index]``, raised to the input
        floor (``BitContext.input_bits``) for a layer seen reading the model's input."""
        grid, floor = self.act_grid[index], self._ctx.input_bits
        return max(grid, floor) if floor is not None and self.reads_input else grid

    # --- learned step sizes --------------------------------------------------------------
    def _act_step(self, index: int) -> torch.Tensor:
        # a copy of the row (not a view of the parameter), so that initialising another
        # row in place later in the same graph leaves this row's saved tensors valid
        return lsq_step(self.act_log_step[index].clone())

    def _weight_step(self, index: int, slot: int) -> torch.Tensor:
        return lsq_step(self.weight_log_steps[slot][index].clone())

    @torch.no_grad()
    def step_from_observer(self, index: int, bits: int | None = None) -> None:
        """Set the input step size of row ``index`` to the observer's scale on the
        ``bits``-bit grid (default: [`input_grid`][triqdef.quant.LayerQuantizer.input_grid]);
        nothing for a row that has seen no data or for ``quantizer="minmax"``."""
        if not self.lsq or self._kind(index) == _UNSEEN:
            return
        grid = self.input_grid(index) if bits is None else bits
        signed = self._kind(index) == _SIGNED
        scale = activation_scale(self.act_min[index], self.act_max[index], min(grid, 31), signed)
        self.act_log_step[index] = scale.log().to(self.act_log_step.dtype)

    @torch.no_grad()
    def _init_weight_steps(self, module: nn.Module, index: int) -> None:
        """Set the weight step sizes of row ``index`` to the current weights' min/max scales."""
        bits = self.weight_grid[index]
        if bits >= 32:
            return
        for slot, (path, name) in enumerate(self.weights):
            w = _weight_value(module.get_submodule(path) if path else module, name)
            steps = self.weight_log_steps[slot]
            steps[index] = weight_scale(w, bits).log().to(steps.dtype)

    def quantize_weight(self, w: torch.Tensor, index: int, slot: int = 0) -> torch.Tensor:
        """Fake-quantize weight number ``slot`` (of ``weights``) for row ``index`` on its
        ``weight_grid`` (unchanged at 32): the learned steps with ``quantizer="lsq"`` once
        the row has seen data, else the min/max per-channel scale."""
        bits = self.weight_grid[index]
        if bits >= 32:
            return w
        if self.lsq and self._kind(index) != _UNSEEN:
            return lsq_fake_quantize(w, self._weight_step(index, slot), bits, True, axis=0)
        return fake_quantize_weight(w, bits)

    def weight_scales(self, w: torch.Tensor, index: int, slot: int = 0) -> torch.Tensor:
        """The ``(C_out,)`` float32 scales that
        [`quantize_weight`][triqdef.quant.LayerQuantizer.quantize_weight] uses for ``w`` at
        row ``index`` (``weight = codes * scale``); its grid must be below 32 bits."""
        if self.lsq and self._kind(index) != _UNSEEN:
            return self._weight_step(index, slot).detach().float()
        return weight_scale(w, self.weight_grid[index])

    def observe(self, x: torch.Tensor, index: int, bits: int | None = None) -> None:
        """Update the moving-average min/max of bit-width number ``index`` with ``x``.

        A batch holding NaN or +-Inf (its minimum or maximum is not finite) is
        skipped: the observer keeps what it had, so it never learns a non-finite
        value. After the first batch this costs no host synchronisation (the old
        value is selected on the device); the first batch, which decides the grid,
        synchronises once as before and leaves the observer unseen if it is not
        finite. With ``quantizer="lsq"`` the first finite batch also sets the row's
        input step size, on the ``bits``-bit grid (default: the row's ``act_grid``).
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
                if self.lsq:
                    self.step_from_observer(index, self.act_grid[index] if bits is None else bits)
            else:  # a non-finite batch moves nothing: lerp to the old value is exact
                old_lo, old_hi = self.act_min[index], self.act_max[index]
                old_lo.lerp_(torch.where(ok, lo, old_lo), self.momentum)
                old_hi.lerp_(torch.where(ok, hi, old_hi), self.momentum)

    def quantize_input(
        self, x: torch.Tensor, index: int, training: bool, bits: int | None = None
    ) -> torch.Tensor:
        """Observe (in training mode) and fake-quantize one input tensor.

        ``bits`` sets the grid (default: the row's ``act_grid``); at 32 the input
        is observed but passes unchanged. In training mode, an observer that has
        never seen finite data (its first batches held NaN or Inf) lets ``x`` pass
        unchanged instead of raising.
        """
        bits = self.act_grid[index] if bits is None else bits
        if training and self._ctx.observe:
            self.observe(x, index, bits)
            if self._kind(index) == _UNSEEN:  # only a non-finite first batch gets here
                return x
        if self.lsq:
            signed = self._signed(index)
            if bits >= 32:
                return x
            return lsq_fake_quantize(x, self._act_step(index), bits, signed)
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
        inputs = list(args)
        grid = self._input_grid(inputs, self.act_grid[index])
        fresh = self.lsq and self._kind(index) == _UNSEEN
        done: dict[int, torch.Tensor] = {}  # keeps `key is query` identity for attention
        for i in range(min(self.num_inputs, len(inputs))):
            x = inputs[i]
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                if id(x) not in done:
                    done[id(x)] = self.quantize_input(x, index, module.training, grid)
                inputs[i] = done[id(x)]
        if fresh and self._kind(index) != _UNSEEN:  # this row's first data: its weight steps
            self._init_weight_steps(module, index)
        swapped: list[tuple[dict, str, torch.Tensor]] = []
        self._stash.append(swapped)
        if self.weight_grid[index] >= 32:
            return tuple(inputs), kwargs
        for slot, (path, name) in enumerate(self.weights):
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
            where[name] = self.quantize_weight(w, index, slot)
        return tuple(inputs), kwargs

    def post_hook(self, module: nn.Module, args: tuple, kwargs: dict, output):
        """Forward hook (always called): put the shared weights back."""
        if self._stash:
            for where, name, w in self._stash.pop():
                where[name] = w
        return None

    def weight_hook(
        self, parametrization: nn.Module, args: tuple, output: torch.Tensor, *, slot: int = 0
    ):
        """Forward hook of a parametrized weight's ``ParametrizationList`` (weight number
        ``slot`` of ``weights``).

        While this layer's forward runs below 32 bits (between ``pre_hook`` and
        ``post_hook``), the weight the parametrization computes is returned
        fake-quantized; outside it (e.g. reading ``layer.weight`` between calls) it
        is left alone.
        """
        index = self._ctx.index
        if index is None or not self._stash or self.weight_grid[index] >= 32:
            return None
        return self.quantize_weight(output, index, slot)


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
    """Copies of every buffer of a module (observers, BatchNorm statistics), of its
    quantizers' host-side observer kinds and of their learned step sizes, restorable in
    place. A quantizer's step sizes are written back only if one of its rows was first
    observed in between (the only time a forward sets them), so a restore after a
    forward that initialised nothing leaves the parameters (and their autograd
    versions) alone."""

    def __init__(self, module: _Modular) -> None:
        self.saved = [(b, b.clone()) for b in module.buffers()]
        quantizers = [m for m in module.modules() if isinstance(m, LayerQuantizer)]
        self.kinds = [(q, list(q._kind_cache)) for q in quantizers]
        self.steps = {
            id(q): [p.detach().clone() for p in (q.act_log_step, *q.weight_log_steps)]
            for q in quantizers
            if q.lsq
        }

    def restore(self) -> None:
        with torch.no_grad():
            for b, v in self.saved:
                b.copy_(v)
            for q, kinds in self.kinds:
                if id(q) in self.steps and q._kind_cache != kinds:
                    params = (q.act_log_step, *q.weight_log_steps)
                    for p, v in zip(params, self.steps[id(q)]):
                        p.copy_(v)
        for q, kinds in self.kinds:
            q._kind_cache = kinds
