"""Per-layer precision (issue 13): ``min_bits`` floors, ``act_bits`` (W4A8), their
composition with ``input_bits``, checkpoints, export, save_quantized and ONNX."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cnn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import triqdef
from triqdef import TriQDefWrapper
from triqdef.errors import CheckpointError, ConfigError, LayerNotFoundError
from triqdef.export import QuantizedInputs
from triqdef.models import SmallCNN
from triqdef.quant import fake_quantize_activation, fake_quantize_weight, quant_range

BITS = (32, 8, 4, 2)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _wrap(net=None, **kwargs) -> TriQDefWrapper:
    kwargs.setdefault("bits", BITS)
    kwargs.setdefault("lambda_fdp", 0)
    return TriQDefWrapper(tiny_cnn() if net is None else net, **kwargs)


def _warm(w: TriQDefWrapper, x: torch.Tensor) -> TriQDefWrapper:
    """One training-mode forward at every bit-width, then eval mode."""
    w.train()
    with torch.no_grad():
        for b in w.bits:
            with w.at_bits(b):
                w(x)
    return w.eval()


def _manual(w: TriQDefWrapper, x: torch.Tensor, bits: int, grids: dict) -> torch.Tensor:
    """tiny_cnn in eval mode at ``bits`` by hand: layer ``name`` with weights on a
    ``grids[name][0]``-bit grid and inputs on a ``grids[name][1]``-bit grid (32: none),
    its scale read off the ``bits``-bit observer row."""
    i = w._ctx.qbits.index(bits)
    h = x
    for name, m in w.model.named_children():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            wb, ab = grids[name]
            if ab < 32:
                scale, signed = w.quantizers[name].scale(i, ab)
                h = fake_quantize_activation(h, scale, ab, signed)
            weight = m.weight if wb >= 32 else fake_quantize_weight(m.weight, wb)
            if isinstance(m, nn.Conv2d):
                h = F.conv2d(h, weight, m.bias, padding=1)
            else:
                h = F.linear(h, weight, m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            s = w.bn_stats[name]
            h = F.batch_norm(h, s.running_mean[i], s.running_var[i], m.weight, m.bias, eps=m.eps)
        else:
            h = m(h)
    return h


def _capture(w: TriQDefWrapper) -> dict:
    """Hooks registered after triqdef's: what each quantized layer really receives."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in w.quantized_layers():
        m = w.model.get_submodule(name)
        m.register_forward_pre_hook(
            lambda m, a, n=name: seen.update({n: (a[0].detach().clone(), m.weight.detach())})
        )
    return seen


# --- min_bits -------------------------------------------------------------------------------
def test_a_clamped_layer_runs_at_its_floor_and_the_others_at_the_active_bit_width():
    torch.manual_seed(0)
    w = _wrap(min_bits={"0": 8, "8": 8}, input_bits=None)
    x = torch.randn(16, 3, 8, 8)
    _warm(w, x)
    seen = _capture(w)
    with torch.no_grad(), w.at_bits(4):
        out = w(x)
    net = w.model
    # weights: layer 0 and 8 on the 8-bit grid, layer 3 on the 4-bit grid
    assert torch.equal(seen["0"][1], fake_quantize_weight(net[0].weight, 8))
    assert torch.equal(seen["8"][1], fake_quantize_weight(net[8].weight, 8))
    assert torch.equal(seen["3"][1], fake_quantize_weight(net[3].weight, 4))
    assert not torch.equal(seen["0"][1], fake_quantize_weight(net[0].weight, 4))
    # inputs: the clamped layers' on 8-bit grids (more than 16 levels), layer 3's on 4 bits
    assert len(torch.unique(seen["3"][0])) <= 16
    assert len(torch.unique(seen["0"][0])) > 16
    assert len(torch.unique(seen["8"][0])) > 16
    grids = {"0": (8, 8), "3": (4, 4), "8": (8, 8)}
    torch.testing.assert_close(out, _manual(w, x, 4, grids), atol=1e-5, rtol=0)
    # above the floor the layer follows the active bit-width; 32 stays the identity
    with torch.no_grad():
        with w.at_bits(2):
            torch.testing.assert_close(
                w(x), _manual(w, x, 2, {"0": (8, 8), "3": (2, 2), "8": (8, 8)}), atol=1e-5, rtol=0
            )
        with w.at_bits(32):
            assert torch.equal(w(x), net(x)) and not w._ctx.inside_model()


def test_the_clamped_layer_matches_a_wrapper_that_runs_it_at_the_higher_bit_width():
    # the same weights, observers and statistics: a plain wrapper at 4 bits gives the
    # clamped wrapper's output once its last layer is swapped for an 8-bit copy by hand
    torch.manual_seed(0)
    a, b = tiny_cnn(), tiny_cnn()
    b.load_state_dict(a.state_dict())
    clamped, plain = _wrap(a, min_bits={"8": 8}), _wrap(b)
    x = torch.randn(16, 3, 8, 8)
    _warm(clamped, x)
    _warm(plain, x)
    assert _same(_state(clamped.quantizers), _state(plain.quantizers))  # the same rows
    with torch.no_grad(), clamped.at_bits(4), plain.at_bits(4):
        feats = {}
        b[7].register_forward_hook(lambda m, i, o: feats.update(h=o))
        assert not torch.equal(clamped(x), plain(x))
        scale, signed = plain.quantizers["8"].scale(plain._ctx.qbits.index(4), 8)
        h = fake_quantize_activation(feats["h"], scale, 8, signed)
        ref = F.linear(h, fake_quantize_weight(b[8].weight, 8), b[8].bias)
        torch.testing.assert_close(clamped(x), ref, atol=1e-5, rtol=0)


def test_min_bits_32_keeps_a_layer_in_full_precision():
    torch.manual_seed(0)
    w = _wrap(min_bits={"3": 32}, input_bits=None)
    x = torch.randn(8, 3, 8, 8)
    _warm(w, x)
    seen = _capture(w)
    with torch.no_grad(), w.at_bits(2):
        out = w(x)
    assert torch.equal(seen["3"][1], w.model[3].weight)  # not quantized
    assert len(torch.unique(seen["3"][0])) > 4
    grids = {"0": (2, 2), "3": (32, 32), "8": (2, 2)}
    torch.testing.assert_close(out, _manual(w, x, 2, grids), atol=1e-5, rtol=0)
    with torch.no_grad():
        assert torch.equal(w.export(2)(x), out)


def test_names_containers_and_patterns_resolve_to_quantized_layers():
    net = SmallCNN(width=4)
    assert _wrap(net, min_bits={"block*.0": 8}).min_bits == {
        "block1.0": 8,
        "block2.0": 8,
        "block3.0": 8,
    }
    assert _wrap(SmallCNN(width=4), min_bits={"block2": 5}).min_bits == {"block2.0": 5}
    both = _wrap(SmallCNN(width=4), min_bits={"*": 4, "head": 8, "block1.?": 5})
    assert both.min_bits == {"block1.0": 5, "block2.0": 4, "block3.0": 4, "head": 8}
    q = both.quantizers
    assert q["head"].weight_grid == (8, 8, 8) and q["block2/0"].weight_grid == (8, 4, 4)
    assert q["block1/0"].act_grid == (8, 5, 5)
    assert "min_bits=" in repr(both)
    assert _wrap(SmallCNN(width=4)).min_bits == {}


@pytest.mark.parametrize(
    "min_bits, error, match",
    [
        ({"00": 8}, LayerNotFoundError, r"'00'.*Closest names: \['0'"),
        ({"block*": 8}, LayerNotFoundError, "matches no quantized layer"),
        ({"1": 8}, ConfigError, "holds no quantized layer"),
        ({"0": 1}, ConfigError, r"min_bits\['0'\]"),
        ({"0": 33}, ConfigError, r"\[2, 32\]"),
        ({"0": 8.0}, ConfigError, "bit-width"),
        ({"0": True}, ConfigError, "bit-width"),
        ({0: 8}, ConfigError, "str"),
        (["0"], ConfigError, "mapping"),
        (8, ConfigError, "mapping"),
    ],
)
def test_bad_min_bits_are_refused_before_anything_is_attached(min_bits, error, match):
    net = tiny_cnn()
    before = _state(net)
    with pytest.raises(error, match=match):
        _wrap(net, min_bits=min_bits)
    assert not net._forward_pre_hooks and not net._forward_hooks
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    assert _same(_state(net), before)


def test_an_excluded_layer_cannot_get_a_floor():
    with pytest.raises(ConfigError, match="holds no quantized layer"):
        _wrap(exclude=["8"], min_bits={"8": 8})
    with pytest.raises(LayerNotFoundError, match=r"Closest quantized layers: \['0'"):
        _wrap(min_bits={"0?": 8})


# --- act_bits ---------------------------------------------------------------------------------
def test_act_bits_int_gives_w4a8():
    torch.manual_seed(0)
    w = _wrap(act_bits=8, input_bits=None)
    x = torch.randn(16, 3, 8, 8)
    _warm(w, x)
    seen = _capture(w)
    with torch.no_grad(), w.at_bits(4):
        out = w(x)
    for name in ("0", "3", "8"):
        assert torch.equal(
            seen[name][1], fake_quantize_weight(w.model.get_submodule(name).weight, 4)
        )
    assert len(torch.unique(seen["3"][0])) > 16  # 8-bit activations
    grids = {n: (4, 8) for n in ("0", "3", "8")}
    torch.testing.assert_close(out, _manual(w, x, 4, grids), atol=1e-5, rtol=0)
    assert w.act_bits == 8 and "act_bits=8" in repr(w)


def test_act_bits_mapping_sets_each_bit_width_and_may_go_below_the_weights():
    torch.manual_seed(0)
    w = _wrap(act_bits={4: 8, 8: 4}, input_bits=None)
    assert w.act_bits == {8: 4, 4: 8}
    assert w.quantizers["3"].act_grid == (4, 8, 2) and w.quantizers["3"].weight_grid == (8, 4, 2)
    x = torch.randn(16, 3, 8, 8)
    _warm(w, x)
    with torch.no_grad():
        for bits, grid in ((8, (8, 4)), (4, (4, 8)), (2, (2, 2))):
            with w.at_bits(bits):
                expected = _manual(w, x, bits, {n: grid for n in ("0", "3", "8")})
                torch.testing.assert_close(w(x), expected, atol=1e-5, rtol=0)


def test_act_bits_and_min_bits_take_the_higher_floor():
    w = _wrap(act_bits={2: 4}, min_bits={"8": 8})
    assert w.quantizers["8"].act_grid == (8, 8, 8) and w.quantizers["8"].weight_grid == (8, 8, 8)
    assert w.quantizers["3"].act_grid == (8, 4, 4) and w.quantizers["3"].weight_grid == (8, 4, 2)


@pytest.mark.parametrize(
    "act_bits", [1, 33, 8.0, "8", True, {32: 8}, {5: 8}, {4: 1}, {4: 8.0}, {True: 8}, [4, 8]]
)
def test_bad_act_bits_are_refused(act_bits):
    net = tiny_cnn()
    with pytest.raises(ConfigError, match="act_bits"):
        _wrap(net, act_bits=act_bits)
    assert all(not m._forward_pre_hooks for m in net.modules())


def test_a_bad_quantizer_is_refused():
    with pytest.raises(ConfigError, match="'minmax'.*'lsq'"):
        _wrap(quantizer="LSQ")


# --- composition with input_bits ------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, first",
    [
        ({}, 8),  # the input floor above the active 2 bits
        ({"act_bits": 4}, 8),  # the activation floor is lower than input_bits
        ({"act_bits": 16}, 16),  # and higher
        ({"min_bits": {"0": 16}}, 16),
        ({"min_bits": {"0": 4}, "input_bits": None}, 4),
        ({"act_bits": {2: 5}, "input_bits": None}, 5),
    ],
)
def test_input_bits_is_one_more_floor_on_the_models_own_input(kwargs, first):
    torch.manual_seed(0)
    w = _wrap(**kwargs)
    x = torch.randn(16, 3, 8, 8)
    _warm(w, x)
    q3 = w.quantizers["3"]
    i = w._ctx.qbits.index(2)
    grids = {"0": (w.quantizers["0"].weight_grid[i], first)}
    grids.update({n: (w.quantizers[n].weight_grid[i], w.quantizers[n].act_grid[i]) for n in "38"})
    assert not q3.reads_input
    with torch.no_grad(), w.at_bits(2):
        out = w(x)
        torch.testing.assert_close(out, _manual(w, x, 2, grids), atol=1e-5, rtol=0)
        exported = w.export(2)
        assert exported[0].bits == first
        assert torch.equal(exported(x), out)


# --- checkpoints ------------------------------------------------------------------------------
def test_save_and_load_keep_the_precision_and_refuse_another(tmp_path):
    torch.manual_seed(0)
    net = SmallCNN(width=4)
    w = _wrap(net, min_bits={"block1": 8, "head": 8}, act_bits=8)
    x = torch.rand(8, 1, 28, 28)
    _warm(w, x)
    with torch.no_grad(), w.at_bits(2):
        ref = w(x)
    path = tmp_path / "w.safetensors"
    triqdef.save(w, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["min_bits"]) == {"block1.0": 8, "head": 8}
    assert json.loads(meta["act_bits"]) == 8 and json.loads(meta["quantizer"]) == "minmax"

    # the same floors and activation bit-widths, spelled otherwise
    fresh = _wrap(
        SmallCNN(width=4), min_bits={"block1.*": 8, "he*": 8}, act_bits={8: 8, 4: 8, 2: 8}
    )
    triqdef.load(fresh.eval(), path)
    with torch.no_grad(), fresh.at_bits(2):
        assert torch.equal(fresh(x), ref)
        assert torch.equal(fresh.export(2)(x), ref)

    for other, match in (
        ({"min_bits": {"head": 8}}, "min_bits="),
        ({"min_bits": {"block1": 8, "head": 8}}, "act_bits="),
        ({"min_bits": {"block1": 8, "head": 8}, "act_bits": {4: 8}}, "act_bits="),
    ):
        wrong = _wrap(SmallCNN(width=4), **other)
        before = _state(wrong)
        with pytest.raises(CheckpointError, match=match):
            triqdef.load(wrong, path)
        assert _same(_state(wrong), before)

    # a file written before per-layer precision: no floors, activations at the weights'
    old_meta = {k: v for k, v in meta.items() if k not in ("min_bits", "act_bits", "quantizer")}
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=old_meta)
    triqdef.load(_wrap(SmallCNN(width=4)), old)
    with pytest.raises(CheckpointError, match="min_bits"):
        triqdef.load(_wrap(SmallCNN(width=4), min_bits={"head": 8}), old)

    bad = tmp_path / "bad.safetensors"
    save_file(load_file(str(path)), str(bad), metadata={**meta, "act_bits": '{"4": 8}'})
    with pytest.raises(CheckpointError, match="act_bits entry"):
        triqdef.load(fresh, bad)


# --- export and save_quantized ----------------------------------------------------------------
def test_export_reproduces_the_wrapper_with_per_layer_precision():
    torch.manual_seed(0)
    w = _wrap(min_bits={"8": 8}, act_bits={4: 8})
    x = torch.randn(16, 3, 8, 8)
    _warm(w, x)
    with torch.no_grad():
        for bits in (8, 4, 2):
            with w.at_bits(bits):
                ref = w(x)
            exported = w.export(bits)
            assert torch.equal(exported(x), ref)
            inputs = {
                n: m.bits for n, m in exported.named_children() if isinstance(m, QuantizedInputs)
            }
            assert inputs == {"0": 8, "3": {8: 8, 4: 8, 2: 2}[bits], "8": 8}
            torch.testing.assert_close(
                exported[8].layer.weight, fake_quantize_weight(w.model[8].weight, 8)
            )


@pytest.mark.parametrize("floor, dtype", [(8, torch.int8), (16, torch.int16), (32, None)])
def test_save_quantized_stores_each_layer_on_its_own_grid(tmp_path, floor, dtype):
    torch.manual_seed(0)
    w = _wrap(min_bits={"8": floor})
    x = torch.randn(8, 3, 8, 8)
    _warm(w, x)
    path = tmp_path / "q.safetensors"
    triqdef.save_quantized(w, path, bits=4)
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    exported = w.export(4).state_dict()
    ints = json.loads(meta["integer_weights"])
    assert json.loads(meta["weight_bits"]) == {
        "0.layer.weight": 4,
        "3.layer.weight": 4,
        **({"8.layer.weight": floor} if dtype else {}),
    }
    for key in ints:
        bits = json.loads(meta["weight_bits"])[key]
        qmin, qmax = quant_range(bits, True)
        codes = tensors[key]
        assert codes.dtype == (dtype if key.startswith("8.") else torch.int8)
        assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
        scale = tensors[key + "_scale"].reshape(-1, *([1] * (codes.ndim - 1)))
        torch.testing.assert_close(codes.float() * scale, exported[key], atol=1e-6, rtol=0)
    if dtype is None:  # full precision: the float weight as it is
        assert "8.layer.weight" not in ints
        assert torch.equal(tensors["8.layer.weight"], w.model[8].weight.detach())
    else:  # more than the 4-bit grid's 15 levels
        assert len(torch.unique(tensors["8.layer.weight"][0])) > 15


# --- ONNX ---------------------------------------------------------------------------------------
def _trained_small_cnn(**kwargs) -> TriQDefWrapper:
    torch.manual_seed(0)
    w = _wrap(SmallCNN(width=8), **kwargs)
    opt = torch.optim.Adam(w.parameters(), 1e-3)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    w.train()
    for b in w.bits:
        with w.at_bits(b):
            for _ in range(2):
                loss = F.cross_entropy(w(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return w.eval()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_bits": {"block1.0": 8, "head": 8}},
        {"act_bits": 8},  # W4A8 and W2A8
        {"min_bits": {"head": 8}, "act_bits": {4: 8, 2: 4}},
    ],
    ids=["min_bits", "W4A8", "both"],
)
def test_onnxruntime_matches_export_with_per_layer_precision(kwargs, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    w = _trained_small_cnn(**kwargs)
    x = torch.rand(5, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    for bits in (4, 2):
        path = tmp_path / f"m{bits}.onnx"
        triqdef.export_onnx(w, path, bits, x[:1])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = w.export(bits)(x).numpy()
        assert float(np.abs(out - ref).max()) <= 1e-4
        model = onnx.load(str(path))
        onnx.checker.check_model(model, full_check=True)
        codes = {
            i.name: onnx.numpy_helper.to_array(i)
            for i in model.graph.initializer
            if i.data_type == 3  # int8
        }
        assert len(codes) == len(w.quantized_layers())
        i = w._ctx.qbits.index(bits)
        wide = [max(int(np.abs(c).max()), 1) for c in codes.values()]
        floors = sorted(quant_range(q.weight_grid[i], True)[1] for q in w.quantizers.values())
        assert all(c <= q for c, q in zip(sorted(wide), floors))
        if "head" in w.min_bits:  # the head's codes need more than the active grid
            assert max(wide) > quant_range(bits, True)[1]
        # a Clip for every input grid that does not fill int8/uint8: the grids are kept
        grids = [m for m in w.export(bits).modules() if isinstance(m, QuantizedInputs)]
        ops = [n.op_type for n in model.graph.node]
        assert ops.count("Clip") == sum(m.signed or m.bits < 8 for m in grids)


def test_onnx_refuses_a_layer_above_8_bits_and_keeps_a_32_bit_layer_in_float(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    x = torch.rand(2, 1, 28, 28)
    w = _warm(_wrap(SmallCNN(width=4), min_bits={"head": 16}), x)
    with pytest.raises(ConfigError, match="'head'.*16-bit grid"):
        triqdef.export_onnx(w, tmp_path / "a.onnx", 4, x[:1])
    assert not (tmp_path / "a.onnx").exists()
    w = _warm(_wrap(SmallCNN(width=4), min_bits={"head": 32}), x)
    path = tmp_path / "b.onnx"
    triqdef.export_onnx(w, path, 4, x[:1])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        ref = w.export(4)(x).numpy()
    assert float(np.abs(session.run(None, {"input": x.numpy()})[0] - ref).max()) <= 1e-4
