"""Datasets for the examples and the reproduction, as `torch.utils.data.Dataset` objects.

Every function returns an [`ImageDataset`][triqdef.data.ImageDataset], a map-style
dataset that a `torch.utils.data.DataLoader` (workers, a
`DistributedSampler`, ...) reads like any torchvision dataset: item ``i`` is
``(image, label)`` with ``image`` a ``float32`` tensor ``(C, H, W)`` in ``[0, 1]``
and ``label`` an ``int``. The whole split is also there as two tensors,
``dataset.data`` ``(N, C, H, W)`` and ``dataset.targets`` ``(N,)``, for code that
works on whole tensors.

* [`fashion_mnist`][triqdef.data.fashion_mnist]: read from the IDX ``.gz`` files
  directly when they are found (``root``, torchvision's ``root/FashionMNIST/raw``,
  or Debian's ``fashion-mnist`` package), else through
  ``torchvision.datasets.FashionMNIST(root, download=...)``;
* [`digits`][triqdef.data.digits]: scikit-learn's 8x8 digits, upscaled (always
  offline);
* [`cifar10`][triqdef.data.cifar10]: CIFAR-10 through ``torchvision.datasets.CIFAR10``;
* [`dataset`][triqdef.data.dataset]: any of them by name, ``"auto"`` taking
  Fashion-MNIST when it is available and digits otherwise.

Nothing is downloaded unless ``download=True`` is passed. torchvision is needed
only for a dataset that is not on disk as IDX files (``pip install torchvision``,
or the ``triqdef[vision]`` extra).

Example:
    >>> from torch.utils.data import DataLoader
    >>> train = digits(train=True)
    >>> len(train), train.data.shape, train.targets.shape
    (1438, torch.Size([1438, 1, 28, 28]), torch.Size([1438]))
    >>> x, y = next(iter(DataLoader(train, batch_size=32, shuffle=True)))
    >>> x.shape, x.dtype, y.dtype
    (torch.Size([32, 1, 28, 28]), torch.float32, torch.int64)
"""

from __future__ import annotations

import gzip
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from triqdef.errors import InputError

__all__ = [
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "CIFAR10_CLASSES",
    "FASHION_MNIST_FILES",
    "DEBIAN_FASHION_MNIST_DIR",
    "ImageDataset",
    "fashion_mnist",
    "digits",
    "cifar10",
    "dataset",
    "default_root",
    "find_fashion_mnist",
    "read_idx",
    "load_dataset",
]

DATASET_NAMES: tuple[str, ...] = ("auto", "fashion-mnist", "digits", "cifar10")
"""Names accepted by [`dataset`][triqdef.data.dataset]."""

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
"""Fashion-MNIST's class names, by label."""

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
"""CIFAR-10's class names, by label."""

FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
"""IDX file names of Fashion-MNIST, keyed by split, as ``(images, labels)``."""

DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``fashion-mnist`` package installs the IDX files."""

_TV_HINT = "pip install torchvision (or pip install 'triqdef[vision]')"

Transform = Callable[[Any], Any]

# IDX type code (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _check_transforms(transform: object, target_transform: object) -> None:
    # checked before any file is read, so a bad call costs nothing
    for what, fn in (("transform", transform), ("target_transform", target_transform)):
        if fn is not None and not callable(fn):
            raise InputError(f"{what} must be a callable or None, got {fn!r}")


# --- the dataset class --------------------------------------------------------------------
class ImageDataset(Dataset):
    """A labelled image split held in memory, read item by item or as whole tensors.

    Item ``i`` is ``(transform(data[i]), target_transform(int(targets[i])))``; without
    transforms, a ``float32`` image ``(C, H, W)`` in ``[0, 1]`` and an ``int`` label,
    which `torch.utils.data.DataLoader`'s default collation stacks into
    ``(B, C, H, W)`` and ``(B,)`` ``int64`` batches. The transforms receive tensors,
    not PIL images (``torchvision.transforms.v2`` accepts them).

    Built by [`fashion_mnist`][triqdef.data.fashion_mnist],
    [`digits`][triqdef.data.digits], [`cifar10`][triqdef.data.cifar10] and
    [`dataset`][triqdef.data.dataset]; build one yourself from any image tensors.

    Args:
        data: Images of shape (N, C, H, W), ``float32`` in ``[0, 1]``.
        targets: Labels of shape (N,), ``int64``.
        name: The dataset's name, e.g. ``"fashion-mnist"``.
        train: Whether this is the training split.
        classes: Class names, by label.
        transform: Optional callable applied to each image ``(C, H, W)``.
        target_transform: Optional callable applied to each ``int`` label.

    Attributes:
        data: The images, ``(N, C, H, W)`` ``float32`` in ``[0, 1]`` (untransformed).
        targets: The labels, ``(N,)`` ``int64``.
        name: The dataset's name, as [`dataset`][triqdef.data.dataset] accepts it.
        train: Whether this is the training split.
        classes: Class names, by label.
        transform: The image transform, or ``None``.
        target_transform: The label transform, or ``None``.

    Raises:
        InputError: ``data`` is not a 4-D floating-point tensor, ``targets`` not a 1-D
            ``int64`` tensor of the same length, or a transform is not callable.
    """

    def __init__(
        self,
        data: Tensor,
        targets: Tensor,
        name: str,
        train: bool = True,
        classes: Sequence[str] = (),
        transform: Transform | None = None,
        target_transform: Transform | None = None,
    ) -> None:
        if not isinstance(data, Tensor) or data.dim() != 4 or not data.is_floating_point():
            raise InputError(
                "data must be a floating-point tensor of shape (N, C, H, W), got "
                + (
                    f"shape {tuple(data.shape)}, {data.dtype}"
                    if isinstance(data, Tensor)
                    else type(data).__name__
                )
            )
        if not isinstance(targets, Tensor) or targets.shape != data.shape[:1]:
            raise InputError(
                f"targets must be a tensor of shape ({data.shape[0]},), one label per image, "
                "got "
                + (
                    f"shape {tuple(targets.shape)}"
                    if isinstance(targets, Tensor)
                    else type(targets).__name__
                )
            )
        if targets.dtype != torch.int64:
            raise InputError(f"targets must be int64 labels, got {targets.dtype}")
        _check_transforms(transform, target_transform)
        self.data = data
        self.targets = targets
        self.name = str(name)
        self.train = bool(train)
        self.classes = list(classes)
        self.transform = transform
        self.target_transform = target_transform

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        """``(image, label)`` of item ``index`` (negative indices count from the end).

        Raises:
            IndexError: ``index`` is out of range.
        """
        image: Any = self.data[index]
        label: Any = int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        shape = tuple(self.data.shape[1:])
        extra = "" if self.transform is None else f", transform={self.transform!r}"
        return f"ImageDataset({self.name!r}, {split}, {len(self)} images of shape {shape}{extra})"


# --- IDX files ----------------------------------------------------------------------------
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


def default_root() -> Path:
    """Where torchvision-backed datasets live when no ``root`` is given.

    ``datasets/`` beside torch's hub directory: ``~/.cache/torch/datasets`` unless
    ``TORCH_HOME`` (or ``XDG_CACHE_HOME``) moves it.
    """
    return Path(torch.hub.get_dir()).parent / "datasets"


def _candidate_dirs(root: str | Path | None) -> list[Path]:
    dirs: list[Path] = []
    if root is not None:
        root = Path(root).expanduser()
        dirs += [root, root / "FashionMNIST" / "raw"]
    dirs.append(DEBIAN_FASHION_MNIST_DIR)
    return dirs


def find_fashion_mnist(root: str | Path | None = None, train: bool = True) -> Path | None:
    """Find the directory holding the Fashion-MNIST IDX ``.gz`` files of one split.

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


def _torchvision() -> Any:
    """torchvision, imported on first use (an optional dependency, untyped)."""
    return importlib.import_module("torchvision")


def _check_root(root: object) -> Path | None:
    if root is None:
        return None
    if not isinstance(root, (str, Path)):
        raise InputError(f"root must be a directory path (str or Path) or None, got {root!r}")
    return Path(root).expanduser()


def _read_fashion_idx(d: Path, train: bool) -> tuple[Tensor, Tensor]:
    img_name, lbl_name = FASHION_MNIST_FILES["train" if train else "test"]
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


def _fashion_tensors(root: Path | None, train: bool, download: bool) -> tuple[Tensor, Tensor] | str:
    """Fashion-MNIST's tensors, or why they could not be had (a sentence)."""
    d = find_fashion_mnist(root, train)
    if d is not None:
        return _read_fashion_idx(d, train)
    searched = ", ".join(str(p) for p in _candidate_dirs(root))
    tv_root = root if root is not None else default_root()
    try:
        torchvision = _torchvision()
    except ImportError:
        return f"searched {searched} for the IDX .gz files; torchvision is not installed"
    try:
        tv = torchvision.datasets.FashionMNIST(str(tv_root), train=train, download=download)
    except (RuntimeError, OSError) as exc:  # not on disk, or the download failed
        how = "downloading" if download else "no copy"
        return (
            f"searched {searched} for the IDX .gz files; torchvision ({how} in {tv_root}): "
            f"{type(exc).__name__}: {exc}"
        )
    x = tv.data.unsqueeze(1).to(torch.float32).div_(255.0)
    return x, tv.targets.to(torch.int64)


def fashion_mnist(
    root: str | Path | None = None,
    train: bool = True,
    transform: Transform | None = None,
    target_transform: Transform | None = None,
    download: bool = False,
) -> ImageDataset:
    """Fashion-MNIST (Xiao et al., 2017): 28x28 grayscale clothes, 10 classes.

    Looked for, in order: the IDX ``.gz`` files in ``root``, in
    ``root/FashionMNIST/raw`` (torchvision's layout) and in Debian's
    [`DEBIAN_FASHION_MNIST_DIR`][triqdef.data.DEBIAN_FASHION_MNIST_DIR], read
    directly; then ``torchvision.datasets.FashionMNIST(root, train, download=download)``
    (``root`` defaulting to [`default_root`][triqdef.data.default_root]), which
    downloads only when ``download=True``.

    Args:
        root: Directory searched first, and torchvision's root.
        train: The 60,000 training images if true, else the 10,000 test images.
        transform: Optional callable applied to each image tensor ``(1, 28, 28)``.
        target_transform: Optional callable applied to each ``int`` label.
        download: Let torchvision download the files when they are found nowhere.

    Returns:
        An [`ImageDataset`][triqdef.data.ImageDataset] named ``"fashion-mnist"``:
        ``data`` of shape (N, 1, 28, 28), ``float32`` in ``[0, 1]``; ``targets`` of
        shape (N,), ``int64`` in ``0..9``.

    Raises:
        InputError: The files are found nowhere and torchvision has no copy (the
            message lists the places searched and the fix), the files are malformed,
            or an argument has the wrong type.
    """
    root_path = _check_root(root)
    _check_transforms(transform, target_transform)
    got = _fashion_tensors(root_path, bool(train), bool(download))
    if isinstance(got, str):
        split = "train" if train else "test"
        raise InputError(
            f"Fashion-MNIST {split} split not found: {got}. Pass root= pointing at a "
            "directory holding the IDX .gz files (e.g. install Debian's fashion-mnist "
            f"package), or download=True with torchvision installed ({_TV_HINT})."
        )
    x, y = got
    return ImageDataset(
        x, y, "fashion-mnist", bool(train), FASHION_MNIST_CLASSES, transform, target_transform
    )


def _check_size(size: object) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"size must be a positive int, got {size!r}")
    return size


def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-2:] == (size, size):
        return x
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp_(0.0, 1.0)


def digits(
    train: bool = True,
    transform: Transform | None = None,
    target_transform: Transform | None = None,
    *,
    size: int = 28,
    seed: int = 0,
) -> ImageDataset:
    """scikit-learn's 8x8 handwritten digits, upscaled to ``size x size`` (no download).

    Pixel values ``0..16`` are scaled to ``[0, 1]`` and resized with bilinear
    interpolation. The 1,797 images are split 80/20 into train/test by a random
    permutation drawn from ``seed``, so the split is the same on every call with
    the same seed and the two splits never overlap.

    Args:
        train: The 80% training split (1,438 images) if true, else the 20% test
            split (359 images).
        transform: Optional callable applied to each image tensor ``(1, size, size)``.
        target_transform: Optional callable applied to each ``int`` label.
        size: Side of the images in pixels (28: Fashion-MNIST's).
        seed: Seed of the split permutation.

    Returns:
        An [`ImageDataset`][triqdef.data.ImageDataset] named ``"digits"``: ``data``
        of shape (N, 1, size, size), ``float32`` in ``[0, 1]``; ``targets`` of shape
        (N,), ``int64`` in ``0..9``.

    Raises:
        InputError: ``size`` is not a positive int, or a transform is not callable.
    """
    size = _check_size(size)
    _check_transforms(transform, target_transform)
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
    classes = [str(i) for i in range(10)]
    x = _resize(x, size).contiguous()
    return ImageDataset(x, y, "digits", bool(train), classes, transform, target_transform)


def cifar10(
    root: str | Path | None = None,
    train: bool = True,
    transform: Transform | None = None,
    target_transform: Transform | None = None,
    download: bool = False,
) -> ImageDataset:
    """CIFAR-10 (Krizhevsky, 2009): 32x32 colour images, 10 classes, via torchvision.

    Reads ``torchvision.datasets.CIFAR10(root, train, download=download)`` once and
    keeps its images as one tensor.

    Args:
        root: torchvision's root (default: [`default_root`][triqdef.data.default_root]).
        train: The 50,000 training images if true, else the 10,000 test images.
        transform: Optional callable applied to each image tensor ``(3, 32, 32)``.
        target_transform: Optional callable applied to each ``int`` label.
        download: Let torchvision download the archive (about 170 MB) when it is
            not in ``root``.

    Returns:
        An [`ImageDataset`][triqdef.data.ImageDataset] named ``"cifar10"``: ``data``
        of shape (N, 3, 32, 32), ``float32`` in ``[0, 1]``; ``targets`` of shape
        (N,), ``int64`` in ``0..9``.

    Raises:
        ImportError: torchvision is not installed.
        InputError: The dataset is not in ``root`` and ``download`` is false, the
            download failed, or an argument has the wrong type.
    """
    root_path = _check_root(root)
    _check_transforms(transform, target_transform)
    tv_root = root_path if root_path is not None else default_root()
    try:
        torchvision = _torchvision()
    except ImportError as exc:
        raise ImportError(f"cifar10() needs torchvision: {_TV_HINT}") from exc
    try:
        tv = torchvision.datasets.CIFAR10(str(tv_root), train=bool(train), download=download)
    except (RuntimeError, OSError) as exc:
        fix = (
            "check the network and the directory's permissions"
            if download
            else "pass download=True, or root= pointing at the directory holding "
            "cifar-10-batches-py"
        )
        raise InputError(
            f"CIFAR-10 not available in {tv_root} ({type(exc).__name__}: {exc}); {fix}"
        ) from None
    images = np.asarray(tv.data)
    if images.ndim != 4 or images.shape[3] != 3:
        raise InputError(
            f"CIFAR-10 in {tv_root}: images of shape {images.shape}, expected (N, 32, 32, 3)"
        )
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(torch.float32).div_(255.0)
    y = torch.as_tensor(np.asarray(tv.targets), dtype=torch.int64)
    return ImageDataset(x, y, "cifar10", bool(train), CIFAR10_CLASSES, transform, target_transform)


def _normalize_name(name: object) -> str:
    if not isinstance(name, str):
        raise InputError(f"dataset name must be a str, one of {DATASET_NAMES}, got {name!r}")
    key = name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}.get(key, key)
    if key not in DATASET_NAMES:
        raise InputError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    return key


def dataset(
    name: str = "auto",
    root: str | Path | None = None,
    train: bool = True,
    transform: Transform | None = None,
    target_transform: Transform | None = None,
    download: bool = False,
) -> ImageDataset:
    """One of the datasets by name; ``"auto"`` takes what is available.

    ``"auto"`` is Fashion-MNIST when [`fashion_mnist`][triqdef.data.fashion_mnist]
    finds it (or downloads it, with ``download=True``), else scikit-learn's digits at
    28x28, so the same code runs anywhere; the returned dataset's ``name`` says which.
    Load the other split with that name, so both come from the same dataset::

        train = dataset("auto", train=True)
        test = dataset(train.name, train=False)

    Args:
        name: One of [`DATASET_NAMES`][triqdef.data.DATASET_NAMES]:
            ``"fashion-mnist"``, ``"digits"``, ``"cifar10"`` or ``"auto"``. Case and
            ``_`` versus ``-`` do not matter.
        root: Data directory (see each dataset); digits ignore it.
        train: The training split if true, else the test split.
        transform: Optional callable applied to each image tensor ``(C, H, W)``.
        target_transform: Optional callable applied to each ``int`` label.
        download: Let torchvision download a dataset that is not on disk; digits
            ignore it.

    Returns:
        The [`ImageDataset`][triqdef.data.ImageDataset].

    Raises:
        InputError: ``name`` is unknown, or the named dataset cannot be loaded
            (see each dataset).
        ImportError: ``"cifar10"`` without torchvision.
    """
    key = _normalize_name(name)
    root_path = _check_root(root)
    _check_transforms(transform, target_transform)
    if key == "cifar10":
        return cifar10(root_path, train, transform, target_transform, download)
    if key == "digits":
        return digits(train, transform, target_transform)
    if key == "fashion-mnist":
        return fashion_mnist(root_path, train, transform, target_transform, download)
    got = _fashion_tensors(root_path, bool(train), bool(download))
    if isinstance(got, str):
        return digits(train, transform, target_transform)
    return ImageDataset(
        *got, "fashion-mnist", bool(train), FASHION_MNIST_CLASSES, transform, target_transform
    )


def load_dataset(
    name: str = "auto", train: bool = True, root: str | Path | None = None, size: int = 28
) -> tuple[Tensor, Tensor, str]:
    """Whole tensors of one split: ``(dataset.data, dataset.targets, dataset.name)``.

    A shortcut over [`dataset`][triqdef.data.dataset] for code that works on whole
    tensors, with the images resized (bilinear) to ``size x size``; prefer
    [`dataset`][triqdef.data.dataset] and a `torch.utils.data.DataLoader`.

    Args:
        name: As for [`dataset`][triqdef.data.dataset].
        train: The training split if true, else the test split.
        root: As for [`dataset`][triqdef.data.dataset]; nothing is downloaded.
        size: Side of the returned images.

    Returns:
        ``(images, labels, name_used)``: images of shape (N, C, size, size),
        ``float32`` in ``[0, 1]``; labels of shape (N,), ``int64``; and the name of
        the dataset actually loaded.

    Raises:
        InputError: ``name`` is unknown, ``size`` is invalid, or the named dataset
            cannot be loaded.
    """
    size = _check_size(size)
    key = _normalize_name(name)
    ds = dataset(key, root, train)
    if ds.name == "digits" and size != 28:
        ds = digits(train, size=size)  # from the 8x8 originals, not from 28x28
    return _resize(ds.data, size), ds.targets, ds.name
