"""Coerce user data into tensors and take subsets of it (one place for the data conventions).

Data is ``(X, y)`` or ``(X, y, s)`` (a tuple or list of tensors with one row per sample), a
``TensorDataset``, or any map-style ``Dataset`` whose items are such tuples.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset, TensorDataset

__all__ = ["as_tensors", "take", "num_samples"]


def as_tensors(data, name: str = "data") -> tuple:
    """Return ``data`` as a tuple of tensors ``(X, y, *rest)`` with equal first dimensions and finite ``X``.

    Raises ``TypeError``/``ValueError`` starting with ``name`` when ``data`` has another form.
    """
    if isinstance(data, TensorDataset):
        tensors = tuple(data.tensors)
    elif isinstance(data, (tuple, list)):
        tensors = tuple(data)
    elif isinstance(data, Dataset):
        try:
            items = [data[i] for i in range(len(data))]
        except TypeError as err:
            raise TypeError(f"{name}: a Dataset must define __len__ and __getitem__") from err
        if not items:
            raise ValueError(f"{name}: the Dataset is empty")
        tensors = tuple(torch.stack([torch.as_tensor(item[k]) for item in items]) for k in range(len(items[0])))
    else:
        raise TypeError(f"{name}: expected (X, y[, s]) tensors or a Dataset, got {type(data).__name__}")
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
    if not tensors[0].is_floating_point():
        raise TypeError(f"{name}: X must be a floating-point tensor, got {tensors[0].dtype}")
    bad = int((~torch.isfinite(tensors[0])).sum())
    if bad:
        raise ValueError(f"{name}: X contains {bad} NaN or infinite value(s)")
    return tensors


def num_samples(data) -> int:
    """Number of samples (rows) in a tuple of tensors."""
    return int(data[0].shape[0])


def take(data: Sequence[torch.Tensor], index) -> tuple:
    """Rows ``index`` (a boolean mask or integer indices) of every tensor in ``data``."""
    return tuple(t[index] for t in data)
