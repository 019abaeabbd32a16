"""Checkpoints in safetensors: the whole wrapper, or integer codes for deployment."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError
from .quant import weight_scale

if TYPE_CHECKING:
    from .wrapper import TriQDefWrapper

PathLike = Union[str, "os.PathLike[str]"]

__all__ = ["save", "load", "save_quantized", "check_state_dict", "FORMAT_VERSION"]

FORMAT_VERSION = "1"
_FORMAT = "triqdef"


def _architecture(wrapper) -> str:
    """Fingerprint of the inner model: its class and every state-dict key and shape."""
    desc = [type(wrapper.model).__qualname__] + [
        f"{k}:{tuple(v.shape)}" for k, v in wrapper.model.state_dict().items()
    ]
    return hashlib.sha256("\n".join(desc).encode()).hexdigest()[:16]


def _input_layers(wrapper) -> list[str] | None:
    """The quantized layers seen reading the model's own input (None: not seen yet)."""
    from .wrapper import _key

    names = wrapper.quantized_layers()
    readers = [wrapper.quantizers[_key(n)].reads_input for n in names]
    if all(r is None for r in readers):
        return None
    return [n for n, r in zip(names, readers) if r]


def _metadata(wrapper, kind: str, **extra) -> dict[str, str]:
    meta = {
        "format": _FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "bits": json.dumps(list(wrapper.bits)),
        "layers": json.dumps(list(wrapper.layers)),
        "exclude": json.dumps(list(wrapper.exclude)),
        "per_bit_bn": json.dumps(wrapper.per_bit_bn),
        "input_bits": json.dumps(wrapper.input_bits),
        "input_layers": json.dumps(_input_layers(wrapper)),
        "model_class": type(wrapper.model).__qualname__,
        "architecture": _architecture(wrapper),
    }
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    return meta


def _check_args(wrapper, path, fn: str) -> Path:
    from .wrapper import TriQDefWrapper

    if not isinstance(wrapper, TriQDefWrapper):
        raise ConfigError(f"{fn} needs a TriQDefWrapper, got {type(wrapper).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"{fn}: path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _write_atomic(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str]) -> None:
    """Write to a temporary file beside ``path`` and rename: never a half-written file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: the directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _contiguous_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights, views)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def check_state_dict(
    wrapper: TriQDefWrapper, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Raise :class:`CheckpointError` if ``state_dict`` does not fit ``wrapper``.

    Checks missing and unexpected keys (when ``strict``) and every shape,
    without modifying anything.
    """
    own = wrapper.state_dict()
    problems = []
    if strict:
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing:
            problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            more = " ..." if len(unexpected) > 5 else ""
            problems.append(f"unexpected keys {unexpected[:5]}{more}")
    shapes = [
        f"{k}: file {tuple(v.shape)} vs wrapper {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    if shapes:
        problems.append(f"shape mismatches {shapes[:5]}{' ...' if len(shapes) > 5 else ''}")
    if problems:
        raise CheckpointError("state_dict does not fit this wrapper: " + "; ".join(problems))


def save(wrapper: TriQDefWrapper, path: PathLike) -> None:
    """Save weights, every per-bit quantizer and BatchNorm state, and metadata.

    The file is a safetensors file whose metadata records the format version,
    ``bits``, ``layers``, ``exclude``, ``per_bit_bn``, ``input_bits`` (and which
    layers read the model's input, for ``export`` after a load) and a fingerprint
    of the architecture. It is
    written to a temporary file and renamed, so an interrupted save never leaves
    a file that loads.

    Args:
        wrapper: a :class:`~triqdef.TriQDefWrapper`.
        path: destination file (conventionally ``*.safetensors``).
    """
    path = _check_args(wrapper, path, "save")
    _write_atomic(_contiguous_copies(wrapper.state_dict()), path, _metadata(wrapper, "wrapper"))


def _read(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors reports truncation/corruption with its own types
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from None
    if meta.get("format") != _FORMAT:
        raise CheckpointError(f"{path} was not written by triqdef (metadata: {meta})")
    return tensors, meta


def load(wrapper: TriQDefWrapper, path: PathLike) -> None:
    """Load a file written by :func:`save` into ``wrapper``, in place.

    Everything is read and checked before anything is copied: a file made for
    other bit-widths, layers, ``input_bits`` or another architecture, or a
    truncated or corrupt file, raises
    [`CheckpointError`][triqdef.errors.CheckpointError] and leaves the wrapper
    unchanged. A file written before ``input_bits`` existed counts as
    ``input_bits=None`` (its input was quantized like any layer input).

    Args:
        wrapper: a :class:`~triqdef.TriQDefWrapper` built like the saved one.
        path: a file written by :func:`save`.
    """
    path = _check_args(wrapper, path, "load")
    tensors, meta = _read(path)
    if meta.get("kind") != "wrapper":
        raise CheckpointError(f"{path} holds a {meta.get('kind')!r} export, not a wrapper")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format version {meta.get('format_version')}, "
            f"this triqdef reads version {FORMAT_VERSION}"
        )
    for field, mine in (
        ("bits", list(wrapper.bits)),
        ("layers", list(wrapper.layers)),
        ("exclude", list(wrapper.exclude)),
        ("per_bit_bn", wrapper.per_bit_bn),
        ("input_bits", wrapper.input_bits),  # absent from older files: None
    ):
        theirs = json.loads(meta.get(field, "null"))
        if theirs != mine:
            raise CheckpointError(
                f"{path} was saved with {field}={theirs}, but this wrapper has {field}={mine}"
            )
    if meta.get("architecture") != _architecture(wrapper):
        raise CheckpointError(
            f"{path} was saved from a different architecture ({meta.get('model_class')}, "
            f"fingerprint {meta.get('architecture')}) than this wrapper's "
            f"{type(wrapper.model).__qualname__} (fingerprint {_architecture(wrapper)})"
        )
    from .wrapper import _key

    try:
        readers = json.loads(meta.get("input_layers", "null"))
    except ValueError:
        readers = "?"
    known = wrapper.quantized_layers()
    if readers is not None and (
        not isinstance(readers, list) or any(n not in known for n in readers)
    ):
        raise CheckpointError(f"{path}: its input_layers entry {readers!r} names no known layer")
    wrapper.load_state_dict(tensors)
    if readers is not None:
        for name in known:
            wrapper.quantizers[_key(name)].reads_input = name in readers


def save_quantized(wrapper: TriQDefWrapper, path: PathLike, bits: int) -> None:
    """Save the deployable model at ``bits`` with integer weight codes.

    Keys follow :meth:`TriQDefWrapper.export`'s module, in which a quantized
    layer ``L`` becomes ``L.layer`` next to its frozen ``L.input_scale``. Each
    quantized weight ``K`` (e.g. ``L.layer.weight``) is stored as integer codes
    (int8 for ``bits <= 8``, int16 up to 16 bits, int32 above) together with
    ``K_scale`` (float32, one per output channel), so that
    ``weight = codes * K_scale[:, None, ...]``. The metadata entry
    ``integer_weights`` lists those keys; every other tensor is stored as exported.

    Args:
        wrapper: a :class:`~triqdef.TriQDefWrapper`.
        path: destination file.
        bits: one of ``wrapper.bits`` below 32.
    """
    path = _check_args(wrapper, path, "save_quantized")
    if isinstance(bits, bool) or bits not in wrapper.bits or bits >= 32:
        low = [b for b in wrapper.bits if b < 32]
        raise ConfigError(f"save_quantized needs one of the bit-widths {low}, got {bits!r}")
    from .wrapper import _key

    exported = wrapper.export(bits)
    tensors = dict(exported.state_dict())
    dtype = torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32
    quantized = []
    for name in wrapper.quantized_layers():
        layer = wrapper.model.get_submodule(name)
        prefix = f"{name}.layer." if name else "layer."
        for sub, pname in wrapper.quantizers[_key(name)].weights:
            key = prefix + (f"{sub}." if sub else "") + pname
            original = (layer.get_submodule(sub) if sub else layer)._parameters[pname]
            scale = weight_scale(original, bits)  # the scale the codes were made with
            view = scale.reshape(-1, *([1] * (original.ndim - 1)))
            tensors[key] = torch.round(tensors[key].float() / view).to(dtype)
            tensors[key + "_scale"] = scale
            quantized.append(key)
    meta = _metadata(wrapper, "quantized", export_bits=bits, integer_weights=quantized)
    _write_atomic(_contiguous_copies(tensors), path, meta)
