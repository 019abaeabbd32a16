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


@pytest.fixture(scope="module")
def attacks_bench():
    path = SCRIPT.parent / "attacks.py"
    spec = importlib.util.spec_from_file_location("bench_attacks", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attacks_benchmark_has_dpr_and_patchattack_rows(attacks_bench, capsys):
    argv = ["--skip-art", "--batch", "2", "--iters", "1", "--repeats", "1"]
    argv += ["--lavan-batch", "2", "--lavan-steps", "1", "--patch-batch", "3"]
    rows = attacks_bench.main([*argv, "--patch-queries", "5"])
    assert [(r["attack"], r["model"]) for r in rows] == [
        ("lavan", "smallcnn 28x28"),
        ("lavan", "resnet20 32x32"),
        ("dpr", "smallcnn 28x28"),
        ("patchattack", "smallcnn 28x28"),
    ]
    assert all(r["images_per_s"] > 0 for r in rows)
    (pa,) = [r for r in rows if r["attack"] == "patchattack"]
    # the clean query and at least one batch of actions, never past the budget
    assert pa["query_budget"] == 5 and 2 <= pa["queries_per_image"] <= 5
    out = capsys.readouterr().out
    assert "(3) DPR throughput" in out and "(4) PatchAttack throughput" in out
