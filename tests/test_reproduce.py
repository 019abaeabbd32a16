"""The reproduction script at its smoke size: it runs and its results files are complete."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from triqdef.baselines import METHODS

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "reproduce.py"


def _load():
    spec = importlib.util.spec_from_file_location("reproduce", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_writes_every_method_and_bit_width(tmp_path):
    reproduce = _load()
    reproduce.main(["--size", "smoke", "--data", "digits", "--out", str(tmp_path), "--no-progress"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in results["runs"]} == set(METHODS)
    assert results["config"]["data"] == "digits"
    for run in results["runs"]:
        assert set(run["clean"]) == {"32", "5", "4", "2"}, run["method"]
        for attack in ("lavan", "gap"):
            for regime in ("seen", "unseen"):
                for b in (32, 5, 4, 2):
                    v = run["asr"][f"{attack}/{regime}/{b}"]
                    assert v is None or 0.0 <= v <= 1.0
                    assert f"noise/{attack}/{regime}/{b}" in run["asr"]
    md = (tmp_path / "results.md").read_text()
    for name in METHODS:
        assert f"| {name} |" in md
    assert "## ASR relative to `multibit`" in md
    assert results["config"]["calibrate"] == 0 and "models as trained" in md
    assert {p.name for p in tmp_path.glob("*.png")} == {
        f"asr-{a}-{r}.png" for a in ("lavan", "gap") for r in ("seen", "unseen")
    }
    assert (tmp_path / "pool-seed0.safetensors").exists()


def test_relative_change_against_the_multibit_model():
    reproduce = _load()

    def run(method, seed, lavan):
        return {"method": method, "seed": seed, "clean": {}, "asr": {"lavan/unseen/2": lavan}}

    ref = [run("multibit", 0, 0.8), run("multibit", 1, 0.6)]  # mean 0.7
    mine = [run("triqdef", 0, 0.4), run("triqdef", 1, 0.3)]  # mean 0.35
    assert reproduce.relative_change(mine, ref, "lavan/unseen/2") == -50.0
    assert reproduce.relative_change(mine, ref, "gap/seen/32") is None  # not measured
    zero = [run("multibit", 0, 0.0)]
    assert reproduce.relative_change(mine, zero, "lavan/unseen/2") is None  # no reference ASR
    section = "\n".join(reproduce.relative_section({"multibit": ref, "triqdef": mine}))
    row = next(line for line in section.splitlines() if line.startswith("| triqdef |"))
    cells = [c.strip() for c in row.strip("|").split("|")][1:]
    assert len(cells) == 16 and cells.count("-50") == 1 and cells.count("n/a") == 15


def test_recalibration_check_runs_and_reports_four_states():
    spec = importlib.util.spec_from_file_location(
        "recalibration", SCRIPT.with_name("recalibration.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(["--size", "smoke", "--data", "digits"])
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
