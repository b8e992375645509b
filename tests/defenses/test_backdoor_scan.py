"""The trigger-unknown backdoor scan: a known answer on a tiny poisoned set, the verdict on clean data, bad inputs,
seed determinism, and its use by remove_poisons and the poisoning recipes."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import attacks
import defenses
from defenses.poison_recipes import PoisonContext
from defenses.recipes import get_recipe
from robust_infl.datasets import load_dataset
from robust_infl.models import build_model


@pytest.fixture(scope="module")
def digits():
    """sklearn digits: 600 training and 200 trusted (validation) images, an MLP and its trainer (learning rate
    3e-3: the scan's default epochs, calibrated for MNIST's CNN, need it for a confident trusted MLP)."""
    splits = load_dataset("digits", seed=0, n_train=600, n_val=200, n_test=200)
    trainer = defenses.ERM(epochs=30, lr=3e-3, batch_size=32, progress=False)
    return splits.train[:2], splits.val[:2], build_model("mlp", (1, 8, 8), 10, seed=0), trainer


@pytest.fixture(scope="module")
def poisoned(digits):
    """10% of the training set carries a 2x2 corner patch and the label 0 (BadNets)."""
    train, _, _, _ = digits
    X, y, index = attacks.poison(train, attacks.Trigger.patch((1, 8, 8), size=2), target_class=0, rate=0.1, seed=0)
    return (X, y), index


@pytest.fixture(scope="module")
def poisoned_scan(digits, poisoned):
    _, trusted, model, trainer = digits
    return defenses.scan_backdoor(model, poisoned[0], trusted, budget=0.2, trainer=trainer, seed=0)


def test_the_scan_finds_a_strong_patch_its_class_and_its_poisons(poisoned, poisoned_scan):
    (_, y), index = poisoned
    scan = poisoned_scan
    assert scan.found and scan.value > scan.threshold and scan.target_class == 0
    assert scan.flagged.dtype == torch.int64 and scan.flagged.numel() <= round(0.2 * len(y))
    hits = torch.isin(scan.flagged, index)
    assert hits.double().mean() >= 0.9 and hits.sum() >= 0.9 * index.numel()
    assert torch.all(scan.scores[scan.flagged[:-1]] >= scan.scores[scan.flagged[1:]])  # most suspicious first
    assert scan.scores.dtype == torch.float64 and scan.scores.shape == y.shape
    report = json.loads(json.dumps(scan.as_dict()))
    assert report["found"] is True and report["target_class"] == 0 and report["flagged"] == scan.flagged.tolist()


def test_on_clean_data_the_scan_finds_nothing_and_flags_nothing(digits):
    train, trusted, model, trainer = digits
    scan = defenses.scan_backdoor(model, train, trusted, budget=0.2, trainer=trainer, seed=0)
    assert not scan.found and scan.value <= scan.threshold
    assert scan.flagged.numel() == 0 and scan.target_class is not None


def test_the_scan_is_deterministic_in_its_seed(digits, poisoned, poisoned_scan):
    _, trusted, model, trainer = digits
    again = defenses.scan_backdoor(model, poisoned[0], trusted, budget=0.2, trainer=trainer, seed=0)
    assert torch.equal(again.scores, poisoned_scan.scores) and torch.equal(again.flagged, poisoned_scan.flagged)
    assert again.value == poisoned_scan.value
    other = defenses.scan_backdoor(model, poisoned[0], trusted, budget=0.2, trainer=trainer, seed=1)
    assert not torch.equal(other.scores, poisoned_scan.scores)


def test_the_score_is_the_trusted_models_loss_minus_the_early_models(digits, poisoned):
    """Brute force: the two models trained by hand (same seed, epochs and optimizer settings), their
    cross-entropies subtracted."""
    _, trusted, model, trainer = digits
    X, y = poisoned[0]
    scan = defenses.scan_backdoor(model, (X, y), trusted, budget=0.2, trainer=trainer, seed=3, trusted_epochs=4,
                                  early_epochs=3)
    options = dict(lr=trainer.lr, batch_size=trainer.batch_size, progress=False)
    losses = []
    for epochs, data in ((4, trusted), (3, (X, y))):
        fitted = defenses.ERM(epochs=epochs, **options).fit(model, data, seed=3)
        with torch.no_grad():
            losses.append(nn.functional.cross_entropy(fitted(X), y, reduction="none").double())
    assert torch.allclose(scan.scores, losses[0] - losses[1], atol=1e-5)
    assert scan.timing["early_model_s"] > 0 and scan.timing["trusted_model_s"] > 0
    # the training run's time is estimated from the early model's time per epoch
    assert scan.timing["training_s"] == pytest.approx(scan.timing["early_model_s"] * trainer.epochs / 3)


def test_the_scan_refuses_bad_inputs_naming_the_argument(digits, poisoned):
    train, trusted, model, trainer = digits
    X, y = poisoned[0]
    cases = [
        (dict(model="mlp"), TypeError, "^model"),
        (dict(train=X), TypeError, "^train"),
        (dict(train=(X[:1], y[:1])), ValueError, "^train"),
        (dict(trusted=(trusted[0][:, :, :4], trusted[1])), ValueError, "^trusted"),
        (dict(trusted=(trusted[0], trusted[1] + 20)), ValueError, "^trusted"),
        (dict(budget=1.5), ValueError, "^budget"),
        (dict(budget=0.0001), ValueError, "^budget"),
        (dict(seed=-1), ValueError, "^seed"),
        (dict(trainer="erm"), TypeError, "^trainer"),
        (dict(progress=1), TypeError, "^progress"),
        (dict(trusted_epochs=0), ValueError, "^trusted_epochs"),
        (dict(early_epochs=0), ValueError, "^early_epochs"),
        (dict(early_epochs=1.5), TypeError, "^early_epochs"),
        (dict(training_seconds=-1), ValueError, "^training_seconds"),
        (dict(threshold=float("nan")), ValueError, "^threshold"),
        (dict(tail="8"), TypeError, "^tail"),
    ]
    for change, error, match in cases:
        arguments = dict(model=model, train=(X, y), trusted=trusted, budget=0.2, trainer=trainer, seed=0)
        arguments.update(change)
        with pytest.raises(error, match=match):
            defenses.scan_backdoor(arguments.pop("model"), arguments.pop("train"), arguments.pop("trusted"),
                                   **arguments)


def test_remove_poisons_with_trusted_data_runs_the_scan(digits, poisoned, poisoned_scan):
    train, trusted, model, trainer = digits
    repaired, removed = defenses.remove_poisons(model, poisoned[0], None, trainer=trainer, budget=0.2, seed=0,
                                                trusted=trusted)
    assert torch.equal(removed, torch.sort(poisoned_scan.flagged).values) and repaired is not model
    unchanged, nothing = defenses.remove_poisons(model, train, None, trainer=trainer, budget=0.2, seed=0,
                                                 trusted=trusted)
    assert unchanged is model and nothing.numel() == 0
    with pytest.raises(ValueError, match="^trusted"):
        defenses.remove_poisons(model, train, None, trainer=trainer, budget=0.2, trusted=(trusted[0][:, :, :3],
                                                                                          trusted[1]))


@pytest.mark.parametrize("name", ["backdoor-scan", "remove-poisons-unknown"])
def test_the_scan_recipes_use_the_validation_split_as_trusted_data(digits, poisoned, poisoned_scan, name):
    _, trusted, model, trainer = digits
    recipe = get_recipe(name, pipeline="poisoning")
    assert recipe.threat == "unknown"
    outcome = recipe.fn(PoisonContext(model=model, train=poisoned[0], val=trusted, evidence=None, trainer=trainer,
                                      budget=0.2, seed=0))
    assert torch.equal(torch.nonzero(outcome.removed).flatten(), torch.sort(poisoned_scan.flagged).values)
    assert torch.equal(outcome.scores, poisoned_scan.scores)
