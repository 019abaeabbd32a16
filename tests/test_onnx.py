"""ONNX QDQ export (`triqdef.export_onnx`): onnxruntime matches `wrapper.export(bits)`."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import triqdef  # noqa: E402
from triqdef import TriQDefWrapper, export_onnx  # noqa: E402
from triqdef.errors import ConfigError, InputError  # noqa: E402
from triqdef.export import QuantizedInputs  # noqa: E402
from triqdef.models import SmallCNN, resnet20  # noqa: E402
from triqdef.quant import quant_range  # noqa: E402

BITS = (32, 8, 5, 4, 2)
ROOT = Path(__file__).resolve().parents[1]


def _trained(model, shape, steps=3, seed=0):
    """A wrapper trained a few Adam steps on random data at every bit-width, in eval mode."""
    torch.manual_seed(seed)
    wrapper = TriQDefWrapper(model, bits=list(BITS))
    opt = torch.optim.Adam(wrapper.parameters(), 1e-3)
    x, y = torch.rand(16, *shape), torch.randint(0, 10, (16,))
    wrapper.train()
    for b in BITS:
        with wrapper.at_bits(b):
            for _ in range(steps):
                loss = torch.nn.functional.cross_entropy(wrapper.model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return wrapper.eval()


@pytest.fixture(scope="module")
def cnn():
    return _trained(SmallCNN(), (1, 28, 28))


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x.numpy()})[0]


def _max_dev(wrapper, path, bits, x):
    ref = wrapper.export(bits)(x).numpy()
    return float(np.abs(_run(path, x) - ref).max())


@pytest.mark.parametrize("bits", [8, 5, 4, 2, 32])
def test_onnxruntime_matches_export_with_a_dynamic_batch(cnn, bits, tmp_path):
    path = tmp_path / f"cnn{bits}.onnx"
    export_onnx(cnn, path, bits, torch.rand(2, 1, 28, 28))
    for batch in (1, 5):
        x = torch.rand(batch, 1, 28, 28, generator=torch.Generator().manual_seed(batch))
        assert _run(path, x).shape == (batch, 10)
        assert _max_dev(cnn, path, bits, x) <= 1e-4


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_the_graph_is_qdq_with_integer_weights(cnn, bits, tmp_path):
    path = tmp_path / "cnn.onnx"
    export_onnx(cnn, path, bits, torch.rand(1, 1, 28, 28))
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    n_layers = len(cnn.quantized_layers())
    assert ops.count("QuantizeLinear") == n_layers
    assert ops.count("DequantizeLinear") == 2 * n_layers  # weights and inputs
    # a Clip on the integer tensor for every grid that does not fill int8/uint8
    grids = [m for m in cnn.export(bits).modules() if isinstance(m, QuantizedInputs)]
    assert ops.count("Clip") == sum(m.signed or m.bits < 8 for m in grids)
    codes = {
        i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer if i.data_type == 3
    }
    assert len(codes) == n_layers  # int8 weight codes, one initializer per layer
    qmin, qmax = quant_range(bits, True)
    for c in codes.values():
        assert c.min() >= qmin and c.max() <= qmax
    weight_dq = [
        n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in codes
    ]
    assert len(weight_dq) == n_layers
    for n in weight_dq:
        assert {a.name: a.i for a in n.attribute}.get("axis") == 0
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch"


def test_resnet20_at_the_default_bits(tmp_path):
    # 19 quantized layers: onnxruntime's and torch's convolutions differ by ~1e-6, which
    # now and then moves an activation across a rounding boundary of the next layer's
    # grid (one step of that grid); the logits then differ by ~1e-2, not by 1e-4
    wrapper = _trained(resnet20(), (3, 32, 32), steps=1)
    x = torch.rand(3, 3, 32, 32)
    for bits in (32, 8, 4, 2):
        path = tmp_path / f"r20_{bits}.onnx"
        export_onnx(wrapper, path, bits, x[:1])
        ref = wrapper.export(bits)(x).numpy()
        out = _run(path, x)
        assert np.abs(out - ref).max() <= (0.05 if bits < 32 else 1e-4)
        assert (out.argmax(1) == ref.argmax(1)).all()


def test_refusals_write_nothing(cnn, tmp_path):
    path = tmp_path / "refused.onnx"
    x = torch.rand(1, 1, 28, 28)
    with pytest.raises(ConfigError, match="not one of the wrapper's bit-widths"):
        export_onnx(cnn, path, 3, x)
    with pytest.raises(ConfigError, match="bit-widths"):
        export_onnx(cnn, path, True, x)
    with pytest.raises(ConfigError, match="TriQDefWrapper"):
        export_onnx(cnn.model, path, 8, x)
    with pytest.raises(InputError, match="example_input"):
        export_onnx(cnn, path, 8, x.numpy())
    with pytest.raises(ConfigError, match="opset"):
        export_onnx(cnn, path, 8, x, opset=11)
    cnn.train()
    try:
        with pytest.raises(ConfigError, match=r"wrapper\.eval\(\)"):
            export_onnx(cnn, path, 8, x)
    finally:
        cnn.eval()
    assert not path.exists()


def test_without_onnx_the_module_imports_and_the_call_says_what_to_install(tmp_path):
    code = (
        "import sys; sys.modules['onnx'] = None\n"
        "import torch, triqdef\n"
        "from triqdef.models import SmallCNN\n"
        "w = triqdef.TriQDefWrapper(SmallCNN(), layers=['block1']).eval()\n"
        "try:\n"
        f"    triqdef.export_onnx(w, {str(tmp_path / 'x.onnx')!r}, 8, torch.rand(1, 1, 28, 28))\n"
        "except triqdef.errors.ConfigError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'triqdef[onnx]'" in out.stdout, out.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_the_wrapper_is_left_as_it_was(cnn, tmp_path):
    before = {k: v.clone() for k, v in cnn.state_dict().items()}
    export_onnx(cnn, tmp_path / "m.onnx", 4, torch.rand(1, 1, 28, 28))
    after = cnn.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not cnn.training and triqdef.TriQDefWrapper is type(cnn)


def test_the_deploy_benchmark_runs(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_deploy", ROOT / "benchmarks" / "deploy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--model", "smallcnn", "--batch", "1", "2", "--iters", "1"])
    assert [r["batch"] for r in out["rows"]] == [1, 2]
    assert all(r["ratio_qdq_over_fp32"] > 0 for r in out["rows"])
    assert all(r["ratio_integer_over_fp32"] > 0 for r in out["rows"])
    assert out["integer_kernels_integer"].get("QLinearConv") == 2
    assert out["ops_8"].get("QuantizeLinear", 0) + out["ops_8"].get("QLinearConv", 0) > 0


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_torchvision_models(name, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    wrapper = TriQDefWrapper(getattr(torchvision.models, name)(num_classes=10), lambda_fdp=0)
    wrapper.train()
    with torch.no_grad():
        for b in wrapper.bits:
            with wrapper.at_bits(b):
                wrapper.model(torch.rand(4, 3, 32, 32))
    wrapper.eval()
    x = torch.rand(2, 3, 32, 32)
    for bits in (8, 2):
        path = tmp_path / f"{name}{bits}.onnx"
        export_onnx(wrapper, path, bits, x[:1])
        ref = wrapper.export(bits)(x).numpy()
        out = _run(path, x)
        assert np.abs(out - ref).max() <= 1e-3
        assert (out.argmax(1) == ref.argmax(1)).all()


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def test_a_layer_it_cannot_write_is_refused(tmp_path):
    wrapper = TriQDefWrapper(_Attention(), bits=[32, 8], lambda_fdp=0)
    with torch.no_grad(), wrapper.at_bits(8):
        wrapper.model(torch.rand(2, 3, 8))
    wrapper.eval()
    with pytest.raises(ConfigError, match="MultiheadAttention"):
        export_onnx(wrapper, tmp_path / "a.onnx", 8, torch.rand(1, 3, 8))
    assert not (tmp_path / "a.onnx").exists()


# --- integer=True: the graph rewritten for onnxruntime's integer kernels --------------


def _session(path, optimized=None, enable=True):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if enable
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized is not None:
        opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ops(path):
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def _plain_cnn(batchnorm, **kwargs):
    """Conv -> [BN] -> ReLU -> MaxPool -> Conv -> [BN] -> ReLU -> Flatten -> Linear,
    calibrated at every bit-width; the convolutions have no bias."""
    nn = torch.nn
    torch.manual_seed(0)
    layers = [nn.Conv2d(1, 8, 3, bias=False)]
    layers += [nn.BatchNorm2d(8)] if batchnorm else []
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, bias=False)]
    layers += [nn.BatchNorm2d(8)] if batchnorm else []
    layers += [nn.ReLU(), nn.Flatten(), nn.Linear(8 * 9 * 9, 10)]
    wrapper = TriQDefWrapper(nn.Sequential(*layers), bits=list(BITS), lambda_fdp=0, **kwargs)
    wrapper.train()
    with torch.no_grad():
        for _ in range(3):
            for b in BITS:
                with wrapper.at_bits(b):
                    wrapper.model(torch.rand(16, 1, 24, 24))
    return wrapper.eval()


def _layer_inputs(wrapper, path, bits, x):
    """The quantized layers' inputs, ``(reference, file)`` lists in the order the layers
    run: the reference from ``wrapper.export(bits)``, the file's from onnxruntime with
    graph optimizations off (the file's own arithmetic, every tensor visible)."""
    exported, ref = wrapper.export(bits), []
    layers = [m.layer for m in exported.modules() if isinstance(m, QuantizedInputs)]
    handles = [m.register_forward_pre_hook(lambda m, a: ref.append(a[0])) for m in layers]
    exported(x)
    for h in handles:
        h.remove()
    model = onnx.load(str(path))
    names = [n.input[0] for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    for name in names:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), opts)
    outs = session.run(names, {"input": x.numpy()})
    return [r.detach().numpy() for r in ref], outs


def _same_codes(wrapper, path, bits, x):
    """Every quantized layer's input in the file equals the reference's on its grid,
    up to float ties: at most one step apart, in at most 0.2% of the values (the float
    convolutions of onnxruntime and torch, folded or not, differ by ~1e-6, which now
    and then moves a value across a rounding boundary)."""
    exported = wrapper.export(bits)
    scales = [m.input_scale for m in exported.modules() if isinstance(m, QuantizedInputs)]
    ref, out = _layer_inputs(wrapper, path, bits, x)
    assert len(ref) == len(out) == len(scales)
    for r, o, s in zip(ref, out, scales):
        steps = np.abs(r - o) / float(s)
        assert steps.max() <= 1 + 1e-3
        assert (steps > 0.5).mean() <= 2e-3


@pytest.mark.parametrize("bits", [8, 5, 4, 2])
def test_integer_graph_equals_export_where_nothing_is_rounded(bits, tmp_path):
    # no bias and no BatchNorm: the requantization onto the next grid is exact, so the
    # integer file computes wrapper.export(bits), fused into integer kernels
    wrapper = _plain_cnn(batchnorm=False)
    path, optimized = tmp_path / "int.onnx", tmp_path / "int.opt.onnx"
    export_onnx(wrapper, path, bits, torch.rand(1, 1, 24, 24), integer=True)
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    x = torch.rand(5, 1, 24, 24, generator=torch.Generator().manual_seed(bits))
    _same_codes(wrapper, path, bits, x)
    out = _session(path, optimized).run(None, {"input": x.numpy()})[0]
    assert (out.argmax(1) == wrapper.export(bits)(x).numpy().argmax(1)).all()
    # both convolutions run as integer kernels; the logits layer stays float
    assert _ops(optimized).count("QLinearConv") == 2


@pytest.mark.parametrize("kwargs", [{"quantizer": "lsq"}, {"act_bits": 8}], ids=["lsq", "W4A8"])
def test_integer_graph_with_learned_steps_and_wider_inputs(kwargs, tmp_path):
    wrapper = _plain_cnn(batchnorm=False, **kwargs)
    path, optimized = tmp_path / "int.onnx", tmp_path / "int.opt.onnx"
    export_onnx(wrapper, path, 4, torch.rand(1, 1, 24, 24), integer=True)
    x = torch.rand(5, 1, 24, 24, generator=torch.Generator().manual_seed(1))
    _same_codes(wrapper, path, 4, x)
    _session(path, optimized).run(None, {"input": x.numpy()})
    assert _ops(optimized).count("QLinearConv") == 2


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_batchnorm_folding_is_exact_and_flips_negative_scales(bits, tmp_path):
    wrapper = _plain_cnn(batchnorm=True)
    exported = wrapper.export(bits)
    with torch.no_grad():
        for index in ("1", "5"):
            bn, own = exported.get_submodule(index), wrapper.model.get_submodule(index)
            # three channels negative (their codes change sign), none zero
            gamma = torch.tensor([-1.3, -0.7, -0.2, 0.3, 0.8, 1.2, 1.7, 2.1])
            k = gamma / torch.sqrt(bn.running_var + bn.eps)
            own.weight.copy_(gamma)
            own.bias.copy_(bn.running_mean * k)  # folded bias 0: nothing to round
    path = tmp_path / "bn.onnx"
    export_onnx(wrapper, path, bits, torch.rand(1, 1, 24, 24), integer=True)
    ops = _ops(path)
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == 2 and ops.count("QuantizeLinear") == 3 + 2  # 2 requantized
    x = torch.rand(5, 1, 24, 24, generator=torch.Generator().manual_seed(bits))
    _same_codes(wrapper, path, bits, x)


def test_integer_biases_are_the_folded_biases_rounded_to_their_grid(cnn, tmp_path):
    path = tmp_path / "cnn.onnx"
    export_onnx(cnn, path, 4, torch.rand(1, 1, 28, 28), integer=True)
    model = onnx.load(str(path))
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    producer = {o: n for n in model.graph.node for o in n.output}
    exported = cnn.export(4)
    checked = 0
    for node, block in zip(convs, ("block1", "block2", "block3")):
        if node.input[2] not in producer:  # a float layer: bias is a plain constant
            continue
        wq, bq = producer[node.input[1]], producer[node.input[2]]
        codes, w_scale = arrays[wq.input[0]], arrays[wq.input[1]]
        b_codes, b_scale = arrays[bq.input[0]], arrays[bq.input[1]]
        assert b_codes.dtype == np.int32
        conv, bn = exported.get_submodule(f"{block}.0"), exported.get_submodule(f"{block}.1")
        k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy()
        folded = (-bn.running_mean.double().numpy()) * k + bn.bias.detach().double().numpy()
        step = b_scale.astype(np.float64)
        assert np.all(np.abs(b_codes * step - folded) <= 0.5 * step * (1 + 1e-5))
        weight = conv.layer.weight.detach().double().numpy() * k.reshape(-1, 1, 1, 1)
        view = w_scale.astype(np.float64).reshape(-1, 1, 1, 1)
        np.testing.assert_allclose(codes * view, weight, rtol=1e-5, atol=1e-7)
        checked += 1
    assert checked == 2  # block3 feeds the average pool: it stays a float layer


def test_integer_kernels_on_the_reference_models(cnn, tmp_path):
    r20 = _trained(resnet20(), (3, 32, 32), steps=1)
    for wrapper, shape, fused in ((cnn, (1, 28, 28), 2), (r20, (3, 32, 32), 9)):
        path, optimized = tmp_path / "m.onnx", tmp_path / "m.opt.onnx"
        export_onnx(wrapper, path, 8, torch.rand(1, *shape), integer=True)
        x = torch.rand(4, *shape, generator=torch.Generator().manual_seed(0))
        out = _session(path, optimized).run(None, {"input": x.numpy()})[0]
        assert out.shape == (4, 10) and np.isfinite(out).all()
        assert _ops(optimized).count("QLinearConv") == fused
        # the bias rounding moves the logits a little, not the predictions
        ref = wrapper.export(8)(x).numpy()
        assert (out.argmax(1) == ref.argmax(1)).all()


def test_integer_at_32_bits_is_the_float_graph(cnn, tmp_path):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    export_onnx(cnn, a, 32, torch.rand(1, 1, 28, 28))
    export_onnx(cnn, b, 32, torch.rand(1, 1, 28, 28), integer=True)
    assert _ops(a) == _ops(b)


def test_integer_must_be_a_bool(cnn, tmp_path):
    path = tmp_path / "x.onnx"
    with pytest.raises(ConfigError, match="integer must be True or False"):
        export_onnx(cnn, path, 8, torch.rand(1, 1, 28, 28), integer="yes")
    assert not path.exists()


def test_linear_layers_run_as_integer_gemm(tmp_path):
    nn = torch.nn
    torch.manual_seed(0)
    mlp = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    wrapper = TriQDefWrapper(mlp, bits=[32, 8, 4], lambda_fdp=0)
    wrapper.train()
    with torch.no_grad():
        for _ in range(3):
            for b in (32, 8, 4):
                with wrapper.at_bits(b):
                    wrapper.model(torch.rand(16, 1, 8, 8))
    wrapper.eval()
    path, optimized = tmp_path / "mlp.onnx", tmp_path / "mlp.opt.onnx"
    export_onnx(wrapper, path, 4, torch.rand(1, 1, 8, 8), integer=True)
    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = _session(path, optimized).run(None, {"input": x.numpy()})[0]
    assert _ops(optimized).count("QGemm") == 2  # the logits layer stays float
    assert out.shape == (5, 10) and np.isfinite(out).all()
    model = onnx.load(str(path))
    arrays = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    gemms = [n for n in model.graph.node if n.op_type == "Gemm" and n.input[2] in producer]
    for node, index in zip(gemms, ("1", "3")):
        bq = producer[node.input[2]]
        step = arrays[bq.input[1]].astype(np.float64)
        bias = mlp.get_submodule(index).bias.detach().double().numpy()
        assert np.all(np.abs(arrays[bq.input[0]] * step - bias) <= 0.5 * step * (1 + 1e-5))
    assert len(gemms) == 2
