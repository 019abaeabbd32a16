"""PatchAttack, the black-box textured patch attack (issue #16): it fools a model that
exposes only its outputs, never spends more queries than its budget, reproduces from a
seed, uses the texture dictionary as specified and refuses bad arguments up front."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from triqdef import TriQDefWrapper
from triqdef.attacks import RandomPatch, apply_patch
from triqdef.attacks.patchattack import PatchAttack
from triqdef.data import load_dataset
from triqdef.errors import ConfigError, InputError
from triqdef.evaluate import transfer_matrix
from triqdef.models import SmallCNN


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class BlackBox(nn.Module):
    """Only outputs: the forward runs under no_grad and returns detached logits. It counts
    the images it is asked about and records whether gradients were ever enabled."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.images = 0
        self.grad_seen = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        self.grad_seen |= torch.is_grad_enabled()
        with torch.no_grad():
            return self.net(x).detach()


@pytest.fixture(scope="module")
def digits():
    """A SmallCNN(width=8) trained briefly on 16x16 digits; correctly classified test images."""
    torch.manual_seed(0)
    x_train, y_train, _ = load_dataset("digits", train=True, size=16)
    x_test, y_test, _ = load_dataset("digits", train=False, size=16)
    net = SmallCNN(width=8)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(250):
        idx = torch.randint(0, len(y_train), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
        opt.step()
    net.eval().zero_grad(set_to_none=True)
    with torch.no_grad():
        ok = net(x_test).argmax(1) == y_test
    assert ok.float().mean() > 0.85
    return dict(net=net, x=x_test[ok][:64], y=y_test[ok][:64], x_train=x_train, y_train=y_train)


def asr(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (net(x).argmax(1) != y).float().mean().item()


def tiny_net(channels: int = 1, classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, classes),
    ).eval()


def tiny_textures(t: int = 6, c: int = 1, side: int = 5, classes: int = 3):
    g = torch.Generator().manual_seed(3)
    return torch.rand(t, c, side, side, generator=g), torch.arange(t) % classes


def crop_classes(attack: PatchAttack, patch: torch.Tensor) -> set[int]:
    """Classes of the textures that ``patch`` (C, h, w) is an exact crop of."""
    tex, labels = attack.textures, attack.texture_labels
    h, w = patch.shape[-2:]
    found = set()
    for i in range(tex.shape[0]):
        for r in range(tex.shape[-2] - h + 1):
            for c in range(tex.shape[-1] - w + 1):
                if torch.equal(tex[i, :, r : r + h, c : c + w], patch):
                    found.add(int(labels[i]))
    return found


# --- effectiveness without gradients ------------------------------------------------------
def test_fools_a_model_that_exposes_no_gradients(digits, capsys):
    net, x, y = digits["net"], digits["x"], digits["y"]
    box = BlackBox(net)
    attack = PatchAttack(box, 4, queries=200, rl_batch=10, seed=0)
    attack.fit_textures(digits["x_train"], digits["y_train"], per_class=4)
    x_adv = attack(x, y)
    ours = asr(net, x_adv, y)
    gen = torch.Generator().manual_seed(1)
    floor = (
        sum(
            asr(
                net,
                apply_patch(x, torch.rand(attack.patch.shape, generator=gen), attack.locations),
                y,
            )
            for _ in range(5)
        )
        / 5
    )
    random_patch = asr(net, RandomPatch(4, generator=gen)(x), y)
    with capsys.disabled():
        print(
            f"\n  PatchAttack 4x4 ASR {ours:.3f} vs noise at its locations {floor:.3f}, "
            f"random patch {random_patch:.3f}; mean queries "
            f"{attack.queries_used.float().mean():.0f}/200 on {len(y)} digits"
        )
    assert ours >= floor + 0.2
    assert ours >= random_patch + 0.3
    assert not box.grad_seen  # every model call ran under no_grad
    assert all(p.grad is None for p in net.parameters())
    assert torch.equal(apply_patch(x, attack.patch, attack.locations), x_adv)
    assert attack.mask is None and attack.locations.dtype == torch.long
    # success is the model's verdict on the returned images (batch composition aside)
    with torch.no_grad():
        fooled = net(x_adv).argmax(1) != y
    assert (fooled == attack.success).float().mean() >= 0.95
    # the reported queries are the model evaluations made, within the budget
    assert box.images == int(attack.queries_used.sum())
    assert int(attack.queries_used.max()) <= 200
    spent = attack.queries_used[~attack.success]
    assert bool((spent == 200).all())  # an image stops early only on a success
    assert attack.last_loss > 0


def test_targeted_uses_target_textures_and_reaches_the_target(digits):
    net, x, y = digits["net"], digits["x"][:24], digits["y"][:24]
    attack = PatchAttack(BlackBox(net), 5, queries=150, rl_batch=10, targeted=True, target=3)
    attack.fit_textures(digits["x_train"], digits["y_train"], per_class=3, size=8)
    x_adv = attack(x, y)
    for i in range(len(y)):
        assert crop_classes(attack, attack.patch[i]) == {3}
    with torch.no_grad():
        hit = net(x_adv).argmax(1) == 3
    assert (hit == attack.success).float().mean() >= 0.95
    noise = apply_patch(x, torch.rand(attack.patch.shape), attack.locations)
    with torch.no_grad():
        noise_hit = (net(noise).argmax(1) == 3)[y != 3].float().mean().item()
    assert hit[y != 3].float().mean().item() >= noise_hit + 0.2


# --- the query budget ----------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(
    queries=st.integers(2, 40),
    rl_batch=st.integers(2, 9),
    n_patches=st.integers(1, 3),
    b=st.integers(1, 3),
    targeted=st.booleans(),
    seed=st.integers(0, 10),
)
def test_query_budget_is_never_exceeded(queries, rl_batch, n_patches, b, targeted, seed):
    box = BlackBox(tiny_net())
    tex, labels = tiny_textures()
    kw = dict(targeted=True, target=1) if targeted else {}
    attack = PatchAttack(
        box,
        3,
        queries=queries,
        rl_batch=rl_batch,
        n_patches=n_patches,
        textures=tex,
        texture_labels=labels,
        seed=seed,
        **kw,
    )
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (b,), generator=g)
    x_adv = attack(x, y)
    used = attack.queries_used
    assert used.dtype == torch.long and used.shape == (b,)
    assert bool((used <= queries).all()) and bool((used >= 2).all())
    assert box.images == int(used.sum())
    assert bool((used[~attack.success] == queries).all())
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1
    if n_patches == 1:
        assert torch.equal(apply_patch(x, attack.patch, attack.locations), x_adv)
    else:
        area = attack.mask.sum(dim=(1, 2, 3))
        assert bool((area >= 9).all()) and bool((area <= 9 * n_patches).all())
        assert torch.equal(apply_patch(x, attack.patch, mask=attack.mask), x_adv)
        assert torch.equal(x_adv * (1 - attack.mask), x * (1 - attack.mask))


@pytest.mark.parametrize("n_patches", [1, 2])
def test_transfer_matrix_scores_it_and_its_noise_floor(n_patches):
    net = tiny_net(classes=3)
    tex, labels = tiny_textures()
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(6, 1, 8, 8, generator=g), torch.tensor([0, 1, 2, 0, 1, 2])
    made = []

    def make(model, bits):
        made.append(
            PatchAttack(
                model,
                3,
                bits=bits,
                queries=15,
                rl_batch=7,
                n_patches=n_patches,
                textures=tex,
                texture_labels=labels,
                seed=0,
            )
        )
        return made[-1]

    tm = transfer_matrix(net, make, [(x, y)], seed=0)
    attack = made[0]
    x_adv = apply_patch(x, attack.patch, attack.locations, mask=attack.mask)
    with torch.no_grad():
        clean_ok = net(x).argmax(1) == y
        fooled = net(x_adv).argmax(1) != y
    s, e = tm.counts[0][0]
    assert e == int(clean_ok.sum()) and s == int((clean_ok & fooled).sum())
    assert tm.noise_counts[0][1] == e  # the floor is scored on the same images


# --- reproducibility and the dictionary ---------------------------------------------------
def test_same_seed_same_result_and_reseed():
    tex, labels = tiny_textures()
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0, 1])

    def make(**kw):
        return PatchAttack(
            tiny_net(), 3, queries=30, rl_batch=5, textures=tex, texture_labels=labels, **kw
        )

    a, b = make(seed=7), make(seed=7)
    xa, xb = a(x, y), b(x, y)
    assert torch.equal(xa, xb) and torch.equal(a.queries_used, b.queries_used)
    assert torch.equal(a.locations, b.locations)
    a.reseed()
    assert torch.equal(a(x, y), xa)
    c = make(generator=torch.Generator().manual_seed(7))
    assert torch.equal(c(x, y), xa)


def test_untargeted_patches_come_from_other_classes_textures_at_given_locations():
    tex, labels = tiny_textures()
    x = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2, 1])
    loc = torch.tensor([[0, 0], [5, 5], [2, 3], [4, 1]])
    attack = PatchAttack(tiny_net(), 3, queries=25, rl_batch=6, textures=tex, texture_labels=labels)
    x_adv = attack(x, y, locations=loc)
    assert torch.equal(attack.locations, loc)
    assert torch.equal(apply_patch(x, attack.patch, loc), x_adv)
    for i in range(4):
        found = crop_classes(attack, attack.patch[i])
        assert found and int(y[i]) not in found


def test_fit_textures_takes_central_images_of_each_class():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 8, 8, generator=g)
    y = torch.arange(40) % 4
    attack = PatchAttack(tiny_net(), 3, queries=10).fit_textures(x, y, per_class=3)
    assert attack.textures.shape == (12, 1, 8, 8)
    assert attack.texture_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    for tex, k in zip(attack.textures, attack.texture_labels):
        members = x[y == k]
        assert bool((members == tex).flatten(1).all(1).any())  # a real image of its class
    again = PatchAttack(tiny_net(), 3, queries=10).fit_textures(x, y, per_class=3)
    assert torch.equal(again.textures, attack.textures)
    crops = PatchAttack(tiny_net(), 3).fit_textures(x, y, per_class=20, size=4)
    assert crops.textures.shape[1:] == (1, 4, 4)
    assert crops.textures.shape[0] == 4 * 20  # 10 images x 9 crops per class, 20 kept
    few = PatchAttack(tiny_net(), 3).fit_textures(x[:6], y[:6], per_class=5)
    assert few.texture_labels.bincount().tolist() == [2, 2, 1, 1]  # all a class has


def test_wrapper_runs_at_the_attack_bit_width_and_is_left_alone():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3)
    )
    w = TriQDefWrapper(net, bits=(32, 8, 4), layers=["0"])
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in (32, 8, 4):
            with w.at_bits(b):
                w(x)
    w.set_bits(8)
    w.train()
    before = {k: v.clone() for k, v in w.state_dict().items()}
    tex, labels = tiny_textures()
    seen = []
    w.register_forward_pre_hook(lambda m, a: seen.append(m.current_bits))
    attack = PatchAttack(w, 3, bits=4, queries=12, rl_batch=4, textures=tex, texture_labels=labels)
    attack(x, torch.tensor([0, 1, 2]))
    assert seen and set(seen) == {4}
    assert w.current_bits == 8 and w.training
    after = w.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in w.parameters())


def test_non_finite_outputs_are_never_a_success():
    class Broken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(64, 3)

        def forward(self, x):
            out = self.lin(x.flatten(1))
            return torch.where(x.flatten(1)[:, :1] >= 0, torch.nan, out)  # always NaN

    tex, labels = tiny_textures()
    attack = PatchAttack(Broken(), 3, queries=9, rl_batch=4, textures=tex, texture_labels=labels)
    attack(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))
    assert not bool(attack.success.any())
    assert attack.queries_used.tolist() == [9, 9]
    assert attack.last_loss != attack.last_loss  # NaN, not a finite number


# --- bad arguments ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(queries=1),
        dict(queries=2.5),
        dict(rl_batch=1),
        dict(n_patches=0),
        dict(lr=0.0),
        dict(lr=float("nan")),
        dict(bits=4),
        dict(targeted=True),
        dict(target=2),
        dict(seed=1, generator=torch.Generator()),
        dict(region="middle"),
        dict(texture_labels=torch.zeros(3, dtype=torch.long)),
        dict(
            textures=torch.rand(3, 1, 4, 4),
            texture_labels=torch.zeros(3, dtype=torch.long),
            targeted=True,
            target=1,
        ),
    ],
)
def test_bad_settings_raise_config_error(kwargs):
    with pytest.raises(ConfigError):
        PatchAttack(tiny_net(), 3, **kwargs)


@pytest.mark.parametrize(
    "textures, labels",
    [
        (torch.rand(3, 4, 4), None),  # 3-d
        (torch.rand(3, 1, 4, 4).mul(2), None),  # outside [0, 1]
        (torch.full((3, 1, 4, 4), float("nan")), None),
        (torch.zeros(3, 1, 4, 4, dtype=torch.long), None),
        (torch.rand(0, 1, 4, 4), None),
        (torch.rand(3, 1, 4, 4), torch.zeros(2, dtype=torch.long)),
        (torch.rand(3, 1, 4, 4), torch.zeros(3)),
        (torch.rand(3, 1, 4, 4), torch.tensor([0, -1, 2])),
    ],
)
def test_bad_textures_raise_input_error(textures, labels):
    with pytest.raises(InputError):
        PatchAttack(tiny_net(), 3, textures=textures, texture_labels=labels)


def _bad_calls():
    tex, labels = tiny_textures()
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    ok = dict(textures=tex, texture_labels=labels)
    return {
        "no textures": ({}, (x, y), {}),
        "textures smaller than the patch": (dict(textures=torch.rand(2, 1, 2, 2)), (x, y), {}),
        "channel mismatch": (ok, (torch.rand(3, 3, 8, 8), y), {}),
        "label out of range": (ok, (x, y + 2), {}),
        "float labels": (ok, (x, y.float()), {}),
        "x above 1": (ok, (x * 3, y), {}),
        "patch larger than images": (ok, (torch.rand(3, 1, 2, 2), y), {}),
        "only the label's textures": (
            dict(textures=tex, texture_labels=torch.ones(6, dtype=torch.long)),
            (x, torch.tensor([1, 1, 0])),
            {},
        ),
        "target out of range": (dict(ok, targeted=True, target=9), (x, y), {}),
        "locations with several patches": (
            dict(ok, n_patches=2),
            (x, y),
            dict(locations=torch.zeros(3, 2, dtype=torch.long)),
        ),
        "locations outside": (ok, (x, y), dict(locations=torch.full((3, 2), 7))),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_calls_raise_input_error_and_change_nothing(case):
    kwargs, args, call_kw = _bad_calls()[case]
    if case == "target out of range":
        kwargs = dict(kwargs, texture_labels=None)
    attack = PatchAttack(tiny_net(), 3, queries=12, rl_batch=4, seed=0, **kwargs)
    with pytest.raises(InputError):
        attack(*args, **call_kw)
    assert attack.patch is None and attack.locations is None and attack.mask is None
    assert attack.queries_used is None and attack.success is None
    assert attack._generators == {}  # the random stream was not started


def test_fit_textures_refuses_bad_arguments_and_keeps_the_dictionary():
    tex, labels = tiny_textures()
    attack = PatchAttack(tiny_net(), 3, textures=tex, texture_labels=labels)
    x, y = torch.rand(6, 1, 8, 8), torch.arange(6) % 3
    for call, error in [
        (lambda: attack.fit_textures(x, y, size=9), InputError),
        (lambda: attack.fit_textures(x * 2, y), InputError),
        (lambda: attack.fit_textures(x, y[:3]), InputError),
        (lambda: attack.fit_textures(x, y - 1), InputError),
        (lambda: attack.fit_textures(x, y, per_class=0), ConfigError),
        (lambda: attack.fit_textures(x, y, seed=-1), ConfigError),
    ]:
        with pytest.raises(error):
            call()
        assert torch.equal(attack.textures, tex) and torch.equal(attack.texture_labels, labels)


def test_repr_names_the_budget():
    tex, labels = tiny_textures()
    text = repr(PatchAttack(tiny_net(), 3, queries=77, textures=tex, texture_labels=labels))
    assert "queries=77" in text and "textures=(6, 1, 5, 5)" in text


def test_targeted_attack_refuses_textures_without_the_target_class_before_searching():
    g = torch.Generator().manual_seed(0)
    attack = PatchAttack(tiny_net(), 3, queries=21, rl_batch=5, seed=0, targeted=True, target=2)
    attack.fit_textures(torch.rand(30, 1, 8, 8, generator=g), torch.arange(30) % 2)
    x = torch.rand(4, 1, 8, 8, generator=g)
    with pytest.raises(InputError, match="target class 2"):
        attack(x, torch.tensor([0, 1, 0, 1]))
    assert attack.patch is None
