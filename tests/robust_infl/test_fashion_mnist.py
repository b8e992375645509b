"""Fashion-MNIST: the IDX reader against hand-written bytes, the loader on tiny IDX files written here
(shapes, range, labels traced to their rows, seeded disjoint splits, the search order of its folders, the
one-line message when the data are missing), and one load of the real files where they are installed."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from robust_infl import datasets
from robust_infl.datasets import FASHION_MNIST_ENV, FASHION_MNIST_FILES, fashion_mnist_dirs, load_dataset, read_idx
from robust_infl.registry import DATA_DEFAULTS

from conftest import fashion_mnist_installed

N_TRAIN_FILE, N_TEST_FILE = 60, 20


def write_idx(path, array: np.ndarray) -> None:
    """Write a uint8 ``array`` as an IDX file (magic 0x0000 08 ndim, big-endian int32 dims, data), gzipped
    when ``path`` ends in .gz."""
    raw = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape) + array.tobytes()
    with (gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb")) as fh:
        fh.write(raw)


def tiny_fashion(folder, gz: bool = False):
    """Four IDX files: training image i is filled with the value i (so a loaded image names its row), label
    i % 10; test image j is filled with 100 + j, label (j + 3) % 10."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, cols = np.arange(N_TRAIN_FILE), np.arange(N_TEST_FILE)
    arrays = (np.repeat(rows, 28 * 28).reshape(-1, 28, 28).astype(np.uint8), (rows % 10).astype(np.uint8),
              np.repeat(100 + cols, 28 * 28).reshape(-1, 28, 28).astype(np.uint8), ((cols + 3) % 10).astype(np.uint8))
    for name, array in zip(FASHION_MNIST_FILES, arrays):
        write_idx(folder / (name + (".gz" if gz else "")), array)
    return folder


@pytest.fixture
def nowhere(tmp_path, monkeypatch):
    """No Fashion-MNIST anywhere the loader looks (environment, cache, Debian's folder)."""
    monkeypatch.delenv(FASHION_MNIST_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "_DEBIAN_FASHION_MNIST", tmp_path / "debian")
    return tmp_path


def test_read_idx_known_bytes_plain_and_gzipped(tmp_path):
    labels = bytes.fromhex("00000801" "00000003") + bytes([7, 0, 9])
    (tmp_path / "l").write_bytes(labels)
    assert read_idx(tmp_path / "l").tolist() == [7, 0, 9]
    images = bytes.fromhex("00000803" "00000002" "00000001" "00000003") + bytes(range(6))
    (tmp_path / "i.gz").write_bytes(gzip.compress(images))
    out = read_idx(tmp_path / "i.gz")
    assert out.dtype == np.uint8 and out.shape == (2, 1, 3) and out.ravel().tolist() == list(range(6))


@pytest.mark.parametrize("raw, message", [
    (bytes.fromhex("00000000"), "is not an IDX file"),             # element type 0 is no IDX type
    (bytes.fromhex("01000801") + bytes(4), "is not an IDX file"),  # first two bytes must be zero
    (bytes.fromhex("00000803" "00000002"), "truncated"),
    (bytes.fromhex("00000801" "00000004") + bytes(3), "holds 3 bytes of data, its header (4,) needs 4"),
])
def test_read_idx_refuses_malformed_files(tmp_path, raw, message):
    (tmp_path / "bad").write_bytes(raw)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_idx(tmp_path / "bad")


@pytest.mark.parametrize("gz", [False, True])
def test_splits_shapes_range_labels_and_rows(tmp_path, nowhere, gz):
    folder = tiny_fashion(tmp_path / "fm", gz=gz)
    splits = load_dataset("fashion-mnist", seed=3, n_train=30, n_val=10, n_test=5, data_dir=folder)
    (Xtr, ytr), (Xva, yva), (Xte, yte) = splits.train, splits.val, splits.test
    assert (splits.input_shape, splits.num_classes, splits.bounds) == ((1, 28, 28), 10, (0.0, 1.0))
    assert Xtr.shape == (30, 1, 28, 28) and Xva.shape == (10, 1, 28, 28) and Xte.shape == (5, 1, 28, 28)
    assert Xtr.dtype == torch.float32 and ytr.dtype == torch.int64
    assert all(0.0 <= X.min() and X.max() <= 1.0 for X in (Xtr, Xva, Xte))
    train_rows = (Xtr[:, 0, 0, 0] * 255).round().long()
    val_rows = (Xva[:, 0, 0, 0] * 255).round().long()
    test_rows = (Xte[:, 0, 0, 0] * 255).round().long() - 100
    assert torch.equal(train_rows, splits.train_index)
    assert torch.equal(ytr, train_rows % 10) and torch.equal(yva, val_rows % 10)
    assert torch.equal(yte, (test_rows + 3) % 10)
    assert not set(train_rows.tolist()) & set(val_rows.tolist())
    assert test_rows.min() >= 0 and test_rows.max() < N_TEST_FILE and len(set(test_rows.tolist())) == 5
    assert torch.all(Xtr == Xtr[:, :, :1, :1])  # every pixel of an image kept its value


def test_splits_are_seeded(tmp_path, nowhere):
    folder = tiny_fashion(tmp_path / "fm")
    a, b, c = (load_dataset("fashion-mnist", seed=s, n_train=20, n_val=10, n_test=5, data_dir=folder) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a.train + a.val + a.test, b.train + b.val + b.test))
    assert not torch.equal(a.train_index, c.train_index)


def test_full_takes_every_row(tmp_path, nowhere):
    folder = tiny_fashion(tmp_path / "fm")
    splits = load_dataset("fashion-mnist-full", n_train=50, n_val=10, n_test=N_TEST_FILE, data_dir=folder)
    rows = (torch.cat([splits.train[0], splits.val[0]])[:, 0, 0, 0] * 255).round().long()
    assert sorted(rows.tolist()) == list(range(N_TRAIN_FILE))
    assert sorted((splits.test[0][:, 0, 0, 0] * 255).round().long().tolist()) == list(range(100, 100 + N_TEST_FILE))


def test_sizes_larger_than_the_files_are_refused(tmp_path, nowhere):
    folder = tiny_fashion(tmp_path / "fm")
    with pytest.raises(ValueError, match=r"n_train \+ n_val: fashion-mnist has 60 training images, asked for 11000"):
        load_dataset("fashion-mnist", data_dir=folder)
    with pytest.raises(ValueError, match=r"n_test: fashion-mnist has 20 test images, asked for 21"):
        load_dataset("fashion-mnist", n_train=10, n_val=10, n_test=21, data_dir=folder)


def test_search_order_argument_environment_cache(tmp_path, nowhere, monkeypatch):
    cache = tiny_fashion(tmp_path / "cache" / "robust-infl" / "fashion-mnist")
    assert fashion_mnist_dirs()[0] == cache
    env_folder, arg_folder = tmp_path / "env", tmp_path / "arg"
    monkeypatch.setenv(FASHION_MNIST_ENV, str(env_folder))
    assert fashion_mnist_dirs(arg_folder)[:3] == [arg_folder, env_folder, cache]
    assert datasets.find_fashion_mnist(arg_folder)[0].parent == cache  # the first folder holding all four
    tiny_fashion(env_folder)
    assert datasets.find_fashion_mnist(arg_folder)[0].parent == env_folder
    tiny_fashion(arg_folder, gz=True)
    assert datasets.find_fashion_mnist(arg_folder)[0] == arg_folder / "train-images-idx3-ubyte.gz"
    assert load_dataset("fashion-mnist", n_train=5, n_val=5, n_test=5).train[0].shape == (5, 1, 28, 28)


def test_missing_data_is_one_line_naming_the_folders_and_the_fix(tmp_path, nowhere, monkeypatch):
    partial = tiny_fashion(tmp_path / "partial")
    (partial / FASHION_MNIST_FILES[3]).unlink()  # three of the four files are not enough
    monkeypatch.setenv(FASHION_MNIST_ENV, str(partial))
    with pytest.raises(FileNotFoundError) as err:
        load_dataset("fashion-mnist")
    message = str(err.value)
    assert "\n" not in message and message.startswith("data: Fashion-MNIST not found")
    for folder in (partial, tmp_path / "cache" / "robust-infl" / "fashion-mnist", tmp_path / "debian"):
        assert str(folder) in message
    assert "make setup" in message and FASHION_MNIST_ENV in message


def test_bad_arguments_are_refused_before_any_file_is_read(nowhere):
    with pytest.raises(ValueError, match="data_dir: only the fashion-mnist data sets"):
        load_dataset("mnist", data_dir="/tmp")
    with pytest.raises(TypeError, match="data_dir: must be a path, got int"):
        load_dataset("fashion-mnist", data_dir=3)
    with pytest.raises(ValueError, match="n_train: must be a positive integer, got 0"):
        load_dataset("fashion-mnist", n_train=0)


def test_registry_defaults_are_the_image_threat_model():
    for name in ("fashion-mnist", "fashion-mnist-full"):
        d = DATA_DEFAULTS[name]
        assert (d.model, d.norm, d.eps) == ("cnn", "linf", 0.1)


@pytest.mark.skipif(not fashion_mnist_installed(), reason="Fashion-MNIST is not installed here (make setup fills the cache)")
def test_real_files_hold_60000_and_10000_balanced_images():
    train_x, train_y, test_x, test_y = (read_idx(p) for p in datasets.find_fashion_mnist())
    assert train_x.shape == (60000, 28, 28) and test_x.shape == (10000, 28, 28)
    assert np.bincount(train_y).tolist() == [6000] * 10 and np.bincount(test_y).tolist() == [1000] * 10
    splits = load_dataset("fashion-mnist", seed=0)
    assert [len(s[0]) for s in (splits.train, splits.val, splits.test)] == [10000, 1000, 2000]
    assert splits.train[0].min() == 0.0 and splits.train[0].max() == 1.0
