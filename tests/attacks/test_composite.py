"""Composite attacks: the cascade keeps the worst case per point; the unit-box view is an exact change of variables."""

import pytest
import torch

from attacks import PGD, Cascade, TorchAttacks, UnitBoxView, accuracy, predict
from robust_infl.models import MLP


@pytest.fixture(scope="module")
def tabular_mlp():
    """An MLP trained on standardised (unbounded) two-class data; 200 held-out points."""
    g = torch.Generator().manual_seed(0)
    X = 1.5 * torch.randn(600, 6, generator=g)
    y = (X[:, 0] + 0.5 * X[:, 1] - 0.3 * X[:, 2] > 0).long()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = MLP(6, 2, hidden=(32,))
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(60):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(X[:400]), y[:400]).backward()
            optimizer.step()
    model.eval()
    assert accuracy(model, X[400:], y[400:]) > 0.9
    assert X.min() < -1 and X.max() > 2  # far outside [0, 1]
    return model, X[400:], y[400:]


def unchanged(model, x, y):
    """An 'attack' that fools nothing: returns the clean points."""
    return x.clone()


@pytest.mark.parametrize("norm, eps", [("linf", 0.3), ("l2", 1.0)])
def test_unit_box_view_equals_the_attack_run_on_the_data_itself(tabular_mlp, norm, eps):
    model, X, y = tabular_mlp
    direct = PGD(eps, steps=10, norm=norm, random_start=False, bounds=None)(model, X, y)
    viewed = UnitBoxView(lambda e: PGD(e, steps=10, norm=norm, random_start=False, bounds=(0.0, 1.0)), eps)(model, X, y)
    torch.testing.assert_close(viewed, direct, rtol=0, atol=1e-4)
    assert accuracy(model, viewed, y) < accuracy(model, X, y) - 0.05


def test_unit_box_view_runs_torchattacks_on_unbounded_data_within_the_budget(tabular_mlp):
    model, X, y = tabular_mlp
    eps = 1.0
    attack = UnitBoxView(lambda e: TorchAttacks("APGD", seed=0, eps=e, norm="L2", steps=20, loss="ce"), eps)
    x_adv = attack(model, X, y)
    assert float((x_adv - X).norm(dim=1).max()) <= eps * (1 + 1e-4)
    pgd = PGD(eps, steps=20, norm="l2", bounds=None, seed=0)(model, X, y)
    assert accuracy(model, x_adv, y) <= accuracy(model, pgd, y) + 0.03  # APGD is at least about as strong


def test_cascade_attacks_only_the_points_still_correct_and_keeps_the_first_success(tabular_mlp):
    model, X, y = tabular_mlp
    weak = PGD(0.05, steps=5, norm="linf", random_start=False, bounds=None)
    strong = PGD(0.5, steps=10, norm="linf", random_start=False, bounds=None)
    x_adv = Cascade(weak, strong)(model, X, y)
    clean_wrong = predict(model(X)) != y
    torch.testing.assert_close(x_adv[clean_wrong], X[clean_wrong], rtol=0, atol=0)
    x_weak = weak(model, X, y)
    fooled_by_weak = (predict(model(x_weak)) != y) & ~clean_wrong
    torch.testing.assert_close(x_adv[fooled_by_weak], x_weak[fooled_by_weak], rtol=0, atol=0)
    robust = accuracy(model, x_adv, y)
    assert robust <= min(accuracy(model, x_weak, y), accuracy(model, strong(model, X, y), y))
    assert torch.equal(Cascade(unchanged)(model, X, y), X)


def test_composites_validate_their_arguments():
    with pytest.raises(ValueError, match="members"):
        Cascade()
    with pytest.raises(TypeError, match="members: member 1"):
        Cascade(unchanged, "pgd")
    with pytest.raises(TypeError, match="build"):
        UnitBoxView("pgd", 0.1)
    with pytest.raises(ValueError, match="eps"):
        UnitBoxView(lambda e: unchanged, -1.0)
