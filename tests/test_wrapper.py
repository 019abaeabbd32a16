"""TriQDefWrapper: identity at 32 bits, grids, STE, per-bit state, detach, errors."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cnn
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from triqdef import TriQDefWrapper
from triqdef.errors import (
    ConfigError,
    DetachedError,
    InputError,
    LayerNotFoundError,
    NotCalibratedError,
    TriQDefError,
)
from triqdef.models import MLP, SmallCNN
from triqdef.quant import (
    fake_quantize_activation,
    fake_quantize_weight,
    quant_range,
)

BITS = (32, 8, 5, 4, 2)


def _hooks(model: nn.Module) -> dict:
    names = (
        "_forward_pre_hooks",
        "_forward_pre_hooks_with_kwargs",
        "_forward_hooks",
        "_forward_hooks_with_kwargs",
        "_forward_hooks_always_called",
        "_backward_hooks",
        "_state_dict_hooks",
        "_load_state_dict_pre_hooks",
    )
    return {(n, a): dict(getattr(m, a)) for n, m in model.named_modules() for a in names}


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _warm(wrapper: TriQDefWrapper, x: torch.Tensor) -> None:
    """One training-mode forward at every bit-width (observers and BN see data)."""
    was = wrapper.training
    wrapper.train()
    with torch.no_grad():
        for b in wrapper.bits:
            with wrapper.at_bits(b):
                wrapper(x)
    wrapper.train(was)


# --- 32 bits is the bare model -------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
def test_32_bits_is_bit_for_bit_the_bare_model(train, device):
    torch.manual_seed(0)
    net = tiny_cnn().to(device).train(train)
    x = torch.randn(6, 3, 8, 8, device=device)
    bare = tiny_cnn().to(device).train(train)
    bare.load_state_dict(net.state_dict())
    w = TriQDefWrapper(net, bits=BITS, layers=["2"])
    assert w.current_bits == 32
    w.calibrate([x])  # below 32 bits only: the model's own statistics stay as they are
    for _ in range(2):  # also after BN statistics moved at other bit-widths
        assert torch.equal(w(x), bare(x))
        with w.at_bits(4):
            w(x)
    assert _same_state(net.state_dict(), bare.state_dict())


# --- the grids -------------------------------------------------------------------------------
@settings(deadline=None, max_examples=30)
@given(
    bits=st.sampled_from([2, 3, 4, 5, 8]),
    scale=st.floats(0.01, 10.0),
    seed=st.integers(0, 2**16),
)
def test_weight_grid_has_at_most_2_pow_b_levels_per_channel(bits, scale, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 3, 3, 3, generator=g) * scale
    q = fake_quantize_weight(w, bits)
    qmin, qmax = quant_range(bits, signed=True)
    for c in range(w.shape[0]):
        levels = torch.unique(q[c])
        assert len(levels) <= 2**bits
        step = w[c].abs().max() / qmax
        codes = levels / step
        assert torch.allclose(codes, codes.round(), atol=1e-3)
        assert codes.min() >= qmin - 1e-3 and codes.max() <= qmax + 1e-3
    # symmetric: a weight and its negation quantize to mirror images
    assert torch.equal(fake_quantize_weight(-w, bits), -q)


def test_two_bit_weights_are_ternary():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 16, generator=g)
    q = fake_quantize_weight(w, 2)
    for c in range(4):
        amax = w[c].abs().max()
        tol = 1e-6 * float(amax)
        mag = q[c].abs()
        # every value sits exactly on {-amax, 0, amax}: the narrow signed 2-bit grid
        assert torch.minimum(mag, (mag - amax).abs()).max() <= tol, q[c]
        assert (mag <= tol).any() and (mag >= amax - tol).any()  # both levels are used
        # round to nearest: |w| above amax / 2 keeps its sign at full magnitude, else 0
        expected = torch.where(w[c].abs() > amax / 2, w[c].sign() * amax, torch.zeros(()))
        torch.testing.assert_close(q[c], expected, rtol=0, atol=tol)


def _assert_on_weight_grid(weight: torch.Tensor, bits: int) -> None:
    """Channel ``c`` is ``k * max|w_c| / qmax`` with integer ``|k| <= qmax``, every entry."""
    qmax = quant_range(bits, signed=True)[1]
    for c in range(weight.shape[0]):
        step = weight[c].abs().max() / qmax
        codes = weight[c] / step
        assert torch.allclose(codes, codes.round(), atol=1e-3), (bits, c)
        assert codes.abs().max() <= qmax + 1e-3, (bits, c)


def test_layer_sees_quantized_weights_and_inputs_with_few_levels():
    torch.manual_seed(0)
    net = tiny_cnn()
    w = TriQDefWrapper(net, bits=BITS)
    x = torch.randn(8, 3, 8, 8)
    seen = {}

    def spy(name, module, args):  # runs after triqdef's pre-hook
        seen[name] = (args[0].detach().clone(), module.weight.detach().clone())

    handles = [
        m.register_forward_pre_hook(lambda mod, a, n=n: spy(n, mod, a))
        for n, m in net.named_modules()
        if isinstance(m, (nn.Conv2d, nn.Linear))
    ]
    for b in (8, 5, 4, 2):
        with w.at_bits(b):
            w(x)
        assert seen.keys() == {"0", "3", "8"}
        for name, (inp, weight) in seen.items():
            grid = max(b, 8) if name == "0" else b  # the raw input: input_bits=8
            assert len(torch.unique(inp)) <= 2**grid, (name, b)
            scale, _ = w.quantizers[name].scale(w._ctx.qbits.index(b), grid)
            codes = inp / scale  # every row of the layer's input lies on its grid
            assert torch.allclose(codes, codes.round(), atol=1e-3), (name, b)
            for c in range(weight.shape[0]):
                assert len(torch.unique(weight[c])) <= 2**b, (name, b, c)
            _assert_on_weight_grid(weight, b)
        assert not torch.equal(seen["3"][1], net[3].weight.detach())  # quantized copy seen
    for h in handles:
        h.remove()
    # after the forward the shared parameters are back in place, unquantized
    assert isinstance(net[3].weight, nn.Parameter)
    assert len(torch.unique(net[3].weight[0])) == net[3].weight[0].numel()


def test_unsigned_grid_for_non_negative_inputs_signed_otherwise():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    w = TriQDefWrapper(net, bits=(32, 2))
    with w.at_bits(2):
        w(torch.randn(16, 4))
    i = 0
    assert w.quantizers["0"].scale(i)[1] is True  # signed input
    assert w.quantizers["2"].scale(i)[1] is False  # post-ReLU input
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, 4, generator=g) * 1.2  # some values beyond the top of the grid
    q = fake_quantize_activation(x, torch.tensor(1 / 3), 2, signed=False)
    codes = q * 3  # every row, not only the first: each value is a whole code in [0, 3]
    assert torch.allclose(codes, codes.round(), atol=1e-5)
    assert set(codes.round().unique().tolist()) == {0.0, 1.0, 2.0, 3.0}  # all 2^2 levels used
    assert len(torch.unique(q)) <= 2**2
    torch.testing.assert_close(q, (x * 3).round().clamp(0, 3) / 3, rtol=0, atol=1e-6)
    # the signed 2-bit grid is the narrow {-1, 0, 1} (times the scale)
    qs = fake_quantize_activation(x - 0.6, torch.tensor(0.25), 2, signed=True)
    assert set((qs * 4).round().unique().tolist()) == {-1.0, 0.0, 1.0}
    assert torch.allclose(qs * 4, (qs * 4).round(), atol=1e-5)
    # the wrapper's own hook puts every row of layer "2"'s (post-ReLU) input on that grid
    seen = []
    net[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    with w.at_bits(2):
        w(torch.randn(16, 4, generator=g))
    scale = w.quantizers["2"].scale(i)[0]
    codes = seen[-1] / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4)
    assert codes.min() >= -1e-4 and codes.max() <= 3 + 1e-4
    assert len(torch.unique(seen[-1])) <= 2**2


@settings(deadline=None, max_examples=30)
@given(
    bits=st.sampled_from([2, 4, 8]),
    signed=st.booleans(),
    scale=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**16),
)
def test_ste_gradient_is_the_in_range_mask(bits, signed, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(200, generator=g, dtype=torch.float64) * 3 * scale * 2**bits).requires_grad_()
    s = torch.tensor(scale)
    fake_quantize_activation(x, s, bits, signed).sum().backward()
    qmin, qmax = quant_range(bits, signed)
    codes = torch.round(x.detach() * (1.0 / s.double()))
    mask = ((codes >= qmin) & (codes <= qmax)).double()
    assert torch.equal(x.grad, mask)
    assert 0 < mask.sum() < len(mask) or bits == 8


def test_quantization_error_shrinks_as_bits_grow():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    errs = [(fake_quantize_weight(w, b) - w).abs().mean().item() for b in (2, 4, 5, 8)]
    assert errs == sorted(errs, reverse=True) and errs[-1] < errs[0] / 20

    net = SmallCNN(width=8)
    wrapper = TriQDefWrapper(net, bits=BITS)
    x = torch.rand(32, 1, 16, 16)
    _warm(wrapper, x)
    wrapper.eval()
    ref = wrapper(x)
    out_errs = []
    for b in (2, 4, 8):
        with wrapper.at_bits(b):
            out_errs.append((wrapper(x) - ref).abs().mean().item())
    assert out_errs == sorted(out_errs, reverse=True), out_errs


# --- per-bit BatchNorm statistics ---------------------------------------------------------------
def test_batchnorm_statistics_do_not_leak_between_bit_widths():
    torch.manual_seed(0)
    net = tiny_cnn()
    w = TriQDefWrapper(net, bits=BITS)
    x = torch.randn(8, 3, 8, 8) * 3 + 1
    own = {k: v.clone() for k, v in net[1].state_dict().items()}
    rows = {k: v.clone() for k, v in w.bn_stats["1"].state_dict().items()}
    with w.at_bits(4):
        w(x)
    i = w._ctx.qbits.index(4)
    assert _same_state(net[1].state_dict(), own)  # the model's (32-bit) statistics untouched
    after = w.bn_stats["1"].state_dict()
    for k in rows:
        changed = [not torch.equal(after[k][j], rows[k][j]) for j in range(len(w._ctx.qbits))]
        assert changed == [j == i for j in range(len(changed))], k
    assert after["num_batches_tracked"][i] == 1

    with w.at_bits(32):
        w(x)
    assert not torch.equal(net[1].running_mean, own["running_mean"])
    assert _same_state(w.bn_stats["1"].state_dict(), after)


def test_eval_uses_each_bit_widths_own_statistics():
    torch.manual_seed(0)
    net = tiny_cnn()
    w = TriQDefWrapper(net, bits=(32, 4))
    with w.at_bits(4):
        for _ in range(5):
            w(torch.randn(8, 3, 8, 8) * 5 + 3)
    w.eval()
    x = torch.randn(4, 3, 8, 8)
    with w.at_bits(4):
        a = w(x)
        with torch.no_grad():
            w.bn_stats["1"].running_mean.zero_()
        b = w(x)
    assert not torch.allclose(a, b)


def test_per_bit_bn_can_be_switched_off():
    net = tiny_cnn()
    w = TriQDefWrapper(net, bits=(32, 4), per_bit_bn=False)
    assert len(w.bn_stats) == 0
    before = net[1].running_mean.clone()
    with w.at_bits(4):
        w(torch.randn(8, 3, 8, 8) + 2)
    assert not torch.equal(net[1].running_mean, before)  # shared statistics moved


def test_observers_update_only_in_training_mode():
    net = tiny_cnn()
    w = TriQDefWrapper(net, bits=(32, 4))
    with w.at_bits(4):
        w(torch.randn(8, 3, 8, 8))
        w.eval()
        before = _state(w.quantizers)
        w(torch.randn(8, 3, 8, 8) * 10)
        assert _same_state(_state(w.quantizers), before)
        w.train()
        w(torch.randn(8, 3, 8, 8) * 10)
        assert not _same_state(_state(w.quantizers), before)


def test_uncalibrated_eval_raises_and_calibrate_fixes_it():
    torch.manual_seed(0)
    net = tiny_cnn()
    w = TriQDefWrapper(net, bits=(32, 8, 4)).eval()
    x = torch.randn(8, 3, 8, 8)
    assert w.calibrated_bits() == (32,)
    with w.at_bits(4), pytest.raises(NotCalibratedError, match="4-bit"):
        w(x)
    assert isinstance(net[0].weight, nn.Parameter)  # the failed call put the weights back
    w.calibrate([x], bits=[8])
    assert w.calibrated_bits() == (32, 8)
    w.calibrate([x, (x * 2, None)])
    assert w.calibrated_bits() == (32, 8, 4)
    assert not w.training and w.current_bits == 32
    for b in (8, 4):
        with w.at_bits(b):
            assert torch.isfinite(w(x)).all()
    i = w._ctx.qbits.index(4)
    assert w.bn_stats["1"].num_batches_tracked[i] == 2
    assert net[1].momentum == 0.1


def test_calibrate_failure_restores_statistics():
    net = tiny_cnn()
    w = TriQDefWrapper(net, bits=(32, 4))
    with w.at_bits(4):
        w(torch.randn(8, 3, 8, 8))
    before = _state(w)
    with pytest.raises(InputError, match="batch 1 at 4 bits") as info:
        w.calibrate([torch.randn(8, 3, 8, 8), torch.randn(8, 5, 8, 8)])
    assert isinstance(info.value.__cause__, RuntimeError)  # the model's own error, chained
    assert _same_state(_state(w), before)


# --- feature taps -----------------------------------------------------------------------------
def test_features_returns_the_tapped_layers_and_keeps_nothing():
    net = tiny_cnn()
    w = TriQDefWrapper(net, bits=(32, 4), layers=["2", "5"])
    x = torch.randn(2, 3, 8, 8)
    feats = w.features(x)
    assert set(feats) == {"2", "5"} and feats["2"].shape == (2, 8, 8, 8)
    assert torch.equal(feats["5"], net[:6](x))
    assert w._taps._store == {}
    w(x)  # a plain forward stores nothing
    assert w._taps._store == {}


# --- detach -----------------------------------------------------------------------------------
def test_detach_restores_outputs_state_and_hooks():
    torch.manual_seed(0)
    net = tiny_cnn()
    user_handle = net[0].register_forward_hook(lambda m, a, o: None)
    hooks = _hooks(net)
    state = _state(net)
    x = torch.randn(4, 3, 8, 8)
    net.eval()
    ref = net(x)
    net.train()
    with TriQDefWrapper(net, bits=BITS, layers=["2"]) as w:
        w.train()
        for b in BITS:
            with w.at_bits(b):
                w(x)
        w.set_bits(4)
        assert _hooks(net) != hooks
    assert _hooks(net) == hooks
    w.detach()  # idempotent
    assert _hooks(net) == hooks
    sd = net.state_dict()
    assert sd.keys() == state.keys()
    for k in sd:  # only the 32-bit pass moved the model's own BN statistics
        if "running" not in k and "num_batches" not in k:
            assert torch.equal(sd[k], state[k]), k
    net.load_state_dict(state)
    net.eval()
    assert torch.equal(net(x), ref)
    with pytest.raises(DetachedError):
        w(x)
    user_handle.remove()


def test_wrapping_twice_is_refused_until_detached():
    net = tiny_cnn()
    w = TriQDefWrapper(net, bits=(32, 4))
    with pytest.raises(ConfigError, match="already wrapped"):
        TriQDefWrapper(net, bits=(32, 4))
    w.detach()
    TriQDefWrapper(net, bits=(32, 4)).detach()


# --- bad input --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "bits, match",
    [
        ((), "empty"),
        ((32, 4.0), "integers"),
        ((32, "8"), "integers"),
        ((32, True), "integers"),
        ((32, 1), "out of range"),
        ((33, 8), "out of range"),
        ((8, 4, 8), "more than once"),
        (8, "sequence"),
    ],
)
def test_bad_bits(bits, match):
    net = tiny_cnn()
    with pytest.raises(ConfigError, match=match) as info:
        TriQDefWrapper(net, bits=bits)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TriQDefError)
    assert _hooks(net) == _hooks(tiny_cnn())  # nothing attached


def test_unsorted_bits_are_sorted():
    assert TriQDefWrapper(tiny_cnn(), bits=(4, 32, 8)).bits == (32, 8, 4)


def test_unknown_layer_names_teach():
    net = SmallCNN()
    with pytest.raises(LayerNotFoundError) as info:
        TriQDefWrapper(net, layers=["block4"])
    msg = str(info.value)
    assert "block4" in msg and "block1" in msg and "named_modules()" in msg
    assert isinstance(info.value, KeyError)
    with pytest.raises(LayerNotFoundError, match="exclude"):
        TriQDefWrapper(net, exclude=["haed"])


def test_nothing_to_quantize():
    with pytest.raises(ConfigError, match="nothing|no Conv"):
        TriQDefWrapper(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ConfigError, match="outside `exclude`"):
        TriQDefWrapper(nn.Sequential(nn.Linear(2, 2)), exclude=["0"])
    with pytest.raises(ConfigError, match="nn.Module"):
        TriQDefWrapper(lambda x: x)


def test_set_bits_rejects_unknown_bit_width():
    w = TriQDefWrapper(tiny_cnn(), bits=(32, 4))
    with pytest.raises(ConfigError, match="not one of"):
        w.set_bits(8)
    with pytest.raises(ConfigError):
        with w.at_bits(3):
            pass
    assert w.current_bits == 32


def test_exclude_keeps_layers_in_full_precision():
    torch.manual_seed(0)
    net = MLP(8, hidden=(16,), num_classes=3)
    w = TriQDefWrapper(net, bits=(32, 2), exclude=["fc"])
    assert "fc" not in w.quantized_layers() and "features.0" in w.quantized_layers()
    seen = {}
    net.fc.register_forward_pre_hook(lambda m, a: seen.update(w=m.weight.detach().clone()))
    with w.at_bits(2):
        w(torch.randn(4, 8))
    assert torch.equal(seen["w"], net.fc.weight.detach())


def test_per_bit_state_is_created_on_the_models_device():
    net = tiny_cnn().to("meta")  # stands in for an accelerator: no data, real devices
    w = TriQDefWrapper(net, bits=(32, 4))
    assert {b.device.type for b in w.buffers()} == {"meta"}


def test_calibrate_with_nothing_to_calibrate_changes_nothing():
    torch.manual_seed(0)
    net = tiny_cnn()
    w = TriQDefWrapper(net, bits=(32,))
    w(torch.randn(8, 3, 8, 8) + 1)  # the model's own BN statistics move
    before = _state(w)
    w.calibrate([torch.randn(8, 3, 8, 8)])  # default: every bit-width below 32, none here
    w.calibrate([torch.randn(8, 3, 8, 8)], bits=[])
    assert _same_state(_state(w), before)
