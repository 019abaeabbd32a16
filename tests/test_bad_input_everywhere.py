"""Every public entry point, fed wrong types, shapes, dtypes, devices, NaN/Inf and empty
batches, raises an error of the triqdef family and changes no state of the wrapper.

The "meta" device stands in for a device other than the model's. Each case is a
function of ``(wrapper, tmp_path)``; the wrapper is a calibrated 3-channel CNN with
BatchNorm whose ``state_dict`` (weights, observers, per-bit BN statistics), active
bit-width and active bit-widths are compared before and after.
"""

from __future__ import annotations

import pytest
import torch
from hostile import BITS, NC, images, labels, net, trained, with_inf, with_nan
from torch import nn

import triqdef
from triqdef import BACTSchedule, TriQDefWrapper
from triqdef import evaluate as ev
from triqdef import functional as F
from triqdef.attacks import LAVAN, AdversarialPatch, OnTheFlyPatch, PatchPool, apply_patch
from triqdef.errors import TriQDefError

# the shared hostile-input setting (tests/hostile.py), under this module's short names
_net, _x, _y, _nan, _inf, _wrapper = net, images, labels, with_nan, with_inf, trained


META_X = torch.empty(4, 3, 8, 8, device="meta")


def _wrapper() -> TriQDefWrapper:
    torch.manual_seed(0)
    w = TriQDefWrapper(_net(), bits=BITS, layers=["2"])
    w.loss(_x(), _y()).backward()  # observers, BN rows and weights' grads all hold data
    return w


def _save_path(w, tmp_path):
    path = tmp_path / "w.safetensors"
    triqdef.save(w, path)
    return path


def _attack_factory(w, bits):
    return LAVAN(w, patch_size=3, steps=1, bits=bits, seed=0)


# name -> callable(wrapper, tmp_path) that must raise a TriQDefError
CASES = {
    # --- constructor -----------------------------------------------------------------------
    "ctor model str": lambda w, p: TriQDefWrapper("resnet"),
    "ctor bits empty": lambda w, p: TriQDefWrapper(_net(), bits=()),
    "ctor bits float": lambda w, p: TriQDefWrapper(_net(), bits=(32, 8.0)),
    "ctor bits not iterable": lambda w, p: TriQDefWrapper(_net(), bits=8),
    "ctor bits out of range": lambda w, p: TriQDefWrapper(_net(), bits=(1,)),
    "ctor bits str": lambda w, p: TriQDefWrapper(_net(), bits="8"),
    "ctor layers unknown": lambda w, p: TriQDefWrapper(_net(), layers=["nope"]),
    "ctor layers int": lambda w, p: TriQDefWrapper(_net(), layers=[3]),
    "ctor layers None": lambda w, p: TriQDefWrapper(_net(), layers=None),
    "ctor layers not iterable": lambda w, p: TriQDefWrapper(_net(), layers=3),
    "ctor exclude None": lambda w, p: TriQDefWrapper(_net(), exclude=None),
    "ctor momentum str": lambda w, p: TriQDefWrapper(_net(), momentum="fast"),
    "ctor momentum None": lambda w, p: TriQDefWrapper(_net(), momentum=None),
    "ctor momentum nan": lambda w, p: TriQDefWrapper(_net(), momentum=float("nan")),
    "ctor lambda nan": lambda w, p: TriQDefWrapper(_net(), lambda_fdp=float("nan")),
    "ctor lambda inf": lambda w, p: TriQDefWrapper(_net(), lambda_gpdp=float("inf")),
    "ctor lambda tensor": lambda w, p: TriQDefWrapper(_net(), lambda_adv=torch.tensor(1.0)),
    "ctor lambda negative": lambda w, p: TriQDefWrapper(_net(), alpha=-1),
    "ctor rho nan": lambda w, p: TriQDefWrapper(_net(), rho=float("nan")),
    "ctor rho 2": lambda w, p: TriQDefWrapper(_net(), rho=2),
    "ctor pairs": lambda w, p: TriQDefWrapper(_net(), pairs="all"),
    "ctor patch_source": lambda w, p: TriQDefWrapper(_net(), patch_source=3),
    "ctor descriptor": lambda w, p: TriQDefWrapper(_net(), descriptor={"q": 0.5}),
    "ctor nothing to quantize": lambda w, p: TriQDefWrapper(nn.ReLU()),
    "ctor already wrapped": lambda w, p: TriQDefWrapper(w.model),
    # --- bit-widths ------------------------------------------------------------------------
    "set_bits unknown": lambda w, p: w.set_bits(3),
    "set_bits str": lambda w, p: w.set_bits("8"),
    "set_bits float": lambda w, p: w.set_bits(8.0),
    "set_bits bool": lambda w, p: w.set_bits(True),
    "set_bits None": lambda w, p: w.set_bits(None),
    "at_bits unknown": lambda w, p: w.at_bits(3).__enter__(),
    "set_active_bits empty": lambda w, p: w.set_active_bits([]),
    "set_active_bits unknown": lambda w, p: w.set_active_bits([32, 3]),
    "set_active_bits None": lambda w, p: w.set_active_bits(None),
    "set_active_bits int": lambda w, p: w.set_active_bits(8),
    "set_active_bits float": lambda w, p: w.set_active_bits([32, 8.0]),
    "set_active_bits str": lambda w, p: w.set_active_bits(["8"]),
    # --- loss ------------------------------------------------------------------------------
    "loss x list": lambda w, p: w.loss([[0.0]], _y()),
    "loss x int": lambda w, p: w.loss((_x() * 255).long(), _y()),
    "loss x 3d": lambda w, p: w.loss(_x()[0], _y()),
    "loss x float64": lambda w, p: w.loss(_x().double(), _y()),
    "loss x meta": lambda w, p: w.loss(META_X, _y()),
    "loss x nan": lambda w, p: w.loss(_nan(_x()), _y()),
    "loss x inf": lambda w, p: w.loss(_inf(_x()), _y()),
    "loss empty batch": lambda w, p: w.loss(_x()[:0], _y()[:0]),
    "loss y float": lambda w, p: w.loss(_x(), _y().float()),
    "loss y bool": lambda w, p: w.loss(_x(), _y() > 0),
    "loss y shape": lambda w, p: w.loss(_x(), _y()[:, None]),
    "loss y meta": lambda w, p: w.loss(_x(), _y().to("meta")),
    "loss y out of range": lambda w, p: w.loss(_x(), _y() + NC),
    "loss y negative": lambda w, p: w.loss(_x(), _y() - NC),
    "loss patch str": lambda w, p: w.loss(_x(), _y(), "patch.png"),
    "loss patch int": lambda w, p: w.loss(_x(), _y(), torch.ones(3, 2, 2, dtype=torch.long)),
    "loss patch 2d": lambda w, p: w.loss(_x(), _y(), torch.rand(2, 2)),
    "loss patch empty": lambda w, p: w.loss(_x(), _y(), torch.rand(3, 0, 2)),
    "loss patch channels": lambda w, p: w.loss(_x(), _y(), torch.rand(1, 2, 2)),
    "loss patch too large": lambda w, p: w.loss(_x(), _y(), torch.rand(3, 9, 2)),
    "loss patch meta": lambda w, p: w.loss(_x(), _y(), torch.rand(3, 2, 2, device="meta")),
    "loss patch nan": lambda w, p: w.loss(_x(), _y(), _nan(torch.rand(3, 2, 2))),
    "loss patch inf": lambda w, p: w.loss(_x(), _y(), _inf(torch.rand(2, 3, 2, 2))),
    "loss source bad shape": lambda w, p: w.loss(_x(), _y(), lambda x, y, w: x[:, :1]),
    "loss source not tensor": lambda w, p: w.loss(_x(), _y(), lambda x, y, w: None),
    "loss source nan": lambda w, p: w.loss(_x(), _y(), lambda x, y, w: x * float("nan")),
    "forward patch without y": lambda w, p: w(_x(), patch=torch.rand(3, 2, 2)),
    # --- features, calibrate -----------------------------------------------------------------
    "features x meta": lambda w, p: w.features(META_X),
    "features x str": lambda w, p: w.features("x"),
    "features x float64": lambda w, p: w.features(_x().double()),
    "calibrate no batches": lambda w, p: w.calibrate([]),
    "calibrate not iterable": lambda w, p: w.calibrate(5),
    "calibrate bits unknown": lambda w, p: w.calibrate([_x()], bits=[3]),
    "calibrate bits int": lambda w, p: w.calibrate([_x()], bits=8),
    "calibrate batch str": lambda w, p: w.calibrate(["x"]),
    "calibrate batch meta": lambda w, p: w.calibrate([META_X]),
    "calibrate batch nan": lambda w, p: w.calibrate([_x(), _nan(_x())]),
    "calibrate batch inf": lambda w, p: w.calibrate([_inf(_x())]),
    "calibrate batch empty": lambda w, p: w.calibrate([_x()[:0]]),
    "calibrate batch int": lambda w, p: w.calibrate([(_x() * 255).long()]),
    # --- export, save, load, save_quantized --------------------------------------------------
    "export unknown bits": lambda w, p: w.export(3),
    "export str bits": lambda w, p: w.export("4"),
    "save not a wrapper": lambda w, p: triqdef.save(w.model, p / "m.safetensors"),
    "save path int": lambda w, p: triqdef.save(w, 5),
    "save missing dir": lambda w, p: triqdef.save(w, p / "no" / "such" / "w.safetensors"),
    "load missing file": lambda w, p: triqdef.load(w, p / "missing.safetensors"),
    "load path int": lambda w, p: triqdef.load(w, 5),
    "load not a wrapper": lambda w, p: triqdef.load(w.model, _save_path(w, p)),
    "load a directory": lambda w, p: triqdef.load(w, p),
    "load garbage": lambda w, p: (
        p.joinpath("g").write_bytes(b"\x00" * 64),
        triqdef.load(w, p / "g"),
    ),
    "save_quantized 32": lambda w, p: triqdef.save_quantized(w, p / "q", bits=32),
    "save_quantized 3": lambda w, p: triqdef.save_quantized(w, p / "q", bits=3),
    "save_quantized str": lambda w, p: triqdef.save_quantized(w, p / "q", bits="4"),
    "save_quantized path int": lambda w, p: triqdef.save_quantized(w, 5, bits=4),
    # --- BACTSchedule --------------------------------------------------------------------------
    "bact not a wrapper": lambda w, p: BACTSchedule(w.model),
    "bact stages wrong": lambda w, p: BACTSchedule(w, stages=[(32,), (8,)]),
    "bact stages int": lambda w, p: BACTSchedule(w, stages=5),
    "bact milestones count": lambda w, p: BACTSchedule(w, milestones=(1, 2, 3)),
    "bact milestones int": lambda w, p: BACTSchedule(w, milestones=5),
    "bact milestones decreasing": lambda w, p: BACTSchedule(w, milestones=(5, 2)),
    "bact milestones float": lambda w, p: BACTSchedule(w, milestones=(1.5, 2)),
    "bact total 0": lambda w, p: BACTSchedule(w, total=0),
    "bact total float": lambda w, p: BACTSchedule(w, total=10.0),
    "bact calib_batches 0": lambda w, p: BACTSchedule(w, calib_batches=0),
    "bact step bad calib batch": lambda w, p: BACTSchedule(
        w, milestones=(1, 1), calib_loader=[META_X]
    ).step(),
    "bact step nan calib batch": lambda w, p: BACTSchedule(
        w, milestones=(1, 1), calib_loader=[_nan(_x())]
    ).step(),
    "bact load empty": lambda w, p: BACTSchedule(w).load_state_dict({}),
    "bact load str": lambda w, p: BACTSchedule(w).load_state_dict("state"),
    "bact load None": lambda w, p: BACTSchedule(w).load_state_dict(None),
    "bact load stages int": lambda w, p: BACTSchedule(w).load_state_dict({"stages": 5}),
    "bact load bad stage": lambda w, p: BACTSchedule(w).load_state_dict(
        {**BACTSchedule(w).state_dict(), "stage": 7}
    ),
    "bact load steps str": lambda w, p: BACTSchedule(w).load_state_dict(
        {**BACTSchedule(w).state_dict(), "steps": "3"}
    ),
    # --- attacks -------------------------------------------------------------------------------
    "apply_patch x list": lambda w, p: apply_patch([1.0], torch.rand(3, 2, 2)),
    "apply_patch x int": lambda w, p: apply_patch(_x().long(), torch.rand(3, 2, 2)),
    "apply_patch patch 2d": lambda w, p: apply_patch(_x(), torch.rand(2, 2)),
    "apply_patch channels": lambda w, p: apply_patch(_x(), torch.rand(1, 2, 2)),
    "apply_patch too large": lambda w, p: apply_patch(_x(), torch.rand(3, 9, 9)),
    "apply_patch meta": lambda w, p: apply_patch(_x(), torch.rand(3, 2, 2, device="meta")),
    "apply_patch count": lambda w, p: apply_patch(_x(), torch.rand(3, 3, 2, 2)),
    "apply_patch locations shape": lambda w, p: apply_patch(
        _x(), torch.rand(3, 2, 2), locations=torch.zeros(4, 3, dtype=torch.long)
    ),
    "apply_patch locations outside": lambda w, p: apply_patch(
        _x(), torch.rand(3, 2, 2), locations=torch.full((4, 2), 7)
    ),
    "apply_patch locations negative": lambda w, p: apply_patch(
        _x(), torch.rand(3, 2, 2), locations=torch.full((4, 2), -1)
    ),
    "apply_patch locations float": lambda w, p: apply_patch(
        _x(), torch.rand(3, 2, 2), locations=torch.full((4, 2), 0.5)
    ),
    "apply_patch mask meta": lambda w, p: apply_patch(
        _x(), torch.rand(3, 8, 8), mask=torch.ones(8, 8, device="meta")
    ),
    "apply_patch mask shape": lambda w, p: apply_patch(
        _x(), torch.rand(3, 8, 8), mask=torch.ones(5, 5)
    ),
    "lavan model str": lambda w, p: LAVAN("model", patch_size=3),
    "lavan patch 0": lambda w, p: LAVAN(w, patch_size=0),
    "lavan steps -1": lambda w, p: LAVAN(w, patch_size=3, steps=-1),
    "lavan bits unknown": lambda w, p: LAVAN(w, patch_size=3, bits=3),
    "lavan x nan": lambda w, p: LAVAN(w, patch_size=3, steps=1)(_nan(_x()), _y()),
    "lavan x meta": lambda w, p: LAVAN(w, patch_size=3, steps=1)(META_X, _y()),
    "lavan x empty": lambda w, p: LAVAN(w, patch_size=3, steps=1)(_x()[:0], _y()[:0]),
    "lavan y float": lambda w, p: LAVAN(w, patch_size=3, steps=1)(_x(), _y().float()),
    "lavan y out of range": lambda w, p: LAVAN(w, patch_size=3, steps=1)(_x(), _y() + NC),
    "gap optimizer": lambda w, p: AdversarialPatch(w, patch_size=3, optimizer="lbfgs"),
    "gap init_patch nan": lambda w, p: AdversarialPatch(w, init_patch=_nan(torch.rand(3, 2, 2))),
    "gap fit empty": lambda w, p: AdversarialPatch(w, patch_size=3, steps=1).fit([]),
    "gap fit meta": lambda w, p: AdversarialPatch(w, patch_size=3, steps=1).fit([(META_X, _y())]),
    "otf bits unknown": lambda w, p: OnTheFlyPatch(w, patch_size=3, bits=[3]),
    "otf x inf": lambda w, p: OnTheFlyPatch(w, patch_size=3)(_inf(_x()), _y()),
    "pool empty": lambda w, p: PatchPool([]),
    "pool str": lambda w, p: PatchPool(["patch"]),
    "pool nan": lambda w, p: PatchPool([_nan(torch.rand(3, 2, 2))]),
    "pool int": lambda w, p: PatchPool([torch.ones(3, 2, 2, dtype=torch.long)]),
    "pool channels": lambda w, p: PatchPool([torch.rand(3, 2, 2), torch.rand(1, 2, 2)]),
    "pool call channels": lambda w, p: PatchPool([torch.rand(1, 2, 2)])(_x(), _y()),
    "pool call meta": lambda w, p: PatchPool([torch.rand(3, 2, 2)])(META_X, _y()),
    # --- evaluate --------------------------------------------------------------------------------
    "clean_accuracy empty loader": lambda w, p: ev.clean_accuracy(w, []),
    "clean_accuracy bits unknown": lambda w, p: ev.clean_accuracy(w, [(_x(), _y())], bits=[3]),
    "clean_accuracy batch str": lambda w, p: ev.clean_accuracy(w, ["batch"]),
    "clean_accuracy x meta": lambda w, p: ev.clean_accuracy(w, [(META_X, _y())]),
    "clean_accuracy x nan": lambda w, p: ev.clean_accuracy(w, [(_nan(_x()), _y())]),
    "clean_accuracy y float": lambda w, p: ev.clean_accuracy(w, [(_x(), _y().float())]),
    "clean_accuracy empty batch": lambda w, p: ev.clean_accuracy(w, [(_x()[:0], _y()[:0])]),
    "clean_accuracy std zero": lambda w, p: ev.clean_accuracy(w, [(_x(), _y())], std=[0, 1, 1]),
    "clean_accuracy max_batches": lambda w, p: ev.clean_accuracy(w, [(_x(), _y())], max_batches=0),
    "transfer_matrix not callable": lambda w, p: ev.transfer_matrix(w, "lavan", [(_x(), _y())]),
    "transfer_matrix empty": lambda w, p: ev.transfer_matrix(w, _attack_factory, []),
    "transfer_matrix bits": lambda w, p: ev.transfer_matrix(
        w, _attack_factory, [(_x(), _y())], source_bits=[3]
    ),
    "transfer_matrix x nan": lambda w, p: ev.transfer_matrix(
        w, _attack_factory, [(_nan(_x()), _y())]
    ),
    "alignment_report empty": lambda w, p: ev.alignment_report(w, []),
    "alignment_report bits": lambda w, p: ev.alignment_report(w, [(_x(), _y())], bits=[32, 3]),
    "alignment_report layers": lambda w, p: ev.alignment_report(w, [(_x(), _y())], layers=["nope"]),
    "alignment_report x meta": lambda w, p: ev.alignment_report(w, [(META_X, _y())]),
    "alignment_report patch": lambda w, p: ev.alignment_report(
        w, [(_x(), _y())], patch=torch.rand(1, 2, 2)
    ),
    # --- functional ------------------------------------------------------------------------------
    "sobel str": lambda w, p: F.sobel_edges("map"),
    "sobel 3d": lambda w, p: F.sobel_edges(torch.rand(3, 8, 8)),
    "sobel empty": lambda w, p: F.sobel_edges(torch.rand(0, 1, 8, 8)),
    "sobel int": lambda w, p: F.sobel_edges(torch.ones(1, 1, 8, 8, dtype=torch.long)),
    "soft_binarize q": lambda w, p: F.soft_binarize(torch.rand(1, 1, 8, 8), q=1.5),
    "soft_binarize k nan": lambda w, p: F.soft_binarize(torch.rand(1, 1, 8, 8), k=float("nan")),
    "soft_dice shapes": lambda w, p: F.soft_dice(torch.rand(1, 1, 8, 8), torch.rand(1, 1, 4, 4)),
    "soft_dice meta": lambda w, p: F.soft_dice(
        torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8, device="meta")
    ),
    "soft_hog cell 0": lambda w, p: F.soft_hog(torch.rand(1, 1, 8, 8), cell=0),
    "soft_hog orientations": lambda w, p: F.soft_hog(torch.rand(1, 1, 8, 8), orientations=1.5),
    "edge_iou shapes": lambda w, p: F.edge_iou(torch.rand(2, 1, 8, 8), torch.rand(1, 1, 8, 8)),
    "hog str": lambda w, p: F.hog([[0.0]]),
    "hog_cosine empty": lambda w, p: F.hog_cosine(torch.rand(0, 1, 8, 8), torch.rand(0, 1, 8, 8)),
    "gradient_cosine shapes": lambda w, p: F.gradient_cosine(
        torch.rand(1, 1, 8, 8), torch.rand(1, 2, 8, 8)
    ),
    "descriptor_cosine str": lambda w, p: F.descriptor_cosine("a", "b"),
}


def _state(w):
    return {k: v.clone() for k, v in w.state_dict().items()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_a_triqdef_error_and_changes_nothing(case, tmp_path):
    w = _wrapper()
    before = _state(w)
    grads = [p.grad.clone() for p in w.parameters()]
    mode = (w.training, w.current_bits, w.active_bits)
    try:
        CASES[case](w, tmp_path)
    except TriQDefError:
        pass
    except Exception as exc:  # noqa: BLE001 - the point is to name the wrong family
        pytest.fail(f"{case}: raised {type(exc).__module__}.{type(exc).__name__}: {exc}")
    else:
        pytest.fail(f"{case}: raised nothing")
    after = _state(w)
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]) or (
            after[k].is_floating_point()
            and torch.allclose(after[k], before[k], equal_nan=True)
            and torch.isnan(before[k]).any()
        ), k
    for g, p in zip(grads, w.parameters()):
        assert torch.equal(p.grad, g)
    if not case.startswith("bact"):  # building a BACTSchedule sets the active bits itself
        assert (w.training, w.current_bits, w.active_bits) == mode
    assert all(type(p) is nn.Parameter for p in w.model.parameters())
    assert w._taps._store == {}


# --- non-finite logits are never a success for the model ------------------------------------
class _Const(nn.Module):
    """Logits fixed by hand: class 0 wins, or NaN/Inf where asked."""

    def __init__(self, bad: float | None = None) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.bad = bad

    def forward(self, x):
        out = torch.zeros(x.shape[0], 3) * self.scale
        out[:, 0] = 1.0
        if self.bad is not None:
            out[:, 0] = self.bad  # argmax of a NaN row is the NaN's index: "class 0"
        return out


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_never_count_for_the_model(bad):
    x, y = torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    assert ev.clean_accuracy(_Const(), [(x, y)]) == {32: 1.0}
    if bad != float("-inf"):  # -inf loses the argmax: class 0 is not predicted anyway
        assert ev.clean_accuracy(_Const(bad), [(x, y)]) == {32: 0.0}
    clean = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([[bad, 0.0, 0.0], [1.0, 0.0, 0.0]])
    y2 = torch.tensor([0, 0])
    # the first sample's patched logits are broken: an attack success, also targeted
    assert ev.asr_counts(clean, adv, y2) == (1, 2)
    assert ev.asr_counts(clean, adv, y2, target=1) == (1, 2)
    # broken clean logits: never correct, so never eligible
    assert ev.asr_counts(adv, clean, y2) == (0, 1)
    assert ev.attack_success_rate(_Const(), x, x, y) == (0, 4)
    assert ev.attack_success_rate(_Const(), x, x, y, target=1) == (0, 4)
