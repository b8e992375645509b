"""The influence recipes scored with models trained on random halves (``method_options={"ensemble": n}``), and the
poisoning recipe ``evidence-influence-trak``.

- The evasion recipe's scores are the mean of the single-model scores of the members that
  ``defenses.train_ensemble`` trains with the run's trainer (from scratch) and seed; an ensemble of one is that
  one half model's scores; the base model itself is not scored.
- In ``defenses.run`` the members' training is part of the recipe's measured time, and a bad ``ensemble`` is
  refused before any training, naming it.
- ``evidence-influence-trak`` removes the budget's largest TRAK harms on the evidence's loss, TRAK averaged over
  its half models (TRAK's own ensemble, ``robust_infl.Ensemble``).
"""

from __future__ import annotations

import time

import pytest
import torch

import attacks
import defenses
import robust_infl as ri
from conftest import gaussian_blobs
from defenses import ERM, train_ensemble
from defenses import poison_recipes
from defenses.poison_recipes import EVIDENCE_HALF_MODELS, PoisonContext
from defenses.recipes import DefenceContext, get_recipe, influence_scores
from defenses.selection import most_harmful
from robust_infl.models import MLP


def _context(**method_options) -> DefenceContext:
    trainer = ERM(epochs=3, lr=0.05, batch_size=16, retrain="finetune", progress=False)
    train = gaussian_blobs(48, 4, seed=0, shift=2.0)
    val = gaussian_blobs(24, 4, seed=1, shift=2.0)
    base = trainer.with_retrain("scratch").fit(MLP(4, 2, hidden=(6,)), train, seed=0)
    attack = attacks.PGD(0.3, steps=3, norm="l2", bounds=None, seed=0)
    return DefenceContext(model=base, train=train, val=val, trainer=trainer, attack=attack, seed=3, fraction=0.1,
                          method="ip", method_options=method_options, progress=False)


def _single(ctx: DefenceContext, model) -> torch.Tensor:
    return ri.influence(model, ctx.train[:2], ctx.val, objective=ri.Robust(ctx.attack), method="ip", seed=ctx.seed,
                        progress=False)


@pytest.mark.parametrize("members", [1, 3])
def test_the_ensemble_scores_are_the_mean_over_half_models_trained_from_scratch(members):
    ctx = _context(ensemble=members)
    scores = influence_scores(ctx)
    # the members as train_ensemble trains them with the run's trainer, from scratch, under the context's seed
    trained = train_ensemble(ctx.model, ctx.train[:2], ctx.trainer.with_retrain("scratch"), members, subset=0.5,
                             seed=ctx.seed)
    by_hand = torch.stack([_single(ctx, member) for member in trained.models]).mean(0)
    assert torch.allclose(scores, by_hand, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(scores, _single(ctx, ctx.model), rtol=1e-3)  # the base model is not scored
    assert torch.equal(influence_scores(_context()), _single(_context(), _context().model))  # no ensemble: the base


def test_trak_over_one_half_model_equals_trak_on_that_model():
    pytest.importorskip("trak")
    ctx = _context(ensemble=1, proj_dim=16)
    ctx.method = "trak"
    (member,) = train_ensemble(ctx.model, ctx.train[:2], ctx.trainer.with_retrain("scratch"), 1, seed=ctx.seed).models
    direct = ri.influence(member, ctx.train[:2], ctx.val, objective=ri.Robust(ctx.attack), method="trak",
                          proj_dim=16, seed=ctx.seed, progress=False)
    assert torch.allclose(influence_scores(ctx), direct, rtol=1e-4, atol=1e-7)


def test_the_members_training_is_counted_in_the_recipe_cost():
    fits = []

    class Timed(ERM):
        def fit(self, model, train, *, weights=None, seed=0, val=None):
            began = time.perf_counter()
            trained = super().fit(model, train, weights=weights, seed=seed, val=val)
            fits.append((len(train[1]), time.perf_counter() - began))
            return trained

    trainer = Timed(epochs=2, lr=0.05, batch_size=32, progress=False)
    report = defenses.run("moons", model="logreg", seeds=1, trainer=trainer, references=(), fractions=[0.1],
                          recipes=["none", "influence"], method_options={"ensemble": 4}, progress=False)
    halves = [seconds for n, seconds in fits if n == 200]  # moons: 400 training samples
    assert len(halves) == 4
    (row,) = [r for r in report["per_seed"]["runs"] if r["recipe"] == "influence"]
    assert row["train_time"] >= sum(halves)
    assert report["config"]["method_options"] == {"ensemble": "4"}


@pytest.mark.parametrize("value, error, message", [
    (0, ValueError, "^method_options: ensemble: must be >= 1, got 0$"),
    (2.0, TypeError, "^method_options: ensemble: must be an integer, got float$"),
    (True, TypeError, "^method_options: ensemble: must be an integer, got bool$"),
])
def test_a_bad_ensemble_is_refused_before_training(value, error, message):
    class Refusing(ERM):
        def fit(self, *args, **kwargs):
            raise AssertionError("trained before the options were checked")

    with pytest.raises(error, match=message):
        defenses.run("moons", model="logreg", seeds=1, trainer=Refusing(epochs=1, progress=False), references=(),
                     recipes=["none", "influence"], method_options={"ensemble": value}, progress=False)


@pytest.mark.parametrize("proj_dim, used", [(16, 16), (512, 40)])  # at most the 40 samples (the MLP has 44 weights)
def test_evidence_influence_trak_removes_the_largest_trak_harms_over_half_models(monkeypatch, proj_dim, used):
    pytest.importorskip("trak")
    monkeypatch.setattr(poison_recipes, "EVIDENCE_PROJ_DIM", proj_dim)
    trainer = ERM(epochs=2, lr=0.05, batch_size=16, progress=False)
    train = gaussian_blobs(40, 4, seed=0, shift=2.0)
    evidence = gaussian_blobs(6, 4, seed=2, shift=2.0)
    base = trainer.fit(MLP(4, 2, hidden=(6,)), train, seed=0)
    ctx = PoisonContext(model=base, train=train, val=gaussian_blobs(10, 4, seed=1), evidence=evidence,
                        trainer=trainer, budget=0.1, seed=5)
    outcome = get_recipe("evidence-influence-trak", "poisoning").fn(ctx)
    members = train_ensemble(base, train, trainer, EVIDENCE_HALF_MODELS, subset=0.5, seed=5)
    expected = ri.influence(members.ensemble, train, evidence, objective=ri.Utility(), method="trak", proj_dim=used,
                            seed=5, progress=False).double()
    assert torch.allclose(outcome.scores, expected, rtol=1e-4, atol=1e-9)
    assert torch.equal(outcome.removed, most_harmful(outcome.scores, 0.1)) and int(outcome.removed.sum()) == 4
