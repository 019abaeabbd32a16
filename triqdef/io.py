"""Checkpoints in safetensors: the whole wrapper, or integer codes for deployment."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load as _load_bytes
from safetensors.torch import save_file
from torch import nn

from .errors import CheckpointError, CheckpointFileError, ConfigError, InputError
from .quant import _SIGNED, BatchNormStats, LayerQuantizer, weight_scale

if TYPE_CHECKING:
    from .wrapper import TriQDefWrapper

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


def _file_error(message: str, code: int | None = None) -> CheckpointFileError:
    exc = CheckpointFileError(message)
    exc.errno = code  # str() stays the message: no strerror / filename is set
    return exc


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
    text = os.fspath(path)
    if not isinstance(text, str):
        raise ConfigError(f"{fn}: path must name a str path, got {type(text).__name__} {text!r}")
    if "\x00" in text:
        raise InputError(
            f"{fn}: the path {text!r} contains a NUL character, which no file name can hold; "
            "pass the intended file name"
        )
    return Path(text)


def _write_atomic(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str]) -> None:
    """Write to a temporary file beside ``path`` and rename: never a half-written file.

    Raises [`CheckpointFileError`][triqdef.errors.CheckpointFileError] (an ``OSError``
    naming ``path``) when the file cannot be written; no temporary file is left behind.
    """
    path = Path(path)
    if path.is_dir():
        raise _file_error(
            f"cannot save to {path}: it is a directory; pass a file path inside it, "
            f"e.g. {path / 'checkpoint.safetensors'}",
            errno.EISDIR,
        )
    if not path.parent.is_dir():
        raise _file_error(
            f"cannot save to {path}: the directory {path.parent} does not exist; create it "
            "first (e.g. Path(...).mkdir(parents=True))",
            errno.ENOENT,
        )
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, _new_file_mode())  # the temporary file is 0600; the result a normal file
        os.replace(tmp, path)
        tmp = None
    except (OSError, SafetensorError) as exc:
        raise _file_error(
            f"cannot save to {path}: {type(exc).__name__}: {exc}; check that the directory "
            f"{path.parent} is writable and has free space (nothing was written)",
            getattr(exc, "errno", None),
        ) from exc
    finally:  # also on KeyboardInterrupt: never leave the temporary file behind
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _new_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _contiguous_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (tied weights, views)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


# --- checking a state dict ---------------------------------------------------------------
_OBSERVERS = ("act_min", "act_max")


def _value_rules(wrapper) -> dict[str, str]:
    """Key -> what its values must be: observers, observer kinds and BatchNorm statistics
    (per-bit rows, and the model's own 32-bit statistics)."""
    rules: dict[str, str] = {}
    for name, m in wrapper.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(m, LayerQuantizer):
            rules.update({prefix + k: "observer" for k in _OBSERVERS})
            rules[prefix + "act_kind"] = "kind"
        elif isinstance(m, BatchNormStats) or (
            isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        ):
            rules[prefix + "running_mean"] = "mean"
            rules[prefix + "running_var"] = "variance"
            rules[prefix + "num_batches_tracked"] = "count"
    return rules


def _kind_of(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating-point"
    return "integer"


def _rows(mask: torch.Tensor) -> str:
    bad = torch.nonzero(mask.reshape(-1)).reshape(-1)[:5].tolist()
    return f"{int(mask.sum())} value(s), first at flat index {bad}"


def _value_problem(key: str, v: torch.Tensor, mine: torch.Tensor, rule: str | None) -> str | None:
    """What is wrong with the values of ``v`` loaded into ``mine`` (None: nothing)."""
    if v.is_meta or v.numel() == 0:
        return None
    try:
        return _values(key, v, mine, rule)
    except (RuntimeError, NotImplementedError, TypeError) as exc:  # e.g. uint64 comparisons
        return (
            f"{key}: its {v.dtype} values cannot be checked ({type(exc).__name__}); "
            f"convert it to {mine.dtype}"
        )


def _values(key: str, v: torch.Tensor, mine: torch.Tensor, rule: str | None) -> str | None:
    if _kind_of(mine.dtype) == "integer" and v.dtype != mine.dtype:
        info = torch.iinfo(mine.dtype)
        if bool((v < info.min).any() or (v > info.max).any()):
            return f"{key}: values outside the range of {mine.dtype} [{info.min}, {info.max}]"
    if rule is None:
        return None
    cast = v.detach().to(mine.dtype) if v.dtype != mine.dtype else v.detach()
    if rule in ("observer", "mean", "variance"):
        bad = ~torch.isfinite(cast)
        if bool(bad.any()):
            what = "an observer" if rule == "observer" else "a BatchNorm statistic"
            return f"{key}: NaN/Inf in {what} ({_rows(bad)}); it must be finite"
        if rule == "variance" and bool((cast < 0).any()):
            return f"{key}: negative running variance ({_rows(cast < 0)}); it must be >= 0"
    elif rule == "kind":
        bad = (v < 0) | (v > _SIGNED)
        if bool(bad.any()):
            return (
                f"{key}: observer kinds outside 0..{_SIGNED} (0 unseen, 1 unsigned, 2 signed; "
                f"{_rows(bad)})"
            )
    elif rule == "count" and bool((v < 0).any()):
        return f"{key}: negative batch count ({_rows(v < 0)}); it must be >= 0"
    return None


def _list(items: list[str]) -> str:
    return f"{items[:5]}{' ...' if len(items) > 5 else ''}"


def check_state_dict(
    wrapper: TriQDefWrapper,
    state_dict: Mapping[str, torch.Tensor],
    strict: bool = True,
    *,
    exact_dtype: bool = False,
    source: str | None = None,
) -> None:
    """Raise if ``state_dict`` does not fit ``wrapper``; modify nothing.

    Checks, for every entry that
    [`TriQDefWrapper.load_state_dict`][triqdef.TriQDefWrapper.load_state_dict] would copy:

    * keys: missing and unexpected ones (when ``strict``);
    * types and shapes: a ``torch.Tensor`` (not on the ``meta`` device) of the
      wrapper's shape;
    * dtypes: the same kind as the wrapper's (floating point, integer, bool); with
      ``exact_dtype`` exactly the wrapper's dtype; integers must fit the wrapper's
      integer dtype;
    * values: observers (``act_min``, ``act_max``) and BatchNorm ``running_mean`` /
      ``running_var`` (per-bit rows and the model's own) finite, ``running_var >= 0``,
      ``num_batches_tracked >= 0``, observer kinds ``act_kind`` in 0..2.

    Args:
        wrapper: the [`TriQDefWrapper`][triqdef.TriQDefWrapper] to load into.
        state_dict: a mapping from keys of ``wrapper.state_dict()`` to tensors.
        strict: also require exactly the wrapper's keys, as ``nn.Module.load_state_dict``.
        exact_dtype: require every tensor's dtype to be the wrapper's (as
            [`triqdef.load`][triqdef.io.load] does, and ``load_state_dict(assign=True)``).
        source: where the state dict comes from (a file), named in the message.

    Raises:
        InputError: ``state_dict`` is not a mapping with str keys.
        CheckpointError: anything listed above does not fit; the message names the
            entries (at most five per problem) and ``source``.
    """
    where = f"{source}: " if source is not None else ""
    if not isinstance(state_dict, Mapping):
        raise InputError(
            f"{where}load_state_dict needs a mapping from keys to tensors (e.g. "
            f"wrapper.state_dict()), got {type(state_dict).__name__}"
        )
    odd = [repr(k) for k in state_dict if not isinstance(k, str)]
    if odd:
        raise InputError(f"{where}state_dict keys must be str, got {_list(odd)}")
    own = wrapper.state_dict()
    problems = []
    if strict:
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        if missing:
            problems.append(f"missing keys {_list(missing)}")
        if unexpected:
            problems.append(f"unexpected keys {_list(unexpected)}")
    shared = [k for k in state_dict if k in own]
    types = [
        f"{k}: {type(state_dict[k]).__name__}"
        for k in shared
        if not isinstance(state_dict[k], torch.Tensor)
    ]
    if types:
        problems.append(f"values that are not tensors {_list(types)}")
    tensors = {k: state_dict[k] for k in shared if isinstance(state_dict[k], torch.Tensor)}
    shapes = [
        f"{k}: given {tuple(v.shape)} vs wrapper {tuple(own[k].shape)}"
        for k, v in tensors.items()
        if v.shape != own[k].shape
    ]
    if shapes:
        problems.append(f"shape mismatches {_list(shapes)}")
    meta = [k for k, v in tensors.items() if v.is_meta and not own[k].is_meta]
    if meta:
        problems.append(f"tensors on the meta device, which hold no values {_list(meta)}")
    same = (lambda a, b: a == b) if exact_dtype else (lambda a, b: _kind_of(a) == _kind_of(b))
    dtypes = [
        f"{k}: given {v.dtype} vs wrapper {own[k].dtype}"
        for k, v in tensors.items()
        if not same(v.dtype, own[k].dtype)
    ]
    if dtypes:
        problems.append(f"dtype mismatches {_list(dtypes)}")
    if not problems:  # values only once types, shapes and dtypes are right
        rules = _value_rules(wrapper)
        values = [_value_problem(k, v, own[k], rules.get(k)) for k, v in tensors.items()]
        values = [p for p in values if p is not None]
        if values:
            problems.append(f"invalid values {_list(values)}")
    if problems:
        hint = (
            "re-save it from a healthy wrapper, or convert the wrapper (e.g. .float()) to the "
            "saved dtypes"
            if dtypes
            else "build the wrapper like the one that was saved, or fix the listed entries"
        )
        raise CheckpointError(
            f"{where}state_dict does not fit this wrapper: " + "; ".join(problems) + f" ({hint})"
        )


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
    _write_atomic(_contiguous_copies(wrapper.state_dict()), path, _metadata(wrapper, "wrapper"))


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one safetensors file, from one read of its bytes.

    One open, one read: a writer replacing the file meanwhile cannot pair this file's
    metadata with another file's tensors.
    """
    if path.is_dir():
        raise _file_error(
            f"{path} is a directory, not a checkpoint file; pass the file written by triqdef.save",
            errno.EISDIR,
        )
    if path.exists() and not path.is_file():  # a FIFO or device would block or never end
        raise _file_error(f"{path} is not a regular file, not a checkpoint", errno.EINVAL)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise _file_error(
            f"{path}: no such checkpoint file; check the path", errno.ENOENT
        ) from None
    except OSError as exc:
        raise _file_error(
            f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})", exc.errno
        ) from None
    try:
        tensors = _load_bytes(data)
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + size])
    except Exception as exc:  # safetensors reports truncation/corruption with its own types
        raise CheckpointError(
            f"{path} is not a readable safetensors file (truncated or corrupt?): {exc}"
        ) from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    meta = meta or {}
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{path}: its metadata is not a mapping of strings: {meta!r}")
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
    from .wrapper import _key

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
            wrapper.quantizers[_key(name)].reads_input = name in readers


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
