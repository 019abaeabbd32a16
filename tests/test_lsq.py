"""Learned step sizes (``quantizer="lsq"``, issue 13): the LSQ fake-quant and its gradients,
training, checkpoints and export."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_cnn
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import triqdef
from triqdef import TriQDefWrapper
from triqdef.errors import CheckpointError, ConfigError
from triqdef.quant import (
    LSQFakeQuantize,
    activation_scale,
    lsq_fake_quantize,
    lsq_grad_scale,
    lsq_step,
    quant_range,
    weight_scale,
)

ROOT = Path(__file__).resolve().parents[1]
BITS = (32, 4, 2)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _along(step: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return step.reshape(())
    shape = [1] * x.ndim
    shape[axis] = -1
    return step.reshape(shape)


# --- the fake-quant function --------------------------------------------------------------
@pytest.mark.parametrize(
    "shape, axis, bits, signed",
    [
        ((4, 6), None, 2, False),
        ((4, 6), None, 3, True),
        ((3, 2, 4), 0, 2, True),
        ((2, 5), 1, 4, True),
    ],
)
def test_gradcheck_in_float64_against_the_straight_through_surrogate(shape, axis, bits, signed):
    # LSQ's gradients are those of s * (clamp(x/s) + [round(clamp(x/s)) - clamp(x/s)]) with
    # the bracket held constant (a straight-through round). Subtracting s * bracket (as a
    # constant) from LSQ's output leaves s * clamp(x/s), which finite differences can see:
    # gradcheck then compares LSQ's analytic gradient w.r.t. x and s, minus the bracket,
    # with the numerical one (1 / 0 for x inside / outside the grid; for s: 0 inside, where
    # LSQ's round(v) - v must cancel the bracket exactly, and qmin / qmax outside).
    qmin, qmax = quant_range(bits, signed)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 1.5).requires_grad_()
    n = 1 if axis is None else shape[axis]
    step = (torch.rand(n, generator=gen, dtype=torch.float64) * 0.4 + 0.3).requires_grad_()
    if axis is None:
        step = step.detach().reshape(()).requires_grad_()

    def surrogate(x, step):
        out = lsq_fake_quantize(x, step, bits, signed, axis=axis, grad_scale=1.0)
        v = (x / _along(step, x, axis)).detach()
        bracket = v.round().clamp(qmin, qmax) - v.clamp(qmin, qmax)
        return out - _along(step, x, axis) * bracket

    assert torch.autograd.gradcheck(surrogate, (x, step), eps=1e-6, atol=1e-7)
    v = (x / _along(step, x, axis)).detach()
    assert bool(((v < qmin) | (v > qmax)).any()) and bool(((v > qmin) & (v < qmax)).any())


def test_the_step_gradient_follows_the_lsq_formula_and_its_gradient_scale():
    x = torch.tensor([-1.0, 0.1, 0.3, 0.9, 5.0], dtype=torch.float64, requires_grad=True)
    step = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    out = lsq_fake_quantize(x, step, 2, signed=False, grad_scale=1.0)  # grid {0, 1, 2, 3}
    assert out.tolist() == [0.0, 0.0, 0.25, 0.75, 0.75]
    out.sum().backward()
    v = x.detach() / 0.25  # -4, 0.4, 1.2, 3.6, 20
    expected = 0.0 + (0 - 0.4) + (1 - 1.2) + 3 + 3  # qmin below, round(v)-v inside, qmax above
    assert math.isclose(float(step.grad), expected, rel_tol=1e-12)
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 0.0, 0.0]  # clipped where v left [0, 3]
    assert v[3] > 3  # 3.6 is clipped although it rounds to 4
    # the default scale is LSQ's 1 / sqrt(N * Qp): here N = 5 elements, Qp = 3
    step2 = step.detach().clone().requires_grad_()
    lsq_fake_quantize(x.detach(), step2, 2, signed=False).sum().backward()
    assert lsq_grad_scale(x, 2, False) == pytest.approx(1 / math.sqrt(5 * 3))
    assert float(step2.grad) == pytest.approx(expected / math.sqrt(15), rel=1e-12)
    w = torch.randn(6, 3, 3, 3)
    assert lsq_grad_scale(w, 4, True, axis=0) == pytest.approx(1 / math.sqrt(27 * 7))
    assert lsq_grad_scale(torch.randn(8, 4, 5, 5), 2, False) == pytest.approx(1 / math.sqrt(300))


def test_it_matches_the_fused_fake_quant_op_and_turns_non_finite_values_into_nan():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=gen)
    scale = weight_scale(w, 4)
    fused = torch.fake_quantize_per_channel_affine(
        w, scale, torch.zeros(16, dtype=torch.int32), 0, -7, 7
    )
    assert torch.equal(lsq_fake_quantize(w, scale, 4, True, axis=0), fused)
    x = torch.randn(4, 100, generator=gen)
    s = torch.tensor(0.037)
    fused = torch.fake_quantize_per_tensor_affine(x, s, torch.zeros((), dtype=torch.int32), 0, 255)
    assert torch.equal(lsq_fake_quantize(x, s, 8, False), fused)
    bad = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.5])
    out = lsq_fake_quantize(bad, torch.tensor(0.1), 4, True)
    assert torch.isnan(out[:3]).all() and out[3] == pytest.approx(0.5)


def test_double_backward_goes_through_it():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    step = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    scale = torch.linspace(0.5, 2.0, 6, dtype=torch.float64)
    loss = (lsq_fake_quantize(x, step, 3, True) * scale).sum() ** 2
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    penalty = gx.pow(2).sum()
    penalty.backward()
    assert step.grad is not None and torch.isfinite(step.grad)
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_the_log_domain_step_gives_lsq_updates_to_sgd():
    log_step = torch.tensor(math.log(0.25), dtype=torch.float64, requires_grad=True)
    x = torch.tensor([-1.0, 0.1, 0.3, 0.9, 5.0], dtype=torch.float64)
    step = lsq_step(log_step)
    assert step.item() == pytest.approx(0.25, rel=1e-12)
    lsq_fake_quantize(x, step, 2, signed=False, grad_scale=1.0).sum().backward()
    lsq_grad = -0.6 + 6  # the step's gradient (see the test above)
    assert float(log_step.grad) == pytest.approx(lsq_grad / 0.25, rel=1e-12)
    # one SGD step on the log moves the step by LSQ's -lr * grad, to first order
    lr = 1e-6
    moved = math.exp(math.log(0.25) - lr * float(log_step.grad))
    assert moved - 0.25 == pytest.approx(-lr * lsq_grad, rel=1e-4)
    # and never past zero, however large the update
    assert float(lsq_step(torch.tensor(math.log(0.25) - 50.0))) > 0


def test_the_module_twin():
    q = LSQFakeQuantize(4, signed=True, channels=3, init=0.1)
    assert isinstance(q.log_step, nn.Parameter) and q.log_step.shape == (3,)
    assert [n for n, _ in q.named_parameters()] == ["log_step"]
    torch.testing.assert_close(q.step.detach(), torch.full((3,), 0.1))
    w = torch.randn(3, 5)
    torch.testing.assert_close(q(w), lsq_fake_quantize(w, torch.full((3,), 0.1), 4, True, axis=0))
    q(w).sum().backward()
    assert q.log_step.grad is not None and q.log_step.grad.shape == (3,)
    per_tensor = LSQFakeQuantize(2, signed=False)
    assert per_tensor.log_step.shape == () and per_tensor(torch.rand(2, 3)).shape == (2, 3)
    for bad in ({"bits": 1}, {"bits": 32}, {"channels": 0}, {"init": 0.0}, {"init": -1.0}):
        with pytest.raises(ConfigError):
            LSQFakeQuantize(**{"bits": 4, **bad})


# --- in the wrapper -----------------------------------------------------------------------------
def _steps(w: TriQDefWrapper) -> dict[str, torch.Tensor]:
    """Every learned step size (not its log), by parameter name."""
    return {n: p.detach().exp() for n, p in w.named_parameters() if "log_step" in n}


def test_steps_are_parameters_initialised_from_the_observers_like_minmax():
    torch.manual_seed(0)
    a, b = tiny_cnn(), tiny_cnn()
    b.load_state_dict(a.state_dict())
    lsq = TriQDefWrapper(a, bits=BITS, lambda_fdp=0, quantizer="lsq")
    mm = TriQDefWrapper(b, bits=BITS, lambda_fdp=0)
    names = {n for n, _ in lsq.named_parameters()}
    assert {"quantizers.3.act_log_step", "quantizers.3.weight_log_steps.0"} <= names
    assert lsq.quantizers["3"].act_log_step.shape == (2,)
    assert lsq.quantizers["3"].weight_log_steps[0].shape == (2, 8)
    assert {n for n, _ in mm.named_parameters()} == {f"model.{n}" for n, _ in b.named_parameters()}
    x = torch.randn(8, 3, 8, 8)
    for bits in (4, 2):  # the first forward of a bit-width: the min/max quantizer's (up to
        # the float rounding of exp(log(scale)))
        with lsq.at_bits(bits), mm.at_bits(bits):
            torch.testing.assert_close(lsq(x), mm(x), atol=1e-4, rtol=0)
        i = lsq._ctx.qbits.index(bits)
        for name in ("0", "3", "8"):
            q, ref = lsq.quantizers[name], mm.quantizers[name]
            grid = q.input_grid(i)
            kind_signed = bool(ref.act_kind[i] == 2)
            expected = activation_scale(ref.act_min[i], ref.act_max[i], grid, kind_signed)
            torch.testing.assert_close(q.scale(i)[0], expected, rtol=1e-6, atol=0)
            w = lsq.model.get_submodule(name).weight
            torch.testing.assert_close(
                q.weight_log_steps[0][i].detach().exp(), weight_scale(w, bits), rtol=1e-6, atol=0
            )


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_training_moves_the_steps_and_keeps_them_positive(optimizer):
    torch.manual_seed(0)
    w = TriQDefWrapper(tiny_cnn(), bits=BITS, layers=["2"], quantizer="lsq", penalty_bits=None)
    if optimizer == "adam":  # the project's usual optimizer and learning rate
        opt: torch.optim.Optimizer = torch.optim.Adam(w.parameters(), lr=3e-3)
    else:
        opt = torch.optim.SGD(w.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    w.loss(x, y)  # initialises every bit-width's steps
    start = _steps(w)
    # the first layer reads the image on the 8-bit grid (input_bits): a step of ~1/255
    assert float(start["quantizers.0.act_log_step"].max()) < 0.01
    for _ in range(8):  # the full objective: FDP, GPDP (a double backward through LSQ)
        loss = w.loss(x, y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for n, p in w.named_parameters() if "step" in n)
        opt.step()
    assert math.isfinite(loss.item())
    for name, now in _steps(w).items():
        assert not torch.equal(now, start[name]), name
        assert bool((now > 0).all()), name  # a step held as such would cross 0 under Adam
        if optimizer == "adam":  # a relative motion: the 8-bit steps of ~0.004 did not collapse
            ratio = now / start[name]
            assert bool((ratio > 0.5).all() and (ratio < 2).all()), (name, ratio)


def test_save_load_roundtrip_and_refusals(tmp_path):
    torch.manual_seed(0)
    w = TriQDefWrapper(tiny_cnn(), bits=BITS, lambda_fdp=0, quantizer="lsq")
    opt = torch.optim.SGD(w.parameters(), lr=0.1)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for bits in (4, 2):
        with w.at_bits(bits):
            for _ in range(2):
                opt.zero_grad()
                F.cross_entropy(w(x), y).backward()
                opt.step()
    w.eval()
    path = tmp_path / "lsq.safetensors"
    triqdef.save(w, path)
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["quantizer"]) == "lsq"
    fresh = TriQDefWrapper(tiny_cnn(), bits=BITS, lambda_fdp=0, quantizer="lsq").eval()
    triqdef.load(fresh, path)
    assert _same(_state(fresh), _state(w))
    with torch.no_grad():
        for bits in (4, 2):
            with w.at_bits(bits), fresh.at_bits(bits):
                assert torch.equal(fresh(x), w(x))
    minmax = TriQDefWrapper(tiny_cnn(), bits=BITS, lambda_fdp=0)
    before = _state(minmax)
    with pytest.raises(CheckpointError, match="quantizer='lsq'.*quantizer='minmax'"):
        triqdef.load(minmax, path)
    assert _same(_state(minmax), before)
    state = w.state_dict()
    state["quantizers.3.act_log_step"] = torch.tensor([0.1, float("nan")])
    before = _state(fresh)
    with pytest.raises(CheckpointError, match="act_log_step.*learned \\(log\\) step size"):
        fresh.load_state_dict(state)
    assert _same(_state(fresh), before)


def test_a_failed_loss_leaves_the_steps_as_they_were():
    torch.manual_seed(0)
    w = TriQDefWrapper(tiny_cnn(), bits=BITS, lambda_fdp=0, quantizer="lsq")
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    before = _state(w)

    def boom(module, args):
        if w.current_bits == 2:  # after the 4-bit forward set that row's steps
            raise RuntimeError("boom")

    handle = w.model[8].register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="boom"):
        w.loss(x, y)
    handle.remove()
    assert _same(_state(w), before)
    assert w.calibrated_bits() == (32,)
    w.loss(x, y).backward()  # the next loss sets them as usual
    assert w.calibrated_bits() == BITS


def _trained(**kwargs) -> tuple[TriQDefWrapper, torch.Tensor]:
    torch.manual_seed(0)
    w = TriQDefWrapper(tiny_cnn(), bits=BITS, lambda_fdp=0, quantizer="lsq", **kwargs)
    opt = torch.optim.Adam(w.parameters(), lr=1e-2)
    x, y = torch.rand(16, 3, 8, 8), torch.randint(0, 10, (16,))
    for bits in (4, 2, 4, 2):
        with w.at_bits(bits):
            opt.zero_grad()
            F.cross_entropy(w(x), y).backward()
            opt.step()
    return w.eval(), x


@pytest.mark.parametrize("kwargs", [{}, {"min_bits": {"8": 8}, "act_bits": {2: 4}}])
def test_export_and_save_quantized_freeze_the_learned_steps(tmp_path, kwargs):
    w, x = _trained(**kwargs)
    for bits in (4, 2):
        i = w._ctx.qbits.index(bits)
        with torch.no_grad(), w.at_bits(bits):
            ref = w(x)
        exported = w.export(bits)
        with torch.no_grad():
            assert torch.equal(exported(x), ref)
        for name in ("0", "3", "8"):
            q = w.quantizers[name]
            assert torch.equal(exported.get_submodule(name).input_scale, q.scale(i)[0])
        path = tmp_path / f"q{bits}.safetensors"
        triqdef.save_quantized(w, path, bits=bits)
        tensors = load_file(str(path))
        for name in ("0", "3", "8"):
            key = f"{name}.layer.weight"
            q = w.quantizers[name]
            qmin, qmax = quant_range(q.weight_grid[i], True)
            codes = tensors[key]
            assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
            learned = q.weight_log_steps[0][i].detach().exp()
            assert torch.equal(tensors[key + "_scale"], learned)
            scale = tensors[key + "_scale"].reshape(-1, *([1] * (codes.ndim - 1)))
            torch.testing.assert_close(
                codes.float() * scale, exported.get_submodule(name).layer.weight, atol=1e-7, rtol=0
            )


def test_onnx_uses_the_learned_steps(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    w, x = _trained(act_bits={2: 4})
    for bits in (4, 2):
        path = tmp_path / f"lsq{bits}.onnx"
        triqdef.export_onnx(w, path, bits, x[:1])
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        out = session.run(None, {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = w.export(bits)(x).numpy()
        assert float(np.abs(out - ref).max()) <= 1e-4


def test_calibrate_sets_the_input_steps_from_the_observers_and_restores_them_on_failure():
    w, x = _trained()
    i = w._ctx.qbits.index(2)
    trained = _steps(w)
    w.calibrate([x], bits=[2], observers=False)  # the observers, and so the steps, stay
    assert all(torch.equal(v, _steps(w)[k]) for k, v in trained.items())
    w.calibrate([x, x * 0.5], bits=[2])
    for name in ("0", "3", "8"):
        q = w.quantizers[name]
        signed = bool(q.act_kind[i] == 2)
        expected = activation_scale(q.act_min[i], q.act_max[i], q.input_grid(i), signed)
        torch.testing.assert_close(q.scale(i)[0], expected, rtol=1e-6, atol=0)
        weight = w.model.get_submodule(name).weight
        torch.testing.assert_close(
            q.weight_log_steps[0][i].detach().exp(), weight_scale(weight, 2), rtol=1e-6, atol=0
        )
    before = _state(w)

    class Boom(Exception):
        pass

    def fail(*_):
        raise Boom

    handle = w.model[8].register_forward_pre_hook(lambda m, a: fail() if m.training else None)
    with pytest.raises(Exception, match="statistics restored"):
        w.calibrate([x], bits=[2])
    handle.remove()
    assert _same(_state(w), before)


def _old_weight_norm(m: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of parametrizations
        return nn.utils.weight_norm(m)


@pytest.mark.parametrize(
    "parametrize",
    [
        nn.utils.parametrizations.weight_norm,
        nn.utils.parametrizations.spectral_norm,
        _old_weight_norm,
        nn.utils.spectral_norm,
    ],
    ids=["weight_norm", "spectral_norm", "old_weight_norm", "old_spectral_norm"],
)
def test_parametrized_weights_learn_their_steps(parametrize):
    torch.manual_seed(0)
    net = tiny_cnn()
    parametrize(net[3])
    before = _state(net)
    w = TriQDefWrapper(net, bits=BITS, lambda_fdp=0, quantizer="lsq")
    assert _same(_state(net), before)  # no power iteration to find the channels
    opt = torch.optim.SGD(w.parameters(), lr=0.01)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    for bits in (4, 2):
        with w.at_bits(bits):
            opt.zero_grad()
            F.cross_entropy(w(x), y).backward()
            assert w.quantizers["3"].weight_log_steps[0].grad is not None
            opt.step()
    w.eval()
    with torch.no_grad(), w.at_bits(2):
        torch.testing.assert_close(w.export(2)(x), w(x), atol=1e-5, rtol=0)


def test_the_benchmark_runs():
    spec = importlib.util.spec_from_file_location("bench_lsq", ROOT / "benchmarks" / "lsq.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--steps", "3", "--batch", "8", "--width", "4", "--seeds", "0"])
    assert [r["quantizer"] for r in out["rows"]] == ["minmax", "lsq"]
    assert all(0.0 <= r["accuracy_2bit"] <= 1.0 for r in out["rows"])
    assert out["rows"][1]["steps_min"] > 0
