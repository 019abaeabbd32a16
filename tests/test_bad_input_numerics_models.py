"""Hostile numerics and unusual models (issue #15, items 1, 2 and 11 to 15).

Non-finite values never reach an observer and never come out of a quantizer as a
finite value; models that return tuples, dicts or ``(B, K, 1, 1)`` logits, models cast
after wrapping, layers that never run, parametrized weights and two threads sharing
one wrapper are either supported or refused with an error of the triqdef family that
changes nothing.
"""

from __future__ import annotations

import copy
import pickle
import threading
import warnings
from collections import namedtuple

import pytest
import torch
from hostile import (
    BITS,
    NC,
    assert_unchanged,
    images,
    labels,
    net,
    snapshot,
    trained,
    with_inf,
    with_nan,
)
from safetensors.torch import load_file
from torch import nn
from torch.nn.utils import parametrize

import triqdef
from triqdef import TriQDefWrapper
from triqdef.errors import (
    ConcurrentUseError,
    ConfigError,
    InputError,
    NotCalibratedError,
    TriQDefError,
)
from triqdef.quant import fake_quantize_activation

BAD = {"nan": with_nan, "+inf": with_inf, "-inf": lambda t: with_inf(t, -1.0)}


def _observers(w: TriQDefWrapper) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in w.state_dict().items() if k.startswith("quantizers.")}


def _wrap(model: nn.Module, **kwargs) -> TriQDefWrapper:
    kwargs.setdefault("layers", [])
    kwargs.setdefault("lambda_fdp", 0.0)
    return TriQDefWrapper(model, bits=BITS, **kwargs)


# --- item 1: observers never learn a non-finite value --------------------------------------
@pytest.mark.parametrize("bad", sorted(BAD))
@pytest.mark.parametrize("call", ["forward", "features"])
def test_training_forward_with_nonfinite_input_leaves_every_observer_as_it_was(bad, call):
    w = trained()
    w.train()
    before = _observers(w)
    with w.at_bits(8):
        if call == "forward":
            w(BAD[bad](images()))
        else:
            w.features(BAD[bad](images()))
    after = _observers(w)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"{k} moved on a {bad} batch"
        assert torch.isfinite(after[k].float()).all()


def test_a_skipped_batch_does_not_change_what_the_next_finite_batch_teaches():
    x, x2 = images(), images(seed=7)
    skipped, plain = trained(), trained()
    with skipped.at_bits(4):
        skipped(with_nan(x))
        skipped(x2)
    with plain.at_bits(4):
        plain(x2)
    a, b = _observers(skipped), _observers(plain)
    for k in a:
        torch.testing.assert_close(a[k], b[k])


def test_a_fresh_observer_skips_a_nonfinite_first_batch_and_stays_uncalibrated():
    torch.manual_seed(0)
    w = _wrap(net())
    w.train()
    with w.at_bits(8):
        out = w(with_nan(images()))  # no error: the batch is skipped
    assert torch.isnan(out[0]).all()
    assert w.calibrated_bits() == (32,)
    with w.at_bits(8):
        w(images())
    assert w.calibrated_bits() == (32, 8)
    assert all(torch.isfinite(v.float()).all() for v in _observers(w).values())


def test_calibrate_refuses_batches_whose_activations_overflow_and_changes_nothing():
    w = trained()
    snap = snapshot(w)
    with pytest.raises(InputError, match="NaN or Inf") as info:
        w.calibrate([images() * 3e38])
    assert "BatchNorm statistics of '1'" in str(info.value)  # the variance overflows
    assert_unchanged(w, snap)


def test_calibrate_refuses_overflow_in_one_batch_among_good_ones():
    w = trained()
    snap = snapshot(w)
    with pytest.raises(InputError, match="overflow"):
        w.calibrate([images(), images() * 3e38, images(seed=3)], bits=[4])
    assert_unchanged(w, snap)


class Square(nn.Module):
    def forward(self, x):
        return x * x


def test_calibrate_names_the_layer_whose_input_overflowed():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        Square(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, NC),
    )
    w = _wrap(model)
    w.calibrate([images()])
    snap = snapshot(w)
    with pytest.raises(InputError, match="input of '2'"):
        w.calibrate([images() * 1e25])  # finite; squared, it is not
    assert_unchanged(w, snap)


# --- item 2: NaN in, NaN out; Inf never saturates to a finite value ------------------------
@pytest.mark.parametrize("bits", [8, 4])
def test_eval_with_nan_input_gives_nan_logits_like_the_float_model(bits):
    w = trained()
    w.eval()
    xn = with_nan(images())
    with w.at_bits(32):
        ref = w(xn)
    with w.at_bits(bits):
        out = w(xn)
    assert torch.isnan(out[0]).all()
    assert torch.isfinite(out[1:]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("bits", [8, 4])
def test_eval_with_inf_input_never_gives_finite_logits_for_that_sample(bits, sign):
    w = trained()
    w.eval()
    xi = with_inf(images(), sign)  # the last pixel of the last sample
    with w.at_bits(bits):
        out = w(xi)
    assert not torch.isfinite(out[-1]).all()
    assert torch.isfinite(out[:-1]).all()


def test_exported_model_also_gives_nan_for_nan_input():
    w = trained()
    exported = w.export(4)
    out = exported(with_nan(images()))
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1:]).all()


def test_activation_quantizer_turns_nonfinite_into_nan_and_keeps_the_ste():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3, 5.0, -5.0])
    x.requires_grad_(True)
    out = fake_quantize_activation(x, torch.tensor(0.1), 4, signed=True)
    assert torch.isnan(out[:3]).all()  # never a finite grid value
    torch.testing.assert_close(out[3:].detach(), torch.tensor([0.3, 0.7, -0.7]))
    out.sum().backward()
    # finite entries: 1 inside the grid, 0 where clipped (the fused op's STE)
    assert x.grad[3:].tolist() == [1.0, 0.0, 0.0]
    ref = torch.tensor([0.3, 5.0, -5.0], requires_grad=True)
    zero = torch.zeros((), dtype=torch.int32)
    torch.fake_quantize_per_tensor_affine(ref, torch.tensor(0.1), zero, -7, 7).sum().backward()
    assert torch.equal(x.grad[3:], ref.grad)


def test_gradients_of_finite_inputs_are_those_of_the_fused_op_with_double_backward():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(64, generator=g) * 2).requires_grad_(True)
    scale, zero = torch.tensor(0.05), torch.zeros((), dtype=torch.int32)
    ours = fake_quantize_activation(x, scale, 4, signed=True)
    ref = torch.fake_quantize_per_tensor_affine(x, scale, zero, -7, 7)
    (g1,) = torch.autograd.grad((ours**2).sum(), x, create_graph=True)
    (g2,) = torch.autograd.grad((ref**2).sum(), x, create_graph=True)
    torch.testing.assert_close(g1, g2)
    (h1,) = torch.autograd.grad(g1.sum(), x)
    (h2,) = torch.autograd.grad(g2.sum(), x)
    torch.testing.assert_close(h1, h2)


# --- item 11: what the model returns -----------------------------------------------------------
GoogLeNetLike = namedtuple("GoogLeNetLike", ["logits", "aux_logits2", "aux_logits1"])


class Returns(nn.Module):
    """The hostile CNN, its logits handed back in another container or shape."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.body = net()
        self.kind = kind

    def forward(self, x):
        z = self.body(x)
        if self.kind == "tensor":
            return z
        if self.kind == "tuple":
            return z, z.detach() * 0
        if self.kind == "namedtuple":
            return GoogLeNetLike(z, z * 0.3, z * 0.3)
        if self.kind == "googlenet":
            from torchvision.models import GoogLeNetOutputs

            return GoogLeNetOutputs(z, z * 0.3, z * 0.3)
        if self.kind == "dict":
            return {"logits": z, "hidden": x}
        if self.kind == "out":
            return {"out": z}
        if self.kind == "bk1":
            return z[:, :, None]
        if self.kind == "bk11":
            return z[:, :, None, None]
        if self.kind == "bkhw":
            return z[:, :, None, None].expand(-1, -1, 2, 2)
        if self.kind == "b":
            return z[:, 0]
        if self.kind == "nokey":
            return {"scores": z}
        if self.kind == "notensor":
            return ("logits", z)
        raise AssertionError(self.kind)


def _loss_of(kind: str) -> torch.Tensor:
    torch.manual_seed(0)
    w = _wrap(Returns(kind))
    torch.manual_seed(1)
    return w.loss(images(), labels())


@pytest.mark.parametrize("kind", ["tuple", "namedtuple", "googlenet", "dict", "out", "bk1", "bk11"])
def test_loss_takes_the_logits_out_of_common_model_outputs(kind):
    if kind == "googlenet":
        pytest.importorskip("torchvision")
    loss = _loss_of(kind)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, _loss_of("tensor"))
    loss.backward()


def test_memory_bounded_backward_also_takes_the_logits_out_of_a_tuple():
    torch.manual_seed(0)
    w = _wrap(Returns("namedtuple"), memory_bounded=True)
    torch.manual_seed(1)
    w.loss(images(), labels()).backward()
    grads = [p.grad for p in w.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_the_wrapper_call_still_returns_what_the_model_returns():
    torch.manual_seed(0)
    w = _wrap(Returns("dict"))
    out = w(images())
    assert isinstance(out, dict) and set(out) == {"logits", "hidden"}


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("bkhw", "segmentation"),
        ("b", r"shape \(4,\)"),
        ("nokey", "scores"),
        ("notensor", "str"),
    ],
)
def test_loss_refuses_outputs_without_classification_logits_and_changes_nothing(kind, words):
    torch.manual_seed(0)
    w = _wrap(Returns(kind))
    snap = snapshot(w)
    with pytest.raises(InputError, match=words):
        w.loss(images(), labels())
    assert_unchanged(w, snap)


# --- item 12: the model cast after wrapping ---------------------------------------------------
@pytest.mark.parametrize("how", ["wrapper", "model"])
def test_double_works_whether_the_wrapper_or_only_the_model_is_cast(how):
    w = trained()
    (w if how == "wrapper" else w.model).double()
    x = images().double()
    with w.at_bits(8):
        w(x)  # training mode: the 8-bit BatchNorm rows are updated in float64
    w.eval()
    outs = {}
    for b in (8, 4):
        with w.at_bits(b):
            outs[b] = w(x)
        assert outs[b].dtype == torch.float64 and torch.isfinite(outs[b]).all()
    for stats in w.bn_stats.values():
        assert stats.running_mean.dtype == torch.float64
        assert stats.running_var.dtype == torch.float64


def test_model_double_and_wrapper_double_give_the_same_outputs():
    a, b = trained(), trained()
    a.double()
    b.model.double()
    a.eval(), b.eval()
    x = images().double()
    for bits in (8, 4):
        with a.at_bits(bits), b.at_bits(bits):
            torch.testing.assert_close(a(x), b(x))


def test_model_half_after_wrapping_runs_at_every_bit_width():
    w = trained()
    w.model.half()
    w.eval()
    for b in (32, 8, 4):
        with w.at_bits(b):
            out = w(images().half())
        assert out.dtype == torch.float16 and torch.isfinite(out).all()


# --- item 13: a layer that never runs ---------------------------------------------------------
class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = net()
        self.unused = nn.Linear(NC, NC)  # defined, never called

    def forward(self, x):
        return self.body(x)


def _unused_wrapper() -> TriQDefWrapper:
    torch.manual_seed(0)
    w = _wrap(WithUnused())
    w.loss(images(), labels()).backward()
    return w


def test_a_layer_that_never_runs_does_not_block_calibrated_bits_or_export():
    w = _unused_wrapper()
    assert w.calibrated_bits() == BITS
    assert w.uncalled_layers() == ["unused"]
    with pytest.warns(UserWarning, match="unused"):
        exported = w.export(4)
    assert isinstance(exported.unused, nn.Linear)  # left in full precision
    assert torch.equal(exported.unused.weight, w.model.unused.weight)
    w.eval()
    with w.at_bits(4):
        ref = w(images())
    torch.testing.assert_close(exported(images()), ref)


def test_calibrate_warns_once_about_layers_it_never_reached():
    torch.manual_seed(0)
    w = _wrap(WithUnused())
    with pytest.warns(UserWarning, match=r"\['unused'\]"):
        w.calibrate([images()])
    assert w.calibrated_bits() == BITS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w.calibrate([images()])  # the same layers: no second warning
        w.export(8)


def test_a_fresh_wrapper_has_no_uncalled_layers_and_still_refuses_export():
    torch.manual_seed(0)
    w = _wrap(WithUnused())
    assert w.uncalled_layers() == [] and w.calibrated_bits() == (32,)
    snap = snapshot(w)
    with pytest.raises(NotCalibratedError):
        w.export(4)
    assert_unchanged(w, snap)


# --- item 14: parametrized weights -------------------------------------------------------------
def _new_weight_norm(m):
    return nn.utils.parametrizations.weight_norm(m)


def _new_spectral_norm(m):
    return nn.utils.parametrizations.spectral_norm(m)


def _old_weight_norm(m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of parametrizations
        return nn.utils.weight_norm(m)


def _old_spectral_norm(m):
    return nn.utils.spectral_norm(m)


PARAMETRIZE = {
    "weight_norm": _new_weight_norm,
    "spectral_norm": _new_spectral_norm,
    "old_weight_norm": _old_weight_norm,
    "old_spectral_norm": _old_spectral_norm,
}


def _parametrized(kind: str) -> nn.Module:
    torch.manual_seed(0)
    model = net()
    model[0] = PARAMETRIZE[kind](model[0])
    model[7] = PARAMETRIZE[kind](model[7])
    return model


@pytest.mark.parametrize("kind", sorted(PARAMETRIZE))
def test_parametrized_weights_are_quantized_and_trained(kind):
    model = _parametrized(kind)
    w = _wrap(model)
    w.loss(images(), labels()).backward()
    underlying = [n for n, p in model[0].named_parameters() if p.grad is not None]
    assert underlying and "bias" in underlying and len(underlying) >= 2

    seen = []
    model[0].register_forward_pre_hook(lambda m, a: seen.append(m.weight.detach().clone()))
    w.eval()
    with w.at_bits(4):
        w(images())
    per_channel = seen[-1].flatten(1)
    assert all(len(torch.unique(c)) <= 15 for c in per_channel)  # the 4-bit grid
    outside = model[0].weight.detach().flatten(1)  # read between calls: not quantized
    assert any(len(torch.unique(c)) > 15 for c in outside)


@pytest.mark.parametrize("kind", sorted(PARAMETRIZE))
def test_parametrized_weights_export_as_plain_quantized_parameters(kind):
    model = _parametrized(kind)
    w = _wrap(model)
    w.loss(images(), labels()).backward()
    w.eval()
    snap = snapshot(w)
    exported = w.export(4)
    assert_unchanged(w, snap)
    with w.at_bits(4):
        ref = w(images())
    torch.testing.assert_close(exported(images()), ref)
    assert not parametrize.is_parametrized(exported[0].layer)
    assert isinstance(exported[0].layer._parameters["weight"], nn.Parameter)
    if kind.startswith("old"):
        assert not exported[0].layer._forward_pre_hooks
    else:
        assert parametrize.is_parametrized(model[0], "weight")  # the wrapper's stays


@pytest.mark.parametrize("kind", sorted(PARAMETRIZE))
def test_parametrized_weights_save_as_integer_codes(kind, tmp_path):
    # save_quantized read the layer's own weight parameter, which a parametrized layer lacks
    w = _wrap(_parametrized(kind))
    w.loss(images(), labels()).backward()
    w.eval()
    exported = w.export(4)
    path = tmp_path / "q.safetensors"
    triqdef.save_quantized(w, path, bits=4)
    stored = load_file(path)
    codes, scale = stored["0.layer.weight"], stored["0.layer.weight_scale"]
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= 7  # the 4-bit grid
    weight = codes.float() * scale.reshape(-1, *([1] * (codes.ndim - 1)))
    torch.testing.assert_close(weight, exported[0].layer.weight.detach())


@pytest.mark.parametrize("kind", sorted(PARAMETRIZE))
def test_parametrized_model_at_32_bits_and_after_detach_is_the_bare_model(kind):
    model = _parametrized(kind)
    model.eval()
    with torch.no_grad():
        bare = model(images())
    w = _wrap(model)
    with torch.no_grad(), w.at_bits(32):
        assert torch.equal(w(images()), bare)
    w.detach()
    if not kind.startswith("old"):
        assert not model[0].parametrizations.weight._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(images()), bare)


def test_a_weight_the_quantizer_cannot_swap_is_refused_at_construction():
    model = net()
    layer = model[7]
    del layer.weight
    layer.weight = torch.randn(NC, 4)  # a plain tensor, recomputed by nothing
    with pytest.raises(ConfigError, match=r"'7'.*exclude=\['7'\]"):
        _wrap(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    w = _wrap(model, exclude=["7"])
    assert "7" not in w.quantized_layers()


# --- item 15: two threads, one wrapper -----------------------------------------------------------
def _in_thread(fn):
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed back to the test
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout=60)
    assert not t.is_alive()
    return box


def test_a_second_thread_cannot_switch_the_bit_width_under_the_first():
    w = trained()
    w.eval()
    x = images()
    with w.at_bits(8):
        expected = w(x)
    inside, release, seen = threading.Event(), threading.Event(), {}

    def first():
        with w.at_bits(8):
            inside.set()
            release.wait(timeout=60)
            seen["bits"] = w.current_bits
            seen["out"] = w(x)

    t = threading.Thread(target=first)
    t.start()
    assert inside.wait(timeout=60)
    snap = snapshot(w)
    try:
        with pytest.raises(ConcurrentUseError, match="another thread"):
            with w.at_bits(4):
                pass
        with pytest.raises(ConcurrentUseError):
            w.set_bits(4)
        with pytest.raises(ConcurrentUseError):
            w.calibrate([x])
        with pytest.raises(ConcurrentUseError):
            w.loss(x, labels())
        assert_unchanged(w, snap)
    finally:
        release.set()
        t.join(timeout=60)
    assert seen["bits"] == 8
    assert torch.equal(seen["out"], expected)
    assert w.current_bits == 32  # restored by the thread that switched it


def test_threads_taking_turns_and_nesting_in_one_thread_are_fine():
    w = trained()
    w.eval()

    def block():
        with w.at_bits(4):
            return w.current_bits

    assert _in_thread(block) == {"value": 4}
    assert w.current_bits == 32
    with w.at_bits(8), w.at_bits(4):  # nested in one thread
        assert w.current_bits == 4
    assert w.current_bits == 32
    assert _in_thread(lambda: w.set_bits(4).current_bits) == {"value": 4}
    w.set_bits(32)


def test_a_backward_on_another_thread_may_switch_bits_for_the_holder():
    # CUDA runs backward on the autograd engine's device thread; the memory-bounded
    # backward switches bit-widths there while the caller may sit inside at_bits.
    w = trained()
    seen = []

    class SwitchesBits(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            with w.at_bits(4):
                seen.append(w.current_bits)
            return g

    x = torch.ones(3, requires_grad=True)
    with w.at_bits(8):
        box = _in_thread(lambda: SwitchesBits.apply(x).sum().backward())
        assert "error" not in box and seen == [4]
        assert w.current_bits == 8
        assert _in_thread(lambda: w.set_bits(4)).get("error").__class__ is ConcurrentUseError
    assert w.current_bits == 32


def test_concurrent_use_error_is_in_the_family_and_copies_get_a_fresh_guard():
    assert issubclass(ConcurrentUseError, TriQDefError)
    assert issubclass(ConcurrentUseError, RuntimeError)
    w = trained()
    with w.at_bits(8):
        twin = copy.deepcopy(w)
        clone = pickle.loads(pickle.dumps(w))
    for other in (twin, clone):
        assert _in_thread(lambda o=other: o.set_bits(4).current_bits) == {"value": 4}
