"""Sweep: which TriQDef settings stop cross-bit patch transfer? (chosen on validation data)

Trains the undefended multi-bit backbone and one TriQDef model per setting, each
changed in one respect from the library's defaults, and measures them with the
reproduction's protocol (``examples/reproduce.py``: transfer matrices per attack and
condition, clean accuracy as trained and after a BatchNorm refresh). It evaluates on a
**validation split carved from the training files** (``--split val``), never on the
test files that docs/results.md reports, so choosing defaults from it is fair.

    python examples/sweep.py --seeds 0 --out runs/sweep-s0      # one process per seed
    python examples/sweep.py --seeds 1 --out runs/sweep-s1
    python examples/reproduce.py --merge runs/sweep-s*/results.json --out runs/sweep

The settings (``SETTINGS``): the paper's pair sum instead of the mean (20x the
penalty at 5 bits), BatchNorm statistics from clean rows only, the raw input quantized
at the active bit-width (``input_bits=None``), on-the-fly and uniform-noise training
patches instead of the offline pool, and the sampled penalty (``penalty_bits=2``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reproduce as R  # noqa: E402

#: label -> (method, TriQDefWrapper keywords, training patches)
SETTINGS: dict[str, tuple[str, dict, str]] = {
    "multibit": ("multibit", {}, "pool"),
    "triqdef": ("triqdef", {}, "pool"),
    "triqdef[pairs=sum]": ("triqdef", {"pairs": "sum"}, "pool"),
    "triqdef[bn_rows=clean]": ("triqdef", {"bn_rows": "clean"}, "pool"),
    "triqdef[input_bits=None]": ("triqdef", {"input_bits": None}, "pool"),
    "triqdef[penalty_bits=2]": ("triqdef", {"penalty_bits": 2}, "pool"),
    "triqdef[patches=onthefly]": ("triqdef", {}, "onthefly"),
    "triqdef[patches=noise]": ("triqdef", {}, "noise"),
}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="auto", choices=["auto", "fashion-mnist", "cifar10", "digits"])
    p.add_argument("--model", default="smallcnn", choices=["smallcnn", "resnet20", "resnet56"])
    p.add_argument("--size", default="default", choices=list(R.SIZES))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=list(SETTINGS),
        metavar="LABEL",
        help="run these settings only (default: all)",
    )
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--root", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    # what reproduce.run reads from its own arguments
    args.bn_refresh = True
    torch.set_num_threads(max(1, torch.get_num_threads()))
    labels = args.only or list(SETTINGS)
    specs = [R.Spec(label, *SETTINGS[label]) for label in labels]
    return R.run(specs, dict(R.SIZES[args.size]), args)


if __name__ == "__main__":
    main()
