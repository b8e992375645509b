"""Properties of prune / reweight / relabel not covered in ``test_selection.py``: the selection
follows the samples when they are reordered, the hard weights are the prune mask, relabel touches only
the flagged samples."""

from __future__ import annotations

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from defenses import prune, relabel, reweight
from defenses.selection import budget_size, most_harmful

distinct_scores = st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=60, unique=True)
fractions = st.floats(0.0, 0.99)


@settings(max_examples=60, deadline=None)
@given(distinct_scores, fractions, st.randoms(use_true_random=False))
def test_the_selection_follows_the_samples_when_they_are_reordered(values, fraction, rng):
    assume(budget_size(len(values), fraction) < len(values))  # every sample flagged: refused
    scores = torch.tensor(values, dtype=torch.float64)
    perm = torch.tensor(rng.sample(range(len(values)), len(values)))
    assert torch.equal(prune(scores[perm], fraction), prune(scores, fraction)[perm])
    # the smooth weights' spread is a sum, whose rounding may depend on the order: equal up to float32 rounding
    torch.testing.assert_close(reweight(scores[perm], fraction=fraction), reweight(scores, fraction=fraction)[perm])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=60), fractions, st.floats(0.1, 5.0))
def test_hard_weights_are_the_prune_mask_and_the_budget(values, fraction, w_max):
    assume(budget_size(len(values), fraction) < len(values))  # every sample flagged: refused
    scores = torch.tensor(values, dtype=torch.float64)
    keep = prune(scores, fraction)
    assert int(keep.sum()) == len(values) - budget_size(len(values), fraction)
    weights = reweight(scores, "hard", fraction=fraction, w_max=w_max)
    assert torch.equal(weights, keep.to(torch.float32) * w_max)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=40), fractions,
       st.integers(2, 5), st.integers(0, 1000))
def test_relabel_changes_only_the_flagged_samples_to_the_prediction(values, fraction, n_classes, seed):
    g = torch.Generator().manual_seed(seed)
    n = len(values)
    labels, predictions = torch.randint(0, n_classes, (n,), generator=g), torch.randn(n, n_classes, generator=g)
    new_labels, flagged = relabel(torch.tensor(values), labels, predictions, fraction)
    assert torch.equal(flagged, most_harmful(torch.tensor(values), fraction))  # prune refuses flagging all
    assert torch.equal(new_labels[~flagged], labels[~flagged])
    assert torch.equal(new_labels[flagged], predictions.argmax(dim=1)[flagged])
