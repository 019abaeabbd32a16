"""Tests for triqdef.data: IDX parsing, Fashion-MNIST lookup, digits, batching."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from triqdef import data
from triqdef.data import (
    DATASET_NAMES,
    FASHION_MNIST_FILES,
    find_fashion_mnist,
    iterate_minibatches,
    load_dataset,
    load_digits,
    load_fashion_mnist,
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


def write_fake_fashion(directory: Path, n_train: int = 6, n_test: int = 4) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        img_name, lbl_name = FASHION_MNIST_FILES[split]
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        imgs[0, 0, 0], imgs[0, 0, 1] = 0, 255
        write_idx(directory / img_name, imgs)
        write_idx(directory / lbl_name, np.arange(n, dtype=np.uint8) % 10)


@pytest.fixture
def no_debian(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Point the system-wide Fashion-MNIST location at an empty directory."""
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-such-dir")


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


# --- Fashion-MNIST lookup -------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["flat", "torchvision"])
def test_load_fashion_mnist_from_root(tmp_path: Path, layout: str, no_debian: None) -> None:
    root = tmp_path / "data"
    write_fake_fashion(root if layout == "flat" else root / "FashionMNIST" / "raw")
    x, y = load_fashion_mnist(root, train=True)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (6,) and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert y.tolist() == [0, 1, 2, 3, 4, 5]
    xt, yt = load_fashion_mnist(str(root), train=False)
    assert xt.shape == (4, 1, 28, 28) and yt.shape == (4,)


def test_load_fashion_mnist_not_found(tmp_path: Path, no_debian: None) -> None:
    assert find_fashion_mnist(tmp_path) is None
    with pytest.raises(InputError, match="not found") as info:
        load_fashion_mnist(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert "no-such-dir" in message


def test_load_fashion_mnist_malformed(tmp_path: Path, no_debian: None) -> None:
    write_fake_fashion(tmp_path)
    img_name, lbl_name = FASHION_MNIST_FILES["train"]
    # swap the label file for an image-shaped one: wrong magic for labels
    shutil.copy(tmp_path / img_name, tmp_path / lbl_name)
    with pytest.raises(InputError, match="magic"):
        load_fashion_mnist(tmp_path)
    write_idx(tmp_path / lbl_name, np.zeros(5))  # 6 images, 5 labels
    with pytest.raises(InputError, match="labels"):
        load_fashion_mnist(tmp_path)


@pytest.mark.skipif(not DEBIAN_DIR.exists(), reason="Debian fashion-mnist package not installed")
def test_load_fashion_mnist_debian_files() -> None:
    x, y = load_fashion_mnist()
    assert x.shape == (60000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (60000,) and y.dtype == torch.int64
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() == 1.0
    assert y.min() == 0 and y.max() == 9
    assert torch.bincount(y).tolist() == [6000] * 10
    xt, yt = load_fashion_mnist(train=False)
    assert xt.shape == (10000, 1, 28, 28) and yt.shape == (10000,)
    assert sorted(yt.unique().tolist()) == list(range(10))


# --- digits ---------------------------------------------------------------------------------


def test_load_digits_shapes_and_range() -> None:
    x, y = load_digits()
    xt, yt = load_digits(train=False)
    assert x.shape == (1438, 1, 28, 28) and xt.shape == (359, 1, 28, 28)
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert y.shape == (1438,) and yt.shape == (359,)
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.9
    assert sorted(y.unique().tolist()) == list(range(10))
    x8, _ = load_digits(size=8)
    assert x8.shape == (1438, 1, 8, 8)
    # at native size the values are exactly the 0..16 pixels scaled
    assert torch.equal(torch.round(x8 * 16), x8 * 16)
    assert load_digits(size=32, train=False)[0].shape == (359, 1, 32, 32)


def test_load_digits_deterministic_split() -> None:
    x1, y1 = load_digits(seed=3)
    x2, y2 = load_digits(seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x3, _ = load_digits(seed=4)
    assert not torch.equal(x1, x3)
    # train and test are disjoint and together cover the whole set
    tr, _ = load_digits(size=8, seed=3)
    te, _ = load_digits(size=8, train=False, seed=3)
    rows = {tuple(r) for r in torch.cat([tr, te]).flatten(1).tolist()}
    train_rows = {tuple(r) for r in tr.flatten(1).tolist()}
    test_rows = {tuple(r) for r in te.flatten(1).tolist()}
    assert len(tr) + len(te) == 1797
    assert len(train_rows & test_rows) <= 5  # the digits set has a few duplicate images
    assert len(rows) >= 1790


@pytest.mark.parametrize("size", [0, -1, 2.5, "28", True])
def test_load_digits_bad_size(size: object) -> None:
    with pytest.raises(InputError):
        load_digits(size=size)  # type: ignore[arg-type]


# --- load_dataset ---------------------------------------------------------------------------


def test_load_dataset_auto() -> None:
    x, y, name = load_dataset("auto", train=False)
    assert name in DATASET_NAMES and name != "auto"
    assert x.shape[1:] == (1, 28, 28) and x.shape[0] == y.shape[0]
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    expected = "fashion-mnist" if find_fashion_mnist(train=False) is not None else "digits"
    assert name == expected


def test_load_dataset_auto_falls_back_to_digits(tmp_path: Path, no_debian: None) -> None:
    x, y, name = load_dataset(train=False, root=tmp_path, size=16)
    assert name == "digits"
    assert x.shape == (359, 1, 16, 16) and y.shape == (359,)


def test_load_dataset_auto_uses_root(tmp_path: Path, no_debian: None) -> None:
    write_fake_fashion(tmp_path)
    x, y, name = load_dataset("auto", root=tmp_path)
    assert name == "fashion-mnist" and x.shape == (6, 1, 28, 28)
    x, _, name = load_dataset("Fashion_MNIST", root=tmp_path, size=14)
    assert name == "fashion-mnist" and x.shape == (6, 1, 14, 14)
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_load_dataset_explicit_fashion_missing(tmp_path: Path, no_debian: None) -> None:
    with pytest.raises(InputError, match="not found"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_load_dataset_digits() -> None:
    x, y, name = load_dataset("digits", train=True)
    assert name == "digits" and x.shape == (1438, 1, 28, 28) and y.shape == (1438,)


@pytest.mark.parametrize("name", ["cifar100", "mnist", "", None, 3])
def test_load_dataset_unknown_name(name: object) -> None:
    with pytest.raises(InputError, match="fashion-mnist") as info:
        load_dataset(name)  # type: ignore[arg-type]
    assert "digits" in str(info.value)


def test_unknown_name_is_value_error() -> None:
    with pytest.raises(ValueError):
        load_dataset("imagenet")


# --- minibatches ----------------------------------------------------------------------------


def test_iterate_minibatches_covers_everything() -> None:
    x = torch.arange(10, dtype=torch.float32).view(10, 1)
    y = torch.arange(10)
    batches = list(iterate_minibatches(x, y, 4, shuffle=False))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([b[1] for b in batches]), y)
    g = torch.Generator().manual_seed(0)
    batches = list(iterate_minibatches(x, y, 3, generator=g))
    xs = torch.cat([b[0] for b in batches]).flatten()
    ys = torch.cat([b[1] for b in batches])
    assert torch.equal(xs.long(), ys)  # pairs stay aligned
    assert sorted(ys.tolist()) == list(range(10))
    assert not torch.equal(ys, y)  # shuffled
    assert [len(b[0]) for b in iterate_minibatches(x, y, 3, drop_last=True)] == [3, 3, 3]


def test_iterate_minibatches_reproducible() -> None:
    x, y = torch.randn(20, 2), torch.arange(20)

    def order(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return torch.cat([b for _, b in iterate_minibatches(x, y, 6, generator=g)]).tolist()

    assert order(5) == order(5)
    assert order(5) != order(6)


def test_iterate_minibatches_bad_input() -> None:
    x = torch.zeros(4, 2)
    with pytest.raises(InputError):
        iterate_minibatches(x, torch.zeros(3), 2)
    with pytest.raises(InputError):
        iterate_minibatches(x, torch.zeros(4), 0)
    with pytest.raises(InputError):
        iterate_minibatches(x.numpy(), torch.zeros(4), 2)  # type: ignore[arg-type]
