"""Bad input to ``influence`` fails at the boundary with an error that names the argument."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import robust_infl as ri
from robust_infl.models import MLP


@pytest.fixture
def setup():
    model = MLP(4, 3, hidden=(5,))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    xt, yt = torch.randn(6, 4), torch.randint(0, 3, (6,))
    return model, (x, y), (xt, yt)


def call(model, train, target, **options):
    options.setdefault("objective", ri.Utility())
    return ri.influence(model, train, target, progress=False, **options)


def with_value(x, index, value):
    x = x.clone()
    x.view(-1)[index] = value
    return x


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs_are_rejected(setup, bad):
    model, (x, y), (xt, yt) = setup
    with pytest.raises(ValueError, match=r"^train: X contains 1 NaN or infinite"):
        call(model, (with_value(x, 7, bad), y), (xt, yt))
    with pytest.raises(ValueError, match=r"^target: X contains 1 NaN or infinite"):
        call(model, (x, y), (with_value(xt, 3, bad), yt))
    with pytest.raises(ValueError, match=r"^train: X contains 1 NaN or infinite"):
        call(model, TensorDataset(with_value(x, 30, bad), y), (xt, yt), batch_size=4)


def test_labels_outside_the_model_classes_are_rejected(setup):
    model, (x, y), (xt, yt) = setup
    with pytest.raises(ValueError, match=r"^train: labels must lie in \[0, 2\] .* got values in \[0, 3\]"):
        call(model, (x, with_value(y, 2, 3)), (xt, yt))
    with pytest.raises(ValueError, match=r"^target: labels must lie in \[0, 2\]"):
        call(model, (x, y), (xt, with_value(yt, 0, -1)))
    with pytest.raises(ValueError, match=r"^train: labels must lie in \[0, 2\]"):
        call(model, TensorDataset(x, with_value(y, 9, 5)), (xt, yt), batch_size=4)
    binary = MLP(4, 1, hidden=(5,))
    with pytest.raises(ValueError, match=r"^train: labels must lie in \[0, 1\] for a model with 1 output"):
        call(binary, (x, torch.full((10,), 2)), (xt, yt % 2))
    with pytest.raises(ValueError, match=r"^train: labels must be integer"):
        call(model, (x, torch.full((10,), 0.5)), (xt, yt))


def test_length_mismatch_and_empty_sets_are_rejected(setup):
    model, (x, y), (xt, yt) = setup
    with pytest.raises(ValueError, match=r"^train: X and y have different lengths \(10 vs 9\)"):
        call(model, (x, y[:9]), (xt, yt))
    with pytest.raises(ValueError, match=r"^target: X and y have different lengths"):
        call(model, (x, y), (xt[:5], yt))
    with pytest.raises(ValueError, match=r"^train: is empty"):
        call(model, (x[:0], y[:0]), (xt, yt))
    with pytest.raises(ValueError, match=r"^train: is empty"):
        call(model, TensorDataset(x[:0], y[:0]), (xt, yt))
    with pytest.raises(ValueError, match=r"^target: is empty"):
        call(model, (x, y), (xt[:0], yt[:0]))


class ThreeDimensionalOutputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 6)

    def forward(self, x):
        return self.linear(x).reshape(-1, 2, 3)


def test_model_outputs_incompatible_with_the_loss_are_rejected(setup):
    model, (x, y), (xt, yt) = setup
    with pytest.raises(ValueError, match=r"^model: outputs of shape \(2, 2, 3\) are incompatible with the default loss"):
        call(ThreeDimensionalOutputs(), (x, y), (xt, yt))

    def mean_loss(outputs, targets):
        return nn.functional.cross_entropy(outputs, targets)

    with pytest.raises(ValueError, match=r"^loss_fn: must return per-sample losses of shape \(2,\).*got \(\)"):
        call(model, (x, y), (xt, yt), loss_fn=mean_loss)
    with pytest.raises(ValueError, match=r"^train: the model cannot evaluate inputs of shape \(7,\)"):
        call(model, (torch.randn(10, 7), y), (xt, yt))
    with pytest.raises(ValueError, match=r"^objective: DemographicParity needs a binary model"):
        call(model, (x, y), (xt, yt, torch.arange(6) % 2), objective=ri.DemographicParity())


def test_unknown_parameter_names_are_listed(setup):
    model, train, target = setup
    with pytest.raises(ValueError, match=r"^params: unknown parameter name\(s\) \['net.9.weight'\]; valid names are \['net.1.weight'"):
        call(model, train, target, params=["net.9.weight"])
    with pytest.raises(TypeError, match=r"^params: expected a list"):
        call(model, train, target, params="net.1.weight")
    with pytest.raises(ValueError, match=r"^params: the list of parameter names is empty"):
        call(model, train, target, params=[])


def test_sensitive_attribute_is_checked(setup):
    model, (x, y), (xt, yt) = setup
    binary = MLP(4, 2, hidden=(5,))
    y2, yt2 = y % 2, yt % 2
    with pytest.raises(ValueError, match=r"^target: DemographicParity needs a sensitive attribute"):
        call(binary, (x, y2), (xt, yt2), objective=ri.DemographicParity())
    with pytest.raises(ValueError, match=r"^target: the sensitive attribute s must take values in \{0, 1\}"):
        call(binary, (x, y2), (xt, yt2, torch.tensor([0, 1, 2, 0, 1, 0])), objective=ri.DemographicParity())
    with pytest.raises(ValueError, match=r"^target: DemographicParity needs both groups"):
        call(binary, (x, y2), (xt, yt2, torch.zeros(6)), objective=ri.DemographicParity())
    with pytest.raises(ValueError, match=r"^target: EqualOpportunity needs both groups s=0 and s=1 among the samples with y=1"):
        call(binary, (x, y2), (xt, torch.tensor([1, 1, 0, 0, 0, 0]), torch.tensor([1, 1, 0, 0, 1, 0])), objective=ri.EqualOpportunity())
    with pytest.raises(ValueError, match=r"^target: s must have shape \(6,\)"):
        call(binary, (x, y2), (xt, yt2, torch.zeros(5)), objective=ri.DemographicParity())


class UnsizedDataset(Dataset):
    def __getitem__(self, index):
        return torch.zeros(4), 0


def test_scalar_options_and_types_are_checked(setup):
    model, train, target = setup
    cases = [
        (dict(damping=-1.0), ValueError, r"^damping: must be a finite number >= 0, got -1.0"),
        (dict(damping=float("nan")), ValueError, r"^damping: "),
        (dict(batch_size=0), ValueError, r"^batch_size: must be >= 1, got 0"),
        (dict(batch_size=2.5), TypeError, r"^batch_size: must be an integer"),
        (dict(seed=-3), ValueError, r"^seed: must be in \[0, 4294967295\]"),
        (dict(objective="utility"), TypeError, r"^objective: expected an Objective"),
        (dict(method=3), TypeError, r"^method: expected a method name"),
        (dict(loss_fn="ce"), TypeError, r"^loss_fn: must be callable"),
        (dict(train_loss="robust"), ValueError, r"^train_loss: must be one of clean, adversarial"),
        (dict(train_loss="adversarial"), ValueError, r"^train_attack: train_loss='adversarial' needs"),
        (dict(train_attack=lambda m, x, y: x), ValueError, r"^train_attack: only used with"),
        (dict(aggregate="no"), TypeError, r"^aggregate: must be True or False"),
        (dict(device="tpu-of-dreams"), ValueError, r"^device: must be a valid torch device"),
    ]
    for options, error, message in cases:
        with pytest.raises(error, match=message):
            call(model, train, target, **options)
    with pytest.raises(TypeError, match=r"^model: must be a torch.nn.Module"):
        call(lambda x: x, train, target)
    with pytest.raises(ValueError, match=r"^train: expected \(X, y, \.\.\.\), got 1 element\(s\)"):
        call(model, (train[0],), target)
    with pytest.raises(TypeError, match=r"^train: a Dataset must define __len__"):
        call(model, UnsizedDataset(), target)
    with pytest.raises(TypeError, match=r"^target: expected \(X, y\) tensors or arrays, a Dataset or a DataLoader"):
        call(model, train, target[0])
    with pytest.raises(TypeError, match=r"^attack: must be a callable"):
        ri.Robust("pgd")


def test_bad_attack_output_is_rejected(setup):
    model, train, (xt, yt) = setup
    with pytest.raises(ValueError, match=r"^attack: returned shape \(6, 3\), expected the input shape \(6, 4\)"):
        call(model, train, (xt, yt), objective=ri.Robust(lambda m, x, y: x[:, :3]))
    with pytest.raises(ValueError, match=r"^attack: contains 24 NaN"):
        call(model, train, (xt, yt), objective=ri.Robust(lambda m, x, y: x * float("nan")))
    with pytest.raises(ValueError, match=r"^aggregate: DemographicParity\(\) has no per-target-sample value"):
        binary = MLP(4, 2, hidden=(5,))
        call(binary, (train[0], train[1] % 2), (xt, yt % 2, torch.arange(6) % 2),
             objective=ri.DemographicParity(), aggregate=False)
