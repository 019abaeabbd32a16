"""wrapper.loss: the TriQDef objective, its modes, its inputs and its failure behaviour."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from triqdef import TriQDefWrapper
from triqdef import objective as objective_module
from triqdef.attacks import RandomPatch
from triqdef.errors import InputError, NonFiniteLossError
from triqdef.losses import describe, pair_similarity, penalty

BITS = (32, 8, 5, 4, 2)


def small_net(channels: int = 1) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 5),
    )


def _wrapper(bits=BITS, **kw) -> TriQDefWrapper:
    torch.manual_seed(0)
    return TriQDefWrapper(small_net(), bits=bits, layers=["2", "4"], **kw)


def _batch(b=6, h=10, w=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, h, w, generator=g), torch.randint(0, 5, (b,), generator=g)


def _state(w):
    return {k: v.clone() for k, v in w.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- value ---------------------------------------------------------------------------------
def test_total_is_the_weighted_sum_of_its_terms():
    w = _wrapper(penalty_bits=None)  # the exact objective: every pair
    x, y = _batch()
    total = w.loss(x, y)
    t = w.loss_terms()
    expected = t["clean"] + 1.0 * t["adv"] + 0.8 * t["fdp"] + 0.5 * t["gpdp"]
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert t["clean"] == pytest.approx(sum(t[f"clean/{b}"] for b in BITS) / 5, rel=1e-6)
    assert {f"fdp/{a}-{b}" for a, b in itertools.combinations(BITS, 2)} <= t.keys()
    # pairs="mean": the penalty is the mean of the pair similarities
    assert t["gpdp"] == pytest.approx(
        sum(t[f"gpdp/{a}-{b}"] for a, b in itertools.combinations(BITS, 2)) / 10, rel=1e-5
    )


def test_without_penalties_the_loss_is_multi_bit_cross_entropy():
    w = _wrapper(lambda_fdp=0.0, lambda_gpdp=0.0)
    x, y = _batch(b=6)
    patched = []

    def source(xs, ys, wrapper):
        out = RandomPatch(3)(xs)
        patched.append(out)
        return out

    torch.manual_seed(5)
    total = w.loss(x, y, patch=source)
    xm = torch.cat([x[:3], patched[0]])  # rho = 0.5: the last 3 samples are patched
    ref_clean, ref_adv = 0.0, 0.0
    for b in BITS:
        with w.at_bits(b):
            logits = w(xm)
        ref_clean += F.cross_entropy(logits[:3], y[:3]) / 5
        ref_adv += F.cross_entropy(logits[3:], y[3:]) / 5
    torch.testing.assert_close(total, ref_clean + ref_adv, rtol=1e-5, atol=1e-6)
    assert "fdp" not in w.loss_terms() and "gpdp" not in w.loss_terms()


def test_switched_off_penalties_take_no_taps_and_no_double_backward(monkeypatch):
    w = _wrapper(lambda_fdp=0.0, lambda_gpdp=0.0)
    x, y = _batch()

    def refuse(*a, **k):
        raise AssertionError("not expected")

    monkeypatch.setattr(objective_module.torch.autograd, "grad", refuse)
    monkeypatch.setattr(w._taps, "capture", refuse)
    w.loss(x, y).backward()


def test_pairs_sum_is_the_papers_ordered_sum():
    x, y = _batch()
    terms = {}
    for pairs in ("mean", "sum"):
        w = _wrapper(bits=(32, 8, 4), pairs=pairs, penalty_bits=None)  # every ordered pair
        torch.manual_seed(3)
        w.loss(x, y)
        terms[pairs] = w.loss_terms()
    for name in ("fdp", "gpdp"):
        assert terms["sum"][name] == pytest.approx(6 * terms["mean"][name], rel=1e-5)


def test_one_bit_width_has_no_pair_penalty():
    w = _wrapper(bits=(32, 4))
    w.set_active_bits([4])
    x, y = _batch()
    w.loss(x, y).backward()
    t = w.loss_terms()
    assert t["fdp"] == 0 and t["gpdp"] == 0


@pytest.mark.parametrize(
    "b, rho, rows",
    [
        (8, 0.5, (4, 4)),
        (5, 0.5, (3, 2)),
        (1, 0.5, (1, 1)),
        (4, 0.0, (4, 0)),
        (4, 1.0, (0, 4)),
        (2, 0.1, (1, 1)),
    ],
)
def test_patched_share_of_the_batch(b, rho, rows):
    w = _wrapper(bits=(32, 4), rho=rho)
    seen = []
    w.model[0].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    x, y = _batch(b=b)
    w.loss(x, y)
    assert seen[0] == rows[0] + rows[1]
    t = w.loss_terms()
    assert (t["clean"] != 0) == (rows[0] > 0) and (t["adv"] != 0) == (rows[1] > 0)


def test_patch_forms():
    x, y = _batch(b=6)
    w = _wrapper(bits=(32, 4))
    for patch in (None, torch.rand(1, 3, 3), torch.rand(7, 1, 2, 4), RandomPatch((2, 5))):
        loss = w.loss(x, y, patch=patch)
        assert torch.isfinite(loss)
    calls = []

    def source(xs, ys, wrapper):
        calls.append((xs.shape, ys.shape, wrapper))
        return xs.flip(-1)

    w.loss(x, y, patch=source)
    assert calls == [(torch.Size([3, 1, 10, 12]), torch.Size([3]), w)]


# --- gradients -----------------------------------------------------------------------------
def _grads(memory_bounded: bool, bits=(32, 8, 4, 2), x_grad=False):
    torch.manual_seed(0)
    net = small_net().double()
    w = TriQDefWrapper(
        net, bits=bits, layers=["2", "4"], memory_bounded=memory_bounded, penalty_bits=None
    )  # the exact objective (tests/test_penalty_bits.py covers the sampled one)
    w.model.insert(3, nn.Dropout(0.3))  # randomness must be replayed identically
    g = torch.Generator().manual_seed(1)
    x = torch.rand(5, 1, 9, 11, generator=g, dtype=torch.float64).requires_grad_(x_grad)
    y = torch.randint(0, 5, (5,), generator=g)
    torch.manual_seed(2)
    loss = w.loss(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    return loss.detach(), grads, x.grad, _state(w)


@pytest.mark.parametrize("x_grad", [False, True])
def test_memory_bounded_mode_gives_the_same_gradients(x_grad):
    exact = _grads(False, x_grad=x_grad)
    bounded = _grads(True, x_grad=x_grad)
    assert exact[0] == bounded[0]
    for a, b in zip(exact[1], bounded[1]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert any(a.abs().max() > 0 for a in exact[1])
    if x_grad:
        torch.testing.assert_close(exact[2], bounded[2], rtol=1e-9, atol=1e-12)
    assert _same(exact[3], bounded[3])  # observers and BN statistics moved exactly once


def test_penalty_machinery_gradcheck():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 2, 6, 7, generator=g, dtype=torch.float64, requires_grad=True)
    cfg = describe.__defaults__[0].__class__(k=5.0)

    def fn(a, b):
        return penalty(pair_similarity([describe(a, cfg), describe(b, cfg)]))

    assert torch.autograd.gradcheck(fn, (a, b))
    assert torch.autograd.gradgradcheck(fn, (a, b))


def test_only_row_gradients_sum_to_the_full_gradient():
    g = torch.Generator().manual_seed(0)
    maps = [
        torch.rand(3, 2, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    ]
    full = penalty(pair_similarity([describe(m) for m in maps]), "mean")
    ref = torch.autograd.grad(full, maps)
    got = []
    for i, m in enumerate(maps):
        ds = [describe(x) if j == i else describe(x).detach() for j, x in enumerate(maps)]
        part = penalty(pair_similarity(ds, [d.detach() for d in ds]), "mean", only=i)
        got.append(torch.autograd.grad(part, m)[0])
    for r, q in zip(ref, got):
        torch.testing.assert_close(r, q)


@settings(deadline=None, max_examples=20)
@given(
    b=st.integers(1, 3),
    h=st.integers(1, 9),
    wd=st.integers(1, 9),
    kind=st.sampled_from(["random", "zero", "constant", "saturated"]),
    bits=st.sets(st.sampled_from(BITS), min_size=1),
    value=st.floats(0.0, 1.0),
)
def test_loss_and_all_gradients_are_finite(b, h, wd, kind, bits, value):
    torch.manual_seed(0)
    w = TriQDefWrapper(small_net(), bits=BITS, layers=["2", "4"])
    w.set_active_bits(bits)
    x = {
        "random": torch.rand(b, 1, h, wd),
        "zero": torch.zeros(b, 1, h, wd),
        "constant": torch.full((b, 1, h, wd), value),
        "saturated": torch.full((b, 1, h, wd), 1e4),
    }[kind].requires_grad_()
    y = torch.randint(0, 5, (b,))
    patch = torch.full((1, max(1, h // 2), max(1, wd // 2)), value)
    loss = w.loss(x, y, patch=patch)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    for p in w.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()


# --- bad input -------------------------------------------------------------------------------
def _bad_inputs():
    x, y = _batch()
    nan_x = x.clone()
    nan_x[0, 0, 0, 0] = float("nan")
    inf_patch = torch.rand(1, 3, 3)
    inf_patch[0, 1, 1] = float("inf")
    return {
        "nan in x": (nan_x, y, None, "NaN"),
        "inf in patch": (x, y, inf_patch, "patch"),
        "label too large": (x, torch.full_like(y, 5), None, "labels"),
        "negative label": (x, torch.full_like(y, -1), None, "labels"),
        "patch too large": (x, y, torch.rand(1, 11, 3), "larger"),
        "patch channels": (x, y, torch.rand(3, 3, 3), "channels"),
        "float labels": (x, y.float(), None, "integer"),
        "label shape": (x, y[:3], None, "shape"),
        "x not 4d": (x[0], y, None, r"\(B, C, H, W\)"),
        "x device": (x.to("meta"), y, None, "is on meta"),
        "patch type": (x, y, "patch.png", "patch must be"),
        "empty batch": (x[:0], y[:0], None, "empty"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
@pytest.mark.parametrize("memory_bounded", [False, True])
def test_bad_input_raises_and_changes_nothing(case, memory_bounded):
    w = _wrapper(memory_bounded=memory_bounded)
    w.loss(*_batch())  # observers and BN rows hold data
    before = _state(w)
    x, y, patch, match = _bad_inputs()[case]
    with pytest.raises(InputError, match=match):
        w.loss(x, y, patch=patch)
    assert _same(_state(w), before)
    assert all(isinstance(p, nn.Parameter) for p in w.model.parameters())


def test_non_finite_term_is_named_and_changes_nothing():
    w = _wrapper()
    w.loss(*_batch())
    before = _state(w)

    def poison(module, args, output):  # the 4-bit model produces NaN
        return output * float("nan") if w.current_bits == 4 else output

    handle = w.model[7].register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match="at 4 bits") as info:
        w.loss(*_batch())
    handle.remove()
    assert isinstance(info.value, ValueError)
    assert _same(_state(w), before)


# --- nothing accumulates; DDP ------------------------------------------------------------------
def test_nothing_is_kept_between_steps():
    w = _wrapper()
    opt = torch.optim.SGD(w.parameters(), lr=0.01)
    for seed in range(3):
        opt.zero_grad()
        w.loss(*_batch(seed=seed)).backward()
        opt.step()
        assert w._taps._store == {} and w._recent is None
    assert all(type(p) is nn.Parameter for p in w.model.parameters())


def test_forward_with_labels_returns_the_loss_and_works_under_ddp(tmp_path):
    import torch.distributed as dist

    x, y = _batch()
    w = _wrapper()
    torch.manual_seed(7)
    ref = w.loss(x, y)
    ref.backward()
    ref_grads = [p.grad.clone() for p in w.parameters()]

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        w2 = _wrapper()
        ddp = nn.parallel.DistributedDataParallel(w2)
        torch.manual_seed(7)
        loss = ddp(x, y, None)
        loss.backward()
    finally:
        dist.destroy_process_group()
    torch.testing.assert_close(loss, ref)
    for a, p in zip(ref_grads, w2.parameters()):
        torch.testing.assert_close(p.grad, a)
