"""The LDS experiment: its sign convention on a known answer, the subsets, and the ``--quick`` run end to end."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
import torch
from scipy import stats

from experiments.lds import CONTROL_METHODS, METHODS, OBJECTIVES, lds, subset_masks


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
