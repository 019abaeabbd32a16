"""ONNX export: a QDQ model of one bit-width that onnxruntime runs as the wrapper does.

[`export_onnx`][triqdef.onnx_export.export_onnx] exports
[`TriQDefWrapper.export`][triqdef.TriQDefWrapper.export]'s copy with
``torch.onnx.export`` (the TorchScript exporter, ``dynamo=False``) after swapping each
quantized layer for a module whose frozen quantizers emit ONNX's quantization ops:

* weights: integer codes (an int8 initializer) followed by ``DequantizeLinear``
  (per output channel, ``axis=0``, zero-point 0), so ``weight = codes * scale``;
* the layer's input: ``QuantizeLinear`` -> ``DequantizeLinear`` with one scale and
  zero-point 0, int8 for the signed narrow grid and uint8 for the unsigned grid.

Grids that do not fill the 8-bit type (every signed grid, whose range
``[-(2^(b-1) - 1), 2^(b-1) - 1]`` never reaches -128, and the unsigned grids below
8 bits) get a ``Clip`` to the grid on the integer tensor between ``QuantizeLinear``
and ``DequantizeLinear``, as Brevitas' QCDQ format does. The graph then computes
exactly the wrapper's values at every bit-width from 2 to 8 with the opsets that
onnxruntime supports everywhere (13 and above), instead of relying on INT4/UINT4
(opset 21), which cannot express 5 bits, the 2-bit unsigned grid or the narrow
signed ranges anyway.

With ``integer=True`` the written graph is then rewritten for onnxruntime's integer
kernels (BatchNorm folded, int32 biases, each layer's output requantized onto the next
layer's input grid where that is exact); the rewrite lives in ``_onnx_integer``.

``onnx`` and ``onnxruntime`` are optional (``pip install triqdef[onnx]``); this
module imports without them, and ``onnx`` is imported on the first call.

The model's input size is fixed by ``example_input`` except for the batch dimension;
an ``nn.AdaptiveAvgPool2d`` whose output size does not divide the traced input size
(SmallCNN's 7x7 -> 2x2) is written as slices and means, which the TorchScript
exporter accepts.
"""

from __future__ import annotations

import importlib
import io
import os
import warnings
from typing import Any, Union, cast

import torch
from torch import nn
from torch.nn import functional as F

from ._export import QuantizedInputs
from ._onnx_integer import to_integer
from .errors import ConfigError, InputError
from .quant import fake_quantize_activation, quant_range
from .wrapper import TriQDefWrapper

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["export_onnx", "DEFAULT_OPSET"]

DEFAULT_OPSET = 17
"""Opset used when ``opset=None`` (per-axis ``DequantizeLinear`` needs 13 or above)."""

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _InputQDQ(torch.autograd.Function):
    """Per-tensor fake quantization whose ONNX form is Q -> (Clip) -> DQ."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: torch.Tensor, bits: int, signed: bool):
        return fake_quantize_activation(x, scale, bits, signed)

    @staticmethod
    def symbolic(g: Any, x: Any, scale: Any, bits: int, signed: bool) -> Any:
        dtype = torch.int8 if signed else torch.uint8
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=dtype))
        q = g.op("QuantizeLinear", x, scale, zero)
        qmin, qmax = quant_range(bits, signed)
        info = torch.iinfo(dtype)
        if (qmin, qmax) != (info.min, info.max):
            lo = g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype))
            hi = g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype))
            q = g.op("Clip", q, lo, hi)
        out = g.op("DequantizeLinear", q, scale, zero)
        out.setType(x.type())
        return out


class _WeightDQ(torch.autograd.Function):
    """Integer weight codes times per-output-channel scales, as ``DequantizeLinear``."""

    @staticmethod
    def forward(ctx: Any, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return codes.float() * scale.reshape(-1, *([1] * (codes.ndim - 1)))

    @staticmethod
    def symbolic(g: Any, codes: Any, scale: Any) -> Any:
        channels = codes.type().sizes()[0]
        zero = g.op("Constant", value_t=torch.zeros(channels, dtype=torch.int8))
        return g.op("DequantizeLinear", codes, scale, zero, axis_i=0)


class _QDQLayer(nn.Module):
    """A Conv/Linear layer of the exported copy, with ONNX-exportable quantizers.

    ``scale``: the ``(C_out,)`` scales the exported weight was made with (codes =
    weight / scale); ``None`` for a layer whose weights stay in full precision
    (``min_bits`` of 32), which keeps its float weight.

    Shape:
        - Input: what ``layer`` takes.
        - Output: what ``layer`` returns.
    """

    weight_codes: torch.Tensor | None
    weight_scale: torch.Tensor | None
    input_scale: torch.Tensor

    def __init__(self, wrapped: QuantizedInputs, scale: torch.Tensor | None) -> None:
        super().__init__()
        layer: Any = wrapped.layer  # a Conv1d/2d/3d or Linear (`_onnx_ready` checked)
        self.register_buffer("input_scale", wrapped.input_scale.detach().float().clone())
        codes = None
        if scale is not None:
            quantized = layer.weight.detach().float().cpu()
            scale = scale.detach().float().cpu()
            view = scale.reshape(-1, *([1] * (quantized.ndim - 1)))
            codes = torch.round(quantized / view).to(torch.int8)
            del layer._parameters["weight"]
            layer.weight = None  # read from the codes instead
        self.register_buffer("weight_codes", codes)
        self.register_buffer("weight_scale", scale)
        self.layer = layer
        self.bits, self.signed = wrapped.bits, wrapped.signed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits < 32:
            x = _InputQDQ.apply(x, self.input_scale, self.bits, self.signed)
        if self.weight_codes is None or self.weight_scale is None:
            return self.layer(x)
        w = _WeightDQ.apply(self.weight_codes, self.weight_scale)
        if isinstance(self.layer, _CONV):
            return self.layer._conv_forward(x, w, self.layer.bias)
        return F.linear(x, w, self.layer.bias)


class _AdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` as slices and means, for the spatial sizes the output
    size does not divide (the TorchScript exporter refuses those). The bins are
    torch's: ``[floor(i * H / h), ceil((i + 1) * H / h))``.

    Shape:
        - Input: ``(B, C, H, W)``.
        - Output: ``(B, C, h, w)``.
    """

    def __init__(self, pool: nn.AdaptiveAvgPool2d) -> None:
        super().__init__()
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size: Any = self.pool.output_size
        h_in, w_in = int(x.shape[-2]), int(x.shape[-1])
        pair = (size, size) if isinstance(size, int) else tuple(size)
        h, w = (h_in if pair[0] is None else pair[0]), (w_in if pair[1] is None else pair[1])
        if h_in % h == 0 and w_in % w == 0:
            return self.pool(x)
        rows = []
        for i in range(h):
            r0, r1 = (i * h_in) // h, -((-(i + 1) * h_in) // h)
            cols = []
            for j in range(w):
                c0, c1 = (j * w_in) // w, -((-(j + 1) * w_in) // w)
                cols.append(x[..., r0:r1, c0:c1].mean(dim=(-2, -1), keepdim=True))
            rows.append(torch.cat(cols, dim=-1))
        return torch.cat(rows, dim=-2)


def _replace_pools(model: nn.Module) -> nn.Module:
    """Swap every ``nn.AdaptiveAvgPool2d`` of ``model`` for `_AdaptiveAvgPool2d`."""
    if isinstance(model, nn.AdaptiveAvgPool2d):
        return _AdaptiveAvgPool2d(model)
    for name, child in list(model.named_children()):
        setattr(model, name, _replace_pools(child))
    return model


def _require_onnx() -> Any:
    """The ``onnx`` package, imported on first use (an optional dependency)."""
    try:
        return importlib.import_module("onnx")
    except ImportError:
        raise ConfigError(
            "export_onnx needs the optional packages onnx and onnxruntime: "
            "pip install 'triqdef[onnx]'"
        ) from None


def _check(wrapper: object, path: object, bits: object, example_input: object, opset: object):
    if not isinstance(wrapper, TriQDefWrapper):
        raise ConfigError(f"export_onnx needs a TriQDefWrapper, got {type(wrapper).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"export_onnx: path must be a str or os.PathLike, got {path!r}")
    if isinstance(bits, bool) or bits not in wrapper.bits:
        raise ConfigError(
            f"export_onnx: bits={bits!r} is not one of the wrapper's bit-widths {wrapper.bits}"
        )
    assert isinstance(bits, int)
    if 8 < bits < 32:
        raise ConfigError(
            f"export_onnx supports 2 to 8 bits (int8/uint8 grids) and 32, got bits={bits}"
        )
    if wrapper.training:
        raise ConfigError(
            "export_onnx exports the eval-mode model: call wrapper.eval() first "
            "(the wrapper is in training mode)"
        )
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise InputError(
            "export_onnx: example_input must be a floating-point tensor (B, ...), got "
            f"{type(example_input).__name__}"
        )
    if example_input.ndim < 1 or example_input.shape[0] < 1:
        raise InputError(
            f"export_onnx: example_input needs a batch dimension, got {tuple(example_input.shape)}"
        )
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 13):
        raise ConfigError(f"export_onnx: opset must be an int >= 13 or None, got {opset!r}")


def _onnx_ready(wrapper: TriQDefWrapper, bits: int) -> nn.Module:
    """``wrapper.export(bits)`` with every quantized layer made ONNX-exportable."""
    exported = wrapper.export(bits)
    if bits >= 32:
        return _replace_pools(exported.cpu())
    index = wrapper._ctx.qbits.index(bits)
    for name in wrapper.quantized_layers():
        wrapped = exported.get_submodule(name)
        layer = getattr(wrapped, "layer", None)
        if not isinstance(wrapped, QuantizedInputs) or not isinstance(layer, (*_CONV, nn.Linear)):
            raise ConfigError(
                f"export_onnx supports quantized Conv1d/2d/3d and Linear layers; {name!r} "
                f"is {type(layer or wrapped).__name__} (exclude it or export another way)"
            )
        q = wrapper._quantizer(name)
        for what, grid in (("inputs", wrapped.bits), ("weights", q.weight_grid[index])):
            if 8 < grid < 32:
                raise ConfigError(
                    f"export_onnx: at {bits} bits layer {name!r} quantizes its {what} on a "
                    f"{grid}-bit grid (min_bits, act_bits or input_bits), above the 8 bits "
                    "an int8/uint8 QDQ pair holds; lower that floor to 8 or raise it to 32"
                )
        scale = None
        if q.weight_grid[index] < 32:
            own = wrapper.model.get_submodule(name)._parameters.get("weight")
            # a computed weight: the exported copy keeps its channel maxima
            original = cast(torch.Tensor, layer.weight if own is None else own)
            scale = q.weight_scales(original.detach().float(), index)
        replacement = _QDQLayer(wrapped, scale).cpu()
        if not name:
            return replacement
        parent, _, child = name.rpartition(".")
        setattr(exported.get_submodule(parent) if parent else exported, child, replacement)
    return _replace_pools(exported.cpu())


def export_onnx(
    wrapper: TriQDefWrapper,
    path: PathLike,
    bits: int,
    example_input: torch.Tensor,
    opset: int | None = None,
    *,
    integer: bool = False,
) -> None:
    """Write the model at ``bits`` as an ONNX QDQ graph that onnxruntime can run.

    The graph is that of [`wrapper.export(bits)`][triqdef.TriQDefWrapper.export]: each
    quantized layer's weight is an int8 initializer of integer codes followed by a
    per-output-channel ``DequantizeLinear`` (``axis=0``, zero-point 0), and its input
    passes through ``QuantizeLinear`` -> ``Clip`` -> ``DequantizeLinear`` (one scale,
    zero-point 0; int8 for the signed narrow grid, uint8 for the unsigned grid; the
    ``Clip`` to the grid is left out where the grid fills the type, i.e. 8-bit
    unsigned). At 32 bits the plain float model is written. Per-layer precision is
    kept: each layer's weight codes and input grid are those of its own bit-widths
    (``min_bits``, ``act_bits``, ``input_bits``; e.g. W4A8 gives 4-bit codes and 8-bit
    input grids), and a layer kept at 32 bits has float weights and no QDQ pair. With
    ``quantizer="lsq"`` the scales are the learned step sizes. The batch dimension of
    the input and of the output is dynamic (``"batch"``). The model is checked with
    ``onnx.checker.check_model`` before the file is written; a refused call writes
    nothing. The wrapper is not modified.

    ``integer=True`` rewrites the graph so that onnxruntime runs integer kernels
    (``QLinearConv``, ``QGemm``) instead of dequantizing and running float ones, which
    is what makes the 8-bit file faster than the float one (measured on the
    Performance page, "Deployment: ONNX"):

    * each BatchNorm after a convolution is folded into the weight scales (the integer
      weight codes stay as they are, up to a sign);
    * biases become int32 codes on the grid ``input_scale * weight_scale``;
    * a layer's output is quantized onto the next layer's input grid right after the
      layer, where it reaches that quantizer only through ``Relu``, ``MaxPool`` and
      shape operations (exact: those map the grid onto itself);
    * a layer whose output goes elsewhere (a residual sum, an average pool, the
      logits) keeps float weights, BatchNorm folded, and runs as a float layer;
    * a ``Linear`` without bias, which torch writes as ``MatMul`` rather than
      ``Gemm``, is left as in the default file.

    The rounding of the biases is the one change of value: at most half a step of
    ``input_scale * weight_scale`` per output channel, which now and then moves an
    activation across a rounding boundary of the next grid. The file's outputs are
    therefore close to, not equal to, those of ``wrapper.export(bits)``; for a layer
    with neither bias nor BatchNorm they are equal. At 32 bits ``integer`` changes
    nothing.

    Args:
        wrapper: a [`TriQDefWrapper`][triqdef.TriQDefWrapper] in eval mode whose
            quantized layers are Conv1d/2d/3d or Linear.
        path: the ``.onnx`` file to write.
        bits: one of ``wrapper.bits``: 2 to 8, or 32.
        example_input: ``(B, ...)`` float tensor of the model's input, used to trace it
            (any batch size; the exported batch dimension is dynamic).
        opset: ONNX opset, 13 or above; ``None`` uses ``DEFAULT_OPSET`` (17).
        integer: write the graph for onnxruntime's integer kernels (above).

    Raises:
        ConfigError: onnx is not installed (``pip install 'triqdef[onnx]'``), ``wrapper``
            is not a wrapper or is in training mode, ``bits`` is not one of its
            bit-widths or lies between 9 and 31, a quantized layer is not a Conv or
            Linear layer or runs its weights or inputs at 9 to 31 bits (a ``min_bits``,
            ``act_bits`` or ``input_bits`` floor above 8), ``opset`` is below 13, or
            ``integer`` is not a bool.
        InputError: ``path`` is not a path, or ``example_input`` is not a
            floating-point tensor with a batch dimension.
        NotCalibratedError: the ``bits``-bit observers have never seen data.

    Example:
        ```python
        wrapper.eval()
        triqdef.export_onnx(wrapper, "model-4bit.onnx", bits=4,
                            example_input=torch.randn(1, 1, 28, 28))
        # for deployment: onnxruntime's integer convolutions
        triqdef.export_onnx(wrapper, "model-8bit.onnx", bits=8,
                            example_input=torch.randn(1, 1, 28, 28), integer=True)
        ```
    """
    onnx = _require_onnx()
    _check(wrapper, path, bits, example_input, opset)
    if not isinstance(integer, bool):
        raise ConfigError(f"export_onnx: integer must be True or False, got {integer!r}")
    model = _onnx_ready(wrapper, bits)
    x = example_input.detach().cpu()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the traced spatial sizes are constants on purpose (only the batch is dynamic)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the TorchScript exporter is deprecated, but it is the one that runs the
        # `symbolic` of an autograd Function without onnxscript
        warnings.simplefilter("ignore", DeprecationWarning)
        # the strided slices of a ResNet shortcut are computed at run time, as in torch
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")
        torch.onnx.export(
            model,
            (x,),
            cast(Any, buffer),  # the TorchScript exporter writes to a file object too
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=DEFAULT_OPSET if opset is None else opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    if integer and bits < 32:
        to_integer(onnx, proto)
    onnx.checker.check_model(proto)
    onnx.save(proto, os.fspath(path))
