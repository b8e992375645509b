"""Trainers expose the attack they train against, and PGD's ascent is one function shared by the
attack and the trainers."""

import pytest
import torch
from torch import nn

import attacks
from attacks.plumbing import per_sample_loss as attack_loss
from attacks.pgd import pgd_ascent
from attacks.steps import random_delta
from defenses import ERM, PGDAT, TRADES, ARTTrainer, FastAT, per_sample_loss


def _batch(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    X, y = torch.rand(n, 1, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).eval()
    return model, X, y


def test_plain_and_trades_trainers_train_against_no_attack():
    assert ERM(epochs=1, progress=False).training_attack(0) is None
    assert TRADES(eps=0.1, epochs=1, progress=False).training_attack(3) is None
    assert ARTTrainer("trades", epochs=1, lr=0.1, batch_size=8).training_attack(0) is None
    assert ARTTrainer(lambda classifier: None, epochs=1, lr=0.1, batch_size=8).training_attack(0) is None


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgdat_training_attack_is_the_pgd_of_its_loss(norm):
    model, X, y = _batch()
    trainer = PGDAT(eps=0.1 if norm == "linf" else 0.5, norm=norm, steps=4, epochs=1, progress=False)
    attack = trainer.training_attack(seed=5)
    assert isinstance(attack, attacks.PGD)
    assert (attack.eps, attack.alpha, attack.steps, attack.norm, attack.bounds, attack.seed) == \
        (trainer.eps, trainer.alpha, trainer.steps, trainer.norm, trainer.bounds, 5)
    # The trainer's first batch after begin_fit(seed) draws the same random start as PGD(seed); the two
    # carry the iterate differently (point vs perturbation), so they agree up to rounding.
    trainer.begin_fit(model, (X, y), None, seed=5, steps_per_epoch=1)
    torch.testing.assert_close(trainer.adversarial_points(model, X, y), attack(model, X, y), atol=1e-5, rtol=0)


def test_pgdat_given_attack_and_fast_at_step():
    given = attacks.FGSM(0.1)
    assert PGDAT(eps=0.1, attack=given, epochs=1, progress=False).training_attack(0) is given
    fast = FastAT(eps=0.1, epochs=1, progress=False).training_attack(2)
    assert (fast.steps, fast.alpha, fast.seed) == (1, pytest.approx(0.125), 2)


def test_art_madry_pgd_trains_against_a_seeded_pgd():
    trainer = ARTTrainer("madry-pgd", epochs=1, lr=0.1, batch_size=8, eps=0.2, max_iter=3, bounds=(0.0, 1.0))
    attack = trainer.training_attack(seed=4)
    assert isinstance(attack, attacks.PGD)
    assert (attack.eps, attack.alpha, attack.steps, attack.norm, attack.bounds, attack.seed) == \
        (0.2, trainer.eps_step, 3, "linf", (0.0, 1.0), 4)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_attack_and_trainer_points_are_the_shared_ascent_bit_for_bit(norm):
    model, X, y = _batch(seed=1)
    eps = 0.1 if norm == "linf" else 0.5
    ball = dict(eps=eps, alpha=2.5 * eps / 3, steps=3, norm=norm, bounds=(0.0, 1.0))

    # the attack: PGD(seed) is the ascent on the point from random_delta drawn by a generator seeded so
    start = random_delta(X, eps, norm, torch.Generator().manual_seed(7))
    expected = pgd_ascent(lambda z: attack_loss(model(z), y), X, start=start, **ball)
    got = attacks.PGD(eps, alpha=ball["alpha"], steps=3, norm=norm, seed=7)(model, X, y)
    assert torch.equal(got, expected)

    # the trainer: the ascent on the perturbation, from the start its generator draws
    trainer = PGDAT(eps=eps, norm=norm, steps=3, epochs=1, progress=False)
    trainer.begin_fit(model, (X, y), None, seed=7, steps_per_epoch=1)
    start = random_delta(torch.empty(X.shape), eps, norm, torch.Generator().manual_seed(7))
    expected = pgd_ascent(lambda z: per_sample_loss(model(z), y), X, start=start, iterate="delta", **ball)
    assert torch.equal(trainer.adversarial_points(model, X, y), expected)
    assert ((expected - X).flatten(1).norm(dim=1, p=float("inf") if norm == "linf" else 2) <= eps + 1e-6).all()


def test_pgd_ascent_refuses_an_unknown_iterate():
    model, X, y = _batch()
    with pytest.raises(ValueError, match="^iterate: "):
        pgd_ascent(lambda z: attack_loss(model(z), y), X, eps=0.1, alpha=0.05, steps=1, norm="linf", bounds=None,
                   iterate="both")
