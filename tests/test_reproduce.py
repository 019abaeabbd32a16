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
    assert {p.name for p in tmp_path.glob("*.png")} == {
        f"asr-{a}-{r}.png" for a in ("lavan", "gap") for r in ("seen", "unseen")
    }
    assert (tmp_path / "pool-seed0.safetensors").exists()
