"""`penalty_bits`: FDP and GPDP over the pairs of a random sample of the active bit-widths."""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from conftest import BITS, _batch, _run, _wrapper, fixed_patch, small_net  # noqa: F401
from torch import nn

from triqdef import TriQDefWrapper
from triqdef import objective as objective_module
from triqdef.errors import ConfigError


def _sampled(w) -> tuple[int, ...]:
    t = w.loss_terms()
    if not any(k.startswith("penalty_bits/") for k in t):
        return w.active_bits
    return tuple(b for b in w.active_bits if t[f"penalty_bits/{b}"] == 1.0)


# --- (1) unbiased --------------------------------------------------------------------------
@pytest.mark.parametrize("pairs", ["mean", "sum"])
def test_every_subset_averages_to_the_exact_objective(pairs, monkeypatch):
    """Deterministic: the mean over all C(K, m) samples equals the exact loss and gradient."""
    x, y = _batch()
    w = _wrapper(pairs=pairs, penalty_bits=None)  # the exact objective
    state = {k: v.clone() for k, v in w.state_dict().items()}
    exact = _run(w, x, y)
    for m in (2, 3):
        w.penalty_bits = m
        subsets = list(itertools.combinations(BITS, m))
        losses, grads = [], []
        for subset in subsets:
            w.load_state_dict(state)  # the same observers and BN statistics for every call
            monkeypatch.setattr(objective_module, "_draw_penalty_bits", lambda w, b, s=subset: s)
            loss, grad = _run(w, x, y)
            assert _sampled(w) == subset
            losses.append(loss)
            grads.append(grad)
        torch.testing.assert_close(torch.stack(losses).mean(), exact[0], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(torch.stack(grads).mean(0), exact[1], rtol=1e-9, atol=1e-12)
        w.penalty_bits = None
        w.load_state_dict(state)


@pytest.mark.parametrize("pairs", ["mean", "sum"])
def test_seeded_draws_are_uniform_and_unbiased(pairs):
    """400 seeded calls: every pair is drawn, and the sample means of the loss and of the
    parameter gradient are within 5 standard errors (computed from the draws) of the exact
    values. Seeds are fixed, so the outcome is deterministic, not flaky."""
    n = 400
    x, y = _batch()
    w = _wrapper(pairs=pairs, penalty_bits=None)  # the exact objective
    state = {k: v.clone() for k, v in w.state_dict().items()}
    exact_loss, exact_grad = _run(w, x, y)
    w.penalty_bits = 2
    losses, grads, seen = [], [], []
    for seed in range(n):
        w.load_state_dict(state)
        loss, grad = _run(w, x, y, seed=seed)
        losses.append(loss)
        grads.append(grad)
        seen.append(_sampled(w))
    assert all(len(s) == 2 for s in seen)
    counts = {p: seen.count(p) for p in itertools.combinations(BITS, 2)}
    assert all(c > 0 for c in counts.values()) and sum(counts.values()) == n
    for samples, exact in ((torch.stack(losses), exact_loss), (torch.stack(grads), exact_grad)):
        mean, se = samples.mean(0), samples.std(0) / n**0.5
        assert (se > 0).any()  # the penalty varies with the draw
        bound = 5 * se + 1e-9 * (1 + exact.abs())
        assert ((mean - exact).abs() <= bound).all(), ((mean - exact).abs() / se).max()


# --- (2) validation ------------------------------------------------------------------------
BAD = [1, 0, -2, True, False, 2.0, 2.5, "2", (2,)]


@pytest.mark.parametrize("m", BAD, ids=repr)
def test_bad_penalty_bits_is_refused_at_construction(m):
    net = small_net()
    with pytest.raises(ConfigError, match="penalty_bits must be None .* an int >= 2"):
        TriQDefWrapper(net, bits=BITS, layers=["2"], penalty_bits=m)
    hooks = [(*mod._forward_pre_hooks, *mod._forward_hooks) for mod in net.modules()]
    assert not any(hooks)  # refused before any hook was attached


@pytest.mark.parametrize("m", BAD, ids=repr)
def test_bad_penalty_bits_is_refused_on_assignment(m):
    w = _wrapper(penalty_bits=3)
    with pytest.raises(ConfigError, match="penalty_bits"):
        w.penalty_bits = m
    assert w.penalty_bits == 3
    assert "penalty_bits=3" in w.extra_repr()
    w.penalty_bits = None
    assert w.penalty_bits is None and "penalty_bits=None" in w.extra_repr()
    w.penalty_bits = 2  # the default: shown too, so the repr says that pairs are sampled
    assert w.penalty_bits == 2 and "penalty_bits=2" in w.extra_repr()


# --- the default: two sampled bit-widths, one pair per penalty --------------------------------
def test_the_default_samples_two_bits_one_pair_per_penalty():
    assert inspect.signature(TriQDefWrapper).parameters["penalty_bits"].default == 2
    bits = (32, 8, 5, 4, 2)  # K = 5: ten pairs under the exact objective
    w = _wrapper(bits=bits, lambda_cos=1.0)  # penalty_bits left at its default
    assert w.penalty_bits == 2 and "penalty_bits=2" in w.extra_repr()
    torch.manual_seed(0)
    w.loss(*_batch())
    t = w.loss_terms()
    sample = _sampled(w)
    assert len(sample) == 2 and sum(t[f"penalty_bits/{b}"] for b in bits) == 2
    for name in ("fdp", "gpdp", "cos"):
        pair_keys = [k for k in t if k.startswith(f"{name}/") and "-" in k]
        assert pair_keys == [f"{name}/{sample[0]}-{sample[1]}"]  # exactly one pair term
    assert {f"clean/{b}" for b in bits} <= t.keys()  # cross-entropy still over all K


@pytest.mark.parametrize("memory_bounded", [False, True])
def test_without_a_sampled_penalty_nothing_is_drawn(memory_bounded):
    """QAT / multi-bit baselines (no FDP, GPDP, cos, smooth) keep the default: no draw,
    the same loss, RNG state and terms as penalty_bits=None."""
    x, y = _batch()
    out = []
    for penalty_bits in (None, 2):
        w = _wrapper(
            bits=(32, 8, 5, 4, 2),
            lambda_fdp=0.0,
            lambda_gpdp=0.0,
            memory_bounded=memory_bounded,
            penalty_bits=penalty_bits,
        )
        loss, grad = _run(w, x, y, seed=3, patch=None)  # RandomPatch draws from the same RNG
        out.append((loss, grad, torch.get_rng_state(), w.loss_terms()))
    (l0, g0, r0, t0), (l1, g1, r1, t1) = out
    assert torch.equal(l0, l1) and torch.equal(g0, g1) and torch.equal(r0, r1)
    assert t0 == t1 and not any(k.startswith("penalty_bits/") for k in t1)


# --- (3) m >= K is the exact objective, bit for bit -----------------------------------------
@pytest.mark.parametrize("memory_bounded", [False, True])
@pytest.mark.parametrize("pairs", ["mean", "sum"])
@pytest.mark.parametrize("m, active", [(4, BITS), (9, BITS), (2, (8, 4)), (3, (8, 4, 2))])
def test_penalty_bits_at_least_k_is_bit_for_bit_exact(memory_bounded, pairs, m, active):
    x, y = _batch(dtype=torch.float32)
    out = []
    for penalty_bits in (None, m):
        w = _wrapper(
            dtype=torch.float32,
            pairs=pairs,
            memory_bounded=memory_bounded,
            penalty_bits=penalty_bits,
        )
        w.set_active_bits(active)  # BACT: fewer active bit-widths than m
        loss, grad = _run(w, x, y, seed=3, patch=None)  # RandomPatch draws from the same RNG
        out.append((loss, grad, torch.get_rng_state(), w.loss_terms()))
    (l0, g0, r0, t0), (l1, g1, r1, t1) = out
    assert torch.equal(l0, l1) and torch.equal(g0, g1)
    assert torch.equal(r0, r1)  # no random number drawn for the sample
    assert t0 == t1 and not any(k.startswith("penalty_bits/") for k in t1)


# --- (4) memory-bounded replay uses the forward's sample ------------------------------------
@pytest.mark.parametrize("pairs", ["mean", "sum"])
def test_memory_bounded_gives_the_same_loss_and_gradients(pairs):
    res = []
    for memory_bounded in (False, True):
        w = _wrapper(bits=(32, 8, 5, 4, 2), pairs=pairs, memory_bounded=memory_bounded)
        w.penalty_bits = 3
        w.model.insert(3, nn.Dropout(0.3))  # randomness must be replayed identically
        x, y = _batch()
        x.requires_grad_()
        torch.manual_seed(2)
        loss = w.loss(x, y)
        loss.backward()
        grads = [p.grad.clone() for p in w.parameters()]
        res.append((loss.detach(), grads, x.grad, _sampled(w), torch.get_rng_state()))
    (l0, g0, x0, s0, r0), (l1, g1, x1, s1, r1) = res
    assert len(s0) == 3 and s0 == s1 and torch.equal(r0, r1)
    torch.testing.assert_close(l0, l1, rtol=1e-12, atol=1e-12)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(x0, x1, rtol=1e-9, atol=1e-12)
    assert any(a.abs().max() > 0 for a in g0)


# --- (5) reproducible ------------------------------------------------------------------------
def test_the_same_seed_draws_the_same_bits():
    x, y = _batch()
    w = _wrapper(bits=(32, 8, 5, 4, 2), penalty_bits=2)
    draws = {}
    for seed in (0, 1, 2, 3, 4, 5, 0, 1, 2):
        torch.manual_seed(seed)
        w.loss(x, y)
        draws.setdefault(seed, set()).add(_sampled(w))
    assert all(len(d) == 1 for d in draws.values())  # a seed always gives one sample
    assert len({next(iter(d)) for d in draws.values()}) > 1  # seeds give different samples


# --- (6) loss_terms ----------------------------------------------------------------------------
@pytest.mark.parametrize("pairs", ["mean", "sum"])
@pytest.mark.parametrize("m", [2, 3])
def test_loss_terms_show_only_the_sampled_pairs(pairs, m):
    w = _wrapper(bits=(32, 8, 5, 4, 2), pairs=pairs, penalty_bits=m)
    w.set_active_bits([8, 5, 4, 2])  # K = 4
    torch.manual_seed(4)
    total = w.loss(*_batch())
    t = w.loss_terms()
    sample = _sampled(w)
    assert len(sample) == m and set(sample) <= {8, 5, 4, 2}
    assert sum(t[f"penalty_bits/{b}"] for b in (8, 5, 4, 2)) == m
    expected = {
        f"{name}/{a}-{b}" for name in ("fdp", "gpdp") for a, b in itertools.combinations(sample, 2)
    }
    assert {k for k in t if "-" in k} == expected
    k = 4
    for name in ("fdp", "gpdp"):
        sims = [t[f"{name}/{a}-{b}"] for a, b in itertools.combinations(sample, 2)]
        estimate = (
            sum(sims) / len(sims)
            if pairs == "mean"
            else 2 * sum(sims) * k * (k - 1) / (m * (m - 1))
        )
        assert t[name] == pytest.approx(estimate, rel=1e-6)  # loss_terms is float32
    assert total.item() == pytest.approx(t["clean"] + t["adv"] + 0.8 * t["fdp"] + 0.5 * t["gpdp"])
    assert {f"clean/{b}" for b in (8, 5, 4, 2)} <= t.keys()  # cross-entropy over all K


# --- cost: only the sample builds taps and input gradients --------------------------------------
@pytest.mark.parametrize("memory_bounded", [False, True])
def test_only_sampled_bits_tap_and_differentiate_the_input(memory_bounded, monkeypatch):
    w = _wrapper(bits=(32, 8, 5, 4, 2), penalty_bits=2, memory_bounded=memory_bounded)
    grads, taps = [], []
    real_grad, real_capture = torch.autograd.grad, w._taps.capture

    def grad(outputs, inputs, *a, **kw):
        grads.append(kw.get("create_graph", False))
        return real_grad(outputs, inputs, *a, **kw)

    def capture():
        taps.append(w.current_bits)
        return real_capture()

    monkeypatch.setattr(torch.autograd, "grad", grad)
    monkeypatch.setattr(w._taps, "capture", capture)
    torch.manual_seed(0)
    loss = w.loss(*_batch())
    sample = _sampled(w)
    assert taps == list(sample) and len(grads) == 2  # forward: one input gradient per bit
    assert grads == [not memory_bounded] * 2  # a double-backward graph only in exact mode
    taps.clear()
    grads.clear()
    loss.backward()
    if memory_bounded:  # the replay: taps and input gradients for the same two bit-widths
        assert taps == list(sample) and grads.count(True) == 2
