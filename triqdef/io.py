"""Checkpoints in safetensors: the whole wrapper, or integer codes for deployment."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Union

import torch

from ._safetensors import contiguous_copies, read_safetensors, write_atomic
from .errors import CheckpointError, ConfigError, InputError
from .quant import _key, weight_scale
from .wrapper import TriQDefWrapper, check_state_dict

PathLike = Union[str, "os.PathLike[str]"]

__all__ = [
    "save",
    "load",
    "save_quantized",
    "check_state_dict",
    "FORMAT_VERSION",
]

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
    if not isinstance(wrapper, TriQDefWrapper):
        raise ConfigError(f"{fn} needs a TriQDefWrapper, got {type(wrapper).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigError(f"{fn}: path must be a str or os.PathLike, got {type(path).__name__}")
    text = os.fspath(path)
    if not isinstance(text, str):
        raise ConfigError(f"{fn}: path must name a str path, got {type(text).__name__} {text!r}")
    if "\x00" in text:
        raise InputError(
            f"{fn}: the path {text!r} contains a NUL character, which no file name can hold; "
            "pass the intended file name"
        )
    return Path(text)


# --- save / load -------------------------------------------------------------------------
def save(wrapper: TriQDefWrapper, path: PathLike) -> None:
    """Save weights, every per-bit quantizer and BatchNorm state, and metadata.

    The file is a safetensors file whose metadata records the format version,
    ``bits``, ``layers``, ``exclude``, ``per_bit_bn``, ``input_bits`` (and which
    layers read the model's input, for ``export`` after a load) and a fingerprint
    of the architecture. It is written to a temporary file beside ``path`` and
    renamed, so an interrupted or failed save never leaves a file that loads, nor a
    temporary file.

    Args:
        wrapper: a [`TriQDefWrapper`][triqdef.TriQDefWrapper].
        path: destination file (conventionally ``*.safetensors``).

    Raises:
        ConfigError: ``wrapper`` is not a wrapper, or ``path`` not a str or path.
        InputError: ``path`` contains a NUL character.
        CheckpointFileError: ``path`` is a directory, its directory does not exist or
            is not writable (read-only, no permission, disk full); also an ``OSError``.
    """
    path = _check_args(wrapper, path, "save")
    write_atomic(contiguous_copies(wrapper.state_dict()), path, _metadata(wrapper, "wrapper"))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one file written by triqdef, from one read of its bytes."""
    tensors, meta = read_safetensors(path, "checkpoint", "triqdef.save")
    if meta.get("format") != _FORMAT:
        raise CheckpointError(f"{path} was not written by triqdef (metadata: {meta})")
    return tensors, meta


def _json_field(meta: dict[str, str], field: str, path: Path):
    """One JSON metadata entry (absent: None); malformed JSON is a CheckpointError."""
    try:
        return json.loads(meta.get(field, "null"))
    except ValueError as exc:  # json.JSONDecodeError
        raise CheckpointError(
            f"{path}: the metadata entry {field!r} is not valid JSON ({exc}: "
            f"{meta.get(field)!r}); the file was damaged or edited by hand, re-save it "
            "with triqdef.save"
        ) from None


def load(wrapper: TriQDefWrapper, path: PathLike) -> None:
    """Load a file written by [`save`][triqdef.io.save] into ``wrapper``, in place.

    The file is read once (metadata and tensors from the same bytes), and
    everything is checked before anything is copied: a file made for other
    bit-widths, layers, ``input_bits`` or another architecture, malformed metadata,
    tensors of another dtype than the wrapper's, NaN/Inf observers or BatchNorm
    statistics, a negative running variance or an out-of-range observer kind (see
    [`check_state_dict`][triqdef.io.check_state_dict]), or a truncated or corrupt
    file raises [`CheckpointError`][triqdef.errors.CheckpointError] naming the
    file and leaves the wrapper unchanged. A file written before ``input_bits``
    existed counts as ``input_bits=None`` (its input was quantized like any layer
    input).

    Args:
        wrapper: a [`TriQDefWrapper`][triqdef.TriQDefWrapper] built like the saved one.
        path: a file written by [`save`][triqdef.io.save].

    Raises:
        ConfigError: ``wrapper`` is not a wrapper, or ``path`` not a str or path.
        InputError: ``path`` contains a NUL character.
        CheckpointFileError: ``path`` is missing, a directory or unreadable; a
            [`CheckpointError`][triqdef.errors.CheckpointError] and an ``OSError``.
        CheckpointError: the file does not fit the wrapper or is damaged.
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
    fields = ("bits", "layers", "exclude", "per_bit_bn", "input_bits", "input_layers")
    parsed = {field: _json_field(meta, field, path) for field in fields}
    for field, mine in (
        ("bits", list(wrapper.bits)),
        ("layers", list(wrapper.layers)),
        ("exclude", list(wrapper.exclude)),
        ("per_bit_bn", wrapper.per_bit_bn),
        ("input_bits", wrapper.input_bits),  # absent from older files: None
    ):
        theirs = parsed[field]
        if theirs != mine or type(theirs) is not type(mine):
            raise CheckpointError(
                f"{path} was saved with {field}={theirs}, but this wrapper has {field}={mine}"
            )
    if meta.get("architecture") != _architecture(wrapper):
        raise CheckpointError(
            f"{path} was saved from a different architecture ({meta.get('model_class')}, "
            f"fingerprint {meta.get('architecture')}) than this wrapper's "
            f"{type(wrapper.model).__qualname__} (fingerprint {_architecture(wrapper)})"
        )
    readers = parsed["input_layers"]
    known = wrapper.quantized_layers()
    if readers is not None and (
        not isinstance(readers, list) or any(n not in known for n in readers)
    ):
        raise CheckpointError(f"{path}: its input_layers entry {readers!r} names no known layer")
    check_state_dict(wrapper, tensors, strict=True, exact_dtype=True, source=str(path))
    wrapper.load_state_dict(tensors)
    if readers is not None:
        for name in known:
            wrapper._quantizer(name).reads_input = name in readers


def save_quantized(wrapper: TriQDefWrapper, path: PathLike, bits: int) -> None:
    """Save the deployable model at ``bits`` with integer weight codes.

    Keys follow [`TriQDefWrapper.export`][triqdef.TriQDefWrapper.export]'s module, in
    which a quantized layer ``L`` becomes ``L.layer`` next to its frozen
    ``L.input_scale``. Each quantized weight ``K`` (e.g. ``L.layer.weight``) is stored
    as integer codes (int8 for ``bits <= 8``, int16 up to 16 bits, int32 above)
    together with ``K_scale`` (float32, one per output channel), so that
    ``weight = codes * K_scale[:, None, ...]``. The metadata entry
    ``integer_weights`` lists those keys; every other tensor is stored as exported.
    Written like [`save`][triqdef.io.save]: atomically, with the same errors.

    Args:
        wrapper: a [`TriQDefWrapper`][triqdef.TriQDefWrapper].
        path: destination file.
        bits: one of ``wrapper.bits`` below 32.
    """
    path = _check_args(wrapper, path, "save_quantized")
    if isinstance(bits, bool) or bits not in wrapper.bits or bits >= 32:
        low = [b for b in wrapper.bits if b < 32]
        raise ConfigError(f"save_quantized needs one of the bit-widths {low}, got {bits!r}")
    exported = wrapper.export(bits)
    tensors = dict(exported.state_dict())
    dtype = torch.int8 if bits <= 8 else torch.int16 if bits <= 16 else torch.int32
    quantized = []
    for name in wrapper.quantized_layers():
        layer = wrapper.model.get_submodule(name)
        prefix = f"{name}.layer." if name else "layer."
        for sub, pname in wrapper._quantizer(name).weights:
            key = prefix + (f"{sub}." if sub else "") + pname
            # the scale the codes were made with: from the layer's own float weight, or,
            # for a computed (parametrized) weight, from the exported quantized copy,
            # whose per-channel maximum is that of the float weight it was made from
            own = (layer.get_submodule(sub) if sub else layer)._parameters.get(pname)
            original = own if own is not None else tensors[key]
            scale = weight_scale(original.detach().float(), bits)
            view = scale.reshape(-1, *([1] * (original.ndim - 1)))
            tensors[key] = torch.round(tensors[key].float() / view).to(dtype)
            tensors[key + "_scale"] = scale
            quantized.append(key)
    meta = _metadata(wrapper, "quantized", export_bits=bits, integer_weights=quantized)
    write_atomic(contiguous_copies(tensors), path, meta)
