"""Materialising a quantized model: frozen input quantizers and hook-free quantized copies."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import cast

import torch
from torch import nn

from .errors import NotCalibratedError
from .quant import (
    BatchNormStats,
    LayerQuantizer,
    _recomputing_hook,
    fake_quantize_activation,
    weight_access,
)

__all__ = ["QuantizedInputs", "materialize", "quantized_copy"]

_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


class QuantizedInputs(nn.Module):
    """A layer whose leading inputs pass through a fixed per-tensor quantizer.

    Args:
        layer: the layer (its weights are expected to be quantized already).
        scale: 0-dim input scale.
        bits: bit-width of the input grid; 32 leaves the inputs as they are.
        signed: signed narrow grid or unsigned grid (see
            [`quant_range`][triqdef.quant.quant_range]).
        num_inputs: how many leading positional inputs to quantize (3 for attention).

    Shape:
        - Input: whatever ``layer`` takes.
        - Output: whatever ``layer`` returns.
    """

    input_scale: torch.Tensor

    def __init__(
        self, layer: nn.Module, scale: torch.Tensor, bits: int, signed: bool, num_inputs: int = 1
    ) -> None:
        super().__init__()
        self.layer = layer
        self.register_buffer("input_scale", scale.detach().clone().reshape(()))
        self.bits, self.signed, self.num_inputs = bits, signed, num_inputs

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, num_inputs={self.num_inputs}"

    def forward(self, *args, **kwargs):
        inputs = list(args)
        originals = list(args)
        for i in range(min(self.num_inputs, len(inputs))):
            x = originals[i]
            same = next((j for j in range(i) if originals[j] is x), None)
            if same is not None:
                inputs[i] = inputs[same]  # self-attention: keep `key is query`
            elif self.bits < 32 and isinstance(x, torch.Tensor) and x.is_floating_point():
                inputs[i] = fake_quantize_activation(x, self.input_scale, self.bits, self.signed)
        return self.layer(*inputs, **kwargs)


def _remove_hooks(model: nn.Module, ids: set[int]) -> None:
    for module in model.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if hooks:
                for hook_id in ids & set(hooks):
                    del hooks[hook_id]


def materialize(owner: nn.Module, name: str) -> None:
    """Replace a computed weight of ``owner`` (a throwaway copy) by a plain parameter
    holding its current value: every ``torch.nn.utils.parametrize`` tensor of the
    layer, or an old-style ``weight_norm`` / ``spectral_norm`` attribute."""
    if weight_access(owner, name) == "computed":
        key, hook = _recomputing_hook(owner, name)
        hook.remove(owner)  # what torch.nn.utils.remove_weight_norm does
        del owner._forward_pre_hooks[key]
        return
    if weight_access(owner, name) != "parametrized":
        return
    # Not parametrize.remove_parametrizations: it deletes the property from the
    # parametrized class, which a deep copy shares with the original layer.
    with torch.no_grad():
        # torch.nn.utils.parametrize keeps a ModuleDict of ParametrizationLists
        plists = cast(nn.ModuleDict, owner.parametrizations)
        values = {t: getattr(owner, t).detach().clone() for t in plists}
    owner.__class__ = type(owner).__bases__[0]  # the class before parametrization
    del owner._modules["parametrizations"]
    for t, value in values.items():
        owner.register_parameter(t, nn.Parameter(value))


@torch.no_grad()
def quantized_copy(
    model: nn.Module,
    bits: int,
    index: int | None,
    quantizers: Mapping[str, LayerQuantizer],
    bn_stats: Mapping[str, BatchNormStats],
    input_bits: int | None,
    hook_owners: Iterable[object],
    hook_ids: set[int],
) -> nn.Module:
    """Standalone eval-mode copy of ``model`` at ``bits`` (bit-width number ``index``
    below 32, ``None`` at 32).

    Each quantized layer (``quantizers``: layer name -> its quantizer) gets its weights
    replaced by their quantized values (on the layer's weight grid, with its learned
    step sizes under ``quantizer="lsq"``) and is placed inside a
    [`QuantizedInputs`][triqdef.export.QuantizedInputs] that applies the frozen input
    quantizer on the layer's activation grid; BatchNorm layers (``bn_stats``: layer
    name -> per-bit statistics) receive the ``bits``-bit running statistics. A layer
    that reads the model's own input gets the grid of ``max(grid, input_bits)`` bits
    (none at 32). The objects owning the hooks
    (``hook_owners``) are shared by the deep copy, and the hooks ``hook_ids`` removed
    from it: the user's own hooks are kept. ``model`` is not modified.

    Raises:
        NotCalibratedError: the ``bits``-bit observers have never seen data, or
            a layer's input grid is below ``input_bits`` and no forward below 32 bits
            has shown which layer reads the model's input yet.
    """
    names = list(quantizers)
    grids: dict[str, int] = {}
    if index is not None:
        grids = {n: quantizers[n].act_grid[index] for n in names}
        if input_bits is not None and any(g < input_bits for g in grids.values()):
            readers = [quantizers[n].reads_input for n in names]
            if all(r is None for r in readers):
                raise NotCalibratedError(
                    f"export({bits}) with input_bits={input_bits} needs to know which layer "
                    "reads the model's input: run one forward below 32 bits first (e.g. in "
                    "eval mode)"
                )
            grids = {n: quantizers[n].input_grid(index) for n in names}
    scales = {}
    if index is not None:  # fail before copying anything
        for name in names:
            scales[name] = quantizers[name].scale(index, grids[name])

    memo = {id(o): o for o in hook_owners}  # hooks' owners are shared, then the hooks dropped
    copied = copy.deepcopy(model, memo)
    _remove_hooks(copied, hook_ids)
    for p in copied.parameters():
        p.requires_grad_(False)
    copied.eval()
    if index is None:
        return copied

    for name, module in copied.named_modules():
        if name in bn_stats:
            bn_stats[name].copy_row_to(module, index)

    for name in names:
        layer = copied.get_submodule(name)
        q = quantizers[name]
        for slot, (path, pname) in enumerate(q.weights):
            owner = layer.get_submodule(path) if path else layer
            # a plain parameter: `export` materialized every computed weight first
            w = cast(torch.Tensor, owner._parameters[pname])
            owner._parameters[pname] = nn.Parameter(q.quantize_weight(w, index, slot), False)
        scale, signed = scales[name]
        wrapped = QuantizedInputs(layer, scale, grids[name], signed, q.num_inputs)
        if not name:
            return wrapped
        parent, _, child = name.rpartition(".")
        setattr(copied.get_submodule(parent) if parent else copied, child, wrapped)
    return copied
