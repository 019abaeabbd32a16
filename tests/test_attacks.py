"""Patch attacks: placement, LAVAN, GAP, on-the-fly source, patch pool, state and inputs.

The effectiveness tests train a small CNN on scikit-learn digits (16x16) once per
module and compare each attack's untargeted attack success rate (ASR: among
the test images classified correctly clean, the share misclassified when
patched) with a uniform-noise patch of the same size.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from triqdef import TriQDefWrapper
from triqdef.attacks import (
    LAVAN,
    REGIONS,
    AdversarialPatch,
    OnTheFlyPatch,
    PatchPool,
    PatchSource,
    RandomPatch,
    apply_patch,
    resolve_region,
    warp_patch,
)
from triqdef.attacks.regions import region_bounds
from triqdef.errors import CheckpointError, ConfigError, InputError
from triqdef.evaluate import clean_accuracy
from triqdef.models import SmallCNN

BITS = (32, 8, 4)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These models are tiny: a second intra-op thread only adds synchronisation,
    # and on a busy 2-core machine it makes every op wait for a free core.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def digits():
    """A SmallCNN(width=8) trained on 16x16 digits, and correctly classified test images."""
    from triqdef.data import digits as load_digits

    torch.manual_seed(0)
    train, test = load_digits(train=True, size=16), load_digits(train=False, size=16)
    x_train, y_train, x_test, y_test = train.data, train.targets, test.data, test.targets
    net = SmallCNN(width=8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    steps = 0
    while steps < 300:
        for idx in torch.randperm(len(x_train), generator=g).split(64):  # one order per epoch
            xb, yb = x_train[idx], y_train[idx]
            opt.zero_grad()
            F.cross_entropy(net(xb), yb).backward()
            opt.step()
            steps += 1
            if steps == 300:
                break
    net.eval()
    with torch.no_grad():
        ok = net(x_test).argmax(1) == y_test
    assert ok.float().mean() > 0.9
    return dict(net=net, x=x_test[ok][:128], y=y_test[ok][:128], x_train=x_train, y_train=y_train)


def asr(net: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x_adv).argmax(1) != y).float().mean().item()


def noise_asr(digits, size: int) -> float:
    noise = RandomPatch(size, generator=torch.Generator().manual_seed(0))
    return asr(digits["net"], noise(digits["x"]), digits["y"])


def tiny_net(channels: int = 1, classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


def warm_wrapper(net: nn.Module, x: torch.Tensor) -> TriQDefWrapper:
    """A wrapper whose observers and per-bit BatchNorm statistics have all seen data."""
    w = TriQDefWrapper(net, bits=BITS, layers=["2"])
    w.train()
    with torch.no_grad():
        for b in BITS:
            with w.at_bits(b):
                w(x)
    return w


def state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- apply_patch ---------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 4),
    c=st.integers(1, 3),
    hh=st.integers(1, 9),
    ww=st.integers(1, 9),
    data=st.data(),
)
def test_apply_patch_exact_inside_outside_and_gradients(b, c, hh, ww, data):
    h, w = data.draw(st.integers(1, hh)), data.draw(st.integers(1, ww))
    rows = data.draw(st.lists(st.integers(0, hh - h), min_size=b, max_size=b))
    cols = data.draw(st.lists(st.integers(0, ww - w), min_size=b, max_size=b))
    per_sample = data.draw(st.booleans())
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    x = torch.rand(b, c, hh, ww, generator=g, dtype=torch.float64).requires_grad_()
    patch = torch.rand(*((b,) if per_sample else ()), c, h, w, generator=g, dtype=torch.float64)
    patch.requires_grad_()
    loc = torch.tensor(list(zip(rows, cols)))
    out = apply_patch(x, patch, loc)

    inside = torch.zeros(b, 1, hh, ww, dtype=torch.bool)
    for i, (r, col) in enumerate(zip(rows, cols)):
        inside[i, :, r : r + h, col : col + w] = True
        want = patch[i] if per_sample else patch
        assert torch.equal(out[i, :, r : r + h, col : col + w], want)
    inside = inside.expand(b, c, hh, ww)
    assert torch.equal(out[~inside], x[~inside])

    weights = torch.rand(out.shape, generator=g, dtype=torch.float64)
    gx, gp = torch.autograd.grad((out * weights).sum(), (x, patch))
    assert torch.equal(gx[inside], torch.zeros_like(gx[inside]))
    assert torch.equal(gx[~inside], weights[~inside])
    expected = torch.zeros(b, c, h, w, dtype=torch.float64)
    for i, (r, col) in enumerate(zip(rows, cols)):
        expected[i] = weights[i, :, r : r + h, col : col + w]
    assert torch.allclose(gp, expected if per_sample else expected.sum(0))

    # the mask path: a full-size canvas, gradients only where the mask is 1
    canvas = torch.rand(c, hh, ww, generator=g, dtype=torch.float64).requires_grad_()
    mask = inside[:, :1].double()
    out = apply_patch(x, canvas, mask=mask)
    assert torch.equal(out[inside], canvas.expand(b, c, hh, ww)[inside])
    assert torch.equal(out[~inside], x[~inside])
    (gc,) = torch.autograd.grad((out * weights).sum(), canvas)
    assert torch.allclose(gc, (weights * mask).sum(0))


def test_warp_identity_matches_apply_patch_and_rotation_convention():
    p = torch.rand(2, 3, 4)
    x = torch.rand(3, 2, 10, 12)
    loc = torch.tensor([[0, 0], [3, 5], [7, 8]])
    centers = torch.stack([loc[:, 1] + 1.5, loc[:, 0] + 1.0], dim=1).float()
    canvas, mask = warp_patch(p, (10, 12), centers, torch.zeros(3), torch.ones(3))
    assert torch.allclose(x * (1 - mask) + canvas, apply_patch(x, p, loc), atol=1e-5)
    square = torch.rand(1, 5, 5)
    canvas, _ = warp_patch(square, (9, 9), torch.tensor([[4.0, 4.0]]), torch.tensor([90.0]),
                           torch.ones(1))  # fmt: skip
    # +90 degrees is counter-clockwise as displayed, like torch.rot90 over (H, W)
    assert torch.allclose(canvas[0, :, 2:7, 2:7], torch.rot90(square, 1, (1, 2)), atol=1e-5)


@pytest.mark.parametrize("shared", [True, False])
def test_warp_gradient_is_the_exact_adjoint_of_grid_sample(shared):
    from kornia.geometry.transform import get_rotation_matrix2d

    from triqdef.attacks.warp import _warp_forward, sample_eot

    g = torch.Generator().manual_seed(0)
    n, (hh, ww), (h, w) = 24, (13, 17), (4, 6)
    p = torch.rand(1 if shared else n, 2, h, w, generator=g, dtype=torch.float64)
    p.requires_grad_()
    centers, angles, scales = sample_eot(
        n, (hh, ww), (h, w), 60.0, (0.4, 1.7),
        lambda k: torch.rand(k, generator=g, dtype=torch.float64),
    )  # fmt: skip
    canvas, _ = warp_patch(p[0] if shared else p, (hh, ww), centers, angles, scales)
    weights = torch.randn(canvas.shape, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad((canvas * weights).sum(), p)
    # reference: autograd through kornia's warp_affine (grid_sample's own backward)
    pc = torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=torch.float64)
    m = get_rotation_matrix2d(pc.expand(n, 2).contiguous(), angles, scales[:, None].expand(n, 2))
    m = torch.cat([m[:, :, :2], m[:, :, 2:] + (centers - pc)[:, :, None]], dim=2)
    ref = _warp_forward(p, m, (hh, ww))[:, :2]
    (theirs,) = torch.autograd.grad((ref * weights).sum(), p)
    assert torch.allclose(canvas, ref)
    assert torch.allclose(ours, theirs, atol=1e-10)


def test_regions():
    assert resolve_region(None) == ("any", REGIONS["any"])
    assert resolve_region((0.5, 0.5, 1, 1))[0] == "bottom-right"
    assert region_bounds(REGIONS["top-left"], (16, 16), (6, 6)) == (0, 2, 0, 2)
    # a region smaller than the patch: one corner, centred on it, inside the image
    assert region_bounds((0.9, 0.9, 1.0, 1.0), (16, 16), (6, 6)) == (10, 10, 10, 10)
    with pytest.raises(ConfigError, match="known regions"):
        resolve_region("middle")
    with pytest.raises(ConfigError):
        resolve_region((0.5, 0, 0.4, 1))


# --- effectiveness on a trained model -----------------------------------------------------
def test_lavan_beats_noise(digits, capsys):
    net, x, y = digits["net"], digits["x"], digits["y"]
    attack = LAVAN(net, 5, steps=50, step_size=0.1, seed=0)
    x_adv = attack(x, y)
    ours, noise = asr(net, x_adv, y), noise_asr(digits, 5)
    with capsys.disabled():
        print(f"\n  LAVAN 5x5 ASR {ours:.3f} vs noise {noise:.3f} on {len(y)} digits")
    assert ours >= noise + 0.3
    assert ours >= 0.8
    assert torch.equal(apply_patch(x, attack.patch, attack.locations), x_adv)
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert attack.last_loss > 1.0


def test_gap_beats_noise_and_transfers_to_unseen_images(digits, capsys):
    net = digits["net"]
    gap = AdversarialPatch(net, 6, steps=100, step_size=0.2, eot_samples=2, seed=0)
    gap(digits["x_train"][:256], digits["y_train"][:256])  # crafted on training images
    x_adv = gap.apply(digits["x"])  # evaluated on test images
    ours, noise = asr(net, x_adv, digits["y"]), noise_asr(digits, 6)
    with capsys.disabled():
        print(f"\n  GAP 6x6 universal ASR {ours:.3f} vs noise {noise:.3f}")
    assert ours >= noise + 0.3
    assert gap.patch.shape == (1, 6, 6)
    assert torch.equal(apply_patch(digits["x"], gap.patch, gap.locations), x_adv)


def test_gap_fit_over_batches(digits):
    net = digits["net"]
    batches = [(digits["x_train"][i : i + 64], digits["y_train"][i : i + 64]) for i in (0, 64)]
    gap = AdversarialPatch(net, 6, step_size=0.2, seed=0).fit(batches, epochs=3)
    assert gap.patch.shape == (1, 6, 6) and gap.last_loss is not None
    before = gap.patch.clone()
    gap.fit(batches[0])  # one (x, y) pair is a single batch; training continues
    assert not torch.equal(before, gap.patch)
    gap.reset()
    with pytest.raises(InputError, match="no patch yet"):
        gap.apply(digits["x"])


def test_targeted_lavan_hits_target(digits, capsys):
    net, x, y = digits["net"], digits["x"], digits["y"]
    keep = y != 3
    attack = LAVAN(net, 6, steps=50, step_size=0.1, restarts=2, targeted=True, target=3, seed=0)
    x_adv = attack(x[keep], y[keep])
    with torch.no_grad():
        hit = (net(x_adv).argmax(1) == 3).float().mean().item()
    with capsys.disabled():
        print(f"\n  targeted LAVAN 6x6 -> class 3: {hit:.3f} of samples")
    assert hit >= 0.8


def test_restarts_keep_the_best_per_sample(digits):
    net, x, y = digits["net"], digits["x"][:32], digits["y"][:32]

    def per_sample_loss(attack):
        with torch.no_grad():
            return F.cross_entropy(net(attack(x, y)), y, reduction="none")

    one = per_sample_loss(LAVAN(net, 4, steps=10, step_size=0.1, seed=3))
    two = per_sample_loss(LAVAN(net, 4, steps=10, step_size=0.1, restarts=2, seed=3))
    assert (two >= one - 1e-5).all()  # restart 0 is the one-restart run; the best is kept


def test_location_search_moves_and_is_reproducible(digits):
    net, x, y = digits["net"], digits["x"][:32], digits["y"][:32]
    start = torch.full((32, 2), 5)
    attack = LAVAN(
        net, 4, steps=20, step_size=0.1, location_search=True, move_every=2, move_stride=3, seed=0
    )
    x_adv = attack(x, y, locations=start)
    assert (attack.locations != start).any(dim=1).float().mean() > 0.2
    assert torch.equal(apply_patch(x, attack.patch, attack.locations), x_adv)
    fixed = LAVAN(net, 4, steps=20, step_size=0.1, seed=0)
    fixed(x, y, locations=start)
    assert torch.equal(fixed.locations, start)
    assert attack.last_loss >= fixed.last_loss - 1e-4


def test_mean_std_normalise_inside(digits):
    net, x, y = digits["net"], digits["x"][:16], digits["y"][:16]
    mean, std = 0.3, 0.5
    inner = nn.Sequential(_Affine(mean, std), net)  # normalisation inside the model
    a = LAVAN(net, 4, steps=5, seed=1, mean=[mean], std=[std])(x, y)  # inside the attack
    b = LAVAN(inner, 4, steps=5, seed=1)(x, y)
    assert torch.allclose(a, b, atol=1e-6)


class _Affine(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x):
        return (x - self.mean) / self.std


# --- the model is untouched -----------------------------------------------------------------
@pytest.mark.parametrize("kind", ["lavan", "gap", "onthefly"])
def test_attacks_leave_wrapper_state_mode_bits_and_grads_alone(kind):
    x = torch.rand(8, 1, 12, 12)
    y = torch.randint(0, 5, (8,))
    w = warm_wrapper(tiny_net(), x)
    w.train()
    w.set_bits(8)
    w.model[1].eval()  # a deliberately frozen BatchNorm stays frozen, the rest in training
    before = state(w)
    modes = [m.training for m in w.modules()]
    if kind == "lavan":
        attack = LAVAN(w, 4, bits=4, steps=3, location_search=True, move_every=1, seed=0)
    elif kind == "gap":
        attack = AdversarialPatch(w, 4, bits=4, steps=3, eot_samples=2, seed=0)
    else:
        attack = OnTheFlyPatch(w, 4, inner_steps=3, seed=0)
    x_adv = attack(x, y, w)
    assert same_state(before, state(w))
    assert [m.training for m in w.modules()] == modes
    assert w.current_bits == 8
    assert all(p.grad is None for p in w.parameters())
    assert not x_adv.requires_grad and x_adv.shape == x.shape


def test_plain_model_state_and_mode_restored():
    net = tiny_net().train()
    before = state(net)
    x = torch.rand(6, 1, 10, 10)
    LAVAN(net, 3, steps=3, seed=0)(x, torch.zeros(6, dtype=torch.long))
    AdversarialPatch(net, 3, steps=3, seed=0)(x, torch.zeros(6, dtype=torch.long))
    assert same_state(before, state(net))
    assert all(m.training for m in net.modules())
    assert all(p.grad is None for p in net.parameters())


def test_attack_runs_under_no_grad():
    net = tiny_net()
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with torch.no_grad():
        x_adv = LAVAN(net, 3, steps=3, seed=0)(x, y)
    assert not torch.equal(x_adv, x)


# --- reproducibility ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        lambda net, **kw: LAVAN(net, 3, steps=4, restarts=2, location_search=True, **kw),
        lambda net, **kw: AdversarialPatch(net, 3, steps=4, eot_samples=2, **kw),
    ],
)
def test_seed_and_generator_reproduce(make):
    net = tiny_net()
    x, y = torch.rand(6, 1, 10, 10), torch.randint(0, 5, (6,))
    a, b = make(net, seed=7), make(net, seed=7)
    xa, xb = a(x, y), b(x, y)
    assert torch.equal(xa, xb) and torch.equal(a.patch, b.patch)
    assert torch.equal(a.locations, b.locations)
    assert not torch.equal(make(net, seed=8)(x, y), xa)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(make(net, generator=g1)(x, y), make(net, generator=g2)(x, y))


# --- on-the-fly source ----------------------------------------------------------------------
def test_onthefly_is_a_patch_source_and_updates_across_calls():
    x = torch.rand(8, 1, 12, 12)
    y = torch.randint(0, 5, (8,))
    w = warm_wrapper(tiny_net(), x)
    source = OnTheFlyPatch(w, patch_size=4, inner_steps=4, seed=0)
    assert isinstance(source, PatchSource)
    loss = w.loss(x, y, patch=source)
    loss.backward()
    assert torch.isfinite(loss)
    first = source.patch.clone()
    assert set(source.last_bits) <= set(w.active_bits) and len(source.last_bits) == 4
    w.loss(x, y, patch=source)
    assert not torch.equal(first, source.patch)
    assert 0 <= float(source.patch.min()) and float(source.patch.max()) <= 1


def test_onthefly_without_model_uses_the_callers_wrapper_and_skips_uncalibrated_bits():
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 5, (4,))
    w = TriQDefWrapper(tiny_net(), bits=(32, 4))  # 4-bit observers have seen nothing yet
    source = OnTheFlyPatch(None, 3, inner_steps=6, seed=0)
    w.eval()
    x_adv = source(x, y, w)
    assert source.last_bits == [32] * 6
    assert torch.equal(apply_patch(x, source.patch, source.locations), x_adv)
    w2 = TriQDefWrapper(tiny_net(), bits=(32, 4), patch_source=OnTheFlyPatch(None, 3, seed=0))
    w2.train()
    w2.loss(x, y).backward()


# --- patch pool -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pool():
    torch.manual_seed(0)
    net = tiny_net()
    x, y = torch.rand(24, 1, 12, 12), torch.randint(0, 5, (24,))
    return PatchPool.build(
        net,
        [(x[:12], y[:12]), (x[12:], y[12:])],
        sizes=(3, 4),
        targets=(None, 2),
        regions=("any", "top-left"),
        steps=3,
        seed=0,
    )


def test_pool_build_metadata_and_seen(pool):
    assert len(pool) == 8
    assert pool.sizes == {(3, 3), (4, 4)} and pool.bits == {32} and pool.targets == {None, 2}
    assert {m["attack"] for m in pool.metadata} == {"lavan"}
    for patch, meta in zip(pool.patches, pool.metadata):
        assert list(patch.shape[-2:]) == meta["size"]
        assert 0 <= patch.min() and patch.max() <= 1
    assert pool.is_seen(size=3, bits=32, region="top-left")
    assert not pool.is_seen(size=6)
    assert not pool.is_seen(bits=4)
    assert not pool.is_seen(region="bottom-right")
    drawn = pool.sample(5, generator=torch.Generator().manual_seed(0))
    assert len(drawn) == 5 and all(isinstance(m, dict) for _, m in drawn)


def test_pool_call_mixes_sizes_inside_regions(pool):
    x = torch.rand(40, 1, 12, 12)
    x_adv = pool(x, None, None)
    idx, loc = pool.indices, pool.locations
    assert len({tuple(pool.metadata[i]["size"]) for i in idx.tolist()}) == 2
    for i in range(40):
        p, meta = pool.patches[idx[i]], pool.metadata[idx[i]]
        h, w = p.shape[-2:]
        r, c = loc[i].tolist()
        rmin, rmax, cmin, cmax = region_bounds(meta["box"], (12, 12), (h, w))
        assert rmin <= r <= rmax and cmin <= c <= cmax
        assert torch.equal(x_adv[i, :, r : r + h, c : c + w], p)
    with pytest.raises(InputError, match="channels"):
        pool(torch.rand(2, 3, 12, 12))


def test_pool_as_training_source():
    x, y = torch.rand(8, 1, 12, 12), torch.randint(0, 5, (8,))
    w = warm_wrapper(tiny_net(), x)
    pool = PatchPool([torch.rand(1, 3, 3), torch.rand(1, 5, 5)], seed=0)
    w.loss(x, y, patch=pool).backward()


def test_pool_save_load_round_trip_and_corruption(pool, tmp_path):
    path = tmp_path / "pool.safetensors"
    pool.save(path)
    assert sorted(os.listdir(tmp_path)) == ["pool.safetensors"]  # no temp file left over
    loaded = PatchPool.load(path)
    assert loaded.metadata == pool.metadata
    assert all(torch.equal(a, b) for a, b in zip(loaded.patches, pool.patches))

    raw = path.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x07" * 64)
    for name in ("truncated.safetensors", "garbage.safetensors", "missing.safetensors"):
        with pytest.raises(CheckpointError):
            PatchPool.load(tmp_path / name)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="not a triqdef patch pool"):
        PatchPool.load(tmp_path / "foreign.safetensors")


def test_pool_gap_and_wrapper_bits():
    x, y = torch.rand(16, 1, 10, 10), torch.randint(0, 5, (16,))
    w = warm_wrapper(tiny_net(), x)
    pool = PatchPool.build(w, (x, y), sizes=(3,), bits=(32, 4), attack="gap", steps=2, seed=1)
    assert pool.bits == {32, 4} and pool.attacks == {"gap"} and len(pool) == 2
    assert pool.is_seen(bits=4) and not pool.is_seen(bits=8)
    with pytest.raises(ConfigError, match="bits"):
        PatchPool.build(tiny_net(), (x, y), bits=4)


# --- bad inputs -----------------------------------------------------------------------------
def _bad_calls():
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    return {
        "3-d x": (x[0], y),
        "integer x": ((x * 255).long(), y),
        "empty batch": (x[:0], y[:0]),
        "x above 1": (x * 2, y),
        "x with NaN": (x.clone().fill_(float("nan")), y),
        "y wrong shape": (x, y[:3]),
        "float y": (x, y.float()),
        "y out of range": (x, y + 7),
        "patch larger than image": (torch.rand(4, 1, 2, 2), y),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
@pytest.mark.parametrize("cls", [LAVAN, AdversarialPatch, OnTheFlyPatch])
def test_bad_inputs_raise_input_error_and_change_nothing(cls, case):
    net = tiny_net()
    x, y = _bad_calls()[case]
    attack = cls(net, 3, seed=0)
    with pytest.raises(InputError):
        attack(x, y)
    assert attack.patch is None and attack.locations is None


def test_target_out_of_range_names_class_count():
    attack = LAVAN(tiny_net(classes=5), 3, targeted=True, target=7, steps=2)
    with pytest.raises(InputError, match="5 classes"):
        attack(torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))


def test_bad_initial_patch_and_locations():
    net = tiny_net()
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        LAVAN(net, 3, init_patch=torch.full((1, 3, 3), 1.5))
    with pytest.raises(InputError):
        AdversarialPatch(net, 3, init_patch=torch.rand(1, 4, 4))  # size mismatch
    attack = LAVAN(net, init_patch=torch.rand(1, 3, 3), steps=1)
    assert attack.patch_size == (3, 3)
    x, y = torch.rand(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(InputError, match="locations"):
        attack(x, y, locations=torch.tensor([[0, 0], [6, 0]]))
    with pytest.raises(InputError, match="channels"):
        attack(torch.rand(2, 3, 8, 8), y)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(steps=0),
        dict(step_size=-1.0),
        dict(targeted=True),
        dict(target=3),
        dict(bits=4),
        dict(seed=1, generator=torch.Generator()),
        dict(std=[0.0]),
        dict(region="middle"),
    ],
)
def test_bad_constructor_arguments_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        LAVAN(tiny_net(), 3, **kwargs)


def test_progress_bar_and_repr(capsys):
    net = tiny_net()
    x0, y0 = (
        torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
        torch.zeros(2, dtype=torch.long),
    )
    capsys.readouterr()
    LAVAN(net, 3, steps=2, seed=0)(x0, y0)
    assert capsys.readouterr().err == ""  # quiet by default
    attack = LAVAN(net, 3, steps=2, progress=True, seed=0)
    attack(x0, y0)
    err = capsys.readouterr().err
    assert "LAVAN" in err and "/2" in err, err  # tqdm's bar: its desc and "i/2" steps
    assert "LAVAN(patch_size=(3, 3)" in repr(attack)
    w = warm_wrapper(tiny_net(), x0)
    assert "OnTheFlyPatch" in repr(OnTheFlyPatch(w, 3, bits=(32, 4)))
    with pytest.raises(ConfigError):
        OnTheFlyPatch(w, 3, bits=(5,))


def test_progress_without_tqdm_warns_and_runs(monkeypatch):
    # one policy everywhere: a progress bar is cosmetic, never a reason to fail
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm...` now raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    net = tiny_net()
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y0 = torch.zeros(2, dtype=torch.long)
    with pytest.warns(UserWarning, match="tqdm"):
        adv = LAVAN(net, 3, steps=2, progress=True, seed=0)(x0, y0)
    assert adv.shape == x0.shape
    with pytest.warns(UserWarning, match="tqdm"):
        acc = clean_accuracy(net, [(x0, y0)], progress=True)
    assert set(acc) == {32}
