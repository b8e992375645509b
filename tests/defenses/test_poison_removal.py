"""Finding backdoor poisons: renormalised influence, the detectors, ART's defences, remove_poisons, CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attacks
import defenses
import robust_infl as ri
from defenses import poison_detection as detect
from defenses.poison_removal import contrast_detection
from defenses.poison_recipes import PoisonContext
from defenses.recipes import get_recipe
from defenses.report import recommend_poisoned


def per_sample_gradients(model, x, y):
    params = [p for p in model.parameters()]
    rows = []
    for i in range(len(x)):
        loss = F.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]))
    return torch.stack(rows)


def objective_gradient(model, x, y):
    params = [p for p in model.parameters()]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)])


@pytest.fixture
def small_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    x, y = torch.randn(30, 5, dtype=torch.float64), torch.randint(0, 3, (30,))
    xt, yt = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    return model, (x, y), (xt, yt)


def test_renormalised_ip_matches_brute_force(small_problem):
    model, (x, y), (xt, yt) = small_problem
    grads = per_sample_gradients(model, x, y)
    expected = -(grads @ objective_gradient(model, xt, yt)) / grads.norm(dim=1)
    got = ri.influence(model, (x, y), (xt, yt), objective=ri.Utility(), method="ip", renormalize=True, progress=False)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-10)
    matrix = ri.influence(model, (x, y), (xt, yt), objective=ri.Utility(), method="ip", aggregate=False,
                          renormalize=True, progress=False)
    target = torch.stack([objective_gradient(model, xt[j:j + 1], yt[j:j + 1]) for j in range(len(yt))])
    assert torch.allclose(matrix, -(grads @ target.T) / grads.norm(dim=1, keepdim=True), rtol=1e-8, atol=1e-10)
    with pytest.raises(TypeError, match="^renormalize"):
        ri.influence(model, (x, y), (xt, yt), objective=ri.Utility(), method="ip", renormalize=1, progress=False)


def test_renormalised_tracin_sums_each_checkpoints_normalised_term(small_problem):
    model, (x, y), (xt, yt) = small_problem
    other = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    checkpoints = [model.state_dict(), other.state_dict()]
    expected = torch.zeros(len(y), dtype=torch.float64)
    for state, lr in zip(checkpoints, (0.5, 2.0)):
        at = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
        at.load_state_dict(state)
        grads = per_sample_gradients(at, x, y)
        expected += lr * -(grads @ objective_gradient(at, xt, yt)) / grads.norm(dim=1)
    got = ri.influence(model, (x, y), (xt, yt), objective=ri.Utility(), method="tracin", checkpoints=checkpoints,
                       lrs=[0.5, 2.0], renormalize=True, progress=False)
    assert torch.allclose(got, expected, rtol=1e-8, atol=1e-10)


def test_label_disagreement_matches_a_brute_force_count():
    g = torch.Generator().manual_seed(1)
    features, y = torch.randn(50, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (50,), generator=g)
    got = detect.label_disagreement_scores(features, y, k=4, chunk=7)
    unit = F.normalize(features, dim=1)
    for i in range(50):
        sims = unit @ unit[i]
        sims[i] = -float("inf")
        nearest = torch.topk(sims, 4).indices
        assert got[i] == pytest.approx(float((y[nearest] != y[i]).double().mean()))


def test_separated_top_cuts_at_the_gap_and_respects_the_budget():
    scores = torch.tensor([0.1, 0.9, 0.12, 0.95, 0.11, 0.88, 0.13, 5.0], dtype=torch.float64)
    candidates = torch.tensor([True] * 7 + [False])
    flagged = detect.separated_top(scores, candidates, k=10)
    assert flagged.tolist() == [False, True, False, True, False, True, False, False]
    capped = detect.separated_top(scores, candidates, k=2)
    assert capped.tolist() == [False, True, False, True, False, False, False, False]


@pytest.fixture(scope="module")
def poisoned_digits():
    """sklearn digits (600 training images), 5% BadNets with a 2x2 patch to class 0, an MLP trained on it."""
    from robust_infl.datasets import load_dataset
    from robust_infl.models import build_model

    splits = load_dataset("digits", seed=0, n_train=600, n_val=200, n_test=200)
    trigger = attacks.Trigger.patch((1, 8, 8), size=2)
    X, y, index = attacks.poison(splits.train[:2], trigger, target_class=0, rate=0.05, seed=0)
    trainer = defenses.ERM(epochs=30, lr=1e-3, batch_size=32, progress=False)
    model = trainer.fit(build_model("mlp", (1, 8, 8), 10, seed=0), (X, y), seed=0)
    Xv, yv = splits.val[:2]
    others = torch.nonzero(yv != 0).flatten()[:20]
    evidence = (trigger.apply(Xv[others]), yv[others])
    return model, (X, y), index, evidence, trainer, trigger, splits


@pytest.mark.parametrize("with_evidence", [True, False])
def test_recommended_detector_ranks_the_poisons_on_top(poisoned_digits, with_evidence):
    model, train, index, evidence, *_ = poisoned_digits
    scores, flagged, target = contrast_detection(model, train, evidence if with_evidence else None, 0.1)
    assert target == 0
    top = torch.sort(-scores, stable=True).indices[:index.numel()]
    assert torch.isin(top, index).double().mean() >= 0.9
    found = detect.detection_metrics(flagged, index, scores)
    assert found["recall"] >= 0.9 and found["precision"] >= 0.9 and found["auroc"] >= 0.98
    assert int(flagged.sum()) <= 60


def test_remove_poisons_breaks_the_backdoor_within_the_budget(poisoned_digits):
    model, train, index, evidence, trainer, trigger, splits = poisoned_digits
    Xt, yt = splits.test[:2]
    before = attacks.evaluate(model, (Xt, yt), {"t": trigger}, target_class=0, progress=False)["t"]["asr"]
    repaired, removed = defenses.remove_poisons(model, train, evidence, trainer=trainer, budget=0.1, seed=0)
    after = attacks.evaluate(repaired, (Xt, yt), {"t": trigger}, target_class=0, progress=False)["t"]["asr"]
    assert before >= 0.8 and after <= 0.1
    assert removed.numel() <= 60 and torch.equal(removed, torch.sort(removed).values)
    again = defenses.remove_poisons(model, train, evidence, trainer=trainer, budget=0.1, seed=0)
    assert torch.equal(again[1], removed)
    assert all(torch.equal(a, b) for a, b in zip(again[0].state_dict().values(), repaired.state_dict().values()))


def test_remove_poisons_rejects_bad_input(poisoned_digits):
    model, train, _, evidence, trainer, *_ = poisoned_digits
    with pytest.raises(ValueError, match="^evidence"):
        defenses.remove_poisons(model, train, (evidence[0][:, :, :4], evidence[1]), trainer=trainer, budget=0.1)
    with pytest.raises(ValueError, match="^evidence"):
        defenses.remove_poisons(model, train, (evidence[0], evidence[1][:3]), trainer=trainer, budget=0.1)
    with pytest.raises(ValueError, match="^evidence"):
        defenses.remove_poisons(model, train, evidence[0], trainer=trainer, budget=0.1)
    for budget in (0, 1.0, -0.2):
        with pytest.raises(ValueError, match="^budget"):
            defenses.remove_poisons(model, train, evidence, trainer=trainer, budget=budget)


def test_art_defence_adapters_run_on_a_tiny_model(poisoned_digits):
    model, (X, y), index, *_ = poisoned_digits
    X, y = X[:200], y[:200]
    ac = detect.activation_defence_scores(model, (X, y), seed=0)
    ss = detect.spectral_signature_scores(model, (X, y))
    for scores in (ac, ss):
        assert scores.shape == (200,) and bool(torch.isfinite(scores).all())
        assert float(scores.min()) >= 0 and float(scores.max()) <= 1
    # activation defence: 1 - the share of the class its cluster holds, so both clusters of a class sum to 1
    for c in range(10):
        values = torch.unique(ac[y == c])
        assert values.numel() <= 2 and (values.numel() == 1 or float(values.sum()) == pytest.approx(1.0))
    # spectral signature: the quantile within the class, top = 1
    for c in range(10):
        assert float(ss[y == c].max()) == pytest.approx(1.0)
    assert torch.equal(ac, detect.activation_defence_scores(model, (X, y), seed=0))


def test_defend_cli_with_poison_writes_the_backdoor_fields(tmp_path):
    from defenses.cli import main

    out = tmp_path / "run"
    code = main(["defend", "--data", "digits", "--poison", "badnets", "--poison-rate", "0.05", "--evidence", "10",
                 "--recipes", "none", "random", "remove-poisons", "--seeds", "1", "--n-train", "300", "--n-val",
                 "150", "--n-test", "100", "--epochs", "10", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    names = {(e["recipe"], e["evidence"]) for e in report["summary"]}
    assert names == {("none", None), ("random", None), ("remove-poisons", 10)}
    for entry in report["summary"]:
        for metric in ("clean_acc", "asr_backdoor", "robust_acc_adaptive"):
            assert 0 <= entry[metric]["mean"] <= 1
    assert (out / "report.md").exists() and (out / "asr_by_recipe.png").exists()
    assert all(entry["cost_vs_base"]["mean"] > 0 for entry in report["summary"])
    assert report["recommendation"]["unknown"] in ("none", "random")
    assert report["recommendation"]["evidence"] in ("none", "random", "remove-poisons K=10")
    assert f"**Recommendation:** {report['recommendation']['reason']}" in (out / "report.md").read_text()
    with pytest.raises(SystemExit):
        main(["defend", "--poison", "sleeper"])


class FixedPredictions(nn.Module):
    """Predicts the class stored in the first feature of each input."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return F.one_hot(x[:, 0].long(), 5).float() + 0 * x[:, :1]


def test_evidence_target_class_is_where_the_misclassified_evidence_goes():
    # 6 of 10 triggered inputs keep their true class (a weak backdoor), 4 are pushed into class 3
    y_true = torch.tensor([1, 1, 1, 1, 2, 2, 0, 4, 4, 1])
    predicted = torch.tensor([1, 1, 1, 1, 2, 2, 3, 3, 3, 3])
    X = torch.stack([predicted.double(), torch.zeros(10, dtype=torch.float64)], dim=1)
    assert detect.evidence_target_class(FixedPredictions(), (X, y_true)) == 3
    assert detect.evidence_target_class(FixedPredictions(), (X, predicted)) == 1  # none misclassified: the mode


def summary_entry(recipe, evidence, threat, clean, asr, cost, recall=None):
    stat = lambda value: {"mean": value, "std": 0.0}  # noqa: E731
    return {"recipe": recipe, "evidence": evidence, "threat": threat, "clean_acc": stat(clean),
            "asr_backdoor": stat(asr), "recall": None if recall is None else stat(recall), "cost_vs_base": stat(cost)}


def test_the_backdoor_recommendation_is_the_cheapest_row_near_the_lowest_attack_success_per_threat_model():
    summary = [
        summary_entry("none", None, "none", 0.930, 0.99, 1.0),
        summary_entry("low-loss", None, "unknown", 0.925, 0.005, 1.1, 0.6),      # lowest ASR of the unknown rows
        summary_entry("knn-label", None, "unknown", 0.910, 0.000, 0.5, 0.8),     # lower still, but loses 2 clean points
        summary_entry("remove-poisons-unknown", None, "unknown", 0.931, 0.012, 1.3, 0.99),  # within 1 point, dearer
        summary_entry("activation-defence", None, "unknown", 0.928, 0.012, 0.9, 0.7),  # within 1 point, cheapest
        summary_entry("remove-poisons", 10, "evidence", 0.935, 0.003, 1.4, 0.99),
        summary_entry("evidence-retrain", 10, "evidence", 0.936, 0.30, 1.2),
    ]
    pick = recommend_poisoned(summary)
    assert pick["unknown"] == "activation-defence"
    assert pick["evidence"] == "activation-defence"  # the evidence-known defender may use every row
    assert pick["reason"].startswith("trigger unknown: pick activation-defence: backdoor ASR 1.2 (none 99.0), 70.0% "
                                     "of the poisons removed, clean 92.8 (none 93.0), 0.90x the base model's training;")
    assert pick["reason"].endswith("best other row: knn-label, backdoor ASR 0.0 at clean 91.0, 0.50x.")
    summary[4]["cost_vs_base"]["mean"] = 1.5
    pick = recommend_poisoned(summary)
    assert (pick["unknown"], pick["evidence"]) == ("low-loss", "low-loss")
    summary[1]["asr_backdoor"]["mean"], summary[5]["asr_backdoor"]["mean"] = 0.05, 0.0
    pick = recommend_poisoned(summary)
    assert (pick["unknown"], pick["evidence"]) == ("remove-poisons-unknown", "remove-poisons K=10")
    assert recommend_poisoned(summary[:5])["evidence"] is None  # no evidence rows were run


def test_where_no_row_that_keeps_clean_accuracy_lowers_the_backdoor_the_row_that_removes_it_is_picked_with_its_cost():
    """The demo's case: low-loss does nothing (cheaper only by timing noise), the scan removes the backdoor but its
    mean clean accuracy is 1.1 points below none's. The scan is picked, its clean change and interval stated;
    no defence only where no row brings the ASR to 5% or below, or where there is no backdoor."""
    summary = [
        summary_entry("none", None, "none", 0.938, 0.990, 1.00),
        summary_entry("low-loss", None, "unknown", 0.933, 0.984, 0.96, 0.58),   # cheaper by timing noise, does nothing
        summary_entry("remove-poisons-unknown", None, "unknown", 0.927, 0.000, 1.76, 0.99),  # loses 1.1 clean points
        summary_entry("knn-label", None, "unknown", 0.900, 0.010, 1.05, 0.90),  # removes it too, at 3.8 points
    ]
    summary[2]["vs_none"] = {"clean_acc": {"mean": -0.011, "std": 0.026, "ci95": [-0.076, 0.053]}}
    pick = recommend_poisoned(summary)
    assert pick["unknown"] == "remove-poisons-unknown"
    assert pick["reason"] == ("trigger unknown: pick remove-poisons-unknown, the row that removes the backdoor at the "
                              "smallest clean cost (no row within 1 point(s) of clean accuracy lowers its ASR): "
                              "backdoor ASR 0.0 (none 99.0), 99.0% of the poisons removed, clean 92.7 (none 93.8; "
                              "-1.1 [-7.6, +5.3]), 1.76x the base model's training; best other row: knn-label, "
                              "backdoor ASR 1.0 at clean 90.0, 1.05x.")
    for entry in summary[2:]:
        entry["asr_backdoor"]["mean"] = 0.30  # lowered, but not removed, at a clean cost
    pick = recommend_poisoned(summary)
    assert pick["unknown"] == "none"
    assert pick["reason"].startswith("trigger unknown: pick none (no defence): no row that keeps clean accuracy "
                                     "within 1 point(s) lowers the backdoor ASR (99.0) by more than 1 point(s), and "
                                     "no row brings it to 5% or below;")
    summary[0]["asr_backdoor"]["mean"] = summary[1]["asr_backdoor"]["mean"] = 0.004  # no backdoor to remove
    summary[2]["asr_backdoor"]["mean"] = 0.0
    pick = recommend_poisoned(summary)
    assert pick["unknown"] == "none"
    assert pick["reason"].startswith("trigger unknown: pick none (no defence): the backdoor does not take (ASR 0.4 "
                                     "without a defence);")


def test_the_remove_poisons_recipe_runs_the_detector_once_and_matches_the_public_call(poisoned_digits, monkeypatch):
    model, train, index, evidence, trainer, *_ = poisoned_digits
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return contrast_detection(*args, **kwargs)

    monkeypatch.setattr(defenses.poison_removal, "contrast_detection", counted)
    recipe = get_recipe("remove-poisons", pipeline="poisoning")  # without evidence: test_backdoor_scan.py
    outcome = recipe.fn(PoisonContext(model=model, train=train, val=train, evidence=evidence, trainer=trainer,
                                      budget=0.1, seed=0))
    assert len(calls) == 1
    repaired, removed = defenses.remove_poisons(model, train, evidence, trainer=trainer, budget=0.1, seed=0)
    assert torch.equal(torch.nonzero(outcome.removed).flatten(), removed)
    assert torch.equal(outcome.scores, contrast_detection(model, train, evidence, 0.1)[0])
    assert all(torch.equal(a, b) for a, b in zip(outcome.model.state_dict().values(), repaired.state_dict().values()))
