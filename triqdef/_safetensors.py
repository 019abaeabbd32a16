"""Safetensors files on disk: an atomic writer and a reader that checks what it reads."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file

from .errors import CheckpointError, CheckpointFileError

__all__ = ["contiguous_copies", "file_error", "read_safetensors", "write_atomic"]


def file_error(message: str, code: int | None = None) -> CheckpointFileError:
    """A [`CheckpointFileError`][triqdef.errors.CheckpointFileError] with ``errno`` set."""
    exc = CheckpointFileError(message)
    exc.errno = code  # str() stays the message: no strerror / filename is set
    return exc


def contiguous_copies(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached contiguous CPU copies: safetensors refuses tensors that share storage
    (tied weights, views)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}


def _new_file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomic(
    tensors: dict[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str],
    save: Callable[..., Any] | None = None,
) -> None:
    """Write to a temporary file beside ``path`` and rename: never a half-written file.

    ``save`` is the safetensors writer, ``save_file(tensors, filename, metadata=...)``
    (default: `safetensors.torch.save_file`).

    Raises [`CheckpointFileError`][triqdef.errors.CheckpointFileError] (an ``OSError``
    naming ``path``) when the file cannot be written; no temporary file is left behind.
    """
    save = save_file if save is None else save
    path = Path(path)
    if path.is_dir():
        raise file_error(
            f"cannot save to {path}: it is a directory; pass a file path inside it, "
            f"e.g. {path / 'checkpoint.safetensors'}",
            errno.EISDIR,
        )
    if not path.parent.is_dir():
        raise file_error(
            f"cannot save to {path}: the directory {path.parent} does not exist; create it "
            "first (e.g. Path(...).mkdir(parents=True))",
            errno.ENOENT,
        )
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        save(tensors, tmp, metadata=metadata)
        os.chmod(tmp, _new_file_mode())  # the temporary file is 0600; the result a normal file
        os.replace(tmp, path)
        tmp = None
    except (OSError, SafetensorError) as exc:
        raise file_error(
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


def read_safetensors(
    path: Path, what: str = "checkpoint", writer: str = "triqdef.save"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one safetensors file, from one read of its bytes.

    One open, one read: a writer replacing the file meanwhile cannot pair this file's
    metadata with another file's tensors. ``what`` names the kind of file and
    ``writer`` the function that writes it, in the messages.

    Raises:
        CheckpointFileError: ``path`` is a directory, not a regular file, missing or
            unreadable.
        CheckpointError: the file is not a readable safetensors file (truncated or
            corrupt), or its metadata is not a mapping of strings.
    """
    if path.is_dir():
        raise file_error(
            f"{path} is a directory, not a {what} file; pass the file written by {writer}",
            errno.EISDIR,
        )
    if path.exists() and not path.is_file():  # a FIFO or device would block or never end
        raise file_error(f"{path} is not a regular file, not a {what}", errno.EINVAL)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise file_error(f"{path}: no such {what} file; check the path", errno.ENOENT) from None
    except OSError as exc:
        raise file_error(
            f"{path}: cannot read the {what} ({type(exc).__name__}: {exc})", exc.errno
        ) from None
    try:
        tensors = load_bytes(data)
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
    return tensors, meta
