"""`lambda_cos` / `lambda_smooth`: the GAL/TRS-style gradient-diversity penalties."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BITS, _batch, _run, _wrapper, fixed_patch, small_net  # noqa: F401
from torch import nn

from triqdef import TriQDefWrapper
from triqdef import objective as objective_module
from triqdef.errors import ConfigError
from triqdef.losses import gradient_alignment, gradient_smoothness


def _state(w):
    return {k: v.clone() for k, v in w.state_dict().items()}


def _spy_on_grad(monkeypatch) -> list[bool]:
    """Record the ``create_graph`` flag of every ``torch.autograd.grad`` call."""
    calls = []
    real_grad = torch.autograd.grad

    def spy(outputs, inputs, *a, **kw):
        calls.append(kw.get("create_graph", False))
        return real_grad(outputs, inputs, *a, **kw)

    monkeypatch.setattr(torch.autograd, "grad", spy)
    return calls


def _input_grads(w, x, y, bits, patch=fixed_patch):
    """By hand: the patched rows' input gradient of the summed cross-entropy per bit-width,
    on the mixed batch (rho = 0.5: the last half of the rows are patched)."""
    n = x.shape[0] - x.shape[0] // 2
    xm = torch.cat([x[:n], patch(x[n:], y[n:], w)])
    grads = {}
    for b in bits:
        xin = xm.clone().requires_grad_()
        with w.at_bits(b):
            logits = w(xin)
        ce = F.cross_entropy(logits[n:], y[n:], reduction="sum")
        grads[b] = torch.autograd.grad(ce, xin)[0][n:]
    return grads


# --- defaults: today's objective, bit for bit -------------------------------------------------
@pytest.mark.parametrize("memory_bounded", [False, True])
def test_defaults_are_todays_objective(memory_bounded, monkeypatch):
    w = _wrapper(memory_bounded=memory_bounded, penalty_bits=None)  # every pair
    assert w.lambda_cos == 0.0 and w.lambda_smooth == 0.0
    assert "lambda_cos" not in w.extra_repr() and "lambda_smooth" not in w.extra_repr()
    calls = _spy_on_grad(monkeypatch)
    x, y = _batch()
    total = w.loss(x, y, patch=fixed_patch)
    # GPDP's input gradient, once per bit-width, and nothing more
    assert calls == [not memory_bounded] * len(BITS)
    t = w._last_terms
    assert not {"cos", "smooth"} & t.keys() and not any(k.startswith("cos/") for k in t)
    # the total is exactly today's sum of today's terms
    expected = t["clean"] + 1.0 * t["adv"] + 0.8 * t["fdp"] + 0.5 * t["gpdp"]
    assert torch.equal(total.detach(), expected)


def test_without_any_penalty_no_input_gradient_is_taken(monkeypatch):
    w = _wrapper(lambda_fdp=0.0, lambda_gpdp=0.0)

    def refuse(*a, **k):
        raise AssertionError("no input gradient expected")

    monkeypatch.setattr(torch.autograd, "grad", refuse)
    w.loss(*_batch(), patch=fixed_patch).backward()


# --- values equal a hand computation ----------------------------------------------------------
@pytest.mark.parametrize("pairs", ["mean", "sum"])
def test_cos_and_smooth_equal_a_hand_computation(pairs):
    w = _wrapper(
        lambda_fdp=0.0,
        lambda_gpdp=0.0,
        lambda_cos=0.7,
        lambda_smooth=0.3,
        pairs=pairs,
        penalty_bits=None,  # the exact objective: every pair
    )
    x, y = _batch()
    state = _state(w)
    g = _input_grads(w, x, y, BITS)  # train mode: moves observers and BN statistics ...
    w.load_state_dict(state)  # ... so the loss starts from the same state
    total = w.loss(x, y, patch=fixed_patch)
    t = w._last_terms  # float64 (loss_terms() converts to float32)

    sims = {}
    for a, b in itertools.combinations(BITS, 2):
        cos = F.cosine_similarity(g[a].flatten(1), g[b].flatten(1), dim=1, eps=0.0)
        sims[a, b] = cos.abs().mean()
        torch.testing.assert_close(t[f"cos/{a}-{b}"], sims[a, b], rtol=1e-10, atol=1e-12)
    mean = torch.stack(list(sims.values())).mean()
    cos_ref = mean if pairs == "mean" else 2 * torch.stack(list(sims.values())).sum()
    smooth_ref = torch.stack([g[b].flatten(1).square().sum(1).mean() for b in BITS]).mean()
    torch.testing.assert_close(t["cos"], cos_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(t["smooth"], smooth_ref, rtol=1e-10, atol=1e-12)
    # the terms are real: pairs differ, nothing degenerate
    assert 0 < float(mean) < 1 and len({round(float(v), 6) for v in sims.values()}) > 1
    assert float(smooth_ref) > 0
    ref_total = t["clean"] + t["adv"] + 0.7 * cos_ref + 0.3 * smooth_ref
    torch.testing.assert_close(total.detach(), ref_total, rtol=1e-12, atol=1e-12)
    floats = w.loss_terms()
    assert {"cos", "smooth"} <= floats.keys() and "gpdp" not in floats
    assert {k for k in floats if "-" in k} == {f"cos/{a}-{b}" for a, b in sims}


def test_alignment_is_the_absolute_per_sample_cosine():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) - 0.5
    b = torch.rand(3, 2, 4, 4, generator=g, dtype=torch.float64) - 0.5
    flip = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64).view(3, 1, 1, 1)
    sim = gradient_alignment([a, b, a * flip])
    cos = F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)
    torch.testing.assert_close(sim[0, 1], cos.abs().mean())
    torch.testing.assert_close(sim[1, 0], sim[0, 1])
    # a sign flip of a sample's gradient is still perfect alignment (TRS's |cos|)
    torch.testing.assert_close(sim[0, 2], torch.tensor(1.0, dtype=torch.float64))
    assert sim.shape == (3, 3)


def test_alignment_against_partner_maps_and_in_half_precision():
    g = torch.Generator().manual_seed(1)
    a = [torch.rand(3, 2, 4, 5, generator=g, dtype=torch.float64) - 0.5 for _ in range(2)]
    b = [torch.rand(3, 2, 4, 5, generator=g, dtype=torch.float64) - 0.5 for _ in range(2)]
    sim = gradient_alignment(a, b)  # row i: a[i], column j: the partner b[j]
    for i, j in itertools.product(range(2), repeat=2):
        cos = F.cosine_similarity(a[i].flatten(1), b[j].flatten(1), dim=1)
        torch.testing.assert_close(sim[i, j], cos.abs().mean())
    assert not torch.allclose(sim, gradient_alignment(a))  # the partners are really read
    # float16 maps are computed in float32 (the result says so), like the float32 upcast
    half = [m.half() for m in a]
    sim_h = gradient_alignment(half)
    assert sim_h.dtype == torch.float32
    torch.testing.assert_close(sim_h, gradient_alignment([m.float() for m in half]))
    smooth = gradient_smoothness(half[0])
    assert smooth.dtype == torch.float32
    torch.testing.assert_close(smooth, gradient_smoothness(half[0].float()))


def test_zero_gradients_give_zero_cosine_and_finite_gradients():
    a = torch.zeros(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    b = torch.rand(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    sim = gradient_alignment([a, b])
    assert sim[0, 1] == 0 and sim[1, 0] == 0
    torch.testing.assert_close(sim[1, 1], torch.tensor(1.0, dtype=torch.float64))
    (sim.sum() + gradient_smoothness(a)).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


# --- differentiable, double backward included -------------------------------------------------
def test_gradcheck_through_the_penalties():
    """float64 gradcheck of the objective with only the new terms, w.r.t. a full-precision
    convolution's weight behind a quantized first layer (so the function is smooth in it:
    no rounding depends on it), in eval mode (observers frozen)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),  # quantized: the bit-widths' input gradients differ
        nn.Tanh(),
        nn.Conv2d(3, 3, 3, padding=1),  # full precision: the parameter checked
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 6 * 7, 4),
    ).double()
    w = TriQDefWrapper(
        net,
        bits=(32, 8, 4),
        exclude=["2", "5"],
        lambda_adv=0.0,
        lambda_fdp=0.0,
        lambda_gpdp=0.0,
        lambda_cos=1.0,
        lambda_smooth=10.0,
        rho=1.0,
        penalty_bits=None,  # every pair: no random draw, fn is a fixed function
    )
    g = torch.Generator().manual_seed(3)
    x = torch.rand(3, 1, 6, 7, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (3,), generator=g)
    w.loss(x, y, patch=fixed_patch)  # the observers see data once
    w.eval()

    def fn(v):  # wrapper(x, y, patch) is wrapper.loss(x, y, patch)
        return torch.func.functional_call(w, {"model.2.weight": v}, (x, y, fixed_patch))

    v = net[2].weight.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(fn, (v,))
    t = w.loss_terms()
    assert t["cos"] > 0 and t["smooth"] > 0 and t["adv"] > 0  # adv is weighted by 0


def test_gradcheck_of_the_penalty_functions_to_second_order():
    g = torch.Generator().manual_seed(0)
    maps = [
        torch.rand(2, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True) - 0.5
        for _ in range(3)
    ]

    def fn(*ms):
        return gradient_alignment(list(ms)).sum() + sum(gradient_smoothness(m) for m in ms)

    assert torch.autograd.gradcheck(fn, tuple(maps))
    assert torch.autograd.gradgradcheck(fn, tuple(maps))


@pytest.mark.parametrize("name", ["lambda_cos", "lambda_smooth"])
def test_the_penalty_alone_moves_the_weights(name):
    """rho=1 and lambda_adv=0: the cross-entropy carries no gradient, the penalty does."""
    grads = {}
    for value in (0.0, 1.0):
        w = _wrapper(lambda_fdp=0.0, lambda_gpdp=0.0, lambda_adv=0.0, rho=1.0, **{name: value})
        x, y = _batch()
        w.loss(x, y, patch=fixed_patch).backward()
        grads[value] = w.model[0].weight.grad
    assert grads[0.0] is None or not grads[0.0].any()
    assert grads[1.0] is not None and grads[1.0].abs().max() > 1e-8


# --- memory-bounded: the same loss and gradients --------------------------------------------------
@pytest.mark.parametrize("pairs", ["mean", "sum"])
@pytest.mark.parametrize("penalty_bits", [None, 2])
@pytest.mark.parametrize("gpdp", [0.0, 0.5])
def test_memory_bounded_gives_the_same_gradients(pairs, penalty_bits, gpdp):
    res = []
    for memory_bounded in (False, True):
        w = _wrapper(
            bits=(32, 8, 5, 2),
            pairs=pairs,
            memory_bounded=memory_bounded,
            penalty_bits=penalty_bits,
            lambda_gpdp=gpdp,
            lambda_cos=1.0,
            lambda_smooth=0.5,
        )
        w.model.insert(3, nn.Dropout(0.3))  # randomness must be replayed identically
        x, y = _batch()
        x.requires_grad_()
        torch.manual_seed(2)
        loss = w.loss(x, y)
        loss.backward()
        grads = [p.grad.clone() for p in w.parameters()]
        res.append((loss.detach(), grads, x.grad, w.loss_terms(), _state(w)))
    (l0, g0, x0, t0, s0), (l1, g1, x1, t1, s1) = res
    assert t0 == t1 and "cos" in t0 and "smooth" in t0
    torch.testing.assert_close(l0, l1, rtol=1e-12, atol=1e-12)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x0, x1, rtol=1e-9, atol=1e-12)
    assert any(a.abs().max() > 0 for a in g0)
    assert all(torch.equal(s0[k], s1[k]) for k in s0)


def test_memory_bounded_differs_without_the_penalty_gradient():
    """The replay's penalty terms matter: turning them off in the replay only changes the
    gradient (guards the test above against a replay that ignores them)."""
    w = _wrapper(
        lambda_fdp=0.0,
        lambda_gpdp=0.0,
        lambda_cos=1.0,
        lambda_smooth=1.0,
        memory_bounded=True,
        penalty_bits=None,  # every pair: both calls use the same objective
    )
    x, y = _batch()
    state = _state(w)
    _, ref = _run(w, x, y)
    w.load_state_dict(state)
    loss = w.loss(x, y, patch=fixed_patch)
    w.lambda_cos = w.lambda_smooth = 0.0  # read by the replay
    w.zero_grad(set_to_none=True)
    loss.backward()
    got = torch.cat([p.grad.flatten() for p in w.parameters()])
    assert not torch.allclose(got, ref)


# --- penalty_bits ------------------------------------------------------------------------------
@pytest.mark.parametrize("memory_bounded", [False, True])
@pytest.mark.parametrize("m, active", [(4, BITS), (7, BITS), (2, (8, 4))])
def test_penalty_bits_at_least_k_is_bit_for_bit_exact(memory_bounded, m, active):
    x, y = _batch(dtype=torch.float32)
    out = []
    for penalty_bits in (None, m):
        w = _wrapper(
            dtype=torch.float32,
            memory_bounded=memory_bounded,
            penalty_bits=penalty_bits,
            lambda_cos=1.0,
            lambda_smooth=0.5,
        )
        w.set_active_bits(active)
        loss, grad = _run(w, x, y, seed=3, patch=None)
        out.append((loss, grad, torch.get_rng_state(), w.loss_terms()))
    (l0, g0, r0, t0), (l1, g1, r1, t1) = out
    assert torch.equal(l0, l1) and torch.equal(g0, g1) and torch.equal(r0, r1)
    assert t0 == t1 and "cos" in t0 and not any(k.startswith("penalty_bits/") for k in t1)


@pytest.mark.parametrize("pairs", ["mean", "sum"])
def test_every_subset_averages_to_the_exact_objective(pairs, monkeypatch):
    """The sampled cos (with the pair-sum factor) and smooth are unbiased: the mean over all
    C(K, m) samples equals the exact loss and gradient."""
    x, y = _batch()
    kw = dict(pairs=pairs, lambda_fdp=0.0, lambda_gpdp=0.0, lambda_cos=1.0, lambda_smooth=0.5)
    w = _wrapper(**kw, penalty_bits=None)  # the exact objective
    state = _state(w)
    exact = _run(w, x, y)
    for m in (2, 3):
        w.penalty_bits = m
        losses, grads = [], []
        for subset in itertools.combinations(BITS, m):
            w.load_state_dict(state)
            monkeypatch.setattr(objective_module, "_draw_penalty_bits", lambda w, b, s=subset: s)
            loss, grad = _run(w, x, y)
            assert {k for k in w.loss_terms() if k.startswith("cos/")} == {
                f"cos/{a}-{b}" for a, b in itertools.combinations(subset, 2)
            }
            losses.append(loss)
            grads.append(grad)
        assert torch.stack(losses).std() > 0  # the samples do differ
        torch.testing.assert_close(torch.stack(losses).mean(), exact[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.stack(grads).mean(0), exact[1], rtol=1e-9, atol=1e-12)
        w.penalty_bits = None
        w.load_state_dict(state)


def test_only_sampled_bits_take_the_input_gradient(monkeypatch):
    w = _wrapper(
        bits=(32, 8, 5, 4, 2), penalty_bits=2, lambda_fdp=0.0, lambda_gpdp=0.0, lambda_smooth=1.0
    )
    calls = _spy_on_grad(monkeypatch)
    torch.manual_seed(0)
    w.loss(*_batch(), patch=fixed_patch)
    assert calls == [True, True]  # with create_graph although lambda_gpdp == 0


# --- validation and repr ------------------------------------------------------------------
BAD = [-1.0, -1e-9, math.nan, math.inf, True, False, "1", None, [1.0]]


@pytest.mark.parametrize("name", ["lambda_cos", "lambda_smooth"])
@pytest.mark.parametrize("value", BAD, ids=repr)
def test_bad_weights_are_refused_before_any_change(name, value):
    torch.manual_seed(0)
    net = small_net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(ConfigError, match=name):
        TriQDefWrapper(net, bits=BITS, layers=["2"], **{name: value})
    hooks = [(*mod._forward_pre_hooks, *mod._forward_hooks) for mod in net.modules()]
    assert not any(hooks)  # refused before any hook was attached
    after = net.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_weights_are_stored_as_floats_and_shown_when_on():
    w = _wrapper(lambda_cos=1, lambda_smooth=0.25)
    assert type(w.lambda_cos) is float and w.lambda_cos == 1.0 and w.lambda_smooth == 0.25
    r = w.extra_repr()
    assert "lambda_cos=1.0" in r and "lambda_smooth=0.25" in r
    w2 = _wrapper(lambda_cos=0.5)
    assert "lambda_cos=0.5" in w2.extra_repr() and "lambda_smooth" not in w2.extra_repr()
