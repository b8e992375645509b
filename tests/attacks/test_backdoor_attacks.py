"""The backdoor attacks beside BadNets and Blended: SIG, WaNet (with its noise mode) and the label-consistent
backdoor, each checked against its formula written out by hand, for reproducibility from the seed and for bad
input refused at the boundary."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import attacks
from robust_infl.models import SmallCNN
from conftest import same_bytes, seeded_images


# --- SIG -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sig_adds_the_closed_form_sinusoid_along_columns_and_clips(dtype):
    x, y = seeded_images(6, shape=(2, 5, 10), dtype=dtype)
    x[0] = 1.0  # clipped above
    x[1] = 0.0  # clipped below
    delta, f = 0.2, 3
    trigger = attacks.SIGTrigger((2, 5, 10), delta=delta, frequency=f)
    expected = x.clone()
    for j in range(10):  # v(i, j) = delta sin(2 pi j f / m), m = 10 columns, the same on every row and channel
        expected[..., j] = torch.clamp(x[..., j] + delta * math.sin(2 * math.pi * j * f / 10), 0, 1)
    for stamped in (trigger.apply(x), trigger(nn.Linear(1, 1), x, y)):
        assert stamped.dtype == dtype and stamped.shape == x.shape
        assert torch.allclose(stamped, expected, atol=1e-7, rtol=0)
        assert float(stamped.min()) >= 0 and float(stamped.max()) <= 1
    # the paper's defaults: delta 20/255, 6 periods
    default = attacks.SIGTrigger((1, 8, 8))
    assert default.delta == pytest.approx(20 / 255) and default.frequency == 6


def test_sig_poisons_only_target_class_samples_and_keeps_labels():
    x, y = seeded_images(80)
    trigger = attacks.SIGTrigger((1, 8, 8))
    X, labels, idx = attacks.poison((x, y), trigger, target_class=2, rate=0.1, seed=1, clean_label=True)
    assert torch.equal(labels, y) and bool((y[idx] == 2).all()) and idx.numel() == 8
    changed = (X != x).flatten(1).any(1)
    assert torch.equal(torch.nonzero(changed).flatten(), idx)
    assert torch.equal(X[idx], trigger.apply(x[idx]))


def test_sig_trains_with_delta_and_tests_with_test_delta():
    x, y = seeded_images(80, shape=(1, 6, 12))
    trigger = attacks.SIGTrigger((1, 6, 12), delta=0.1, frequency=2, test_delta=0.3)
    wave = torch.tensor([math.sin(2 * math.pi * j * 2 / 12) for j in range(12)])
    assert torch.allclose(trigger.apply(x), torch.clamp(x + 0.3 * wave, 0, 1), atol=1e-7, rtol=0)
    X, labels, idx = attacks.poison((x, y), trigger, target_class=1, rate=0.1, seed=0, clean_label=True)
    assert torch.equal(labels, y) and bool((y[idx] == 1).all())
    assert torch.allclose(X[idx], torch.clamp(x[idx] + 0.1 * wave, 0, 1), atol=1e-7, rtol=0)
    assert attacks.SIGTrigger((1, 6, 12), delta=0.1).test_delta == 0.1


def test_sig_rejects_bad_input():
    with pytest.raises(ValueError, match="^test_delta"):
        attacks.SIGTrigger((1, 8, 8), test_delta=0.0)
    with pytest.raises(ValueError, match="^delta"):
        attacks.SIGTrigger((1, 8, 8), delta=0.0)
    with pytest.raises(ValueError, match="^delta"):
        attacks.SIGTrigger((1, 8, 8), delta=1.5)
    with pytest.raises(ValueError, match="^frequency"):
        attacks.SIGTrigger((1, 8, 8), frequency=0)
    with pytest.raises(TypeError, match="^frequency"):
        attacks.SIGTrigger((1, 8, 8), frequency="6")
    with pytest.raises(ValueError, match="^input_shape"):
        attacks.SIGTrigger((8,))
    with pytest.raises(ValueError, match="^x"):
        attacks.SIGTrigger((1, 8, 8)).apply(torch.zeros(2, 1, 8, 9))
    with pytest.raises(TypeError, match="^x"):
        attacks.SIGTrigger((1, 8, 8)).apply(torch.zeros(2, 1, 8, 8, dtype=torch.long))


# --- WaNet -----------------------------------------------------------------------------------------------------

def field_by_hand(k, s, seed, height, width):
    """WaNet's warping field as in the paper's code, the identity grid written out element by element."""
    g = torch.Generator().manual_seed(seed)
    offsets = torch.rand(1, 2, k, k, generator=g, dtype=torch.float64) * 2 - 1
    offsets = offsets / torch.mean(torch.abs(offsets))
    offsets = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    identity = torch.empty(1, height, width, 2, dtype=torch.float64)
    for i in range(height):
        for j in range(width):
            identity[0, i, j, 0] = -1 + 2 * j / (width - 1)  # x: the column
            identity[0, i, j, 1] = -1 + 2 * i / (height - 1)  # y: the row
    return torch.clamp(identity + s * offsets / height, -1, 1)


def test_wanet_at_strength_zero_is_the_identity():
    x, y = seeded_images(10, shape=(3, 9, 7))
    trigger = attacks.WaNetTrigger((3, 9, 7), s=0.0)
    assert torch.allclose(trigger.apply(x), x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_wanet_is_grid_sample_with_the_hand_computed_field(dtype):
    x, y = seeded_images(10, shape=(2, 12, 12), dtype=dtype)
    trigger = attacks.WaNetTrigger((2, 12, 12), k=4, s=0.5, seed=3)
    field = field_by_hand(4, 0.5, 3, 12, 12)
    expected = F.grid_sample(x, field.to(dtype).expand(10, -1, -1, -1), mode="bilinear", align_corners=True)
    stamped = trigger(nn.Linear(1, 1), x, y)
    assert stamped.dtype == dtype
    assert torch.allclose(stamped, expected, atol=1e-6, rtol=0)
    assert float(stamped.min()) >= 0 and float(stamped.max()) <= 1
    assert float((stamped - x).abs().max()) > 0.05  # it does move pixels
    # the noise mode: the field plus uniform noise in [-1/H, 1/H], drawn from the generator given
    jitter = torch.rand(10, 12, 12, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2 - 1
    noisy_field = torch.clamp(field + jitter / 12, -1, 1).to(dtype)
    noisy = trigger.noise(x, torch.Generator().manual_seed(9))
    assert torch.allclose(noisy, F.grid_sample(x, noisy_field, align_corners=True), atol=1e-6, rtol=0)
    assert not torch.allclose(noisy, stamped, atol=1e-3)
    # the field is drawn from the seed
    assert torch.equal(attacks.WaNetTrigger((2, 12, 12), seed=3).field, trigger.field)
    assert not torch.equal(attacks.WaNetTrigger((2, 12, 12), seed=4).field, trigger.field)


def test_wanet_poison_is_reproducible_with_its_noise_mode():
    x, y = seeded_images(100, shape=(1, 8, 8))
    trigger = attacks.WaNetTrigger((1, 8, 8), seed=0)  # noise_ratio 2 (the paper's)
    X1, y1, idx1 = attacks.poison((x, y), trigger, target_class=1, rate=0.1, seed=5)
    X2, y2, idx2 = attacks.poison((x, y), trigger, target_class=1, rate=0.1, seed=5)
    assert same_bytes(X1, X2) and torch.equal(y1, y2) and torch.equal(idx1, idx2)
    X3, _, idx3 = attacks.poison((x, y), trigger, target_class=1, rate=0.1, seed=6)
    assert not same_bytes(X1, X3) and not torch.equal(idx1, idx3)
    assert idx1.numel() == 10 and bool((y[idx1] != 1).all()) and bool((y1[idx1] == 1).all())
    assert torch.equal(X1[idx1], trigger.apply(x[idx1]))
    changed = (X1 != x).flatten(1).any(1)
    noised = changed.clone()
    noised[idx1] = False
    assert int(noised.sum()) == 20  # twice as many noise-mode samples, outside the poisons
    assert torch.equal(y1[noised], y[noised])  # under their true labels
    assert not torch.allclose(X1[noised], trigger.apply(x[noised]), atol=1e-4)
    without = attacks.poison((x, y), attacks.WaNetTrigger((1, 8, 8), noise_ratio=0), target_class=1, rate=0.1,
                             seed=5)[0]
    assert int((without != x).flatten(1).any(1).sum()) == 10


def test_wanet_rejects_bad_input():
    for k in (1, 9):
        with pytest.raises(ValueError, match="^k:"):
            attacks.WaNetTrigger((1, 8, 8), k=k)
    with pytest.raises(ValueError, match="^s:"):
        attacks.WaNetTrigger((1, 8, 8), s=-0.1)
    with pytest.raises(ValueError, match="^noise_ratio"):
        attacks.WaNetTrigger((1, 8, 8), noise_ratio=-1)
    with pytest.raises(ValueError, match="^seed"):
        attacks.WaNetTrigger((1, 8, 8), seed=-1)
    with pytest.raises(ValueError, match="^input_shape"):
        attacks.WaNetTrigger((8, 8))
    x, y = seeded_images(20)
    with pytest.raises(ValueError, match="^rate"):  # 7 poisons and 14 noise-mode samples do not fit in 20
        attacks.poison((x, y), attacks.WaNetTrigger((1, 8, 8)), target_class=0, rate=0.35, seed=0)
    with pytest.raises(TypeError, match="^trigger"):
        attacks.poison((x, y), lambda batch: batch, target_class=0, rate=0.1, seed=0)


# --- label-consistent ------------------------------------------------------------------------------------------

def test_four_corner_patch_stamps_every_corner():
    x, _ = seeded_images()
    stamped = attacks.Trigger.patch((1, 8, 8), size=2, corner="all", value=0.5).apply(x)
    expected = x.clone()
    for rows in (slice(0, 2), slice(6, 8)):
        for cols in (slice(0, 2), slice(6, 8)):
            expected[..., rows, cols] = 0.5
    assert torch.equal(stamped, expected)


def test_label_consistent_hardens_then_stamps_only_target_class_samples():
    torch.manual_seed(0)
    proxy = SmallCNN(1, 4, 8).eval()
    x, y = seeded_images(80)
    trigger = attacks.Trigger.patch((1, 8, 8), size=2, corner="all")
    X, labels, idx = attacks.label_consistent_poison((x, y), trigger, proxy, target_class=1, rate=0.1, seed=0,
                                                     eps=0.2, steps=3)
    assert torch.equal(labels, y) and idx.numel() == 8 and bool((y[idx] == 1).all())
    changed = (X != x).flatten(1).any(1)
    assert torch.equal(torch.nonzero(changed).flatten(), idx)
    hard = attacks.PGD(eps=0.2, steps=3, seed=0)(proxy, x[idx], y[idx])
    assert torch.equal(X[idx], trigger.apply(hard))  # PGD on the proxy first, then the trigger
    middle = (X[idx] - x[idx])[..., 2:6, :]
    assert 0 < float(middle.abs().max()) <= 0.2 + 1e-6
    assert float(X.min()) >= 0 and float(X.max()) <= 1
    again = attacks.label_consistent_poison((x, y), trigger, proxy, target_class=1, rate=0.1, seed=0, eps=0.2,
                                            steps=3)
    assert same_bytes(again[0], X) and torch.equal(again[2], idx)
    other = attacks.label_consistent_poison((x, y), trigger, proxy, target_class=1, rate=0.1, seed=1, eps=0.2,
                                            steps=3)
    assert not same_bytes(other[0], X) and not torch.equal(other[2], idx)
    double = attacks.label_consistent_poison((x.double(), y), trigger, proxy.double(), target_class=1, rate=0.1,
                                             seed=0, eps=0.2, steps=3)[0]
    assert double.dtype == torch.float64


def test_label_consistent_rejects_bad_input():
    proxy = SmallCNN(1, 4, 8)
    x, y = seeded_images()
    trigger = attacks.Trigger.patch((1, 8, 8), size=2, corner="all")
    with pytest.raises(TypeError, match="^proxy"):
        attacks.label_consistent_poison((x, y), trigger, None, target_class=1, rate=0.1, seed=0)
    with pytest.raises(TypeError, match="^trigger"):
        attacks.label_consistent_poison((x, y), "patch", proxy, target_class=1, rate=0.1, seed=0)
    with pytest.raises(ValueError, match="^eps"):
        attacks.label_consistent_poison((x, y), trigger, proxy, target_class=1, rate=0.1, seed=0, eps=-0.1)
    with pytest.raises(ValueError, match="^steps"):
        attacks.label_consistent_poison((x, y), trigger, proxy, target_class=1, rate=0.1, seed=0, steps=0)
    with pytest.raises(ValueError, match="^rate"):  # more poisons than the target class holds
        attacks.label_consistent_poison((x, y), trigger, proxy, target_class=1, rate=0.5, seed=0)
    with pytest.raises(ValueError, match="^target_class"):
        attacks.label_consistent_poison((x, y), trigger, proxy, target_class=4, rate=0.1, seed=0)
