"""Anti-Backdoor Learning: the LGA loss against its formula, isolation of planted easy poisons, unlearning,
seeds, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import defenses
from conftest import flat_params
from defenses.abl import anti_backdoor_learning, lga_loss
from defenses.poison_detection import training_losses
from defenses.poison_recipes import PoisonContext
from defenses.recipes import get_recipe


@pytest.mark.parametrize("values, sign", [([0.1, 0.2, 0.3], -1.0), ([0.4, 0.9, 1.4], 1.0)])
def test_lga_loss_is_the_signed_mean_and_ascends_below_gamma(values, sign):
    losses = torch.tensor(values, dtype=torch.float64, requires_grad=True)
    out = lga_loss(losses, gamma=0.5)
    assert out.item() == pytest.approx(sign * sum(values) / len(values))
    out.backward()
    assert torch.allclose(losses.grad, torch.full((3,), sign / 3, dtype=torch.float64))


def planted_backdoor(n=300, n_poison=12):
    """Three overlapping Gaussian classes (``N(e_y, I)`` in 5-D: no clean sample is fitted with certainty)
    with a sixth, constant-zero feature; ``n_poison`` samples of classes 1 and 2 carry a value of 6 in it
    (the trigger) and the label 0."""
    g = torch.Generator().manual_seed(1)
    y = torch.arange(n) % 3
    X = torch.cat([torch.randn(n, 5, generator=g) + torch.eye(5)[y], torch.zeros(n, 1)], dim=1)
    candidates = torch.nonzero(y != 0).flatten()[:n_poison]
    X[candidates, 5] = 6.0
    y = y.clone()
    y[candidates] = 0
    return X, y, candidates


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def test_abl_isolates_the_planted_poisons_and_unlearns_them():
    X, y, poisons = planted_backdoor()
    trainer = defenses.ERM(epochs=10, lr=3e-2, batch_size=32, progress=False)
    options = dict(trainer=trainer, seed=0, isolation_ratio=0.04, isolation_epochs=4)
    model, isolated, scores = anti_backdoor_learning(mlp(), (X, y), **options)
    assert int(isolated.sum()) == 12
    assert set(torch.nonzero(isolated).flatten().tolist()) == set(poisons.tolist())
    assert torch.equal(isolated, scores >= scores[isolated].min())
    # the published unlearning rate (5e-4) barely moves a loss this close to 0; a larger one shows the ascent
    unlearned, _, _ = anti_backdoor_learning(mlp(), (X, y), **options, unlearning_lr=0.1)
    kept, _, _ = anti_backdoor_learning(mlp(), (X, y), **options, unlearning_epochs=0)
    poisoned = (X[poisons], y[poisons])
    assert training_losses(model, poisoned).mean() >= training_losses(kept, poisoned).mean()
    assert training_losses(unlearned, poisoned).mean() > training_losses(kept, poisoned).mean() + 1.0
    triggered = X[y != 0].clone()
    triggered[:, 5] = 6.0
    with torch.no_grad():
        assert (kept(triggered).argmax(1) == 0).all() and not (unlearned(triggered).argmax(1) == 0).any()


def test_abl_is_seeded():
    X, y, _ = planted_backdoor()
    trainer = defenses.ERM(epochs=5, lr=1e-2, batch_size=32, progress=False)
    first = anti_backdoor_learning(mlp(), (X, y), trainer=trainer, seed=3, isolation_ratio=0.04)
    second = anti_backdoor_learning(mlp(), (X, y), trainer=trainer, seed=3, isolation_ratio=0.04)
    other = anti_backdoor_learning(mlp(), (X, y), trainer=trainer, seed=4, isolation_ratio=0.04)
    assert torch.equal(flat_params(first[0]), flat_params(second[0]))
    assert torch.equal(first[1], second[1]) and torch.equal(first[2], second[2])
    assert not torch.equal(flat_params(first[0]), flat_params(other[0]))


@pytest.mark.parametrize("options, name", [
    (dict(trainer=object()), "trainer"),
    (dict(isolation_ratio=0.0), "isolation_ratio"),
    (dict(isolation_ratio=1.5), "isolation_ratio"),
    (dict(isolation_ratio=0.999), "isolation_ratio"),
    (dict(gamma=-1.0), "gamma"),
    (dict(isolation_epochs=0), "isolation_epochs"),
    (dict(continued_epochs=0), "continued_epochs"),
    (dict(unlearning_epochs=-1), "unlearning_epochs"),
    (dict(unlearning_lr=0.0), "unlearning_lr"),
    (dict(seed=-1), "seed"),
])
def test_abl_refuses_bad_input_naming_the_argument(options, name):
    X, y, _ = planted_backdoor()
    options = {"trainer": defenses.ERM(epochs=1, progress=False), **options}
    with pytest.raises((TypeError, ValueError), match=f"^{name}:"):
        anti_backdoor_learning(mlp(), (X, y), **options)


def test_the_abl_recipe_is_the_public_call_with_the_published_ratio():
    X, y, _ = planted_backdoor(n=600)
    trainer = defenses.ERM(epochs=5, lr=3e-2, batch_size=32, progress=False)
    recipe = get_recipe("abl", "poisoning")
    assert recipe.threat == "unknown"
    ctx = PoisonContext(model=mlp(), train=(X, y), val=(X[:10], y[:10]), evidence=None, trainer=trainer, budget=0.1,
                        seed=2)
    outcome = recipe.fn(ctx)
    model, isolated, scores = defenses.anti_backdoor_learning(mlp(), (X, y), trainer=trainer, seed=2)
    assert int(outcome.removed.sum()) == 6  # 1% of 600, whatever the budget
    assert torch.equal(outcome.removed, isolated) and torch.equal(outcome.scores, scores)
    assert torch.equal(flat_params(outcome.model), flat_params(model))


def test_under_adversarial_training_the_isolation_is_plain_and_the_continued_training_adversarial():
    X, y, _ = planted_backdoor()
    options = dict(epochs=5, lr=3e-2, batch_size=32, progress=False)
    plain = anti_backdoor_learning(mlp(), (X, y), trainer=defenses.ERM(**options), seed=0, isolation_ratio=0.04)
    adversarial = anti_backdoor_learning(mlp(), (X, y), trainer=defenses.PGDAT(eps=0.3, steps=2, **options), seed=0,
                                         isolation_ratio=0.04)
    assert torch.equal(plain[1], adversarial[1]) and torch.equal(plain[2], adversarial[2])
    assert not torch.equal(flat_params(plain[0]), flat_params(adversarial[0]))
