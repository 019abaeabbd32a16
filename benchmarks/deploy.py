"""onnxruntime CPU latency of the 8-bit QDQ model against the fp32 ONNX model.

Both models come from [`triqdef.export_onnx`][triqdef.onnx_export.export_onnx] of the
same calibrated wrapper (random weights, observers calibrated on random data): bits=32
(the plain float graph) and bits=8 (QuantizeLinear/DequantizeLinear around every
quantized layer). Each batch size is timed in one run, the two models interleaved, and
the figure reported is the ratio of medians (QDQ / fp32; below 1 means the QDQ model is
faster). The script also saves onnxruntime's optimized graph of each model
(``SessionOptions.optimized_model_filepath``) and lists its operators, which says
whether onnxruntime fused the QDQ pairs into integer kernels (QLinearConv,
ConvInteger, QLinearMatMul, MatMulInteger) or kept float convolutions. A third row
runs the same 8-bit file with the session option ``session.disable_quant_qdq=1``
(onnxruntime then treats DequantizeLinear as an ordinary op, folds the weights'
DequantizeLinear into float constants and BatchNorm into the convolutions; same
outputs up to float rounding). A fourth row runs the 8-bit file written with
``integer=True`` (BatchNorm folded, int32 biases, outputs requantized onto the next
layer's input grid), which onnxruntime fuses into integer kernels where a layer's
output reaches the next quantizer through ReLU and max pooling only.

    python benchmarks/deploy.py [--model resnet20] [--batch 1 64] [--iters 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import triqdef
from triqdef import TriQDefWrapper, export_onnx

_INTEGER_OPS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger")


def _model(name: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if name == "resnet20":
        return triqdef.models.resnet20(), (3, 32, 32)
    if name == "smallcnn":
        return triqdef.models.SmallCNN(), (1, 28, 28)
    raise SystemExit(f"unknown model {name!r}")


def _session(path: Path, threads: int, optimized: Path, qdq: bool = True):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if not qdq:  # DequantizeLinear as a plain op: constant-folded, BatchNorm fused
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ops(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path))
    return dict(collections.Counter(n.op_type for n in model.graph.node))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="resnet20", choices=["resnet20", "smallcnn"])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)

    model, shape = _model(args.model)
    wrapper = TriQDefWrapper(model, bits=[32, 8], lambda_fdp=0)
    wrapper.train()
    with torch.no_grad():
        for _ in range(3):
            for b in (32, 8):
                with wrapper.at_bits(b):
                    wrapper.model(torch.rand(32, *shape))
    wrapper.eval()

    out: dict = {"model": args.model, "threads": args.threads, "iters": args.iters, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {}
        for bits in (32, 8):
            path = Path(tmp) / f"m{bits}.onnx"
            optimized = Path(tmp) / f"m{bits}.opt.onnx"
            export_onnx(wrapper, path, bits, torch.rand(1, *shape))
            sessions[bits] = _session(path, args.threads, optimized)
            out[f"ops_{bits}"] = _ops(optimized)
        path = Path(tmp) / "m8.onnx"
        sessions[-8] = _session(path, args.threads, Path(tmp) / "m8f.opt.onnx", qdq=False)
        out["ops_8_folded"] = _ops(Path(tmp) / "m8f.opt.onnx")
        fused = sorted(op for op in out["ops_8"] if op in _INTEGER_OPS)
        out["integer_kernels"] = fused
        path = Path(tmp) / "m8i.onnx"
        export_onnx(wrapper, path, 8, torch.rand(1, *shape), integer=True)
        sessions[0] = _session(path, args.threads, Path(tmp) / "m8i.opt.onnx")
        out["ops_8_integer"] = _ops(Path(tmp) / "m8i.opt.onnx")
        out["integer_kernels_integer"] = {
            op: n for op, n in sorted(out["ops_8_integer"].items()) if op in _INTEGER_OPS
        }
        for batch in args.batch:
            x = np.random.default_rng(batch).random((batch, *shape), dtype=np.float32)
            times: dict[int, list[float]] = {32: [], 8: [], -8: [], 0: []}
            for bits in times:  # warm-up
                for _ in range(3):
                    sessions[bits].run(None, {"input": x})
            for _ in range(args.iters):
                for bits in times:
                    t0 = time.perf_counter()
                    sessions[bits].run(None, {"input": x})
                    times[bits].append(time.perf_counter() - t0)
            fp32, qdq = statistics.median(times[32]), statistics.median(times[8])
            row = {"batch": batch, "fp32_ms": 1e3 * fp32, "qdq8_ms": 1e3 * qdq}
            row["ratio_qdq_over_fp32"] = qdq / fp32
            folded = statistics.median(times[-8])
            row["qdq8_folded_ms"] = 1e3 * folded
            row["ratio_folded_over_fp32"] = folded / fp32
            integer = statistics.median(times[0])
            row["integer8_ms"] = 1e3 * integer
            row["ratio_integer_over_fp32"] = integer / fp32
            out["rows"].append(row)

    print(f"{args.model}, onnxruntime CPU, {args.threads} thread(s), median of {args.iters}")
    for r in out["rows"]:
        print(
            f"  batch {r['batch']:>3}: fp32 {r['fp32_ms']:8.2f} ms"
            f"   8-bit QDQ {r['qdq8_ms']:8.2f} ms   ratio QDQ/fp32 {r['ratio_qdq_over_fp32']:.2f}"
        )
        print(
            f"             8-bit QDQ, session.disable_quant_qdq=1 {r['qdq8_folded_ms']:8.2f} ms"
            f"   ratio /fp32 {r['ratio_folded_over_fp32']:.2f}"
        )
        print(
            f"             8-bit, export_onnx(integer=True)          {r['integer8_ms']:8.2f} ms"
            f"   ratio /fp32 {r['ratio_integer_over_fp32']:.2f}"
        )
    print(f"  integer kernels in the optimized 8-bit graph: {fused or 'none'}")
    print(
        "  integer kernels in the optimized integer=True graph: "
        f"{out['integer_kernels_integer'] or 'none'}"
    )
    print(f"  optimized 8-bit graph ops: {out['ops_8']}")
    print(f"  optimized 8-bit graph ops, disable_quant_qdq=1: {out['ops_8_folded']}")
    print(f"  optimized fp32 graph ops: {out['ops_32']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
