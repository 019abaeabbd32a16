"""Round trips: deepcopy, pickle, state_dict, safetensors save/load, export, save_quantized."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
from conftest import tiny_cnn
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import triqdef
import triqdef._safetensors
from triqdef import TriQDefWrapper
from triqdef.errors import CheckpointError, ConfigError, NotCalibratedError
from triqdef.export import QuantizedInputs

BITS = (32, 8, 5, 4, 2)


def _trained(seed: int = 0, bits=BITS, layers=("2",)) -> tuple[TriQDefWrapper, torch.Tensor]:
    torch.manual_seed(seed)
    w = TriQDefWrapper(tiny_cnn(), bits=bits, layers=list(layers))
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    x = torch.randn(8, 3, 8, 8)
    for b in bits:  # one step per bit-width: weights, observers and BN rows all move
        with w.at_bits(b):
            loss = w(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w, x


def _state(w: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in w.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _outputs(w: TriQDefWrapper, x: torch.Tensor) -> dict[int, torch.Tensor]:
    w.eval()
    out = {}
    with torch.no_grad():
        for b in w.bits:
            with w.at_bits(b):
                out[b] = w(x)
    return out


def _assert_same_outputs(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copy_and_pickle_round_trip(how):
    w, x = _trained()
    clone = copy.deepcopy(w) if how == "deepcopy" else pickle.loads(pickle.dumps(w))
    assert _same(_state(clone), _state(w))
    _assert_same_outputs(_outputs(clone, x), _outputs(w, x))
    # the clone's hooks act on the clone only
    clone.train()
    with clone.at_bits(4):
        clone(x * 3)
    assert not _same(_state(clone), _state(w))
    assert clone.features(x)["2"].shape == (8, 8, 8, 8)
    clone.detach()
    _outputs(w, x)  # the original still runs


def test_state_dict_round_trip_and_bare_model_load():
    w, x = _trained(seed=0)
    fresh, _ = _trained(seed=1)
    fresh.load_state_dict(w.state_dict())
    _assert_same_outputs(_outputs(fresh, x), _outputs(w, x))
    bare = tiny_cnn()
    bare.load_state_dict(w.model.state_dict())  # strict: same keys as the bare model
    bare.eval()
    assert torch.equal(bare(x), _outputs(w, x)[32])


def test_load_state_dict_mismatch_changes_nothing():
    w, _ = _trained()
    before = _state(w)
    bad = _state(w)
    bad["model.0.weight"] = torch.zeros(8, 3, 5, 5)
    with pytest.raises(CheckpointError, match="shape"):
        w.load_state_dict(bad)
    bad = _state(w)
    del bad["quantizers.3.act_max"]
    bad["model.0.weight"].zero_()
    with pytest.raises(CheckpointError, match="missing"):
        w.load_state_dict(bad)
    assert _same(_state(w), before)


def test_save_load_round_trip(tmp_path):
    w, x = _trained(seed=0)
    path = tmp_path / "w.safetensors"
    triqdef.save(w, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["bits"]) == list(BITS) and json.loads(meta["layers"]) == ["2"]
    assert meta["format_version"] == triqdef.io.FORMAT_VERSION
    other, _ = _trained(seed=1)
    triqdef.load(other, path)
    assert _same(_state(other), _state(w))
    _assert_same_outputs(_outputs(other, x), _outputs(w, x))
    assert not [p.name for p in tmp_path.iterdir() if p.name != "w.safetensors"]  # no temp left


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: TriQDefWrapper(tiny_cnn(), bits=(32, 8, 4), layers=["2"]), "bits"),
        (lambda: TriQDefWrapper(tiny_cnn(), bits=BITS, layers=["5"]), "layers"),
        (lambda: TriQDefWrapper(tiny_cnn(num_classes=7), bits=BITS, layers=["2"]), "architecture"),
    ],
)
def test_load_mismatch_names_it_and_changes_nothing(tmp_path, make, match):
    w, _ = _trained()
    path = tmp_path / "w.safetensors"
    triqdef.save(w, path)
    other = make()
    before = _state(other)
    with pytest.raises(CheckpointError, match=match):
        triqdef.load(other, path)
    assert _same(_state(other), before)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "missing"])
def test_load_corrupt_file_raises_and_changes_nothing(tmp_path, damage):
    w, _ = _trained()
    path = tmp_path / "w.safetensors"
    triqdef.save(w, path)
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(data[:8] + b"\xff" * 64 + data[72:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.unlink()
    before = _state(w)
    with pytest.raises(CheckpointError) as info:
        triqdef.load(w, path)
    assert str(path) in str(info.value) and isinstance(info.value, ValueError)
    assert _same(_state(w), before)


def test_interrupted_save_leaves_the_old_file(tmp_path, monkeypatch):
    w, _ = _trained()
    path = tmp_path / "w.safetensors"
    triqdef.save(w, path)
    good = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(triqdef._safetensors, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        triqdef.save(w, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


# --- export ----------------------------------------------------------------------------------
def _no_triqdef_hooks(model: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("bits", BITS)
def test_export_reproduces_the_wrapper(bits):
    w, x = _trained()
    ref = _outputs(w, x)[bits]
    before = _state(w)
    exported = w.export(bits)
    assert _no_triqdef_hooks(exported) and not exported.training
    y = exported(torch.randn(8, 3, 8, 8))  # fresh input, then the reference input
    assert torch.isfinite(y).all()
    torch.testing.assert_close(exported(x), ref, atol=1e-5, rtol=0)
    assert _same(_state(w), before)  # exporting changed nothing in the wrapper
    if bits < 32:
        conv = exported[3]
        assert isinstance(conv, QuantizedInputs)
        weight = conv.layer.weight.detach()
        qmax = 2 ** (bits - 1) - 1  # the signed narrow grid: integer codes in [-qmax, qmax]
        for c in range(8):
            step = weight[c].abs().max() / qmax
            codes = weight[c] / step  # every weight exactly on its channel's grid
            assert torch.allclose(codes, codes.round(), atol=1e-3), (bits, c)
            assert codes.abs().max() <= qmax + 1e-3
            assert len(torch.unique(weight[c])) <= 2 * qmax + 1
    program = torch.export.export(exported, (x,))
    torch.testing.assert_close(program.module()(x), ref, atol=1e-5, rtol=0)


def test_export_needs_a_known_calibrated_bit_width():
    w = TriQDefWrapper(tiny_cnn(), bits=(32, 4))
    with pytest.raises(ConfigError):
        w.export(8)
    with pytest.raises(NotCalibratedError):
        w.export(4)


def test_save_quantized_stores_integer_codes(tmp_path):
    w, x = _trained()
    path = tmp_path / "q4.safetensors"
    triqdef.save_quantized(w, path, bits=4)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    keys = json.loads(meta["integer_weights"])
    assert keys == ["0.layer.weight", "3.layer.weight", "8.layer.weight"]
    exported = w.export(4)
    ref = exported.state_dict()
    for key in keys:
        codes, scale = tensors[key], tensors[key + "_scale"]
        assert codes.dtype == torch.int8
        assert codes.abs().max() <= 7
        weight = codes.float() * scale.reshape(-1, *([1] * (codes.ndim - 1)))
        torch.testing.assert_close(weight, ref[key], atol=1e-6, rtol=0)
    for key in ("0.input_scale", "1.running_mean", "8.layer.bias"):
        assert torch.equal(tensors[key], ref[key])
    with pytest.raises(ConfigError):
        triqdef.save_quantized(w, tmp_path / "x.safetensors", bits=32)


def test_save_quantized_uses_wider_integers_above_8_bits(tmp_path):
    w = TriQDefWrapper(nn.Linear(3, 2), bits=(32, 12))
    w.calibrate([torch.randn(4, 3)])
    triqdef.save_quantized(w, tmp_path / "q.safetensors", bits=12)
    codes = load_file(str(tmp_path / "q.safetensors"))["layer.weight"]
    assert codes.dtype == torch.int16 and codes.abs().max() == 2**11 - 1
