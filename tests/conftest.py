"""Shared fixtures: a `device` parametrization (CPU by default) and small models."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# One thread per test process: the suite runs as `pytest -n 2` on 2 cores, and more threads
# than cores makes small-tensor work dramatically slower.
torch.set_num_threads(1)


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
