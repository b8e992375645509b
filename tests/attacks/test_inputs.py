"""The one normaliser of the API's data (attacks.inputs): every form gives the same tensors, one message per case."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from attacks.inputs import as_data, check_target_class, to_model

X = torch.rand(6, 3, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 0, 1, 2])


class Items(Dataset):
    def __len__(self):
        return len(X)

    def __getitem__(self, i):
        return X[i], Y[i]


@pytest.mark.parametrize("form", ["tensors", "numpy", "lists", "tensor-dataset", "dataset", "loader"])
def test_every_form_gives_the_same_tensors(form):
    data = {"tensors": (X, Y), "numpy": (X.numpy(), Y.numpy()), "lists": (X.tolist(), Y.tolist()),
            "tensor-dataset": TensorDataset(X, Y), "dataset": Items(),
            "loader": DataLoader(Items(), batch_size=4, shuffle=True)}[form]
    x, y = as_data(data, "train")
    assert torch.allclose(x.double(), X.double()) and torch.equal(y, Y)


@pytest.mark.parametrize("data, error, message", [
    ((X[:0], Y[:0]), ValueError, r"^train: is empty \(0 samples\)$"),
    (TensorDataset(X[:0], Y[:0]), ValueError, r"^train: is empty \(0 samples\)$"),
    (Items.__new__(type("Empty", (Items,), {"__len__": lambda self: 0})), ValueError, r"^train: is empty \(0 samples\)$"),
    (((X * 9).long(), Y), TypeError, r"^train: X must be floating-point \(integer data: X.float\(\), 8-bit images: "
                                     r"X.float\(\) / 255\), got torch.int64$"),
    ((X > 0.5, Y), TypeError, r"^train: X must be floating-point .* got torch.bool$"),
    ((X.to("meta"), Y), ValueError, r"^train: X is on the meta device \(it holds no data\)$"),
    ((X, Y[:5]), ValueError, r"^train: X and y have different lengths \(6 vs 5\)$"),
    ((X, Y + 0.5), ValueError, r"^train: labels must be integer class indices"),
    ((X, Y.bool()), TypeError, r"^train: labels must be integer class indices, got torch.bool$"),
    ("X.npy", TypeError, r"^train: expected \(X, y\) tensors or arrays, a Dataset or a DataLoader, got str$"),
    ((X,), ValueError, r"^train: expected \(X, y, \.\.\.\), got 1 element\(s\)$"),
])
def test_one_message_per_case(data, error, message):
    with pytest.raises(error, match=message):
        as_data(data, "train")


def test_float_data_of_another_dtype_runs_in_the_models_dtype():
    model = nn.Linear(3, 2)
    assert to_model(X.double(), model).dtype == torch.float32
    assert to_model(X, model) is X  # already fitting: untouched, so float32 results stay bit for bit
    assert to_model(X, model.double()).dtype == torch.float64
    x, _ = as_data((X.numpy().astype(np.float64), Y.numpy()), "train")
    assert x.dtype == torch.float64  # kept as given; converted where the model runs


def test_target_class_is_a_class_of_the_model():
    assert check_target_class(2, 3) == 2
    with pytest.raises(ValueError, match=r"^target_class: must be in \[0, 2\], got 3$"):
        check_target_class(3, 3)
