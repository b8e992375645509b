"""ScoringOptions: the scoring keywords as one frozen value, checked when built and passed down unchanged."""

import dataclasses
import inspect

import pytest
import torch

import robust_infl as ri
from robust_infl import ScoringOptions
from robust_infl.distributed import sharded_influence
from robust_infl.models import MLP


@pytest.mark.parametrize("options, error, message", [
    (dict(loss_fn=3), TypeError, "^loss_fn: must be callable"),
    (dict(damping=-1.0), ValueError, "^damping: must be a finite number >= 0"),
    (dict(damping="big"), TypeError, "^damping: must be a number"),
    (dict(batch_size=0), ValueError, "^batch_size: must be >= 1"),
    (dict(batch_size=2.5), TypeError, "^batch_size: must be an integer"),
    (dict(seed=-1), ValueError, r"^seed: must be in \[0, 4294967295\]"),
    (dict(train_loss="robust"), ValueError, "^train_loss: must be one of"),
    (dict(train_loss="adversarial"), ValueError, "^train_attack: train_loss='adversarial' needs"),
    (dict(train_attack=lambda m, x, y: x), ValueError, "^train_attack: only used with"),
    (dict(device="nowhere"), ValueError, "^device: must be a valid torch device"),
    (dict(progress=1), TypeError, "^progress: must be True or False"),
    (dict(params="fc.weight"), TypeError, "^params: expected a list of parameter names"),
    (dict(aggregate="no"), TypeError, "^aggregate: must be True or False"),
])
def test_bad_values_are_refused_at_construction_with_the_argument_named(options, error, message):
    with pytest.raises(error, match=message):
        ScoringOptions(**options)


def test_options_are_frozen_normalised_and_default_as_influence():
    options = ScoringOptions(damping=1, params=["a", "b"])
    assert (options.damping, type(options.damping), options.params) == (1.0, float, ("a", "b"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.seed = 3
    assert ScoringOptions() == ScoringOptions(loss_fn=None, damping=0.0, batch_size=256, params=None, seed=0,
                                              train_loss="clean", train_attack=None, device=None, progress=True,
                                              aggregate=True)


@pytest.fixture
def seen_options(monkeypatch) -> list:
    """Every method call records its problem's ``ScoringOptions`` here (and scores zeros) instead of scoring."""
    seen = []

    def record(problem):
        seen.append(problem.options)
        return torch.zeros(problem.n_train)

    monkeypatch.setattr(ri.api, "get_method", lambda name: record)
    return seen


def test_influence_passes_its_keywords_down_as_one_scoring_options(seen_options):
    seen = seen_options
    torch.manual_seed(0)
    X, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    model = MLP(4, 3, hidden=(5,))
    ri.influence(model, (X, y), (X[:4], y[:4]), objective=ri.Utility(), damping=0.5, batch_size=5, seed=7, progress=False)
    (options,) = seen
    assert options == ScoringOptions(damping=0.5, batch_size=5, seed=7, progress=False)
    with pytest.raises(ValueError, match="^batch_size: must be >= 1"):
        ri.influence(model, (X, y), (X[:4], y[:4]), objective=ri.Utility(), batch_size=0)


def _setting():
    torch.manual_seed(4)
    X, y = torch.randn(24, 5, dtype=torch.float64), torch.randint(0, 3, (24,))
    return MLP(5, 3, hidden=(6,)).double().eval(), (X, y), (X[:6] + 0.1, y[:6])


@pytest.mark.parametrize("aggregate", [True, False])
def test_both_entry_points_take_the_options_as_one_value_or_as_keywords_with_the_same_scores(aggregate):
    model, train, target = _setting()
    keywords = dict(batch_size=4, seed=3, progress=False, aggregate=aggregate)
    options = ScoringOptions(**keywords)
    for score in (ri.influence, sharded_influence):
        by_keywords = score(model, train, target, objective=ri.Utility(), **keywords)
        assert by_keywords.shape == ((24,) if aggregate else (24, 6))
        assert torch.equal(score(model, train, target, objective=ri.Utility(), options=options), by_keywords)
    sharded = sharded_influence(model, train, target, objective=ri.Utility(), options=options)
    # the same scores; the matrix by another route (layer-factored per-sample gradients), so up to rounding
    torch.testing.assert_close(sharded, ri.influence(model, train, target, objective=ri.Utility(), options=options),
                               rtol=1e-10, atol=1e-12)


def test_a_keyword_wins_over_the_same_field_of_options(seen_options):
    seen = seen_options
    model, train, target = _setting()
    ri.influence(model, train, target, objective=ri.Utility(), options=ScoringOptions(seed=5, batch_size=3),
                 batch_size=8, progress=False)
    assert seen == [ScoringOptions(seed=5, batch_size=8, progress=False)]


def test_the_options_are_defined_once_not_in_either_signature():
    fields = {f.name for f in dataclasses.fields(ScoringOptions)}
    for score in (ri.influence, sharded_influence):
        parameters = inspect.signature(score).parameters
        assert "options" in parameters and not fields & set(parameters)


@pytest.mark.parametrize("call, error, message", [
    (lambda m, tr, ta: ri.influence(m, tr, ta, objective=ri.Utility(), options={"seed": 1}), TypeError,
     "^options: expected a robust_infl.ScoringOptions, got dict"),
    (lambda m, tr, ta: sharded_influence(m, tr, ta, objective=ri.Utility(), options=3), TypeError, "^options:"),
    (lambda m, tr, ta: ri.influence(m, tr, ta, objective=ri.Utility(), method="self", aggregate=False), ValueError,
     "^aggregate: method 'self' gives one score per training sample"),
    (lambda m, tr, ta: sharded_influence(m, tr, ta, objective=ri.Utility(), members=3), TypeError,
     "^members: not an argument of sharded_influence"),
    (lambda m, tr, ta: ri.influence(m, tr, ta, objective=ri.Utility(), members=3), TypeError,
     "^method_options: method 'ip' does not accept"),
])
def test_bad_options_are_refused_before_any_compute(call, error, message):
    model, train, target = _setting()
    with pytest.raises(error, match=message):
        call(model, train, target)
