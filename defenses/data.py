"""Training batches of user data and subsets of it.

The data conventions (forms, dtype, labels, empty data) are :mod:`attacks.inputs`'s, one rule for the
whole API: :func:`attacks.inputs.as_data` normalises whole data sets; :func:`batch_source` streams a
``Dataset`` by the same rules, one batch at a time.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from attacks.inputs import as_data, as_labels, check_dataset_size, check_inputs, collate

__all__ = ["take", "batch_source"]


def batch_source(data, name: str = "train") -> tuple:
    """``(n, fetch, tensors)`` for training on ``data``: ``fetch(index) -> (X_batch, y_batch)``.

    Tensors, arrays and ``TensorDataset`` s are checked whole (``tensors`` is ``(X, y)``); any other
    ``Dataset`` (also the dataset of a ``DataLoader``) is STREAMED: ``fetch`` reads only the items of
    one batch, checked when read, and ``tensors`` is None.
    """
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if not isinstance(dataset, Dataset) or isinstance(dataset, TensorDataset):
        X, y = as_data(dataset, name)[:2]
        return X.shape[0], (lambda index: (X[index], y[index])), (X, y)
    n = check_dataset_size(dataset, name)

    def fetch(index: torch.Tensor) -> tuple:
        xb, yb = collate([dataset[i] for i in index.tolist()], name)[:2]
        return check_inputs(xb, name), as_labels(yb, name)

    return n, fetch, None


def take(data: Sequence[torch.Tensor], index) -> tuple:
    """Rows ``index`` (a boolean mask or integer indices) of every tensor in ``data``."""
    return tuple(t[index] for t in data)
