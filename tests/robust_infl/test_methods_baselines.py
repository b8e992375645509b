"""Objective-independent baselines: "self" (||grad l_i||^2), "loss" and seeded "random"."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import robust_infl as ri

from conftest import influence_scorer


@pytest.fixture
def mlp_and_data(mlp_problem):
    return mlp_problem(seed=8, n_features=4, n_classes=3, hidden=(6,), n_train=17, n_target=5)


score = influence_scorer(batch_size=6)


def test_self_influence_is_the_squared_gradient_norm(mlp_and_data):
    model, (x, y), target = mlp_and_data
    expected = torch.stack([
        sum((g**2).sum() for g in torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(model.parameters())))
        for i in range(17)
    ])
    torch.testing.assert_close(score(model, (x, y), target, method="self"), expected)
    last = model.net[3]
    expected_last = torch.stack([
        sum((g**2).sum() for g in torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), [last.weight, last.bias]))
        for i in range(17)
    ])
    torch.testing.assert_close(score(model, (x, y), target, method="self", params=["net.3.weight", "net.3.bias"]), expected_last)


def test_self_influence_of_a_conv_net_is_the_squared_gradient_norm():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).double().eval()
    x, y = torch.rand(7, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (7,))
    expected = torch.stack([
        sum((g**2).sum() for g in torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]),
                                                       list(model.parameters())))
        for i in range(7)
    ])
    torch.testing.assert_close(score(model, (x, y), (x, y), method="self", batch_size=4), expected)


def test_loss_score_is_the_training_loss_clean_or_adversarial(mlp_and_data, fgsm_attack):
    model, (x, y), target = mlp_and_data
    torch.testing.assert_close(score(model, TensorDataset(x, y), target, method="loss"),
                               F.cross_entropy(model(x), y, reduction="none").detach())
    attack = fgsm_attack(0.2)
    x_adv = torch.cat([attack(model, x[s : s + 6], y[s : s + 6]) for s in range(0, 17, 6)])  # per training batch
    adversarial = F.cross_entropy(model(x_adv), y, reduction="none").detach()
    got = score(model, (x, y), target, method="loss", train_loss="adversarial", train_attack=attack)
    torch.testing.assert_close(got, adversarial)


def test_baselines_ignore_the_objective(mlp_and_data, fgsm_attack):
    model, train, (xt, yt) = mlp_and_data
    for method in ("self", "loss", "random"):
        utility = score(model, train, (xt, yt), method=method)
        robust = score(model, train, (xt, yt), ri.Robust(fgsm_attack(0.3)), method=method)
        assert torch.equal(utility, robust)


def test_random_scores_are_seeded_standard_normal(mlp_and_data):
    model, (x, y), target = mlp_and_data
    first = score(model, (x, y), target, method="random", seed=9)
    assert torch.equal(first, score(model, (x, y), target, method="random", seed=9))
    assert not torch.equal(first, score(model, (x, y), target, method="random", seed=10))
    torch.testing.assert_close(first, torch.randn(17, generator=torch.Generator().manual_seed(9), dtype=torch.float64))
    big = ri.influence(model, (torch.randn(4000, 4, dtype=torch.float64), torch.randint(0, 3, (4000,))), target,
                       objective=ri.Utility(), method="random", progress=False)
    assert abs(float(big.mean())) < 0.1 and abs(float(big.std()) - 1) < 0.1
