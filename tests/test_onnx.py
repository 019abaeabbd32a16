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
