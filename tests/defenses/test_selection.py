"""prune / reweight / relabel: invariants (property-based) and known answers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import assume
from hypothesis import strategies as st

from defenses import prune, relabel, reweight
from defenses.selection import budget_size
from robust_infl.datasets import flip_labels

scores_strategy = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=200)
fractions = st.floats(0.0, 0.99)


@settings(max_examples=150, deadline=None)
@given(scores_strategy, fractions)
def test_prune_drops_exactly_the_budget_with_the_largest_harm(values, fraction):
    scores = torch.tensor(values, dtype=torch.float64)
    if budget_size(len(values), fraction) == len(values):  # would drop every sample: refused
        with pytest.raises(ValueError, match="^fraction: .* selects all"):
            prune(scores, fraction)
        return
    keep = prune(scores, fraction)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert int((~keep).sum()) == budget_size(len(values), fraction)
    if keep.any() and (~keep).any():
        assert scores[~keep].min() >= scores[keep].max()


@settings(max_examples=150, deadline=None)
@given(scores_strategy, fractions, st.floats(0.01, 100.0), st.floats(0.1, 10.0))
def test_smooth_weights_are_bounded_and_non_increasing_in_harm(values, fraction, temperature, w_max):
    scores = torch.tensor(values, dtype=torch.float64)
    assume(budget_size(len(values), fraction) < len(values))  # every sample flagged: refused
    w = reweight(scores, "smooth", fraction=fraction, temperature=temperature, w_max=w_max)
    assert w.dtype == torch.float32 and w.shape == scores.shape
    assert (w >= 0).all() and (w <= w_max).all()
    order = torch.argsort(scores)
    assert (w[order][1:] <= w[order][:-1] + 1e-6).all()
    flagged = ~prune(scores, fraction)
    if flagged.any() and (~flagged).any() and scores[flagged].min() > scores[~flagged].max():
        assert (w[flagged] <= w_max / 2).all() and (w[~flagged] >= w_max / 2).all()


def test_a_budget_of_no_sample_leaves_every_weight_alone_like_prune():
    scores = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert prune(scores, 0.0).all()
    for scheme in ("smooth", "hard"):
        for fraction in (0.0, 0.005):  # 0.005 of 50 rounds to no sample
            assert torch.equal(reweight(scores, scheme, fraction=fraction, w_max=2.0), torch.full((50,), 2.0))


def test_hard_weights_are_the_prune_mask():
    scores = torch.randn(50, generator=torch.Generator().manual_seed(0))
    w = reweight(scores, "hard", fraction=0.2, w_max=3.0)
    assert torch.equal(w, prune(scores, 0.2).float() * 3.0)


def test_smooth_tends_to_hard_at_low_and_uniform_at_high_temperature():
    scores = torch.randn(100, generator=torch.Generator().manual_seed(1))
    cold = reweight(scores, "smooth", fraction=0.1, temperature=1e-4)
    assert torch.allclose(cold, reweight(scores, "hard", fraction=0.1), atol=1e-3)
    hot = reweight(scores, "smooth", fraction=0.1, temperature=1e4)
    assert torch.allclose(hot, torch.full_like(hot, 0.5), atol=1e-3)


def test_ties_are_broken_by_index_and_results_are_deterministic():
    scores = torch.zeros(10)
    assert torch.equal(prune(scores, 0.3), torch.tensor([False] * 3 + [True] * 7))


def test_budget_rounds_half_up():
    assert budget_size(10, 0.05) == 1 and budget_size(10, 0.04) == 0 and budget_size(3500, 0.05) == 175


def test_relabel_restores_flipped_labels_when_they_are_flagged():
    y = torch.arange(40) % 4
    noisy, flipped = flip_labels(y, 0.25, 4, seed=0)
    scores = flipped.double() + 0.01 * torch.rand(40, generator=torch.Generator().manual_seed(0))
    logits = torch.nn.functional.one_hot(y, 4).float() * 5.0
    repaired, flagged = relabel(scores, noisy, logits, 0.25)
    assert torch.equal(flagged, flipped)
    assert torch.equal(repaired, y)
    one_logit = (2 * (y % 2).float() - 1).unsqueeze(1)
    repaired_binary, _ = relabel(scores, noisy % 2, one_logit, 0.25)
    assert torch.equal(repaired_binary[flagged], (y % 2)[flagged])


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: prune(torch.tensor([1.0, float("nan")]), 0.1), ValueError, "^scores: contains NaN"),
        (lambda: prune(torch.ones(3, 2), 0.1), ValueError, "^scores: must be a non-empty 1-D"),
        (lambda: prune(torch.ones(3), 1.0), ValueError, r"^fraction: must be a finite number in \[0, 1\)"),
        (lambda: prune(torch.ones(3), "0.1"), TypeError, "^fraction: must be a number"),
        (lambda: reweight(torch.ones(3), "soft", fraction=0.1), ValueError, "^scheme: must be one of"),
        (lambda: reweight(torch.ones(3), fraction=0.1, temperature=0), ValueError, "^temperature: must be"),
        (lambda: reweight(torch.ones(3), fraction=0.1, w_max=-1), ValueError, "^w_max: must be"),
        (lambda: relabel(torch.ones(3), torch.zeros(2, dtype=torch.long), torch.zeros(3, dtype=torch.long), 0.1),
         ValueError, "^labels: must be"),
    ],
)
def test_validation(call, error, message):
    with pytest.raises(error, match=message):
        call()
