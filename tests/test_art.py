"""ART interop: ``as_classifier`` runs one bit-width for ART, ``patch_source`` feeds ART's
patch attacks to ``wrapper.loss``."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("art")

from art.attacks.evasion import (  # noqa: E402
    AdversarialPatchNumpy,
    AdversarialPatchPyTorch,
    FastGradientMethod,
)

from triqdef import TriQDefWrapper  # noqa: E402
from triqdef.errors import ConfigError, InputError, NotCalibratedError  # noqa: E402
from triqdef.integrations.art import ARTPatchSource, as_classifier, patch_source  # noqa: E402
from triqdef.models import SmallCNN  # noqa: E402

BITS = (32, 8, 4)
SHAPE = (1, 12, 12)


def _wrapper(channels: int = 1, calibrate: bool = True, seed: int = 0) -> TriQDefWrapper:
    torch.manual_seed(seed)
    w = TriQDefWrapper(SmallCNN(channels, 5, width=4), bits=BITS, layers=["block1"])
    if calibrate:
        w.calibrate([torch.rand(16, channels, 12, 12)])
    return w


def _data(n: int = 8, channels: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, 12, 12, generator=g), torch.randint(0, 5, (n,), generator=g)


def _eval_logits(w: TriQDefWrapper, x: torch.Tensor, bits: int) -> torch.Tensor:
    was = w.training
    w.eval()
    with torch.no_grad(), w.at_bits(bits):
        out = w(x)
    w.train(was)
    return out


class _Numpy(AdversarialPatchNumpy):
    """ART's numpy AdversarialPatch; ART 1.20.1's constructor hands ``reset_patch`` a
    ``np.float32`` mean, which that method only accepts as a Python float."""

    def reset_patch(self, initial_patch_value):
        if isinstance(initial_patch_value, np.floating):
            initial_patch_value = float(initial_patch_value)
        super().reset_patch(initial_patch_value)


def _patch_attack(classifier, **kw) -> AdversarialPatchPyTorch:
    kw = {"patch_shape": (1, 4, 4), "max_iter": 2, "batch_size": 8, "targeted": False, **kw}
    return AdversarialPatchPyTorch(classifier, learning_rate=0.1, verbose=False, **kw)


# --- as_classifier -----------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [32, 4])
def test_predictions_are_the_wrappers_logits_at_those_bits_and_leave_it_as_it_was(bits):
    w = _wrapper()
    x, _ = _data()
    w.set_bits(8)
    w.train()
    w.model.block1[1].eval()  # a module deliberately in eval mode stays so
    before = {k: v.clone() for k, v in w.state_dict().items()}
    classifier = as_classifier(w, bits, input_shape=SHAPE)
    assert classifier.nb_classes == 5
    assert classifier.input_shape == SHAPE
    preds = classifier.predict(x.numpy())
    assert preds.shape == (8, 5)
    assert w.current_bits == 8
    assert w.training and not w.model.block1[1].training and w.model.block1[0].training
    for k, v in w.state_dict().items():  # eval mode: observers and BatchNorm statistics only read
        torch.testing.assert_close(v, before[k], atol=0, rtol=0)
    torch.testing.assert_close(torch.from_numpy(preds), _eval_logits(w, x, bits), atol=1e-5, rtol=0)


def test_the_input_shape_comes_from_the_inputs_the_wrapper_keeps():
    w = _wrapper()
    x, y = _data()
    with pytest.raises(ConfigError, match="input_shape"):
        as_classifier(w, 8)
    w.keep_recent_inputs(1)
    w.loss(x, y)
    classifier = as_classifier(w, 8)
    assert classifier.input_shape == SHAPE and classifier.nb_classes == 5
    assert as_classifier(w, 8, channels_first=False).input_shape == (12, 12, 1)


def test_channels_last_inputs_give_the_channels_first_predictions():
    w = _wrapper(channels=3)
    x, _ = _data(channels=3)
    nchw = as_classifier(w, 4, input_shape=(3, 12, 12)).predict(x.numpy())
    last = as_classifier(w, 4, input_shape=(12, 12, 3), channels_first=False)
    nhwc = last.predict(x.permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(nhwc, nchw, atol=1e-5, rtol=0)


def test_a_float64_wrapper_gets_float64_inputs():
    w = _wrapper().double()
    x, _ = _data()
    preds = as_classifier(w, 4, input_shape=SHAPE).predict(x.numpy())
    ref = _eval_logits(w, x.double(), 4)
    np.testing.assert_allclose(preds, ref.float().numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bits", [5, 16, True, 8.0, "8"])
def test_a_bit_width_the_wrapper_lacks_is_refused(bits):
    w = _wrapper()
    with pytest.raises(ConfigError, match="not one of this wrapper's bits"):
        as_classifier(w, bits, input_shape=SHAPE)


def test_an_uncalibrated_bit_width_and_bad_arguments_are_refused():
    w = _wrapper(calibrate=False)
    with pytest.raises(NotCalibratedError, match="calibrate"):
        as_classifier(w, 4, input_shape=SHAPE)
    as_classifier(w, 32, input_shape=SHAPE)  # 32 bits needs no calibration
    with pytest.raises(ConfigError, match="TriQDefWrapper"):
        as_classifier(SmallCNN(1, 5, width=4), 32, input_shape=SHAPE)
    for shape in [(), (1, 0, 12), "1x12x12", (1.0, 12, 12)]:
        with pytest.raises(ConfigError, match="input_shape"):
            as_classifier(w, 32, input_shape=shape)
    with pytest.raises(ConfigError, match="nb_classes"):
        as_classifier(w, 32, input_shape=SHAPE, nb_classes=0)
    with pytest.raises(ConfigError, match="input_shape"):  # the probe forward fails: a hint
        as_classifier(w, 32, input_shape=(2, 12, 12))


def test_an_art_evasion_attack_runs_through_the_classifier_without_touching_the_wrapper():
    w = _wrapper()
    x, y = _data()
    w.set_bits(32)
    classifier = as_classifier(w, 4, input_shape=SHAPE)
    x_adv = FastGradientMethod(classifier, eps=0.1).generate(x.numpy(), y=y.numpy())
    assert x_adv.shape == x.shape and x_adv.dtype == np.float32
    delta = np.abs(x_adv - x.numpy())
    assert delta.max() <= 0.1 + 1e-6 and delta.max() > 0.05
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # FGSM at 4 bits moves the 4-bit loss up
    ce = torch.nn.functional.cross_entropy
    clean, adv = (ce(_eval_logits(w, t, 4), y) for t in (x, torch.from_numpy(x_adv)))
    assert adv > clean
    assert all(p.grad is None for p in w.parameters())  # no gradient left on the backbone
    assert all(p.requires_grad for p in w.parameters())
    assert w.current_bits == 32 and w.training


def test_art_loss_gradient_is_the_wrappers_input_gradient():
    w = _wrapper()
    x, y = _data(n=4)
    onehot = np.eye(5, dtype=np.float32)[y.numpy()]
    grad = as_classifier(w, 4, input_shape=SHAPE).loss_gradient(x.numpy(), onehot)
    xr = x.clone().requires_grad_(True)
    w.eval()
    with w.at_bits(4):
        torch.nn.functional.cross_entropy(w(xr), y).backward()
    np.testing.assert_allclose(grad, xr.grad.numpy(), atol=1e-6, rtol=1e-4)


# --- patch_source ------------------------------------------------------------------------------
def test_patched_images_change_only_inside_the_patch_box():
    w = _wrapper()
    x, y = _data()
    attack = _patch_attack(as_classifier(w, 4, input_shape=SHAPE), patch_type="square")
    source = patch_source(attack, seed=0)
    assert isinstance(source, ARTPatchSource)
    out = source(x, y, w)
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert not out.requires_grad
    assert source.patch is not None and source.patch.shape == (1, 4, 4)
    loc = source.locations
    assert loc is not None and loc.shape == (8, 2)
    inside = torch.zeros_like(x, dtype=torch.bool)
    for i, (r, c) in enumerate(loc.tolist()):
        assert 0 <= r <= 8 and 0 <= c <= 8
        inside[i, :, r : r + 4, c : c + 4] = True
        torch.testing.assert_close(out[i, :, r : r + 4, c : c + 4], source.patch, atol=1e-6, rtol=0)
    torch.testing.assert_close(out[~inside], x[~inside], atol=0, rtol=0)
    assert (out[inside] != x[inside]).any()


def test_the_circle_mask_blends_and_the_source_keeps_dtype_and_seeded_corners():
    w = _wrapper()
    x, y = _data()
    classifier = as_classifier(w, 4, input_shape=SHAPE)
    attack = _patch_attack(classifier, patch_shape=(1, 6, 6))  # ART's default circle
    a = patch_source(attack, seed=3, refresh_every=None)
    out = a(x.double(), y)
    assert out.dtype == torch.float64
    b = patch_source(attack, seed=3)
    b(x, y)
    assert torch.equal(a.locations, b.locations)  # the same seed draws the same corners
    mask = a.mask
    assert mask is not None and mask.min() >= 0 and mask.max() <= 1 and (mask < 1).any()
    for i, (r, c) in enumerate(a.locations.tolist()):
        box = out[i, :, r : r + 6, c : c + 6]
        want = x[i, :, r : r + 6, c : c + 6].double() * (1 - mask) + a.patch.double() * mask
        torch.testing.assert_close(box, want, atol=1e-6, rtol=0)


def test_the_loss_backpropagates_through_an_art_patch_source():
    w = _wrapper()
    x, y = _data()
    w.set_bits(32)
    w.train()
    attack = _patch_attack(as_classifier(w, 4, input_shape=SHAPE))
    loss = w.loss(x, y, patch=patch_source(attack, seed=0))
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in w.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert w.current_bits == 32 and w.training


class _Counting:
    """An ART attack stand-in that counts its generate calls (a constant patch)."""

    estimator = None
    targeted = False

    def __init__(self):
        self.calls = 0

    def generate(self, x, y=None):
        self.calls += 1
        return np.full((x.shape[1], 3, 3), 0.5, dtype=np.float32)


@pytest.mark.parametrize("every, calls, expected", [(1, 5, 5), (2, 5, 3), (None, 5, 1)])
def test_refresh_every(every, calls, expected):
    x, y = _data()
    attack = _Counting()
    source = patch_source(attack, refresh_every=every, seed=0)
    for _ in range(calls):
        source(x, y)
    assert attack.calls == expected == source.generations
    source.refresh()
    source(x, y)
    assert attack.calls == expected + 1


def test_patch_size_resizes_the_art_patch():
    w = _wrapper()
    x, y = _data()
    attack = _patch_attack(as_classifier(w, 4, input_shape=SHAPE), patch_shape=(1, 12, 12))
    source = patch_source(attack, patch_size=5, seed=0)
    out = source(x, y)
    assert source.patch is not None and source.patch.shape == (1, 5, 5)
    assert source.mask is not None and source.mask.shape[-2:] == (5, 5)
    assert 0 <= float(source.patch.min()) and float(source.patch.max()) <= 1
    changed = (out != x).flatten(1).sum(1)
    assert (changed <= 25).all() and (changed > 0).any()


def test_art_can_place_its_own_patch():
    w = _wrapper()
    x, y = _data()
    attack = _patch_attack(as_classifier(w, 4, input_shape=SHAPE))
    source = patch_source(attack, scale=0.4)
    out = source(x.double(), y)
    assert out.shape == x.shape and out.dtype == torch.float64 and source.locations is None
    changed = (out.float() - x).abs().gt(1e-6).flatten(1).float().mean(1)
    assert (changed > 0).any() and (changed < 0.5).all()


def test_channel_layouts_of_art_patches():
    w = _wrapper(channels=3)
    x, y = _data(channels=3)
    last = as_classifier(w, 4, input_shape=(12, 12, 3), channels_first=False)
    # the numpy implementation returns (h, w, C) patches for a channels-last classifier
    numpy_attack = _Numpy(
        last, max_iter=1, batch_size=8, targeted=False, verbose=False, scale_min=0.3, scale_max=0.5
    )
    source = patch_source(numpy_attack, patch_size=4, seed=0)
    out = source(x, y)
    assert out.shape == x.shape and source.patch is not None and source.patch.shape == (3, 4, 4)
    # the PyTorch implementation keeps (C, h, w) patches whatever the images' layout
    torch_attack = _patch_attack(last, patch_shape=(3, 3, 3), patch_type="square")
    torch_attack.reset_patch(np.random.default_rng(0).uniform(0.2, 0.8, (3, 3, 3)))
    source = patch_source(torch_attack, seed=0)
    out = source(x, y)
    raw = torch_attack._patch.detach().float()
    assert not torch.equal(raw, raw.permute(1, 2, 0))  # (C, h, w) and (h, w, C) differ
    assert source.patch is not None and torch.equal(source.patch, raw)
    r, c = source.locations[0].tolist()
    torch.testing.assert_close(out[0, :, r : r + 3, c : c + 3], raw, atol=1e-6, rtol=0)


def test_patch_source_refuses_bad_arguments_and_outputs():
    w = _wrapper()
    x, y = _data()
    classifier = as_classifier(w, 4, input_shape=SHAPE)
    with pytest.raises(ConfigError, match="generate"):
        patch_source(object())
    with pytest.raises(ConfigError, match="target="):
        patch_source(_patch_attack(classifier, targeted=True))
    with pytest.raises(ConfigError, match="nb_classes"):
        patch_source(_patch_attack(classifier, targeted=True), target=5)
    with pytest.raises(ConfigError, match="untargeted"):
        patch_source(_Counting(), target=1)
    for kw in [
        {"refresh_every": 0},
        {"patch_size": 0},
        {"scale": 0.0},
        {"scale": 1.5},
        {"seed": -1},
        {"scale": 0.5, "patch_size": 3},
    ]:
        with pytest.raises(ConfigError):
            patch_source(_Counting(), **kw)
    with pytest.raises(ConfigError, match="apply_patch"):
        patch_source(_Counting(), scale=0.5)
    with pytest.raises(InputError, match="patch_size"):  # larger than the images
        patch_source(_Returns(np.zeros((1, 16, 16), np.float32)))(x, y)
    with pytest.raises(ConfigError, match="not a"):  # an evasion attack returns images
        patch_source(FastGradientMethod(classifier, eps=0.1))(x, y)
    source = patch_source(_Counting())
    with pytest.raises(InputError, match="labels"):
        source(x)
    with pytest.raises(InputError, match="floating"):
        source(x.long(), y)
    with pytest.raises(InputError):
        source(x, y.float())
    assert source.patch is None  # nothing generated by refused calls


class _Returns(_Counting):
    def __init__(self, patch, mask=None):
        super().__init__()
        self.out = patch if mask is None else (patch, mask)

    def generate(self, x, y=None):
        return self.out


@pytest.mark.parametrize(
    "out, match",
    [
        (np.full((1, 3, 3), np.nan, np.float32), "NaN"),
        (np.zeros((2, 3, 3), np.float32), "channels"),
        ((np.zeros((1, 3, 3), np.float32), np.full((1, 3, 3), 2.0, np.float32)), r"\[0, 1\]"),
        ((np.zeros((1, 3, 3), np.float32), np.ones((1, 2, 2), np.float32)), "mask of shape"),
    ],
)
def test_a_bad_art_patch_is_refused(out, match):
    x, y = _data()
    source = patch_source(_Returns(*out) if isinstance(out, tuple) else _Returns(out))
    with pytest.raises(InputError, match=match):
        source(x, y)


def test_importing_without_art_names_the_extra(monkeypatch):
    for name in ("art", "art.estimators", "art.estimators.classification"):
        monkeypatch.setitem(sys.modules, name, None)  # importing them now fails
    monkeypatch.delitem(sys.modules, "triqdef.integrations.art")
    with pytest.raises(ConfigError, match=r"pip install 'triqdef\[art\]'") as info:
        importlib.import_module("triqdef.integrations.art")
    assert isinstance(info.value, ImportError)
