"""The examples: the three-line promise, and that they run."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _code(path: Path) -> list[str]:
    """Lines after the module docstring."""
    text = path.read_text()
    end = text.index('"""', 3) + 3
    return text[end:].splitlines()


def test_train_after_adds_three_lines_and_changes_the_loss_line():
    before, after = _code(EXAMPLES / "train_before.py"), _code(EXAMPLES / "train_after.py")
    added, removed = [], []
    for line in difflib.unified_diff(before, after, n=0, lineterm=""):
        if line.startswith("+") and not line.startswith("+++"):
            added.append(line[1:].strip())
        elif line.startswith("-") and not line.startswith("---"):
            removed.append(line[1:].strip())
    assert removed == ["loss = torch.nn.functional.cross_entropy(model(x), y)"]
    assert sorted(added) == sorted(
        [
            'model = triqdef.TriQDefWrapper(model, layers=["block1", "block2"])',
            "schedule = triqdef.BACTSchedule(model, total=args.epochs)",
            "loss = model.loss(x, y)",
            "schedule.step()",
        ]
    )


def test_train_after_runs():
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "train_after.py"),
            "--epochs",
            "2",
            "--steps-per-epoch",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "epoch 1: loss" in out.stdout


def test_cifar10_example_runs_on_synthetic_input(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "cifar10.py"),
            "--synthetic",
            "--max-steps",
            "1",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "ckpt.safetensors"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "step 1 loss" in out.stdout and "milestones=(33, 67, 100)" in out.stdout
    assert (tmp_path / "ckpt.safetensors").stat().st_size > 0


def test_reproduce_example_is_the_command_lines_reproduce():
    # README's first command runs examples/reproduce.py: the same options as
    # `triqdef reproduce`, and an error in one line with exit status 2
    def run(*args):
        return subprocess.run(
            [sys.executable, str(EXAMPLES / "reproduce.py"), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )

    help_text = run("--help")
    assert help_text.returncode == 0
    for option in ("--data", "--model", "--full", "--seeds", "--methods", "--triqdef"):
        assert option in help_text.stdout
    for option in ("--train-patches", "--bn-refresh", "--split", "--out", "--merge"):
        assert option in help_text.stdout
    bad = run("--triqdef", "pairs")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "reproduce.py: error: --triqdef takes KEY=VALUE, got 'pairs'"
    ]
