"""The trigger-unknown backdoor scan: a known answer on a tiny poisoned set (dirty-label and clean-label), the
verdict on clean data, the shift statistic against brute force and scipy, bad inputs, seed determinism, and its use
by remove_poisons and the poisoning recipes."""

from __future__ import annotations

import json

import math

import pytest
import torch
from scipy.stats import mannwhitneyu
from torch import nn

import attacks
import defenses
from defenses import poison_detection as detect
from defenses.backdoor_scan import (FLAG_SCORE, KNN_SCORE, SHIFT_FLAG_P, class_shift, class_statistics,
                                    knn_candidates, shift_flags, shift_scores)
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
    assert torch.allclose(scan.loss_gap, losses[0] - losses[1], atol=1e-5)
    # the scores are those of the statistic that decided (nothing is found here: the one nearer its threshold)
    assert torch.equal(scan.scores, scan.loss_gap if scan.statistic == "excess" else scan.shift_scores)
    assert scan.timing["early_model_s"] > 0 and scan.timing["trusted_model_s"] > 0
    # the training run's time is estimated from the early model's time per epoch
    assert scan.timing["training_s"] == pytest.approx(scan.timing["early_model_s"] * trainer.epochs / 3)


def test_the_flag_cut_takes_the_found_class_above_it_most_suspicious_first_within_the_budget():
    """A constructed case: 10 classes of 100; class 3 holds 20 samples far in the tail (6 nats) and 15 just above
    the default flag cut (0.75 nats, below the first cut of 2); every other sample scores 0, some of other classes
    1.5. The found class is 3; its 35 samples above half a nat are flagged by default, the 20 above 2 with the
    first cut, and the budget caps them; nothing of another class is flagged, whatever its score."""
    y = torch.arange(1000) % 10
    scores = torch.zeros(1000, dtype=torch.float64)
    in_class = torch.nonzero(y == 3).flatten()
    scores[in_class[:20]] = 6.0 + torch.arange(20, dtype=torch.float64) / 100
    scores[in_class[20:35]] = 0.75
    scores[torch.nonzero(y == 5).flatten()[:15]] = 1.5
    target, flagged, statistics = class_statistics(scores, y, k=100)
    assert FLAG_SCORE == 0.5
    assert target == 3 and statistics["tail_count"] == 20
    assert torch.equal(torch.sort(flagged).values, torch.sort(in_class[:35]).values)
    assert torch.equal(flagged[:20], in_class[:20].flip(0))  # most suspicious first
    _, old_cut, _ = class_statistics(scores, y, k=100, flag_score=2.0)
    assert torch.equal(torch.sort(old_cut).values, torch.sort(in_class[:20]).values)
    _, capped, _ = class_statistics(scores, y, k=25)
    assert torch.equal(capped[:20], in_class[:20].flip(0)) and capped.numel() == 25


def test_the_knn_count_finds_a_class_whose_poisons_stay_below_the_tail():
    """A constructed case: 20 classes of 50; class 3 holds 15 samples scoring 4 nats (above the k-NN count's score,
    below the 5-nat tail), each among the samples of another class in feature space (its source class); class 5
    holds 15 such scores too, but among samples of its own label. The tail finds nothing (excess 0 everywhere);
    the k-NN count finds class 3 and its 15 samples."""
    y = torch.arange(1000) % 20
    scores = torch.zeros(1000, dtype=torch.float64)
    poisons = torch.nonzero(y == 3).flatten()[:15]
    hard = torch.nonzero(y == 5).flatten()[:15]
    scores[poisons] = scores[hard] = 4.0
    source = y.clone()
    source[poisons] = torch.tensor([c for c in range(20) if c != 3][:15])
    noise = torch.randn(1000, 20, generator=torch.Generator().manual_seed(0)).double()
    features = torch.nn.functional.one_hot(source, 20).double() + 0.01 * noise
    knn = knn_candidates(scores, features, y)
    assert torch.equal(torch.nonzero(knn).flatten(), poisons)
    assert not knn_candidates(scores, features, y, score=4.5).any()  # at or below the score: not counted
    target, flagged, statistics = class_statistics(scores, y, k=100, knn=knn)
    assert target == 3 and statistics["tail_excess"] == 0.0 and statistics["excess"] == statistics["knn_excess"]
    assert statistics["excess"] == pytest.approx(15.0)  # 15 against none expected: (15 - 0) / sqrt(0 + 1)
    assert torch.equal(torch.sort(flagged).values, poisons)
    assert class_statistics(scores, y, k=100)[2]["excess"] == 0.0  # the tail alone finds nothing
    assert KNN_SCORE < 4.0 < defenses.backdoor_scan.SCORE_TAIL


def test_disagreement_for_some_rows_equals_the_full_computation_and_one_pass_gives_losses_and_features(digits):
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(1)).double()
    y = torch.arange(300) % 4
    rows = torch.tensor([299, 0, 17, 150])
    full = detect.label_disagreement_scores(features, y)
    assert torch.equal(detect.label_disagreement_scores(features, y, rows=rows, chunk=3), full[rows])
    train, _, model, _ = digits
    losses, got = detect.losses_and_features(model, train)
    assert torch.allclose(losses, detect.training_losses(model, train), atol=1e-6)
    assert torch.equal(got, detect.layer_features(model, train[0]))


def test_the_flag_cut_changes_what_is_flagged_not_the_verdict(digits, poisoned, poisoned_scan):
    _, trusted, model, trainer = digits
    strict = defenses.scan_backdoor(model, poisoned[0], trusted, budget=0.2, trainer=trainer, seed=0, flag_score=4.0)
    assert strict.found == poisoned_scan.found and strict.value == poisoned_scan.value
    assert torch.all(strict.scores[strict.flagged] > 4.0)
    assert torch.equal(strict.flagged, poisoned_scan.flagged[:strict.flagged.numel()])


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
        (dict(flag_score=float("inf")), ValueError, "^flag_score"),
        (dict(shift="yes"), TypeError, "^shift"),
        (dict(shift_threshold=0), ValueError, "^shift_threshold"),
        (dict(mislabel=None), TypeError, "^mislabel"),
        (dict(mislabel_threshold=-1.0), ValueError, "^mislabel_threshold"),
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


def _brute_force_shift(F, y, Ft, yt, fold, trusted_fold):
    """The shift scores by hand: per class and fold, one sample at a time."""
    both = torch.cat([F, Ft]).double()
    mean, std = both.mean(0), both.std(0)
    Z, Zt = (F.double() - mean) / std, (Ft.double() - mean) / std
    scores, trusted_scores = torch.zeros(len(y), dtype=torch.float64), torch.zeros(len(yt), dtype=torch.float64)
    for c in range(int(y.max()) + 1):
        for k in range(int(fold.max()) + 1):
            direction = (Z[(y == c) & (fold != k)].mean(0) - Zt[(yt == c) & (trusted_fold != k)].mean(0))
            for i in torch.nonzero((y == c) & (fold == k)).flatten().tolist():
                scores[i] = Z[i] @ direction
            for j in torch.nonzero((yt == c) & (trusted_fold == k)).flatten().tolist():
                trusted_scores[j] = Zt[j] @ direction
    return scores, trusted_scores


def test_shift_scores_equal_the_per_sample_brute_force_and_folds_are_balanced_per_class():
    generator = torch.Generator().manual_seed(0)
    F, Ft = torch.randn(300, 7, generator=generator), torch.randn(90, 7, generator=generator) * 2 + 1
    y, yt = torch.arange(300) % 3, torch.arange(90) % 3
    scores, trusted_scores, fold, trusted_fold = shift_scores(F, y, Ft, yt, folds=3, seed=4)
    expected, expected_trusted = _brute_force_shift(F, y, Ft, yt, fold, trusted_fold)
    assert torch.allclose(scores, expected, atol=1e-9) and torch.allclose(trusted_scores, expected_trusted, atol=1e-9)
    for labels, folds in ((y, fold), (yt, trusted_fold)):
        counts = torch.bincount(labels * 3 + folds, minlength=9)
        assert counts.max() - counts.min() <= 1  # 100 / 30 per class, split 34/33/33 or 10/10/10
    again = shift_scores(F, y, Ft, yt, folds=3, seed=4)
    assert torch.equal(again[0], scores) and torch.equal(again[2], fold)
    assert not torch.equal(shift_scores(F, y, Ft, yt, folds=3, seed=5)[2], fold)


def test_class_shift_is_scipys_mann_whitney_z_per_fold_and_p_the_conformal_p_value():
    generator = torch.Generator().manual_seed(1)
    y, yt = torch.arange(200) % 2, torch.arange(60) % 2
    fold, trusted_fold = (torch.arange(200) // 2) % 2, (torch.arange(60) // 2) % 2
    scores = (torch.randn(200, generator=generator).double() + (y == 1) * 1.5).round(decimals=1)  # class 1 shifted
    trusted_scores = torch.randn(60, generator=generator).double().round(decimals=1)  # rounded: some ties
    z, p = class_shift(scores, trusted_scores, y, yt, fold, trusted_fold)
    for c in range(2):
        parts = []
        for k in range(2):
            a = scores[(y == c) & (fold == k)].numpy()
            b = trusted_scores[(yt == c) & (trusted_fold == k)].numpy()
            u = mannwhitneyu(a, b).statistic
            n, m = len(a), len(b)
            parts.append((u / (n * m) - 0.5) / math.sqrt((n + m + 1) / (12 * n * m)))
        assert z[c] == pytest.approx(sum(parts) / math.sqrt(2), rel=1e-9)
    assert z[1] > 3 > abs(float(z[0]))
    i = 7
    same = trusted_scores[(yt == y[i]) & (trusted_fold == fold[i])]
    assert p[i] == pytest.approx((1 + int((same >= scores[i]).sum())) / (1 + same.numel()))
    flagged = shift_flags(scores, p, y, 1, k=5)
    assert flagged.numel() <= 5 and torch.all(y[flagged] == 1) and torch.all(p[flagged] <= SHIFT_FLAG_P)
    assert torch.all(scores[flagged[:-1]] >= scores[flagged[1:]])


def test_the_shift_statistic_finds_a_clean_label_signal_that_the_excess_misses(digits):
    """SIG's clean-label poisons: 90% of class 0's training images carry the sinusoidal signal, under their own
    label; the trusted images do not. The shift statistic finds class 0 and flags its signal-bearing images; the
    verdict on ``excess`` alone (``shift=False, mislabel=False``) finds nothing."""
    train, trusted, model, trainer = digits
    X, y = train
    in_class = torch.nonzero(y == 0).flatten()
    poisoned = in_class[: int(0.9 * in_class.numel())]
    X = X.clone()
    X[poisoned] = attacks.SIGTrigger((1, 8, 8), delta=0.1).train_stamp(X[poisoned], torch.Generator())
    scan = defenses.scan_backdoor(model, (X, y), trusted, budget=0.3, trainer=trainer, seed=0)
    assert scan.found and scan.statistic == "shift" and scan.target_class == 0
    assert scan.value == scan.statistics["shift"] > scan.threshold
    assert torch.equal(scan.scores, scan.shift_scores)
    hits = torch.isin(scan.flagged, poisoned)
    assert hits.double().mean() >= 0.9 and hits.sum() >= 0.6 * poisoned.numel()
    excess_alone = defenses.scan_backdoor(model, (X, y), trusted, budget=0.3, trainer=trainer, seed=0, shift=False,
                                          mislabel=False)
    assert not excess_alone.found and excess_alone.statistic == "excess" and excess_alone.flagged.numel() == 0
    assert excess_alone.statistics["shift"] == scan.statistics["shift"]  # computed either way


def test_a_trusted_set_from_another_source_shifts_every_class_and_is_reported(digits):
    """The shift statistic's stated assumption: the trusted set is drawn like the training data. Trusted images
    at half their contrast (another camera, another scanner) shift every class, and the scan reports a shift
    where the same data with its own trusted set reports none. (With 20 trusted digits per class the statistic
    can reach about 6.6 at most: this shift is near that.)"""
    train, trusted, model, trainer = digits
    other_source = (trusted[0] * 0.5, trusted[1])
    scan = defenses.scan_backdoor(model, train, other_source, budget=0.2, trainer=trainer, seed=0)
    assert scan.found and scan.statistic == "shift" and scan.statistics["shift"] > scan.threshold
    own = defenses.scan_backdoor(model, train, trusted, budget=0.2, trainer=trainer, seed=0)
    assert own.statistics["shift"] < 6.0 and not own.found


def test_the_mislabel_statistic_counts_what_the_trusted_model_alone_sees_mislabelled(digits):
    """Dirty-label poisons without any trigger (30 images of other digits labelled 0): nothing for the early model
    to learn early, the limiting case of a trigger it has not learnt. With ``excess`` muted (its threshold out of
    reach), ``mislabel`` decides: class 0, its 30 relabelled images flagged. Brute force: the trusted model trained
    by hand, the samples above 5 nats of its loss whose 20 nearest neighbours in its features carry another label
    in at least 95%, counted per class, the excess over the other classes' rate. ``mislabel=False`` leaves the
    verdict to the other two statistics (nothing found here)."""
    train, trusted, model, trainer = digits
    X, y = train
    others = torch.nonzero(y != 0).flatten()
    relabelled = others[torch.randperm(others.numel(), generator=torch.Generator().manual_seed(0))[:30]]
    y = y.clone()
    y[relabelled] = 0
    scan = defenses.scan_backdoor(model, (X, y), trusted, budget=0.1, trainer=trainer, seed=0, threshold=100.0)
    assert scan.found and scan.statistic == "mislabel" and scan.target_class == 0
    assert scan.value == scan.statistics["mislabel"] > scan.threshold == defenses.backdoor_scan.MISLABEL_THRESHOLD
    assert torch.equal(scan.scores, scan.loss_gap)  # flagged by the loss gap, as for excess
    assert torch.equal(torch.sort(scan.flagged).values, torch.sort(relabelled).values)
    fitted = defenses.ERM(epochs=defenses.backdoor_scan.TRUSTED_EPOCHS, lr=trainer.lr, batch_size=trainer.batch_size,
                          progress=False).fit(model, trusted, seed=0)
    losses, features = detect.losses_and_features(fitted, (X, y))
    unit = torch.nn.functional.normalize(features, dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-math.inf)
    disagreement = (y[similarity.topk(20, dim=1).indices] != y[:, None]).double().mean(1)
    counted = (losses > defenses.backdoor_scan.MISLABEL_LOSS) & (disagreement >= 0.95)
    n = torch.bincount(y[counted], minlength=10).double()
    size = torch.bincount(y, minlength=10).double()
    expected = size * (n.sum() - n) / (size.sum() - size)
    assert scan.statistics["mislabel"] == pytest.approx(float(((n - expected) / (expected + 1).sqrt()).max()))
    without = defenses.scan_backdoor(model, (X, y), trusted, budget=0.1, trainer=trainer, seed=0, threshold=100.0,
                                     mislabel=False)
    assert not without.found and without.statistic != "mislabel" and without.flagged.numel() == 0
    assert without.statistics["mislabel"] == scan.statistics["mislabel"]  # computed either way


def test_the_scans_forward_passes_run_a_cnn_in_channels_last_with_the_same_outputs():
    """The scan's own models score the training set with their 4-D weights in channels-last memory format (faster
    on a CPU): the same outputs up to float rounding; flat inputs leave the model as it is."""
    from defenses.backdoor_scan import _for_inference
    model = build_model("cnn", (1, 28, 28), 10, seed=0).eval()
    X = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(X)
        fast = _for_inference(model, X)
        assert fast.features[0].weight.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(fast(X), before, atol=1e-5)
    flat = build_model("mlp", (1, 8, 8), 10, seed=0)
    assert _for_inference(flat, torch.rand(4, 64)) is flat
