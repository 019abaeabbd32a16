"""`lambda_dverge`: the DVERGE-style cross-bit distilled-feature term (off by default)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import _batch, _wrapper, fixed_patch, small_net

from triqdef import TriQDefWrapper, _terms
from triqdef.errors import ConfigError


def _state(w):
    return {k: v.detach().clone() for k, v in w.state_dict().items()}


def test_off_by_default_and_no_term():
    w = _wrapper()
    assert w.lambda_dverge == 0.0
    x, y = _batch()
    w.train()
    w.loss(x, y, patch=fixed_patch)
    assert "dverge" not in w.loss_terms()


def test_distilled_images_stay_in_the_ball_and_move_the_features_towards_the_source():
    w = _wrapper(lambda_dverge=1.0)
    w.calibrate([_batch(b=8)[0]])
    w.eval()
    x, _ = _batch(b=8, seed=3)
    x_s = x.roll(-1, 0)
    with w.frozen_observers(), _terms._bn_eval(w):
        z = _terms._distill(w, 8, "2", x, x_s)
        with w.at_bits(8):
            f = {}
            for name, inp in (("x", x), ("x_s", x_s), ("z", z)):
                f[name] = w.features(inp)["2"]
    assert (z - x_s).abs().max() <= _terms.DVERGE_EPS + 1e-12
    assert z.min() >= 0 and z.max() <= 1
    before = (f["x_s"] - f["x"]).pow(2).sum()
    after = (f["z"] - f["x"]).pow(2).sum()
    assert after < 0.9 * before


def test_the_term_trains_the_model_and_only_reads_its_statistics():
    """Observers and BatchNorm statistics after a loss with DVERGE equal those after the
    same loss without it: the distilled images never enter the running estimates."""
    x, y = _batch(b=8)
    states, grads = [], []
    for lam in (0.0, 1.0):
        w = _wrapper(lambda_dverge=lam, penalty_bits=2)
        w.train()
        torch.manual_seed(5)
        loss = w.loss(x, y, patch=fixed_patch)
        loss.backward()
        states.append(_state(w))
        grads.append(torch.cat([p.grad.flatten() for p in w.parameters()]))
        assert all(m.training for m in w.modules())
        if lam:
            term = w.loss_terms()["dverge"]
            assert torch.isfinite(torch.tensor(term)) and term > 0
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k
    assert not torch.allclose(grads[0], grads[1])  # the term reaches the parameters


def test_the_term_is_the_cross_entropy_of_the_other_bit_width_on_the_distilled_images():
    w = _wrapper(lambda_dverge=1.0, bits=(32, 4))
    x, y = _batch(b=6, seed=2)
    w.calibrate([x])
    w.train()
    torch.manual_seed(0)
    value = _terms.dverge_term(w, (32, 4), x, y)
    torch.manual_seed(0)
    layer = w.layers[int(torch.randint(len(w.layers), (), device="cpu"))]
    x_s, y_s = x.roll(-1, 0), y.roll(-1, 0)
    expected = []
    with w.frozen_observers(), _terms._bn_eval(w):
        for i, j in ((32, 4), (4, 32)):
            z = _terms._distill(w, i, layer, x, x_s)
            with w.at_bits(j):
                expected.append(F.cross_entropy(w(z), y_s))
    assert torch.allclose(value, torch.stack(expected).mean(), atol=1e-10)


def test_refused_with_memory_bounded_and_without_tapped_layers():
    with pytest.raises(ConfigError, match="memory_bounded"):
        _wrapper(lambda_dverge=1.0, memory_bounded=True)
    with pytest.raises(ConfigError, match="lambda_dverge"):
        _wrapper(lambda_dverge=-1.0)
    with pytest.raises(ConfigError, match="layers"):
        TriQDefWrapper(small_net(), bits=(32, 4), lambda_dverge=1.0)


def test_assignments_after_construction_are_checked_and_keep_the_old_value():
    w = _wrapper(memory_bounded=True)
    with pytest.raises(ConfigError, match="memory_bounded"):
        w.lambda_dverge = 0.5
    assert w.lambda_dverge == 0.0
    w2 = TriQDefWrapper(small_net(), bits=(32, 4), lambda_fdp=0.0)
    with pytest.raises(ConfigError, match="layers"):
        w2.lambda_dverge = 0.5
    assert w2.lambda_dverge == 0.0
    w3 = _wrapper(lambda_dverge=1.0)
    with pytest.raises(ConfigError, match="memory_bounded"):
        w3.memory_bounded = True
    assert w3.memory_bounded is False
    for name in ("lambda_dverge", "lambda_fdp", "alpha"):
        with pytest.raises(ConfigError, match="finite"):
            setattr(w3, name, float("nan"))
    assert w3.lambda_dverge == 1.0 and w3.lambda_fdp == 0.8
