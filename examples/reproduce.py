"""Reproduction: does TriQDef stop cross-bit patch transfer on real data?

Trains every method of :mod:`triqdef.baselines` side by side on one dataset,
then measures clean accuracy per bit-width and the attack success rate (ASR) of
LAVAN and GAP patches per bit-width, for *seen* and *unseen* patches, next to
the ASR of a random-noise patch of the same size (the floor). Writes
``results.json``, ``results.md`` and heatmap PNGs to ``--out``.

- seen: the patch size is one of the offline pool's sizes and the patch is
  crafted on the 32-bit view of the model (the pool's generation bit-width),
  then evaluated at each bit-width (transfer from 32 bits);
- unseen: a patch size the pool never used, crafted at the evaluated
  bit-width itself (a generation bit-width the pool never used, except 32).

    python examples/reproduce.py                    # small default size (<= 10 min, 2 CPU cores)
    python examples/reproduce.py --full --seeds 0   # the real experiment, ~2 h per seed on a core
    python examples/reproduce.py --data cifar10 --model resnet20

``--data``: ``fashion-mnist`` (torchvision's root or Debian's
dataset-fashion-mnist), ``cifar10`` (torchvision, downloaded when online),
``digits`` (scikit-learn, always offline), ``auto`` (the first that works, in
that order, saying which).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

import triqdef
from triqdef.attacks import LAVAN, AdversarialPatch, PatchPool, apply_patch
from triqdef.baselines import METHODS, make_method
from triqdef.data import find_fashion_mnist, iterate_minibatches, load_dataset
from triqdef.evaluate import attack_success_rate, clean_accuracy
from triqdef.models import SmallCNN, resnet20, resnet56

EVAL_BITS = (32, 5, 4, 2)
SIZES = {
    # training, evaluation and threat budget; seen/unseen are patch sides in pixels
    "smoke": dict(
        train=256,
        test=32,
        epochs=1,
        batch=64,
        width=4,
        pool_patches=2,
        pool_steps=2,
        lavan_steps=2,
        gap_steps=2,
        pbat_steps=1,
        seen=8,
        unseen=10,
    ),
    "default": dict(
        train=8000,
        test=300,
        epochs=3,
        batch=128,
        width=16,
        pool_patches=12,
        pool_steps=30,
        lavan_steps=30,
        gap_steps=40,
        pbat_steps=5,
        seen=8,
        unseen=10,
    ),
    # the whole training set, sized to finish in about 2 h per seed on one CPU core
    "full": dict(
        train=60000,
        test=1000,
        epochs=3,
        batch=128,
        width=16,
        pool_patches=32,
        pool_steps=50,
        lavan_steps=50,
        gap_steps=100,
        pbat_steps=10,
        seen=8,
        unseen=10,
    ),
}


def load_data(name: str, size: dict, seed: int, root: str | None = None):
    """(x_train, y_train, x_test, y_test, name_used): images in [0, 1].

    ``auto`` takes Fashion-MNIST when its files are found, else CIFAR-10 when it
    is already downloaded, else scikit-learn's digits (saying so); only an
    explicit ``cifar10`` tries to download.
    """
    if name == "auto" and find_fashion_mnist(root) is not None:
        name = "fashion-mnist"
    if name in ("cifar10", "auto"):
        try:
            import torchvision

            cifar_root = root or str(Path(torch.hub.get_dir()).parent / "datasets")
            sets = [
                torchvision.datasets.CIFAR10(cifar_root, train=t, download=name == "cifar10")
                for t in (True, False)
            ]
            xs = [torch.tensor(s.data).permute(0, 3, 1, 2).float() / 255 for s in sets]
            ys = [torch.tensor(s.targets) for s in sets]
            return (*_subset(xs[0], ys[0], xs[1], ys[1], size, seed), "cifar10")
        except Exception as exc:  # offline, not downloaded, or torchvision missing
            if name == "cifar10":
                print(f"CIFAR-10 unavailable ({type(exc).__name__}: {exc})")
            name = "auto"
    xtr, ytr, used = load_dataset(name, train=True, root=root)
    xte, yte, _ = load_dataset(used, train=False, root=root)
    if used == "digits":
        print(
            "Fashion-MNIST and CIFAR-10 not found (and no network): using scikit-learn's "
            "digits, upscaled to 28x28"
        )
    return (*_subset(xtr, ytr, xte, yte, size, seed), used)


def _subset(xtr, ytr, xte, yte, size, seed):
    g = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(xtr), generator=g)[: size["train"]]
    te = torch.randperm(len(xte), generator=g)[: size["test"]]
    return xtr[tr], ytr[tr], xte[te], yte[te]


def make_model(kind: str, channels: int, width: int):
    """The model and the layers FDP taps (early-middle layers, never the head)."""
    if kind == "smallcnn":
        return SmallCNN(in_channels=channels, width=width), ["block1", "block2"]
    net = {"resnet20": resnet20, "resnet56": resnet56}[kind](in_channels=channels)
    return net, ["layer1", "layer2"]


def build_pool(fp_wrapper, x, y, size: dict, seed: int) -> PatchPool:
    """The offline pool: LAVAN patches of the seen size crafted at 32 bits on ``fp_wrapper``."""
    return PatchPool.build(
        fp_wrapper,
        [(x[:256], y[:256])],
        sizes=(size["seen"],),
        n_patches=size["pool_patches"],
        bits=32,
        targets=(None, 0, (int(y.max()) + 1) // 2),
        steps=size["pool_steps"],
        seed=seed,
    )


def build_method(name: str, model, layers, bits, pool, size: dict, seed: int):
    """One method of :mod:`triqdef.baselines`, configured as this experiment trains it."""
    return make_method(
        name,
        model,
        bits=bits,
        layers=layers,
        pool=pool,
        epochs=size["epochs"],
        seed=seed,
        pbat_attack=lambda w: LAVAN(
            w,
            size["seen"],
            bits=32,
            steps=size["pbat_steps"],
            step_size=0.1,
            location_search=True,
            move_every=2,
            seed=seed,
        ),
    )


def train(method, x, y, epochs: int, batch: int, lr: float, seed: int, progress: bool) -> float:
    opt = torch.optim.Adam(method.wrapper.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(x) / batch)
    bar = _bar(epochs * steps_per_epoch, f"train {method.name}", progress)
    t0 = time.monotonic()
    method.wrapper.train()
    for _ in range(epochs):
        for xb, yb in iterate_minibatches(x, y, batch, generator=gen):
            loss = method.loss(xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bar.update(1)
        if method.schedule is not None:
            method.schedule.step()
    bar.close()
    return time.monotonic() - t0


def _bar(total, desc, enabled):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        enabled = False
    if not enabled:

        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, desc=desc, leave=False)


def asr_rows(wrapper, x, y, size, bits_list, seed, fp_wrapper) -> dict:
    """ASR of LAVAN and GAP per evaluated bit-width, seen and unseen, with noise floors.

    Seen patches are crafted on the model's own 32-bit view; a single-bit QAT
    model has none, so its seen patches come from the full-precision model the
    pool was crafted on (a transfer attack, as in the paper's table 1).
    """
    out = {}
    for attack_name in ("lavan", "gap"):
        for regime in ("seen", "unseen"):
            side = size["seen"] if regime == "seen" else size["unseen"]
            for b in bits_list:
                src = 32 if regime == "seen" else b
                source = wrapper if src in wrapper.bits else fp_wrapper
                if attack_name == "lavan":
                    attack = LAVAN(
                        source, side, bits=src, steps=size["lavan_steps"], step_size=0.1, seed=seed
                    )
                else:
                    attack = AdversarialPatch(
                        source, side, bits=src, steps=size["gap_steps"], step_size=0.05, seed=seed
                    )
                x_adv = attack(x, y)
                g = torch.Generator().manual_seed(seed)
                noise_patch = torch.rand(attack.patch.shape, generator=g).to(x.device)
                noise = apply_patch(x, noise_patch, attack.locations)
                s, n = attack_success_rate(wrapper, x, x_adv, y, bits=b)
                sn, nn_ = attack_success_rate(wrapper, x, noise, y, bits=b)
                # no eligible sample (nothing classified correctly): None, "n/a" in tables
                out[f"{attack_name}/{regime}/{b}"] = s / n if n else None
                out[f"noise/{attack_name}/{regime}/{b}"] = sn / nn_ if nn_ else None
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="auto", choices=["auto", "fashion-mnist", "cifar10", "digits"])
    p.add_argument("--model", default="smallcnn", choices=["smallcnn", "resnet20", "resnet56"])
    p.add_argument(
        "--full", action="store_true", help="the real experiment (~2 h per seed, 1 CPU core)"
    )
    p.add_argument("--size", choices=list(SIZES), default=None, help=argparse.SUPPRESS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--calibrate",
        type=int,
        default=0,
        metavar="N",
        help="re-estimate observers and BatchNorm statistics below 32 bits on N training "
        "images after training (default 0: evaluate as trained)",
    )
    p.add_argument("--root", default=None, help="directory searched first for the data files")
    p.add_argument("--device", default="cpu", help="e.g. cuda")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="combine results.json files (e.g. one per seed) into --out; no training",
    )
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out))

    size = dict(SIZES[args.size or ("full" if args.full else "default")])
    for key, val in (("epochs", args.epochs), ("train", args.train_size), ("test", args.test_size)):
        if val is not None:
            size[key] = val
    methods = tuple(args.methods or METHODS)
    progress = not args.no_progress
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    results = {
        "config": {
            **size,
            "calibrate": args.calibrate,
            "methods": methods,
            "data": None,
            "model": args.model,
            "seeds": args.seeds,
            "command": " ".join(sys.argv),
            "hardware": (
                torch.cuda.get_device_name()
                if args.device.startswith("cuda")
                else f"{platform.processor() or platform.machine()}, "
                f"{torch.get_num_threads()} CPU threads"
            ),
            "torch": torch.__version__,
            "triqdef": triqdef.__version__,
        },
        "runs": [],
    }
    for seed in args.seeds:
        xtr, ytr, xte, yte, data_name = load_data(args.data, size, seed, args.root)
        xtr, ytr, xte, yte = (t.to(args.device) for t in (xtr, ytr, xte, yte))
        results["config"]["data"] = data_name
        channels = xtr.shape[1]
        print(
            f"[seed {seed}] {data_name}: {len(xtr)} train / {len(xte)} test, {tuple(xtr.shape[1:])}"
        )

        # the offline pool is crafted on a full-precision model trained first
        torch.manual_seed(seed)
        fp_model, layers = make_model(args.model, channels, size["width"])
        fp_model.to(args.device)
        fp = make_method("multibit", fp_model, bits=(32,))
        train(fp, xtr, ytr, size["epochs"], size["batch"], 3e-3, seed, progress)
        pool = build_pool(fp.wrapper, xtr, ytr, size, seed)
        pool.save(out / f"pool-seed{seed}.safetensors")

        for name in methods:
            torch.manual_seed(seed)
            bit_sets = [(b,) for b in EVAL_BITS] if name == "qat" else [triqdef.DEFAULT_BITS]
            row = {"seed": seed, "method": name, "clean": {}, "asr": {}, "train_s": 0.0}
            for bits in bit_sets:
                torch.manual_seed(seed)
                model, layers = make_model(args.model, channels, size["width"])
                model.to(args.device)
                method = build_method(name, model, layers, bits, pool, size, seed)
                row["train_s"] += train(
                    method, xtr, ytr, size["epochs"], size["batch"], 3e-3, seed, progress
                )
                # evaluate as trained: the weights are adapted to the observers' moving
                # averages; re-estimating them moves 2-bit accuracy both ways (docs/concepts.md);
                # bit-widths training never visited (tiny runs of dwq) must be calibrated
                ready = method.wrapper.calibrated_bits()
                redo = [b for b in bits if b < 32 and (args.calibrate or b not in ready)]
                if redo:
                    method.wrapper.calibrate([xtr[: args.calibrate or 256]], bits=redo)
                eval_bits = [b for b in EVAL_BITS if b in bits]
                acc = clean_accuracy(method.wrapper, [(xte, yte)], bits=eval_bits)
                row["clean"].update({str(b): a for b, a in acc.items()})
                row["asr"].update(
                    asr_rows(method.wrapper, xte, yte, size, eval_bits, seed, fp.wrapper)
                )
            results["runs"].append(row)
            print(f"  {name:<16} clean {row['clean']}  ({row['train_s']:.0f} s)")
            write(results, out)
    results["config"]["duration_s"] = time.monotonic() - t_start
    write(results, out)
    heatmaps(results, out)
    print(f"wrote {out}/results.md and results.json in {results['config']['duration_s']:.0f} s")
    return results


def merge(paths: list[str], out: Path) -> dict:
    """Combine several results files (same configuration, other seeds) into one report."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    merged = {"config": dict(parts[0]["config"]), "runs": []}
    for part in parts:
        merged["runs"].extend(part["runs"])
    merged["config"]["seeds"] = sorted({r["seed"] for r in merged["runs"]})
    merged["config"]["duration_s"] = [p["config"].get("duration_s") for p in parts]
    merged["config"]["commands"] = [p["config"]["command"] for p in parts]
    out.mkdir(parents=True, exist_ok=True)
    write(merged, out)
    heatmaps(merged, out)
    return merged


def write(results: dict, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(to_markdown(results))


def heatmaps(results: dict, out: Path) -> list[Path]:
    """One PNG per attack and regime: methods x bit-widths, mean ASR over seeds."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib not installed: no heatmaps (pip install matplotlib)")
        return []
    methods = list(dict.fromkeys(r["method"] for r in results["runs"]))
    paths = []
    for attack in ("lavan", "gap"):
        for regime in ("seen", "unseen"):
            grid = []
            for m in methods:
                row = []
                for b in EVAL_BITS:
                    vals = [
                        r["asr"].get(f"{attack}/{regime}/{b}")
                        for r in results["runs"]
                        if r["method"] == m
                    ]
                    vals = [v for v in vals if v is not None and v == v]
                    row.append(100 * sum(vals) / len(vals) if vals else float("nan"))
                grid.append(row)
            fig = Figure(figsize=(1.2 * len(EVAL_BITS) + 2.5, 0.45 * len(methods) + 1.2))
            ax = fig.subplots()
            im = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
            ax.set_xticks(range(len(EVAL_BITS)), [f"{b} bit" for b in EVAL_BITS])
            ax.set_yticks(range(len(methods)), methods)
            for i, row in enumerate(grid):
                for j, v in enumerate(row):
                    if v == v:
                        ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w", fontsize=8)
            ax.set_title(f"{attack.upper()} ASR (%), {regime} patches")
            fig.colorbar(im, ax=ax)
            fig.tight_layout()
            path = out / f"asr-{attack}-{regime}.png"
            fig.savefig(path, dpi=110)
            paths.append(path)
    return paths


def to_markdown(results: dict) -> str:
    cfg = results["config"]
    lines = [
        f"# Reproduction ({cfg['data']}, {cfg['model']})",
        "",
        *[f"- command: `{c}`" for c in cfg.get("commands", [cfg["command"]])],
        f"- seeds: {cfg['seeds']}; values are the mean over seeds ± half the range",
        f"- hardware: {cfg['hardware']}; torch {cfg['torch']}; duration (s): "
        f"{cfg.get('duration_s')}",
        f"- training: {cfg['train']} images, {cfg['epochs']} epochs, batch {cfg['batch']}, "
        f"width {cfg['width']}; evaluation: {cfg['test']} test images, "
        + (
            f"observers and BatchNorm statistics re-estimated on {cfg['calibrate']} training "
            "images after training"
            if cfg.get("calibrate")
            else "models as trained"
        ),
        f"- threat: seen patches {cfg['seen']}x{cfg['seen']} crafted at 32 bits, unseen "
        f"{cfg['unseen']}x{cfg['unseen']} crafted at the evaluated bit-width; LAVAN "
        f"{cfg['lavan_steps']} steps, GAP {cfg['gap_steps']} steps; pool of "
        f"{cfg['pool_patches']} patches",
        "",
    ]
    by_method: dict[str, list] = {}
    for run in results["runs"]:
        by_method.setdefault(run["method"], []).append(run)
    head = "| method | " + " | ".join(f"{b} bit" for b in EVAL_BITS) + " |"
    sep = "|---" * (len(EVAL_BITS) + 1) + "|"

    def cell(runs, key, group):
        vals = [r[group][key] for r in runs if r[group].get(key) is not None]
        if not vals:
            return "n/a"
        mean = sum(vals) / len(vals)
        spread = (max(vals) - min(vals)) / 2
        return f"{100 * mean:.1f}" + (f" ± {100 * spread:.1f}" if len(vals) > 1 else "")

    lines += ["## Clean accuracy (%)", "", head, sep]
    for name, runs in by_method.items():
        lines.append(
            f"| {name} | " + " | ".join(cell(runs, str(b), "clean") for b in EVAL_BITS) + " |"
        )
    for attack in ("lavan", "gap"):
        for regime in ("seen", "unseen"):
            lines += [
                "",
                f"## {attack.upper()} ASR, {regime} patches (%; lower is better)",
                "",
                head,
                sep,
            ]
            for name, runs in by_method.items():
                lines.append(
                    f"| {name} | "
                    + " | ".join(cell(runs, f"{attack}/{regime}/{b}", "asr") for b in EVAL_BITS)
                    + " |"
                )
                lines.append(
                    f"| {name} (noise floor) | "
                    + " | ".join(
                        cell(runs, f"noise/{attack}/{regime}/{b}", "asr") for b in EVAL_BITS
                    )
                    + " |"
                )
    if REFERENCE in by_method:
        lines += relative_section(by_method)
    return "\n".join(lines) + "\n"


REFERENCE = "multibit"  # the undefended shared backbone every defence is compared with


def _mean(runs, group, key):
    vals = [r[group][key] for r in runs if r[group].get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def relative_change(runs, ref_runs, key: str) -> float | None:
    """Relative change (%) of a method's mean ASR against the reference's mean ASR."""
    mine, ref = _mean(runs, "asr", key), _mean(ref_runs, "asr", key)
    if mine is None or not ref:
        return None
    return 100 * (mine - ref) / ref


def relative_section(by_method: dict) -> list[str]:
    """ASR of every method relative to the undefended multi-bit model (negative = lower).

    The paper states its claim this way ("more than 40% lower ASR on unseen patch
    and bit-width combinations"), so the claim can be read off directly.
    """
    ref = by_method[REFERENCE]
    cols = [(a, r, b) for a in ("lavan", "gap") for r in ("seen", "unseen") for b in EVAL_BITS]
    head = "| method | " + " | ".join(f"{a.upper()} {r} {b}" for a, r, b in cols) + " |"
    lines = [
        "",
        f"## ASR relative to `{REFERENCE}` (%; negative = lower ASR than the undefended model)",
        "",
        head,
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, runs in by_method.items():
        if name == REFERENCE:
            continue
        vals = [relative_change(runs, ref, f"{a}/{r}/{b}") for a, r, b in cols]
        lines.append(
            f"| {name} | " + " | ".join("n/a" if v is None else f"{v:+.0f}" for v in vals) + " |"
        )
    return lines


if __name__ == "__main__":
    main()
