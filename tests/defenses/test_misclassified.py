"""The ``influence-misclassified`` recipe: which samples it removes, checked against a brute-force choice."""

import pytest
import torch

import attacks
import robust_infl as ri
from defenses import ERM, PGDAT, DefenceContext
from defenses.recipes import get_recipe, misclassified_training_samples
from robust_infl.models import MLP

from conftest import flat_params, gaussian_blobs


def _context(trainer, fraction, train_attack=None):
    # two Gaussian blobs with a share of flipped labels, so that the model misclassifies some samples
    train = gaussian_blobs(160, 4, seed=0, shift=3.0, flip=0.15)
    val = gaussian_blobs(60, 4, seed=1, shift=3.0, flip=0.15)
    base = trainer.fit(MLP(4, 2, hidden=(16,)), train, seed=0)
    attack = attacks.PGD(0.3, steps=5, norm="l2", bounds=None, seed=0)
    return DefenceContext(model=base, train=train, val=val, trainer=trainer, attack=attack, seed=0,
                          fraction=fraction, train_attack=train_attack, progress=False, cache={})


@pytest.mark.parametrize("fraction", [0.05, 0.5])
def test_removes_the_top_harm_among_misclassified_samples_up_to_the_budget(fraction):
    trainer = ERM(epochs=20, lr=0.05, batch_size=32, progress=False)
    ctx = _context(trainer, fraction)
    X, y = ctx.train
    wrong = ctx.model(X).argmax(1) != y
    assert 0 < int(wrong.sum()) < len(y) // 2
    harm = ri.influence(ctx.model, ctx.train, ctx.val, objective=ri.Robust(ctx.attack), seed=0, progress=False)
    k = min(int(round(fraction * len(y))), int(wrong.sum()))
    # brute force: the k misclassified samples with the largest harm
    candidates = [i for i in torch.argsort(harm, descending=True, stable=True).tolist() if wrong[i]]
    keep = torch.ones(len(y), dtype=torch.bool)
    keep[candidates[:k]] = False

    assert torch.equal(misclassified_training_samples(ctx), wrong)
    defended = get_recipe("influence-misclassified").fn(ctx)
    expected = trainer.fit(ctx.model, ctx.train, weights=keep.float(), seed=0)  # removal is weight 0
    torch.testing.assert_close(flat_params(defended), flat_params(expected), rtol=0, atol=0)
    if fraction == 0.5:
        assert k == int(wrong.sum())  # fewer misclassified samples than the budget: only they are removed


def test_adversarial_trainers_count_misclassification_at_the_adversarial_training_points():
    trainer = PGDAT(eps=0.5, norm="l2", steps=3, bounds=None, epochs=5, lr=0.05, batch_size=32, progress=False)
    train_attack = attacks.PGD(1.5, steps=5, norm="l2", bounds=None, seed=0)
    ctx = _context(trainer, 0.05, train_attack=train_attack)
    X, y = ctx.train
    clean_wrong = ctx.model(X).argmax(1) != y
    adversarial_wrong = ctx.model(train_attack(ctx.model, X, y)).argmax(1) != y
    assert int(adversarial_wrong.sum()) > int(clean_wrong.sum())
    assert torch.equal(misclassified_training_samples(ctx), adversarial_wrong)
