"""Export: a deployable copy of the model at one bit-width, free of triqdef hooks."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import ConfigError, NotCalibratedError
from .quant import fake_quantize_activation, fake_quantize_weight

if TYPE_CHECKING:
    from .wrapper import TriQDefWrapper

__all__ = ["QuantizedInputs", "export_model"]

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
        signed: signed narrow grid or unsigned grid (see :func:`triqdef.quant.quant_range`).
        num_inputs: how many leading positional inputs to quantize (3 for attention).

    Shape:
        - Input: whatever ``layer`` takes.
        - Output: whatever ``layer`` returns.
    """

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
        args = list(args)
        originals = list(args)
        for i in range(min(self.num_inputs, len(args))):
            x = originals[i]
            same = next((j for j in range(i) if originals[j] is x), None)
            if same is not None:
                args[i] = args[same]  # self-attention: keep `key is query`
            elif self.bits < 32 and isinstance(x, torch.Tensor) and x.is_floating_point():
                args[i] = fake_quantize_activation(x, self.input_scale, self.bits, self.signed)
        return self.layer(*args, **kwargs)


def _remove_hooks(model: nn.Module, ids: set[int]) -> None:
    for module in model.modules():
        for attr in _HOOK_DICTS:
            hooks = getattr(module, attr, None)
            if hooks:
                for hook_id in ids & set(hooks):
                    del hooks[hook_id]


@torch.no_grad()
def export_model(wrapper: TriQDefWrapper, bits: int) -> nn.Module:
    """Standalone eval-mode copy of ``wrapper.model`` at ``bits``.

    Each quantized layer's weights are replaced by their quantized values and
    the layer is placed inside a :class:`QuantizedInputs` that applies the
    frozen input quantizer; BatchNorm layers receive the ``bits``-bit running
    statistics. A layer that reads the model's own input gets the input grid of
    ``max(bits, wrapper.input_bits)`` bits (none at 32), as in the wrapper. The
    user's own hooks are kept; triqdef's are removed. The wrapper and its model
    are not modified.

    Args:
        wrapper: a :class:`~triqdef.TriQDefWrapper`.
        bits: one of ``wrapper.bits``.

    Returns:
        The exported ``nn.Module`` (a new object; parameters do not require grad).

    Raises:
        ConfigError: ``bits`` is not one of the wrapper's bit-widths.
        NotCalibratedError: the ``bits``-bit observers have never seen data, or
            ``bits < wrapper.input_bits`` and no forward below 32 bits has shown
            which layer reads the model's input yet (after ``load_state_dict``; a
            file from [`triqdef.load`][triqdef.io.load] records it).
    """
    wrapper._check_attached()
    if isinstance(bits, bool) or bits not in wrapper.bits:
        raise ConfigError(f"bit-width {bits!r} is not one of this wrapper's bits {wrapper.bits}")
    ctx = wrapper._ctx
    index = ctx.qbits.index(bits) if bits < 32 else None
    from .wrapper import _key

    names = wrapper.quantized_layers()
    grids = {name: bits for name in names}
    floor = wrapper.input_bits
    if index is not None and floor is not None and bits < floor:
        readers = [wrapper.quantizers[_key(n)].reads_input for n in names]
        if all(r is None for r in readers):
            raise NotCalibratedError(
                f"export({bits}) with input_bits={floor} needs to know which layer reads the "
                "model's input: run one forward below 32 bits first (e.g. in eval mode)"
            )
        grids.update({n: floor for n, r in zip(names, readers) if r})
    scales = {}
    if index is not None:  # fail before copying anything
        for name in names:
            scales[name] = wrapper.quantizers[_key(name)].scale(index, grids[name])

    owners = [*wrapper.quantizers.values(), *wrapper.bn_stats.values(), wrapper._taps]
    owners += [wrapper._ctx, wrapper._bn_rows_hooks]
    memo = {id(o): o for o in owners}  # hooks' owners are shared, then the hooks dropped
    model = copy.deepcopy(wrapper.model, memo)
    _remove_hooks(model, {h.id for h in wrapper._handles})
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    if index is None:
        return model

    for name, module in model.named_modules():
        stats = wrapper.bn_stats[_key(name)] if _key(name) in wrapper.bn_stats else None
        if stats is not None:
            for buf in stats._names:
                module._buffers[buf].copy_(getattr(stats, buf)[index])

    for name in names:
        layer = model.get_submodule(name)
        q = wrapper.quantizers[_key(name)]
        for path, pname in q.weights:
            owner = layer.get_submodule(path) if path else layer
            w = owner._parameters[pname]
            owner._parameters[pname] = nn.Parameter(fake_quantize_weight(w, bits), False)
        scale, signed = scales[name]
        wrapped = QuantizedInputs(layer, scale, grids[name], signed, q.num_inputs)
        if not name:
            return wrapped
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapped)
    return model
