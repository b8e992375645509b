"""SPECTRE: QUE scores against their formula, the robust covariance filter and the detector on planted
poisons with a known answer, determinism, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import defenses

from defenses.poison_recipes import PoisonContext
from defenses.recipes import get_recipe
from defenses.spectre import que_scores, robust_covariance_subset, spectre_scores


def test_que_scores_match_the_formula_computed_directly():
    white = np.random.default_rng(0).normal(size=(20, 3)) * np.array([2.0, 1.0, 0.5])
    sigma = np.cov(white.T)
    values, vectors = np.linalg.eigh(sigma)
    m = vectors @ np.diag(np.exp(4.0 * (values - 1) / (values.max() - 1))) @ vectors.T
    m /= np.trace(m)
    scores, statistic = que_scores(white, alpha=4.0)
    assert np.allclose(scores, [x @ m @ x for x in white])
    assert statistic == pytest.approx(np.trace(sigma @ m))
    one, _ = que_scores(white[:, :1])
    assert np.allclose(one, white[:, 0] ** 2)


def test_robust_covariance_filter_removes_far_outliers_within_its_limit():
    rows = np.random.default_rng(1).normal(size=(300, 4))
    rows[:10, 0] += 40.0
    kept = robust_covariance_subset(rows, 10 / 300, limit=20)
    assert not kept[:10].any()
    assert (~kept).sum() <= 20


def planted(n_per_class=150, n_poison=12):
    """Three Gaussian classes of 6-D features (the inputs of a linear model, its penultimate features);
    ``n_poison`` samples labelled 0 form a tight cluster shifted by 6 along the first axis."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(3).repeat_interleave(n_per_class)
    X = torch.randn(len(y), 6, generator=g, dtype=torch.float64)
    poisons = torch.arange(n_poison)
    X[poisons] = 0.3 * X[poisons] + torch.tensor([6.0, 0, 0, 0, 0, 0], dtype=torch.float64)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 3)).double(), (X, y), poisons


def test_spectre_finds_the_target_class_and_ranks_the_poisons_first():
    model, (X, y), poisons = planted()
    scores = spectre_scores(model, (X, y), budget=18 / 450)
    assert int(y[scores.argmax()]) == 0
    assert set(torch.sort(-scores, stable=True).indices[:12].tolist()) == set(poisons.tolist())
    assert torch.equal(scores, spectre_scores(model, (X, y), budget=18 / 450))
    in_target = (y == 0)
    assert (scores[in_target] > 1).all() and (scores[~in_target] <= 1).all()


def test_the_spectre_recipe_removes_the_budget_from_the_suspected_class():
    model, (X, y), poisons = planted()
    ctx = PoisonContext(model=model, train=(X, y), val=(X[:5], y[:5]), evidence=None,
                        trainer=defenses.ERM(epochs=1, progress=False), budget=0.04, seed=0)
    recipe = get_recipe("spectre", "poisoning")
    assert recipe.threat == "unknown"
    outcome = recipe.fn(ctx)
    assert torch.equal(outcome.scores, spectre_scores(model, (X, y), budget=0.04))
    assert int(outcome.removed.sum()) == 18
    assert outcome.removed[poisons].all() and (y[outcome.removed] == 0).all()


@pytest.mark.parametrize("options, name", [
    (dict(budget=0.0), "budget"), (dict(budget=1.5), "budget"), (dict(alpha=-1.0), "alpha"),
    (dict(tau=0.0), "tau"), (dict(max_dims=0), "max_dims"),
])
def test_spectre_refuses_bad_input_naming_the_argument(options, name):
    model, train, _ = planted(n_per_class=20, n_poison=2)
    with pytest.raises((TypeError, ValueError), match=f"^{name}:"):
        spectre_scores(model, train, **{"budget": 0.05, **options})


def test_spectre_needs_a_linear_layer():
    _, train, _ = planted(n_per_class=20, n_poison=2)
    with pytest.raises(ValueError, match="^model:"):
        spectre_scores(nn.Flatten(), train, budget=0.05)


@pytest.mark.slow
def test_the_reference_recipes_run_in_the_pipeline_on_a_small_split():
    """abl, spectre and asset end to end on 100 training samples (about 11 s: marked slow)."""
    tiny = dict(seeds=1, n_train=100, n_val=60, n_test=40, epochs=1, progress=False)
    report = defenses.run_poisoning("digits", model="mlp", poison=dict(evidence=(5,), robust_n=10, patch_size=2,
                                                                       rate=0.05),
                                    recipes=["abl", "spectre", "asset"], **tiny)
    rows = {row["recipe"]: row for row in report["per_seed"]["runs"]}
    assert rows["abl"]["removed_share"] == pytest.approx(1 / 100)  # the published 1%, whatever the budget
    assert rows["spectre"]["removed_share"] == rows["asset"]["removed_share"] == pytest.approx(10 / 100)
