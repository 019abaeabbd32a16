"""Sweep: which TriQDef settings stop cross-bit patch transfer? (chosen on validation data)

Trains the undefended multi-bit backbone and one TriQDef model per setting, each
changed in one respect from the library's defaults, and measures them with the
reproduction's protocol (``triqdef reproduce``, code in ``triqdef/reproduce.py``:
transfer matrices per attack and condition, clean accuracy as trained and after a
BatchNorm refresh). It evaluates on a **validation split carved from the training
files** (``--split val``), never on the test files that docs/results.md reports, so
choosing defaults from it is fair.

    python examples/sweep.py --seeds 0 --out runs/sweep-s0      # one process per seed
    python examples/sweep.py --seeds 1 --out runs/sweep-s1
    python examples/reproduce.py --merge runs/sweep-s*/results.json --out runs/sweep
    python examples/sweep.py --summarize runs/sweep-s*/results.json   # the compact table

The settings (``SETTINGS``): the paper's pair sum instead of the mean (20x the
penalty at 5 bits), BatchNorm statistics from clean rows only, the raw input quantized
at the active bit-width (``input_bits=None``), on-the-fly and uniform-noise training
patches instead of the offline pool, the exact penalty over every pair
(``penalty_bits=None``; the default samples 2 bit-widths per step), the TRS/GAL-style
gradient-diversity penalties (``lambda_cos``, ``lambda_smooth``), learned step sizes
(``quantizer="lsq"``) and the DVERGE-style term (``lambda_dverge``). PBAT (per bit-width and
on the shared backbone) runs beside them as the baseline to beat. ``--attacks`` picks the
threat's attacks as for ``triqdef reproduce`` (default ``lavan gap``); ``--summarize``
shows the attacks each file holds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import triqdef.reproduce as R

#: column titles of the attacks (the others are upper-cased)
TITLES = {"patchattack": "PatchAttack"}

#: label -> (method, TriQDefWrapper keywords, training patches)
SETTINGS: dict[str, tuple[str, dict, str]] = {
    "multibit": ("multibit", {}, "pool"),
    "pbat": ("pbat", {}, "pool"),  # the strongest baseline to beat, per bit-width
    "pbat-shared": ("pbat-shared", {}, "pool"),
    "triqdef": ("triqdef", {}, "pool"),
    # the control: the same curriculum and pool patches, no penalty (patch augmentation only)
    "triqdef[no-penalties]": ("triqdef", {"lambda_fdp": 0.0, "lambda_gpdp": 0.0}, "pool"),
    "triqdef[pairs=sum]": ("triqdef", {"pairs": "sum"}, "pool"),
    "triqdef[bn_rows=clean]": ("triqdef", {"bn_rows": "clean"}, "pool"),
    "triqdef[input_bits=None]": ("triqdef", {"input_bits": None}, "pool"),
    "triqdef[penalty_bits=None]": ("triqdef", {"penalty_bits": None}, "pool"),
    "triqdef[patches=onthefly]": ("triqdef", {}, "onthefly"),
    "triqdef[patches=noise]": ("triqdef", {}, "noise"),
    # PBAT's patches (LAVAN on the model itself) with TriQDef's penalties on top
    "triqdef[patches=lavan]": ("triqdef", {}, "lavan"),
    # lambda_smooth: the mean squared input-gradient norm is ~1.8 for an untrained
    # SmallCNN(width=16) on Fashion-MNIST (CE ~2.5 per term): 0.5 puts it at ~0.2 of
    # clean + adv at initialisation (docs/objective.md)
    "triqdef[trs]": ("triqdef", {"lambda_cos": 1.0, "lambda_smooth": 0.5}, "pool"),
    "triqdef[cos]": ("triqdef", {"lambda_cos": 1.0}, "pool"),
    "triqdef[quantizer=lsq]": ("triqdef", {"quantizer": "lsq"}, "pool"),
    "triqdef[dverge]": ("triqdef", {"lambda_dverge": 1.0}, "pool"),
}


def compact(results: dict) -> str:
    """One row per setting: mean clean accuracy, the mean cosine of the bit-widths' input
    gradients (on noise-patched images, over pairs), and, per attack and condition, the mean
    over target bit-widths of the off-diagonal transfer ASR (± half the range over seeds),
    with its change relative to ``multibit`` in brackets."""
    runs = results["runs"]
    labels = list(dict.fromkeys(m for r in runs for m in r["transfer"]))
    cols = [(a, c) for a in R.attacks_in(results) for c in R.CONDITIONS]

    def per_seed(label, attack, cond):
        vals = []
        for r in runs:
            if cond not in r["transfer"].get(label, {}).get(attack, {}):
                continue
            off = R.off_diagonal(r["transfer"][label][attack][cond], cond)
            off = [v for v in off if v is not None]
            vals.append(sum(off) / len(off) if off else None)
        return [v for v in vals if v is not None]

    def clean(label, key):
        vals = [sum(r[key][label].values()) / len(r[key][label]) for r in runs if label in r[key]]
        return vals

    def fmt(vals, ref=None):
        if not vals:
            return "n/a"
        mean = sum(vals) / len(vals)
        text = f"{100 * mean:.1f}"
        if len(vals) > 1:
            text += f" ± {100 * (max(vals) - min(vals)) / 2:.1f}"
        if ref:
            text += f" ({100 * (mean - ref) / ref:+.0f}%)"
        return text

    def grad_cos(label):
        vals = []
        for r in runs:
            rep = r.get("alignment", {}).get(label)
            if rep is not None:
                cos = [v for v in rep["values"]["input_grad"]["cosine"] if v is not None]
                vals.append(sum(cos) / len(cos))
        return vals

    head = ["setting", "clean (mean over bits)", "clean, as trained", "input-grad cosine"]
    head += [f"{TITLES.get(a, a.upper())} {c}" for a, c in cols]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for label in labels:
        cos = grad_cos(label)
        cells = [label, fmt(clean(label, "clean")), fmt(clean(label, "clean_as_trained"))]
        cells.append(
            f"{sum(cos) / len(cos):.3f}" if cos else "n/a"
        )  # mean over bit-width pairs and seeds
        for a, c in cols:
            ref_vals = per_seed(R.REFERENCE, a, c) if label != R.REFERENCE else []
            ref = sum(ref_vals) / len(ref_vals) if ref_vals else None
            cells.append(fmt(per_seed(label, a, c), ref))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ratios(results: dict) -> str:
    """Direct vs cross-bit ASR on the square matrices (``unseen-size``, ``unseen-region``):
    a defence that stops *transfer* lowers ``transfer / direct``; one that only makes the
    model harder to attack lowers both and leaves the ratio."""
    runs = results["runs"]
    labels = list(dict.fromkeys(m for r in runs for m in r["transfer"]))
    lines = [
        "| setting | attack | condition | direct | transfer | transfer / direct |",
        "|---|---|---|---|---|---|",
    ]
    for label in labels:
        for attack in R.attacks_in(results):
            for cond in ("unseen-size", "unseen-region"):
                direct, cross = [], []
                for r in runs:
                    if cond not in r["transfer"].get(label, {}).get(attack, {}):
                        continue
                    m = r["transfer"][label][attack][cond]
                    d = [v for v in R.diagonal(m) if v is not None]
                    o = [v for v in R.off_diagonal(m, cond) if v is not None]
                    if d and o:
                        direct.append(sum(d) / len(d))
                        cross.append(sum(o) / len(o))
                if not direct:
                    continue
                dm, cm = sum(direct) / len(direct), sum(cross) / len(cross)
                ratio = f"{cm / dm:.2f}" if dm else "n/a"
                lines.append(
                    f"| {label} | {attack} | {cond} | {100 * dm:.1f} | {100 * cm:.1f} | {ratio} |"
                )
    return "\n".join(lines) + "\n"


def combine(specs: list[str]) -> dict:
    """One results dict from several sweep rounds: the runs of one seed become one run.

    Each spec is ``PATH`` or ``PATH:OLD=NEW,...`` (rename settings of that file first).
    A setting measured in several files keeps every key it has anywhere, later files
    winning (e.g. a later round adds the alignment report to an earlier setting).
    """
    runs: dict[int, dict] = {}
    configs = []
    for spec in specs:
        path, _, renames = spec.partition(":")
        mapping = dict(r.split("=", 1) for r in renames.split(",") if r)
        part = json.loads(Path(path).read_text())
        configs.append(part["config"])
        for run in part["runs"]:
            merged = runs.setdefault(run["seed"], {"seed": run["seed"]})
            for key, value in run.items():
                if not isinstance(value, dict):
                    continue
                for label, entry in value.items():
                    merged.setdefault(key, {})[mapping.get(label, label)] = entry
    config = dict(configs[0])
    config["rounds"] = [
        {"commit": c.get("commit"), "command": c["command"], "duration_s": c.get("duration_s")}
        for c in configs
    ]
    return {"config": config, "runs": [runs[s] for s in sorted(runs)]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="auto", choices=R.DATA_NAMES)
    p.add_argument("--model", default="smallcnn", choices=R.MODELS)
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
    p.add_argument(
        "--attacks",
        nargs="+",
        default=None,
        choices=[*R.ATTACKS, "all"],
        metavar="ATTACK",
        help="attacks of the threat, as for triqdef reproduce (default: lavan gap)",
    )
    p.add_argument("--split", default="val", choices=["val", "test"])
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--root", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--summarize",
        nargs="+",
        default=None,
        metavar="JSON",
        help="print the compact and direct-vs-transfer tables of results.json files (seeds "
        "merged); no run",
    )
    p.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="PATH[:OLD=NEW,...]",
        help="write one results.json to --out from several rounds' files; no run",
    )
    args = p.parse_args(argv)
    if args.combine:
        combined = combine(args.combine)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "results.json").write_text(json.dumps(combined, indent=2))
        return combined
    if args.summarize:
        runs = [r for path in args.summarize for r in json.loads(Path(path).read_text())["runs"]]
        print(compact({"runs": runs}))
        print(ratios({"runs": runs}), end="")
        return {"runs": runs}
    # what reproduce.run reads from its own arguments
    args.bn_refresh = True
    torch.set_num_threads(max(1, torch.get_num_threads()))
    labels = args.only or list(SETTINGS)
    specs = [R.Spec(label, *SETTINGS[label]) for label in labels]
    return R.run(specs, dict(R.SIZES[args.size]), args)


if __name__ == "__main__":
    main()
