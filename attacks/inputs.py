"""The one normaliser of the data given to the API, shared by ``attacks``, ``robust_infl`` and ``defenses``.

One rule and one message per case, whoever receives the data (``evaluate``, the attacks, the trainers,
``influence``, ``defenses.run``):

- forms: ``(X, y[, ...])`` tuples or lists of tensors, numpy arrays or nested lists, a ``TensorDataset``,
  any sized map-style ``Dataset`` of such tuples, or a ``DataLoader`` (its dataset is used);
- ``X`` holds floating-point numbers; integer, bool and complex ``X`` are refused (``TypeError``): an
  integer image is usually in ``[0, 255]`` where the models expect ``[0, 1]``, so the conversion is
  the caller's (``X.float() / 255``);
- floating ``X`` of another dtype than the model's (numpy's and scikit-learn's float64, float16) is
  converted to the model's dtype and moved to its device where the model runs (:func:`to_model`);
  an attack returns its result in the dtype of the ``x`` it was given;
- ``y`` holds class indices: integer tensors, or floats holding whole numbers (converted to int64);
  they must lie in the range of the model's outputs (:func:`attacks.validation.check_labels`);
- empty data: ``"<name>: is empty (0 samples)"``; NaN or infinite ``X``: ``"<name>: X contains k NaN or
  infinite value(s)"``; meta tensors (which hold no data) are refused.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.data.dataloader import default_collate

from .plumbing import model_device
from .validation import check_int, integer_labels

__all__ = [
    "as_data",
    "as_inputs",
    "as_labels",
    "check_inputs",
    "check_not_empty",
    "check_dataset_size",
    "collate",
    "to_model",
    "check_target_class",
]


def check_not_empty(n: int, name: str) -> int:
    """``n`` if it is at least one sample; else ``ValueError``: ``"<name>: is empty (0 samples)"``."""
    if n == 0:
        raise ValueError(f"{name}: is empty (0 samples)")
    return n


def check_dataset_size(dataset: Any, name: str) -> int:
    """The number of items of a map-style ``dataset``: ``TypeError`` without ``__len__``, ``ValueError`` when empty."""
    try:
        n = len(dataset)
    except TypeError as err:
        raise TypeError(f"{name}: a Dataset must define __len__") from err
    return check_not_empty(n, name)


def check_inputs(x: torch.Tensor, name: str, field: Optional[str] = "X") -> torch.Tensor:
    """``x`` if it holds finite floating-point values on a real device; the messages start with
    ``"<name>: <field>"`` (``"train: X ..."``; ``"x: ..."`` for an attack's batch with ``field=None``)."""
    lead = f"{name}: {field}" if field else f"{name}:"
    if not x.is_floating_point():
        raise TypeError(f"{lead} must be floating-point (integer data: X.float(), 8-bit images: X.float() / 255), "
                        f"got {x.dtype}")
    if x.is_meta:
        raise ValueError(f"{lead} is on the meta device (it holds no data)")
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise ValueError(f"{lead} contains {bad} NaN or infinite value(s)")
    return x


def as_labels(y: torch.Tensor, name: str) -> torch.Tensor:
    """Labels ``y`` as class indices: integer tensors unchanged, whole-number floats as int64; bool and
    complex labels raise ``TypeError``, other floats ``ValueError`` naming ``name``."""
    if y.dtype == torch.bool or y.is_complex():
        raise TypeError(f"{name}: labels must be integer class indices, got {y.dtype}")
    if y.is_meta:
        raise ValueError(f"{name}: y is on the meta device (it holds no data)")
    return integer_labels(y, name)


def _tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, list, tuple)):
        try:
            return torch.as_tensor(np.asarray(value))
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"{name}: cannot be converted to a tensor ({err})") from err
    raise TypeError(f"{name}: expected tensors or numpy arrays, got {type(value).__name__}")


def as_inputs(x: Any, name: str) -> torch.Tensor:
    """One batch of inputs ``x`` (a tensor or an array) as a checked floating tensor (:func:`check_inputs`)."""
    return check_inputs(_tensor(x, name), name)


def collate(items: list, name: str) -> tuple:
    """Items of a ``Dataset`` (``(x, y, ...)`` tuples of equal length) stacked into a tuple of tensors."""
    if not all(isinstance(item, (tuple, list)) and len(item) >= 2 for item in items):
        raise ValueError(f"{name}: Dataset items must be (x, y, ...) tuples")
    return tuple(_tensor(t, name) for t in default_collate([tuple(item) for item in items]))


def as_data(data: Any, name: str = "data", max_fields: Optional[int] = None) -> tuple:
    """``data`` as a tuple of tensors ``(X, y, *rest)``: equal lengths, at least one sample, floating finite
    ``X`` (in its own dtype: :func:`to_model` converts it where a model runs), class-index ``y``.

    Takes ``(X, y[, ...])`` tensors / arrays (at most ``max_fields`` of them when given), a
    ``TensorDataset``, a sized ``Dataset`` of such tuples (read whole) or a ``DataLoader`` (its
    dataset). Errors start with ``name``.
    """
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, TensorDataset):
        tensors = tuple(data.tensors)
    elif isinstance(data, Dataset):
        tensors = collate([data[i] for i in range(check_dataset_size(data, name))], name)
    elif isinstance(data, (tuple, list)):
        tensors = tuple(_tensor(t, name) for t in data)
    else:
        raise TypeError(f"{name}: expected (X, y) tensors or arrays, a Dataset or a DataLoader, "
                        f"got {type(data).__name__}")
    if len(tensors) < 2 or (max_fields is not None and len(tensors) > max_fields):
        expected = "(X, y)" if max_fields == 2 else "(X, y) or (X, y, s)" if max_fields == 3 else "(X, y, ...)"
        raise ValueError(f"{name}: expected {expected}, got {len(tensors)} element(s)")
    X, y = tensors[0], tensors[1]
    if X.ndim == 0:
        raise ValueError(f"{name}: X must have a leading sample dimension, got a scalar")
    if y.ndim == 0 or y.shape[0] != X.shape[0]:
        n_labels = y.shape[0] if y.ndim else "a scalar"
        raise ValueError(f"{name}: X and y have different lengths ({X.shape[0]} vs {n_labels})")
    for t in tensors[2:]:
        if t.ndim == 0 or t.shape[0] != X.shape[0]:
            raise ValueError(f"{name}: s must have shape ({X.shape[0]},), got {tuple(t.shape)}")
    check_not_empty(X.shape[0], name)
    check_inputs(X, name)
    return (X, as_labels(y, name), *tensors[2:])


def to_model(x: torch.Tensor, model: nn.Module) -> torch.Tensor:
    """Floating inputs ``x`` on the model's device in the model's floating dtype, that of its first floating
    parameter or buffer (float64 data into a float32 model is converted; ``x``'s own dtype for a model with
    no floating tensor; ``x`` itself when it already fits)."""
    tensors = (*model.parameters(), *model.buffers())
    dtype = next((t.dtype for t in tensors if t.is_floating_point()), x.dtype)
    return x.to(device=model_device(model, x.device), dtype=dtype)


def check_target_class(target_class: Any, num_classes: int) -> int:
    """``target_class`` as an ``int`` after checking it is an integer class in ``[0, num_classes)``."""
    return check_int(target_class, "target_class", minimum=0, maximum=num_classes - 1)
