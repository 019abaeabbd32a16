"""Shared fixtures: a `device` parametrization (CPU by default) and small models."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from triqdef import TriQDefWrapper as _TriQDefWrapper

# One thread per test process: the suite runs as `pytest -n 2` on 2 cores, and more threads
# than cores makes small-tensor work dramatically slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Every test starts from the same global RNG state, whatever ran before it in its
    process (``pytest -n`` deals tests to workers differently on every run). Module
    initialisation draws from the global generator and takes no ``generator=``, so this
    is the one place that makes every model, and any draw a test leaves unseeded,
    reproducible; data that a test's assertions depend on uses a local generator."""
    torch.manual_seed(0)


def _devices() -> list[str]:
    # CUDA runs only on request (TRIQDEF_TEST_CUDA=1), so CI on CPU machines is unaffected.
    devices = ["cpu"]
    if os.environ.get("TRIQDEF_TEST_CUDA") == "1":
        devices.append("cuda")
    return devices


@pytest.fixture(params=_devices())
def device(request) -> torch.device:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.fail("TRIQDEF_TEST_CUDA=1 but torch.cuda.is_available() is False")
    return torch.device(request.param)


def tiny_cnn(in_channels: int = 3, num_classes: int = 10) -> nn.Module:
    """Conv-BN-ReLU x2, pool, Linear: every kind of state the wrapper handles."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, num_classes),
    )


# --- the penalty tests' tiny float64 setting (test_penalty_bits, test_gradient_penalties) ---
BITS = (32, 8, 4, 2)  # K = 4: six unordered pairs


def small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


def _wrapper(bits=BITS, dtype=torch.float64, **kw) -> _TriQDefWrapper:
    torch.manual_seed(0)
    return _TriQDefWrapper(small_net().to(dtype), bits=bits, layers=["2", "4"], **kw)


def _batch(b=6, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, 9, 11, generator=g, dtype=dtype)
    return x, torch.randint(0, 5, (b,), generator=g)


def fixed_patch(xs, ys, wrapper):
    """A patch source that draws no random number: the objective is a fixed function."""
    out = xs.clone()
    out[..., 2:6, 3:8] = 1.0
    return out


def _run(w, x, y, seed=None, patch=fixed_patch):
    """Loss value and flattened parameter gradient of one call; ``seed`` seeds the draw."""
    w.zero_grad(set_to_none=True)
    if seed is not None:
        torch.manual_seed(seed)
    loss = w.loss(x, y, patch=patch)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in w.parameters()])
    return loss.detach(), grad
