"""Iterative inverse-HVP influence ("if-cg", "if-lissa") against the explicit Hessian ("if-exact")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import TensorDataset

import robust_infl as ri
from robust_infl.models import LogisticRegression

from conftest import pearson

N_TRAIN, DAMPING = 120, 0.01
OBJECTIVES = {"utility": ri.Utility(), "demographic-parity": ri.DemographicParity()}


@pytest.fixture(scope="module")
def small_model():
    """A smooth 3-8-2 MLP at a minimum of mean CE + DAMPING/2 ||theta||^2 (float64), its data and a
    target set with a group attribute."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N_TRAIN + 60, 3, generator=generator, dtype=torch.float64)
    y = (x[:, 0] + x[:, 1] ** 2 > 0.5).long()
    noisy = torch.rand(N_TRAIN + 60, generator=generator) < 0.1
    y[noisy] = 1 - y[noisy]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=1000, tolerance_grad=1e-11,
                                  tolerance_change=1e-15, line_search_fn="strong_wolfe")
    train = (x[:N_TRAIN], y[:N_TRAIN])

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(train[0]), train[1]) + DAMPING / 2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(3):
        optimizer.step(closure)
    xt, yt = x[N_TRAIN:], y[N_TRAIN:]
    return model.eval(), train, (xt, yt, (xt[:, 2] > 0).long())


def score(small_model, method, objective="utility", train=None, **options):
    model, own_train, target = small_model
    options = {"damping": DAMPING, "batch_size": 50, "progress": False, **options}
    return ri.influence(model, own_train if train is None else train, target, objective=OBJECTIVES[objective],
                        method=method, **options)


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_if_cg_matches_if_exact(small_model, objective):
    exact = score(small_model, "if-exact", objective)
    cg = score(small_model, "if-cg", objective, tol=1e-10)
    print(f"{objective}: Pearson(if-cg, if-exact) = {pearson(cg, exact):.10f}")
    assert pearson(cg, exact) >= 0.999
    torch.testing.assert_close(cg, exact, rtol=1e-6, atol=1e-6 * float(exact.abs().max()))


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_if_lissa_converged_matches_if_exact(small_model, objective):
    exact = score(small_model, "if-exact", objective)
    full_batch = score(small_model, "if-lissa", objective, depth=150, scale=1.0, batch_size=N_TRAIN)
    print(f"{objective}: Pearson(full-batch LiSSA, if-exact) = {pearson(full_batch, exact):.6f}")
    assert pearson(full_batch, exact) >= 0.99


def test_if_lissa_with_sampled_minibatches_matches_if_exact(small_model):
    exact = score(small_model, "if-exact")
    stochastic = score(small_model, "if-lissa", depth=150, scale=1.0, hvp_batch_size=40, repeats=8)
    print(f"Pearson(minibatch LiSSA, if-exact) = {pearson(stochastic, exact):.6f}")
    assert pearson(stochastic, exact) >= 0.99


def test_lissa_error_shrinks_with_depth_and_auto_scale_converges(small_model):
    exact = score(small_model, "if-exact")
    depths = (1, 10, 50, 200)
    errors = [float((score(small_model, "if-lissa", depth=d, scale=1.0, batch_size=N_TRAIN) - exact).norm()
                    / exact.norm()) for d in depths]
    print(f"relative error of full-batch LiSSA at depths {depths}:", [f"{e:.3g}" for e in errors])
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01 and errors[0] > 0.5
    auto = score(small_model, "if-lissa", depth=400, batch_size=N_TRAIN)  # scale from power iteration
    assert pearson(auto, exact) >= 0.99


def test_lissa_sampling_is_seeded_and_reads_datasets_like_tensors(small_model):
    model, (x, y), _ = small_model
    options = dict(depth=50, scale=1.0, hvp_batch_size=16, repeats=2)
    first = score(small_model, "if-lissa", seed=4, **options)
    assert torch.equal(first, score(small_model, "if-lissa", seed=4, **options))
    assert not torch.allclose(first, score(small_model, "if-lissa", seed=5, **options))
    from_dataset = score(small_model, "if-lissa", seed=4, train=TensorDataset(x, y), **options)
    torch.testing.assert_close(from_dataset, first)


def test_lissa_with_too_small_scale_reports_divergence(small_model):
    with pytest.raises(ValueError, match=r"^scale: the LiSSA recursion diverged"):
        score(small_model, "if-lissa", depth=500, scale=0.01, batch_size=N_TRAIN)


def brute_force_per_target(model, train, target):
    """``-grad l_i^T (H + DAMPING I)^{-1} grad l_j`` from the explicit Hessian of the mean training loss
    (``torch.autograd.functional.hessian`` over the flattened parameters), ``(n_train, n_target)``."""
    names = [name for name, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def losses(flat, x, y):
        params, offset = {}, 0
        for name, shape in zip(names, shapes):
            params[name] = flat[offset:offset + shape.numel()].reshape(shape)
            offset += shape.numel()
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y, reduction="none")

    hessian = torch.autograd.functional.hessian(lambda t: losses(t, *train).mean(), theta)
    jacobian = torch.autograd.functional.jacobian
    train_grads, target_grads = jacobian(lambda t: losses(t, *train), theta), jacobian(lambda t: losses(t, *target), theta)
    solved = torch.linalg.solve(hessian + DAMPING * torch.eye(len(theta), dtype=theta.dtype), target_grads.T)
    return -train_grads @ solved


@pytest.mark.parametrize("method, options", [("if-exact", {}), ("if-cg", {"tol": 1e-10}),
                                             ("if-lissa", {"depth": 300, "scale": 1.0, "batch_size": N_TRAIN})])
def test_per_target_matrices_match_the_explicit_hessian(small_model, method, options):
    model, train, (xt, yt, _) = small_model
    expected = brute_force_per_target(model, train, (xt, yt))
    matrix = score(small_model, method, aggregate=False, **options)
    assert matrix.shape == (N_TRAIN, len(yt))
    if method == "if-lissa":  # converges geometrically, not to round-off
        error = float((matrix - expected).norm() / expected.norm())
        print(f"relative error of the per-target full-batch LiSSA matrix: {error:.3g}")
        assert error < 1e-2
    else:
        torch.testing.assert_close(matrix, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    # utility is the mean of the targets' own losses: the aggregate scores are the row means
    torch.testing.assert_close(matrix.mean(dim=1), score(small_model, method, **options), rtol=1e-6,
                               atol=1e-6 * float(expected.abs().max()))


def test_per_target_lissa_column_equals_lissa_on_that_target_alone(small_model):
    model, train, (xt, yt, _) = small_model
    options = dict(depth=60, scale=1.0, hvp_batch_size=16, repeats=3, seed=2, damping=DAMPING, batch_size=50,
                   progress=False)
    matrix = ri.influence(model, train, (xt[:4], yt[:4]), objective=ri.Utility(), method="if-lissa",
                          aggregate=False, **options)
    for j in range(4):
        alone = ri.influence(model, train, (xt[j:j + 1], yt[j:j + 1]), objective=ri.Utility(), method="if-lissa",
                             **options)
        torch.testing.assert_close(matrix[:, j], alone)


def negated_bce(outputs, targets):
    """A concave loss: its Hessian is negative definite for a linear model."""
    return -F.binary_cross_entropy_with_logits(outputs[:, 0], targets.to(outputs.dtype), reduction="none")


def test_cg_refuses_an_indefinite_hessian_and_warns_when_not_converged(small_model):
    torch.manual_seed(0)
    model = LogisticRegression(3, 1).double()
    x, y = torch.randn(30, 3, dtype=torch.float64), torch.randint(0, 2, (30,))
    with pytest.raises(ValueError, match=r"^damping: the damped Hessian is not positive definite"):
        ri.influence(model, (x, y), (x, y), objective=ri.Utility(), method="if-cg", loss_fn=negated_bce,
                     damping=0.001, progress=False)
    with pytest.warns(RuntimeWarning, match=r"^max_iter: conjugate gradient stopped after 1 iterations"):
        score(small_model, "if-cg", max_iter=1)


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("if-cg", {"tol": 0.0}, r"^tol: must be a finite number > 0"),
        ("if-cg", {"max_iter": 0}, r"^max_iter: must be >= 1"),
        ("if-lissa", {"depth": 2.5}, r"^depth: must be an integer"),
        ("if-lissa", {"scale": -1.0}, r"^scale: must be a finite number > 0"),
        ("if-lissa", {"repeats": 0}, r"^repeats: must be >= 1"),
        ("if-lissa", {"hvp_batch_size": 0}, r"^hvp_batch_size: must be >= 1"),
    ],
)
def test_bad_options_are_rejected_by_name(small_model, method, options, message):
    with pytest.raises((ValueError, TypeError), match=message):
        score(small_model, method, **options)
