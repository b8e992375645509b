"""The exact influence function ("if-exact"): against an autograd Hessian, and against real
leave-one-out refits of an L2-regularised logistic regression (where first-order theory is tight)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust_infl as ri
from robust_infl.methods.hessian import MAX_PARAMS
from robust_infl.models import MLP, LogisticRegression, SmallCNN

N_TRAIN, N_FEATURES, DAMPING, EPS = 150, 4, 0.01, 0.3


def test_if_exact_is_registered():
    assert {"ip", "if-exact"} <= set(ri.available_methods())


def test_if_exact_equals_the_autograd_hessian_solution():
    torch.manual_seed(4)
    model = MLP(3, 3, hidden=(5,)).double()
    x, y = torch.randn(40, 3, dtype=torch.float64), torch.randint(0, 3, (40,))
    xt, yt = torch.randn(12, 3, dtype=torch.float64), torch.randint(0, 3, (12,))
    harm = ri.influence(model, (x, y), (xt, yt), objective=ri.Utility(), method="if-exact",
                        damping=0.1, batch_size=16, progress=False, hvp_chunk_size=7)

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def as_params(flat):
        pieces = torch.split(flat, [s.numel() for s in shapes])
        return {n: piece.reshape(s) for n, piece, s in zip(names, pieces, shapes)}

    def loss(flat, inputs, labels):
        return F.cross_entropy(torch.func.functional_call(model, as_params(flat), (inputs,)), labels)

    hessian = torch.autograd.functional.hessian(lambda t: loss(t, x, y), theta) + 0.1 * torch.eye(theta.numel(), dtype=torch.float64)
    train_grads = torch.stack([torch.autograd.functional.jacobian(lambda t: loss(t, x[i : i + 1], y[i : i + 1]), theta) for i in range(40)])
    target_grad = torch.autograd.functional.jacobian(lambda t: loss(t, xt, yt), theta)
    expected = -train_grads @ torch.linalg.solve(hessian, target_grad)
    assert float((harm - expected).norm() / expected.norm()) <= 1e-8


def test_if_exact_refuses_large_models_before_computing():
    model = SmallCNN()
    assert sum(p.numel() for p in model.parameters()) > MAX_PARAMS
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=rf"^params: method 'if-exact' .* at most {MAX_PARAMS} scored parameters"):
        ri.influence(model, (x, y), (x, y), objective=ri.Utility(), method="if-exact", damping=0.01, progress=False)
    last_layer = ["head.3.weight", "head.3.bias"]
    scores = ri.influence(model, (x, y), (x, y), objective=ri.Utility(), method="if-exact", damping=0.01,
                          params=last_layer, progress=False)
    assert scores.shape == (4,) and torch.isfinite(scores).all()


class WithUnusedParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 2)
        self.unused = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return self.linear(x)


def test_if_exact_with_a_singular_hessian_asks_for_damping():
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    with pytest.raises(ValueError, match=r"^damping: the damped Hessian is singular"):
        ri.influence(WithUnusedParameter(), (x, y), (x, y), objective=ri.Utility(), method="if-exact", progress=False)


# ---------------------------------------------------------------- leave-one-out on logistic regression


def make_data(generator: torch.Generator, n: int, flip: float):
    w = torch.tensor([2.0, -1.5, 1.0, 0.5], dtype=torch.float64)
    x = torch.randn(n, N_FEATURES, dtype=torch.float64, generator=generator)
    y = (torch.rand(n, dtype=torch.float64, generator=generator) < torch.sigmoid(x @ w)).long()
    flipped = torch.rand(n, generator=generator) < flip
    y[flipped] = 1 - y[flipped]
    return x, y


def training_objective(model, x, y):
    loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], y.double())
    return loss + DAMPING / 2 * sum((p**2).sum() for p in model.parameters())


def fit(model, x, y):
    """Minimise mean loss + DAMPING/2 ||theta||^2 to convergence (L-BFGS, float64), in place."""
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=200, tolerance_grad=1e-13,
                                  tolerance_change=1e-16, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = training_objective(model, x, y)
        loss.backward()
        return loss

    for _ in range(5):
        optimizer.step(closure)
    return model


def worst_case_l2(model, x, y):
    """Exact worst-case L2 perturbation of radius EPS for a one-logit linear model."""
    w = model.linear.weight[0]
    return x - EPS * (2 * y - 1).to(x.dtype)[:, None] * w / w.norm()


def utility(model, x, y):
    with torch.no_grad():
        return float(F.binary_cross_entropy_with_logits(model(x)[:, 0], y.double()))


def robust(model, x, y):
    return utility(model, worst_case_l2(model, x, y), y)


OBJECTIVES = {"utility": (ri.Utility(), utility), "robust": (ri.Robust(worst_case_l2), robust)}


@pytest.fixture(scope="module")
def logistic_regression():
    """A converged model, its data and all N_TRAIN leave-one-out refits (warm-started)."""
    generator = torch.Generator().manual_seed(0)
    x, y = make_data(generator, N_TRAIN, flip=0.15)
    target = make_data(generator, 200, flip=0.0)
    torch.manual_seed(0)
    model = fit(LogisticRegression(N_FEATURES, 1).double(), x, y)
    gradient = torch.autograd.grad(training_objective(model, x, y), list(model.parameters()))
    assert max(float(g.abs().max()) for g in gradient) < 1e-7, "the full fit did not converge"

    def refit_without(indices):
        keep = torch.ones(N_TRAIN, dtype=torch.bool)
        keep[indices] = False
        return fit(copy.deepcopy(model), x[keep], y[keep])

    leave_one_out = [refit_without([i]) for i in range(N_TRAIN)]
    return model, (x, y), target, refit_without, leave_one_out


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_if_exact_predicts_leave_one_out_refits(logistic_regression, name):
    model, train, target, _, leave_one_out = logistic_regression
    objective, value = OBJECTIVES[name]
    harm = ri.influence(model, train, target, objective=objective, method="if-exact", damping=DAMPING, progress=False)
    actual_decrease = np.array([value(model, *target) - value(refit, *target) for refit in leave_one_out])
    predicted_decrease = harm.numpy() / N_TRAIN
    pearson = np.corrcoef(predicted_decrease, actual_decrease)[0, 1]
    slope = np.polyfit(predicted_decrease, actual_decrease, 1)[0]
    print(f"{name}: Pearson(if-exact harm, LOO decrease) = {pearson:.4f}, slope = {slope:.3f}")
    assert pearson >= 0.95
    assert 0.9 <= slope <= 1.1  # harm / n is the first-order predicted decrease itself


@pytest.mark.parametrize("method", ["if-exact", "ip"])
@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_removing_the_most_harmful_five_percent_beats_random_removal(logistic_regression, name, method):
    model, train, target, refit_without, _ = logistic_regression
    objective, value = OBJECTIVES[name]
    harm = ri.influence(model, train, target, objective=objective, method=method, damping=DAMPING, progress=False)
    k = N_TRAIN // 20
    before = value(model, *target)
    top_decrease = before - value(refit_without(torch.topk(harm, k).indices), *target)
    rng = np.random.default_rng(0)
    random_decreases = [before - value(refit_without(torch.as_tensor(rng.choice(N_TRAIN, k, replace=False))), *target)
                        for _ in range(20)]
    print(f"{name}/{method}: top-5% decrease {top_decrease:.4f}, random max {max(random_decreases):.4f}")
    assert top_decrease > 0
    assert top_decrease > max(random_decreases)
