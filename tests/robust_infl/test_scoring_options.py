"""ScoringOptions: the scoring keywords as one frozen value, checked when built and passed down unchanged."""

import dataclasses

import pytest
import torch

import robust_infl as ri
from robust_infl import ScoringOptions
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
                                              train_loss="clean", train_attack=None, device=None, progress=True)


def test_influence_passes_its_keywords_down_as_one_scoring_options(monkeypatch):
    seen = []

    def record(problem):
        seen.append(problem.options)
        return torch.zeros(problem.n_train)

    monkeypatch.setattr(ri.api, "get_method", lambda name: record)
    torch.manual_seed(0)
    X, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    model = MLP(4, 3, hidden=(5,))
    ri.influence(model, (X, y), (X[:4], y[:4]), objective=ri.Utility(), damping=0.5, batch_size=5, seed=7, progress=False)
    (options,) = seen
    assert options == ScoringOptions(damping=0.5, batch_size=5, seed=7, progress=False)
    with pytest.raises(ValueError, match="^batch_size: must be >= 1"):
        ri.influence(model, (X, y), (X[:4], y[:4]), objective=ri.Utility(), batch_size=0)
