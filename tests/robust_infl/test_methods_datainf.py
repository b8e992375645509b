"""DataInf ("datainf") against its defining formula with explicit per-layer matrix inverses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import robust_infl as ri

from conftest import flat_grad

N_TRAIN = 25


@pytest.fixture
def mlp_and_data(mlp_problem):
    return mlp_problem(seed=6, n_features=4, n_classes=3, hidden=(5,), n_train=N_TRAIN, n_target=9)


def brute_force_datainf(model, train, target, layers, lambda_scale):
    """-sum_l v_l^T [(1/n) sum_i (g_il g_il^T + lambda_l I)^{-1}] g_kl, with explicit inverses."""
    x, y = train
    parameters = list(model.parameters())
    g = torch.stack([flat_grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), parameters) for i in range(N_TRAIN)])
    v = flat_grad(F.cross_entropy(model(target[0]), target[1]), parameters)
    harm = torch.zeros(N_TRAIN, dtype=torch.float64)
    for cols in layers:
        gl, vl = g[:, cols], v[cols]
        lam = lambda_scale * (gl * gl).sum(dim=1).mean()
        eye = torch.eye(len(cols), dtype=torch.float64)
        inverse = torch.stack([torch.linalg.inv(torch.outer(gi, gi) + lam * eye) for gi in gl]).mean(dim=0)
        harm -= gl @ (inverse @ vl)
    return harm


@pytest.mark.parametrize("lambda_scale", [0.1, 2.0])
def test_datainf_equals_the_explicit_layerwise_formula(mlp_and_data, lambda_scale):
    model, train, target = mlp_and_data
    # layers = modules: net.1 (weight 5x4 + bias 5) and net.3 (weight 3x5 + bias 3)
    layers = [torch.arange(0, 25), torch.arange(25, 43)]
    expected = brute_force_datainf(model, train, target, layers, lambda_scale)
    harm = ri.influence(model, train, target, objective=ri.Utility(), method="datainf", lambda_scale=lambda_scale,
                        batch_size=7, progress=False)
    torch.testing.assert_close(harm, expected)


def test_datainf_groups_weight_and_bias_of_a_module_and_scores_only_chosen_params(mlp_and_data):
    model, train, target = mlp_and_data
    last_layer = ["net.3.bias", "net.3.weight"]  # out of model order: columns follow this order
    harm = ri.influence(model, train, target, objective=ri.Utility(), method="datainf", params=last_layer,
                        progress=False)
    x, y = train
    parameters = [model.net[3].bias, model.net[3].weight]
    g = torch.stack([flat_grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), parameters) for i in range(N_TRAIN)])
    v = flat_grad(F.cross_entropy(model(target[0]), target[1]), parameters)
    lam = 0.1 * (g * g).sum(dim=1).mean()
    # Sherman-Morrison form of the same average of inverses
    direction = (v - ((g @ v) / (lam + (g * g).sum(dim=1))) @ g / N_TRAIN) / lam
    torch.testing.assert_close(harm, -g @ direction)


def test_bad_lambda_scale_is_rejected_by_name(mlp_and_data):
    with pytest.raises(ValueError, match=r"^lambda_scale: must be a finite number > 0"):
        ri.influence(*mlp_and_data, objective=ri.Utility(), method="datainf", lambda_scale=0.0, progress=False)


def test_per_target_datainf_is_the_formula_on_each_target_alone(mlp_and_data, fgsm_attack):
    model, train, target = mlp_and_data
    layers = [torch.arange(0, 25), torch.arange(25, 43)]
    matrix = ri.influence(model, train, target, objective=ri.Utility(), method="datainf", aggregate=False,
                          batch_size=7, progress=False)
    assert matrix.shape == (N_TRAIN, 9)
    for j in (0, 4, 8):
        one = (target[0][j : j + 1], target[1][j : j + 1])
        torch.testing.assert_close(matrix[:, j], brute_force_datainf(model, train, one, layers, 0.1))
    aggregate = ri.influence(model, train, target, objective=ri.Utility(), method="datainf", batch_size=7,
                             progress=False)
    torch.testing.assert_close(matrix.mean(dim=1), aggregate)
    robust = ri.Robust(fgsm_attack(0.1))  # the row means are the aggregate scores for Robust too
    torch.testing.assert_close(
        ri.influence(model, train, target, objective=robust, method="datainf", aggregate=False, batch_size=7,
                     progress=False).mean(dim=1),
        ri.influence(model, train, target, objective=robust, method="datainf", batch_size=7, progress=False))
