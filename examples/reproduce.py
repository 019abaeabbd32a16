"""Reproduction: does TriQDef stop adversarial patches from transferring across bit-widths?

Trains every method of :mod:`triqdef.baselines` side by side on one dataset, then
measures, for each method and each attack (LAVAN, GAP), the full **source x target
transfer matrix** (:func:`triqdef.evaluate.transfer_matrix`): a patch crafted on the
model at the source bit-width, applied at every target bit-width, next to the noise
floor (uniform noise of the same size at the same places). The headline per target
bit-width is the **mean off-diagonal ASR** (cross-bit transfer); the diagonal (direct
attack) is reported separately. docs/evaluation.md states the protocol.

Conditions (patch settings; the training pool uses sizes ``pool_sizes``, regions
:data:`POOL_REGIONS`, generation at 32 bits):

- ``seen``: pool size and region, generated at 32 bits (the pool's generation
  bit-width), fresh seed: one row;
- ``unseen-bits``: pool size and region, generated at every other evaluated bit-width;
  with ``seen`` it completes the square matrix;
- ``unseen-size``: a size the pool never used, pool region, every source bit-width;
- ``unseen-region``: pool size, a region the pool never used
  (:data:`UNSEEN_REGION`), every source bit-width;
- ``blackbox``: crafted on an independently trained full-precision model of the same
  architecture (its own seed), applied at every bit-width: every cell is a transfer.

Writes ``results.json`` (per run: ``clean[method][bits]``,
``transfer[method][attack][condition]``), ``results.md`` and one heatmap per method,
attack and condition to ``--out``.

    python examples/reproduce.py                    # small default size (2 CPU cores)
    python examples/reproduce.py --full --seeds 0   # the real experiment, ~2 h per seed on a core
    python examples/reproduce.py --data cifar10 --model resnet20

``--data``: ``fashion-mnist`` (torchvision's root or Debian's
dataset-fashion-mnist), ``cifar10`` (torchvision, downloaded when online),
``digits`` (scikit-learn, always offline), ``auto`` (the first that works, in
that order, saying which). ``--split val`` evaluates on a validation split carved
from the training files (what ``examples/sweep.py`` chooses defaults on); the
default ``test`` evaluates on the test files.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

import triqdef
from triqdef.attacks import LAVAN, AdversarialPatch, OnTheFlyPatch, PatchPool, RandomPatch
from triqdef.baselines import METHODS, PER_BIT, make_method
from triqdef.data import find_fashion_mnist, iterate_minibatches, load_dataset
from triqdef.evaluate import TransferMatrix, alignment_report, clean_accuracy, transfer_matrix
from triqdef.models import SmallCNN, resnet20, resnet56

EVAL_BITS = (32, 5, 4, 2)
ATTACKS = ("lavan", "gap")
CONDITIONS = ("seen", "unseen-bits", "unseen-size", "unseen-region", "blackbox")
POOL_REGIONS = ("top", "left")  # where the training pool's patches go
UNSEEN_REGION = "bottom-right"  # disjoint from both pool regions
REFERENCE = "multibit"  # the undefended shared backbone every defence is compared with
TRAIN_PATCHES = ("pool", "onthefly", "lavan", "noise")

SIZES = {
    # training, evaluation and threat budget; patch sides in pixels
    "smoke": dict(
        train=256,
        calib=64,
        test=32,
        epochs=1,
        batch=64,
        width=4,
        pool_patches=2,
        pool_steps=2,
        lavan_steps=2,
        gap_steps=2,
        pbat_steps=1,
        pool_sizes=(6, 8),
        seen=8,
        unseen=10,
    ),
    "default": dict(
        train=8000,
        calib=512,
        test=300,
        epochs=3,
        batch=128,
        width=16,
        pool_patches=12,
        pool_steps=30,
        lavan_steps=30,
        gap_steps=40,
        pbat_steps=5,
        pool_sizes=(6, 8),
        seen=8,
        unseen=10,
    ),
    # the training files less the held-out calibration and validation images,
    # sized to finish in about 2 h per seed on one CPU core
    "full": dict(
        train=58000,
        calib=1000,
        test=1000,
        epochs=3,
        batch=128,
        width=16,
        pool_patches=32,
        pool_steps=50,
        lavan_steps=50,
        gap_steps=100,
        pbat_steps=10,
        pool_sizes=(6, 8),
        seen=8,
        unseen=10,
    ),
}


@dataclass
class Data:
    """Training images, held-out calibration images and the evaluated split (in [0, 1])."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_calib: torch.Tensor
    y_calib: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    name: str
    split: str

    def to(self, device) -> Data:
        for key in ("x_train", "y_train", "x_calib", "y_calib", "x_eval", "y_eval"):
            setattr(self, key, getattr(self, key).to(device))
        return self


def load_data(
    name: str, size: dict, seed: int, root: str | None = None, split: str = "test"
) -> Data:
    """Training, held-out calibration and evaluation images.

    The training files are permuted with ``seed`` and cut into training, calibration
    (``size["calib"]``) and validation (``size["test"]``) parts that never overlap;
    ``split="test"`` evaluates on ``size["test"]`` images of the test files instead of
    the validation part. ``auto`` takes Fashion-MNIST when its files are found, else
    CIFAR-10 when it is already downloaded, else scikit-learn's digits (saying so);
    only an explicit ``cifar10`` tries to download.
    """
    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test', got {split!r}")
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
            return _split(xs[0], ys[0], xs[1], ys[1], size, seed, "cifar10", split)
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
    return _split(xtr, ytr, xte, yte, size, seed, used, split)


def _split(xtr, ytr, xte, yte, size, seed, name, split) -> Data:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(xtr), generator=g)
    n_cal, n_val = size["calib"], size["test"]
    n_train = min(size["train"], len(xtr) - n_cal - n_val)
    if n_train < 1:
        raise ValueError(f"{name} has {len(xtr)} training images: too few for this size")
    tr, cal = perm[:n_train], perm[n_train : n_train + n_cal]
    if split == "val":
        val = perm[n_train + n_cal : n_train + n_cal + n_val]
        x_eval, y_eval = xtr[val], ytr[val]
    else:
        te = torch.randperm(len(xte), generator=g)[:n_val]
        x_eval, y_eval = xte[te], yte[te]
    return Data(xtr[tr], ytr[tr], xtr[cal], ytr[cal], x_eval, y_eval, name, split)


def make_model(kind: str, channels: int, width: int):
    """The model and the layers FDP taps (early-middle layers, never the head)."""
    if kind == "smallcnn":
        return SmallCNN(in_channels=channels, width=width), ["block1", "block2"]
    net = {"resnet20": resnet20, "resnet56": resnet56}[kind](in_channels=channels)
    return net, ["layer1", "layer2"]


def build_pool(fp_wrapper, x, y, size: dict, seed: int) -> PatchPool:
    """The paper's offline pool: LAVAN patches of every pool size, in the pool regions,
    crafted at 32 bits on the full-precision ``fp_wrapper``."""
    return PatchPool.build(
        fp_wrapper,
        [(x[:256], y[:256])],
        sizes=tuple(size["pool_sizes"]),
        n_patches=size["pool_patches"],
        regions=POOL_REGIONS,
        bits=32,
        targets=(None, 0, (int(y.max()) + 1) // 2),
        steps=size["pool_steps"],
        seed=seed,
    )


def lavan_source(wrapper, size: dict, seed: int) -> LAVAN:
    """PBAT's patch source: location-optimised LAVAN crafted on the model being trained, at
    its highest bit-width, afresh for every batch."""
    return LAVAN(
        wrapper,
        size["seen"],
        bits=max(wrapper.bits),
        steps=size["pbat_steps"],
        step_size=0.1,
        location_search=True,
        move_every=2,
        seed=seed,
    )


def training_patches(kind: str, wrapper, pool, size: dict, seed: int):
    """The patch source a TriQDef method trains on: the offline ``pool`` (the paper's
    default), ``onthefly`` (the paper's on-the-fly variant), ``lavan`` (PBAT's source:
    LAVAN on the model itself) or ``noise`` (uniform noise, the library's default when no
    patch is given, and the weakest source)."""
    if kind == "pool":
        return pool
    if kind == "lavan":
        return lavan_source(wrapper, size, seed)
    if kind == "onthefly":
        return OnTheFlyPatch(wrapper, patch_size=size["seen"], region=POOL_REGIONS[0], seed=seed)
    if kind == "noise":
        return RandomPatch(size["seen"])
    raise ValueError(f"train patches must be one of {TRAIN_PATCHES}, got {kind!r}")


def build_method(
    name: str,
    model,
    layers,
    bits,
    pool,
    size: dict,
    seed: int,
    *,
    total: int | None = None,
    calib=None,
    patches: str = "pool",
    **wrapper_kwargs,
):
    """One method of :mod:`triqdef.baselines`, configured as this experiment trains it.

    ``total``: curriculum length in iterations (the curriculum is stepped once per
    iteration; default: the number of epochs, stepped per epoch). ``calib``: held-out
    batches for the curriculum's calibration passes. ``patches``: the TriQDef methods'
    training patch source (see :func:`training_patches`). ``wrapper_kwargs`` go to the
    TriQDef methods' wrapper (e.g. ``pairs="sum"``, ``bn_rows="clean"``).
    """
    triq = name.startswith("triqdef")
    method = make_method(
        name,
        model,
        bits=bits,
        layers=layers,
        pool=pool,
        epochs=total or size["epochs"],
        seed=seed,
        calib_loader=calib,
        pbat_attack=lambda w: lavan_source(w, size, seed),
        **(wrapper_kwargs if triq else {}),
    )
    w = method.wrapper
    if name == "pbat" and w.bits[0] < 32 and calib:
        # its patches are crafted on the model at its own bit-width from the first step,
        # before any training-mode forward has set the observers: start them on held-out data
        w.calibrate(calib[:1])
    if triq and patches != "pool":
        source = training_patches(patches, method.wrapper, pool, size, seed)
        w = method.wrapper
        method.loss = lambda x, y: w.loss(x, y, patch=source)
    return method


def train(
    method,
    x,
    y,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    progress: bool,
    per_step: bool = False,
) -> float:
    """Adam over ``epochs``; the curriculum steps once per iteration when ``per_step``."""
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
            if per_step and method.schedule is not None:
                method.schedule.step()
        if not per_step and method.schedule is not None:
            method.schedule.step()
    bar.close()
    method.wrapper.eval()
    return time.monotonic() - t0


def _bar(total, desc, enabled):
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:  # the library's policy: a bar is cosmetic, never a failure
            warnings.warn(
                "progress=True needs tqdm (pip install tqdm); continuing without a progress bar",
                stacklevel=2,
            )
            enabled = False
    if not enabled:

        class _Null:
            def update(self, n=1):
                pass

            def close(self):
                pass

        return _Null()
    return tqdm(total=total, desc=desc, leave=False)


# --- evaluation ------------------------------------------------------------------------------
def _attack_factory(attack: str, side: int, region, size: dict, seed: int, on=None):
    """``make_attack(model, bits)`` for :func:`transfer_matrix`; ``on`` crafts on another
    model (the black-box source) whatever model the matrix passes."""

    def make(model, bits):
        src, b = (on, None) if on is not None else (model, bits)
        if attack == "lavan":
            return LAVAN(
                src,
                side,
                bits=b,
                steps=size["lavan_steps"],
                step_size=0.1,
                seed=seed,
                region=region,
            )
        return AdversarialPatch(
            src, side, bits=b, steps=size["gap_steps"], step_size=0.05, seed=seed, region=region
        )

    return make


def transfer_rows(target, data: Data, size: dict, seed: int, blackbox_model) -> dict:
    """``{attack: {condition: TransferMatrix.to_dict()}}`` for one trained method.

    ``target`` is a wrapper (one shared backbone) or ``{bits: wrapper}`` (one model per
    bit-width). Evaluation patches use seed ``seed + 1000``: never the pool's.
    """
    sizes = size["pool_sizes"]
    seen_side = size["seen"] if size["seen"] in sizes else max(sizes)
    others = [b for b in EVAL_BITS if b != 32]
    settings = {
        "seen": (seen_side, POOL_REGIONS[0], [32], None),
        "unseen-bits": (seen_side, POOL_REGIONS[0], others, None),
        "unseen-size": (size["unseen"], POOL_REGIONS[0], list(EVAL_BITS), None),
        "unseen-region": (seen_side, UNSEEN_REGION, list(EVAL_BITS), None),
        "blackbox": (seen_side, "any", [32], blackbox_model),
    }
    loader = [
        (data.x_eval[i : i + 500], data.y_eval[i : i + 500])
        for i in range(0, len(data.x_eval), 500)
    ]
    out: dict = {}
    for attack in ATTACKS:
        out[attack] = {}
        for k, cond in enumerate(CONDITIONS):
            side, region, sources, on = settings[cond]
            make = _attack_factory(attack, side, region, size, seed + 1000 + k, on)
            m = transfer_matrix(
                target,
                make,
                loader,
                source_bits=sources,
                target_bits=list(EVAL_BITS),
                seed=seed + 2000 + k,
            )
            out[attack][cond] = m.to_dict()
    return out


def off_diagonal(m: dict, condition: str) -> list[float | None]:
    """Mean cross-bit ASR per target: the mean over source rows ``!= target`` (every row
    for ``blackbox``, whose source is another model); ``None`` where there is none."""
    out = []
    for j, t in enumerate(m["target_bits"]):
        vals = [
            row[j]
            for s, row in zip(m["source_bits"], m["asr"])
            if (s != t or condition == "blackbox") and row[j] is not None
        ]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


def diagonal(m: dict) -> list[float | None]:
    """Direct ASR per target (source == target), ``None`` where the target is no source."""
    out = []
    for j, t in enumerate(m["target_bits"]):
        rows = [row[j] for s, row in zip(m["source_bits"], m["asr"]) if s == t]
        out.append(rows[0] if rows else None)
    return out


def _clean(target, data: Data) -> dict[str, float]:
    if isinstance(target, dict):
        return {
            str(b): clean_accuracy(w, [(data.x_eval, data.y_eval)], bits=[b])[b]
            for b, w in target.items()
        }
    acc = clean_accuracy(target, [(data.x_eval, data.y_eval)], bits=list(EVAL_BITS))
    return {str(b): a for b, a in acc.items()}


def refresh_bn(wrapper, data: Data):
    """A copy whose BatchNorm statistics (every bit-width) are re-estimated on held-out
    clean images; observers and weights untouched."""
    w = copy.deepcopy(wrapper)
    w.calibrate([data.x_calib], bits=w.bits, observers=False)
    return w.eval()


@dataclass
class Spec:
    """One trained configuration: ``label`` in the report, ``method`` of
    :mod:`triqdef.baselines`, TriQDef wrapper keywords and training patches."""

    label: str
    method: str
    kwargs: dict
    patches: str = "pool"


def run_seed(
    specs: list[Spec],
    data: Data,
    size: dict,
    seed: int,
    model_kind: str,
    device: str,
    progress: bool,
    bn_refresh: bool,
    out: Path | None = None,
    results: dict | None = None,
) -> dict:
    """Train the pool and black-box models, then every spec; returns the run's dict."""
    channels = data.x_train.shape[1]
    calib = [data.x_calib[i : i + 128] for i in range(0, len(data.x_calib), 128)]
    steps_per_epoch = math.ceil(len(data.x_train) / size["batch"])
    total = size["epochs"] * steps_per_epoch

    def fit_fp(model_seed: int):
        torch.manual_seed(model_seed)
        model, _ = make_model(model_kind, channels, size["width"])
        fp = make_method("multibit", model.to(device), bits=(32,))
        train(
            fp,
            data.x_train,
            data.y_train,
            size["epochs"],
            size["batch"],
            3e-3,
            model_seed,
            progress,
        )
        return fp.wrapper

    # the offline pool is crafted on a full-precision model trained first; the black-box
    # attacker has its own, trained the same way from another seed
    fp = fit_fp(seed)
    pool = build_pool(fp, data.x_train, data.y_train, size, seed)
    if out is not None:
        pool.save(out / f"pool-seed{seed}.safetensors")
    blackbox = fit_fp(seed + 7919)

    run = {
        "seed": seed,
        "clean": {},
        "clean_as_trained": {},
        "clean_refreshed": {},
        "transfer": {},
        "train_s": {},
    }
    for spec in specs:
        per_bit = spec.method in PER_BIT
        bit_sets = [(b,) for b in EVAL_BITS] if per_bit else [triqdef.DEFAULT_BITS]
        trained, seconds = {}, 0.0
        for bits in bit_sets:
            torch.manual_seed(seed)
            model, layers = make_model(model_kind, channels, size["width"])
            method = build_method(
                spec.method,
                model.to(device),
                layers,
                bits,
                pool,
                size,
                seed,
                total=total,
                calib=calib,
                patches=spec.patches,
                **spec.kwargs,
            )
            seconds += train(
                method,
                data.x_train,
                data.y_train,
                size["epochs"],
                size["batch"],
                3e-3,
                seed,
                progress,
                per_step=True,
            )
            w = method.wrapper
            # bit-widths training never visited (short runs of dwq-train) are calibrated
            missing = [b for b in w.bits if b not in w.calibrated_bits()]
            if missing:
                w.calibrate([data.x_calib], bits=missing)
            trained[bits[0] if per_bit else None] = w
        as_trained = trained if per_bit else trained[None]
        refreshed = (
            {b: refresh_bn(w, data) for b, w in trained.items()}
            if per_bit
            else refresh_bn(as_trained, data)
        )
        run["clean_as_trained"][spec.label] = _clean(as_trained, data)
        run["clean_refreshed"][spec.label] = _clean(refreshed, data)
        deployed = refreshed if bn_refresh else as_trained
        run["clean"][spec.label] = run["clean_refreshed" if bn_refresh else "clean_as_trained"][
            spec.label
        ]
        run["transfer"][spec.label] = transfer_rows(deployed, data, size, seed, blackbox)
        run["train_s"][spec.label] = seconds
        if not per_bit:  # how alike the bit-widths' input gradients and features are
            g = torch.Generator().manual_seed(seed + 3000)
            noise = torch.rand(channels, size["seen"], size["seen"], generator=g).to(device)
            report = alignment_report(
                deployed,
                [(data.x_eval[:200], data.y_eval[:200])],
                bits=list(EVAL_BITS),
                patch=noise,
                layers=layers,
                seed=seed + 3000,
            )
            run.setdefault("alignment", {})[spec.label] = report.to_dict()
        head = headline(run, spec.label)
        print(
            f"  [seed {seed}] {spec.label:<28} clean {run['clean'][spec.label]}  "
            f"LAVAN seen transfer {head}  ({seconds:.0f} s)",
            flush=True,
        )
        if results is not None and out is not None:
            write(results, out, partial=run)
    return run


def headline(run: dict, label: str, attack: str = "lavan", condition: str = "seen") -> str:
    vals = off_diagonal(run["transfer"][label][attack][condition], condition)
    return "/".join("n/a" if v is None else f"{100 * v:.0f}" for v in vals)


def parse_kwargs(items: list[str]) -> dict:
    """``KEY=VALUE`` pairs -> wrapper keywords (ints, floats, ``none``, strings)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        if not _:
            raise SystemExit(f"--triqdef takes KEY=VALUE, got {item!r}")
        if value.lower() == "none":
            out[key] = None
            continue
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def config(size: dict, args, specs: list[Spec], data_name: str | None) -> dict:
    return {
        **size,
        "split": args.split,
        "bn_refresh": args.bn_refresh,
        "methods": [s.label for s in specs],
        "specs": {
            s.label: {"method": s.method, "kwargs": s.kwargs, "patches": s.patches} for s in specs
        },
        "data": data_name,
        "model": args.model,
        "seeds": args.seeds,
        "eval_bits": list(EVAL_BITS),
        "pool_regions": list(POOL_REGIONS),
        "unseen_region": UNSEEN_REGION,
        "command": " ".join(sys.argv),
        "commit": _commit(),
        "hardware": (
            torch.cuda.get_device_name()
            if args.device.startswith("cuda")
            else f"{platform.processor() or platform.machine()}, "
            f"{torch.get_num_threads()} CPU threads"
        ),
        "torch": torch.__version__,
        "triqdef": triqdef.__version__,
    }


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
    p.add_argument(
        "--triqdef",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="TriQDefWrapper keywords for the TriQDef methods, e.g. pairs=sum bn_rows=clean",
    )
    p.add_argument(
        "--train-patches",
        default="pool",
        choices=TRAIN_PATCHES,
        help="training patches of the TriQDef methods (default: the offline pool)",
    )
    p.add_argument(
        "--bn-refresh",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="re-estimate BatchNorm statistics on held-out clean images after training "
        "before the attacks (default on; clean accuracy is reported both ways)",
    )
    p.add_argument(
        "--split",
        default="test",
        choices=["val", "test"],
        help="evaluate on the test files or on a validation part of the training files",
    )
    p.add_argument("--out", default="runs/reproduce")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--no-progress", action="store_true")
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
    kwargs = parse_kwargs(args.triqdef)
    specs = [
        Spec(m, m, kwargs if m.startswith("triqdef") else {}, args.train_patches)
        for m in (args.methods or METHODS)
    ]
    return run(specs, size, args)


def run(specs: list[Spec], size: dict, args) -> dict:
    """Train and evaluate ``specs`` for every seed of ``args``; writes ``args.out``."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    results = {"config": config(size, args, specs, None), "runs": []}
    for seed in args.seeds:
        data = load_data(args.data, size, seed, args.root, args.split).to(args.device)
        results["config"]["data"] = data.name
        print(
            f"[seed {seed}] {data.name}: {len(data.x_train)} train / {len(data.x_calib)} "
            f"held-out calibration / {len(data.x_eval)} {data.split}"
        )
        run_ = run_seed(
            specs,
            data,
            size,
            seed,
            args.model,
            args.device,
            not args.no_progress,
            args.bn_refresh,
            out,
            results,
        )
        results["runs"].append(run_)
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


def write(results: dict, out: Path, partial: dict | None = None) -> None:
    """``results.json`` and ``results.md``; ``partial`` is a run still in progress."""
    view = results
    if partial is not None:
        view = {"config": results["config"], "runs": [*results["runs"], partial]}
    (out / "results.json").write_text(json.dumps(view, indent=2))
    (out / "results.md").write_text(to_markdown(view))


def pooled(matrices: list[dict]) -> TransferMatrix:
    """One matrix from several seeds' matrices: successes and eligible samples summed."""
    first = TransferMatrix.from_dict(matrices[0])
    counts = [[[0, 0] for _ in first.target_bits] for _ in first.source_bits]
    noise = [[0, 0] for _ in first.target_bits]
    for m in matrices:
        for i, row in enumerate(m["counts"]):
            for j, (s, e) in enumerate(row):
                counts[i][j][0] += s
                counts[i][j][1] += e
        for j, (s, e) in enumerate(m["noise_counts"]):
            noise[j][0] += s
            noise[j][1] += e

    def rate(s, e):
        return s / e if e else float("nan")

    first.counts = [[tuple(c) for c in row] for row in counts]
    first.asr = [[rate(*c) for c in row] for row in counts]
    first.noise_counts = [tuple(c) for c in noise]
    first.noise_floor = [rate(*c) for c in noise]
    first.samples = sum(m["samples"] for m in matrices)
    return first


def heatmaps(results: dict, out: Path) -> list[Path]:
    """One PNG per method, attack and condition (counts pooled over seeds)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib not installed: no heatmaps (pip install matplotlib)")
        return []
    paths = []
    labels = list(dict.fromkeys(m for r in results["runs"] for m in r["transfer"]))
    for label in labels:
        for attack in ATTACKS:
            for cond in CONDITIONS:
                ms = [
                    r["transfer"][label][attack][cond]
                    for r in results["runs"]
                    if label in r["transfer"]
                ]
                path = out / f"transfer-{label}-{attack}-{cond}.png"
                pooled(ms).heatmap(path, title=f"{label}: {attack.upper()} {cond} ASR (%)")
                paths.append(path)
    return paths


def _stat(vals: list) -> tuple[float, float] | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return sum(vals) / len(vals), (max(vals) - min(vals)) / 2


def _fmt(stat, n: int, scale: float = 100.0, signed: bool = False) -> str:
    if stat is None:
        return "n/a"
    mean, spread = stat
    text = f"{scale * mean:+.0f}" if signed else f"{scale * mean:.1f}"
    return text + (f" ± {scale * spread:.{0 if signed else 1}f}" if n > 1 else "")


def summary(results: dict) -> dict:
    """``{label: {attack: {condition: {"transfer"|"direct"|"noise": [per target]}}}}``,
    each value a list over seeds, from the runs' matrices."""
    table: dict = {}
    for run in results["runs"]:
        for label, attacks in run["transfer"].items():
            for attack, conds in attacks.items():
                for cond, m in conds.items():
                    cell = (
                        table.setdefault(label, {})
                        .setdefault(attack, {})
                        .setdefault(cond, {"transfer": [], "direct": [], "noise": []})
                    )
                    cell["transfer"].append(off_diagonal(m, cond))
                    cell["direct"].append(diagonal(m))
                    cell["noise"].append(m["noise_floor"])
    return table


def relative(table: dict, label: str, attack: str, cond: str, j: int) -> float | None:
    """Relative change (a fraction) of ``label``'s seed-mean off-diagonal ASR at target
    index ``j`` against the reference's; ``None`` when either is missing or the reference
    is 0."""
    mine = _stat([v[j] for v in table[label][attack][cond]["transfer"]])
    ref = _stat([v[j] for v in table[REFERENCE][attack][cond]["transfer"]])
    if mine is None or ref is None or not ref[0]:
        return None
    return (mine[0] - ref[0]) / ref[0]


def to_markdown(results: dict) -> str:
    cfg = results["config"]
    runs = results["runs"]
    n = len({r["seed"] for r in runs})
    bits = cfg.get("eval_bits", list(EVAL_BITS))
    lines = [
        f"# Cross-bit transfer ({cfg['data']}, {cfg['model']}, {cfg.get('split', 'test')} split)",
        "",
        *[f"- command: `{c}`" for c in cfg.get("commands", [cfg["command"]])],
        f"- commit: {cfg.get('commit')}; seeds: {sorted({r['seed'] for r in runs})}; values are "
        "the mean over seeds ± half the range",
        f"- hardware: {cfg['hardware']}; torch {cfg['torch']}; duration (s): "
        f"{cfg.get('duration_s')}",
        f"- training: {cfg['train']} images, {cfg['epochs']} epochs, batch {cfg['batch']}, "
        f"width {cfg['width']}; evaluation: {cfg['test']} images; BatchNorm statistics "
        + (
            "re-estimated on held-out clean images before the attacks"
            if cfg.get("bn_refresh")
            else "as trained"
        ),
        f"- pool: {cfg['pool_patches']} LAVAN patches, sizes {cfg['pool_sizes']}, regions "
        f"{cfg['pool_regions']}, crafted at 32 bits on a full-precision model; threat: LAVAN "
        f"{cfg['lavan_steps']} steps, GAP {cfg['gap_steps']} steps; unseen size "
        f"{cfg['unseen']}, unseen region {cfg['unseen_region']}",
        "",
        "## Clean accuracy (%)",
        "",
        "| method | "
        + " | ".join(f"{b} bit" for b in bits)
        + " | "
        + " | ".join(f"{b} bit as trained" for b in bits)
        + " |",
        "|---" * (2 * len(bits) + 1) + "|",
    ]
    labels = list(dict.fromkeys(m for r in runs for m in r["transfer"]))
    for label in labels:
        cells = [
            _fmt(_stat([r["clean"][label].get(str(b)) for r in runs if label in r["clean"]]), n)
            for b in bits
        ]
        cells += [
            _fmt(
                _stat(
                    [
                        r["clean_as_trained"][label].get(str(b))
                        for r in runs
                        if label in r["clean_as_trained"]
                    ]
                ),
                n,
            )
            for b in bits
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = summary(results)
    if REFERENCE in table:
        ref = table[REFERENCE]["lavan"]["seen"]
        offs = [v for run in ref["transfer"] for v in run if v is not None]
        floors = [v for run in ref["noise"] for v, t in zip(run, bits) if t != 32 and v is not None]
        if offs and floors:
            asr, floor = sum(offs) / len(offs), sum(floors) / len(floors)
            ok = asr >= 0.5 and asr >= 2 * floor
            lines += [
                "",
                f"Threat calibration: the undefended `{REFERENCE}` model's mean off-diagonal seen "
                f"LAVAN ASR is {100 * asr:.1f}% against a noise floor of {100 * floor:.1f}% "
                f"({'meets' if ok else 'does NOT meet'} the bar: >= 50% and >= 2x the floor).",
            ]
    for attack in ATTACKS:
        for cond in CONDITIONS:
            lines += [
                "",
                f"## {attack.upper()}, {cond}: ASR (%) per target bit-width; lower is better",
                "",
                "| method | "
                + " | ".join(f"transfer {b}" for b in bits)
                + " | "
                + " | ".join(f"direct {b}" for b in bits)
                + " | "
                + " | ".join(f"noise {b}" for b in bits)
                + " |",
                "|---" * (3 * len(bits) + 1) + "|",
            ]
            for label in labels:
                if attack not in table.get(label, {}):
                    continue
                c = table[label][attack][cond]
                cells = [
                    _fmt(_stat([v[j] for v in c[k]]), n)
                    for k in ("transfer", "direct", "noise")
                    for j in range(len(bits))
                ]
                lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if REFERENCE in table:
        lines += [
            "",
            f"## Transfer ASR relative to `{REFERENCE}` (%; mean off-diagonal ASR; negative = "
            "lower than the undefended model)",
            "",
            "| method | attack | condition | " + " | ".join(f"{b} bit" for b in bits) + " |",
            "|---" * (len(bits) + 3) + "|",
        ]
        for label in labels:
            if label == REFERENCE:
                continue
            for attack in ATTACKS:
                for cond in CONDITIONS:
                    vals = [relative(table, label, attack, cond, j) for j in range(len(bits))]
                    lines.append(
                        f"| {label} | {attack} | {cond} | "
                        + " | ".join("n/a" if v is None else f"{100 * v:+.0f}" for v in vals)
                        + " |"
                    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
