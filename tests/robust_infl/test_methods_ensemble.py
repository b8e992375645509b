"""IP-ensemble ("ip-ensemble"): one member is IP; members are fixed perturbed copies of the model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import robust_infl as ri
from robust_infl import engine
from robust_infl.methods import ensemble
from robust_infl.models import LogisticRegression
from robust_infl.objectives import cross_entropy_loss
from robust_infl.inputs import validate_target
from robust_infl.options import ScoringOptions

from conftest import influence_scorer


@pytest.fixture
def mlp_and_data(mlp_problem):
    return mlp_problem(seed=2, n_features=4, n_classes=3, hidden=(6, 5), n_train=23, n_target=11)


score = influence_scorer(batch_size=8)


@pytest.mark.parametrize("perturbation", ["dropout", "gaussian"])
def test_one_member_is_exactly_ip(mlp_and_data, perturbation):
    ip = score(*mlp_and_data, method="ip")
    one = score(*mlp_and_data, method="ip-ensemble", members=1, perturbation=perturbation)
    assert torch.equal(one, ip)


def test_gaussian_members_are_ip_at_seeded_noisy_weights(mlp_and_data, fgsm_attack):
    model, train, target = mlp_and_data
    objective = ri.Robust(fgsm_attack(0.1))  # the attack must be recomputed on every member
    scale, seed = 0.05, 7
    generator = torch.Generator().manual_seed(seed)
    expected = score(model, train, target, objective, method="ip", seed=seed)
    for _ in range(2):
        member = copy.deepcopy(model)
        with torch.no_grad():
            for p in member.parameters():
                p.add_(scale * torch.randn(p.shape, generator=generator, dtype=torch.float64))
        expected = expected + score(member, train, target, objective, method="ip", seed=seed)
    summed = score(model, train, target, objective, method="ip-ensemble", members=3, perturbation="gaussian",
                   scale=scale, seed=seed)
    torch.testing.assert_close(summed, expected)
    averaged = score(model, train, target, objective, method="ip-ensemble", members=3, perturbation="gaussian",
                     scale=scale, seed=seed, combine="mean")
    torch.testing.assert_close(averaged, expected / 3)


class MaskedMLP(nn.Module):
    """The MLP's layers with explicit multiplicative masks after each hidden Linear layer."""

    def __init__(self, mlp, masks):
        super().__init__()
        self.mlp, self.masks = mlp, masks

    def forward(self, x):
        layers = self.mlp.net
        h = layers[0](x)
        h = torch.relu(layers[1](h) * self.masks[0])
        h = torch.relu(layers[3](h) * self.masks[1])
        return layers[5](h)


def test_dropout_member_is_one_fixed_masked_function(mlp_and_data, fgsm_attack):
    model, train, target = mlp_and_data
    objective = ri.Robust(fgsm_attack(0.1))
    scale, seed = 0.5, 3
    problem = engine.build_problem(model, train, validate_target(target), objective, loss_fn=cross_entropy_loss,
                                   param_names=tuple(n for n, _ in model.named_parameters()),
                                   device=torch.device("cpu"), options=ScoringOptions(batch_size=8, seed=seed,
                                                                                      progress=False))
    layers = ensemble.dropout_layers(problem)
    assert [module for module, _ in layers] == [model.net[1], model.net[3]]  # the output layer is not masked
    assert [tuple(shape) for _, shape in layers] == [(6,), (5,)]
    # The documented draw: from a generator seeded with the scoring seed, per layer a rate p ~ U(0, scale),
    # then an inverted-dropout mask keep / (1 - p) with keep ~ Bernoulli(1 - p); matching scores below show
    # that member 1 is exactly the model with these masks.
    generator, masks = torch.Generator().manual_seed(seed), []
    for _, shape in layers:
        rate = float(torch.rand((), generator=generator, dtype=torch.float64)) * scale
        masks.append((torch.rand(shape, generator=generator, dtype=torch.float64) >= rate) / (1 - rate))
    values = torch.cat(masks)
    assert (values == 0).any() and ((values == 0) | (values > 1)).all()  # inverted dropout

    x = train[0]
    outputs = model(x)
    masked = MaskedMLP(model, masks)
    assert not torch.allclose(masked(x), outputs)  # the masks change the function
    expected = score(model, train, target, objective, method="ip", seed=seed) + score(
        masked, train, target, objective, method="ip", seed=seed)
    for batch_size in (1, 8, 23):  # one mask per feature shared by the batch: batching cannot matter
        member_sum = score(model, train, target, objective, method="ip-ensemble", members=2, scale=scale,
                           seed=seed, batch_size=batch_size)
        torch.testing.assert_close(member_sum, expected)
    # no hooks left behind: the model computes its unmasked function again
    assert torch.equal(model(x), outputs)


def test_members_are_seeded(mlp_and_data):
    for perturbation in ("dropout", "gaussian"):
        options = dict(method="ip-ensemble", members=3, perturbation=perturbation, scale=0.3)
        first = score(*mlp_and_data, seed=1, **options)
        assert torch.equal(first, score(*mlp_and_data, seed=1, **options))
        assert not torch.allclose(first, score(*mlp_and_data, seed=2, **options))


def test_the_model_is_left_unchanged(mlp_and_data):
    model = mlp_and_data[0]
    before = copy.deepcopy(model.state_dict())
    score(*mlp_and_data, method="ip-ensemble", members=3, perturbation="gaussian", scale=0.1)
    score(*mlp_and_data, method="ip-ensemble", members=3, perturbation="dropout", scale=0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_dropout_needs_a_hidden_layer():
    model = LogisticRegression(3, 1).double()
    data = (torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,)))
    with pytest.raises(ValueError, match=r"^perturbation: 'dropout' needs at least one Linear/Conv layer"):
        score(model, data, data, method="ip-ensemble", members=2)
    assert score(model, data, data, method="ip-ensemble", members=2, perturbation="gaussian").shape == (10,)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"members": 0}, r"^members: must be >= 1"),
        ({"perturbation": "noise"}, r"^perturbation: must be one of dropout, gaussian"),
        ({"scale": 1.0}, r"^scale: must be a finite number in \(0, 1\)"),
        ({"perturbation": "gaussian", "scale": 0.0}, r"^scale: must be a finite number > 0"),
        ({"combine": "max"}, r"^combine: must be one of sum, mean"),
    ],
)
def test_bad_options_are_rejected_by_name(mlp_and_data, options, message):
    with pytest.raises(ValueError, match=message):
        score(*mlp_and_data, method="ip-ensemble", **options)


@pytest.mark.parametrize("perturbation", ["dropout", "gaussian"])
def test_per_target_matrix_is_the_ensemble_on_each_target_alone(mlp_and_data, perturbation):
    model, train, target = mlp_and_data
    options = dict(method="ip-ensemble", members=3, perturbation=perturbation, scale=0.3, seed=5, batch_size=8,
                   progress=False)
    matrix = ri.influence(model, train, target, objective=ri.Utility(), aggregate=False, **options)
    assert matrix.shape == (23, 11)
    for j in (0, 5, 10):  # the same seeded members score each target alone
        alone = ri.influence(model, train, (target[0][j : j + 1], target[1][j : j + 1]), objective=ri.Utility(),
                             **options)
        torch.testing.assert_close(matrix[:, j], alone)
    torch.testing.assert_close(matrix.mean(dim=1), ri.influence(model, train, target, objective=ri.Utility(),
                                                                **options))
    one = ri.influence(model, train, target, objective=ri.Utility(), aggregate=False,
                       **{**options, "members": 1})
    assert torch.equal(one, ri.influence(model, train, target, objective=ri.Utility(), method="ip", aggregate=False,
                                         batch_size=8, progress=False))
