"""The reproduction (triqdef.reproduce, run by ``triqdef reproduce`` and
examples/reproduce.py) at its smoke size: it runs and its results files are complete."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import triqdef.reproduce as reproduce
from triqdef.baselines import METHODS, PER_BIT

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _assert_rates(rates, counts) -> None:
    """Each rate is successes / eligible in [0, 1]; None only where nothing was eligible."""
    assert len(rates) == len(counts)
    for row, count_row in zip(rates, counts):
        assert len(row) == len(count_row)
        for v, (succ, elig) in zip(row, count_row):
            assert 0 <= succ <= elig
            if elig == 0:
                assert v is None
            else:
                assert isinstance(v, float) and 0.0 <= v <= 1.0
                assert v == pytest.approx(succ / elig)


def test_smoke_run_writes_every_method_condition_and_matrix(tmp_path):
    reproduce.main(["--size", "smoke", "--data", "digits", "--out", str(tmp_path), "--no-progress"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["data"] == "digits"
    (run,) = results["runs"]
    assert set(run["clean"]) == set(METHODS) == set(run["transfer"])
    bits = [32, 5, 4, 2]
    for name in METHODS:
        assert set(run["clean"][name]) == {"32", "5", "4", "2"}, name
        assert all(0.0 <= a <= 1.0 for a in run["clean"][name].values())
        assert set(run["transfer"][name]) == {"lavan", "gap"}
        for attack in ("lavan", "gap"):
            conds = run["transfer"][name][attack]
            assert set(conds) == set(reproduce.CONDITIONS)
            for m in conds.values():
                assert m["target_bits"] == bits
                assert len(m["asr"]) == len(m["source_bits"]) and len(m["noise_floor"]) == 4
                _assert_rates(m["asr"], m["counts"])
                _assert_rates([m["noise_floor"]], [m["noise_counts"]])
                # at 32 bits the models classify some samples correctly: numbers, not None
                assert all(row[0] is not None for row in m["asr"]), (name, attack)
                assert m["noise_floor"][0] is not None, (name, attack)
            # seen (generated at 32 bits like the pool) and unseen-bits make up the square
            assert conds["seen"]["source_bits"] == [32]
            assert conds["unseen-bits"]["source_bits"] == [5, 4, 2]
            assert conds["unseen-size"]["source_bits"] == bits
            assert conds["blackbox"]["source_bits"] == [32]
    shared = [m for m in METHODS if m not in PER_BIT]
    assert set(run["alignment"]) == set(shared)
    for rep in run["alignment"].values():
        assert all(-1.0 <= v <= 1.0 for v in rep["values"]["input_grad"]["cosine"])
    md = (tmp_path / "results.md").read_text()
    for name in METHODS:
        assert f"| {name} |" in md
    assert "## Transfer ASR relative to `multibit`" in md and "Threat calibration" in md
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert "transfer-triqdef-lavan-seen.png" in pngs and "transfer-pbat-gap-blackbox.png" in pngs
    assert len(pngs) == len(METHODS) * 2 * len(reproduce.CONDITIONS)
    assert (tmp_path / "pool-seed0.safetensors").exists()


def test_off_diagonal_and_relative_change():
    m = {
        "source_bits": [32, 4],
        "target_bits": [32, 4, 2],
        "asr": [[0.9, 0.6, 0.5], [0.3, 0.8, None]],
        "noise_floor": [0.1, 0.1, 0.1],
    }
    assert reproduce.off_diagonal(m, "seen") == [0.3, 0.6, 0.5]
    assert reproduce.diagonal(m) == [0.9, 0.8, None]
    # black-box: the source is another model, so every cell is a transfer
    assert reproduce.off_diagonal(m, "blackbox") == [pytest.approx(0.6), 0.7, 0.5]

    def run(seed, ref, mine):
        def matrix(v):
            return {"source_bits": [32], "target_bits": [4], "asr": [[v]], "noise_floor": [0.0]}

        return {
            "seed": seed,
            "transfer": {
                "multibit": {"lavan": {"seen": matrix(ref)}},
                "triqdef": {"lavan": {"seen": matrix(mine)}},
            },
        }

    table = reproduce.summary({"runs": [run(0, 0.8, 0.4), run(1, 0.6, 0.3)]})
    assert reproduce.relative(table, "triqdef", "lavan", "seen", 0) == pytest.approx(-0.5)
    table = reproduce.summary({"runs": [run(0, 0.0, 0.4)]})
    assert reproduce.relative(table, "triqdef", "lavan", "seen", 0) is None  # no reference ASR


def test_validation_split_never_overlaps_training_or_calibration():
    size = dict(reproduce.SIZES["smoke"])
    val = reproduce.load_data("digits", size, 0, split="val")
    test = reproduce.load_data("digits", size, 0, split="test")
    assert torch.equal(val.x_train, test.x_train) and torch.equal(val.x_calib, test.x_calib)
    rows = {tuple(x.flatten().tolist()) for x in torch.cat([val.x_train, val.x_calib])}
    assert not any(tuple(x.flatten().tolist()) in rows for x in val.x_eval[:8])
    assert len(val.x_eval) == len(test.x_eval) == size["test"]


def test_recalibration_check_runs_and_reports_four_states():
    out = _example("recalibration").main(["--size", "smoke", "--data", "digits"])
    assert list(out) == [
        "as trained",
        "calibrate(256 images)",
        "BatchNorm statistics only",
        "observers only",
    ]
    for acc in out.values():
        assert set(acc) == {5, 4, 2}
        assert all(a is None or 0.0 <= a <= 1.0 for a in acc.values())
    assert out["calibrate(256 images)"][2] is not None  # calibrate reaches every bit-width


def test_sweep_tables_from_results():
    sweep = _example("sweep")
    bits = [32, 4]

    def matrix(direct, cross):
        return {
            "source_bits": bits,
            "target_bits": bits,
            "asr": [[direct, cross], [cross, direct]],
            "noise_floor": [0.0, 0.0],
        }

    def run(seed, ref, mine):
        transfer = {}
        for label, (d, c) in (("multibit", ref), ("triqdef", mine)):
            transfer[label] = {
                a: {cond: matrix(d, c) for cond in sweep.R.CONDITIONS} for a in ("lavan", "gap")
            }
        clean = {"multibit": {"32": 0.8, "4": 0.6}, "triqdef": {"32": 0.7, "4": 0.5}}
        return {"seed": seed, "transfer": transfer, "clean": clean, "clean_as_trained": clean}

    results = {"runs": [run(0, (0.8, 0.6), (0.4, 0.2)), run(1, (0.8, 0.6), (0.4, 0.4))]}
    table = sweep.compact(results)
    row = next(line for line in table.splitlines() if line.startswith("| triqdef |"))
    assert "| 60.0 ± 0.0 |" in row  # clean: mean over bits and seeds
    assert "30.0 ± 10.0 (-50%)" in row  # off-diagonal 0.2 and 0.4 against 0.6
    lines = sweep.ratios(results).splitlines()
    assert "| triqdef | lavan | unseen-size | 40.0 | 30.0 | 0.75 |" in lines
    assert "| multibit | gap | unseen-region | 80.0 | 60.0 | 0.75 |" in lines


def test_sweep_combine_merges_rounds_per_seed(tmp_path):
    sweep = _example("sweep")

    def part(name, commit, runs):
        path = tmp_path / name
        path.write_text(json.dumps({"config": {"commit": commit, "command": name}, "runs": runs}))
        return str(path)

    a = part("a.json", "c1", [{"seed": 0, "clean": {"triqdef": 1, "multibit": 2}}])
    b = part(
        "b.json",
        "c2",
        [
            {"seed": 0, "clean": {"triqdef": 3}, "alignment": {"multibit": "rep"}},
            {"seed": 1, "clean": {"triqdef": 4}},
        ],
    )
    out = sweep.combine([f"{a}:triqdef=triqdef[old]", b])
    assert [r["seed"] for r in out["runs"]] == [0, 1]
    assert out["runs"][0]["clean"] == {"triqdef[old]": 1, "multibit": 2, "triqdef": 3}
    assert out["runs"][0]["alignment"] == {"multibit": "rep"}
    assert [r["commit"] for r in out["config"]["rounds"]] == ["c1", "c2"]


def test_training_batches_keep_the_order_the_reproduction_always_drew():
    # one torch.randperm(n) per epoch from a generator seeded with the run's seed, and no
    # draw from the global random state: results at a fixed seed match the runs made
    # before the reproduction read its data through a DataLoader
    x = torch.arange(10, dtype=torch.float32).view(10, 1, 1, 1)
    y = torch.arange(10)
    loader = reproduce.train_loader(x, y, batch=4, seed=3)
    g = torch.Generator().manual_seed(3)
    state = torch.get_rng_state()
    for _ in range(3):
        batches = list(loader)
        order = torch.randperm(10, generator=g)
        assert [len(yb) for _, yb in batches] == [4, 4, 2]
        assert torch.equal(torch.cat([yb for _, yb in batches]), order)
        assert torch.equal(torch.cat([xb for xb, _ in batches]).flatten().long(), order)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--triqdef", "pairs"], "KEY=VALUE"),
        (["--triqdef", "lambda_fpd=0.5"], "not a TriQDefWrapper keyword"),
        (["--merge", "no-such-results.json"], "no such file"),
        (["--epochs", "0"], "--epochs must be >= 1"),
    ],
)
def test_bad_options_end_in_one_line_and_status_2(argv, match, capsys):
    with pytest.raises(SystemExit) as info:
        reproduce.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err and "Traceback" not in err


def test_parse_kwargs_types_the_values():
    assert reproduce.parse_kwargs(["pairs=sum", "lambda_fdp=0.4", "penalty_bits=none"]) == {
        "pairs": "sum",
        "lambda_fdp": 0.4,
        "penalty_bits": None,
    }
    assert reproduce.parse_kwargs(["penalty_bits=3"]) == {"penalty_bits": 3}
