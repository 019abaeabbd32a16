"""Offline data helpers: Fashion-MNIST from local IDX files and scikit-learn's digits.

Nothing here downloads anything. Every loader returns CPU tensors: images as
``float32`` in ``[0, 1]`` with shape (N, C, H, W), labels as ``int64`` with
shape (N,).
"""

from __future__ import annotations

import gzip
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from triqdef.errors import InputError

__all__ = [
    "DATASET_NAMES",
    "FASHION_MNIST_FILES",
    "DEBIAN_FASHION_MNIST_DIR",
    "read_idx",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "load_digits",
    "load_dataset",
    "iterate_minibatches",
]

DATASET_NAMES: tuple[str, ...] = ("auto", "fashion-mnist", "digits")
"""Names accepted by [`load_dataset`][triqdef.data.load_dataset]."""

FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
"""IDX file names of Fashion-MNIST, keyed by split, as ``(images, labels)``."""

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``fashion-mnist`` package installs the IDX files."""

# IDX type code (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path, expected_magic: int | None = None) -> np.ndarray:
    """Read an IDX file (the MNIST container format), gzip-compressed or not.

    The header is big-endian: a 4-byte magic number (two zero bytes, a type
    code, the number of dimensions), then one 4-byte size per dimension,
    followed by the data in C order.

    Args:
        path: Path of the file; gzip compression is detected from its content.
        expected_magic: If given, the magic number the file must carry, e.g.
            ``2051`` (``0x00000803``: ubyte, 3 dims) for image files and
            ``2049`` (``0x00000801``: ubyte, 1 dim) for label files.

    Returns:
        The array, with the shape given in the header and the dtype given by
        the type code (``uint8`` for Fashion-MNIST).

    Raises:
        InputError: If the file cannot be read, is not valid gzip, has a bad
            or unexpected magic number, or its size disagrees with its header.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise InputError(f"cannot read IDX file {path}: {exc}") from exc
    if len(raw) < 4:
        raise InputError(f"{path} is not an IDX file: only {len(raw)} bytes")
    magic = int.from_bytes(raw[:4], "big")
    type_code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or type_code not in _IDX_DTYPES or ndim == 0:
        raise InputError(f"{path} is not an IDX file: bad magic number 0x{magic:08x}")
    if expected_magic is not None and magic != expected_magic:
        raise InputError(
            f"{path}: IDX magic number is {magic} (0x{magic:08x}), expected "
            f"{expected_magic} (0x{expected_magic:08x})"
        )
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise InputError(f"{path}: IDX header truncated ({len(raw)} bytes, need {header_len})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = len(raw) - header_len
    if payload != expected:
        raise InputError(
            f"{path}: IDX header announces shape {shape} ({expected} data bytes) but the file "
            f"holds {payload} data bytes"
        )
    arr = np.frombuffer(raw, dtype=dtype, offset=header_len).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _candidate_dirs(root: str | Path | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        root = Path(root).expanduser()
        dirs += [root, root / "FashionMNIST" / "raw"]
    dirs.append(DEBIAN_FASHION_MNIST_DIR)
    return dirs


def find_fashion_mnist(root: str | Path | None = None, train: bool = True) -> Path | None:
    """Find the directory holding the Fashion-MNIST IDX files of one split.

    Searched in order: ``root``, ``root/FashionMNIST/raw`` (torchvision's
    layout), then
    [`DEBIAN_FASHION_MNIST_DIR`][triqdef.data.DEBIAN_FASHION_MNIST_DIR]. A
    directory matches when both the image and the label file of the split are
    in it.

    Args:
        root: Optional directory to search first.
        train: Look for the 60k training files if true, else the 10k test files.

    Returns:
        The first matching directory, or ``None`` when none matches.
    """
    names = FASHION_MNIST_FILES["train" if train else "test"]
    for d in _candidate_dirs(root):
        if all((d / n).is_file() for n in names):
            return d
    return None


def load_fashion_mnist(root: str | Path | None = None, train: bool = True) -> tuple[Tensor, Tensor]:
    """Load Fashion-MNIST from local IDX gzip files (no download).

    See [`find_fashion_mnist`][triqdef.data.find_fashion_mnist] for the directories searched.

    Args:
        root: Optional directory to search first; both ``root`` itself and
            ``root/FashionMNIST/raw`` are tried.
        train: Load the 60,000 training images if true, else the 10,000 test images.

    Returns:
        ``(images, labels)``: images of shape (N, 1, 28, 28), ``float32`` in
        ``[0, 1]``; labels of shape (N,), ``int64`` in ``0..9``.

    Raises:
        InputError: If the files are found nowhere (the message lists the
            paths searched) or are malformed.
    """
    split = "train" if train else "test"
    img_name, lbl_name = FASHION_MNIST_FILES[split]
    d = find_fashion_mnist(root, train)
    if d is None:
        searched = ", ".join(str(p) for p in _candidate_dirs(root))
        raise InputError(
            f"Fashion-MNIST {split} files ({img_name}, {lbl_name}) not found; searched: "
            f"{searched}. Pass root= pointing at a directory holding them (e.g. install "
            "Debian's fashion-mnist package, or copy the IDX .gz files there)."
        )
    images = read_idx(d / img_name, expected_magic=2051)
    labels = read_idx(d / lbl_name, expected_magic=2049)
    if images.shape[0] != labels.shape[0]:
        raise InputError(
            f"Fashion-MNIST in {d}: {images.shape[0]} images but {labels.shape[0]} labels"
        )
    if images.shape[1:] != (28, 28):
        raise InputError(f"Fashion-MNIST in {d}: images are {images.shape[1:]}, expected (28, 28)")
    if labels.size and labels.max() > 9:
        raise InputError(f"Fashion-MNIST in {d}: label {int(labels.max())} out of range 0..9")
    x = torch.from_numpy(images).unsqueeze(1).to(torch.float32).div_(255.0)
    y = torch.from_numpy(labels).to(torch.int64)
    return x, y


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"size must be a positive int, got {size!r}")
    return size


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-2:] == (size, size):
        return x
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0)


def load_digits(size: int = 28, train: bool = True, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Load scikit-learn's 8x8 handwritten digits, upscaled to ``size x size``.

    The 1,797 images ship with scikit-learn (no download). Pixel values
    ``0..16`` are scaled to ``[0, 1]`` and resized with bilinear
    interpolation. The data is split 80/20 into train/test by a random
    permutation drawn from ``seed``, so the split is the same on every call
    with the same seed and the two splits never overlap.

    Args:
        size: Side of the output images in pixels.
        train: Return the 80% training split if true, else the 20% test split.
        seed: Seed of the split permutation.

    Returns:
        ``(images, labels)``: images of shape (N, 1, size, size), ``float32``
        in ``[0, 1]``; labels of shape (N,), ``int64`` in ``0..9``.
        N is 1438 for train and 359 for test.

    Raises:
        InputError: If ``size`` is not a positive int.
    """
    size = _check_size(size)
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / 16.0
    labels = np.asarray(bunch.target, dtype=np.int64)
    n = images.shape[0]
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(0.2 * n))
    idx = perm[n_test:] if train else perm[:n_test]
    idx = np.sort(idx)
    x = torch.from_numpy(np.ascontiguousarray(images[idx])).unsqueeze(1)
    y = torch.from_numpy(np.ascontiguousarray(labels[idx]))
    return _resize(x, size).contiguous(), y


def _normalize_name(name: object) -> str:
    if not isinstance(name, str):
        raise InputError(f"dataset name must be a str, one of {DATASET_NAMES}, got {name!r}")
    key = name.strip().lower().replace("_", "-")
    if key == "fashionmnist":
        key = "fashion-mnist"
    if key not in DATASET_NAMES:
        raise InputError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return key


def load_dataset(
    name: str = "auto", train: bool = True, root: str | Path | None = None, size: int = 28
) -> tuple[Tensor, Tensor, str]:
    """Load a dataset by name, falling back to what is available offline.

    Args:
        name: One of [`DATASET_NAMES`][triqdef.data.DATASET_NAMES]:
            ``"fashion-mnist"``, ``"digits"`` or ``"auto"`` (Fashion-MNIST
            when its files are found, else digits). Case and ``_`` versus ``-`` do not matter.
        train: Load the training split if true, else the test split.
        root: Directory searched first for the Fashion-MNIST files.
        size: Side of the returned images; Fashion-MNIST is resized with
            bilinear interpolation when ``size != 28``.

    Returns:
        ``(images, labels, name_used)``: images of shape (N, 1, size, size),
        ``float32`` in ``[0, 1]``; labels of shape (N,), ``int64``; and the
        name of the dataset actually loaded (``"fashion-mnist"`` or
        ``"digits"``), so callers can report it.

    Raises:
        InputError: If ``name`` is unknown, ``size`` is invalid, or an
            explicitly requested dataset cannot be loaded.
    """
    key = _normalize_name(name)
    size = _check_size(size)
    if key == "auto":
        key = "fashion-mnist" if find_fashion_mnist(root, train) is not None else "digits"
    if key == "fashion-mnist":
        x, y = load_fashion_mnist(root, train)
        return _resize(x, size), y, key
    x, y = load_digits(size=size, train=train)
    return x, y, key


def iterate_minibatches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(xb, yb)`` minibatches over paired tensors.

    Args:
        x: Inputs of shape (N, ...), e.g. (N, 1, 28, 28).
        y: Targets of shape (N, ...).
        batch_size: Samples per batch; the last batch may be smaller unless
            ``drop_last`` is set.
        shuffle: Visit the samples in a random order (from ``generator``).
        generator: Optional CPU `torch.Generator` for reproducible order.
        drop_last: Skip a final batch smaller than ``batch_size``.

    Yields:
        ``(xb, yb)`` with shapes (b, ...) and (b, ...), on the
        device of ``x`` and ``y``.

    Raises:
        InputError: If ``x`` and ``y`` are not tensors with the same first
            dimension, or ``batch_size`` is not a positive int.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise InputError(f"x and y must be tensors, got {type(x).__name__}, {type(y).__name__}")
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise InputError(
            f"x and y must share their first dimension, got shapes {tuple(x.shape)} and "
            f"{tuple(y.shape)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
    return _minibatches(x, y, batch_size, shuffle, generator, drop_last)


def _minibatches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    shuffle: bool,
    generator: torch.Generator | None,
    drop_last: bool,
) -> Iterator[tuple[Tensor, Tensor]]:
    n = x.shape[0]
    order = torch.randperm(n, generator=generator) if shuffle else None
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        if order is None:
            yield x[start : start + batch_size], y[start : start + batch_size]
        else:
            idx = order[start : start + batch_size]
            yield x[idx.to(x.device)], y[idx.to(y.device)]
