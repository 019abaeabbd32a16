"""The ``triqdef`` command line: ``reproduce``, ``eval`` and ``info``.

    triqdef reproduce [options]            # the paper's experiment (triqdef.reproduce)
    triqdef eval CHECKPOINT --attack lavan --data fashion-mnist --heatmap transfer.png
    triqdef info CHECKPOINT                # bits, layers, calibrated bit-widths, format

``python -m triqdef`` is the same program. Options are listed by ``--help`` on each
subcommand and described in docs/cli.md.

Exit status: 0 on success, 2 when the command could not run as asked: a bad option
(argparse's message), or an error triqdef raises on purpose
([`TriQDefError`][triqdef.errors.TriQDefError]: a missing or damaged checkpoint, data
that cannot be loaded, a bit-width the checkpoint was never calibrated at) or a
missing optional dependency, reported as one line ``triqdef <command>: error: ...``
on stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Subset

import triqdef
from triqdef import reproduce
from triqdef._safetensors import read_safetensors
from triqdef.attacks import LAVAN, REGIONS, AdversarialPatch
from triqdef.data import DATASET_NAMES, dataset
from triqdef.errors import CheckpointError, ConfigError, InputError, TriQDefError
from triqdef.evaluate import TransferMatrix, transfer_matrix
from triqdef.io import FORMAT_VERSION, _act_bits_from_json, load
from triqdef.models import SmallCNN, resnet20, resnet56
from triqdef.reproduce import MODELS
from triqdef.wrapper import TriQDefWrapper

__all__ = ["build_parser", "checkpoint_info", "load_wrapper", "main"]

_ATTACK_STEPS = {"lavan": 50, "gap": 100}  # the reproduction's --full threat budget


# --- checkpoints --------------------------------------------------------------------------
def _read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a file written by ``triqdef.save``/``save_quantized``."""
    if "\x00" in path:
        raise InputError(f"the path {path!r} contains a NUL character; pass a file name")
    tensors, meta = read_safetensors(Path(path), "checkpoint", "triqdef.save")
    if meta.get("format") != "triqdef":
        raise CheckpointError(
            f"{path} is a safetensors file but was not written by triqdef.save (no triqdef "
            "metadata)"
        )
    return tensors, meta


def _field(meta: dict[str, str], name: str, path: str) -> Any:
    try:
        return json.loads(meta.get(name, "null"))
    except ValueError:
        raise CheckpointError(
            f"{path}: the metadata entry {name!r} is not valid JSON ({meta.get(name)!r}); "
            "the file was damaged or edited by hand"
        ) from None


def _calibrated_bits(bits: Sequence[int], tensors: dict[str, torch.Tensor], path: str) -> list[int]:
    """The bit-widths whose observers have all seen data, read from the saved state.

    The rule of [`TriQDefWrapper.calibrated_bits`][triqdef.TriQDefWrapper.calibrated_bits]:
    32 bits always; a lower bit-width when every quantized layer that has seen data at
    any bit-width has seen data at it (``act_kind`` 0 means never observed).
    """
    qbits = [b for b in bits if b < 32]
    rows = []
    for key, t in tensors.items():
        if key.startswith("quantizers.") and key.endswith(".act_kind"):
            if t.shape != (len(qbits),):
                raise CheckpointError(
                    f"{path}: {key} has shape {tuple(t.shape)}, expected ({len(qbits)},) for "
                    f"bits {list(bits)}"
                )
            rows.append([bool(v) for v in t.tolist()])
    rows = [r for r in rows if any(r)]
    ready = [bool(rows) and all(r[i] for r in rows) for i in range(len(qbits))]
    return [b for b in bits if b == 32 or ready[qbits.index(b)]]


def checkpoint_info(path: str) -> dict[str, Any]:
    """What a checkpoint holds, from its metadata and quantizer state (no model needed).

    Args:
        path: A file written by [`save`][triqdef.io.save] or
            [`save_quantized`][triqdef.io.save_quantized].

    Returns:
        ``{"path", "size_bytes", "format_version", "readable", "kind", "model_class",
        "architecture", "bits", "calibrated_bits", "layers", "exclude", "per_bit_bn",
        "input_bits", "quantized_layers", "tensors"}``; a ``quantized`` export also has
        ``"export_bits"``, and ``calibrated_bits`` is ``None`` for it. ``readable``
        says whether this triqdef reads the file's format version.

    Raises:
        CheckpointFileError: the file is missing, a directory or unreadable.
        CheckpointError: it is not a triqdef file, or is damaged.
    """
    tensors, meta = _read_checkpoint(path)
    bits = _field(meta, "bits", path)
    if not isinstance(bits, list) or not all(isinstance(b, int) for b in bits):
        raise CheckpointError(f"{path}: its bits entry {meta.get('bits')!r} is not a list of ints")
    kind = meta.get("kind")
    info: dict[str, Any] = {
        "path": path,
        "size_bytes": os.path.getsize(path),
        "format_version": meta.get("format_version"),
        "readable": meta.get("format_version") == FORMAT_VERSION,
        "kind": kind,
        "model_class": meta.get("model_class"),
        "architecture": meta.get("architecture"),
        "bits": bits,
        "calibrated_bits": _calibrated_bits(bits, tensors, path) if kind == "wrapper" else None,
        "layers": _field(meta, "layers", path),
        "exclude": _field(meta, "exclude", path),
        "per_bit_bn": _field(meta, "per_bit_bn", path),
        "input_bits": _field(meta, "input_bits", path),
        "min_bits": _field(meta, "min_bits", path) or {},
        "act_bits": _act_bits_from_json(_field(meta, "act_bits", path), Path(path)),
        "quantizer": _field(meta, "quantizer", path) or "minmax",
        "quantized_layers": sum(
            k.startswith("quantizers.") and k.endswith(".act_kind") for k in tensors
        ),
        "tensors": len(tensors),
    }
    if kind != "wrapper":
        info["export_bits"] = _field(meta, "export_bits", path)
    return info


def _format_info(info: dict[str, Any]) -> str:
    def seq(v: Any) -> str:
        return ", ".join(map(str, v)) if v else "(none)"

    version = f"{info['format_version']}"
    version += "" if info["readable"] else f" (this triqdef reads version {FORMAT_VERSION})"
    rows = [
        ("checkpoint", f"{info['path']} ({info['size_bytes']:,} bytes, {info['tensors']} tensors)"),
        ("format version", version),
        ("kind", info["kind"]),
        ("model", f"{info['model_class']} (architecture {info['architecture']})"),
        ("bits", seq(info["bits"])),
    ]
    if info["kind"] == "wrapper":
        rows.append(("calibrated bits", seq(info["calibrated_bits"])))
    else:
        rows.append(("exported bits", str(info.get("export_bits"))))
    rows += [
        ("layers (FDP taps)", seq(info["layers"])),
        ("excluded layers", seq(info["exclude"])),
        ("quantized layers", str(info["quantized_layers"])),
        ("per-bit BatchNorm", "yes" if info["per_bit_bn"] else "no"),
        (
            "input bits",
            "as the active bit-width" if info["input_bits"] is None else str(info["input_bits"]),
        ),
        (
            "min_bits",
            seq([f"{k}: {v}" for k, v in sorted(info["min_bits"].items())]),
        ),
        (
            "act_bits",
            "as the weights" if info["act_bits"] is None else str(info["act_bits"]),
        ),
        ("quantizer", info["quantizer"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _model_args(name: str, tensors: dict[str, torch.Tensor], path: str) -> dict[str, int]:
    """Constructor arguments of a reference model, read from its saved weights."""
    keys = {
        "smallcnn": ("model.block1.0.weight", "model.head.weight"),
        "resnet20": ("model.conv1.weight", "model.fc.weight"),
        "resnet56": ("model.conv1.weight", "model.fc.weight"),
    }[name]
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise CheckpointError(
            f"{path} holds no {missing[0]}: not a {name} checkpoint; pass the --model it was "
            f"trained with (one of {', '.join(MODELS)})"
        )
    first, head = tensors[keys[0]], tensors[keys[1]]
    args = {"in_channels": int(first.shape[1]), "num_classes": int(head.shape[0])}
    if name == "smallcnn":
        args["width"] = int(first.shape[0])
    return args


def _guess_model(meta: dict[str, str], tensors: dict[str, torch.Tensor], path: str) -> str:
    cls = meta.get("model_class")
    if cls == "SmallCNN":
        return "smallcnn"
    if cls == "CifarResNet":
        blocks = {k.split(".")[2] for k in tensors if k.startswith("model.layer1.")}
        depth = 6 * len(blocks) + 2
        if f"resnet{depth}" in MODELS:
            return f"resnet{depth}"
    raise ConfigError(
        f"{path} holds a {cls} model, which triqdef eval cannot rebuild by itself; pass "
        f"--model (one of {', '.join(MODELS)}) if it is one of them, or evaluate it from "
        "Python with triqdef.evaluate.transfer_matrix"
    )


def load_wrapper(path: str, model: str | None = None) -> TriQDefWrapper:
    """Rebuild a saved [`TriQDefWrapper`][triqdef.TriQDefWrapper] of a reference model.

    The wrapper's bit-widths, layers, exclusions, ``per_bit_bn`` and ``input_bits`` come
    from the file's metadata; the model's input channels, classes and (for SmallCNN)
    width from its weights.

    Args:
        path: A file written by [`save`][triqdef.io.save].
        model: One of [`MODELS`][triqdef.reproduce.MODELS] (default: read from the file's model
            class).

    Returns:
        The wrapper, in eval mode, on the CPU.

    Raises:
        CheckpointFileError: the file is missing, a directory or unreadable.
        CheckpointError: the file is damaged, an export rather than a wrapper, or not of
            ``model``'s architecture.
        ConfigError: ``model`` is not given and the file's model is not a reference model.
    """
    tensors, meta = _read_checkpoint(path)
    if meta.get("kind") != "wrapper":
        raise CheckpointError(
            f"{path} holds a {meta.get('kind')!r} export (save_quantized), not a wrapper; "
            "evaluate the file written by triqdef.save"
        )
    name = model if model is not None else _guess_model(meta, tensors, path)
    args = _model_args(name, tensors, path)
    builders: dict[str, Callable[..., torch.nn.Module]] = {
        "smallcnn": SmallCNN,
        "resnet20": resnet20,
        "resnet56": resnet56,
    }
    net = builders[name](**args)
    per_bit_bn = _field(meta, "per_bit_bn", path)
    layers = _field(meta, "layers", path) or ()
    wrapper = TriQDefWrapper(
        net,
        bits=_field(meta, "bits", path),
        layers=layers,
        exclude=_field(meta, "exclude", path) or (),
        per_bit_bn=bool(per_bit_bn) if per_bit_bn is not None else True,
        input_bits=_field(meta, "input_bits", path),
        min_bits=_field(meta, "min_bits", path) or None,
        act_bits=_act_bits_from_json(_field(meta, "act_bits", path), Path(path)),
        quantizer=_field(meta, "quantizer", path) or "minmax",
        lambda_fdp=0.8 if layers else 0.0,  # evaluation only: no FDP warning without taps
    )
    load(wrapper, path)
    return wrapper.eval()


# --- the subcommands ----------------------------------------------------------------------
def _cmd_info(args: argparse.Namespace) -> int:
    info = checkpoint_info(args.checkpoint)
    print(json.dumps(info, indent=2) if args.json else _format_info(info))
    return 0


def _check_output(path: str | None, what: str) -> None:
    if path is not None and not Path(path).expanduser().resolve().parent.is_dir():
        raise InputError(f"{what} {path}: its directory does not exist; create it first")


def _bits_list(
    wanted: Sequence[int] | None, calibrated: Sequence[int], bits: Sequence[int], what: str
) -> list[int]:
    if wanted is None:
        return list(calibrated)
    for b in wanted:
        if b not in bits:
            raise ConfigError(
                f"{what} {b}: the checkpoint runs at bits {', '.join(map(str, bits))}"
            )
        if b not in calibrated:
            raise ConfigError(
                f"{what} {b}: the checkpoint was never calibrated at {b} bits (calibrated: "
                f"{', '.join(map(str, calibrated))}); calibrate and save it again"
            )
    return list(dict.fromkeys(wanted))


def _cmd_eval(args: argparse.Namespace) -> int:
    _check_output(args.heatmap, "--heatmap")
    _check_output(args.json, "--json")
    if args.heatmap is not None:
        try:
            import matplotlib  # noqa: F401  (checked before the attack runs, not after)
        except ImportError:
            raise ImportError(
                "--heatmap needs matplotlib: pip install matplotlib (or 'triqdef[vision]')"
            ) from None
    wrapper = load_wrapper(args.checkpoint, args.model)
    calibrated = wrapper.calibrated_bits()
    sources = _bits_list(args.source_bits, calibrated, wrapper.bits, "--source-bits")
    targets = _bits_list(args.target_bits, calibrated, wrapper.bits, "--target-bits")
    data = dataset(args.data, args.root, train=args.split == "train", download=args.download)
    channels = int(data.data.shape[1])
    expected = wrapper.model.state_dict()
    first = next(v for k, v in expected.items() if k.endswith("weight") and v.dim() == 4)
    if int(first.shape[1]) != channels:
        raise InputError(
            f"{args.checkpoint} reads {first.shape[1]}-channel images but {data.name} has "
            f"{channels} channel(s); pass the --data it was trained on"
        )
    n = min(args.n_images, len(data))
    loader = DataLoader(Subset(data, range(n)), batch_size=args.batch_size)
    wrapper.to(args.device)
    steps = args.steps if args.steps is not None else _ATTACK_STEPS[args.attack]

    def make_attack(model: Any, bits: int) -> Any:
        if args.attack == "lavan":
            return LAVAN(
                model,
                args.patch_size,
                bits=bits,
                steps=steps,
                step_size=0.1 if args.step_size is None else args.step_size,
                seed=args.seed,
                region=args.region,
            )
        return AdversarialPatch(
            model,
            args.patch_size,
            bits=bits,
            steps=steps,
            step_size=0.05 if args.step_size is None else args.step_size,
            seed=args.seed,
            region=args.region,
        )

    m: TransferMatrix = transfer_matrix(
        wrapper,
        make_attack,
        loader,
        source_bits=sources,
        target_bits=targets,
        progress=args.progress,
        device=args.device,
        seed=args.seed,
    )
    side = args.patch_size
    print(
        f"{args.attack.upper()}, {side}x{side} patches ({args.region}), {steps} steps, on "
        f"{m.samples} {data.name} {args.split} images: ASR (%) of patches crafted at each "
        "source bit-width (rows), evaluated at each target bit-width (columns)"
    )
    print(m.to_markdown())
    if args.heatmap is not None:
        title = f"{Path(args.checkpoint).name}: {args.attack.upper()} ASR (%)"
        print(f"wrote {m.heatmap(args.heatmap, title=title)}")
    if args.json is not None:
        Path(args.json).write_text(json.dumps(m.to_dict(), indent=2))
        print(f"wrote {args.json}")
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    reproduce.from_args(args)
    return 0


# --- the parser ---------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def _bit_width(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a bit-width (2..32), got {text!r}") from None
    if not 2 <= value <= 32:
        raise argparse.ArgumentTypeError(f"expected a bit-width (2..32), got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``triqdef`` argument parser, with its three subcommands."""
    p = argparse.ArgumentParser(
        prog="triqdef",
        description="Quantized networks that resist adversarial patches across bit-widths: "
        "run the reproduction, evaluate a saved wrapper, inspect a checkpoint.",
        epilog="Run 'triqdef COMMAND --help' for a command's options. Exit status: 0 on "
        "success, 2 on a bad option or an error reported in one line.",
    )
    p.add_argument("--version", action="version", version=f"triqdef {triqdef.__version__}")
    sub = p.add_subparsers(
        dest="command", metavar="COMMAND", required=True, help="one of reproduce, eval, info"
    )

    doc = reproduce.__doc__ or ""
    rp = sub.add_parser(
        "reproduce",
        help="train every method and measure cross-bit patch transfer (the paper's experiment)",
        description=doc.splitlines()[0]
        + " Trains every method side by side, then writes clean accuracy and the "
        "source x target transfer matrices (LAVAN, GAP; seen, unseen and black-box "
        "patches) to --out as results.json, results.md and heatmaps.",
    )
    reproduce.add_arguments(rp)
    rp.set_defaults(func=_cmd_reproduce)

    ep = sub.add_parser(
        "eval",
        help="cross-bit transfer matrix of a patch attack on a saved wrapper",
        description="Craft patches on a saved TriQDefWrapper at each source bit-width and "
        "evaluate them at each target bit-width (triqdef.evaluate.transfer_matrix); prints "
        "the matrix (ASR in percent, with the noise floor of uniform-noise patches) and "
        "optionally writes it as a heatmap and as JSON.",
    )
    ep.add_argument("checkpoint", metavar="CHECKPOINT", help="a file written by triqdef.save")
    ep.add_argument(
        "--model",
        choices=MODELS,
        default=None,
        help="the wrapped architecture (default: read from the checkpoint; its input "
        "channels, classes and width always are)",
    )
    ep.add_argument(
        "--data",
        choices=DATASET_NAMES,
        default="auto",
        help="images to attack (default: auto, Fashion-MNIST when available, else digits)",
    )
    ep.add_argument("--root", default=None, metavar="DIR", help="data directory")
    ep.add_argument("--download", action="store_true", help="let torchvision download missing data")
    ep.add_argument(
        "--split", choices=("test", "train"), default="test", help="data split (default: test)"
    )
    ep.add_argument(
        "--n-images",
        type=_positive_int,
        default=500,
        metavar="N",
        help="attack the first N images of the split (default: 500)",
    )
    ep.add_argument(
        "--batch-size",
        type=_positive_int,
        default=250,
        metavar="B",
        help="images per batch (default: 250)",
    )
    ep.add_argument(
        "--attack",
        choices=("lavan", "gap"),
        default="lavan",
        help="lavan: a patch per image (LAVAN); gap: one universal patch per source "
        "bit-width (GAP) (default: lavan)",
    )
    ep.add_argument(
        "--patch-size",
        type=_positive_int,
        default=8,
        metavar="PX",
        help="patch side in pixels (default: 8, the reproduction's for 28x28 images)",
    )
    ep.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        metavar="N",
        help="attack steps (default: 50 for lavan, 100 for gap, the reproduction's --full)",
    )
    ep.add_argument(
        "--step-size",
        type=_positive_float,
        default=None,
        metavar="S",
        help="attack step size (default: 0.1 for lavan, 0.05 for gap)",
    )
    ep.add_argument(
        "--region",
        choices=list(REGIONS),
        default="any",
        help="where patches go (default: any)",
    )
    ep.add_argument(
        "--source-bits",
        type=_bit_width,
        nargs="+",
        default=None,
        metavar="BITS",
        help="bit-widths to craft at (default: every calibrated bit-width)",
    )
    ep.add_argument(
        "--target-bits",
        type=_bit_width,
        nargs="+",
        default=None,
        metavar="BITS",
        help="bit-widths to evaluate at (default: every calibrated bit-width)",
    )
    ep.add_argument(
        "--seed", type=int, default=0, help="seed of the attacks and noise patches (default: 0)"
    )
    ep.add_argument("--device", default="cpu", help="e.g. cuda (default: cpu)")
    ep.add_argument(
        "--heatmap", default=None, metavar="PNG", help="write the matrix as a heatmap (PNG)"
    )
    ep.add_argument(
        "--json", default=None, metavar="PATH", help="write the matrix as JSON (to_dict)"
    )
    ep.add_argument("--progress", action="store_true", help="show a progress bar (tqdm)")
    ep.set_defaults(func=_cmd_eval)

    ip = sub.add_parser(
        "info",
        help="what a checkpoint holds: bits, layers, calibrated bit-widths, format version",
        description="Print a checkpoint's metadata and which bit-widths were calibrated, "
        "read from the file alone (no model is built).",
    )
    ip.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a file written by triqdef.save or save_quantized"
    )
    ip.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ip.set_defaults(func=_cmd_info)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``triqdef`` command line.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        0 on success.

    Raises:
        SystemExit: with status 2 on a bad option, or after printing an error triqdef
            raised on purpose (or a missing optional dependency) as one line on stderr;
            with status 0 after ``--help`` or ``--version``.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (TriQDefError, ImportError) as exc:
        message = " ".join(str(exc).split())
        parser.exit(2, f"triqdef {args.command}: error: {message}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
