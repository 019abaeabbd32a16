"""Tests for triqdef.data: IDX parsing, the datasets (Fashion-MNIST, digits, CIFAR-10), the
dispatcher, and their use through a DataLoader."""

from __future__ import annotations

import gzip
import re
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from triqdef import data
from triqdef.data import (
    CIFAR10_CLASSES,
    DATASET_NAMES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    ImageDataset,
    cifar10,
    dataset,
    digits,
    fashion_mnist,
    find_fashion_mnist,
    load_dataset,
    read_idx,
)
from triqdef.errors import InputError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(
    path: Path,
    arr: np.ndarray,
    *,
    magic: int | None = None,
    compress: bool = True,
    extra: bytes = b"",
) -> Path:
    """Write ``arr`` (uint8) as an IDX file, optionally with a forged magic number."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if magic is None:
        magic = 0x0800 | arr.ndim
    raw = struct.pack(">I", magic) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += arr.tobytes() + extra
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_fake_fashion(
    directory: Path, n_train: int = 6, n_test: int = 4, compress: bool = True
) -> dict[str, np.ndarray]:
    """Fashion-MNIST-shaped IDX files (labels ``arange(n) % 10``); returns the images."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lbl_name = FASHION_MNIST_FILES[split]
        if not compress:  # torchvision's extracted files: the same names without .gz
            img_name, lbl_name = img_name[:-3], lbl_name[:-3]
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        imgs[0, 0, 0], imgs[0, 0, 1] = 0, 255
        write_idx(directory / img_name, imgs, compress=compress)
        write_idx(directory / lbl_name, np.arange(n, dtype=np.uint8) % 10, compress=compress)
        out[split] = imgs
    return out


@pytest.fixture
def no_debian(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point the system-wide Fashion-MNIST location at an empty directory."""
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-such-dir")


@pytest.fixture
def no_torchvision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make torchvision look uninstalled to triqdef.data."""

    def missing():
        raise ImportError("No module named 'torchvision'")

    monkeypatch.setattr(data, "_torchvision", missing)


class FakeTorchvision:
    """Stands in for torchvision: records each dataset's arguments and serves fixed data."""

    def __init__(self, fashion=None, cifar=None) -> None:
        self.calls: list[tuple[str, str, bool, bool]] = []
        outer = self

        class _FashionMNIST:
            def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
                outer.calls.append(("FashionMNIST", root, train, download))
                if fashion is None:
                    raise RuntimeError("Dataset not found. You can use download=True")
                self.data, self.targets = fashion

        class _CIFAR10:
            def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
                outer.calls.append(("CIFAR10", root, train, download))
                if cifar is None:
                    raise RuntimeError("Dataset not found or corrupted.")
                self.data, self.targets = cifar

        self.datasets = type("datasets", (), {"FashionMNIST": _FashionMNIST, "CIFAR10": _CIFAR10})


def check_items(ds: Dataset, shape: tuple[int, ...]) -> None:
    """Items are (float32 image in [0, 1] of ``shape``, int label); batches collate."""
    x, y = ds[0]
    assert isinstance(x, torch.Tensor) and x.shape == shape and x.dtype == torch.float32
    assert type(y) is int and 0 <= y <= 9
    xb, yb = next(iter(DataLoader(ds, batch_size=3)))
    assert xb.shape == (min(3, len(ds)), *shape) and xb.dtype == torch.float32
    assert yb.dtype == torch.int64 and yb.tolist() == ds.targets[: len(yb)].tolist()
    assert torch.equal(xb, ds.data[: len(xb)])
    assert 0.0 <= float(xb.min()) and float(xb.max()) <= 1.0


# --- IDX parser -----------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    imgs = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    labels = np.array([7, 0, 9], dtype=np.uint8)
    p_img = write_idx(tmp_path / "imgs.gz", imgs, compress=compress)
    p_lbl = write_idx(tmp_path / "lbls.gz", labels, compress=compress)
    out = read_idx(p_img, expected_magic=2051)
    assert out.dtype == np.uint8 and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, imgs)
    assert out.flags.writeable
    np.testing.assert_array_equal(read_idx(p_lbl, expected_magic=2049), labels)


def test_read_idx_big_endian_int32(tmp_path: Path) -> None:
    values = np.array([[1, -2], [70000, 3]], dtype=">i4")
    raw = struct.pack(">I", 0x0C02) + struct.pack(">2I", 2, 2) + values.tobytes()
    path = tmp_path / "ints.idx"
    path.write_bytes(raw)
    out = read_idx(path)
    np.testing.assert_array_equal(out, values.astype(np.int32))
    assert out.dtype == np.int32


@pytest.mark.parametrize("magic", [0x12340803, 0x0803 | 0x0100_0000, 0x0A03, 0x0800])
def test_read_idx_bad_magic(tmp_path: Path, magic: int) -> None:
    path = write_idx(tmp_path / "bad.gz", np.zeros((2, 3, 3)), magic=magic)
    with pytest.raises(InputError, match="magic"):
        read_idx(path)


def test_read_idx_unexpected_magic(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "labels.gz", np.zeros(5))  # valid, magic 2049
    with pytest.raises(InputError, match="expected 2051"):
        read_idx(path, expected_magic=2051)


def test_read_idx_size_mismatch(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="data bytes"):
        read_idx(write_idx(tmp_path / "long.gz", np.zeros((2, 2)), extra=b"\x00"))
    raw = struct.pack(">I", 0x0803) + struct.pack(">3I", 4, 28, 28) + b"\x00" * 100
    (tmp_path / "short").write_bytes(raw)
    with pytest.raises(InputError, match="data bytes"):
        read_idx(tmp_path / "short")


def test_read_idx_garbage(tmp_path: Path) -> None:
    (tmp_path / "corrupt.gz").write_bytes(b"\x1f\x8b" + b"not really gzip")
    with pytest.raises(InputError):
        read_idx(tmp_path / "corrupt.gz")
    (tmp_path / "tiny").write_bytes(b"\x00\x00")
    with pytest.raises(InputError):
        read_idx(tmp_path / "tiny")
    with pytest.raises(InputError):
        read_idx(tmp_path / "missing.gz")


# --- Fashion-MNIST ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_fashion_mnist_from_root(tmp_path: Path, layout: str, no_debian: None) -> None:
    root = tmp_path / "data"
    imgs = write_fake_fashion(root if layout == "flat" else root / "FashionMNIST" / "raw")
    ds = fashion_mnist(root, train=True)
    assert isinstance(ds, Dataset) and isinstance(ds, ImageDataset) and len(ds) == 6
    assert ds.name == "fashion-mnist" and ds.train and ds.classes == list(FASHION_MNIST_CLASSES)
    assert ds.data.shape == (6, 1, 28, 28) and ds.data.dtype == torch.float32
    assert ds.targets.shape == (6,) and ds.targets.dtype == torch.int64
    assert ds.data.min() == 0.0 and ds.data.max() == 1.0
    assert torch.equal(ds.data[:, 0], torch.from_numpy(imgs["train"]).float() / 255)
    assert ds.targets.tolist() == [0, 1, 2, 3, 4, 5]
    check_items(ds, (1, 28, 28))
    test = fashion_mnist(str(root), train=False)
    assert len(test) == 4 and not test.train and test.data.shape == (4, 1, 28, 28)


def test_fashion_mnist_files_come_before_torchvision(
    tmp_path: Path, no_debian: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTorchvision()
    monkeypatch.setattr(data, "_torchvision", lambda: fake)
    write_fake_fashion(tmp_path)
    assert len(fashion_mnist(tmp_path, download=True)) == 6
    assert fake.calls == []  # the IDX files were read directly: no torchvision, no download


def test_fashion_mnist_through_torchvision(tmp_path: Path, no_debian: None) -> None:
    # torchvision's own layout after a download: the extracted IDX files, no .gz
    imgs = write_fake_fashion(tmp_path / "FashionMNIST" / "raw", compress=False)
    assert find_fashion_mnist(tmp_path) is None
    ds = fashion_mnist(tmp_path, train=False)  # read by the real torchvision.datasets class
    assert ds.data.shape == (4, 1, 28, 28) and ds.targets.tolist() == [0, 1, 2, 3]
    assert torch.equal(ds.data[:, 0], torch.from_numpy(imgs["test"]).float() / 255)
    check_items(ds, (1, 28, 28))


def test_fashion_mnist_passes_root_and_download_to_torchvision(
    tmp_path: Path, no_debian: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    images = torch.randint(0, 256, (5, 28, 28), dtype=torch.uint8)
    fake = FakeTorchvision(fashion=(images, torch.tensor([3, 1, 4, 1, 5])))
    monkeypatch.setattr(data, "_torchvision", lambda: fake)
    ds = fashion_mnist(tmp_path / "tv", train=False, download=True)
    assert fake.calls == [("FashionMNIST", str(tmp_path / "tv"), False, True)]
    assert torch.equal(ds.data, images.unsqueeze(1).float() / 255)
    assert ds.targets.dtype == torch.int64 and ds.targets.tolist() == [3, 1, 4, 1, 5]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    fashion_mnist()  # no root: torchvision's root is beside torch's hub directory
    assert fake.calls[-1] == ("FashionMNIST", str(tmp_path / "home" / "datasets"), True, False)


def test_fashion_mnist_not_found(tmp_path: Path, no_debian: None) -> None:
    assert find_fashion_mnist(tmp_path) is None
    with pytest.raises(InputError, match="not found") as info:
        fashion_mnist(tmp_path)  # torchvision is asked too, without download
    message = str(info.value)
    assert str(tmp_path) in message
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert "no-such-dir" in message and "download=True" in message
    assert not (tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").exists()


def test_fashion_mnist_not_found_without_torchvision(
    tmp_path: Path, no_debian: None, no_torchvision: None
) -> None:
    with pytest.raises(InputError, match="torchvision is not installed"):
        fashion_mnist(tmp_path, download=True)


def test_fashion_mnist_malformed(tmp_path: Path, no_debian: None) -> None:
    write_fake_fashion(tmp_path)
    img_name, lbl_name = FASHION_MNIST_FILES["train"]
    # swap the label file for an image-shaped one: wrong magic for labels
    shutil.copy(tmp_path / img_name, tmp_path / lbl_name)
    with pytest.raises(InputError, match="magic"):
        fashion_mnist(tmp_path)
    write_idx(tmp_path / lbl_name, np.zeros(5))  # 6 images, 5 labels
    with pytest.raises(InputError, match="labels"):
        fashion_mnist(tmp_path)


@pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="Debian fashion-mnist package not installed")
def test_fashion_mnist_debian_files() -> None:
    ds = fashion_mnist()
    x, y = ds.data, ds.targets
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() == 1.0
    assert y.min() == 0 and y.max() == 9
    assert torch.bincount(y).tolist() == [6000] * 10
    test = fashion_mnist(train=False)
    assert test.data.shape == (10000, 1, 28, 28) and test.targets.shape == (10000,)
    assert sorted(test.targets.unique().tolist()) == list(range(10))
    check_items(test, (1, 28, 28))


# --- digits ---------------------------------------------------------------------------------


def test_digits_shapes_and_range() -> None:
    train, test = digits(), digits(train=False)
    assert isinstance(train, ImageDataset) and train.name == "digits"
    assert len(train) == 1438 and len(test) == 359 and train.train and not test.train
    x, y = train.data, train.targets
    assert x.shape == (1438, 1, 28, 28) and test.data.shape == (359, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9
    assert sorted(y.unique().tolist()) == list(range(10))
    assert train.classes == [str(i) for i in range(10)]
    check_items(test, (1, 28, 28))
    x8 = digits(size=8).data
    assert x8.shape == (1438, 1, 8, 8)
    # at native size the values are exactly the 0..16 pixels scaled
    assert torch.equal(torch.round(x8 * 16), x8 * 16)
    assert digits(train=False, size=32).data.shape == (359, 1, 32, 32)


def test_digits_deterministic_split() -> None:
    a, b = digits(seed=3), digits(seed=3)
    assert torch.equal(a.data, b.data) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.data, digits(seed=4).data)
    # train and test are disjoint and together cover the whole set
    tr, te = digits(size=8, seed=3).data, digits(size=8, train=False, seed=3).data
    rows = {tuple(r) for r in torch.cat([tr, te]).flatten(1).tolist()}
    train_rows = {tuple(r) for r in tr.flatten(1).tolist()}
    test_rows = {tuple(r) for r in te.flatten(1).tolist()}
    assert len(tr) + len(te) == 1797
    assert len(train_rows & test_rows) <= 5  # the digits set has a few duplicate images
    assert len(rows) >= 1790


@pytest.mark.parametrize("size", [0, -1, 2.5, "28", True])
def test_digits_bad_size(size: object) -> None:
    with pytest.raises(InputError):
        digits(size=size)  # type: ignore[arg-type]


# --- CIFAR-10 -------------------------------------------------------------------------------


def test_cifar10_converts_torchvision_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)  # torchvision: NHWC
    images[1, 2, 3] = (255, 0, 128)
    fake = FakeTorchvision(cifar=(images, [6, 9, 9, 4]))
    monkeypatch.setattr(data, "_torchvision", lambda: fake)
    ds = cifar10(tmp_path, train=False, download=True)
    assert fake.calls == [("CIFAR10", str(tmp_path), False, True)]
    assert ds.name == "cifar10" and not ds.train and ds.classes == list(CIFAR10_CLASSES)
    assert ds.data.shape == (4, 3, 32, 32) and ds.data.is_contiguous()
    assert ds.data[1, :, 2, 3].tolist() == pytest.approx([1.0, 0.0, 128 / 255])  # channels first
    assert torch.equal(ds.data, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)
    assert ds.targets.dtype == torch.int64 and ds.targets.tolist() == [6, 9, 9, 4]
    check_items(ds, (3, 32, 32))
    assert dataset("CIFAR-10", root=tmp_path).name == "cifar10"
    assert fake.calls[-1] == ("CIFAR10", str(tmp_path), True, False)


def test_cifar10_missing_without_download(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="download=True") as info:
        cifar10(tmp_path)  # the real torchvision class, an empty root, no download
    assert str(tmp_path) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cifar10_needs_torchvision(no_torchvision: None) -> None:
    with pytest.raises(ImportError, match="pip install torchvision"):
        cifar10()


# --- the Dataset class and the dispatcher ---------------------------------------------------


def test_transforms_apply_per_item_and_leave_data_alone() -> None:
    ds = digits(train=False, transform=lambda x: 1 - x, target_transform=lambda y: y + 10)
    x, y = ds[5]
    assert torch.equal(x, 1 - ds.data[5]) and y == int(ds.targets[5]) + 10
    assert ds.data.max() <= 1.0  # data stays untransformed
    xb, yb = next(iter(DataLoader(ds, batch_size=4)))
    assert torch.equal(xb, 1 - ds.data[:4]) and (yb >= 10).all()
    assert "transform=" in repr(ds) and "'digits'" in repr(ds)


def test_items_index_like_a_sequence() -> None:
    ds = digits(train=False)
    assert torch.equal(ds[-1][0], ds.data[-1])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_works_with_a_distributed_sampler() -> None:
    ds = digits(train=False)
    halves = [
        list(DistributedSampler(ds, num_replicas=2, rank=r, shuffle=True, seed=1)) for r in (0, 1)
    ]
    assert set(halves[0]) | set(halves[1]) == set(range(len(ds)))  # one index repeats to pad
    assert len(halves[0]) == len(halves[1]) == (len(ds) + 1) // 2


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(data=torch.zeros(3, 28, 28), targets=torch.zeros(3, dtype=torch.int64)), "(N, C"),
        (dict(data=torch.zeros(3, 1, 2, 2, dtype=torch.uint8), targets=torch.zeros(3)), "floating"),
        (dict(data=torch.zeros(3, 1, 2, 2), targets=torch.zeros(2, dtype=torch.int64)), "(3,)"),
        (dict(data=torch.zeros(3, 1, 2, 2), targets=torch.zeros(3)), "int64"),
        (dict(data=np.zeros((3, 1, 2, 2)), targets=torch.zeros(3, dtype=torch.int64)), "ndarray"),
    ],
)
def test_image_dataset_checks_its_tensors(kwargs: dict, match: str) -> None:
    with pytest.raises(InputError, match=re.escape(match)):
        ImageDataset(name="x", **kwargs)


@pytest.mark.parametrize("fn", [digits, fashion_mnist, cifar10, dataset])
def test_a_transform_that_is_not_callable_is_refused(fn) -> None:
    with pytest.raises(InputError, match="transform must be a callable"):
        fn(transform="ToTensor")
    with pytest.raises(InputError, match="target_transform must be a callable"):
        fn(target_transform=3)


def test_dataset_auto() -> None:
    ds = dataset("auto", train=False)
    assert ds.name in DATASET_NAMES and ds.name != "auto"
    assert ds.data.shape[1:] == (1, 28, 28) and len(ds) == len(ds.targets)
    expected = "fashion-mnist" if find_fashion_mnist(train=False) is not None else "digits"
    assert ds.name == expected


def test_dataset_auto_falls_back_to_digits(
    tmp_path: Path, no_debian: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeTorchvision()  # torchvision has no copy either
    monkeypatch.setattr(data, "_torchvision", lambda: fake)
    ds = dataset(root=tmp_path, train=False)
    assert ds.name == "digits" and ds.data.shape == (359, 1, 28, 28)
    assert fake.calls == [("FashionMNIST", str(tmp_path), False, False)]


def test_dataset_auto_uses_root(tmp_path: Path, no_debian: None) -> None:
    write_fake_fashion(tmp_path)
    ds = dataset("auto", root=tmp_path, transform=lambda x: x * 2)
    assert ds.name == "fashion-mnist" and len(ds) == 6 and ds.transform is not None
    assert dataset("Fashion_MNIST", root=tmp_path, train=False).name == "fashion-mnist"


def test_dataset_explicit_fashion_missing(tmp_path: Path, no_debian: None) -> None:
    with pytest.raises(InputError, match="not found"):
        dataset("fashion-mnist", root=tmp_path)


def test_dataset_digits() -> None:
    ds = dataset("digits", train=True)
    assert ds.name == "digits" and len(ds) == 1438


@pytest.mark.parametrize("name", ["cifar100", "mnist", "", None, 3])
def test_dataset_unknown_name(name: object) -> None:
    with pytest.raises(InputError, match="fashion-mnist") as info:
        dataset(name)  # type: ignore[arg-type]
    assert "digits" in str(info.value) and "cifar10" in str(info.value)


def test_unknown_name_is_value_error() -> None:
    with pytest.raises(ValueError):
        dataset("imagenet")


@pytest.mark.parametrize("root", [3, b"/tmp", ["a"]])
def test_bad_root(root: object) -> None:
    with pytest.raises(InputError, match="root must be"):
        dataset("fashion-mnist", root=root)  # type: ignore[arg-type]


# --- whole tensors --------------------------------------------------------------------------


def test_load_dataset_returns_the_datasets_tensors(tmp_path: Path, no_debian: None) -> None:
    write_fake_fashion(tmp_path)
    x, y, name = load_dataset("auto", root=tmp_path)
    ds = fashion_mnist(tmp_path)
    assert name == "fashion-mnist" and torch.equal(x, ds.data) and torch.equal(y, ds.targets)
    x, _, name = load_dataset("Fashion_MNIST", root=tmp_path, size=14)
    assert name == "fashion-mnist" and x.shape == (6, 1, 14, 14)
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_load_dataset_resizes_digits_from_the_originals(
    tmp_path: Path, no_debian: None, no_torchvision: None
) -> None:
    x, y, name = load_dataset(train=False, root=tmp_path, size=16)
    assert name == "digits" and x.shape == (359, 1, 16, 16) and y.shape == (359,)
    assert torch.equal(x, digits(train=False, size=16).data)
    with pytest.raises(InputError, match="size"):
        load_dataset("digits", size=0)
