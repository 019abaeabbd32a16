"""BACTSchedule: stages, milestones, calibration on join, resume."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_cnn

from triqdef import BACTSchedule, TriQDefWrapper
from triqdef.errors import ConfigError


def _wrapper() -> TriQDefWrapper:
    torch.manual_seed(0)
    return TriQDefWrapper(tiny_cnn(), layers=["2"])


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(4, 3, 8, 8, generator=g), torch.randint(0, 10, (4,), generator=g)


def test_defaults_follow_the_paper_and_are_visible():
    w = _wrapper()
    s = BACTSchedule(w)
    assert s.stages == ((32, 8), (5,), (4,), (2,))
    assert s.milestones == (33, 67, 100)  # joins spread over the first half of 200 epochs
    assert s.active_bits == (32, 8) and w.active_bits == (32, 8)
    assert "milestones=(33, 67, 100)" in repr(s)


def test_stages_join_at_their_milestones_and_are_calibrated():
    w = _wrapper()
    s = BACTSchedule(w, milestones=(2, 3, 3), calib_batches=2)
    i5, i2 = w._ctx.qbits.index(5), w._ctx.qbits.index(2)
    for seed in range(3):  # only 32 and 8 bits train: the 5-bit observers never see data
        w.loss(*_batch(seed))
    assert not w.quantizers["0"].calibrated(i5)
    assert s.step() == () and w.active_bits == (32, 8)
    assert s.step() == (5,) and w.active_bits == (32, 8, 5)
    # calibrated on the two most recent loss inputs
    assert w.quantizers["0"].calibrated(i5)
    assert w.bn_stats["1"].num_batches_tracked[i5] == 2
    assert s.step() == (4, 2) and w.active_bits == (32, 8, 5, 4, 2)
    assert w.bn_stats["1"].num_batches_tracked[i2] == 2
    assert len(w._recent) == 2  # a bounded window, nothing accumulates
    w.loss(*_batch(9)).backward()
    assert set(k.split("/")[1] for k in w.loss_terms() if k.startswith("clean/")) == {
        "32",
        "8",
        "5",
        "4",
        "2",
    }


def test_calibration_loader_is_used_when_given():
    w = _wrapper()
    loader = [_batch(s) for s in range(5)]
    s = BACTSchedule(w, milestones=(1, 1, 1), calib_loader=loader, calib_batches=3)
    assert w._recent is None
    s.step()
    for b in (5, 4, 2):
        assert w.bn_stats["1"].num_batches_tracked[w._ctx.qbits.index(b)] == 3


def test_joining_without_batches_warns():
    w = _wrapper()
    s = BACTSchedule(w, milestones=(1, 2, 3))
    with pytest.warns(UserWarning, match="no calibration batches"):
        s.step()


def test_resume_continues_at_the_same_stage():
    w = _wrapper()
    s = BACTSchedule(w, milestones=(1, 2, 4), calib_loader=[_batch()])
    s.step()
    s.step()
    state = s.state_dict()
    w2 = _wrapper()
    s2 = BACTSchedule(w2, milestones=(1, 2, 4), calib_loader=[_batch()])
    s2.load_state_dict(state)
    assert s2.active_bits == s.active_bits == (32, 8, 5, 4) == w2.active_bits
    assert s2.step() == s.step() == ()
    assert s2.step() == s.step() == (2,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(stages=((32, 8), (5, 4))), "covering"),
        (dict(stages=((32, 8), (5,), (4,), (2,), (2,))), "covering"),
        (dict(milestones=(1, 2)), "3 non-negative"),
        (dict(milestones=(3, 2, 1)), "non-decreasing"),
        (dict(total=0), "positive"),
        (dict(calib_batches=0), "positive"),
    ],
)
def test_bad_configuration(kwargs, match):
    w = _wrapper()
    with pytest.raises(ConfigError, match=match):
        BACTSchedule(w, **kwargs)
    assert w.active_bits == w.bits


def test_load_state_dict_of_another_schedule_is_refused():
    w = _wrapper()
    s = BACTSchedule(w, milestones=(1, 2, 3))
    with pytest.raises(ConfigError, match="stages"):
        s.load_state_dict(BACTSchedule(_wrapper(), milestones=(5, 6, 7)).state_dict())


def test_failed_loss_calls_do_not_enter_the_calibration_window():
    w = _wrapper()
    BACTSchedule(w)
    x, y = _batch()
    w.loss(x, y)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError):
        w.loss(bad, y)
    # the window holds the good input only: the failed call appended nothing, not even
    # in place of the good one (a one-slot window would still hold one tensor)
    assert len(w._recent) == 1
    assert torch.equal(w._recent[0], x) and torch.isfinite(w._recent[0]).all()
