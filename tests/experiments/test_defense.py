"""Smoke tests of the noisy-label and adversarial-defence experiment scripts.

Each runs the script's ``--quick`` variant end to end in a subprocess and checks the written JSON
and plot: shapes, ranges, the statistics against the per-seed numbers, and effects the quick
configuration shows reliably (the training loss finds flipped labels; the paper's closed-form
attack breaks every fixed attacked point of the undefended linear model).
"""

from __future__ import annotations

import math

import pytest

from conftest import fashion_mnist_installed, in_unit_interval


def test_noisy_labels_quick(tmp_path, run_quick):
    result = run_quick("noisy_labels", tmp_path, timeout=400)
    config = result["config"]
    methods = ("ip", "ip-ensemble", "tracin", "if-lissa", "datainf", "self", "loss", "random")
    assert len(result["per_seed"]) == len(config["seeds"]) >= 2
    for scale in config["scales"]:
        for mode in config["noise_modes"]:
            for rate in config["noise_rates"]:
                runs = [seed_result[scale["name"]][mode][str(rate)] for seed_result in result["per_seed"]]
                for run in runs:
                    assert run["n_flipped"] == round(rate * scale["n_train"])
                    assert run["none_acc"] > 0.3  # far above chance (0.1) despite the noise
                    assert set(run["detection"]) == set(methods)
                    for method in methods:
                        metrics = run["detection"][method]
                        assert in_unit_interval(metrics["auroc"]) and in_unit_interval(metrics["precision_at_k"])
                        assert in_unit_interval(run["removal_acc"][method])
                    assert run["detection"]["loss"]["auroc"] > 0.75  # flipped labels have a high training loss
                    assert abs(run["detection"]["random"]["auroc"] - 0.5) < 0.15
                    assert run["removed_flipped"]["loss"] > 0.7 > run["removed_flipped"]["random"]
                summary = result["summary"][scale["name"]][mode][str(rate)]
                aurocs = [run["detection"]["ip"]["auroc"] for run in runs]
                assert summary["detection"]["ip"]["auroc"][0] == pytest.approx(sum(aurocs) / len(aurocs))
                diffs = [run["removal_acc"]["loss"] - run["removal_acc"]["random"] for run in runs]
                mean, (low, high) = summary["removal"]["loss"]["vs_random"]
                assert mean == pytest.approx(sum(diffs) / len(diffs)) and low <= mean <= high
    assert all(math.isfinite(s) for scale in result["summary"].values() for s in scale["seconds"].values())


def test_paper_defense_quick(tmp_path, run_quick):
    result = run_quick("paper_defense", tmp_path, timeout=400)
    settings = {s["data"] + "-" + s["model"]: s for s in result["config"]["settings"]}
    assert set(result["per_seed"]) == set(settings) == {"adult-logreg", "digits-mlp"}
    for name, setting in settings.items():
        runs = result["per_seed"][name]
        assert len(runs) == len(setting["seeds"]) >= 2
        for run in runs:
            for attack in setting["attacks"]:
                base = run["base"][attack]
                assert base["robust_acc_adaptive"] == base["robust_acc_transfer"] <= base["clean_acc"]
                cells = [run["honest"][attack][m][str(f)] for m in (*setting["methods"], "random", "loss")
                         for f in setting["fractions"]]
                for cell in cells:
                    metrics = ("clean_acc", "robust_acc_adaptive", "robust_acc_transfer", "majority_rate")
                    assert all(in_unit_interval(cell[k]) for k in metrics)
                    if attack == "linear":  # the closed form flips every prediction of a binary linear model
                        assert cell["robust_acc_adaptive"] == pytest.approx(1 - cell["clean_acc"])
    for run in result["per_seed"]["digits-mlp"]:  # AutoAttack ran (at a budget that breaks nearly everything)
        assert run["base"]["autoattack"] <= 0.2
        assert run["honest"]["pgd-linf"]["ip"]["0.05"]["autoattack_acc"] <= 0.2
        assert "autoattack_acc" in run["honest"]["pgd-linf"]["random"]["0.05"]

    n_test = settings["adult-logreg"]["sizes"][2]
    paper_runs = [run["paper"] for run in result["per_seed"]["adult-logreg"]]
    for paper in paper_runs:
        assert 0.05 <= paper["share"] <= 0.25 and paper["n_attacked"] == round(paper["share"] * n_test)
        assert paper["none"] < 0.5  # the undefended model is right only on the points it got wrong before
        for method in ("random", "loss"):  # objective-free: the same retrained models under both targets
            assert paper["targets"]["paper"][method] == paper["targets"]["leak-free"][method]
    summary = result["summary"]["adult-logreg"]["paper"]["ip"]["0.05"]
    diffs = [p["targets"]["paper"]["ip"]["0.05"] - p["targets"]["leak-free"]["ip"]["0.05"] for p in paper_runs]
    mean, (low, high) = summary["leak"]
    assert mean == pytest.approx(sum(diffs) / len(diffs)) and low <= mean <= high


def test_defense_references_quick(tmp_path, run_quick):
    result = run_quick("defense_references", tmp_path, timeout=400)
    installed = {"fashion-mnist-cnn"} if fashion_mnist_installed() else set()  # else skipped with a note
    assert set(result) == {"mnist-cnn", "adult-logreg", "breast_cancer-logreg"} | installed
    for name, report in result.items():
        rows = {entry["recipe"]: entry for entry in report["summary"]}
        assert {"none", "fast-at", "pgd-at", "trades", "influence", "lookahead"} <= set(rows), name
        assert all(entry["cost_vs_erm"]["mean"] > 0 for entry in report["summary"])
        assert report["recommendation"]["recipe"] in rows
    assert result["mnist-cnn"]["config"]["eval_attacks"] == ["pgd", "apgd-ce"]
    # the trak variant's influence row joins the mnist-cnn table, run on the same base models
    joined = {entry["recipe"]: entry for entry in result["mnist-cnn"]["summary"]}["influence (trak, 2 half models)"]
    assert joined["variant"] == "mnist-cnn-trak" and joined["cost_vs_erm"]["mean"] > 0
    (info,) = result["mnist-cnn"]["joined"]
    assert {k: v for k, v in info.items() if k != "versus"} == {
        "setting": "mnist-cnn-trak", "label": "trak, 2 half models", "seeds": [0], "method": "trak",
        "method_options": {"ensemble": "2", "proj_dim": "64"}, "same_none": True}
    ip = {entry["recipe"]: entry for entry in result["mnist-cnn"]["summary"]}["influence"]
    versus = info["versus"]["influence"]
    assert versus["seeds"] == [0] and versus["robust_acc_adaptive"]["mean"] == pytest.approx(
        joined["robust_acc_adaptive"]["mean"] - ip["robust_acc_adaptive"]["mean"])
