"""Tests of triqdef.evaluate: clean accuracy, ASR, transfer matrices, alignment reports."""

from __future__ import annotations

import contextlib
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cnn
from torch import nn

from triqdef import TriQDefWrapper
from triqdef.attacks import apply_patch, random_locations
from triqdef.errors import ConfigError, InputError, LayerNotFoundError
from triqdef.evaluate import (
    METRICS,
    AlignmentReport,
    TransferMatrix,
    alignment_report,
    asr_by_condition,
    asr_counts,
    attack_success_rate,
    clean_accuracy,
    transfer_matrix,
)
from triqdef.functional import descriptor_cosine, gradient_cosine
from triqdef.losses import describe

BITS = (32, 8, 4)
CLASSES = 4


# ------------------------------------------------------------------------------ fixtures


class ToyAttack:
    """A tiny patch attack with the protocol of triqdef.attacks (sign-gradient steps).

    Seeded: the same seed on the same batches gives the same patches and locations.
    """

    name = "Toy"

    def __init__(
        self,
        model,
        patch_size=5,
        bits=None,
        targeted=False,
        target=None,
        mean=None,
        std=None,
        seed=0,
        steps=3,
        step_size=0.5,
    ):
        self.model, self.patch_size, self.bits = model, patch_size, bits
        self.targeted, self.target = targeted, target
        self.mean, self.std = mean, std
        self.steps, self.step_size = steps, step_size
        self.generator = torch.Generator().manual_seed(seed)
        self.patch = None
        self.locations = None
        self.seen = []  # (active bits, grad enabled, training) at each call

    def _forward(self, x):
        if self.mean is not None:
            m = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
            s = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
            x = (x - m) / s
        return self.model(x)

    def __call__(self, x, y):
        b, c, h, w = x.shape
        p = self.patch_size
        self.locations = random_locations(b, (h, w), (p, p), self.generator).to(x.device)
        patch = torch.rand(c, p, p, generator=self.generator).to(x.device)
        wrapped = isinstance(self.model, TriQDefWrapper)
        ctx = self.model.at_bits(self.bits) if wrapped else contextlib.nullcontext()
        with ctx:
            active = self.model.current_bits if wrapped else 32
            self.seen.append((active, torch.is_grad_enabled(), self.model.training))
            for _ in range(self.steps):
                patch.requires_grad_(True)
                logits = self._forward(apply_patch(x, patch, self.locations))
                if self.targeted:
                    loss = -F.cross_entropy(logits, torch.full_like(y, self.target))
                else:
                    loss = F.cross_entropy(logits, y)
                (g,) = torch.autograd.grad(loss, patch)
                patch = (patch.detach() + self.step_size * g.sign()).clamp(0, 1)
        self.patch = patch.detach()
        return apply_patch(x, self.patch, self.locations).detach()


def _quadrants(n: int, g: torch.Generator, contrast: float = 0.25):
    """Noise images with a brighter 4x4 square in one quadrant; the label is the quadrant."""
    x = torch.rand(n, 3, 12, 12, generator=g) * (1 - contrast)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    idx = torch.arange(12)
    rows = (idx.view(1, -1) >= (y // 2).view(-1, 1) * 6 + 1) & (
        idx.view(1, -1) < (y // 2).view(-1, 1) * 6 + 5
    )
    cols = (idx.view(1, -1) >= (y % 2).view(-1, 1) * 6 + 1) & (
        idx.view(1, -1) < (y % 2).view(-1, 1) * 6 + 5
    )
    square = (rows.unsqueeze(2) & cols.unsqueeze(1)).unsqueeze(1).float()
    return x + contrast * square, y


def _wrapper(seed: int = 0, bits=BITS) -> TriQDefWrapper:
    """tiny_cnn trained for 30 steps on the quadrant task (clean accuracy ~1 at every bit)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    net = tiny_cnn(num_classes=CLASSES)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(30):
        x, y = _quadrants(32, g)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    w = TriQDefWrapper(net, bits=bits, layers=["2", "5"])
    w.calibrate([_quadrants(64, g)[0]])
    return w.eval()


def _data(n_batches: int = 2, batch: int = 8, seed: int = 1):
    """Quadrant batches; the first sample of each batch gets a wrong label."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x, y = _quadrants(batch, g)
        y[0] = (y[0] + 1) % CLASSES
        out.append((x, y))
    return out


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_state(before: dict, module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


@pytest.fixture(scope="module")
def setup():
    w = _wrapper()
    return w, _data()


@pytest.fixture(scope="module")
def two_bit():
    """The same training, wrapped at (32, 2): two bit-widths far apart."""
    return _wrapper(bits=(32, 2)), _data()


# ------------------------------------------------------------------------ clean accuracy


class ChannelMeans(nn.Module):
    """Logits = per-channel means of the (normalised) image: predictions known by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x.mean(dim=(2, 3)) * self.scale


def test_clean_accuracy_plain_module_hand_computed():
    x = torch.full((6, 3, 2, 2), 0.1)
    x[:, 1] = 0.2
    brightest = torch.tensor([0, 1, 2, 0, 1, 2])
    x[torch.arange(6), brightest] = 0.9  # predictions: [0, 1, 2, 0, 1, 2]
    y = torch.tensor([0, 1, 1, 0, 1, 1])  # samples 2 and 5 are wrong: 4 / 6
    loader = [(x[:4], y[:4]), (x[4:], y[4:])]
    assert clean_accuracy(ChannelMeans(), loader) == {32: pytest.approx(4 / 6)}
    # normalisation comes before the model: channel 2 divided by 10 (0.09 < 0.2), so the
    # samples whose brightest channel is 2 are predicted 1: 6 / 6
    acc = clean_accuracy(ChannelMeans(), loader, mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 10.0])
    assert acc == {32: pytest.approx(1.0)}
    acc = clean_accuracy(ChannelMeans(), iter(loader), mean=0.05, std=[1.0, 1.0, 10.0])
    assert acc == {32: pytest.approx(1.0)}  # a one-shot iterator works too


def test_clean_accuracy_wrapper_equals_manual_loop(setup):
    w, data = setup
    w.train().set_bits(8)
    before = _state(w)
    acc = clean_accuracy(w, data, mean=[0.5] * 3, std=[0.25] * 3)
    assert list(acc) == list(BITS)
    assert w.training and w.current_bits == 8  # mode and bit-width restored
    _assert_same_state(before, w)
    w.eval()
    for b in BITS:
        correct = 0
        with torch.no_grad(), w.at_bits(b):
            for x, y in data:
                correct += int((w((x - 0.5) / 0.25).argmax(1) == y).sum())
        assert acc[b] == pytest.approx(correct / 16)
    assert clean_accuracy(w, data, bits=[4], mean=[0.5] * 3, std=[0.25] * 3) == {4: acc[4]}
    w.set_bits(32)


def test_clean_accuracy_errors(setup):
    w, data = setup
    with pytest.raises(InputError, match="loader yielded no batches"):
        clean_accuracy(w, [])
    with pytest.raises(InputError, match="loader yielded no batches"):
        clean_accuracy(w, iter(()))
    with pytest.raises(ConfigError, match="not one of this wrapper's bits"):
        clean_accuracy(w, data, bits=[5])
    with pytest.raises(ConfigError, match="32 bits only"):
        clean_accuracy(ChannelMeans(), data, bits=[8])
    with pytest.raises(InputError, match="channels"):
        clean_accuracy(w, data, mean=[0.5, 0.5])
    with pytest.raises(InputError, match=r"\(x, y\) pair"):
        clean_accuracy(w, [data[0][0]])


def test_progress_bars_run(setup, capsys):
    w, data = setup
    capsys.readouterr()
    assert set(clean_accuracy(w, data)) == set(BITS)
    assert capsys.readouterr().err == ""  # no bar unless asked for
    assert set(clean_accuracy(w, data, progress=True)) == set(BITS)
    err = capsys.readouterr().err
    assert "clean_accuracy" in err and "/2" in err, err  # tqdm's bar: desc and "i/2"
    alignment_report(w, data, max_batches=None, progress=True)
    err = capsys.readouterr().err
    assert "alignment_report" in err and "/2" in err, err


# --------------------------------------------------------------------------------- ASR


def test_asr_counts_untargeted_eligibility():
    clean = torch.tensor([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [0, 5.0, 0]])
    adv = torch.tensor([[0, 5.0, 0], [5.0, 0, 0], [0, 0, 5.0], [0, 0, 5.0]])
    y = torch.tensor([0, 0, 1, 0])
    # eligible: 0, 1, 2 (sample 3 is wrong when clean); successes: 0 and 2
    assert asr_counts(clean, adv, y) == (2, 3)
    # a wrong clean sample that stays wrong is not a success
    assert asr_counts(clean, clean, y) == (0, 3)


def test_asr_counts_targeted_eligibility():
    clean = torch.zeros(4, 3)
    adv = torch.tensor([[0, 0, 5.0], [0, 0, 5.0], [5.0, 0, 0], [0, 0, 5.0]])
    y = torch.tensor([0, 2, 1, 1])
    # target 2: eligible = labels != 2 -> samples 0, 2, 3; predicted 2: samples 0, 3
    assert asr_counts(clean, adv, y, target=2) == (2, 3)
    assert asr_counts(None, adv, y, target=torch.tensor(2)) == (2, 3)
    # per-sample targets
    assert asr_counts(None, adv, y, target=torch.tensor([2, 2, 0, 0])) == (2, 3)


def test_asr_counts_errors():
    logits = torch.zeros(2, 3)
    with pytest.raises(InputError, match="3 classes"):
        asr_counts(logits, logits, torch.tensor([0, 1]), target=3)
    with pytest.raises(InputError, match="3 classes"):
        asr_counts(logits, logits, torch.tensor([0, 1]), target=torch.tensor([0, -1]))
    with pytest.raises(InputError, match="labels"):
        asr_counts(logits, logits, torch.tensor([0, 7]))
    with pytest.raises(InputError, match="logits_clean"):
        asr_counts(None, logits, torch.tensor([0, 1]))
    with pytest.raises(InputError, match="shape"):
        asr_counts(logits, torch.zeros(3, 3), torch.tensor([0, 1]))


class PixelLogits(nn.Module):
    """Returns the first row of pixels as logits: images encode hand-made logits."""

    def forward(self, x):
        return x[:, 0, 0, :]


def test_attack_success_rate_on_images():
    def images(logits):
        return logits.view(logits.shape[0], 1, 1, -1).expand(-1, 1, 2, -1).clone()

    clean = torch.tensor([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.1, 0.9, 0.0]])
    adv = torch.tensor([[0.1, 0.9, 0.0], [0.9, 0.1, 0.0], [0.0, 0.1, 0.9]])
    y = torch.tensor([0, 0, 0])
    model = PixelLogits()
    assert attack_success_rate(model, images(clean), images(adv), y) == (1, 2)
    assert attack_success_rate(model, images(clean), images(adv), y, target=1) == (1, 3)
    with pytest.raises(InputError, match="3 classes"):
        attack_success_rate(model, images(clean), images(adv), y, target=5)


# --------------------------------------------------------------------- transfer matrix


def _factory(calls=None, **kw):
    def make(model, bits):
        if calls is not None:
            calls.append(bits)
        return ToyAttack(model, bits=bits, seed=100 + bits, **kw)

    return make


@pytest.mark.parametrize("targeted", [False, True])
def test_transfer_matrix_matches_direct_attacks(setup, targeted):
    w, data = setup
    kw = {"targeted": True, "target": 1} if targeted else {}
    calls = []
    w.train().set_bits(4)
    before = _state(w)
    m = transfer_matrix(w, _factory(calls, **kw), data, seed=0)
    assert w.training and w.current_bits == 4
    _assert_same_state(before, w)
    w.eval().set_bits(32)

    assert calls == list(BITS)  # one attack per source bit-width
    assert m.source_bits == list(BITS) and m.target_bits == list(BITS)
    assert len(m.asr) == 3 and all(len(row) == 3 for row in m.asr)
    assert m.attack == "Toy" and m.targeted is targeted and m.samples == 16
    assert m.target == (1 if targeted else None)
    for row in m.asr:
        for v in row:
            assert 0.0 <= v <= 1.0
    assert all(0.0 <= v <= 1.0 for v in m.noise_floor) and len(m.noise_floor) == 3

    # every cell, the diagonal included, equals the direct attack evaluated at the target
    target = 1 if targeted else None
    for i, s in enumerate(BITS):
        attack = _factory(**kw)(w, s)
        per_target = {t: [0, 0] for t in BITS}
        for x, y in data:
            x_adv = attack(x, y)
            for t in BITS:
                succ, elig = attack_success_rate(w, x, x_adv, y, target, bits=t)
                per_target[t][0] += succ
                per_target[t][1] += elig
        for j, t in enumerate(BITS):
            assert m.counts[i][j] == tuple(per_target[t])
            assert m.asr[i][j] == pytest.approx(per_target[t][0] / per_target[t][1])
        # the attack ran at its own bit-width, with gradients on, in eval mode
        assert all(seen == (s, True, False) for seen in attack.seen)
    assert m.diagonal() == [m.asr[i][i] for i in range(3)]
    assert any(v > 0 for row in m.asr for v in row)  # the toy attack does something
    if targeted:  # eligible = label != target, whatever the model predicts
        n_eligible = sum(int((y != 1).sum()) for _, y in data)
        assert all(e == n_eligible for row in m.counts for _, e in row)
    else:  # eligible = correct when clean: the two mislabelled samples never are
        assert all(e <= 14 for row in m.counts for _, e in row)


def test_transfer_matrix_with_lavan_as_documented(setup):
    """docs/evaluation.md's factory, ``lambda w, b: LAVAN(w, 8, bits=b, steps=40)``, made
    small and seeded: every cell is the direct LAVAN attack scored at the target."""
    from triqdef.attacks import LAVAN

    w, data = setup
    data = data[:1]

    def make(model, b):
        return LAVAN(model, 6, bits=b, steps=8, step_size=0.1, seed=b)

    before = _state(w)
    m = transfer_matrix(w, make, data, seed=0)
    _assert_same_state(before, w)
    assert m.attack.lower() == "lavan" and m.samples == 8 and not m.targeted
    assert m.source_bits == list(BITS) and m.target_bits == list(BITS)
    for i, s in enumerate(BITS):
        attack = make(w, s)
        for x, y in data:
            x_adv = attack(x, y)
            assert attack.patch.shape == (8, 3, 6, 6) and attack.locations.shape == (8, 2)
            for j, t in enumerate(BITS):
                got = attack_success_rate(w, x, x_adv, y, bits=t)
                assert m.counts[i][j] == tuple(got), (s, t)
                assert m.asr[i][j] == pytest.approx(got[0] / got[1])
    for row in m.asr:
        assert all(isinstance(v, float) and 0.0 <= v <= 1.0 for v in row)
    assert all(0.0 <= v <= 1.0 for v in m.noise_floor)
    # the real attack does better than a noise patch of its size at its locations
    assert min(m.diagonal()) > max(m.noise_floor)


def test_transfer_matrix_noise_floor_definition(setup):
    """The noise floor is the ASR of uniform noise at the attacks' sizes and locations."""
    w, data = setup

    class Recording(ToyAttack):
        log = []

        def __call__(self, x, y):
            out = super().__call__(x, y)
            Recording.log.append((self.bits, self.patch.shape, self.locations.clone()))
            return out

    m = transfer_matrix(w, lambda mod, b: Recording(mod, bits=b, steps=1), data, seed=3)
    gen = torch.Generator().manual_seed(3)
    expected = {t: [0, 0] for t in BITS}
    log = iter(Recording.log)
    for x, y in data:
        for _ in BITS:
            _, shape, locations = next(log)
            x_noise = apply_patch(x, torch.rand(shape, generator=gen), locations)
            for t in BITS:
                s, e = attack_success_rate(w, x, x_noise, y, bits=t)
                expected[t][0] += s
                expected[t][1] += e
    assert m.noise_counts == [tuple(expected[t]) for t in BITS]
    assert m.noise_floor == [pytest.approx(s / e) for s, e in m.noise_counts]


def test_transfer_matrix_subsets_and_plain_module(setup):
    w, data = setup
    m = transfer_matrix(w, _factory(), data, source_bits=[32], target_bits=[8, 4], max_batches=1)
    assert len(m.asr) == 1 and len(m.asr[0]) == 2 and m.samples == 8
    assert m.diagonal() == []
    assert math.isnan(m.per_target("diagonal")[0])
    plain = tiny_cnn(num_classes=CLASSES).eval()
    m = transfer_matrix(plain, _factory(), data[:1])
    assert m.source_bits == [32] and m.target_bits == [32]


def test_transfer_matrix_per_bit_models(setup):
    """A mapping {bits: model}: source s crafts on model s, target t is scored on model t."""
    w, data = setup
    other = _wrapper(seed=1)
    with torch.no_grad():  # a model that differs: it always predicts class 0
        head = other.model[-1]
        head.weight.zero_()
        head.bias.copy_(torch.arange(CLASSES, 0, -1, dtype=head.bias.dtype))
    models = {32: w, 4: other}
    before = (_state(w), _state(other))
    m = transfer_matrix(models, _factory(), data, seed=0)
    _assert_same_state(before[0], w)
    _assert_same_state(before[1], other)
    assert m.source_bits == [32, 4] and m.target_bits == [32, 4]
    for i, s in enumerate((32, 4)):
        attack = _factory()(models[s], s)
        per_target = {t: [0, 0] for t in (32, 4)}
        for x, y in data:
            x_adv = attack(x, y)
            for t in (32, 4):
                succ, elig = attack_success_rate(models[t], x, x_adv, y, bits=t)
                per_target[t][0] += succ
                per_target[t][1] += elig
        for j, t in enumerate((32, 4)):
            assert m.counts[i][j] == tuple(per_target[t])
        assert all(seen[0] == s for seen in attack.seen)
    # target 4 is scored on the other model: only its class-0 samples are eligible
    n_zero = sum(int((y == 0).sum()) for _, y in data)
    assert [row[1][1] for row in m.counts] == [n_zero, n_zero] != [row[0][1] for row in m.counts]
    with pytest.raises(ConfigError, match="has no model"):
        transfer_matrix(models, _factory(), data, source_bits=[8])
    with pytest.raises(ConfigError, match="32 bits only"):  # a plain model has no 2-bit view
        transfer_matrix({2: tiny_cnn(num_classes=CLASSES)}, _factory(), data)
    with pytest.raises(InputError, match="empty"):
        transfer_matrix({}, _factory(), data)


def test_transfer_matrix_serialisation_and_tables(setup, tmp_path):
    w, data = setup
    m = transfer_matrix(w, _factory(steps=1), data[:1], seed=0)
    d = m.to_dict()
    text = json.dumps(d, allow_nan=False)
    back = TransferMatrix.from_dict(json.loads(text))
    assert back.to_dict() == d

    md = m.to_markdown()
    lines = md.splitlines()
    assert len(lines) == len(m.source_bits) + 3  # header, separator, sources, noise floor
    assert lines[0].count("|") == len(m.target_bits) + 2
    assert "32-bit" in lines[0] and lines[-1].startswith("| noise floor")
    assert f"{100 * m.asr[1][2]:.1f}" in lines[3]

    # nan cells (nothing eligible) serialise as None and print as n/a
    empty = TransferMatrix([32], [32], [[float("nan")]], [[(0, 0)]], [float("nan")], [(0, 0)])
    assert json.dumps(empty.to_dict(), allow_nan=False)
    assert "n/a" in empty.to_markdown()

    assert m.per_target("pooled")[0] == pytest.approx(
        sum(r[0][0] for r in m.counts) / sum(r[0][1] for r in m.counts)
    )
    assert m.per_target("max")[0] == max(r[0] for r in m.asr)
    with pytest.raises(InputError, match="reduce"):
        m.per_target("median")

    table = asr_by_condition({"6x6": m, "8x8 (unseen)": m}, seen=lambda name: "unseen" not in name)
    rows = table.splitlines()
    assert len(rows) == 2 + 2 + 3
    assert "| 8x8 (unseen) | unseen |" in table and rows[-1].endswith("| 0.0 | 0.0 | 0.0 |")
    assert len(asr_by_condition({"a": m}, reduce="diagonal").splitlines()) == 3

    path = m.heatmap(tmp_path / "transfer.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_heatmap_without_matplotlib(monkeypatch, tmp_path):
    m = TransferMatrix([32], [32], [[0.5]], [[(1, 2)]], [0.0], [(0, 2)])
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        m.heatmap(tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_transfer_matrix_errors_restore_state(setup):
    w, data = setup
    with pytest.raises(InputError, match="loader yielded no batches"):
        transfer_matrix(w, _factory(), [])
    with pytest.raises(InputError, match=f"{CLASSES} classes"):
        transfer_matrix(w, _factory(targeted=True, target=CLASSES), data)
    with pytest.raises(ConfigError):
        transfer_matrix(w, _factory(), data, source_bits=[3])

    class Broken(ToyAttack):
        def __call__(self, x, y):
            self.model.train()  # misbehaves, then fails
            raise RuntimeError("boom")

    w.train().set_bits(8)
    before = _state(w)
    with pytest.raises(RuntimeError, match="boom"):
        transfer_matrix(w, lambda mod, b: Broken(mod, bits=b), data)
    assert w.training and w.current_bits == 8
    assert all(m.training for m in w.modules())
    _assert_same_state(before, w)
    w.eval().set_bits(32)

    class WrongShape(ToyAttack):
        def __call__(self, x, y):
            return x[:, :, :4]

    with pytest.raises(InputError, match="expected patched images"):
        transfer_matrix(w, lambda mod, b: WrongShape(mod, bits=b), data)


# --------------------------------------------------------------------------- alignment


def test_alignment_report_structure_and_ranges(setup, tmp_path):
    w, data = setup
    w.train().set_bits(8)
    before = _state(w)
    r = alignment_report(w, data, max_batches=2)
    assert w.training and w.current_bits == 8
    _assert_same_state(before, w)
    assert all(p.grad is None for p in w.parameters())
    w.eval().set_bits(32)

    assert r.pairs == [(32, 8), (32, 4), (8, 4)]
    assert r.maps == ["input_grad", "2", "5"]
    assert r.metrics == list(METRICS) and r.samples == 16 and not r.patched
    for m in r.maps:
        assert set(r.values[m]) == set(METRICS)
        for k in METRICS:
            vals = r.values[m][k]
            assert len(vals) == 3
            low = -1.0 if k == "cosine" else 0.0
            assert all(low - 1e-6 <= v <= 1 + 1e-6 for v in vals), (m, k, vals)

    md = r.to_markdown().splitlines()
    assert len(md) == 2 + len(r.maps) * len(METRICS)
    assert "32<->8" in md[0] and "8<->4" in md[0]
    d = r.to_dict()
    back = AlignmentReport.from_dict(json.loads(json.dumps(d, allow_nan=False)))
    assert back.to_dict() == d
    path = r.heatmap(tmp_path / "align.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_alignment_report_symmetric_and_self_similarity(setup):
    w, data = setup
    r = alignment_report(w, data, pairs=[(8, 4), (4, 8), (4, 4)], layers=["2"])
    assert r.maps == ["input_grad", "2"]
    for m in r.maps:
        for k in METRICS:
            v = r.values[m][k]
            assert v[0] == pytest.approx(v[1], abs=1e-6), (m, k)
            assert r.value(m, k, (4, 8)) == v[0]
            if k == "soft_dice":  # sum(s^2) / sum(s) of soft edges: close to, below, 1
                assert 0.8 < v[2] <= 1.0 + 1e-6, (m, k, v[2])
            else:
                assert v[2] == pytest.approx(1.0, abs=1e-5), (m, k, v[2])


def test_alignment_report_nearly_identical_bit_widths():
    """At 31 bits fake quantization is (almost) the identity: every metric is close to 1."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 10 * 10, CLASSES),
    )  # fmt: skip
    w = TriQDefWrapper(net, bits=(32, 31), layers=["1", "3"])
    x = torch.rand(8, 3, 10, 10)
    w.calibrate([x])
    y = torch.arange(8) % CLASSES
    r = alignment_report(w, [(x, y)])
    for m in r.maps:
        assert r.value(m, "cosine", (32, 31)) > 0.999
        assert r.value(m, "hog_cosine", (32, 31)) > 0.99
        assert r.value(m, "soft_hog", (32, 31)) > 0.99
        assert r.value(m, "edge_iou", (32, 31)) > 0.9
        assert r.value(m, "soft_dice", (32, 31)) > 0.8


def test_alignment_report_tells_bit_widths_apart(two_bit):
    """(32, 2) values equal metrics of maps taken by hand inside ``at_bits``, and on a
    trained model 2 bits is visibly unlike 32 bits (a report that ran every pair at one
    bit-width would give 1)."""
    w, data = two_bit
    r = alignment_report(w, data, pairs=[(32, 2), (2, 2)], layers=["2"], max_batches=None)
    cfg = w.descriptor
    n = 0
    hand = {m: {k: 0.0 for k in ("cosine", "soft_hog")} for m in ("input_grad", "2")}
    for x, y in data:
        maps = {}
        for b in (32, 2):
            with w.at_bits(b):
                xi = x.clone().requires_grad_()
                loss = F.cross_entropy(w(xi), y, reduction="sum")
                (grad,) = torch.autograd.grad(loss, xi)
                feat = w.features(x)["2"]
            maps[b] = {"input_grad": grad, "2": feat.detach()}
        for m in hand:
            a, b = maps[32][m], maps[2][m]
            hand[m]["cosine"] += float(gradient_cosine(a, b).sum())
            da, db = describe(a, cfg), describe(b, cfg)
            hand[m]["soft_hog"] += float(descriptor_cosine(da.hog, db.hog).sum())
        n += y.shape[0]
    assert r.samples == n == 16
    for m in hand:
        for k, total in hand[m].items():
            assert r.value(m, k, (32, 2)) == pytest.approx(total / n, rel=1e-4, abs=1e-5), (m, k)
            assert r.value(m, k, (2, 2)) == pytest.approx(1.0, abs=1e-5), (m, k)
    assert r.value("input_grad", "cosine", (32, 2)) < 0.99
    assert r.value("2", "cosine", (32, 2)) < 0.99


def test_alignment_report_small_maps_and_patches(setup):
    w, data = setup
    # layer "6" (AdaptiveAvgPool2d(2)) gives 2x2 maps, "7" (Flatten) gives (B, 32) vectors:
    # both smaller than one HOG block of 8x8 pixels
    r = alignment_report(w, data, layers=["6", "7"], patch=torch.rand(3, 4, 4), seed=0)
    assert r.patched and r.maps == ["input_grad", "6", "7"]
    for k in ("hog_cosine", "soft_hog"):
        assert all(0.0 <= v <= 1.0 + 1e-6 for v in r.values["6"][k])  # shrunk cells
        assert all(math.isnan(v) for v in r.values["7"][k])  # 1 x 32 maps: undefined
    for k in ("cosine", "edge_iou", "soft_dice"):
        assert all(not math.isnan(v) for v in r.values["7"][k])
    d = r.to_dict()
    assert d["values"]["7"]["hog_cosine"] == [None, None, None]
    assert json.dumps(d, allow_nan=False) and "n/a" in r.to_markdown()
    attack = ToyAttack(w, bits=4, steps=1)
    r2 = alignment_report(w, data, patch=attack, pairs=[(32, 4)])
    assert r2.patched and attack.seen and attack.seen[0][1] is True
    r3 = alignment_report(w, data, patch=torch.rand(5, 3, 4, 4), seed=0)
    assert r3.samples == 8


def test_alignment_report_errors(setup):
    w, data = setup
    with pytest.raises(InputError, match="loader yielded no batches"):
        alignment_report(w, [])
    with pytest.raises(LayerNotFoundError, match="not_a_layer"):
        alignment_report(w, data, layers=["not_a_layer"])
    with pytest.raises(InputError, match="not both"):
        alignment_report(w, data, bits=[32, 8], pairs=[(32, 8)])
    with pytest.raises(InputError, match="nothing to compare"):
        alignment_report(w, data, bits=[8])
    with pytest.raises(ConfigError):
        alignment_report(w, data, pairs=[(32, 3)])
    with pytest.raises(InputError, match="patch"):
        alignment_report(w, data, patch="noise")


def test_max_batches_reads_no_extra_batch_and_errors_restore(setup):
    w, data = setup
    pulled = []

    def stream():
        for i, batch in enumerate(data):
            pulled.append(i)
            yield batch

    acc = clean_accuracy(w, stream(), max_batches=1)
    assert pulled == [0] and set(acc) == set(BITS)
    with pytest.raises(InputError, match="max_batches"):
        clean_accuracy(w, data, max_batches=0)

    def failing():
        yield data[0]
        raise RuntimeError("disk on fire")

    w.train().set_bits(4)
    with pytest.raises(RuntimeError, match="disk on fire"):
        alignment_report(w, failing(), max_batches=None)
    assert w.training and w.current_bits == 4
    w.eval().set_bits(32)


def test_alignment_report_removes_its_hooks(setup):
    w, data = setup
    counts = {n: len(m._forward_hooks) for n, m in w.model.named_modules()}
    alignment_report(w, data, layers=["1", "4"])
    assert {n: len(m._forward_hooks) for n, m in w.model.named_modules()} == counts


def test_alignment_report_pairs_validation():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)).eval()
    data = [(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 0]))]
    with pytest.raises(InputError, match="nothing to compare"):
        alignment_report(plain, data)
    r = alignment_report(plain, data, pairs=[(32, 32)], layers=["0"])
    assert r.value("0", "cosine", (32, 32)) == pytest.approx(1.0)
    with pytest.raises(InputError, match="pairs"):
        alignment_report(plain, data, pairs=[(32, 32, 32)])
    with pytest.raises(ConfigError, match="32 bits only"):
        alignment_report(plain, data, pairs=[(32, 8)])


def test_end_to_end_on_device(setup, device):
    """Everything runs where the model lives; CPU batches are moved there."""
    import copy

    w = copy.deepcopy(setup[0]).to(device)
    data = setup[1]  # stays on the CPU
    before = _state(w)
    acc = clean_accuracy(w, data)
    m = transfer_matrix(w, _factory(), data, seed=0, mean=[0.0] * 3, std=[1.0] * 3)
    r = alignment_report(w, data, patch=torch.rand(3, 4, 4, device=device), seed=0)
    _assert_same_state(before, w)
    assert set(acc) == set(BITS) and all(0 <= v <= 1 for v in acc.values())
    for i, s in enumerate(BITS):
        attack = _factory()(w, s)
        succ = elig = 0
        for x, y in data:
            x, y = x.to(device), y.to(device)
            got = attack_success_rate(w, x, attack(x, y), y, bits=s)
            succ, elig = succ + got[0], elig + got[1]
        assert m.counts[i][i] == (succ, elig)
    for metric in METRICS:
        assert all(not math.isnan(v) for v in r.values["input_grad"][metric])
