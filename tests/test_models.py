"""Tests for triqdef.models: shapes, sizes, names, validation, pickling."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from triqdef.errors import ConfigError
from triqdef.models import (
    MLP,
    BasicBlock,
    CifarResNet,
    SmallCNN,
    ZeroPadShortcut,
    resnet20,
    resnet56,
)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def cases() -> list[tuple[str, nn.Module, tuple[int, ...], int]]:
    torch.manual_seed(0)
    return [
        ("resnet20", resnet20(), (2, 3, 32, 32), 10),
        ("resnet20-gray-100", resnet20(num_classes=100, in_channels=1), (2, 1, 32, 32), 100),
        ("resnet56", resnet56(num_classes=7), (2, 3, 32, 32), 7),
        ("cifarresnet8", CifarResNet(8, num_classes=5, in_channels=2), (2, 2, 16, 16), 5),
        ("smallcnn", SmallCNN(), (2, 1, 28, 28), 10),
        ("smallcnn-rgb", SmallCNN(in_channels=3, num_classes=4, width=8), (2, 3, 32, 32), 4),
        ("smallcnn-8x8", SmallCNN(), (2, 1, 8, 8), 10),
        ("mlp", MLP(784), (2, 1, 28, 28), 10),
        ("mlp-flat", MLP(20, hidden=(16,), num_classes=3), (2, 20), 3),
        ("mlp-linear", MLP(12, hidden=(), num_classes=2), (2, 3, 4), 2),
    ]


@pytest.mark.parametrize(
    ("model", "shape", "classes"), [c[1:] for c in cases()], ids=[c[0] for c in cases()]
)
def test_output_shape(model: nn.Module, shape: tuple[int, ...], classes: int) -> None:
    out = model(torch.rand(shape))
    assert out.shape == (shape[0], classes)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_param_counts() -> None:
    assert 260_000 <= n_params(resnet20()) <= 280_000
    assert 840_000 <= n_params(resnet56()) <= 860_000
    assert 30_000 <= n_params(SmallCNN()) <= 70_000
    # 784*256+256 + 256*128+128 + 128*10+10
    assert n_params(MLP(784)) == 235_146


def test_resnet_structure() -> None:
    model = resnet20()
    names = dict(model.named_modules())
    for name in ("conv1", "bn1", "layer1", "layer2", "layer3", "fc"):
        assert name in names
    assert isinstance(names["conv1"], nn.Conv2d) and names["conv1"].out_channels == 16
    for stage, width in (("layer1", 16), ("layer2", 32), ("layer3", 64)):
        blocks = list(names[stage].children())
        assert len(blocks) == 3
        assert all(isinstance(b, BasicBlock) for b in blocks)
        assert blocks[-1].conv2.out_channels == width
    assert len(resnet56().layer2) == 9
    # option A: the downsampling shortcuts have no parameters
    assert isinstance(model.layer2[0].shortcut, ZeroPadShortcut)
    assert n_params(model.layer2[0].shortcut) == 0
    assert isinstance(model.layer1[0].shortcut, nn.Identity)
    assert model.fc.in_features == 64


def test_resnet_stage_shapes() -> None:
    model = resnet20().eval()
    feats: dict[str, torch.Tensor] = {}
    for name in ("layer1", "layer2", "layer3"):
        getattr(model, name).register_forward_hook(
            lambda _m, _i, out, name=name: feats.__setitem__(name, out)
        )
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    assert feats["layer1"].shape == (2, 16, 32, 32)
    assert feats["layer2"].shape == (2, 32, 16, 16)
    assert feats["layer3"].shape == (2, 64, 8, 8)


def test_smallcnn_names() -> None:
    names = dict(SmallCNN().named_modules())
    for name in ("block1", "block2", "block3", "head", "block1.0"):
        assert name in names
    assert isinstance(names["head"], nn.Linear)


def test_zero_pad_shortcut() -> None:
    sc = ZeroPadShortcut(16, 32, stride=2)
    x = torch.randn(2, 16, 8, 8)
    out = sc(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert torch.count_nonzero(out[:, :8]) == 0 and torch.count_nonzero(out[:, 24:]) == 0
    assert torch.equal(ZeroPadShortcut(4, 4)(x[:, :4]), x[:, :4])
    with pytest.raises(ConfigError):
        ZeroPadShortcut(32, 16)


@pytest.mark.parametrize("depth", [0, 7, 9, 19, 21, 2, -4, 20.0, "20", True])
def test_bad_depth(depth: object) -> None:
    with pytest.raises(ConfigError, match="6n \\+ 2"):
        CifarResNet(depth)  # type: ignore[arg-type]


def test_bad_depth_is_value_error() -> None:
    with pytest.raises(ValueError):
        CifarResNet(10)


@pytest.mark.parametrize(
    "build",
    [
        lambda: CifarResNet(20, num_classes=0),
        lambda: resnet20(in_channels=0),
        lambda: SmallCNN(width=0),
        lambda: SmallCNN(num_classes=-1),
        lambda: MLP(0),
        lambda: MLP(10, hidden=(8, 0)),
    ],
)
def test_bad_arguments(build) -> None:
    with pytest.raises(ConfigError):
        build()


@pytest.mark.parametrize("name", ["resnet20", "smallcnn", "mlp"])
def test_pickle_and_deepcopy_round_trip(name: str) -> None:
    torch.manual_seed(1)
    model, shape = {
        "resnet20": (resnet20(), (2, 3, 32, 32)),
        "smallcnn": (SmallCNN(), (2, 1, 28, 28)),
        "mlp": (MLP(784), (2, 1, 28, 28)),
    }[name]
    x = torch.rand(shape)
    model.train()
    model(x)  # move the BN running statistics away from their defaults
    model.eval()
    with torch.no_grad():
        ref = model(x)
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    copies = [
        pickle.loads(pickle.dumps(model)),
        copy.deepcopy(model),
        torch.load(buf, weights_only=False),
    ]
    for clone in copies:
        assert type(clone) is type(model)
        clone.eval()
        with torch.no_grad():
            assert torch.equal(clone(x), ref)
