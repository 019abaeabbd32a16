"""The accelerate example: the lines TriQDef adds, and that it runs on CPU."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("accelerate")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _code(path: Path) -> list[str]:
    """Lines after the module docstring."""
    text = path.read_text()
    return text[text.index('"""', 3) + 3 :].splitlines()


def test_the_accelerate_example_adds_only_the_triqdef_lines():
    plain = _code(EXAMPLES / "accelerate_plain.py")
    ours = _code(EXAMPLES / "accelerate_train.py")
    added, removed = [], []
    for line in difflib.unified_diff(plain, ours, n=0, lineterm=""):
        if line.startswith("+") and not line.startswith("+++"):
            added.append(line[1:].strip())
        elif line.startswith("-") and not line.startswith("---"):
            removed.append(line[1:].strip())
    assert sorted(removed) == sorted(
        [
            'parser.add_argument("--out", default="model.pt")',
            "loss = torch.nn.functional.cross_entropy(model(x), y)",
            "torch.save(accelerator.unwrap_model(model).state_dict(), args.out)",
        ]
    )
    assert sorted(added) == sorted(
        [
            'parser.add_argument("--out", default="model.safetensors")',
            'model = triqdef.TriQDefWrapper(model, layers=["block1", "block2"])',
            "schedule = triqdef.BACTSchedule(model, total=args.epochs)",
            "loss = model(x, y)",
            "schedule.step()",
            "triqdef.save(accelerator.unwrap_model(model), args.out)",
        ]
    )


def test_the_accelerate_example_runs_on_cpu_and_saves_a_loadable_wrapper(tmp_path):
    import triqdef
    import triqdef.models

    out = tmp_path / "model.safetensors"
    run = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "accelerate_train.py"),
            "--cpu",
            "--epochs",
            "1",
            "--steps-per-epoch",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
        cwd=tmp_path,
    )
    assert "epoch 0: loss" in run.stdout
    wrapper = triqdef.TriQDefWrapper(triqdef.models.SmallCNN(width=16), layers=["block1", "block2"])
    triqdef.load(wrapper, out)
    assert 8 in wrapper.calibrated_bits()
