"""The LDS experiment: its sign convention on a known answer, the subsets, and the ``--quick`` run end to end."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import numpy as np
import pytest
import torch
from scipy import stats

import robust_infl as ri
from experiments.lds import (CONTROL_METHODS, METHODS, OBJECTIVES, SETUPS, build, both_targets, columnwise_spearman,
                             ensemble_matrix, half_models, lds, noise_cap, per_example_lds, per_example_main,
                             retrain_seed, score_matrix, setup_attack, setup_data, setup_folder, setup_trainer,
                             subset_masks)
from defenses.data import take


def test_subsets_are_seeded_halves():
    masks = subset_masks(11, 6, seed=2)
    assert masks.shape == (6, 11) and (masks.sum(dim=1) == 5).all()
    assert torch.equal(masks, subset_masks(11, 6, seed=2)) and not torch.equal(masks, subset_masks(11, 6, seed=3))
    assert len({tuple(row.tolist()) for row in masks}) > 1


def test_lds_is_plus_one_when_removals_change_the_objective_exactly_as_harm_predicts():
    # harm_i = predicted DECREASE of f when sample i is removed, so f(S) = f(full) - sum_{i not in S} harm_i.
    generator = torch.Generator().manual_seed(0)
    harm = torch.randn(40, generator=generator, dtype=torch.float64)
    masks = subset_masks(40, 30, seed=0)
    measured = (2.0 - ((~masks).double() @ harm)).numpy()
    assert lds(harm, masks, measured) == pytest.approx(1.0)
    assert lds(-harm, masks, measured) == pytest.approx(-1.0)  # the helpfulness convention scores -1


def test_subsets_keep_alpha_of_the_samples_and_a_half_by_default():
    assert (subset_masks(20, 4, seed=1, alpha=0.3).sum(dim=1) == 6).all()
    assert torch.equal(subset_masks(11, 6, seed=2, alpha=0.5), subset_masks(11, 6, seed=2))


@pytest.mark.filterwarnings("ignore::scipy.stats.ConstantInputWarning")  # the constant target, on purpose
def test_per_example_lds_equals_scipy_per_target():
    generator = np.random.default_rng(0)
    scores = generator.normal(size=(15, 4))
    masks = subset_masks(15, 9, seed=0).numpy()
    outputs = generator.normal(size=(9, 4))
    outputs[:3, 1] = outputs[0, 1]  # ties: average ranks, as scipy
    outputs[:, 3] = 1.0  # a constant target: NaN, as scipy
    expected = [stats.spearmanr(masks.astype(float) @ scores[:, j], outputs[:, j]).statistic for j in range(4)]
    np.testing.assert_allclose(per_example_lds(scores, masks, outputs), expected, rtol=1e-12, equal_nan=True)
    np.testing.assert_allclose(columnwise_spearman(outputs[:, :3], outputs[:, :3]), 1.0)


def test_per_example_lds_is_plus_one_when_each_target_moves_exactly_as_its_harm_predicts():
    generator = np.random.default_rng(1)
    harm = generator.normal(size=(30, 5))
    masks = subset_masks(30, 12, seed=1).numpy()
    losses = 3.0 - (~masks).astype(float) @ harm  # removing i lowers target j's loss by harm_ij
    np.testing.assert_allclose(per_example_lds(harm, masks, losses), 1.0)
    np.testing.assert_allclose(per_example_lds(-harm, masks, losses), -1.0)


def test_per_example_quick(tmp_path):
    methods = ["ip", "tracin", "trak", "random"] if importlib.util.find_spec("trak") else ["ip", "tracin", "random"]
    result = per_example_main(["--setup", "quick", "--seeds", "0", "--out", str(tmp_path), "--ensemble-sizes", "1", "2",
                               "--methods", *methods, "--no-progress"])
    (seed_result,) = result["per_seed"]
    rows = seed_result["rows"]
    assert {f"{m} x1" for m in methods} <= set(rows) and "ip halves x2" in rows
    for row in rows.values():
        assert "error" not in row and row["cost"] >= 0
        assert all(-1.0 <= row[o] <= 1.0 for o in (*OBJECTIVES, "utility_one_run", "robust_one_run"))
    assert rows["tracin x1"]["utility"] == pytest.approx(rows["ip x1"]["utility"])  # one checkpoint: ip
    assert set(seed_result["noise"]) == set(OBJECTIVES)
    folder = next(tmp_path.glob("quick-*"))
    utility = np.load(folder / "truth_seed0_utility.npy")
    assert utility.shape == (8, 2, 12) and np.isfinite(utility).all()
    assert np.load(folder / "truth_seed0_robust.npy").mean() > utility.mean()
    again = per_example_main(["--setup", "quick", "--seeds", "0", "--out", str(tmp_path), "--ensemble-sizes", "1", "2",
                              "--methods", *methods, "--no-progress"])  # resumed from the cache, same rows
    assert again["per_seed"][0]["rows"] == rows


@pytest.mark.skipif(importlib.util.find_spec("kronfluence") is None, reason="needs the ekfac extra (kronfluence)")
def test_lds_quick(tmp_path, run_quick):
    result = run_quick("lds", tmp_path, timeout=400)
    config = result["config"]
    assert len(result["per_seed"]) == len(result["control_per_seed"]) == len(config["seeds"]) >= 1
    for seed_result, methods in [(r, METHODS) for r in result["per_seed"]] + [
            (r, CONTROL_METHODS) for r in result["control_per_seed"]]:
        assert seed_result["errors"] == {}
        masks = subset_masks(config["n_train"], config["n_subsets"], seed_result["seed"])
        for objective in OBJECTIVES:
            measured = np.asarray(seed_result["measured"][objective])
            assert measured.shape == (config["n_subsets"],) and np.isfinite(measured).all() and measured.std() > 0
            full = seed_result["full_model"][objective]
            assert math.isfinite(full) and full > 0
        assert all(r >= u for r, u in zip(seed_result["measured"]["robust"], seed_result["measured"]["utility"]))
        for method in methods:
            for objective in OBJECTIVES:
                value = seed_result["lds"][method][objective]
                predicted = np.asarray(seed_result["predicted"][method][objective])
                assert predicted.shape == (masks.shape[0],)
                recomputed = stats.spearmanr(predicted, seed_result["measured"][objective]).statistic
                assert value == pytest.approx(recomputed) and -1.0 <= value <= 1.0
            assert seed_result["seconds"][method]["utility"] > 0
        assert len(seed_result["retrain_seconds"]) == config["n_subsets"]
    assert [r["model"] for r in result["control_per_seed"]] == ["logreg"] * len(config["seeds"])
    for noise, seed_result in zip(result["noise"], result["per_seed"], strict=True):  # the same subsets, retrained again
        assert noise["seed"] == seed_result["seed"] and len(noise["again"]["utility"]) == noise["subsets"] >= 3
        assert all(-1.0 <= noise["spearman"][o] <= 1.0 for o in OBJECTIVES)
        assert noise["again"]["utility"] != seed_result["measured"]["utility"][: noise["subsets"]]  # another order
    for summary, methods in ((result["summary"], METHODS), (result["control_summary"], CONTROL_METHODS)):
        assert set(summary) == set(methods) and all(set(summary[m]) == set(OBJECTIVES) for m in methods)


def test_half_models_scored_as_a_library_ensemble_equal_the_members_scored_one_by_one():
    setup = SETUPS["quick"]
    train, targets, shape, classes = setup_data(setup, 0)
    trainer, pgd = setup_trainer(setup), setup_attack(setup, 0)
    model = trainer.fit(build(setup, shape, classes, 0), train, seed=0)
    members = half_models(model, train, trainer, setup, 0, 2)
    halves = subset_masks(setup.n_train, 2, 500_000, 0.5)
    one_by_one = []
    for k in range(2):  # what the experiment did before: each member trained and scored on its own, averaged
        member = trainer.fit(model, take(train, halves[k]), seed=retrain_seed(setup, 0, k, 900))
        assert all(torch.equal(a, b) for a, b in zip(member.state_dict().values(),
                                                      members.models[k].state_dict().values()))
        one_by_one.append(score_matrix("ip", member, train, both_targets(member, targets, pgd), setup, k, []))
    np.testing.assert_allclose(ensemble_matrix("ip", ri.Ensemble(list(members.models)), train, targets, setup, 0, pgd),
                               np.mean(one_by_one, axis=0), rtol=1e-5, atol=1e-9)
    if importlib.util.find_spec("trak"):  # one member: TRAK's ensemble is TRAK on that model
        member = members.models[0]
        np.testing.assert_allclose(ensemble_matrix("trak", ri.Ensemble([member]), train, targets, setup, 0, pgd),
                                   score_matrix("trak", member, train, both_targets(member, targets, pgd), setup, 0,
                                                []), rtol=1e-4, atol=1e-7)


def test_noise_cap_is_the_correlation_of_a_perfect_predictor_with_the_mean_of_r_noisy_runs():
    assert noise_cap(1.0, 3) == pytest.approx(1.0) and noise_cap(0.0, 5) == 0.0
    assert noise_cap(0.11, 2) == pytest.approx(math.sqrt(0.22 / 1.11))
    generator = np.random.default_rng(0)  # effect + independent noise with var ratio giving c = 0.2 between runs
    effect = generator.normal(size=200_000)
    runs = effect[:, None] + generator.normal(scale=2.0, size=(200_000, 4))
    c = np.corrcoef(runs[:, 0], runs[:, 1])[0, 1]
    assert np.corrcoef(effect, runs.mean(axis=1))[0, 1] == pytest.approx(noise_cap(c, 4), abs=0.01)


def test_later_setup_fields_keep_the_earlier_cache_folders_and_reach_the_trainer(tmp_path):
    cnn = dataclasses.replace(SETUPS["cnn"], n_subsets=30)  # the cached cnn rows' folders, as before the new fields
    assert setup_folder(tmp_path, "cnn", cnn).name == "cnn-8c0faa14f8"
    assert setup_folder(tmp_path, "cnn", dataclasses.replace(cnn, init="same")).name == "cnn-8cb9276c8e"
    assert setup_folder(tmp_path, "cnn", dataclasses.replace(cnn, weight_decay=1e-4)).name != "cnn-8c0faa14f8"
    trainer = setup_trainer(SETUPS["cnn-sgd"])
    wanted = SETUPS["cnn-sgd"]
    assert (trainer.optimizer, trainer.lr, trainer.epochs, trainer.weight_decay, trainer.lr_schedule) == (
        wanted.optimizer, wanted.lr, wanted.epochs, wanted.weight_decay, wanted.lr_schedule)
