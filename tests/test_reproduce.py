"""The reproduction (triqdef.reproduce, run by ``triqdef reproduce`` and
examples/reproduce.py) at its smoke size: it runs and its results files are complete."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import triqdef.reproduce as reproduce
from triqdef.attacks import PatchAttack
from triqdef.baselines import METHODS, PER_BIT
from triqdef.errors import ConfigError
from triqdef.models import SmallCNN
from triqdef.wrapper import TriQDefWrapper

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
FULL_TRANSFER = ROOT / "docs" / "data" / "results-full-transfer.json"


SUMMARY_FULL_TRANSFER = (
    "| setting | clean (mean over bits) | clean, as trained | input-grad cosine | "
    "LAVAN seen | LAVAN unseen-bits | LAVAN unseen-size | LAVAN unseen-region | "
    "LAVAN blackbox | GAP seen | GAP unseen-bits | GAP unseen-size | "
    "GAP unseen-region | GAP blackbox |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
    "| multibit | 83.1 ± 0.7 | 82.5 ± 0.8 | 0.594 | 62.0 ± 0.6 | 51.6 ± 1.0 | "
    "73.1 ± 0.1 | 41.3 ± 2.7 | 24.2 ± 0.4 | 33.8 ± 2.2 | 29.1 ± 0.9 | 46.7 ± 0.7 | "
    "19.7 ± 0.3 | 17.7 ± 1.5 |\n"
    "| triqdef | 81.5 ± 0.1 | 77.8 ± 0.5 | 0.544 | 38.9 ± 0.5 (-37%) | "
    "29.4 ± 0.6 (-43%) | 48.9 ± 0.9 (-33%) | 36.5 ± 0.4 (-12%) | 14.4 ± 0.2 (-41%) | "
    "13.6 ± 0.1 (-60%) | 12.5 ± 1.7 (-57%) | 21.1 ± 1.4 (-55%) | 14.8 ± 1.8 (-25%) | "
    "9.5 ± 0.9 (-46%) |\n"
    "| pbat | 83.8 ± 1.1 | 80.7 ± 3.2 | n/a | 10.9 ± 0.7 (-82%) | "
    "10.2 ± 0.3 (-80%) | 17.8 ± 0.4 (-76%) | 8.9 ± 1.1 (-78%) | 6.0 ± 0.3 (-75%) | "
    "9.2 ± 0.3 (-73%) | 7.7 ± 1.0 (-73%) | 16.0 ± 1.0 (-66%) | 6.7 ± 1.1 (-66%) | "
    "4.6 ± 0.6 (-74%) |\n"
    "\n"
    "| setting | attack | condition | direct | transfer | transfer / direct |\n"
    "|---|---|---|---|---|---|\n"
    "| multibit | lavan | unseen-size | 94.0 | 73.1 | 0.78 |\n"
    "| multibit | lavan | unseen-region | 64.1 | 41.3 | 0.64 |\n"
    "| multibit | gap | unseen-size | 55.2 | 46.7 | 0.85 |\n"
    "| multibit | gap | unseen-region | 20.4 | 19.7 | 0.97 |\n"
    "| triqdef | lavan | unseen-size | 79.4 | 48.9 | 0.62 |\n"
    "| triqdef | lavan | unseen-region | 61.3 | 36.5 | 0.59 |\n"
    "| triqdef | gap | unseen-size | 24.7 | 21.1 | 0.85 |\n"
    "| triqdef | gap | unseen-region | 16.6 | 14.8 | 0.89 |\n"
    "| pbat | lavan | unseen-size | 40.2 | 17.8 | 0.44 |\n"
    "| pbat | lavan | unseen-region | 21.2 | 8.9 | 0.42 |\n"
    "| pbat | gap | unseen-size | 17.8 | 16.0 | 0.90 |\n"
    "| pbat | gap | unseen-region | 7.9 | 6.7 | 0.86 |\n"
)
"""What ``examples/sweep.py --summarize docs/data/results-full-transfer.json`` printed
before the reproduction could measure other attacks than LAVAN and GAP, when the file
held the settings multibit, triqdef and pbat (it has gained settings since)."""


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


def _assert_matrix_format(attack: str, conds: dict) -> None:
    """One attack's matrices: every condition, rows and targets as documented."""
    bits = [32, 5, 4, 2]
    assert set(conds) == set(reproduce.CONDITIONS)
    for m in conds.values():
        assert m["attack"] == attack and m["targeted"] is False
        assert m["target_bits"] == bits
        assert len(m["asr"]) == len(m["source_bits"]) and len(m["noise_floor"]) == 4
        _assert_rates(m["asr"], m["counts"])
        _assert_rates([m["noise_floor"]], [m["noise_counts"]])
    assert conds["seen"]["source_bits"] == [32]
    assert conds["unseen-bits"]["source_bits"] == [5, 4, 2]
    assert conds["unseen-size"]["source_bits"] == bits
    assert conds["unseen-region"]["source_bits"] == bits
    assert conds["blackbox"]["source_bits"] == [32]


def test_smoke_run_with_dpr_and_patchattack_fits_textures_once(tmp_path, monkeypatch):
    fitted = []
    fit = PatchAttack.fit_textures

    def counting_fit(self, x, y, *args, **kwargs):
        fitted.append(len(x))
        return fit(self, x, y, *args, **kwargs)

    monkeypatch.setattr(PatchAttack, "fit_textures", counting_fit)
    argv = ["--size", "smoke", "--data", "digits", "--methods", "multibit", "--no-progress"]
    reproduce.main([*argv, "--attacks", "patchattack", "dpr", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["attacks"] == ["dpr", "patchattack"]  # ATTACKS' order
    assert results["config"]["patch_queries"] == reproduce.SIZES["smoke"]["patch_queries"]
    (run,) = results["runs"]
    # one dictionary for the seed, from its training images, shared by all 13 matrix rows
    assert fitted == [reproduce.SIZES["smoke"]["train"]]
    assert set(run["transfer"]["multibit"]) == {"dpr", "patchattack"}
    for attack, conds in run["transfer"]["multibit"].items():
        _assert_matrix_format(attack, conds)
    md = (tmp_path / "results.md").read_text()
    assert "## DPR, seen" in md and "## PatchAttack, blackbox" in md and "## LAVAN" not in md
    assert "threat: DPR 2 steps (the square's area), PatchAttack 10 queries per image" in md
    assert "Threat calibration" not in md  # it is defined on LAVAN
    pngs = {p.name for p in tmp_path.glob("*.png")}
    assert len(pngs) == 2 * len(reproduce.CONDITIONS)
    assert "transfer-multibit-patchattack-blackbox.png" in pngs
    table = _example("sweep").compact(results)
    head = table.splitlines()[0]
    assert "| DPR seen |" in head and "| PatchAttack blackbox |" in head and "LAVAN" not in head


def test_full_transfer_results_summarise_as_before(capsys):
    # a results file of the default attacks (LAVAN, GAP) gives the tables it always gave:
    # the rows of the settings measured when the table above was recorded, in order (rows
    # of settings added to the file since come in between)
    _example("sweep").main(["--summarize", str(FULL_TRANSFER)])
    out = capsys.readouterr().out.splitlines()
    expected = SUMMARY_FULL_TRANSFER.splitlines()
    at = 0
    for line in expected:
        assert line in out[at:], line
        at = out.index(line, at) + 1
    assert not any("dpr" in line.lower() or "patchattack" in line.lower() for line in out)
    results = json.loads(FULL_TRANSFER.read_text())
    assert reproduce.attacks_in(results) == ["lavan", "gap"]
    md = reproduce.to_markdown(results)
    assert "threat: LAVAN 50 steps, GAP 100 steps; unseen size 10" in md
    sections = [line for line in md.splitlines() if line.startswith("## ")]
    assert sections[1:-1] == [
        f"## {a}, {c}: ASR (%) per target bit-width; lower is better"
        for a in ("LAVAN", "GAP")
        for c in reproduce.CONDITIONS
    ]
    relative = md.split("## Transfer ASR relative")[1].splitlines()
    rows = [line.split(" | ") for line in relative if line.startswith("| ")][1:]
    assert rows and {r[1] for r in rows} == {"lavan", "gap"}


def test_attacks_option_defaults_to_lavan_and_gap():
    parse = reproduce.build_parser().parse_args
    assert reproduce._attacks_from(parse([])) == reproduce.DEFAULT_ATTACKS == ("lavan", "gap")
    assert reproduce._attacks_from(parse(["--attacks", "all"])) == reproduce.ATTACKS
    assert reproduce._attacks_from(parse(["--attacks", "dpr", "lavan"])) == ("lavan", "dpr")
    with pytest.raises(SystemExit):
        parse(["--attacks", "pgd"])
    # checked before anything is trained or loaded
    with pytest.raises(ConfigError, match="unknown attack 'pgd'"):
        reproduce.transfer_rows(None, None, {}, 0, None, attacks=("lavan", "pgd"))
    with pytest.raises(ConfigError, match="no attack to measure"):
        reproduce.run_seed([], None, {}, 0, "smallcnn", "cpu", False, True, attacks=())


def test_new_attacks_leave_the_lavan_and_gap_draws_unchanged(monkeypatch):
    size = dict(reproduce.SIZES["smoke"])
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 28, 28, generator=g)
    y = torch.arange(24) % 4
    data = reproduce.Data(x[:16], y[:16], x[16:], y[16:], x[16:], y[16:], "random", "test")
    torch.manual_seed(0)
    net = SmallCNN(width=4, num_classes=4)
    target = TriQDefWrapper(net, bits=[32, 5, 4, 2], layers=["block1"]).eval()
    target.calibrate([x[:16]])
    blackbox = SmallCNN(width=4, num_classes=4).eval()
    default = reproduce.transfer_rows(target, data, size, 0, blackbox)
    assert list(default) == ["lavan", "gap"]
    fitted = []
    fit = PatchAttack.fit_textures

    def counting_fit(self, *args, **kwargs):
        fitted.append(1)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(PatchAttack, "fit_textures", counting_fit)
    # any order asked: measured in ATTACKS' order, each condition with its own seeds
    every = reproduce.transfer_rows(
        target, data, size, 0, blackbox, attacks=("patchattack", "dpr", "gap", "lavan")
    )
    assert list(every) == list(reproduce.ATTACKS)
    assert len(fitted) == 1  # fitted once for the call, not per condition or source
    for attack in ("lavan", "gap"):
        for cond in reproduce.CONDITIONS:
            for key in ("counts", "noise_counts", "source_bits"):
                assert every[attack][cond][key] == default[attack][cond][key], (attack, cond)
    # a dictionary passed in is used as is; the fit is seeded, so it is the same one
    textures = reproduce.patch_textures(data, 0)
    assert len(fitted) == 2
    again = reproduce.transfer_rows(target, data, size, 0, blackbox, ("patchattack",), textures)
    assert list(again) == ["patchattack"] and len(fitted) == 2
    for cond in reproduce.CONDITIONS:
        assert again["patchattack"][cond]["counts"] == every["patchattack"][cond]["counts"]


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
