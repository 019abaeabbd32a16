"""Shared setting of the hostile-input tests (``tests/test_bad_input_*.py``).

``trained()`` is a calibrated 3-channel CNN with BatchNorm wrapped at bits (32, 8, 4);
``snapshot(w)`` records every piece of state a failed call must leave alone (weights,
observers, per-bit BatchNorm statistics, gradients, bit-width, active bit-widths,
training flags), and ``assert_unchanged(w, snap)`` compares against it.
"""

from __future__ import annotations

import torch
from torch import nn

from triqdef import TriQDefWrapper

BITS = (32, 8, 4)
NC = 5


def net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, NC),
    )


def images(b: int = 4, c: int = 3, h: int = 8, w: int = 8, seed: int | None = None):
    g = torch.Generator().manual_seed(b if seed is None else seed)
    return torch.rand(b, c, h, w, generator=g)


def labels(b: int = 4) -> torch.Tensor:
    return torch.arange(b) % NC


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def with_inf(t: torch.Tensor, sign: float = 1.0) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[-1] = sign * float("inf")
    return t


def trained(**kwargs) -> TriQDefWrapper:
    """Observers, BN rows and the weights' gradients all hold data after one loss step."""
    torch.manual_seed(0)
    w = TriQDefWrapper(net(), bits=BITS, layers=["2"], **kwargs)
    w.loss(images(), labels()).backward()
    return w


def snapshot(w: TriQDefWrapper) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in w.state_dict().items()},
        "grads": [None if p.grad is None else p.grad.clone() for p in w.parameters()],
        "mode": (w.current_bits, w.active_bits),
        "training": [m.training for m in w.modules()],
    }


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and values, NaN matching NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(
            torch.nan_to_num(a, nan=0.0), torch.nan_to_num(b, nan=0.0)
        )
    return torch.equal(a, b)


def assert_unchanged(w: TriQDefWrapper, snap: dict) -> None:
    now = snapshot(w)
    assert now["state"].keys() == snap["state"].keys()
    for k, v in snap["state"].items():
        assert _same(now["state"][k], v), f"state {k!r} changed"
    for i, (g0, g1) in enumerate(zip(snap["grads"], now["grads"])):
        assert (g0 is None) == (g1 is None) and (g0 is None or torch.equal(g0, g1)), (
            f"gradient of parameter {i} changed"
        )
    assert now["mode"] == snap["mode"], "bit-width or active bit-widths changed"
    assert now["training"] == snap["training"], "a training flag changed"
