"""``influence`` against brute force: plain autograd, one training sample at a time."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import robust_infl as ri
from robust_infl.models import MLP, SmallCNN
from robust_infl.objectives import default_loss_fn

TOL = 1e-5


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def scored_parameters(model, names=None):
    return [p for n, p in model.named_parameters() if names is None or n in names]


def gradient(value: torch.Tensor, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, params)])


def per_sample_gradients_loop(model, x, y, params) -> torch.Tensor:
    loss = default_loss_fn(model(x[:1]).shape[1])
    return torch.stack([gradient(loss(model(x[i : i + 1]), y[i : i + 1]).sum(), params) for i in range(len(x))])


def brute_force_harm(model, x, y, objective_value: torch.Tensor, names=None) -> torch.Tensor:
    """-<grad f, grad l_i> for every i with torch.autograd.grad in a Python loop."""
    params = scored_parameters(model, names)
    return -per_sample_gradients_loop(model, x, y, params) @ gradient(objective_value, params)


def mean_loss(model, x, y):
    return default_loss_fn(model(x[:1]).shape[1])(model(x), y).mean()


def positive_probability(model, x):
    out = model(x)
    return torch.sigmoid(out[:, 0]) if out.shape[1] == 1 else torch.softmax(out, 1)[:, 1]


def demographic_parity(model, x, s):
    p = positive_probability(model, x)
    return (p[s == 1].mean() - p[s == 0].mean()) ** 2


def equal_opportunity(model, x, y, s):
    losses = default_loss_fn(model(x[:1]).shape[1])(model(x), y)
    return (losses[(s == 1) & (y == 1)].mean() - losses[(s == 0) & (y == 1)].mean()) ** 2


def make_mlp(n_outputs: int, dtype=torch.float64):
    torch.manual_seed(1)
    return MLP(6, n_outputs, hidden=(10, 8)).to(dtype)


def make_cnn(dtype=torch.float64):
    torch.manual_seed(2)
    return SmallCNN(in_channels=1, num_classes=3, image_size=8, channels=(3, 4), hidden=8).to(dtype)


def tabular_data(n: int, n_classes: int, dtype=torch.float64):
    x = torch.randn(n, 6, dtype=dtype)
    y = torch.randint(0, max(n_classes, 2), (n,))
    return x, y


def image_data(n: int, dtype=torch.float64):
    return torch.rand(n, 1, 8, 8, dtype=dtype), torch.randint(0, 3, (n,))


MODELS = {
    "mlp": (lambda: make_mlp(3), lambda n: tabular_data(n, 3)),
    "mlp-1logit": (lambda: make_mlp(1), lambda n: tabular_data(n, 2)),
    "cnn": (make_cnn, image_data),
}


@pytest.mark.parametrize("batch_size", [256, 7])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_ip_utility_equals_brute_force(name, batch_size):
    build, data = MODELS[name]
    model = build()
    (x, y), (xt, yt) = data(30), data(11)
    harm = ri.influence(model, (x, y), (xt, yt), objective=ri.Utility(), batch_size=batch_size, progress=False)
    expected = brute_force_harm(model, x, y, mean_loss(model, xt, yt))
    assert harm.shape == (30,)
    assert relative_error(harm, expected) <= TOL


@pytest.mark.parametrize("name", sorted(MODELS))
def test_ip_robust_with_fixed_attack_equals_brute_force(name, fgsm_attack):
    build, data = MODELS[name]
    model = build()
    (x, y), (xt, yt) = data(30), data(11)
    attack = fgsm_attack(0.1)
    harm = ri.influence(model, (x, y), (xt, yt), objective=ri.Robust(attack), progress=False)
    assert attack._calls == 1
    x_adv = fgsm_attack(0.1)(model, xt, yt)
    assert not torch.allclose(x_adv, xt)
    expected = brute_force_harm(model, x, y, mean_loss(model, x_adv, yt))
    assert relative_error(harm, expected) <= TOL


@pytest.mark.parametrize("batch_size", [256, 5])
@pytest.mark.parametrize("n_outputs", [1, 2])
def test_ip_demographic_parity_equals_brute_force(n_outputs, batch_size):
    model = make_mlp(n_outputs)
    x, y = tabular_data(30, 2)
    xt, yt = tabular_data(16, 2)
    s = (torch.arange(16) % 3 == 0).long()
    harm = ri.influence(
        model, (x, y), (xt, yt, s), objective=ri.DemographicParity(), batch_size=batch_size, progress=False
    )
    expected = brute_force_harm(model, x, y, demographic_parity(model, xt, s))
    assert relative_error(harm, expected) <= TOL


def test_ip_equal_opportunity_equals_brute_force():
    model = make_mlp(2)
    x, y = tabular_data(30, 2)
    xt, yt = tabular_data(20, 2)
    s = torch.arange(20) % 2
    harm = ri.influence(model, (x, y), (xt, yt, s), objective=ri.EqualOpportunity(), batch_size=6, progress=False)
    expected = brute_force_harm(model, x, y, equal_opportunity(model, xt, yt, s))
    assert relative_error(harm, expected) <= TOL


def test_ip_float32_cnn_equals_brute_force():
    model = make_cnn(torch.float32)
    (x, y), (xt, yt) = image_data(30, torch.float32), image_data(11, torch.float32)
    harm = ri.influence(model, (x, y), (xt, yt), objective=ri.Utility(), batch_size=8, progress=False)
    assert harm.dtype == torch.float32
    expected = brute_force_harm(model.double(), x.double(), y, mean_loss(model, xt.double(), yt))
    assert relative_error(harm.double(), expected) <= TOL


def test_ip_on_a_subset_of_parameters_equals_brute_force():
    model = make_cnn()
    (x, y), (xt, yt) = image_data(20), image_data(9)
    names = ["head.3.weight", "head.3.bias"]
    harm = ri.influence(model, (x, y), (xt, yt), objective=ri.Utility(), params=names, progress=False)
    expected = brute_force_harm(model, x, y, mean_loss(model, xt, yt), names)
    assert relative_error(harm, expected) <= TOL
    full = ri.influence(model, (x, y), (xt, yt), objective=ri.Utility(), progress=False)
    assert relative_error(full, expected) > 1e-2


def test_ip_with_adversarial_training_loss_equals_brute_force(fgsm_attack):
    model = make_mlp(3)
    (x, y), (xt, yt) = tabular_data(25, 3), tabular_data(10, 3)
    attack = fgsm_attack(0.2)
    harm = ri.influence(
        model, (x, y), (xt, yt), objective=ri.Utility(), train_loss="adversarial",
        train_attack=attack, batch_size=10, progress=False,
    )
    assert attack._calls == 3  # once per training batch
    x_adv = fgsm_attack(0.2)(model, x, y)
    expected = brute_force_harm(model, x_adv, y, mean_loss(model, xt, yt))
    assert relative_error(harm, expected) <= TOL


def test_ip_custom_loss_fn_equals_brute_force():
    model = make_mlp(3)
    (x, y), (xt, yt) = tabular_data(20, 3), tabular_data(8, 3)

    def smoothed_ce(outputs, targets):
        return F.cross_entropy(outputs, targets, reduction="none", label_smoothing=0.1)

    harm = ri.influence(model, (x, y), (xt, yt), objective=ri.Utility(), loss_fn=smoothed_ce, progress=False)
    params = scored_parameters(model)
    grads = torch.stack([gradient(smoothed_ce(model(x[i : i + 1]), y[i : i + 1]).sum(), params) for i in range(20)])
    expected = -grads @ gradient(smoothed_ce(model(xt), yt).mean(), params)
    assert relative_error(harm, expected) <= TOL


@pytest.mark.parametrize("robust", [False, True])
def test_ip_train_by_target_matrix_equals_brute_force(robust, fgsm_attack):
    model = make_cnn()
    (x, y), (xt, yt) = image_data(17), image_data(9)
    objective = ri.Robust(fgsm_attack(0.05)) if robust else ri.Utility()
    matrix = ri.influence(model, (x, y), (xt, yt), objective=objective, aggregate=False, batch_size=6, progress=False)
    assert matrix.shape == (17, 9)
    points = fgsm_attack(0.05)(model, xt, yt) if robust else xt
    params = scored_parameters(model)
    expected = -per_sample_gradients_loop(model, x, y, params) @ per_sample_gradients_loop(model, points, yt, params).T
    assert relative_error(matrix, expected) <= TOL
    aggregate = ri.influence(model, (x, y), (xt, yt), objective=objective, progress=False)
    assert relative_error(matrix.mean(1), aggregate) <= TOL


def test_dataset_train_gives_the_same_scores_as_tensors():
    model = make_mlp(3)
    (x, y), (xt, yt) = tabular_data(23, 3), tabular_data(8, 3)
    from_tensors = ri.influence(model, (x, y), (xt, yt), objective=ri.Utility(), batch_size=5, progress=False)
    from_dataset = ri.influence(
        model, TensorDataset(x, y), (xt, yt), objective=ri.Utility(), batch_size=5, progress=False
    )
    torch.testing.assert_close(from_dataset, from_tensors)
