"""Backdoor poisoning in ``attacks``: trigger stamping, poisoned sets, targeted ASR, ART's poisoning attacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import attacks
from robust_infl.models import SmallCNN


def images(n=40, seed=0, classes=4):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.arange(n) % classes


@pytest.mark.parametrize("corner,rows,cols", [("top-left", slice(0, 3), slice(0, 3)),
                                              ("top-right", slice(0, 3), slice(5, 8)),
                                              ("bottom-left", slice(5, 8), slice(0, 3)),
                                              ("bottom-right", slice(5, 8), slice(5, 8))])
def test_patch_stamps_exactly_the_corner(corner, rows, cols):
    x, y = images()
    trigger = attacks.Trigger.patch((1, 8, 8), size=3, corner=corner, value=0.75)
    stamped = trigger(nn.Linear(1, 1), x, y)
    expected = x.clone()
    expected[:, :, rows, cols] = 0.75
    assert torch.equal(stamped, expected)
    assert torch.equal(trigger.apply(x), expected)


def test_blend_is_the_convex_combination():
    x, _ = images()
    pattern = torch.rand(1, 8, 8)
    stamped = attacks.Trigger.blend(pattern, 0.2).apply(x)
    assert torch.allclose(stamped, 0.8 * x + 0.2 * pattern, atol=1e-7)


def test_trigger_rejects_bad_input():
    with pytest.raises(ValueError, match="^pattern"):
        attacks.Trigger(torch.zeros(1, 8, 8), torch.zeros(1, 8, 7))
    with pytest.raises(ValueError, match="^mask"):
        attacks.Trigger(torch.full((1, 8, 8), 1.5), torch.zeros(1, 8, 8))
    with pytest.raises(ValueError, match="^corner"):
        attacks.Trigger.patch((1, 8, 8), corner="middle")
    with pytest.raises(ValueError, match="^size"):
        attacks.Trigger.patch((1, 8, 8), size=9)
    with pytest.raises(ValueError, match="^alpha"):
        attacks.Trigger.blend(torch.zeros(1, 8, 8), 0.0)
    with pytest.raises(ValueError, match="^x"):
        attacks.Trigger.patch((1, 8, 8)).apply(torch.zeros(2, 1, 9, 9))


@pytest.mark.parametrize("clean_label", [False, True])
def test_poison_is_reproducible_with_the_right_size_and_labels(clean_label):
    x, y = images(80)
    trigger = attacks.Trigger.patch((1, 8, 8), size=2)
    X1, y1, idx1 = attacks.poison((x, y), trigger, target_class=1, rate=0.1, seed=3, clean_label=clean_label)
    X2, y2, idx2 = attacks.poison((x, y), trigger, target_class=1, rate=0.1, seed=3, clean_label=clean_label)
    assert torch.equal(X1, X2) and torch.equal(y1, y2) and torch.equal(idx1, idx2)
    other = attacks.poison((x, y), trigger, target_class=1, rate=0.1, seed=4, clean_label=clean_label)[2]
    assert not torch.equal(idx1, other)
    assert idx1.numel() == 8 and torch.equal(idx1, torch.sort(idx1).values)
    assert bool((y[idx1] == 1).all()) if clean_label else bool((y[idx1] != 1).all())
    assert bool((y1[idx1] == 1).all())
    untouched = torch.ones(80, dtype=torch.bool)
    untouched[idx1] = False
    assert torch.equal(X1[untouched], x[untouched]) and torch.equal(y1[untouched], y[untouched])
    assert torch.equal(X1[idx1], trigger.apply(x[idx1]))
    assert torch.equal(x, images(80)[0])  # the input is not modified


def test_poison_rejects_bad_input():
    x, y = images()
    trigger = attacks.Trigger.patch((1, 8, 8))
    for rate in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="^rate"):
            attacks.poison((x, y), trigger, target_class=0, rate=rate, seed=0)
    for target in (-1, 4):
        with pytest.raises(ValueError, match="^target_class"):
            attacks.poison((x, y), trigger, target_class=target, rate=0.1, seed=0)
    with pytest.raises(ValueError, match="^rate"):  # more clean-label poisons than the class holds
        attacks.poison((x, y), trigger, target_class=0, rate=0.5, seed=0, clean_label=True)


class Constant(nn.Module):
    """Predicts class 2 for every input whose bottom-right pixel is 1, else the label hidden in pixel (0, 0)."""

    def forward(self, x):
        logits = torch.nn.functional.one_hot((x[:, 0, 0, 0] * 3.999).long(), 4).float()
        triggered = (x[:, 0, -1, -1] == 1.0).float()[:, None]
        return (1 - triggered) * logits + triggered * torch.nn.functional.one_hot(torch.full_like(
            x[:, 0, 0, 0], 2).long(), 4).float() * 2


def test_targeted_asr_matches_a_brute_force_count():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    x, y = images(100)
    trigger = attacks.Trigger.patch((1, 8, 8), size=2)
    result = attacks.evaluate(model, (x, y), {"trigger": trigger}, target_class=2, batch_size=17, progress=False)
    with torch.no_grad():
        predicted = model(trigger.apply(x)).argmax(1)
    others = y != 2
    assert result["trigger"]["asr"] == pytest.approx(float((predicted[others] == 2).double().mean()))
    assert result["trigger"]["robust_acc"] == pytest.approx(float((predicted == y).double().mean()))
    # a model that always follows the trigger has targeted ASR 1; the untargeted definition is kept without target_class
    backdoored = attacks.evaluate(Constant(), (x, y), {"trigger": trigger}, target_class=2, progress=False)
    assert backdoored["trigger"]["asr"] == 1.0
    untargeted = attacks.evaluate(model, (x, y), {"trigger": trigger}, progress=False)
    clean = model(x).argmax(1) == y
    assert untargeted["trigger"]["asr"] == pytest.approx(
        float((clean & (predicted != y)).sum()) / float(clean.sum()))
    with pytest.raises(ValueError, match="^target_class"):
        attacks.evaluate(model, (x, y), {"trigger": trigger}, target_class=-1, progress=False)


def test_art_backdoor_matches_own_poison():
    x, y = images(60)
    trigger = attacks.Trigger.patch((1, 8, 8), size=2)
    own = attacks.poison((x, y), trigger, target_class=1, rate=0.1, seed=5)
    art = attacks.ARTPoison("PoisoningAttackBackdoor").poison((x, y), trigger, target_class=1, rate=0.1, seed=5)
    for a, b in zip(own, art):
        assert torch.equal(a, b)


def test_art_clean_label_backdoor_perturbs_then_stamps_target_class_samples():
    torch.manual_seed(0)
    proxy = SmallCNN(1, 4, 8).eval()
    x, y = images(60)
    trigger = attacks.Trigger.patch((1, 8, 8), size=2)
    art = attacks.ARTPoison("PoisoningAttackCleanLabelBackdoor", eps=0.2, eps_step=0.05, max_iter=3)
    X, labels, idx = art.poison((x, y), trigger, target_class=1, rate=0.1, seed=0, proxy=proxy)
    assert idx.numel() == 6 and bool((y[idx] == 1).all()) and torch.equal(labels, y)
    assert torch.equal(X[idx][:, :, -2:, -2:], torch.ones(6, 1, 2, 2))  # stamped after the perturbation
    delta = (X[idx] - x[idx])[:, :, :6, :6]
    assert float(delta.abs().max()) <= 0.2 + 1e-6 and float(delta.abs().max()) > 0
    rest = torch.ones(60, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(X[rest], x[rest])
    again = art.poison((x, y), trigger, target_class=1, rate=0.1, seed=0, proxy=proxy)
    assert torch.equal(again[0], X)
    with pytest.raises(ValueError, match="^name"):
        attacks.ARTPoison("PoisoningAttackSVM")
    with pytest.raises(TypeError, match="^proxy"):
        art.poison((x, y), trigger, target_class=1, rate=0.1, seed=0)
