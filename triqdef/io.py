"""Checkpoints in safetensors: the whole wrapper, or integer codes for deployment."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Union

import torch

from ._checks import act_grid
from ._safetensors import contiguous_copies, read_safetensors, write_atomic
from .errors import CheckpointError, ConfigError, InputError
from .quant import _key
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


def _act_bits_json(act_bits):
    """``act_bits`` in JSON form: None, an int, or ``[[bits, act bits], ...]`` (JSON
    object keys would be strings)."""
    if isinstance(act_bits, dict):
        return [[b, a] for b, a in act_bits.items()]
    return act_bits


def _act_bits_from_json(value, path: Path):
    """Inverse of `_act_bits_json`; a malformed entry is a CheckpointError."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    ok = isinstance(value, list) and all(
        isinstance(p, list)
        and len(p) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in p)
        for p in value
    )
    if not ok:
        raise CheckpointError(
            f"{path}: its act_bits entry {value!r} is neither null, an int nor a list of "
            "[bits, activation bits] pairs; re-save it with triqdef.save"
        )
    return {b: a for b, a in value}


def _precision(wrapper, min_bits, act_bits) -> tuple:
    """What ``min_bits`` and ``act_bits`` mean for ``wrapper``'s bit-widths: the floors,
    and the activation bit-width at each bit-width below 32."""
    return dict(min_bits), [act_grid(act_bits, b) for b in wrapper.bits if b < 32]


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
        "min_bits": json.dumps(wrapper.min_bits),
        "act_bits": json.dumps(_act_bits_json(wrapper.act_bits)),
        "quantizer": json.dumps(wrapper.quantizer),
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
    layers read the model's input, for ``export`` after a load), the per-layer
    precision (``min_bits`` as resolved per layer, ``act_bits``), the ``quantizer``
    (its learned step sizes are tensors of the state dict) and a fingerprint of the
    architecture. It is written to a temporary file beside ``path`` and
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
    input); one written before per-layer precision and learned step sizes counts as
    ``min_bits=None``, ``act_bits=None``, ``quantizer="minmax"``. ``min_bits`` and
    ``act_bits`` are compared by what they mean (``{"conv*": 8}`` and ``{"conv1": 8,
    "conv2": 8}`` are the same floors; ``act_bits=8`` and ``{4: 8, 2: 8}`` the same
    activation bit-widths with ``bits=(32, 8, 4, 2)``).

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
    fields: tuple[str, ...] = ("bits", "layers", "exclude", "per_bit_bn", "input_bits")
    fields += ("input_layers", "min_bits", "act_bits", "quantizer")
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
    _check_precision(wrapper, parsed, path)
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


def _check_precision(wrapper, parsed: dict, path: Path) -> None:
    """Raise CheckpointError unless the file's min_bits, act_bits and quantizer (absent
    from older files: None, None, "minmax") mean what the wrapper's do."""
    quantizer = "minmax" if parsed["quantizer"] is None else parsed["quantizer"]
    if quantizer != wrapper.quantizer:
        raise CheckpointError(
            f"{path} was saved with quantizer={quantizer!r}, but this wrapper has "
            f"quantizer={wrapper.quantizer!r}; build the wrapper with the saved quantizer"
        )
    floors = {} if parsed["min_bits"] is None else parsed["min_bits"]
    if not isinstance(floors, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in floors.values()
    ):
        raise CheckpointError(
            f"{path}: its min_bits entry {floors!r} is not a mapping of layer names to "
            "bit-widths; re-save it with triqdef.save"
        )
    act = _act_bits_from_json(parsed["act_bits"], path)
    theirs = _precision(wrapper, floors, act)
    if theirs[0] != _precision(wrapper, wrapper.min_bits, wrapper.act_bits)[0]:
        raise CheckpointError(
            f"{path} was saved with min_bits={floors}, but this wrapper has "
            f"min_bits={wrapper.min_bits}; build the wrapper with the saved floors"
        )
    if theirs[1] != _precision(wrapper, wrapper.min_bits, wrapper.act_bits)[1]:
        raise CheckpointError(
            f"{path} was saved with act_bits={act}, but this wrapper has "
            f"act_bits={wrapper.act_bits}; build the wrapper with the saved act_bits"
        )


def save_quantized(wrapper: TriQDefWrapper, path: PathLike, bits: int) -> None:
    """Save the deployable model at ``bits`` with integer weight codes.

    Keys follow [`TriQDefWrapper.export`][triqdef.TriQDefWrapper.export]'s module, in
    which a quantized layer ``L`` becomes ``L.layer`` next to its frozen
    ``L.input_scale``. Each quantized weight ``K`` (e.g. ``L.layer.weight``) is stored
    as integer codes (int8 for a layer whose weights run at 8 bits or fewer, int16 up
    to 16 bits, int32 above) together with ``K_scale`` (float32, one per output
    channel: the min/max scales, or the learned step sizes with
    ``quantizer="lsq"``), so that ``weight = codes * K_scale[:, None, ...]``. A layer
    that ``min_bits`` keeps at 32 bits stores its float weights. The metadata entry
    ``integer_weights`` lists the integer keys and ``weight_bits`` the bit-width of
    each (``bits``, or the layer's ``min_bits`` floor above it); every other tensor is
    stored as exported. Written like [`save`][triqdef.io.save]: atomically, with the
    same errors.

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
    index = wrapper._ctx.qbits.index(bits)
    quantized, weight_bits = [], {}
    for name in wrapper.quantized_layers():
        q = wrapper._quantizer(name)
        grid = q.weight_grid[index]
        prefix = f"{name}.layer." if name else "layer."
        if grid >= 32 or not any(k.startswith(prefix) for k in tensors):
            continue  # full precision: min_bits=32, or a layer that never ran
        dtype = torch.int8 if grid <= 8 else torch.int16 if grid <= 16 else torch.int32
        layer = wrapper.model.get_submodule(name)
        for slot, (sub, pname) in enumerate(q.weights):
            key = prefix + (f"{sub}." if sub else "") + pname
            # the scale the codes were made with: the learned step, or the min/max scale
            # of the layer's own float weight, or, for a computed (parametrized) weight, of
            # the exported quantized copy, whose per-channel maximum is that of the float
            # weight it was made from
            own = (layer.get_submodule(sub) if sub else layer)._parameters.get(pname)
            original = own if own is not None else tensors[key]
            scale = q.weight_scales(original.detach().float(), index, slot)
            view = scale.reshape(-1, *([1] * (original.ndim - 1)))
            tensors[key] = torch.round(tensors[key].float() / view).to(dtype)
            tensors[key + "_scale"] = scale
            quantized.append(key)
            weight_bits[key] = grid
    meta = _metadata(
        wrapper,
        "quantized",
        export_bits=bits,
        integer_weights=quantized,
        weight_bits=weight_bits,
    )
    write_atomic(contiguous_copies(tensors), path, meta)
