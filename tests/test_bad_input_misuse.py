"""Misuse that used to end in a raw torch error or a silent wrong answer (issue #15, items
16 to 20): a memory-bounded backward run twice, the loss under ``inference_mode`` or
``no_grad``, labels of every integer width, images whose dtype is not the model's,
empty patches, labels outside the model's classes and devices that do not exist.

Policies checked here:

* labels: any integer dtype (int64, int32, int16, int8, uint8) is accepted everywhere and
  used as int64; float, bool and complex labels raise ``InputError``;
* images: their dtype must be the model's parameter dtype (any dtype under autocast);
  otherwise ``InputError`` naming both dtypes and the ``.to(dtype)`` fix. Nothing is
  cast silently;
* ``device=``: checked before anything runs; an unknown or absent device raises
  ``InputError`` listing the devices that exist;
* the loss under ``torch.inference_mode()`` raises ``InputError`` before any state
  changes; under ``torch.no_grad()`` it returns the value without a graph.
"""

from __future__ import annotations

import pytest
import torch
from hostile import NC, assert_unchanged, images, labels, net, snapshot, trained
from torch import nn

from triqdef import TriQDefWrapper
from triqdef import evaluate as ev
from triqdef.attacks import (
    LAVAN,
    AdversarialPatch,
    OnTheFlyPatch,
    PatchPool,
    apply_patch,
    random_locations,
)
from triqdef.errors import InputError

INT_DTYPES = [torch.int32, torch.int16, torch.int8, torch.uint8]
BAD_LABELS = {
    "float": lambda y: y.float(),
    "bool": lambda y: y > 0,
    "complex": lambda y: y.to(torch.complex64),
}


def _loss_and_grads(w: TriQDefWrapper, y: torch.Tensor, seed: int = 3):
    for p in w.parameters():
        p.grad = None
    torch.manual_seed(seed)
    loss = w.loss(images(), y)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in w.parameters()]


def _lavan(w):
    return LAVAN(w, patch_size=3, steps=2, seed=0)


def _gap(w):
    return AdversarialPatch(w, patch_size=3, steps=2, seed=0)


# --- item 16: memory-bounded backward with retain_graph -----------------------------------------
@pytest.mark.parametrize("memory_bounded", [False, True], ids=["exact", "memory_bounded"])
def test_backward_twice_with_retain_graph_doubles_the_gradients(memory_bounded):
    w = trained(memory_bounded=memory_bounded, penalty_bits=None)
    for p in w.parameters():
        p.grad = None
    torch.manual_seed(1)
    loss = w.loss(images(), labels())
    loss.backward(retain_graph=True)
    once = [p.grad.clone() for p in w.parameters()]
    loss.backward()
    for g1, p in zip(once, w.parameters()):
        torch.testing.assert_close(p.grad, 2 * g1)


def test_memory_bounded_retain_graph_matches_the_exact_gradients():
    grads = {}
    for mb in (False, True):
        w = trained(memory_bounded=mb, penalty_bits=None)
        for p in w.parameters():
            p.grad = None
        torch.manual_seed(1)
        loss = w.loss(images(), labels())
        loss.backward(retain_graph=True)
        loss.backward()
        grads[mb] = [p.grad.clone() for p in w.parameters()]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("memory_bounded", [False, True], ids=["exact", "memory_bounded"])
def test_second_backward_without_retain_graph_is_torchs_error_and_changes_nothing(
    memory_bounded,
):
    w = trained(memory_bounded=memory_bounded)
    loss = w.loss(images(), labels())
    loss.backward()
    snap = snapshot(w)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
    assert_unchanged(w, snap)


# --- item 17: inference_mode and no_grad -------------------------------------------------------
@pytest.mark.parametrize("memory_bounded", [False, True], ids=["exact", "memory_bounded"])
@pytest.mark.parametrize("lambda_gpdp", [0.5, 0.0], ids=["gpdp", "no_gpdp"])
def test_loss_under_inference_mode_raises_before_any_state_change(memory_bounded, lambda_gpdp):
    w = trained(memory_bounded=memory_bounded, lambda_gpdp=lambda_gpdp)
    snap = snapshot(w)
    terms = w.loss_terms()
    with torch.inference_mode(), pytest.raises(InputError, match="inference_mode.*autograd"):
        w.loss(images(), labels())
    assert_unchanged(w, snap)
    assert w.loss_terms() == terms


@pytest.mark.parametrize("memory_bounded", [False, True], ids=["exact", "memory_bounded"])
@pytest.mark.parametrize("lambda_gpdp", [0.5, 0.0], ids=["gpdp", "no_gpdp"])
def test_loss_under_no_grad_returns_the_value_without_a_graph(memory_bounded, lambda_gpdp):
    kw = dict(memory_bounded=memory_bounded, lambda_gpdp=lambda_gpdp)
    reference = trained(**kw)
    torch.manual_seed(3)
    expected = reference.loss(images(), labels()).item()

    w = trained(**kw)
    grads = [p.grad.clone() for p in w.parameters()]
    torch.manual_seed(3)
    with torch.no_grad():
        value = w.loss(images(), labels())
    assert not value.requires_grad and value.grad_fn is None
    assert value.item() == pytest.approx(expected, rel=1e-5)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, w.parameters()))
    assert all(m.training for m in w.modules())


@pytest.mark.parametrize("memory_bounded", [False, True], ids=["exact", "memory_bounded"])
def test_loss_takes_tensors_made_under_inference_mode(memory_bounded):
    w = trained(memory_bounded=memory_bounded)
    with torch.inference_mode():
        x, y, patch = images(), labels(), torch.rand(3, 2, 2)
    loss = w.loss(x, y, patch)
    loss.backward()
    assert torch.isfinite(loss.detach())


# --- item 18: labels of every integer width ----------------------------------------------------
@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("memory_bounded", [False, True], ids=["exact", "memory_bounded"])
def test_loss_accepts_integer_labels_of_any_width(dtype, memory_bounded):
    value, grads = _loss_and_grads(trained(memory_bounded=memory_bounded), labels())
    value_n, grads_n = _loss_and_grads(trained(memory_bounded=memory_bounded), labels().to(dtype))
    assert value_n == pytest.approx(value, rel=1e-6)
    for a, b in zip(grads, grads_n):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
@pytest.mark.parametrize("make", [_lavan, _gap], ids=["lavan", "gap"])
def test_attacks_accept_integer_labels_of_any_width(dtype, make):
    w = trained()
    snap = snapshot(w)
    ref = make(w)(images(), labels())
    got = make(w)(images(), labels().to(dtype))
    torch.testing.assert_close(got, ref)
    assert_unchanged(w, snap)


@pytest.mark.parametrize("dtype", INT_DTYPES, ids=str)
def test_evaluation_accepts_integer_labels_of_any_width(dtype):
    w = trained()
    snap = snapshot(w)
    y, yn = labels(), labels().to(dtype)
    x, x_adv = images(), apply_patch(images(), torch.zeros(3, 4, 4), torch.zeros(4, 2).long())
    assert ev.clean_accuracy(w, [(x, yn)]) == ev.clean_accuracy(w, [(x, y)])
    assert ev.attack_success_rate(w, x, x_adv, yn) == ev.attack_success_rate(w, x, x_adv, y)
    logits = torch.randn(4, NC, generator=torch.Generator().manual_seed(0))
    assert ev.asr_counts(logits, logits.flip(1), yn) == ev.asr_counts(logits, logits.flip(1), y)
    assert ev.asr_counts(None, logits, y, target=torch.tensor(1, dtype=dtype)) == ev.asr_counts(
        None, logits, y, target=1
    )

    def factory(model, bits):
        return LAVAN(model, patch_size=3, steps=1, bits=bits, seed=0)

    m = ev.transfer_matrix(w, factory, [(x, yn)], seed=0)
    m_ref = ev.transfer_matrix(w, factory, [(x, y)], seed=0)
    assert m.counts == m_ref.counts
    assert_unchanged(w, snap)


def _label_calls():
    x = images()
    logits = torch.zeros(4, NC)
    return {
        "loss": lambda w, y: w.loss(x, y),
        "lavan": lambda w, y: _lavan(w)(x, y),
        "gap": lambda w, y: _gap(w)(x, y),
        "gap fit": lambda w, y: _gap(w).fit([(x, y)]),
        "onthefly": lambda w, y: OnTheFlyPatch(w, patch_size=3, steps=1)(x, y),
        "pool build": lambda w, y: PatchPool.build(w, [(x, y)], sizes=(2,), steps=1),
        "clean_accuracy": lambda w, y: ev.clean_accuracy(w, [(x, y)]),
        "attack_success_rate": lambda w, y: ev.attack_success_rate(w, x, x, y),
        "asr_counts": lambda w, y: ev.asr_counts(logits, logits, y),
        "asr_counts target": lambda w, y: ev.asr_counts(None, logits, labels(), target=y),
        "transfer_matrix": lambda w, y: ev.transfer_matrix(
            w, lambda m, b: LAVAN(m, patch_size=3, steps=1, bits=b), [(x, y)]
        ),
        "alignment_report": lambda w, y: ev.alignment_report(w, [(x, y)]),
    }


@pytest.mark.parametrize("kind", list(BAD_LABELS))
@pytest.mark.parametrize("call", list(_label_calls()))
def test_non_integer_labels_raise_input_error_everywhere(kind, call):
    w = trained()
    snap = snapshot(w)
    with pytest.raises(InputError, match="integer"):
        _label_calls()[call](w, BAD_LABELS[kind](labels()))
    assert_unchanged(w, snap)


@pytest.mark.parametrize("memory_bounded", [False, True], ids=["exact", "memory_bounded"])
@pytest.mark.parametrize("shift", [NC + 2, -1], ids=["too_high", "negative"])
def test_loss_labels_outside_the_classes_name_the_label(memory_bounded, shift):
    w = trained(memory_bounded=memory_bounded)
    snap = snapshot(w)
    y = labels()
    y[1] = shift
    with pytest.raises(InputError, match=rf"label {shift} .*{NC} classes"):
        w.loss(images(), y.to(torch.int32) if shift >= 0 else y)
    assert_unchanged(w, snap)


# --- item 19: images whose dtype is not the model's ---------------------------------------------
def _dtype_calls():
    def factory(model, bits):
        return LAVAN(model, patch_size=3, steps=1, bits=bits)

    return {
        "loss": lambda w, x: w.loss(x, labels()),
        "lavan": lambda w, x: _lavan(w)(x, labels()),
        "gap": lambda w, x: _gap(w)(x, labels()),
        "gap fit": lambda w, x: _gap(w).fit([(x, labels())]),
        "onthefly": lambda w, x: OnTheFlyPatch(w, patch_size=3, steps=1)(x, labels()),
        "clean_accuracy": lambda w, x: ev.clean_accuracy(w, [(x, labels())]),
        "attack_success_rate x_clean": lambda w, x: ev.attack_success_rate(
            w, x, images(), labels()
        ),
        "attack_success_rate x_adv": lambda w, x: ev.attack_success_rate(w, images(), x, labels()),
        "transfer_matrix": lambda w, x: ev.transfer_matrix(w, factory, [(x, labels())]),
        "alignment_report": lambda w, x: ev.alignment_report(w, [(x, labels())]),
        "plain model clean_accuracy": lambda w, x: ev.clean_accuracy(net(), [(x, labels())]),
        "plain model lavan": lambda w, x: _lavan(net())(x, labels()),
    }


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("call", list(_dtype_calls()))
def test_images_of_another_dtype_raise_input_error_naming_both(dtype, call):
    w = trained()
    snap = snapshot(w)
    with pytest.raises(InputError, match=rf"{dtype}.*torch.float32.*\.to\(torch.float32\)"):
        _dtype_calls()[call](w, images().to(dtype))
    assert_unchanged(w, snap)


def test_attacks_accept_any_dtype_under_autocast():
    w = trained()
    snap = snapshot(w)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _lavan(w)(images().bfloat16(), labels())
    assert out.dtype == torch.bfloat16 and out.shape == images().shape
    assert_unchanged(w, snap)


def test_a_double_model_takes_double_images():
    model = net().double()
    x = images().double()
    assert _lavan(model)(x, labels()).dtype == torch.float64
    assert set(ev.clean_accuracy(model, [(x, labels())])) == {32}


def test_per_bit_models_of_different_dtypes_are_refused():
    w = trained()
    with pytest.raises(InputError, match="different dtypes"):
        ev.transfer_matrix(
            {32: net().double(), 8: w},
            lambda m, b: LAVAN(m, patch_size=3, steps=1),
            [(images(), labels())],
        )


# --- item 20: empty patches, labels outside the classes, devices --------------------------------
@pytest.mark.parametrize(
    "shape", [(3, 0, 0), (3, 0, 2), (3, 2, 0), (0, 2, 2), (4, 3, 0, 2), (0, 3, 2, 2)], ids=str
)
def test_apply_patch_refuses_an_empty_patch(shape):
    with pytest.raises(InputError, match="empty"):
        apply_patch(images(), torch.rand(shape))
    with pytest.raises(InputError, match="empty"):
        apply_patch(images(), torch.rand(shape), locations=torch.zeros(4, 2).long())


@pytest.mark.parametrize("bad", [NC, NC + 7, -1])
def test_clean_accuracy_refuses_labels_outside_the_classes(bad):
    w = trained()
    snap = snapshot(w)
    y = labels()
    y[2] = bad
    good = (images(), labels())
    with pytest.raises(InputError, match=rf"label {bad} \(sample 2.*{NC} classes"):
        ev.clean_accuracy(w, [good, (images(), y)])
    assert_unchanged(w, snap)


def test_clean_accuracy_still_reports_nan_images_first():
    w = trained()
    x = images()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        ev.clean_accuracy(w, [(x, labels() + NC)])


def _device_calls():
    data = [(images(), labels())]

    def factory(model, bits):
        return LAVAN(model, patch_size=3, steps=1, bits=bits)

    pool = PatchPool([torch.rand(3, 2, 2)])
    return {
        "clean_accuracy": lambda w, d: ev.clean_accuracy(w, data, device=d),
        "transfer_matrix": lambda w, d: ev.transfer_matrix(w, factory, data, device=d),
        "transfer_matrix per-bit": lambda w, d: ev.transfer_matrix(
            {32: net()}, factory, data, device=d
        ),
        "alignment_report": lambda w, d: ev.alignment_report(w, data, device=d),
        "random_locations": lambda w, d: random_locations(4, (8, 8), (2, 2), device=d),
        "pool to_batch": lambda w, d: pool.to_batch(device=d),
    }


BAD_DEVICES = {"bogus": "bogus", "meta": "meta", "list": ["cpu"], "bool": True}
if not torch.cuda.is_available():
    BAD_DEVICES.update({"cuda": "cuda", "cuda index": 0, "cuda:1": torch.device("cuda", 1)})
else:
    BAD_DEVICES["cuda beyond count"] = f"cuda:{torch.cuda.device_count()}"


@pytest.mark.parametrize("device", list(BAD_DEVICES))
@pytest.mark.parametrize("call", list(_device_calls()))
def test_a_device_that_does_not_exist_raises_input_error(device, call):
    w = trained()
    snap = snapshot(w)
    with pytest.raises(InputError, match="device") as err:
        _device_calls()[call](w, BAD_DEVICES[device])
    if device not in ("list", "bool"):
        assert "available devices: cpu" in str(err.value)
    assert_unchanged(w, snap)


def test_valid_devices_are_accepted():
    w = trained()
    data = [(images(), labels())]
    assert ev.clean_accuracy(w, data, device="cpu") == ev.clean_accuracy(w, data)
    assert ev.clean_accuracy(w, data, device=torch.device("cpu")) == ev.clean_accuracy(w, data)
    assert random_locations(4, (8, 8), (2, 2), device="cpu").device.type == "cpu"
    pool = PatchPool([torch.rand(3, 2, 2)])
    assert pool.to_batch(device="cpu")[(2, 2)].shape == (1, 3, 2, 2)
    with pytest.raises(InputError, match="floating"):
        pool.to_batch(dtype=torch.long)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device")
def test_a_device_other_than_the_models_is_refused():
    w = trained()
    snap = snapshot(w)
    with pytest.raises(InputError, match="model is on cpu"):
        ev.clean_accuracy(w, [(images(), labels())], device="cuda")
    assert_unchanged(w, snap)


def test_attack_success_rate_checks_where_the_images_are():
    w = trained()
    snap = snapshot(w)
    meta = torch.empty(4, 3, 8, 8, device="meta")
    with pytest.raises(InputError, match="meta"):
        ev.attack_success_rate(w, meta, meta, labels())
    assert_unchanged(w, snap)


def test_plain_module_without_parameters_runs_on_any_existing_device():
    class Pick(nn.Module):
        def forward(self, x):
            return x[:, 0, 0, :NC]

    assert ev.clean_accuracy(Pick(), [(images(), labels())], device="cpu")[32] >= 0
