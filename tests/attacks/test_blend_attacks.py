"""The blended backdoors: Chen et al.'s random-pattern blend and Qi et al.'s adaptive blend, each checked against
its formula written out by hand, for reproducibility from the seed and for bad input refused at the boundary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attacks


def images(n=40, seed=0, classes=4, shape=(1, 8, 8), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g, dtype=dtype), torch.arange(n) % classes


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


# --- blend (random pattern) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_blend_blends_the_seeded_uniform_pattern(dtype):
    x, y = images(6, shape=(2, 5, 7), dtype=dtype)
    trigger = attacks.Trigger.random_blend((2, 5, 7), alpha=0.3, seed=4)
    pattern = torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(4))  # uniform in [0, 1), seed 4
    expected = 0.7 * x + 0.3 * pattern.to(dtype)
    for stamped in (trigger.apply(x), trigger(nn.Linear(1, 1), x, y)):
        assert stamped.dtype == dtype
        assert torch.allclose(stamped, expected, atol=1e-7, rtol=0)
    assert torch.equal(trigger.pattern, pattern) and bool((trigger.mask == 0.3).all())
    default = attacks.Trigger.random_blend((2, 5, 7))  # the paper's alpha 0.2, seed 0
    assert bool((default.mask == 0.2).all())
    assert torch.equal(default.pattern, torch.rand(2, 5, 7, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(attacks.Trigger.random_blend((2, 5, 7), seed=5).pattern, trigger.pattern)


def test_random_blend_poison_is_reproducible_and_relabels_other_class_samples():
    x, y = images(80)
    trigger = attacks.Trigger.random_blend((1, 8, 8), seed=2)
    X1, y1, idx1 = attacks.poison((x, y), trigger, target_class=3, rate=0.1, seed=7)
    X2, y2, idx2 = attacks.poison((x, y), attacks.Trigger.random_blend((1, 8, 8), seed=2), target_class=3, rate=0.1,
                                  seed=7)
    assert same_bytes(X1, X2) and torch.equal(y1, y2) and torch.equal(idx1, idx2)
    assert idx1.numel() == 8 and bool((y[idx1] != 3).all()) and bool((y1[idx1] == 3).all())
    changed = (X1 != x).flatten(1).any(1)
    assert torch.equal(torch.nonzero(changed).flatten(), idx1)
    assert torch.equal(X1[idx1], trigger.apply(x[idx1]))


def test_random_blend_rejects_bad_input():
    with pytest.raises(ValueError, match="^alpha"):
        attacks.Trigger.random_blend((1, 8, 8), alpha=0.0)
    with pytest.raises(ValueError, match="^alpha"):
        attacks.Trigger.random_blend((1, 8, 8), alpha=1.5)
    with pytest.raises(ValueError, match="^seed"):
        attacks.Trigger.random_blend((1, 8, 8), seed=-1)
    with pytest.raises(ValueError, match="^input_shape"):
        attacks.Trigger.random_blend((8,))
