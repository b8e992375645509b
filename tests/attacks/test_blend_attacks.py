"""The blended backdoors: Chen et al.'s random-pattern blend and Qi et al.'s adaptive blend, each checked against
its formula written out by hand, for reproducibility from the seed and for bad input refused at the boundary."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attacks
from conftest import same_bytes, seeded_images


# --- blend (random pattern) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_blend_blends_the_seeded_uniform_pattern(dtype):
    x, y = seeded_images(6, shape=(2, 5, 7), dtype=dtype)
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
    x, y = seeded_images(80)
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


# --- adaptive blend (Adap-Blend) --------------------------------------------------------------------------------

def masks_by_hand(n, pieces, masked, height, width, seed):
    """Each sample's mask cell by cell: the first ``masked`` cells of a random order of the cells are left out."""
    side = int(round(pieces ** 0.5))
    order = torch.rand(n, pieces, generator=torch.Generator().manual_seed(seed)).argsort(dim=1)
    masks = torch.ones(n, height, width)
    step_h, step_w = height // side, width // side
    for i in range(n):
        for cell in order[i, :masked].tolist():
            row, col = divmod(cell, side)
            masks[i, row * step_h:(row + 1) * step_h, col * step_w:(col + 1) * step_w] = 0
    return masks


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adaptive_blend_stamps_random_halves_at_training_and_the_full_pattern_at_test(dtype):
    x, y = seeded_images(12, shape=(2, 8, 12), dtype=dtype)
    pattern = torch.rand(2, 8, 12, generator=torch.Generator().manual_seed(1))
    trigger = attacks.AdaptiveBlendTrigger(pattern, alpha=0.3, test_alpha=0.25, pieces=16, mask_rate=0.5)
    full = x + 0.25 * (pattern.to(dtype) - x)
    for stamped in (trigger.apply(x), trigger(nn.Linear(1, 1), x, y)):
        assert stamped.dtype == dtype and torch.allclose(stamped, full, atol=1e-7, rtol=0)
    masks = masks_by_hand(12, 16, 8, 8, 12, seed=5)
    assert torch.equal(trigger.cell_masks(12, torch.Generator().manual_seed(5)), masks)
    assert bool((masks.flatten(1).mean(1) == 0.5).all())  # half of the cells, each a 2 x 3 block
    train = trigger.train_stamp(x, torch.Generator().manual_seed(5))
    expected = x + 0.3 * masks[:, None].to(dtype) * (pattern.to(dtype) - x)
    assert train.dtype == dtype and torch.allclose(train, expected, atol=1e-7, rtol=0)
    assert torch.equal(trigger.noise(x, torch.Generator().manual_seed(5)), train)  # covers: the same stamp
    assert not torch.equal(masks_by_hand(12, 16, 8, 8, 12, seed=6), masks)
    assert attacks.AdaptiveBlendTrigger(pattern).test_alpha == 0.2  # the code's defaults: alpha 0.2 at both


def test_adaptive_blend_poison_is_reproducible_with_as_many_cover_samples():
    x, y = seeded_images(100)
    trigger = attacks.AdaptiveBlendTrigger.random((1, 8, 8), seed=3)
    assert torch.equal(trigger.pattern, attacks.Trigger.random_blend((1, 8, 8), seed=3).pattern)
    X1, y1, idx1 = attacks.poison((x, y), trigger, target_class=1, rate=0.1, seed=4)
    X2, y2, idx2 = attacks.poison((x, y), attacks.AdaptiveBlendTrigger.random((1, 8, 8), seed=3), target_class=1,
                                  rate=0.1, seed=4)
    assert same_bytes(X1, X2) and torch.equal(y1, y2) and torch.equal(idx1, idx2)
    X3, _, idx3 = attacks.poison((x, y), trigger, target_class=1, rate=0.1, seed=5)
    assert not same_bytes(X1, X3) and not torch.equal(idx1, idx3)
    assert idx1.numel() == 10 and bool((y[idx1] != 1).all()) and bool((y1[idx1] == 1).all())
    changed = (X1 != x).flatten(1).any(1)
    cover = changed.clone()
    cover[idx1] = False
    assert int(cover.sum()) == 10 and torch.equal(y1[cover], y[cover])  # as many covers, true labels
    for rows in (idx1, torch.nonzero(cover).flatten()):  # each stamped on exactly half of the 2 x 2 cells
        moved = (X1[rows] != x[rows]).view(-1, 4, 2, 4, 2).any(dim=(2, 4))  # (sample, cell row, cell column)
        assert bool((moved.flatten(1).sum(1) == 8).all())
        weights = ((X1[rows] - x[rows]) / (trigger.pattern - x[rows]))[(X1[rows] != x[rows])]
        assert torch.allclose(weights, torch.full_like(weights, 0.2), atol=1e-4)
    none = attacks.poison((x, y), attacks.AdaptiveBlendTrigger.random((1, 8, 8), noise_ratio=0), target_class=1,
                          rate=0.1, seed=4)[0]
    assert int((none != x).flatten(1).any(1).sum()) == 10


def test_adaptive_blend_rejects_bad_input():
    pattern = torch.rand(1, 8, 8)
    with pytest.raises(ValueError, match="^pieces"):
        attacks.AdaptiveBlendTrigger(pattern, pieces=8)  # not a square
    with pytest.raises(ValueError, match="^pieces"):
        attacks.AdaptiveBlendTrigger(pattern, pieces=9)  # 3 does not divide 8
    with pytest.raises(ValueError, match="^pieces"):
        attacks.AdaptiveBlendTrigger(pattern, pieces=1)
    with pytest.raises(ValueError, match="^mask_rate"):
        attacks.AdaptiveBlendTrigger(pattern, mask_rate=1.0)
    with pytest.raises(ValueError, match="^mask_rate"):
        attacks.AdaptiveBlendTrigger(pattern, mask_rate=0.99)  # rounds to every cell
    with pytest.raises(ValueError, match="^alpha"):
        attacks.AdaptiveBlendTrigger(pattern, alpha=0.0)
    with pytest.raises(ValueError, match="^test_alpha"):
        attacks.AdaptiveBlendTrigger(pattern, test_alpha=1.2)
    with pytest.raises(ValueError, match="^noise_ratio"):
        attacks.AdaptiveBlendTrigger(pattern, noise_ratio=-1)
    with pytest.raises(ValueError, match="^pattern"):
        attacks.AdaptiveBlendTrigger(pattern + 1)
    with pytest.raises(TypeError, match="^pattern"):
        attacks.AdaptiveBlendTrigger(torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="^x"):
        attacks.AdaptiveBlendTrigger(pattern).train_stamp(torch.zeros(2, 1, 8, 9), torch.Generator())
    with pytest.raises(ValueError, match="^rate"):  # 9 poisons and 9 covers do not fit in 15 samples
        attacks.poison(seeded_images(15), attacks.AdaptiveBlendTrigger(pattern), target_class=0, rate=0.6, seed=0)
