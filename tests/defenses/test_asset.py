"""ASSET: the medcouple against its definition, the adjusted outlyingness, determinism, the recipe, bad input.

(On a tiny planted set the authors' learning rates barely move the MLP and the offset model in the few
batches there are, so no detection quality is asserted here; it is measured on MNIST.)"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import defenses
from defenses.asset import adjusted_outlyingness, asset_scores, medcouple
from defenses.poison_recipes import PoisonContext
from defenses.recipes import get_recipe


def brute_force_medcouple(values):
    """median over pairs x_i >= med >= x_j of ((x_i - med) - (med - x_j)) / (x_i - x_j); 0 for the pair (med, med)."""
    med = float(np.median(values))
    kernels = []
    for xi, xj in itertools.product(values, values):
        if xi >= med >= xj:
            kernels.append(0.0 if xi == xj == med else ((xi - med) - (med - xj)) / (xi - xj))
    return float(np.median(kernels))


@pytest.mark.parametrize("seed, n", [(0, 7), (1, 10), (2, 31)])
def test_medcouple_matches_its_definition(seed, n):
    values = np.random.default_rng(seed).exponential(size=n)
    assert medcouple(torch.tensor(values)) == pytest.approx(brute_force_medcouple(values))
    assert medcouple(torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])) == pytest.approx(0.0)


def test_adjusted_outlyingness_flags_the_far_value_only():
    values = torch.tensor([0.40, 0.42, 0.45, 0.47, 0.50, 0.52, 0.55, 0.57, 0.60, 0.99])
    outlying = adjusted_outlyingness(values)
    assert outlying[-1] > 2 and (outlying[:-1] < 2).all()
    assert outlying[4] == pytest.approx(0.0, abs=0.2)


def planted(n=400, n_poison=12):
    """Three overlapping Gaussian classes in 5-D with a sixth, zero feature; ``n_poison`` samples of classes 1
    and 2 carry 6 in it and the label 0; a clean base set of 100 from the same distribution."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n + 100) % 3
    X = torch.cat([torch.randn(n + 100, 5, generator=g) + torch.eye(5)[y], torch.zeros(n + 100, 1)], dim=1)
    poisons = torch.nonzero(y[:n] != 0).flatten()[:n_poison]
    X[poisons, 5] = 6.0
    y = y.clone()
    y[poisons] = 0
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    model = defenses.ERM(epochs=10, lr=3e-2, batch_size=32, progress=False).fit(model, (X[:n], y[:n]), seed=0)
    return model, (X[:n], y[:n]), (X[n:], y[n:]), poisons


def test_asset_is_seeded_and_scores_every_sample_by_its_loss_under_the_offset_model():
    model, train, base, _ = planted(n=100, n_poison=4)
    scores = asset_scores(model, train, base, seed=0, batch_size=64, inner_steps=10)
    assert scores.shape == (100,) and torch.isfinite(scores).all() and (scores >= 0).all()
    assert torch.equal(scores, asset_scores(model, train, base, seed=0, batch_size=64, inner_steps=10))
    assert not torch.equal(scores, asset_scores(model, train, base, seed=1, batch_size=64, inner_steps=10))


def test_the_asset_recipe_scores_against_the_validation_split():
    model, train, base, _ = planted(n=100, n_poison=3)
    trainer = defenses.ERM(epochs=1, batch_size=64, progress=False)
    ctx = PoisonContext(model=model, train=train, val=base, evidence=None, trainer=trainer, budget=0.03, seed=1)
    recipe = get_recipe("asset", "poisoning")
    assert recipe.threat == "unknown"
    outcome = recipe.fn(ctx)
    assert torch.equal(outcome.scores, asset_scores(model, train, base, seed=1, batch_size=64))
    assert int(outcome.removed.sum()) == 3


@pytest.mark.parametrize("options, name", [
    (dict(seed=-1), "seed"), (dict(batch_size=0), "batch_size"), (dict(lr=0.0), "lr"),
    (dict(inner_steps=0), "inner_steps"),
])
def test_asset_refuses_bad_input_naming_the_argument(options, name):
    model = nn.Sequential(nn.Linear(6, 3))
    X = torch.zeros(8, 6)
    with pytest.raises((TypeError, ValueError), match=f"^{name}:"):
        asset_scores(model, (X, torch.zeros(8, dtype=torch.long)), (X, torch.zeros(8, dtype=torch.long)), **options)
