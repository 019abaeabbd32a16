"""Export: a deployable copy of the model at one bit-width, free of triqdef hooks."""

from __future__ import annotations

from torch import nn

from ._export import QuantizedInputs
from .errors import ConfigError
from .wrapper import TriQDefWrapper

__all__ = ["QuantizedInputs", "export_model"]


def export_model(wrapper: TriQDefWrapper, bits: int) -> nn.Module:
    """Standalone eval-mode copy of ``wrapper.model`` at ``bits``: ``wrapper.export(bits)``.

    Each quantized layer's weights are replaced by their quantized values and
    the layer is placed inside a [`QuantizedInputs`][triqdef.export.QuantizedInputs]
    that applies the frozen input quantizer; BatchNorm layers receive the
    ``bits``-bit running statistics. A layer that reads the model's own input gets
    the input grid of ``max(bits, wrapper.input_bits)`` bits (none at 32), as in the
    wrapper. The user's own hooks are kept; triqdef's are removed. The wrapper and
    its model are not modified. See [`export`][triqdef.TriQDefWrapper.export] for
    computed (parametrized) weights and layers that never ran.

    Args:
        wrapper: a [`TriQDefWrapper`][triqdef.TriQDefWrapper].
        bits: one of ``wrapper.bits``.

    Returns:
        The exported ``nn.Module`` (a new object; parameters do not require grad).

    Raises:
        ConfigError: ``wrapper`` is not a wrapper, or ``bits`` is not one of its
            bit-widths.
        NotCalibratedError: the ``bits``-bit observers have never seen data, or
            ``bits < wrapper.input_bits`` and no forward below 32 bits has shown
            which layer reads the model's input yet (after ``load_state_dict``; a
            file from [`triqdef.load`][triqdef.io.load] records it).
    """
    if not isinstance(wrapper, TriQDefWrapper):
        raise ConfigError(f"export_model needs a TriQDefWrapper, got {type(wrapper).__name__}")
    return wrapper.export(bits)
