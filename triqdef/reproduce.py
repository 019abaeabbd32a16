"""The reproduction: does TriQDef stop adversarial patches from transferring across bit-widths?

Trains every method of [`triqdef.baselines`][triqdef.baselines] side by side on one
dataset, then measures, for each method and each attack (``--attacks``; default LAVAN
and GAP, see [`ATTACKS`][triqdef.reproduce.ATTACKS]), the full
**source x target transfer matrix**
([`transfer_matrix`][triqdef.evaluate.transfer_matrix]): a patch crafted on the model
at the source bit-width, applied at every target bit-width, next to the noise floor
(uniform noise of the same size at the same places). The headline per target
bit-width is the **mean off-diagonal ASR** (cross-bit transfer); the diagonal (direct
attack) is reported separately. docs/evaluation.md states the protocol.

Conditions (patch settings; the training pool uses sizes ``pool_sizes``, regions
[`POOL_REGIONS`][triqdef.reproduce.POOL_REGIONS], generation at 32 bits):

- ``seen``: pool size and region, generated at 32 bits (the pool's generation
  bit-width), fresh seed: one row;
- ``unseen-bits``: pool size and region, generated at every other evaluated bit-width;
  with ``seen`` it completes the square matrix;
- ``unseen-size``: a size the pool never used, pool region, every source bit-width;
- ``unseen-region``: pool size, a region the pool never used
  ([`UNSEEN_REGION`][triqdef.reproduce.UNSEEN_REGION]), every source bit-width;
- ``blackbox``: crafted on an independently trained full-precision model of the same
  architecture (its own seed), applied at every bit-width: every cell is a transfer.

Writes ``results.json`` (per run: ``clean[method][bits]``,
``transfer[method][attack][condition]``), ``results.md`` and one heatmap per method,
attack and condition to ``--out``.

    triqdef reproduce                        # small default size (2 CPU cores)
    triqdef reproduce --full --seeds 0       # the real experiment, ~2 h per seed on a core
    triqdef reproduce --data cifar10 --model resnet20
    triqdef reproduce --attacks all          # LAVAN, GAP, DPR and PatchAttack

(``python examples/reproduce.py`` and ``python -m triqdef reproduce`` take the same
options.) ``--data``: ``fashion-mnist`` (Debian's dataset-fashion-mnist or
torchvision's root), ``cifar10`` (torchvision, downloaded when online), ``digits``
(scikit-learn, always offline), ``auto`` (the first that works, in that order, saying
which). ``--split val`` evaluates on a validation split carved from the training
files (what ``examples/sweep.py`` chooses defaults on); the default ``test``
evaluates on the test files. ``--attacks`` picks the attacks of the threat (default
``lavan gap``, the attacks of the published figures; ``dpr``, ``patchattack`` or
``all`` add the others, each measured in every condition like LAVAN).

The data come from [`triqdef.data`][triqdef.data]; training reads them through a
`torch.utils.data.DataLoader` whose sampler draws one permutation per epoch from a
generator seeded with the run's seed.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import math
import platform
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

import triqdef
from triqdef.attacks import (
    DPR,
    LAVAN,
    AdversarialPatch,
    OnTheFlyPatch,
    PatchAttack,
    PatchPool,
    RandomPatch,
)
from triqdef.baselines import METHODS, PER_BIT, make_method
from triqdef.data import cifar10, dataset, find_fashion_mnist
from triqdef.errors import ConfigError, InputError
from triqdef.evaluate import TransferMatrix, alignment_report, clean_accuracy, transfer_matrix
from triqdef.models import SmallCNN, resnet20, resnet56
from triqdef.wrapper import DEFAULT_BITS, TriQDefWrapper

__all__ = [
    "ATTACKS",
    "CONDITIONS",
    "DATA_NAMES",
    "DEFAULT_ATTACKS",
    "EVAL_BITS",
    "MODELS",
    "POOL_REGIONS",
    "REFERENCE",
    "SIZES",
    "TRAIN_PATCHES",
    "UNSEEN_REGION",
    "Data",
    "Spec",
    "add_arguments",
    "attacks_in",
    "build_method",
    "build_parser",
    "build_pool",
    "diagonal",
    "from_args",
    "load_data",
    "main",
    "make_model",
    "merge",
    "off_diagonal",
    "patch_textures",
    "relative",
    "run",
    "run_seed",
    "summary",
    "train",
    "train_loader",
]

EVAL_BITS: tuple[int, ...] = (32, 5, 4, 2)
"""The bit-widths every model is evaluated at (sources and targets)."""
ATTACKS: tuple[str, ...] = ("lavan", "gap", "dpr", "patchattack")
"""Values of ``--attacks``, in the order a run measures them: LAVAN (per-image patches),
GAP (one universal patch), DPR (per-image shape-deformable patches: LAVAN's steps and
step size, the area of the condition's square) and PatchAttack (black-box: the size's
``patch_queries`` model evaluations per image, textures fitted once per seed by
[`patch_textures`][triqdef.reproduce.patch_textures])."""
DEFAULT_ATTACKS: tuple[str, ...] = ("lavan", "gap")
"""The attacks measured when ``--attacks`` is not given: those of the published figures
and of the default run's duration."""
_TITLES = {"lavan": "LAVAN", "gap": "GAP", "dpr": "DPR", "patchattack": "PatchAttack"}
CONDITIONS: tuple[str, ...] = ("seen", "unseen-bits", "unseen-size", "unseen-region", "blackbox")
"""The patch conditions of each transfer measurement (see the module's description)."""
POOL_REGIONS: tuple[str, ...] = ("top", "left")
"""Where the training pool's patches go."""
UNSEEN_REGION = "bottom-right"
"""The region no training patch used (disjoint from both pool regions)."""
REFERENCE = "multibit"
"""The undefended shared backbone every defence is compared with."""
TRAIN_PATCHES: tuple[str, ...] = ("pool", "onthefly", "lavan", "noise")
"""Training patch sources of the TriQDef methods (``--train-patches``)."""
DATA_NAMES: tuple[str, ...] = ("auto", "fashion-mnist", "cifar10", "digits")
"""Values of ``--data``."""
MODELS: tuple[str, ...] = ("smallcnn", "resnet20", "resnet56")
"""Values of ``--model``."""

SIZES: dict[str, dict[str, Any]] = {
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
        patch_queries=10,
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
        patch_queries=200,
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
        patch_queries=500,
        pool_sizes=(6, 8),
        seen=8,
        unseen=10,
    ),
}
"""Training, evaluation and threat budget per size (``--size``; ``--full`` is ``full``);
patch sides in pixels. ``lavan_steps`` is also DPR's step count; ``patch_queries`` is
PatchAttack's query budget per image."""


@dataclass
class Data:
    """Training images, held-out calibration images and the evaluated split (in [0, 1]).

    Images are (N, C, H, W) ``float32``, labels (N,) ``int64``.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_calib: torch.Tensor
    y_calib: torch.Tensor
    x_eval: torch.Tensor
    y_eval: torch.Tensor
    name: str
    split: str

    def to(self, device: torch.device | str) -> Data:
        """Move every tensor to ``device``, in place; returns ``self``."""
        for key in ("x_train", "y_train", "x_calib", "y_calib", "x_eval", "y_eval"):
            setattr(self, key, getattr(self, key).to(device))
        return self


def load_data(
    name: str, size: dict[str, Any], seed: int, root: str | None = None, split: str = "test"
) -> Data:
    """Training, held-out calibration and evaluation images.

    The training split is permuted with ``seed`` and cut into training, calibration
    (``size["calib"]``) and validation (``size["test"]``) parts that never overlap;
    ``split="test"`` evaluates on ``size["test"]`` images of the test split instead of
    the validation part. ``auto`` takes Fashion-MNIST when its files are found, else
    CIFAR-10 when it is already downloaded, else scikit-learn's digits (saying so);
    only an explicit ``cifar10`` tries to download (and falls back like ``auto``,
    saying so, when it cannot).

    Args:
        name: One of [`DATA_NAMES`][triqdef.reproduce.DATA_NAMES].
        size: One of [`SIZES`][triqdef.reproduce.SIZES] (``train``, ``calib``,
            ``test`` are read).
        seed: Seed of the split permutations.
        root: Directory searched first for the data files.
        split: ``"test"`` or ``"val"``.

    Returns:
        The [`Data`][triqdef.reproduce.Data], on the CPU.

    Raises:
        ConfigError: ``split`` or ``name`` is unknown, or the dataset is too small for
            ``size``.
        InputError: an explicitly named Fashion-MNIST is found nowhere.
    """
    if split not in ("val", "test"):
        raise ConfigError(f"split must be 'val' or 'test', got {split!r}")
    if name not in DATA_NAMES:
        raise ConfigError(f"unknown data {name!r}; valid names: {', '.join(DATA_NAMES)}")
    if name == "auto" and find_fashion_mnist(root) is not None:
        name = "fashion-mnist"
    if name in ("cifar10", "auto"):
        try:
            sets = [cifar10(root, train=t, download=name == "cifar10") for t in (True, False)]
            tr, te = sets
            return _split(tr.data, tr.targets, te.data, te.targets, size, seed, "cifar10", split)
        except (InputError, ImportError) as exc:  # offline, not downloaded, no torchvision
            if name == "cifar10":
                print(f"CIFAR-10 unavailable ({type(exc).__name__}: {exc})")
            name = "auto"
    train_set = dataset(name, root, train=True)
    test_set = dataset(train_set.name, root, train=False)
    if train_set.name == "digits":
        print(
            "Fashion-MNIST and CIFAR-10 not found (and no network): using scikit-learn's "
            "digits, upscaled to 28x28"
        )
    return _split(
        train_set.data,
        train_set.targets,
        test_set.data,
        test_set.targets,
        size,
        seed,
        train_set.name,
        split,
    )


def _split(
    xtr: torch.Tensor,
    ytr: torch.Tensor,
    xte: torch.Tensor,
    yte: torch.Tensor,
    size: dict[str, Any],
    seed: int,
    name: str,
    split: str,
) -> Data:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(xtr), generator=g)
    n_cal, n_val = size["calib"], size["test"]
    n_train = min(size["train"], len(xtr) - n_cal - n_val)
    if n_train < 1:
        raise ConfigError(
            f"{name} has {len(xtr)} training images: too few for {n_cal} calibration and "
            f"{n_val} evaluation images; pass a smaller --test-size or another --size"
        )
    tr, cal = perm[:n_train], perm[n_train : n_train + n_cal]
    if split == "val":
        val = perm[n_train + n_cal : n_train + n_cal + n_val]
        x_eval, y_eval = xtr[val], ytr[val]
    else:
        te = torch.randperm(len(xte), generator=g)[:n_val]
        x_eval, y_eval = xte[te], yte[te]
    return Data(xtr[tr], ytr[tr], xtr[cal], ytr[cal], x_eval, y_eval, name, split)


def make_model(kind: str, channels: int, width: int) -> tuple[torch.nn.Module, list[str]]:
    """The model and the layers FDP taps (early-middle layers, never the head).

    Args:
        kind: One of [`MODELS`][triqdef.reproduce.MODELS].
        channels: Input channels.
        width: [`SmallCNN`][triqdef.models.SmallCNN]'s width (the ResNets ignore it).

    Returns:
        ``(model, layers)``.

    Raises:
        ConfigError: ``kind`` is unknown.
    """
    if kind == "smallcnn":
        return SmallCNN(in_channels=channels, width=width), ["block1", "block2"]
    builders = {"resnet20": resnet20, "resnet56": resnet56}
    if kind not in builders:
        raise ConfigError(f"unknown model {kind!r}; valid names: {', '.join(MODELS)}")
    return builders[kind](in_channels=channels), ["layer1", "layer2"]


def build_pool(
    fp_wrapper: TriQDefWrapper,
    x: torch.Tensor,
    y: torch.Tensor,
    size: dict[str, Any],
    seed: int,
) -> PatchPool:
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


def lavan_source(wrapper: TriQDefWrapper, size: dict[str, Any], seed: int) -> LAVAN:
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


def training_patches(
    kind: str, wrapper: TriQDefWrapper, pool: PatchPool, size: dict[str, Any], seed: int
) -> Any:
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
    raise ConfigError(f"train patches must be one of {TRAIN_PATCHES}, got {kind!r}")


def build_method(
    name: str,
    model: torch.nn.Module,
    layers: Sequence[str],
    bits: Sequence[int],
    pool: PatchPool,
    size: dict[str, Any],
    seed: int,
    *,
    total: int | None = None,
    calib: list[torch.Tensor] | None = None,
    patches: str = "pool",
    **wrapper_kwargs: Any,
) -> Any:
    """One method of [`triqdef.baselines`][triqdef.baselines], configured as this
    experiment trains it.

    Args:
        name: The method's name (one of ``triqdef.baselines.METHODS``).
        model: The untrained model.
        layers: The layers FDP taps.
        bits: The bit-widths to train at.
        pool: The offline patch pool.
        size: One of [`SIZES`][triqdef.reproduce.SIZES].
        seed: The run's seed.
        total: Curriculum length in iterations (the curriculum is stepped once per
            iteration; default: the number of epochs, stepped per epoch).
        calib: Held-out image batches (B, C, H, W) for the curriculum's calibration
            passes.
        patches: The TriQDef methods' training patch source (see
            [`training_patches`][triqdef.reproduce.training_patches]).
        **wrapper_kwargs: Keywords of the TriQDef methods' wrapper (e.g.
            ``pairs="sum"``, ``bn_rows="clean"``).

    Returns:
        The [`Method`][triqdef.baselines.Method].
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


class _EpochShuffle(Sampler[int]):
    """Indices ``0..n-1`` in a new random order each epoch: one ``torch.randperm(n)``
    from ``generator`` per pass and no other draw (``RandomSampler`` draws a second
    permutation at the end of each pass), so the training order is the one the
    reproduction has always used."""

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=self.generator).tolist())


def train_loader(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> DataLoader:
    """The training batches: ``(x, y)`` shuffled every epoch by a generator seeded with
    ``seed``, ``batch`` samples per batch, the last batch smaller.

    The loader gets its own generator (for its worker seeds), so it never draws from
    the global random state nor from the shuffling generator.

    Args:
        x: Images (N, C, H, W).
        y: Labels (N,).
        batch: Samples per batch.
        seed: Seed of the shuffling.

    Returns:
        A `torch.utils.data.DataLoader` of ``(xb, yb)`` batches on the device of ``x``.
    """
    order = _EpochShuffle(len(x), torch.Generator().manual_seed(seed))
    return DataLoader(
        TensorDataset(x, y), batch_size=batch, sampler=order, generator=torch.Generator()
    )


def train(
    method: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
    progress: bool,
    per_step: bool = False,
) -> float:
    """Adam over ``epochs`` on [`train_loader`][triqdef.reproduce.train_loader]'s batches.

    Args:
        method: A [`Method`][triqdef.baselines.Method] (its ``loss``, ``wrapper`` and
            ``schedule`` are used).
        x: Training images (N, C, H, W) in [0, 1].
        y: Training labels (N,).
        epochs: Passes over the data.
        batch: Samples per batch.
        lr: Adam's learning rate.
        seed: Seed of the batch order.
        progress: Show a tqdm bar.
        per_step: Step the curriculum once per iteration (else once per epoch).

    Returns:
        The training time in seconds.
    """
    opt = torch.optim.Adam(method.wrapper.parameters(), lr=lr)
    loader = train_loader(x, y, batch, seed)
    bar = _bar(epochs * len(loader), f"train {method.name}", progress)
    t0 = time.monotonic()
    method.wrapper.train()
    for _ in range(epochs):
        for xb, yb in loader:
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


def _bar(total: int, desc: str, enabled: bool) -> Any:
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
            def update(self, n: int = 1) -> None:
                pass

            def close(self) -> None:
                pass

        return _Null()
    return tqdm(total=total, desc=desc, leave=False)


# --- evaluation ------------------------------------------------------------------------------
def patch_textures(data: Data, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PatchAttack's texture dictionary for one seed, fitted on the training images.

    [`PatchAttack.fit_textures`][triqdef.attacks.patchattack.PatchAttack.fit_textures]
    with its defaults (8 textures per class, whole images) and clustering seed
    ``seed + 4000``; it queries no model. [`run_seed`][triqdef.reproduce.run_seed] fits
    it once per seed and every method, condition and matrix cell uses it.

    Args:
        data: the run's [`Data`][triqdef.reproduce.Data] (``x_train``, ``y_train`` are read).
        seed: the run's seed.

    Returns:
        ``(textures, labels)``: ``(T, C, H, W)`` textures on the device of the images and
        their ``(T,)`` int64 classes.
    """
    fitted = PatchAttack(torch.nn.Identity()).fit_textures(
        data.x_train, data.y_train, seed=seed + 4000
    )
    return cast(torch.Tensor, fitted.textures), cast(torch.Tensor, fitted.texture_labels)


def _attack_factory(
    attack: str,
    side: int,
    region: Any,
    size: dict[str, Any],
    seed: int,
    on: Any = None,
    textures: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Any:
    """``make_attack(model, bits)`` for
    [`transfer_matrix`][triqdef.evaluate.transfer_matrix]; ``on`` crafts on another model
    (the black-box source) whatever model the matrix passes; ``textures`` is
    PatchAttack's dictionary ``(textures, labels)``."""
    if attack not in ATTACKS:
        raise ConfigError(f"unknown attack {attack!r}; valid names: {', '.join(ATTACKS)}")
    if attack == "patchattack" and textures is None:
        raise ConfigError(
            "the patchattack threat needs its texture dictionary: pass "
            "textures=patch_textures(data, seed)"
        )

    def make(model: Any, bits: int) -> Any:
        src, b = (on, None) if on is not None else (model, bits)
        if attack in ("lavan", "dpr"):  # DPR gets LAVAN's steps, step size and area
            cls = LAVAN if attack == "lavan" else DPR
            return cls(
                src,
                side,
                bits=b,
                steps=size["lavan_steps"],
                step_size=0.1,
                seed=seed,
                region=region,
            )
        if attack == "patchattack":
            tex, labels = cast(tuple[torch.Tensor, torch.Tensor], textures)
            return PatchAttack(
                src,
                side,
                bits=b,
                queries=size["patch_queries"],
                textures=tex,
                texture_labels=labels,
                seed=seed,
                region=region,
            )
        return AdversarialPatch(
            src, side, bits=b, steps=size["gap_steps"], step_size=0.05, seed=seed, region=region
        )

    return make


def _check_attacks(attacks: Sequence[str]) -> None:
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown:
        raise ConfigError(f"unknown attack {unknown[0]!r}; valid names: {', '.join(ATTACKS)}")
    if not attacks:
        raise ConfigError(f"no attack to measure: name at least one of {', '.join(ATTACKS)}")


def transfer_rows(
    target: Any,
    data: Data,
    size: dict[str, Any],
    seed: int,
    blackbox_model: Any,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    textures: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """``{attack: {condition: TransferMatrix.to_dict()}}`` for one trained method.

    ``target`` is a wrapper (one shared backbone) or ``{bits: wrapper}`` (one model per
    bit-width). The attacks run in the order of [`ATTACKS`][triqdef.reproduce.ATTACKS];
    the patches of condition ``k`` use seed ``seed + 1000 + k`` and its noise floor
    ``seed + 2000 + k`` whatever the attacks: never the pool's, and the same draws for
    LAVAN and GAP whichever other attacks run. ``textures`` is PatchAttack's dictionary
    (default: [`patch_textures`][triqdef.reproduce.patch_textures], fitted here; pass it
    to fit it once for several methods).

    Raises:
        ConfigError: no attack, or one that is not in [`ATTACKS`][triqdef.reproduce.ATTACKS].
    """
    _check_attacks(attacks)
    if "patchattack" in attacks and textures is None:
        textures = patch_textures(data, seed)
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
    loader = DataLoader(TensorDataset(data.x_eval, data.y_eval), batch_size=500)
    out: dict = {}
    for attack in (a for a in ATTACKS if a in attacks):
        out[attack] = {}
        for k, cond in enumerate(CONDITIONS):
            side, region, sources, on = settings[cond]
            make = _attack_factory(attack, side, region, size, seed + 1000 + k, on, textures)
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


def off_diagonal(m: dict[str, Any], condition: str) -> list[float | None]:
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


def diagonal(m: dict[str, Any]) -> list[float | None]:
    """Direct ASR per target (source == target), ``None`` where the target is no source."""
    out = []
    for j, t in enumerate(m["target_bits"]):
        rows = [row[j] for s, row in zip(m["source_bits"], m["asr"]) if s == t]
        out.append(rows[0] if rows else None)
    return out


def _clean(target: Any, data: Data) -> dict[str, float]:
    if isinstance(target, dict):
        return {
            str(b): clean_accuracy(w, [(data.x_eval, data.y_eval)], bits=[b])[b]
            for b, w in target.items()
        }
    acc = clean_accuracy(target, [(data.x_eval, data.y_eval)], bits=list(EVAL_BITS))
    return {str(b): a for b, a in acc.items()}


def refresh_bn(wrapper: TriQDefWrapper, data: Data) -> TriQDefWrapper:
    """A copy whose BatchNorm statistics (every bit-width) are re-estimated on held-out
    clean images; observers and weights untouched."""
    w = copy.deepcopy(wrapper)
    w.calibrate([data.x_calib], bits=w.bits, observers=False)
    return w.eval()


@dataclass
class Spec:
    """One trained configuration: ``label`` in the report, ``method`` of
    [`triqdef.baselines`][triqdef.baselines], TriQDef wrapper keywords and training patches."""

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
    attacks: Sequence[str] = DEFAULT_ATTACKS,
) -> dict:
    """Train the pool and black-box models, then every spec; returns the run's dict.

    ``attacks`` (names of [`ATTACKS`][triqdef.reproduce.ATTACKS]) make the threat; with
    ``patchattack``, its texture dictionary is fitted once here
    ([`patch_textures`][triqdef.reproduce.patch_textures]) for every spec.

    Raises:
        ConfigError: no attack, or one that is not in [`ATTACKS`][triqdef.reproduce.ATTACKS]
            (checked before any training).
    """
    _check_attacks(attacks)
    channels = data.x_train.shape[1]
    calib = [data.x_calib[i : i + 128] for i in range(0, len(data.x_calib), 128)]
    steps_per_epoch = math.ceil(len(data.x_train) / size["batch"])
    total = size["epochs"] * steps_per_epoch

    def fit_fp(model_seed: int) -> TriQDefWrapper:
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
    textures = patch_textures(data, seed) if "patchattack" in attacks else None
    shown = next(a for a in ATTACKS if a in attacks)  # the attack the progress line shows

    run: dict[str, Any] = {
        "seed": seed,
        "clean": {},
        "clean_as_trained": {},
        "clean_refreshed": {},
        "transfer": {},
        "train_s": {},
    }
    for spec in specs:
        per_bit = spec.method in PER_BIT
        bit_sets = [(b,) for b in EVAL_BITS] if per_bit else [DEFAULT_BITS]
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
        as_trained: Any = trained if per_bit else trained[None]
        refreshed: Any = (
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
        run["transfer"][spec.label] = transfer_rows(
            deployed, data, size, seed, blackbox, attacks, textures
        )
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
        head = headline(run, spec.label, shown)
        print(
            f"  [seed {seed}] {spec.label:<28} clean {run['clean'][spec.label]}  "
            f"{_TITLES[shown]} seen transfer {head}  ({seconds:.0f} s)",
            flush=True,
        )
        if results is not None and out is not None:
            write(results, out, partial=run)
    return run


def headline(
    run: dict[str, Any], label: str, attack: str = "lavan", condition: str = "seen"
) -> str:
    vals = off_diagonal(run["transfer"][label][attack][condition], condition)
    return "/".join("n/a" if v is None else f"{100 * v:.0f}" for v in vals)


def parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs -> [`TriQDefWrapper`][triqdef.TriQDefWrapper] keywords.

    Values become ints, floats, ``None`` (``none``) or strings, in that order of
    preference.

    Args:
        items: e.g. ``["pairs=sum", "lambda_fdp=0.4"]``.

    Returns:
        The keywords.

    Raises:
        ConfigError: an item has no ``=``, or a key is not a keyword of
            [`TriQDefWrapper`][triqdef.TriQDefWrapper] that the run leaves free (every
            keyword but ``bits`` and ``layers``); checked before any training.
    """
    known = [
        n
        for n, p in inspect.signature(TriQDefWrapper).parameters.items()
        if p.kind is p.KEYWORD_ONLY or n == "exclude"  # bits and layers are the run's
    ]
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--triqdef takes KEY=VALUE, got {item!r}")
        if key not in known:
            raise ConfigError(
                f"--triqdef {item}: {key!r} is not a TriQDefWrapper keyword; known: "
                + ", ".join(known)
            )
        if value.lower() == "none":
            out[key] = None
            continue
        for kind in (int, float):
            try:
                out[key] = kind(value)
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


def config(
    size: dict[str, Any], args: argparse.Namespace, specs: list[Spec], data_name: str | None
) -> dict[str, Any]:
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
        "attacks": list(_attacks_from(args)),
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


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the reproduction's options to ``p`` (``triqdef reproduce`` and
    ``examples/reproduce.py`` share them); returns ``p``."""
    p.add_argument(
        "--data",
        default="auto",
        choices=DATA_NAMES,
        help="dataset (default: auto, the first of fashion-mnist, cifar10 (if already "
        "downloaded) and digits that is available, saying which)",
    )
    p.add_argument(
        "--model", default="smallcnn", choices=MODELS, help="architecture (default: smallcnn)"
    )
    p.add_argument(
        "--full", action="store_true", help="the real experiment (~2 h per seed, 1 CPU core)"
    )
    p.add_argument(
        "--size",
        choices=list(SIZES),
        default=None,
        help="training, evaluation and threat size: smoke (seconds, for tests), default "
        "(the default), full (the same as --full)",
    )
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[0], metavar="SEED", help="seeds (default: 0)"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        default=None,
        choices=METHODS,
        metavar="METHOD",
        help="methods to train (default: all): " + ", ".join(METHODS),
    )
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
        "--attacks",
        nargs="+",
        default=None,
        choices=[*ATTACKS, "all"],
        metavar="ATTACK",
        help="attacks of the threat, each measured in every condition: lavan, gap, dpr "
        "(LAVAN's steps, shape-deformable at the same area), patchattack (black-box, the "
        "size's query budget per image: smoke 10, default 200, full 500), or all "
        "(default: lavan gap, the attacks of the published figures and of the ~26 min "
        "default run)",
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
        help="evaluate on the test files or on a validation part of the training files "
        "(default: test)",
    )
    p.add_argument(
        "--out",
        default="runs/reproduce",
        metavar="DIR",
        help="output directory (default: runs/reproduce)",
    )
    p.add_argument("--epochs", type=int, default=None, help="override the size's epochs")
    p.add_argument(
        "--train-size", type=int, default=None, help="override the size's training images"
    )
    p.add_argument(
        "--test-size", type=int, default=None, help="override the size's evaluation images"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--root", default=None, metavar="DIR", help="directory searched first for the data files"
    )
    p.add_argument("--device", default="cpu", help="where to train, e.g. cuda (default: cpu)")
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="combine results.json files (e.g. one per seed) into --out; no training",
    )
    return p


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The reproduction's own argument parser (``examples/reproduce.py``)."""
    doc = __doc__ or ""
    p = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    return add_arguments(p)


def _attacks_from(args: argparse.Namespace) -> tuple[str, ...]:
    """The attacks ``--attacks`` names, in the order of [`ATTACKS`][triqdef.reproduce.ATTACKS]
    (``all``: every one; not given: [`DEFAULT_ATTACKS`][triqdef.reproduce.DEFAULT_ATTACKS])."""
    names = getattr(args, "attacks", None)
    if not names:
        return DEFAULT_ATTACKS
    if "all" in names:
        return ATTACKS
    unknown = [a for a in names if a not in ATTACKS]
    if unknown:
        raise ConfigError(
            f"--attacks {unknown[0]}: unknown attack; valid names: {', '.join(ATTACKS)}, all"
        )
    return tuple(a for a in ATTACKS if a in names)


def _check_args(args: argparse.Namespace) -> None:
    """Checks made before anything runs; ConfigError/InputError name the option."""
    for opt in ("epochs", "train_size", "test_size"):
        value = getattr(args, opt)
        if value is not None and value < 1:
            raise ConfigError(f"--{opt.replace('_', '-')} must be >= 1, got {value}")
    _attacks_from(args)
    for path in args.merge or ():
        if not Path(path).is_file():
            raise InputError(f"--merge {path}: no such file; pass results.json files")


def from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run what parsed options ask for (training and evaluation, or ``--merge``).

    Args:
        args: Options parsed by a parser that [`add_arguments`][triqdef.reproduce.add_arguments]
            built.

    Returns:
        The results dict written to ``args.out`` as ``results.json``.

    Raises:
        ConfigError: a ``--triqdef`` item is malformed or names no wrapper keyword, or
            a count is below 1.
        InputError: a ``--merge`` file is missing, or the named data cannot be loaded.
    """
    _check_args(args)
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


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``examples/reproduce.py``'s entry point: parse ``argv`` and run.

    An error that triqdef raises on purpose (a bad ``--triqdef`` item, missing data)
    ends the program with one line on stderr and exit status 2, like a bad option.

    Args:
        argv: The options (default: ``sys.argv[1:]``).

    Returns:
        The results dict (see [`from_args`][triqdef.reproduce.from_args]).
    """
    p = build_parser()
    args = p.parse_args(argv)
    try:
        return from_args(args)
    except triqdef.TriQDefError as exc:
        p.exit(2, f"{p.prog}: error: {' '.join(str(exc).split())}\n")


def run(specs: list[Spec], size: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Train and evaluate ``specs`` for every seed of ``args``; writes ``args.out``.

    ``args.attacks`` (absent or ``None``: [`DEFAULT_ATTACKS`][triqdef.reproduce.DEFAULT_ATTACKS])
    names the threat's attacks, as ``--attacks`` does.
    """
    attacks = _attacks_from(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    results: dict[str, Any] = {"config": config(size, args, specs, None), "runs": []}
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
            attacks,
        )
        results["runs"].append(run_)
        write(results, out)
    results["config"]["duration_s"] = time.monotonic() - t_start
    write(results, out)
    heatmaps(results, out)
    print(f"wrote {out}/results.md and results.json in {results['config']['duration_s']:.0f} s")
    return results


def merge(paths: Sequence[str], out: Path) -> dict[str, Any]:
    """Combine several results files (same configuration, other seeds) into one report."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    merged: dict[str, Any] = {"config": dict(parts[0]["config"]), "runs": []}
    for part in parts:
        merged["runs"].extend(part["runs"])
    merged["config"]["seeds"] = sorted({r["seed"] for r in merged["runs"]})
    merged["config"]["duration_s"] = [p["config"].get("duration_s") for p in parts]
    merged["config"]["commands"] = [p["config"]["command"] for p in parts]
    out.mkdir(parents=True, exist_ok=True)
    write(merged, out)
    heatmaps(merged, out)
    return merged


def write(results: dict[str, Any], out: Path, partial: dict[str, Any] | None = None) -> None:
    """``results.json`` and ``results.md``; ``partial`` is a run still in progress."""
    view = results
    if partial is not None:
        view = {"config": results["config"], "runs": [*results["runs"], partial]}
    (out / "results.json").write_text(json.dumps(view, indent=2))
    (out / "results.md").write_text(to_markdown(view))


def pooled(matrices: list[dict[str, Any]]) -> TransferMatrix:
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

    def rate(s: int, e: int) -> float:
        return s / e if e else float("nan")

    first.counts = [[(c[0], c[1]) for c in row] for row in counts]
    first.asr = [[rate(*c) for c in row] for row in counts]
    first.noise_counts = [(c[0], c[1]) for c in noise]
    first.noise_floor = [rate(*c) for c in noise]
    first.samples = sum(m["samples"] for m in matrices)
    return first


def heatmaps(results: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per method, attack and condition (counts pooled over seeds)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("matplotlib not installed: no heatmaps (pip install matplotlib)")
        return []
    paths = []
    labels = list(dict.fromkeys(m for r in results["runs"] for m in r["transfer"]))
    for label in labels:
        for attack in attacks_in(results):
            for cond in CONDITIONS:
                ms = [
                    r["transfer"][label][attack][cond]
                    for r in results["runs"]
                    if cond in r["transfer"].get(label, {}).get(attack, {})
                ]
                if not ms:
                    continue
                path = out / f"transfer-{label}-{attack}-{cond}.png"
                pooled(ms).heatmap(path, title=f"{label}: {_title(attack)} {cond} ASR (%)")
                paths.append(path)
    return paths


def attacks_in(results: dict[str, Any]) -> list[str]:
    """The attacks measured in ``results``' runs: those of
    [`ATTACKS`][triqdef.reproduce.ATTACKS] in its order, then any other name found."""
    found = {a for r in results["runs"] for conds in r["transfer"].values() for a in conds}
    return [a for a in ATTACKS if a in found] + sorted(found - set(ATTACKS))


def _title(attack: str) -> str:
    return _TITLES.get(attack, attack.upper())


def _stat(vals: list[Any]) -> tuple[float, float] | None:
    vals = [v for v in vals if v is not None]
    if not vals:
        return None
    return sum(vals) / len(vals), (max(vals) - min(vals)) / 2


def _fmt(
    stat: tuple[float, float] | None, n: int, scale: float = 100.0, signed: bool = False
) -> str:
    if stat is None:
        return "n/a"
    mean, spread = stat
    text = f"{scale * mean:+.0f}" if signed else f"{scale * mean:.1f}"
    return text + (f" ± {scale * spread:.{0 if signed else 1}f}" if n > 1 else "")


def summary(results: dict[str, Any]) -> dict[str, Any]:
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


def relative(table: dict[str, Any], label: str, attack: str, cond: str, j: int) -> float | None:
    """Relative change (a fraction) of ``label``'s seed-mean off-diagonal ASR at target
    index ``j`` against the reference's; ``None`` when either is missing or the reference
    is 0."""

    def values(name: str) -> list[Any]:
        cell = table.get(name, {}).get(attack, {}).get(cond)
        return [] if cell is None else [v[j] for v in cell["transfer"]]

    mine, ref = _stat(values(label)), _stat(values(REFERENCE))
    if mine is None or ref is None or not ref[0]:
        return None
    return (mine[0] - ref[0]) / ref[0]


def _threat(attack: str, cfg: dict[str, Any]) -> str:
    """The threat budget of one attack, as the report states it."""
    if attack == "lavan":
        return f"LAVAN {cfg['lavan_steps']} steps"
    if attack == "gap":
        return f"GAP {cfg['gap_steps']} steps"
    if attack == "dpr":
        return f"DPR {cfg['lavan_steps']} steps (the square's area)"
    if attack == "patchattack":
        return f"PatchAttack {cfg.get('patch_queries', 'n/a')} queries per image (black-box)"
    return _title(attack)


def to_markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    runs = results["runs"]
    n = len({r["seed"] for r in runs})
    bits = cfg.get("eval_bits", list(EVAL_BITS))
    attacks = attacks_in(results) or list(cfg.get("attacks", DEFAULT_ATTACKS))
    threat = ", ".join(_threat(a, cfg) for a in attacks)
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
        f"{cfg['pool_regions']}, crafted at 32 bits on a full-precision model; threat: "
        f"{threat}; unseen size {cfg['unseen']}, unseen region {cfg['unseen_region']}",
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
    if "seen" in table.get(REFERENCE, {}).get("lavan", {}):
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
    for attack in attacks:
        for cond in CONDITIONS:
            lines += [
                "",
                f"## {_title(attack)}, {cond}: ASR (%) per target bit-width; lower is better",
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
                if cond not in table.get(label, {}).get(attack, {}):
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
            for attack in attacks:
                for cond in CONDITIONS:
                    if cond not in table.get(label, {}).get(attack, {}):
                        continue
                    vals = [relative(table, label, attack, cond, j) for j in range(len(bits))]
                    lines.append(
                        f"| {label} | {attack} | {cond} | "
                        + " | ".join("n/a" if v is None else f"{100 * v:+.0f}" for v in vals)
                        + " |"
                    )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
