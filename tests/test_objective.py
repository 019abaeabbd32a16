"""wrapper.loss: the TriQDef objective, its modes, its inputs and its failure behaviour."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from conftest import _batch as f64_batch
from conftest import _wrapper as f64_wrapper
from conftest import fixed_patch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from triqdef import TriQDefWrapper
from triqdef import objective as objective_module
from triqdef.attacks import RandomPatch
from triqdef.errors import ConfigError, InputError, NonFiniteLossError
from triqdef.functional import (
    descriptor_cosine,
    sobel_edges,
    soft_binarize,
    soft_dice,
    soft_hog,
)
from triqdef.losses import DescriptorConfig, describe, pair_similarity, penalty

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
def _independent_similarity(da, db, alpha, beta):
    """``alpha * SoftDice(E_a, E_b) + beta * cos(H_a, H_b)``, sample mean, from the public
    metrics of triqdef.functional (not from pair_similarity)."""
    ea, eb = da.edges, db.edges
    dice = soft_dice(ea.view(ea.shape[0], 1, 1, -1), eb.view(eb.shape[0], 1, 1, -1))
    return (alpha * dice + beta * descriptor_cosine(da.hog, db.hog)).mean()


def test_pair_similarity_is_alpha_dice_plus_beta_cosine():
    g = torch.Generator().manual_seed(4)
    maps = [torch.rand(3, 2, 8, 9, generator=g, dtype=torch.float64) for _ in range(3)]
    ds = [describe(m) for m in maps]
    alpha, beta = 0.3, 1.7  # unequal, so swapping them changes the value
    sim = pair_similarity(ds, alpha=alpha, beta=beta)
    assert sim.shape == (3, 3)
    for i, j in itertools.product(range(3), repeat=2):
        ref = _independent_similarity(ds[i], ds[j], alpha, beta)
        torch.testing.assert_close(sim[i, j], ref, rtol=1e-9, atol=1e-12)
    # each weight alone: the two terms really are the dice and the cosine
    dice_only = pair_similarity(ds, alpha=1.0, beta=0.0)
    cos_only = pair_similarity(ds, alpha=0.0, beta=1.0)
    torch.testing.assert_close(sim, alpha * dice_only + beta * cos_only, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(dice_only, cos_only, atol=1e-3)
    # the documented defaults: alpha = 0.5, beta = 1.0
    torch.testing.assert_close(pair_similarity(ds), 0.5 * dice_only + 1.0 * cos_only)
    # a partner list: row i of `a` against column j of `b`
    cross = pair_similarity(ds[:2], ds[1:], alpha=alpha, beta=beta)
    ref = _independent_similarity(ds[0], ds[2], alpha, beta)
    torch.testing.assert_close(cross[0, 1], ref, rtol=1e-9, atol=1e-12)


def test_total_is_the_weighted_sum_of_its_terms():
    """Every term recomputed by hand on the patched rows: taps -> describe -> similarity."""
    w = f64_wrapper(penalty_bits=None)  # the exact objective: every pair; float64
    x, y = f64_batch(b=6)
    w.calibrate([x])
    w.eval()  # frozen observers and BN statistics: the rows of a batch are independent
    total = w.loss(x, y, patch=fixed_patch)
    t = w.loss_terms()
    bits, k = w.bits, len(w.bits)
    assert (w.lambda_adv, w.lambda_fdp, w.lambda_gpdp, w.alpha, w.beta) == (1, 0.8, 0.5, 0.5, 1)

    # rho = 0.5: the first 3 rows stay clean, the last 3 are patched by the source
    x_clean, y_clean = x[:3], y[:3]
    x_adv, y_adv = fixed_patch(x[3:], y[3:], w), y[3:]
    assert not torch.equal(x_adv, x[3:])
    ce_clean, ce_adv, feat_desc, grad_desc = {}, {}, {}, {}
    for b in bits:
        with w.at_bits(b):
            with torch.no_grad():
                ce_clean[b] = F.cross_entropy(w(x_clean), y_clean)
            feats = w.features(x_adv)
            feat_desc[b] = {name: describe(feats[name].detach(), w.descriptor) for name in w.layers}
            xa = x_adv.clone().requires_grad_()
            logits = w(xa)
            (grad,) = torch.autograd.grad(F.cross_entropy(logits, y_adv, reduction="sum"), xa)
            ce_adv[b] = F.cross_entropy(logits.detach(), y_adv)
            grad_desc[b] = describe(grad, w.descriptor)

    def close(a, b):
        a, b = (torch.as_tensor(v, dtype=torch.float64) for v in (a, b))
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10)

    pairs = list(itertools.combinations(range(k), 2))
    fdp = 0.0
    for name in w.layers:
        sims = {
            (i, j): _independent_similarity(
                feat_desc[bits[i]][name], feat_desc[bits[j]][name], w.alpha, w.beta
            )
            for i, j in pairs
        }
        fdp = fdp + sum(sims.values()) / len(pairs)  # pairs="mean": mean over unordered pairs
        # the library's own pipeline gives the same value on the same descriptors
        lib = penalty(pair_similarity([feat_desc[b][name] for b in bits], None, w.alpha, w.beta))
        close(lib, sum(sims.values()) / len(pairs))
    gsims = {
        (i, j): _independent_similarity(grad_desc[bits[i]], grad_desc[bits[j]], w.alpha, w.beta)
        for i, j in pairs
    }
    gpdp = sum(gsims.values()) / len(pairs)
    clean = sum(ce_clean.values()) / k
    adv = sum(ce_adv.values()) / k

    close(t["clean"], clean)
    close(t["adv"], adv)
    close(t["fdp"], fdp)
    close(t["gpdp"], gpdp)
    for b in bits:
        close(t[f"clean/{b}"], ce_clean[b])
        close(t[f"adv/{b}"], ce_adv[b])
    for i, j in pairs:
        close(t[f"gpdp/{bits[i]}-{bits[j]}"], gsims[i, j])
    expected = clean + 1.0 * adv + 0.8 * fdp + 0.5 * gpdp
    close(total, expected)
    close(t["total"], expected)
    # the penalties are not degenerate: pairs differ, and both terms move the total
    assert len({round(float(v), 6) for v in gsims.values()}) > 1
    assert float(fdp) > 0 and float(gpdp) > 0


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
    cfg = DescriptorConfig(k=5.0)  # a softer threshold: finite differences stay accurate

    def fn(a, b):
        return penalty(pair_similarity([describe(a, cfg), describe(b, cfg)]))

    assert torch.autograd.gradcheck(fn, (a, b))
    assert torch.autograd.gradgradcheck(fn, (a, b))


@pytest.mark.parametrize(
    "cfg",
    [
        DescriptorConfig(),
        DescriptorConfig(q=0.7, k=20.0, cell=2, block=2, orientations=6, eps=1e-3),
    ],
    ids=["default", "custom"],
)
def test_describe_equals_its_definition(cfg):
    """Channel mean / per-sample RMS, then soft edges and unit-norm soft HOG of that map,
    with every setting of ``cfg`` (eps included) passed through."""
    g = torch.Generator().manual_seed(6)
    t = torch.rand(3, 4, 9, 10, generator=g, dtype=torch.float64) - 0.3
    t[1] *= 1e-2  # samples on very different scales (an input gradient vs a feature map)
    t[2] *= 50.0
    d = describe(t, cfg)
    m = t.mean(dim=1, keepdim=True)
    m = m / (m.square().mean(dim=(1, 2, 3), keepdim=True) + cfg.eps**2).sqrt()
    edges = soft_binarize(sobel_edges(m, cfg.eps), cfg.q, cfg.k).flatten(1)
    hog = soft_hog(m, cfg.cell, cfg.block, cfg.orientations, cfg.eps)
    hog = hog / (hog.square().sum(dim=1, keepdim=True) + cfg.eps**2).sqrt()
    torch.testing.assert_close(d.edges, edges, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(d.hog, hog, rtol=1e-9, atol=1e-12)
    ones = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(d.hog.norm(dim=1), ones, rtol=1e-6, atol=0)
    for i in range(3):  # per sample: no statistic is shared across the batch
        one = describe(t[i : i + 1], cfg)
        torch.testing.assert_close(one.edges[0], d.edges[i], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(one.hog[0], d.hog[i], rtol=1e-9, atol=1e-12)
    if cfg == DescriptorConfig():  # the RMS normalisation makes the scale irrelevant
        scaled = describe(t * 1e3, cfg)
        torch.testing.assert_close(scaled.edges, d.edges, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(scaled.hog, d.hog, rtol=1e-6, atol=1e-8)
    # half precision is described in float32
    half = describe(t.half(), cfg)
    assert half.edges.dtype == half.hog.dtype == torch.float32
    ref = describe(t.half().float(), cfg)
    torch.testing.assert_close(half.edges, ref.edges)
    torch.testing.assert_close(half.hog, ref.hog)


def test_penalty_is_computed_on_the_similarity_device():
    """The meta device stands in for an accelerator: a pair mask made on the CPU would not
    combine with a similarity matrix that lives elsewhere."""
    sim = torch.zeros(3, 3, device="meta")
    for kwargs in ({}, {"pairs": "sum"}, {"only": 1}):
        assert penalty(sim, **kwargs).device.type == "meta", kwargs


def test_describe_views_tokens_vectors_and_volumes_as_maps():
    """``(B, N, D)`` -> ``(B, 1, N, D)``, ``(B, D)`` -> ``(B, 1, 1, D)``, and
    ``(B, C, D, H, W)`` -> ``(B, C * D, H, W)``; other ranks are refused."""
    g = torch.Generator().manual_seed(5)

    def rand(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    tokens, vectors, volume = rand(2, 6, 10), rand(2, 12), rand(2, 3, 2, 8, 8)
    cases = [
        (tokens, tokens.reshape(2, 1, 6, 10), 60),
        (vectors, vectors.reshape(2, 1, 1, 12), 12),
        (volume, volume.reshape(2, 6, 8, 8), 64),
    ]
    for t, as_map, n in cases:
        got, ref = describe(t), describe(as_map)
        assert got.edges.shape == (2, n), t.shape
        torch.testing.assert_close(got.edges, ref.edges, rtol=0, atol=0)
        torch.testing.assert_close(got.hog, ref.hog, rtol=0, atol=0)
    for bad in (rand(5), rand(1, 1, 1, 1, 1, 1)):
        with pytest.raises(ConfigError, match="2 to 5 dims"):
            describe(bad)


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
