"""The ART adapter: one epoch of ART's Madry PGD and TRADES trainers on tiny data, weights, seeds."""

import pytest
import torch

from defenses import ARTTrainer
from robust_infl.models import MLP, LogisticRegression

from conftest import flat_params


def _data(n=60, d=4):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (n,), generator=g)
    X = (0.5 + 0.2 * (2 * y.float() - 1)).unsqueeze(1) + 0.1 * torch.randn(n, d, generator=g)
    return X.clamp(0, 1), y


@pytest.mark.parametrize("name", ["madry-pgd", "AdversarialTrainerTRADESPyTorch"])
def test_one_epoch_trains_a_copy_deterministically(name):
    model = MLP(4, 2, hidden=(8,))
    before = flat_params(model).clone()
    trainer = ARTTrainer(name, epochs=1, lr=0.05, batch_size=20, eps=0.1, max_iter=2, progress=False)
    a = trainer.fit(model, _data(), seed=1)
    b = trainer.fit(model, _data(), seed=1)
    assert torch.equal(flat_params(model), before)
    assert not torch.equal(flat_params(a), before)
    assert torch.equal(flat_params(a), flat_params(b))
    assert not a.training


def test_one_logit_model_and_l2_madry_and_finetune():
    model = LogisticRegression(4, 1)
    trainer = ARTTrainer("madry-pgd", epochs=1, lr=1e-6, batch_size=30, eps=0.2, norm="l2", max_iter=2,
                         bounds=None, retrain="finetune", progress=False)
    tuned = trainer.fit(model, _data(), seed=0)
    assert tuned(torch.zeros(1, 4)).shape == (1, 1)
    assert torch.allclose(flat_params(tuned), flat_params(model), atol=1e-4)


def test_zero_one_weights_train_on_the_kept_subset_and_other_weights_are_refused():
    X, y = _data()
    keep = torch.arange(60) % 4 != 0
    trainer = ARTTrainer("trades", epochs=1, lr=0.05, batch_size=15, eps=0.1, max_iter=2, progress=False)
    weighted = trainer.fit(MLP(4, 2, hidden=(8,)), (X, y), weights=keep.float(), seed=3)
    subset = trainer.fit(MLP(4, 2, hidden=(8,)), (X[keep], y[keep]), seed=3)
    assert torch.equal(flat_params(weighted), flat_params(subset))
    with pytest.raises(ValueError, match="^weights: ART's trainers take no per-sample weights"):
        trainer.fit(MLP(4, 2), (X, y), weights=torch.full((60,), 0.5))


def test_a_factory_reuses_an_existing_art_setup():
    from art.attacks.evasion import FastGradientMethod
    from art.defences.trainer import AdversarialTrainer

    built = []

    def factory(classifier):
        built.append(classifier)
        return AdversarialTrainer(classifier, FastGradientMethod(classifier, eps=0.1), ratio=0.5)

    trained = ARTTrainer(factory, epochs=1, lr=0.05, batch_size=20, progress=False).fit(MLP(4, 2), _data())
    assert len(built) == 1 and isinstance(trained, MLP)


def test_validation():
    with pytest.raises(ValueError, match="^name: must be one of"):
        ARTTrainer("fast-is-better", epochs=1, lr=0.1, batch_size=4)
    with pytest.raises(ValueError, match="^eps: must be a finite number > 0"):
        ARTTrainer("madry-pgd", epochs=1, lr=0.1, batch_size=4, eps=0)
