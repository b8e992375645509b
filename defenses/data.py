"""Coerce user data into tensors and take subsets of it (one place for the data conventions).

Data is ``(X, y)`` or ``(X, y, s)`` (a tuple or list of tensors or numpy arrays with one row per
sample), a ``TensorDataset``, any map-style ``Dataset`` whose items are such tuples, or a
``DataLoader`` over one (its dataset is used). Labels are class indices: integer tensors, or
floating ones holding whole numbers (converted to int64); anything else is refused, alike in the
trainers, :func:`defenses.run` and ``robust_infl.influence``.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data.dataloader import default_collate

from attacks.validation import check_dataset_size, integer_labels

__all__ = ["as_tensors", "as_labels", "take", "batch_source"]


def as_labels(y: torch.Tensor, name: str) -> torch.Tensor:
    """Labels ``y`` as class indices (``attacks.validation.integer_labels``: whole-number floats as
    int64, other floats refused); bool and complex labels raise ``TypeError`` naming ``name``."""
    if y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"{name}: labels must be integer class indices, got {y.dtype}")
    return integer_labels(y, name)


def _check_inputs(x: torch.Tensor, name: str) -> None:
    if not x.is_floating_point():
        raise TypeError(f"{name}: X must be a floating-point tensor, got {x.dtype}")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{name}: X contains {bad} NaN or infinite value(s)")


def as_tensors(data, name: str = "data") -> tuple:
    """Return ``data`` as a tuple of tensors ``(X, y, *rest)`` with equal first dimensions and finite ``X``.

    Raises ``TypeError``/``ValueError`` starting with ``name`` when ``data`` has another form.
    """
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, TensorDataset):
        tensors = tuple(data.tensors)
    elif isinstance(data, (tuple, list)):
        tensors = tuple(torch.from_numpy(t) if isinstance(t, np.ndarray) else t for t in data)
    elif isinstance(data, Dataset):
        try:
            items = [data[i] for i in range(len(data))]
        except TypeError as err:
            raise TypeError(f"{name}: a Dataset must define __len__ and __getitem__") from err
        if not items:
            raise ValueError(f"{name}: the Dataset is empty")
        tensors = tuple(torch.stack([torch.as_tensor(item[k]) for item in items]) for k in range(len(items[0])))
    else:
        raise TypeError(f"{name}: expected (X, y[, s]) tensors or arrays, a Dataset or a DataLoader, "
                        f"got {type(data).__name__}")
    if len(tensors) < 2:
        raise ValueError(f"{name}: expected at least (X, y), got {len(tensors)} element(s)")
    for k, t in enumerate(tensors):
        if not torch.is_tensor(t):
            raise TypeError(f"{name}: element {k} must be a tensor, got {type(t).__name__}")
    n = tensors[0].shape[0] if tensors[0].dim() else 0
    if n == 0:
        raise ValueError(f"{name}: needs at least one sample")
    if any(t.dim() == 0 or t.shape[0] != n for t in tensors):
        raise ValueError(f"{name}: all tensors need the same first dimension, got "
                         f"{[tuple(t.shape) for t in tensors]}")
    _check_inputs(tensors[0], name)
    return (tensors[0], as_labels(tensors[1], name), *tensors[2:])


def batch_source(data, name: str = "train") -> tuple:
    """``(n, fetch, tensors)`` for training on ``data``: ``fetch(index) -> (X_batch, y_batch)``.

    Tensors, arrays and ``TensorDataset`` s are checked whole (``tensors`` is ``(X, y)``); any other
    ``Dataset`` (also the dataset of a ``DataLoader``) is STREAMED: ``fetch`` reads only the items of
    one batch, checked when read, and ``tensors`` is None.
    """
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if not isinstance(dataset, Dataset) or isinstance(dataset, TensorDataset):
        X, y = as_tensors(dataset, name)[:2]
        return X.shape[0], (lambda index: (X[index], y[index])), (X, y)
    n = check_dataset_size(dataset, name)

    def fetch(index: torch.Tensor) -> tuple:
        items = [dataset[i] for i in index.tolist()]
        if not all(isinstance(item, (tuple, list)) and len(item) >= 2 for item in items):
            raise ValueError(f"{name}: Dataset items must be (x, y[, ...]) tuples")
        xb, yb = default_collate([tuple(item[:2]) for item in items])
        xb, yb = torch.as_tensor(xb), torch.as_tensor(yb)
        _check_inputs(xb, name)
        return xb, as_labels(yb, name)

    return n, fetch, None


def take(data: Sequence[torch.Tensor], index) -> tuple:
    """Rows ``index`` (a boolean mask or integer indices) of every tensor in ``data``."""
    return tuple(t[index] for t in data)
