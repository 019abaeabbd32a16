"""DPR, the shape-deformable patch attack: its area budget, gradients, pasting and evaluation.

The effectiveness test trains a small CNN on scikit-learn digits (16x16) once per
module and compares DPR's untargeted attack success rate (ASR: among test images
classified correctly clean, the share misclassified when patched) with a
uniform-noise patch of the same area.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from triqdef import TriQDefWrapper
from triqdef.attacks import LAVAN, RandomPatch, apply_patch
from triqdef.attacks.dpr import DPR, _PolarGrid
from triqdef.errors import ConfigError, InputError
from triqdef.evaluate import transfer_matrix
from triqdef.models import SmallCNN


def tiny_net(channels: int = 1, classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


def _images(b: int, c: int, hh: int, ww: int, seed: int = 0, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, hh, ww, generator=g), torch.randint(0, classes, (b,), generator=g)


@pytest.fixture(scope="module")
def digits():
    """A SmallCNN(width=8) trained on 16x16 digits, and correctly classified test images."""
    from triqdef.data import load_dataset

    torch.manual_seed(0)
    x_train, y_train, _ = load_dataset("digits", train=True, size=16)
    x_test, y_test, _ = load_dataset("digits", train=False, size=16)
    net = SmallCNN(width=8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    steps = 0
    while steps < 300:
        for idx in torch.randperm(len(y_train), generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
            opt.step()
            steps += 1
            if steps == 300:
                break
    net.eval()
    with torch.no_grad():
        ok = net(x_test).argmax(1) == y_test
    assert ok.float().mean() > 0.9
    return dict(net=net, x=x_test[ok][:96], y=y_test[ok][:96])


def asr(net: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x_adv).argmax(1) != y).float().mean().item()


# --- the representation ----------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    n=st.integers(3, 24),
    extra=st.tuples(st.integers(0, 6), st.integers(0, 6)),
    seed=st.integers(0, 2**16),
    spread=st.floats(0.0, 0.95),
)
def test_fit_holds_exactly_the_budget_and_the_outline_encloses_it(h, w, n, extra, seed, spread):
    box = (h + extra[0], w + extra[1])
    grid = _PolarGrid(box, n, torch.device("cpu"), torch.float64)
    g = torch.Generator().manual_seed(seed)
    radii = 1 + spread * (2 * torch.rand(3, n, generator=g, dtype=torch.float64) - 1)
    fitted, mask = grid.fit(radii, h * w)
    assert mask.shape == (3, box[0] * box[1])
    assert torch.equal(mask.sum(1), torch.full((3,), float(h * w), dtype=torch.float64))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # the fitted outline is the same shape, scaled: the pixels in lie inside it
    ratio = fitted / radii
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-9)
    depth = grid.dist / grid.contour(fitted)
    assert bool((depth[mask.bool()] <= 1 + 1e-9).all())
    if h * w < box[0] * box[1]:
        inside = depth[mask.bool()].view(3, -1).amax(1)
        outside = depth.masked_fill(mask.bool(), math.inf).amin(1)
        assert bool((inside <= outside * (1 + 1e-9)).all())  # nothing outside lies deeper


def test_contour_passes_through_the_anchors_and_a_circle_is_a_polygon():
    n = 8
    grid = _PolarGrid((41, 41), n, torch.device("cpu"), torch.float64)
    r = torch.full((1, n), 10.0, dtype=torch.float64)
    rho = grid.contour(r).view(41, 41)
    centre = 20
    for k in range(n):  # on an anchor's ray the outline is at that anchor's radius
        dx, dy = math.cos(2 * math.pi * k / n), math.sin(2 * math.pi * k / n)
        if abs(dx) < 1e-9 or abs(dy) < 1e-9 or abs(abs(dx) - abs(dy)) < 1e-9:
            row, col = centre + round(3 * dy), centre + round(3 * dx)
            assert rho[row, col].item() == pytest.approx(10.0)
    # halfway between two anchors the straight edge is at r cos(pi / n)
    g45 = _PolarGrid((41, 41), 4, torch.device("cpu"), torch.float64)
    rho45 = g45.contour(torch.full((1, 4), 10.0, dtype=torch.float64)).view(41, 41)
    assert rho45[centre + 5, centre + 5].item() == pytest.approx(10 * math.cos(math.pi / 4))


def test_soft_mask_gradcheck_float64():
    grid = _PolarGrid((7, 9), 6, torch.device("cpu"), torch.float64)
    g = torch.Generator().manual_seed(0)
    radii = (1.5 + 2 * torch.rand(2, 6, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda r: grid.soft_mask(r, 0.7), (radii,))


# --- the attack's properties -------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    size=st.tuples(st.integers(1, 5), st.integers(1, 5)),
    image=st.tuples(st.integers(0, 8), st.integers(0, 8)),
    n_anchors=st.integers(3, 16),
    box_scale=st.floats(1.0, 3.0),
    steps=st.integers(1, 3),
    eot=st.sampled_from([False, 2]),
    seed=st.integers(0, 1000),
)
def test_mask_area_never_exceeds_the_budget(size, image, n_anchors, box_scale, steps, eot, seed):
    h, w = size
    hh, ww = h + image[0], w + image[1]
    x, y = _images(3, 2, hh, ww, seed)
    attack = DPR(
        tiny_net(2),
        size,
        steps=steps,
        n_anchors=n_anchors,
        box_scale=box_scale,
        eot=eot,
        shape_step_size=2.0,
        seed=seed,
    )
    x_adv = attack(x, y)
    mask, patch, loc = attack.mask, attack.patch, attack.locations
    bh, bw = patch.shape[-2:]
    assert h <= bh <= hh and w <= bw <= ww
    assert mask.shape == (3, 1, bh, bw) and set(mask.unique().tolist()) <= {0.0, 1.0}
    area = mask.sum(dim=(1, 2, 3))
    assert bool((area <= h * w).all())
    assert bool((area == min(h * w, bh * bw)).all())  # the budget is used in full
    assert attack.radii.shape == (3, n_anchors) and bool((attack.radii > 0).all())
    # the same computation as apply_patch with the mask: identical images
    assert torch.equal(apply_patch(x, patch, loc, mask=mask), x_adv)
    changed = (x_adv != x).any(dim=1)  # (B, H, W): only masked pixels may change
    for i in range(3):
        r, c = loc[i].tolist()
        canvas = torch.zeros(hh, ww, dtype=torch.bool)
        canvas[r : r + bh, c : c + bw] = mask[i, 0].bool()
        assert not bool((changed[i] & ~canvas).any())
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_gradients_reach_both_the_shape_and_the_texture():
    net = tiny_net(1)
    x, y = _images(4, 1, 12, 12)
    for eot in (0, 2):
        attack = DPR(net, 3, steps=1, n_anchors=8, seed=0, eot=eot or False)
        grid = _PolarGrid((6, 6), 8, x.device, torch.float32)
        radii = 1 + 0.3 * torch.rand(4, 8)
        radii, mask = attack._masks(grid, radii, 9)
        assert radii.requires_grad and set(mask.detach().unique().tolist()) == {0.0, 1.0}
        texture = torch.rand(4, 1, 6, 6, requires_grad=True)
        loc = torch.tensor([[0, 0], [3, 2], [6, 6], [1, 5]])
        x_adv = attack._patched(x, texture, mask, loc, eot)
        assert x_adv.shape == ((eot or 1) * 4, 1, 12, 12)
        loss = F.cross_entropy(net(x_adv), y.repeat(eot or 1))
        g_radii, g_texture = torch.autograd.grad(loss, (radii, texture))
        assert torch.isfinite(g_radii).all() and torch.isfinite(g_texture).all()
        assert bool((g_radii.abs().sum(1) > 0).all())  # every image's shape moves
        assert bool((g_texture.abs().sum(dim=(1, 2, 3)) > 0).all())
        if not eot:  # the texture gets gradient only where the mask pastes it
            assert bool((g_texture[mask.detach().expand_as(g_texture) == 0] == 0).all())


def test_the_outline_moves_and_stays_at_the_budget():
    net = tiny_net(1)
    x, y = _images(4, 1, 16, 16)
    attack = DPR(net, 4, steps=6, n_anchors=10, shape_step_size=1.0, seed=1)
    attack(x, y)
    r = attack.radii
    assert bool(((r.amax(1) - r.amin(1)) > 0.1).all())  # no longer the initial circle
    frozen = DPR(net, 4, steps=6, n_anchors=10, shape_step_size=0.0, seed=1)
    frozen(x, y)
    rf = frozen.radii
    assert torch.allclose(rf, rf[:, :1].expand_as(rf))  # shape_step_size=0 keeps the circle
    assert torch.equal(attack.mask.sum(dim=(1, 2, 3)), torch.full((4,), 16.0))


def test_seeded_runs_are_reproducible_and_the_model_is_untouched():
    net = tiny_net(1)
    net.train()
    x, y = _images(5, 1, 12, 12, seed=3)
    runs = []
    for seed in (7, 7, 8):
        attack = DPR(net, 3, steps=3, seed=seed, restarts=2)
        runs.append((attack(x, y), attack.patch, attack.mask, attack.locations))
    for a, b in zip(runs[0], runs[1]):
        assert torch.equal(a, b)
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], runs[2]))
    assert net.training and all(p.grad is None for p in net.parameters())


def test_box_scale_one_is_lavan():
    """With no room to deform, the mask is the whole square and DPR takes LAVAN's steps."""
    net = tiny_net(1)
    x, y = _images(4, 1, 12, 12, seed=2)
    dpr = DPR(net, 4, steps=4, box_scale=1.0, seed=5)
    lavan = LAVAN(net, 4, steps=4, seed=5)
    x_dpr, x_lavan = dpr(x, y), lavan(x, y)
    assert torch.equal(dpr.mask, torch.ones(4, 1, 4, 4))
    assert torch.allclose(x_dpr, x_lavan, atol=1e-6)
    assert torch.equal(dpr.locations, lavan.locations)


def test_given_locations_are_the_box_corners_and_are_checked():
    net = tiny_net(1)
    x, y = _images(2, 1, 12, 12)
    attack = DPR(net, 3, steps=1, seed=0)  # a 6x6 box
    loc = torch.tensor([[6, 0], [2, 5]])
    attack(x, y, locations=loc)
    assert torch.equal(attack.locations, loc)
    with pytest.raises(InputError, match="outside"):
        attack(x, y, locations=torch.tensor([[7, 0], [0, 0]]))  # fits a 3x3, not the box


def test_runs_on_a_wrapper_at_a_bit_width_and_as_a_patch_source():
    net = tiny_net(1)
    x, y = _images(4, 1, 12, 12)
    w = TriQDefWrapper(net, bits=(32, 8, 4), layers=["1"])
    with torch.no_grad():
        for b in (32, 8, 4):
            with w.at_bits(b):
                w(x)
    w.eval().set_bits(8)
    attack = DPR(w, 3, bits=4, steps=2, seed=0)
    x_adv = attack(x, y)
    assert w.current_bits == 8 and x_adv.shape == x.shape
    source = DPR(None, 3, steps=2, seed=0)
    assert source(x, y, w).shape == x.shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(n_anchors=2), "n_anchors"),
        (dict(box_scale=0.5), "box_scale"),
        (dict(temperature=0.0), "temperature"),
        (dict(shape_step_size=-1.0), "shape_step_size"),
        (dict(eot=True), "eot"),
        (dict(eot=0), "eot"),
        (dict(restarts=0), "restarts"),
        (dict(scale_range=(1.2, 0.8)), "scale_range"),
        (dict(init_patch=torch.rand(1, 3, 3)), "init_patch"),
    ],
)
def test_bad_arguments_raise_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        DPR(tiny_net(1), 3, **kwargs)


# --- apply_patch with a patch's own mask -------------------------------------------------------
def test_apply_patch_with_a_box_mask():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 9, 10, generator=g, dtype=torch.float64)
    patch = torch.rand(3, 2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 1, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    loc = torch.tensor([[0, 0], [5, 5], [2, 3]])
    out = apply_patch(x, patch, loc, mask=mask)
    expected = x.clone()
    for i, (r, c) in enumerate(loc.tolist()):
        box = expected[i, :, r : r + 4, c : c + 5]
        expected[i, :, r : r + 4, c : c + 5] = box * (1 - mask[i]) + patch[i] * mask[i]
    assert torch.allclose(out, expected, atol=1e-12)
    gp, gm = torch.autograd.grad(out.sum(), (patch, mask))
    assert torch.allclose(gp, mask.detach().expand_as(gp), atol=1e-12)
    assert gm.abs().sum() > 0
    ones = torch.ones(1, 4, 5, dtype=torch.float64)
    assert torch.equal(apply_patch(x, patch, loc, mask=ones), apply_patch(x, patch, loc))
    # without locations, a smaller patch and its mask go to random corners
    gen = torch.Generator().manual_seed(1)
    out_random = apply_patch(x, patch, mask=mask, generator=gen)
    assert out_random.shape == x.shape
    with pytest.raises(InputError, match="does not broadcast"):
        apply_patch(x, patch, loc, mask=torch.ones(9, 10))  # an image-size mask for a box
    with pytest.raises(InputError, match="mask must be a tensor"):
        apply_patch(x, patch, loc, mask=[[1.0]])


# --- effectiveness and evaluation --------------------------------------------------------------
def test_dpr_beats_a_random_patch_of_the_same_area(digits, capsys):
    net, x, y = digits["net"], digits["x"], digits["y"]
    attack = DPR(net, 4, steps=30, step_size=0.1, seed=0)
    x_adv = attack(x, y)
    ours = asr(net, x_adv, y)
    square = asr(net, RandomPatch(4, generator=torch.Generator().manual_seed(0))(x), y)
    noise = torch.rand(attack.patch.shape, generator=torch.Generator().manual_seed(0))
    shaped = asr(net, apply_patch(x, noise, attack.locations, mask=attack.mask), y)
    with capsys.disabled():
        print(
            f"\n  DPR 16-pixel ASR {ours:.3f} vs noise {square:.3f} (square), "
            f"{shaped:.3f} (same shape) on {len(y)} digits"
        )
    assert ours >= max(square, shaped) + 0.2
    assert torch.equal(apply_patch(x, attack.patch, attack.locations, mask=attack.mask), x_adv)
    assert attack.last_loss is not None and attack.last_loss > 0.5


def test_transfer_matrix_scores_dpr_with_a_noise_floor_of_the_same_shape(digits):
    net, x, y = digits["net"], digits["x"][:32], digits["y"][:32]

    def make(model, bits):
        return DPR(model, 4, bits=bits, steps=5, step_size=0.1, seed=3)

    m = transfer_matrix(net, make, [(x, y)], seed=0)
    assert m.attack == "dpr" and m.source_bits == [32] and m.samples == 32
    attack = make(net, 32)  # the same seeded attack on the same batch
    x_adv = attack(x, y)
    noise = torch.rand(attack.patch.shape, generator=torch.Generator().manual_seed(0))
    x_noise = apply_patch(x, noise, attack.locations, mask=attack.mask)
    with torch.no_grad():
        wrong_adv = int((net(x_adv).argmax(1) != y).sum())
        wrong_noise = int((net(x_noise).argmax(1) != y).sum())
    assert m.counts[0][0] == (wrong_adv, 32)  # every image is classified correctly clean
    assert m.noise_counts[0] == (wrong_noise, 32)


class _Masked:
    """A fixed patch covering the whole image, with an optional mask: a protocol probe."""

    name = "masked"
    targeted, target = False, None

    def __init__(self, mask: torch.Tensor | None) -> None:
        self.patch = self.locations = None
        self.mask = mask

    def __call__(self, x, y):
        self.patch = torch.ones(x.shape[0], *x.shape[1:])
        self.locations = torch.zeros(x.shape[0], 2, dtype=torch.long)
        if self.mask is not None:
            return apply_patch(x, self.patch, self.locations, mask=self.mask)
        return apply_patch(x, self.patch, self.locations)


def test_transfer_matrix_noise_floor_uses_the_attack_mask(digits):
    net, x, y = digits["net"], digits["x"][:32], digits["y"][:32]
    empty = torch.zeros(1, 1, *x.shape[-2:])
    with_mask = transfer_matrix(net, lambda m, b: _Masked(empty), [(x, y)], seed=0)
    without = transfer_matrix(net, lambda m, b: _Masked(None), [(x, y)], seed=0)
    assert with_mask.noise_counts[0] == (0, 32)  # an empty mask pastes nothing
    assert with_mask.counts[0][0] == (0, 32)
    assert without.noise_counts[0][0] > 0  # whole-image noise fools the model
