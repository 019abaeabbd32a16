"""The GPU benchmark script runs end to end (on CPU, tiny), so a GPU session never debugs it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.fixture(scope="module")
def gpu_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_benchmark_runs_every_row_on_cpu(gpu_bench, tmp_path):
    out = tmp_path / "gpu.json"
    argv = ["--device", "cpu", "--model", "resnet20", "--batch", "2", "--steps", "1"]
    results = gpu_bench.main([*argv, "--json", str(out)])
    rows = [r["row"] for r in results]
    assert rows == [
        "qat-1bit",
        "ce-5bit",
        "triqdef",
        "triqdef-unchecked",
        "triqdef-bounded",
        "triqdef-pb2",
        "triqdef-pb2-bf16",
        "triqdef-pb2-cl",
    ]
    for r in results:
        assert "error" not in r, r
        assert r["images_per_s"] > 0 and r["peak_gib"] is None
    full = next(r for r in results if r["row"] == "triqdef")
    assert full["snapshot_s"] > 0 and full["buffers"] > 0
    saved = json.loads(out.read_text())
    assert saved["device"].startswith("CPU") and len(saved["results"]) == len(rows)
