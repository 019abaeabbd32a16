"""Wrapper options of issue 10: calibrate(observers=False), bn_rows, the FDP-off warning,
input_bits."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cnn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import triqdef
from triqdef import TriQDefWrapper
from triqdef.errors import CheckpointError, ConfigError, InputError, NotCalibratedError
from triqdef.export import QuantizedInputs
from triqdef.models import SmallCNN
from triqdef.quant import fake_quantize_activation, fake_quantize_weight


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _warm(w: TriQDefWrapper, x: torch.Tensor) -> None:
    """One training-mode forward at every bit-width (observers and BN see data)."""
    was = w.training
    w.train()
    with torch.no_grad():
        for b in w.bits:
            with w.at_bits(b):
                w(x)
    w.train(was)


# --- calibrate(observers=False) --------------------------------------------------------------
def test_calibrate_without_observers_moves_only_batchnorm_statistics():
    torch.manual_seed(0)
    w = TriQDefWrapper(tiny_cnn(), bits=(32, 8, 4), layers=["2"])
    _warm(w, torch.randn(8, 3, 8, 8))
    observers, bn = _state(w.quantizers), _state(w.bn_stats)
    own = _state(w.model[1])
    x1, x2 = torch.randn(8, 3, 8, 8) * 2 + 1, torch.randn(8, 3, 8, 8) * 3 - 1
    seen = []
    w.model[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    w.eval()
    w.calibrate([x1, (x2, None)], bits=[4], observers=False)
    assert _same(_state(w.quantizers), observers)  # bit for bit
    assert _same(_state(w.model[1]), own)  # 32 bits was not asked for
    i = w._ctx.qbits.index(4)
    stats = w.bn_stats["1"]
    assert stats.num_batches_tracked[i] == 2
    # the cumulative average over the two batches, from a fresh start
    means = [s.mean(dim=(0, 2, 3)) for s in seen]
    variances = [s.var(dim=(0, 2, 3), unbiased=True) for s in seen]
    torch.testing.assert_close(stats.running_mean[i], (means[0] + means[1]) / 2)
    torch.testing.assert_close(stats.running_var[i], (variances[0] + variances[1]) / 2)
    j = w._ctx.qbits.index(8)  # not asked for: unchanged
    assert torch.equal(stats.running_mean[j], bn["1.running_mean"][j])
    assert not torch.equal(stats.running_mean[i], bn["1.running_mean"][i])
    assert not w.training and w.current_bits == 32 and w.model[1].momentum == 0.1
    # observers are live again afterwards
    w.train()
    with w.at_bits(4):
        w(torch.randn(8, 3, 8, 8) * 5)
    assert not _same(_state(w.quantizers), observers)


def test_calibrate_without_observers_needs_calibrated_bits_and_changes_nothing_on_failure():
    torch.manual_seed(0)
    w = TriQDefWrapper(tiny_cnn(), bits=(32, 8, 4), layers=["2"])
    with w.at_bits(8):
        w(torch.randn(8, 3, 8, 8))  # 8 bits calibrated, 4 bits never seen data
    before = _state(w)
    x = torch.randn(8, 3, 8, 8)
    with pytest.raises(NotCalibratedError, match=r"\[4\]"):
        w.calibrate([x], observers=False)
    assert _same(_state(w), before)
    with pytest.raises(InputError, match="batch 1 at 8 bits"):
        w.calibrate([x, torch.randn(8, 5, 8, 8)], bits=[8], observers=False)
    assert _same(_state(w), before)
    assert w._ctx.observe  # the observers are not left frozen
    with pytest.raises(ConfigError, match="observers"):
        w.calibrate([x], bits=[8], observers="no")
    assert _same(_state(w), before)


# --- bn_rows ---------------------------------------------------------------------------------
def _bn_spy(net: nn.Module, w: TriQDefWrapper) -> tuple[dict, list]:
    """Records the first input each BatchNorm layer gets at each bit-width."""
    seen: dict = {}
    handles = []
    for name, m in net.named_modules():
        if isinstance(m, nn.BatchNorm2d):

            def hook(m, a, name=name):
                seen.setdefault((name, w.current_bits), a[0].detach().clone())

            handles.append(m.register_forward_pre_hook(hook))
    return seen, handles


def _bn_rows_net(momentum):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


def _stats_at(w: TriQDefWrapper, name: str, bits: int):
    if bits == 32:
        m = w.model.get_submodule(name)
        return m.running_mean, m.running_var, m.num_batches_tracked
    i = w._ctx.qbits.index(bits)
    s = w.bn_stats[name]
    return s.running_mean[i], s.running_var[i], s.num_batches_tracked[i]


@pytest.mark.parametrize("bn_rows", ["clean", "all"])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("memory_bounded", [False, True])
def test_bn_rows_picks_the_rows_running_statistics_come_from(bn_rows, momentum, memory_bounded):
    net = _bn_rows_net(momentum)
    w = TriQDefWrapper(
        net, bits=(32, 4), layers=["2"], bn_rows=bn_rows, memory_bounded=memory_bounded
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 1, 8, 8, generator=g), torch.randint(0, 5, (6,), generator=g)
    n_clean = 3  # rho=0.5 of 6 rows
    expected = {}
    for step in range(2):
        seen, handles = _bn_spy(net, w)
        w.loss(x * (step + 1), y).backward()
        for (name, bits), inp in seen.items():
            assert inp.shape[0] == 6  # the forward still sees the whole mixed batch
            rows = inp[:n_clean] if bn_rows == "clean" else inp
            mean = rows.mean(dim=(0, 2, 3))
            var = rows.var(dim=(0, 2, 3), unbiased=True)
            old = expected.get((name, bits), (torch.zeros(4), torch.ones(4)))
            f = 0.1 if momentum is not None else 1 / (step + 1)
            expected[(name, bits)] = ((1 - f) * old[0] + f * mean, (1 - f) * old[1] + f * var)
        for h in handles:
            h.remove()
    assert len(expected) == 4  # two BatchNorm layers at two bit-widths
    for (name, bits), (mean, var) in expected.items():
        got_mean, got_var, tracked = _stats_at(w, name, bits)
        torch.testing.assert_close(got_mean, mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_var, var, rtol=1e-5, atol=1e-6)
        assert tracked == 2  # once per loss call, also with the memory-bounded replay


def test_bn_rows_clean_differs_from_all_and_leaves_plain_forwards_alone():
    results = {}
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(6, 1, 8, 8, generator=g) + 0.2, torch.randint(0, 5, (6,), generator=g)
    for bn_rows in ("clean", "all"):
        w = TriQDefWrapper(_bn_rows_net(0.1), bits=(32, 4), layers=["2"], bn_rows=bn_rows)
        w.loss(x, y, patch=torch.full((1, 4, 4), 5.0))
        results[bn_rows] = (_state(w.model), _state(w.bn_stats), w.loss_terms()["total"])
        w.model(x)  # a plain training-mode forward uses every row, whatever bn_rows says
        with w.at_bits(4):
            w.model(x)
        results[bn_rows + "/plain"] = (_state(w.model), _state(w.bn_stats))
    clean, every = results["clean"], results["all"]
    assert clean[2] == every[2]  # the forward (batch statistics) is unchanged
    assert not torch.allclose(clean[0]["1.running_mean"], every[0]["1.running_mean"])
    assert not torch.allclose(clean[1]["1.running_mean"], every[1]["1.running_mean"])
    for name in ("1.running_mean", "4.running_var"):  # same update from the plain forward
        a, b = results["clean/plain"][0][name], results["all/plain"][0][name]
        torch.testing.assert_close(a - clean[0][name] * 0.9, b - every[0][name] * 0.9)


def test_bn_rows_validation_and_repr():
    for bad in ("dirty", "", 1, None, True):
        with pytest.raises(ConfigError, match="bn_rows"):
            TriQDefWrapper(tiny_cnn(), bits=(32, 4), layers=["2"], bn_rows=bad)
    w = TriQDefWrapper(tiny_cnn(), bits=(32, 4), layers=["2"], bn_rows="clean")
    assert "bn_rows='clean'" in repr(w)
    assert "bn_rows='all'" in repr(TriQDefWrapper(tiny_cnn(), layers=["2"]))


class _TokensBN(nn.Module):
    """A BatchNorm over (B * H * W, C) rows: its first dimension is not the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 1)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        h = self.conv(x)
        b, c = h.shape[:2]
        h = self.bn(h.permute(0, 2, 3, 1).reshape(-1, c)).reshape(b, -1, c)
        return self.head(h.mean(1))


def test_bn_rows_clean_refuses_batchnorm_rows_that_are_not_the_batch():
    w = TriQDefWrapper(_TokensBN(), bits=(32, 4), layers=["conv"], bn_rows="clean")
    before = _state(w)
    x, y = torch.rand(4, 1, 6, 6), torch.randint(0, 5, (4,))
    with pytest.raises(ConfigError, match="'bn'.*first dimension is the batch"):
        w.loss(x, y)
    assert _same(_state(w), before) and w.model.bn.track_running_stats
    w.model(x)  # outside the loss: nothing to refuse


# --- FDP off: the warning --------------------------------------------------------------------
def test_lambda_fdp_without_layers_warns_and_names_candidates():
    with pytest.warns(UserWarning, match=r"lambda_fdp=0.8 but layers=\(\).*FDP|Feature") as rec:
        TriQDefWrapper(SmallCNN(width=4))
    msgs = [str(r.message) for r in rec if "layers=()" in str(r.message)]
    assert len(msgs) == 1
    assert "'block1'" in msgs[0] and "'block2'" in msgs[0] and "'head'" not in msgs[0]
    with pytest.warns(UserWarning, match="'0'.*'4'") as rec:
        TriQDefWrapper(tiny_cnn())
    assert "'8'" not in str(rec[0].message)  # the classifier is no candidate


def test_no_fdp_warning_when_fdp_is_off_or_has_layers():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TriQDefWrapper(SmallCNN(width=4), lambda_fdp=0)
        TriQDefWrapper(SmallCNN(width=4), layers=["block1"])
        TriQDefWrapper(nn.Linear(3, 2), lambda_fdp=0.0)


# --- input_bits ------------------------------------------------------------------------------
def _manual(w: TriQDefWrapper, x: torch.Tensor, bits: int, first_grid: int) -> torch.Tensor:
    """tiny_cnn in eval mode at ``bits``, quantized by hand; the first conv's input on a
    ``first_grid``-bit grid."""
    net, i = w.model, w._ctx.qbits.index(bits)
    h = x
    for name, m in net.named_children():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            grid = first_grid if name == "0" else bits
            scale, signed = w.quantizers[name].scale(i, grid)
            h = fake_quantize_activation(h, scale, grid, signed)
            weight = fake_quantize_weight(m.weight, bits)
            h = (
                F.conv2d(h, weight, m.bias, padding=1)
                if name in "03"
                else F.linear(h, weight, m.bias)
            )
        elif isinstance(m, nn.BatchNorm2d):
            s = w.bn_stats[name]
            h = F.batch_norm(h, s.running_mean[i], s.running_var[i], m.weight, m.bias, eps=m.eps)
        else:
            h = m(h)
    return h


@pytest.mark.parametrize("input_bits", [None, 2, 8, 32])
def test_input_bits_quantizes_only_the_models_own_input_more_finely(input_bits):
    torch.manual_seed(0)
    net = tiny_cnn()
    w = TriQDefWrapper(net, bits=(32, 8, 2), layers=["2"], input_bits=input_bits)
    x = torch.randn(16, 3, 8, 8)
    seen = {}
    for n in ("0", "3"):  # registered after triqdef's: sees the quantized input
        net.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n: seen.update({n: a[0].detach().clone()})
        )
    with w.at_bits(2):
        w(x)
    floor = 2 if input_bits is None else max(2, input_bits)
    scale, signed = w.quantizers["0"].scale(w._ctx.qbits.index(2), floor)
    assert signed  # randn input: the signed grid
    if floor == 32:
        assert torch.equal(seen["0"], x)  # not quantized at all
    else:
        assert torch.equal(seen["0"], fake_quantize_activation(x, scale, floor, True))
        codes = seen["0"] / scale
        assert torch.allclose(codes, codes.round(), atol=1e-4)
    levels = len(torch.unique(seen["0"]))
    assert (levels > 4) == (floor > 2) and levels <= 2**floor
    assert len(torch.unique(seen["3"])) <= 4  # later layers stay at 2 bits
    # eval output = the same computation by hand; and the export reproduces it
    w.eval()
    with torch.no_grad(), w.at_bits(2):
        out = w(x)
    with torch.no_grad():
        torch.testing.assert_close(out, _manual(w, x, 2, floor), atol=1e-5, rtol=0)
        exported = w.export(2)
        assert isinstance(exported[0], QuantizedInputs) and exported[0].bits == floor
        assert exported[3].bits == 2
        assert torch.equal(exported(x), out)


def test_input_bits_none_is_todays_behaviour_bit_for_bit():
    torch.manual_seed(0)
    a, b = tiny_cnn(), tiny_cnn()
    b.load_state_dict(a.state_dict())
    old = TriQDefWrapper(a, bits=(32, 8, 2), layers=["2"], input_bits=None)
    new = TriQDefWrapper(b, bits=(32, 8, 2), layers=["2"], input_bits=8)
    x = torch.randn(8, 3, 8, 8)
    _warm(old, x)
    _warm(new, x)
    assert _same(_state(old.quantizers["0"]), _state(new.quantizers["0"]))  # same ranges
    old.eval()
    new.eval()
    with torch.no_grad():
        for bits in (32, 8):  # at or above input_bits nothing differs
            with old.at_bits(bits), new.at_bits(bits):
                assert torch.equal(old(x), new(x))
        with old.at_bits(2), new.at_bits(2):
            assert torch.equal(old(x), _manual(old, x, 2, 2))  # the first input at 2 bits
            assert not torch.equal(old(x), new(x))
    assert not any(h.__self__ is old._ctx for h in a._forward_pre_hooks.values())


def test_input_bits_follows_the_input_tensor_not_the_layer_name():
    class Normalised(nn.Module):  # the first conv reads a computed tensor, not the input
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_cnn()

        def forward(self, x):
            return self.net((x - 0.5) * 2)

    torch.manual_seed(0)
    w = TriQDefWrapper(Normalised(), bits=(32, 2), layers=["net.2"])
    with w.at_bits(2):
        w(torch.rand(4, 3, 8, 8))
    assert {n: q.reads_input for n, q in w.quantizers.items()} == {
        "net/0": False,
        "net/3": False,
        "net/8": False,
    }
    root = TriQDefWrapper(nn.Linear(6, 3), bits=(32, 2), lambda_fdp=0)  # the model is a layer
    x = torch.randn(5, 6)
    with root.at_bits(2):
        root(x)
    assert root.quantizers["<root>"].reads_input is True
    root.eval()
    with torch.no_grad(), root.at_bits(2):
        assert torch.equal(root.export(2)(x), root(x))


@pytest.mark.parametrize("bad", [True, 1, 0, 33, 8.0, "8", (8,)])
def test_bad_input_bits(bad):
    net = tiny_cnn()
    with pytest.raises(ConfigError, match="input_bits"):
        TriQDefWrapper(net, bits=(32, 4), layers=["2"], input_bits=bad)
    assert not net._forward_pre_hooks and not net[0]._forward_pre_hooks  # nothing attached


def test_input_bits_in_repr():
    assert "input_bits=8" in repr(TriQDefWrapper(tiny_cnn(), layers=["2"]))
    assert "input_bits=None" in repr(TriQDefWrapper(tiny_cnn(), layers=["2"], input_bits=None))


def test_save_load_keep_input_bits_and_the_layer_that_reads_the_input(tmp_path):
    torch.manual_seed(0)
    w = TriQDefWrapper(tiny_cnn(), bits=(32, 2), layers=["2"])
    x = torch.randn(8, 3, 8, 8)
    _warm(w, x)
    w.eval()
    with torch.no_grad(), w.at_bits(2):
        ref = w(x)
    path = tmp_path / "w.safetensors"
    triqdef.save(w, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["input_bits"]) == 8 and json.loads(meta["input_layers"]) == ["0"]

    fresh = TriQDefWrapper(tiny_cnn(), bits=(32, 2), layers=["2"]).eval()
    triqdef.load(fresh, path)
    assert fresh.quantizers["0"].reads_input is True
    with torch.no_grad():
        assert torch.equal(fresh.export(2)(x), ref)  # no forward needed after a load

    other = TriQDefWrapper(tiny_cnn(), bits=(32, 2), layers=["2"], input_bits=None)
    before = _state(other)
    with pytest.raises(CheckpointError, match="input_bits=8.*input_bits=None"):
        triqdef.load(other, path)
    assert _same(_state(other), before)

    # a file written before input_bits existed: it counts as input_bits=None
    old_meta = {k: v for k, v in meta.items() if k not in ("input_bits", "input_layers")}
    old = tmp_path / "old.safetensors"
    save_file(load_file(str(path)), str(old), metadata=old_meta)
    triqdef.load(other, old)
    with pytest.raises(CheckpointError, match="input_bits=None.*input_bits=8"):
        triqdef.load(TriQDefWrapper(tiny_cnn(), bits=(32, 2), layers=["2"]), old)


def test_export_below_input_bits_needs_to_know_which_layer_reads_the_input():
    torch.manual_seed(0)
    w = TriQDefWrapper(tiny_cnn(), bits=(32, 2), layers=["2"])
    x = torch.randn(8, 3, 8, 8)
    _warm(w, x)
    fresh = TriQDefWrapper(tiny_cnn(), bits=(32, 2), layers=["2"]).eval()
    fresh.load_state_dict(w.state_dict())  # no triqdef.load: nothing says who reads x
    with pytest.raises(NotCalibratedError, match="reads the model's input"):
        fresh.export(2)
    with torch.no_grad(), fresh.at_bits(2):
        ref = fresh(x)
        assert torch.equal(fresh.export(2)(x), ref)


def test_input_bits_hooks_trace_under_torch_compile():
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = tiny_cnn()
    w = TriQDefWrapper(net, bits=(32, 2), layers=["2"])
    x = torch.randn(8, 3, 8, 8)
    _warm(w, x)
    w.eval()
    with torch.no_grad(), w.at_bits(2):
        eager = w(x)
        assert torch.equal(eager, _manual(w, x, 2, 8))  # the first input on the 8-bit grid
        w.model = torch.compile(net, backend="eager")  # dynamo only: no new kernels
        compiled = w(x)
    assert torch.equal(compiled, eager)
    torch._dynamo.reset()
