"""Rewrite a QDQ graph from `export_onnx` so that onnxruntime runs integer kernels.

onnxruntime turns ``DequantizeLinear -> Conv/Gemm -> QuantizeLinear`` into one integer
kernel (``QLinearConv``, ``QGemm``) only when every input of the layer comes from a
``DequantizeLinear`` (the bias as int32 codes on the grid ``input_scale * weight_scale``)
and its output goes straight into a ``QuantizeLinear``. The graph `export_onnx` writes
by default has neither: the bias and the BatchNorm after a convolution are float, and
the next quantizer sits after the activation and pooling. `to_integer` rewrites it:

1. **BatchNorm folded into the weight scales.** A ``Conv`` whose only consumer is a
   ``BatchNormalization`` takes it in: with ``k = gamma / sqrt(var + eps)`` per output
   channel, the codes become ``codes * sign(k)``, the scales ``scale * |k|`` and the
   bias ``(bias - mean) * k + beta``. The codes keep their grid, so the weights are
   the same numbers as before, up to float rounding.
2. **The bias as int32 codes** on the grid ``input_scale * weight_scale`` (per output
   channel), rounded to nearest: the only change of value the rewrite makes, at most
   half a step of that grid per channel.
3. **The output requantized onto the next layer's input grid.** When the layer's
   output reaches the next ``QuantizeLinear`` only through operations that map a grid
   onto itself (``Relu``, ``MaxPool`` and shape operations, each with one consumer),
   the same ``QuantizeLinear`` (and its ``Clip``) is put right after the layer. This
   is exact: quantizing first and then applying ``Relu`` or ``MaxPool`` gives the
   values that quantizing afterwards gives (zero-point 0), so the next quantizer
   receives values already on its grid and leaves them as they are.

A layer whose output reaches something else (a residual ``Add``, an average pool, the
model's output) cannot be requantized exactly; its dequantized weights (BatchNorm
folded) are written as float constants instead, so onnxruntime runs it as a float
convolution without dequantizing the weights at every call. Only ``Conv`` and ``Gemm``
are rewritten: a ``Linear`` without bias, which torch writes as ``MatMul``, is left as
it is.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

__all__ = ["to_integer"]

# operations that map values on a grid with zero-point 0 onto the same grid
_GRID_PRESERVING = {
    "Relu",
    "MaxPool",
    "Flatten",
    "Reshape",
    "Identity",
    "Squeeze",
    "Unsqueeze",
    "Transpose",
}


class _Graph:
    """Producers, consumers and constant values of an ONNX graph."""

    def __init__(self, onnx: Any, graph: Any) -> None:
        self.onnx, self.graph = onnx, graph
        self.numpy_helper = onnx.numpy_helper
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}
        self.producer: dict[str, Any] = {}
        self.consumers: dict[str, list[Any]] = defaultdict(list)
        for node in graph.node:
            for name in node.output:
                self.producer[name] = node
            for name in node.input:
                if name:
                    self.consumers[name].append(node)
        self._fresh = 0

    def const(self, name: str) -> np.ndarray | None:
        """The value of ``name`` if it is a constant (initializer, ``Constant``, or an
        ``Identity`` of one), else ``None``."""
        if name in self.inits:
            return self.numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return self.numpy_helper.to_array(attr.t)
            return None
        if node.op_type == "Identity":
            return self.const(node.input[0])
        return None

    def only_consumer(self, name: str) -> Any | None:
        users = self.consumers.get(name, [])
        if name in self.outputs or len(users) != 1:
            return None
        return users[0]

    def name(self, stem: str) -> str:
        self._fresh += 1
        return f"{stem}__int{self._fresh}"

    def add_init(self, stem: str, value: np.ndarray) -> str:
        name = self.name(stem)
        self.graph.initializer.append(self.numpy_helper.from_array(value, name))
        return name


def _attr(node: Any, name: str, default: Any) -> Any:
    for a in node.attribute:
        if a.name == name:
            return a.f if a.type == a.FLOAT else a.i
    return default


def _dq_parts(g: _Graph, name: str):
    """``(codes, scale, zero_point, axis)`` of a ``DequantizeLinear`` of constants
    producing ``name``, else ``None``."""
    node = g.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear" or len(node.input) < 3:
        return None
    codes, scale, zero = (g.const(i) for i in node.input[:3])
    if codes is None or scale is None or zero is None or np.any(zero != 0):
        return None
    return codes, scale.astype(np.float32), zero, _attr(node, "axis", 1)


def _input_scale(g: _Graph, name: str) -> float | None:
    """The scale of the per-tensor ``DequantizeLinear`` (zero-point 0) producing
    ``name``, else ``None``."""
    node = g.producer.get(name)
    if node is None or node.op_type != "DequantizeLinear":
        return None
    scale = g.const(node.input[1])
    zero = g.const(node.input[2]) if len(node.input) > 2 else None
    if scale is None or scale.size != 1 or zero is None or np.any(zero != 0):
        return None
    return float(scale.reshape(()))


def _fold_bn(g: _Graph, conv: Any, scale: np.ndarray, bias: np.ndarray):
    """Fold the ``BatchNormalization`` after ``conv`` (its only consumer) into
    ``(sign, scale, bias)``; ``None`` when there is none to fold."""
    bn = g.only_consumer(conv.output[0])
    if bn is None or bn.op_type != "BatchNormalization" or bn.input[0] != conv.output[0]:
        return None
    if len(bn.output) > 1 and any(bn.output[1:]):
        return None  # training-mode outputs
    params = [g.const(i) for i in bn.input[1:5]]
    if any(p is None for p in params):
        return None
    gamma, beta, mean, var = (np.asarray(p, dtype=np.float64) for p in params)
    k = gamma / np.sqrt(var + _attr(bn, "epsilon", 1e-5))
    sign = np.where(k < 0, -1, 1)
    new_scale = (scale.astype(np.float64) * np.abs(k)).astype(np.float32)
    new_bias = ((bias.astype(np.float64) - mean) * k + beta).astype(np.float32)
    # the BatchNorm's output is now the convolution's
    g.graph.node.remove(bn)
    conv.output[0] = bn.output[0]
    g.producer[bn.output[0]] = conv
    return sign, new_scale, new_bias


def _next_quantizer(g: _Graph, name: str):
    """``(scale, zero_point, clip_bounds)`` of the ``QuantizeLinear`` that ``name``
    reaches through grid-preserving operations with one consumer each, and of the
    ``Clip`` after it (``clip_bounds`` is ``None`` without one); else ``None``."""
    node = g.only_consumer(name)
    while node is not None and node.op_type in _GRID_PRESERVING:
        if node.op_type == "MaxPool" and len(node.output) > 1 and any(node.output[1:]):
            return None  # the indices output
        node = g.only_consumer(node.output[0])
    if node is None or node.op_type != "QuantizeLinear" or len(node.input) < 3:
        return None
    scale, zero = g.const(node.input[1]), g.const(node.input[2])
    if scale is None or scale.size != 1 or zero is None or np.any(zero != 0):
        return None
    clip = g.only_consumer(node.output[0])
    if clip is None or clip.op_type != "Clip":
        return scale, zero, None
    bounds = [g.const(i) if i else None for i in clip.input[1:]]
    if any(b is None for b, i in zip(bounds, clip.input[1:]) if i):
        return None
    return scale, zero, bounds


def to_integer(onnx: Any, model: Any) -> None:
    """Rewrite ``model`` (an ``onnx.ModelProto`` from `export_onnx`) in place."""
    g = _Graph(onnx, model.graph)
    layers = [n for n in list(g.graph.node) if n.op_type in ("Conv", "Gemm")]
    for layer in layers:
        weight = _dq_parts(g, layer.input[1])
        if weight is None:
            continue
        codes, scale, _, axis = weight
        if layer.op_type == "Gemm" and (_attr(layer, "transB", 0) != 1 or axis != 0):
            continue
        if layer.op_type == "Conv" and axis != 0:
            continue
        bias_name = layer.input[2] if len(layer.input) > 2 else ""
        bias = g.const(bias_name) if bias_name else np.zeros(codes.shape[0], np.float32)
        if bias is None:
            continue
        bias = bias.astype(np.float32)
        if layer.op_type == "Conv":
            folded = _fold_bn(g, layer, scale, bias)
            if folded is not None:
                sign, scale, bias = folded
                shape = (-1,) + (1,) * (codes.ndim - 1)
                codes = (codes.astype(np.int16) * sign.reshape(shape)).astype(codes.dtype)
        x_scale = _input_scale(g, layer.input[0])
        nxt = _next_quantizer(g, layer.output[0])
        bias_scale = None
        if x_scale is not None and nxt is not None:
            bias_scale = (np.float32(x_scale) * scale).astype(np.float32)
            if np.any(bias_scale <= 0) or not np.all(np.isfinite(bias_scale)):
                bias_scale = None
        if bias_scale is not None:
            bias_codes = np.round(bias.astype(np.float64) / bias_scale)
            if np.any(np.abs(bias_codes) >= 2**31 - 1):
                bias_scale = None
        stem = layer.output[0].strip("/").replace("/", "_")
        if bias_scale is None or nxt is None:
            # float weights (BatchNorm folded): no per-call dequantization
            view = scale.reshape((-1,) + (1,) * (codes.ndim - 1))
            w = (codes.astype(np.float32) * view).astype(np.float32)
            del layer.input[1:]
            layer.input.extend([g.add_init(stem + "_w", w), g.add_init(stem + "_b", bias)])
            continue
        w_zero = np.zeros(codes.shape[0], dtype=codes.dtype)
        w_dq = onnx.helper.make_node(
            "DequantizeLinear",
            [
                g.add_init(stem + "_wq", codes),
                g.add_init(stem + "_ws", scale),
                g.add_init(stem + "_wz", w_zero),
            ],
            [g.name(stem + "_w")],
            axis=0,
        )
        b_dq = onnx.helper.make_node(
            "DequantizeLinear",
            [
                g.add_init(stem + "_bq", bias_codes.astype(np.int32)),
                g.add_init(stem + "_bs", bias_scale),
                g.add_init(stem + "_bz", np.zeros(codes.shape[0], np.int32)),
            ],
            [g.name(stem + "_b")],
            axis=0,
        )
        # the layer's output: requantized onto the next input grid, then dequantized
        q_scale, q_zero, clip = nxt
        out = layer.output[0]
        raw = g.name(stem + "_raw")
        layer.output[0] = raw
        # copies of the next quantizer's constants: they may be defined further down
        qparams = [g.add_init(stem + "_qs", q_scale), g.add_init(stem + "_qz", q_zero)]
        new_q = onnx.helper.make_node("QuantizeLinear", [raw, *qparams], [g.name(stem + "_q")])
        chain = [new_q]
        last = new_q.output[0]
        if clip is not None:
            bounds = ["" if b is None else g.add_init(stem + "_cb", b) for b in clip]
            new_clip = onnx.helper.make_node("Clip", [last, *bounds], [g.name(stem + "_c")])
            chain.append(new_clip)
            last = new_clip.output[0]
        chain.append(onnx.helper.make_node("DequantizeLinear", [last, *qparams], [out]))
        del layer.input[1:]
        layer.input.extend([w_dq.output[0], b_dq.output[0]])
        index = list(g.graph.node).index(layer)
        for offset, node in enumerate([w_dq, b_dq]):
            g.graph.node.insert(index + offset, node)
        index = list(g.graph.node).index(layer)
        for offset, node in enumerate(chain):
            g.graph.node.insert(index + 1 + offset, node)
    _prune(model.graph)


def _prune(graph: Any) -> None:
    """Drop the nodes and initializers nothing reads any more (the replaced weights'
    ``DequantizeLinear`` and the BatchNorm parameters)."""
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for t in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(t)
