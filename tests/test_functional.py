"""Tests of triqdef.functional: gradients, invariants, small maps, skimage parity, errors."""

from __future__ import annotations

import kornia
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from skimage.feature import hog as sk_hog
from torch.autograd import gradcheck, gradgradcheck

import triqdef.functional as tf
from triqdef.errors import ConfigError, InputError

F64 = torch.float64


def _rand(*shape: int, seed: int = 0, dtype: torch.dtype = F64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(*shape, generator=g, dtype=dtype)


def _distinct(*shape: int, seed: int = 0) -> torch.Tensor:
    """Values spaced >= 1 / numel apart, so finite differences never reorder them."""
    n = int(np.prod(shape))
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(n, generator=g).to(F64) / n).reshape(shape)


def _expected_soft_hog_dim(h: int, w: int, c: int, cell: int, block: int, n: int) -> int:
    """The small-map rule exactly as documented in soft_hog's docstring."""
    m = min(h, w)
    if m >= cell * block:
        ch = cw = cell
        k = block
    elif m >= block:
        ch = cw = m // block
        k = block
    else:
        ch, cw, k = h, w, 1
    return c * (h // ch - k + 1) * (w // cw - k + 1) * k * k * n


# ------------------------------------------------------------------ gradcheck (float64)

UNARY = {
    "sobel_edges": lambda x: tf.sobel_edges(x),
    "soft_binarize": lambda x: tf.soft_binarize(x, q=0.7, k=5.0),
    "soft_hog": lambda x: tf.soft_hog(x),
    "soft_hog_l2hys": lambda x: tf.soft_hog(x, cell=2, orientations=5, clip=0.2),
    "edge_pipeline": lambda x: tf.soft_binarize(tf.sobel_edges(x), q=0.6, k=5.0),
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_gradcheck_unary(name: str) -> None:
    fn = UNARY[name]
    x = _distinct(1, 2, 6, 7, seed=1).requires_grad_()
    assert gradcheck(fn, (x,))
    assert gradgradcheck(fn, (x,))


@pytest.mark.parametrize("fn", [tf.soft_dice, tf.gradient_cosine])
def test_gradcheck_binary(fn) -> None:
    a = _rand(2, 2, 4, 5, seed=2).requires_grad_()
    b = _rand(2, 2, 4, 5, seed=3).requires_grad_()
    assert gradcheck(fn, (a, b))
    assert gradgradcheck(fn, (a, b))


def test_gradcheck_soft_hog_tiny_maps() -> None:
    for shape in [(1, 1, 1, 4), (1, 1, 3, 2), (1, 2, 2, 5)]:
        x = _distinct(*shape, seed=4).requires_grad_()
        assert gradcheck(tf.soft_hog, (x,))
        assert gradgradcheck(tf.soft_hog, (x,))


def test_second_order_finite_at_zero() -> None:
    for fn in (tf.sobel_edges, tf.soft_hog):
        x = torch.zeros(2, 3, 5, 4, dtype=F64, requires_grad=True)
        (g,) = torch.autograd.grad(fn(x).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.square().sum() + g.sum(), x)
        assert torch.isfinite(g).all() and torch.isfinite(gg).all()


# ---------------------------------------------------------------- symmetry and bounds


def test_symmetry() -> None:
    a, b = _rand(3, 2, 9, 11, seed=5), _rand(3, 2, 9, 11, seed=6)
    for fn in (tf.soft_dice, tf.edge_iou, tf.hog_cosine, tf.gradient_cosine):
        assert torch.equal(fn(a, b), fn(b, a)), fn.__name__
    assert torch.equal(tf.hog_cosine(a, b, cell=3), tf.hog_cosine(b, a, cell=3))


def test_bounds() -> None:
    a, b = _rand(4, 3, 12, 10, seed=7), _rand(4, 3, 12, 10, seed=8)
    dice = tf.soft_dice(a, b)
    assert ((dice >= 0) & (dice <= 1)).all()
    iou = tf.edge_iou(a, b)
    assert ((iou >= 0) & (iou <= 1)).all()
    cos = tf.gradient_cosine(a - 0.5, b - 0.5)
    assert ((cos >= -1) & (cos <= 1)).all()
    hc = tf.hog_cosine(a, b, cell=4)
    assert ((hc >= 0) & (hc <= 1)).all()
    assert (tf.soft_hog(a - 0.5) >= 0).all() and (tf.hog(a - 0.5, cell=4) >= 0).all()


def test_identity() -> None:
    a = _rand(3, 2, 8, 9, seed=9)
    binary = (a > 0.5).to(F64)
    torch.testing.assert_close(
        tf.soft_dice(binary, binary), torch.ones(3, dtype=F64), atol=1e-6, rtol=0
    )
    assert torch.equal(tf.edge_iou(a, a), torch.ones(3, dtype=F64))
    torch.testing.assert_close(tf.gradient_cosine(a - 0.5, a - 0.5), torch.ones(3, dtype=F64))
    torch.testing.assert_close(tf.hog_cosine(a, a, cell=4), torch.ones(3, dtype=F64))
    torch.testing.assert_close(tf.gradient_cosine(a, -a), -torch.ones(3, dtype=F64))


def test_degenerate_values() -> None:
    z = torch.zeros(2, 1, 6, 6, dtype=F64)
    assert torch.equal(tf.soft_dice(z, z), torch.zeros(2, dtype=F64))
    assert torch.equal(tf.edge_iou(z, z + 3.0), torch.ones(2, dtype=F64))  # both empty
    assert torch.equal(tf.gradient_cosine(z, _rand(2, 1, 6, 6)), torch.zeros(2, dtype=F64))
    assert torch.equal(tf.soft_hog(z), torch.zeros_like(tf.soft_hog(z)))
    half = tf.soft_binarize(torch.full((1, 1, 3, 3), 2.0, dtype=F64))
    assert torch.equal(half, torch.full_like(half, 0.5))


# --------------------------------------------------------------------- semantic checks


def test_sobel_matches_kornia_on_channel_mean() -> None:
    x = _rand(2, 3, 9, 13, seed=10)
    ref = kornia.filters.sobel(x.mean(1, keepdim=True), eps=1e-6)
    torch.testing.assert_close(tf.sobel_edges(x), ref, rtol=1e-12, atol=1e-12)
    assert tf.sobel_edges(x[:, :, :1, :1]).shape == (2, 1, 1, 1)


def test_soft_binarize_threshold() -> None:
    x = _rand(3, 2, 10, 10, seed=11)
    tau = torch.quantile(x.flatten(1), 0.85, dim=1).view(-1, 1, 1, 1)
    out = tf.soft_binarize(x, q=0.85, k=1e4)
    assert torch.equal(out > 0.5, x > tau)


@pytest.mark.parametrize("shape", [(2, 1, 5, 7), (1, 3, 4, 4), (3, 1, 2, 3)])
@pytest.mark.parametrize("q", [0.5, 0.85, 0.3])
def test_quantile_fallback_matches(monkeypatch, shape, q) -> None:
    x = _rand(*shape, seed=12).requires_grad_()
    ref = tf.soft_binarize(x, q=q, k=7.0)
    (g_ref,) = torch.autograd.grad(ref.sum(), x)
    monkeypatch.setattr(tf, "_QUANTILE_MAX_NUMEL", 0)
    out = tf.soft_binarize(x, q=q, k=7.0)
    (g_out,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g_out, g_ref)


def test_soft_hog_unsigned_and_orientation() -> None:
    x = _rand(2, 2, 12, 12, seed=13)
    torch.testing.assert_close(tf.soft_hog(-x), tf.soft_hog(x))
    torch.testing.assert_close(tf.hog(-x, cell=4), tf.hog(x, cell=4))
    # Diagonal ramps: gradient at 45 deg (bin 0 of 2) or 135 deg (bin 1 of 2).
    i = torch.arange(12, dtype=F64)
    up = (i[:, None] + i[None, :]).view(1, 1, 12, 12)
    down = (i[None, :] - i[:, None]).view(1, 1, 12, 12)
    for ramp, main in ((up, 0), (down, 1)):
        d = tf.soft_hog(ramp, cell=4, block=1, orientations=2).view(-1, 2)
        assert d[:, main].sum() > 10 * d[:, 1 - main].sum()


def test_soft_hog_channel_rule() -> None:
    x = _rand(2, 3, 10, 12, seed=14)
    per_channel = torch.cat([tf.soft_hog(x[:, i : i + 1]) for i in range(3)], dim=1)
    torch.testing.assert_close(tf.soft_hog(x), per_channel)


def test_descriptor_reuse() -> None:
    a, b = _rand(2, 1, 16, 16, seed=15), _rand(2, 1, 16, 16, seed=16)
    da, db = tf.hog(a, cell=4), tf.hog(b, cell=4)
    assert torch.equal(tf.descriptor_cosine(da, db), tf.hog_cosine(a, b, cell=4))


# ------------------------------------------------------------------------- small maps

SMALL = [(1, 1), (1, 7), (7, 1), (2, 3), (3, 3), (5, 6), (7, 9), (8, 8), (13, 9)]


@pytest.mark.parametrize("hw", SMALL)
@pytest.mark.parametrize("cell,block", [(4, 2), (3, 3), (1, 1), (8, 1)])
def test_soft_hog_small_maps(hw, cell, block) -> None:
    h, w = hw
    x = _rand(2, 2, h, w, seed=h * 31 + w).requires_grad_()
    out = tf.soft_hog(x, cell=cell, block=block, orientations=6)
    assert out.shape == (2, _expected_soft_hog_dim(h, w, 2, cell, block, 6))
    assert torch.isfinite(out).all()
    (g,) = torch.autograd.grad(out.sum(), x)
    assert torch.isfinite(g).all()
    hard = tf.hog(x, cell=cell, block=block, orientations=6)
    assert hard.shape == out.shape and torch.isfinite(hard).all()


def test_soft_hog_documented_small_sizes() -> None:
    x = torch.rand(1, 1, 1, 5)
    assert tf.soft_hog(x).shape == (1, 9)  # smaller than one block: one 1x5 cell
    assert tf.soft_hog(torch.rand(1, 1, 5, 6)).shape == (1, 72)  # 2x2 cells, 1x2 blocks
    assert tf.soft_hog(torch.rand(1, 3, 3, 3)).shape == (1, 432)  # 1x1 cells, 2x2 blocks


# ---------------------------------------------------------------- hypothesis properties


@st.composite
def maps(draw, max_b: int = 2, max_c: int = 3, max_hw: int = 9) -> torch.Tensor:
    b = draw(st.integers(1, max_b))
    c = draw(st.integers(1, max_c))
    h = draw(st.integers(1, max_hw))
    w = draw(st.integers(1, max_hw))
    kind = draw(st.sampled_from(["values", "constant", "zeros"]))
    n = b * c * h * w
    if kind == "values":
        vals = draw(
            st.lists(
                st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False),
                min_size=n,
                max_size=n,
            )
        )
        return torch.tensor(vals, dtype=F64).reshape(b, c, h, w)
    if kind == "constant":
        return torch.full((b, c, h, w), draw(st.floats(-1e3, 1e3)), dtype=F64)
    return torch.zeros(b, c, h, w, dtype=F64)


HYP = settings(deadline=None, max_examples=50, suppress_health_check=[HealthCheck.too_slow])


@HYP
@given(x=maps(), cell=st.integers(1, 5), block=st.integers(1, 3), n=st.integers(1, 9))
def test_hyp_soft_hog_finite(x, cell, block, n) -> None:
    x = x.requires_grad_()
    out = tf.soft_hog(x, cell=cell, block=block, orientations=n)
    assert out.shape == (
        x.shape[0],
        _expected_soft_hog_dim(*x.shape[2:], x.shape[1], cell, block, n),
    )
    assert torch.isfinite(out).all() and (out >= 0).all()
    weights = torch.linspace(-1, 1, out.numel(), dtype=F64).view_as(out)
    (g,) = torch.autograd.grad((out * weights).sum(), x, create_graph=True)
    assert torch.isfinite(g).all()
    (gg,) = torch.autograd.grad(g.square().sum(), x)  # second order, as a gradient penalty
    assert torch.isfinite(gg).all()
    assert torch.isfinite(tf.hog(x.detach(), cell=cell, block=block, orientations=n)).all()


@HYP
@given(x=maps(), q=st.floats(0.05, 0.95), k=st.floats(1.0, 200.0))
def test_hyp_edge_pipeline_finite(x, q, k) -> None:
    x = x.requires_grad_()
    y = x.flip(-1) * 0.5 + 1.0
    ea = tf.soft_binarize(tf.sobel_edges(x), q=q, k=k)
    eb = tf.soft_binarize(tf.sobel_edges(y), q=q, k=k)
    dice = tf.soft_dice(ea, eb)
    assert torch.isfinite(dice).all() and ((dice >= 0) & (dice <= 1)).all()
    (g,) = torch.autograd.grad((1 - dice).sum(), x)
    assert torch.isfinite(g).all()
    iou = tf.edge_iou(x.detach(), y.detach(), q=q)
    assert ((iou >= 0) & (iou <= 1)).all()
    assert torch.equal(tf.edge_iou(x.detach(), x.detach(), q=q), torch.ones_like(iou))


@HYP
@given(x=maps(), seed=st.integers(0, 2**16))
def test_hyp_cosines_and_dice(x, seed) -> None:
    y = _rand(*x.shape, seed=seed) - 0.5
    cos = tf.gradient_cosine(x, y)
    assert torch.equal(cos, tf.gradient_cosine(y, x))
    assert torch.isfinite(cos).all() and (cos.abs() <= 1).all()
    xa = x.abs()
    dice = tf.soft_dice(xa, y.abs())
    assert torch.equal(dice, tf.soft_dice(y.abs(), xa))
    assert ((dice >= 0) & (dice <= 1)).all()
    hc = tf.hog_cosine(x, y, cell=2)
    assert torch.isfinite(hc).all() and ((hc >= 0) & (hc <= 1)).all()


# ----------------------------------------------------------------------- skimage parity

SK_CASES = [
    # (H, W, cell, block, orientations)
    (32, 32, 8, 2, 9),
    (37, 29, 4, 3, 7),
    (20, 33, 5, 2, 12),
    (16, 17, 4, 1, 6),
    (9, 9, 3, 3, 1),
    (3, 3, 1, 3, 4),
    (1, 5, 1, 1, 9),
    (50, 41, 6, 2, 9),
    (24, 24, 3, 2, 8),
]


def _sk(img: np.ndarray, cell: int, block: int, n: int, **kw) -> np.ndarray:
    return sk_hog(
        img,
        orientations=n,
        pixels_per_cell=(cell, cell),
        cells_per_block=(block, block),
        block_norm="L2-Hys",
        feature_vector=True,
        **kw,
    )


@pytest.mark.parametrize("h,w,cell,block,n", SK_CASES)
def test_hog_matches_skimage(h, w, cell, block, n) -> None:
    rng = np.random.default_rng(h * 100 + w)
    imgs = rng.random((2, h, w))
    out = tf.hog(
        torch.from_numpy(imgs)[:, None],
        cell=cell,
        block=block,
        orientations=n,
        skimage_compatible=True,
    )
    ref = np.stack([_sk(img, cell, block, n) for img in imgs])
    assert out.shape == ref.shape
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("n", [2, 3, 4, 6, 8, 9, 12])
def test_hog_matches_skimage_on_bin_edges(n) -> None:
    # Integer images put many orientations exactly on bin edges (0, 45, 90, ... degrees).
    rng = np.random.default_rng(n)
    img = rng.integers(0, 3, (23, 19)).astype(np.float64)
    out = tf.hog(
        torch.from_numpy(img)[None, None], cell=3, block=2, orientations=n, skimage_compatible=True
    )
    np.testing.assert_allclose(out[0].numpy(), _sk(img, 3, 2, n), atol=1e-4, rtol=0)


def test_hog_matches_skimage_multichannel_and_float32() -> None:
    rng = np.random.default_rng(0)
    img = rng.random((21, 26, 3))
    out = tf.hog(
        torch.from_numpy(img).permute(2, 0, 1)[None], cell=4, block=2, skimage_compatible=True
    )
    ref = _sk(img, 4, 2, 9, channel_axis=-1)
    np.testing.assert_allclose(out[0].numpy(), ref, atol=1e-4, rtol=0)
    gray = img[..., 0].astype(np.float32)
    out32 = tf.hog(
        torch.from_numpy(gray)[None, None], cell=5, block=2, orientations=7, skimage_compatible=True
    )
    assert out32.dtype == torch.float32
    np.testing.assert_allclose(out32[0].numpy(), _sk(gray, 5, 2, 7), atol=1e-4, rtol=0)


def test_hog_skimage_mode_rejects_maps_below_one_block() -> None:
    with pytest.raises(InputError, match=r"\(1, 1, 15, 40\)"):
        tf.hog(torch.rand(1, 1, 15, 40), cell=8, block=2, skimage_compatible=True)


# ------------------------------------------------------------------------ module twins


def test_modules_match_functions() -> None:
    a, b = _rand(2, 3, 9, 10, seed=20), _rand(2, 3, 9, 10, seed=21)
    assert torch.equal(tf.SobelEdges(eps=1e-4)(a), tf.sobel_edges(a, eps=1e-4))
    assert torch.equal(tf.SoftBinarize(q=0.7, k=20.0)(a), tf.soft_binarize(a, q=0.7, k=20.0))
    assert torch.equal(tf.SoftDice(eps=1e-3)(a, b), tf.soft_dice(a, b, eps=1e-3))
    mod = tf.SoftHOG(cell=3, block=2, orientations=5, clip=0.3)
    assert torch.equal(mod(a), tf.soft_hog(a, cell=3, block=2, orientations=5, clip=0.3))


def test_module_reprs_and_state() -> None:
    assert repr(tf.SobelEdges(eps=1e-3)) == "SobelEdges(eps=0.001)"
    assert repr(tf.SoftBinarize()) == "SoftBinarize(q=0.85, k=100.0)"
    assert repr(tf.SoftDice()) == "SoftDice(eps=1e-06)"
    assert "cell=4, block=2, orientations=9" in repr(tf.SoftHOG())
    for mod in (tf.SobelEdges(), tf.SoftBinarize(), tf.SoftDice(), tf.SoftHOG()):
        assert mod.state_dict() == {}  # nothing persistent to save
        mod.to(F64)


@pytest.mark.parametrize(
    "ctor,kwargs",
    [
        (tf.SobelEdges, {"eps": 0.0}),
        (tf.SoftBinarize, {"q": 1.0}),
        (tf.SoftBinarize, {"k": -1.0}),
        (tf.SoftDice, {"eps": float("nan")}),
        (tf.SoftHOG, {"cell": 0}),
        (tf.SoftHOG, {"orientations": 2.5}),
        (tf.SoftHOG, {"clip": 1.5}),
    ],
)
def test_module_bad_config(ctor, kwargs) -> None:
    with pytest.raises(ConfigError):
        ctor(**kwargs)
    with pytest.raises(ValueError):
        ctor(**kwargs)


# ------------------------------------------------------------------------- bad inputs

GOOD = torch.rand(2, 1, 8, 8)

BAD_MAPS = [
    ([[1.0]], "list"),
    (np.zeros((1, 1, 4, 4)), "ndarray"),
    (torch.rand(8, 8), r"\(8, 8\)"),
    (torch.rand(1, 2, 3, 4, 5), r"\(1, 2, 3, 4, 5\)"),
    (torch.ones(1, 1, 4, 4, dtype=torch.int64), r"torch.int64.*\(1, 1, 4, 4\)"),
    (torch.rand(1, 1, 0, 4), r"\(1, 1, 0, 4\)"),
]

UNARY_PUBLIC = [
    tf.sobel_edges,
    tf.soft_binarize,
    tf.soft_hog,
    tf.hog,
    tf.SobelEdges(),
    tf.SoftBinarize(),
    tf.SoftHOG(),
]
BINARY_PUBLIC = [tf.soft_dice, tf.edge_iou, tf.hog_cosine, tf.gradient_cosine, tf.SoftDice()]


@pytest.mark.parametrize("bad,match", BAD_MAPS)
def test_bad_maps_raise(bad, match) -> None:
    for fn in UNARY_PUBLIC:
        with pytest.raises(InputError, match=match):
            fn(bad)
    for fn in BINARY_PUBLIC:
        with pytest.raises(InputError, match=match):
            fn(bad, GOOD)
        with pytest.raises(InputError, match=match):
            fn(GOOD, bad)


def test_bad_maps_are_builtin_errors() -> None:
    with pytest.raises(TypeError):
        tf.sobel_edges("not a tensor")
    with pytest.raises(ValueError):
        tf.soft_hog(torch.rand(3, 4))


def test_mismatched_pair_raises() -> None:
    for fn in BINARY_PUBLIC:
        with pytest.raises(InputError, match=r"\(2, 1, 8, 8\) and \(2, 1, 8, 9\)"):
            fn(GOOD, torch.rand(2, 1, 8, 9))
    with pytest.raises(InputError, match="same shape"):
        tf.descriptor_cosine(torch.rand(2, 5), torch.rand(2, 6))
    with pytest.raises(InputError, match=r"\(5,\)"):
        tf.descriptor_cosine(torch.rand(5), torch.rand(5))


@pytest.mark.parametrize(
    "call",
    [
        lambda: tf.soft_binarize(GOOD, q=0.0),
        lambda: tf.soft_binarize(GOOD, q=1.0),
        lambda: tf.soft_binarize(GOOD, q=1.2),
        lambda: tf.soft_binarize(GOOD, k=0.0),
        lambda: tf.soft_binarize(GOOD, q=torch.tensor(0.5)),
        lambda: tf.edge_iou(GOOD, GOOD, q=-0.1),
        lambda: tf.sobel_edges(GOOD, eps=-1e-6),
        lambda: tf.soft_dice(GOOD, GOOD, eps=float("inf")),
        lambda: tf.soft_hog(GOOD, cell=0),
        lambda: tf.soft_hog(GOOD, block=-1),
        lambda: tf.soft_hog(GOOD, orientations=True),
        lambda: tf.soft_hog(GOOD, cell=2.0),
        lambda: tf.soft_hog(GOOD, clip=0.0),
        lambda: tf.hog(GOOD, orientations=0),
        lambda: tf.gradient_cosine(GOOD, GOOD, eps=0.0),
    ],
)
def test_bad_parameters_raise(call) -> None:
    with pytest.raises(InputError):
        call()


# --------------------------------------------------------------------- device and dtype


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_device_and_dtype_preserved(device, dtype) -> None:
    a = torch.rand(2, 3, 10, 11, device=device, dtype=dtype)
    b = torch.rand(2, 3, 10, 11, device=device, dtype=dtype)
    outs = [
        tf.sobel_edges(a),
        tf.soft_binarize(a),
        tf.soft_dice(a, b),
        tf.soft_hog(a),
        tf.edge_iou(a, b),
        tf.hog(a, cell=4),
        tf.hog_cosine(a, b, cell=4),
        tf.gradient_cosine(a, b),
        tf.hog(a[:, :1], cell=2, skimage_compatible=True),
    ]
    for out in outs:
        assert out.device == a.device and out.dtype == dtype


def test_bfloat16_and_autocast(device) -> None:
    a = _rand(2, 3, 12, 12, seed=30, dtype=torch.float32).to(device)
    b = _rand(2, 3, 12, 12, seed=31, dtype=torch.float32).to(device)
    for fn, args in [
        (tf.sobel_edges, (a,)),
        (tf.soft_binarize, (a,)),
        (tf.soft_dice, (a, b)),
        (tf.soft_hog, (a,)),
        (tf.gradient_cosine, (a, b)),
    ]:
        low_args = [x.bfloat16() for x in args]
        low = fn(*low_args)
        assert low.dtype == torch.bfloat16 and low.device == a.device
        # Computed in float32 internally: only the final rounding to bfloat16 differs.
        ref_low = fn(*(x.float() for x in low_args))
        torch.testing.assert_close(low.float(), ref_low, rtol=1e-2, atol=1e-2)
        ref = fn(*args)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            auto = fn(*args)
        assert auto.dtype == torch.float32, fn.__name__
        torch.testing.assert_close(auto, ref)
