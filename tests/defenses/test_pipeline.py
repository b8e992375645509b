"""The closed loop end to end on tiny settings: files, statistics, determinism, test isolation, recipes."""

import json
import math

import pytest
import torch
from torch import nn

import attacks
import defenses
from defenses import pipeline, recipes
from defenses.report import paired_difference, without_timing
from defenses.trainers import ERM
from robust_infl import registry
from robust_infl.datasets import Splits, load_dataset

TINY = dict(model="logreg", attack="pgd", seeds=2, epochs=3, progress=False)


def _rows(report, recipe, fraction):
    return sorted((r for r in report["per_seed"]["runs"] if r["recipe"] == recipe and r["fraction"] == fraction),
                  key=lambda r: r["seed"])


def test_end_to_end_writes_the_report_and_the_numbers_add_up(tmp_path):
    report = defenses.run("moons", fractions=[0.05, 0.1], out=tmp_path, **TINY)
    assert {p.name for p in tmp_path.iterdir()} == {"report.json", "report.md", "robust_vs_fraction.png",
                                                    "robust_vs_cost.png", "seeds"}
    assert json.loads((tmp_path / "report.json").read_text())["config"]["fractions"] == [0.05, 0.1]
    table = (tmp_path / "report.md").read_text()
    assert "| influence | 0.05 |" in table and "| none | – |" in table and "**Recommendation:** pick " in table
    for plot in ("robust_vs_fraction.png", "robust_vs_cost.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    keys = [(e["recipe"], e["fraction"]) for e in report["summary"]]
    references = [("fast-at", None), ("pgd-at", None), ("trades", None)]
    assert keys == [("none", None)] + references + [(r, f) for f in (0.05, 0.1) for r in ("influence", "random", "loss")]
    assert report["config"]["references"] == ["fast-at", "pgd-at", "trades"]
    assert report["config"]["eval_attacks"] == ["pgd"]  # tabular data, no bounds: no APGD in the suite
    # scratch: "none" is the base model, so its numbers are the base model's
    assert [{k: r[k] for k in ("clean_acc", "robust_acc_adaptive")} for r in _rows(report, "none", None)] == \
        [{k: b[k] for k in ("clean_acc", "robust_acc_adaptive")} for b in report["per_seed"]["base"]]
    for entry in report["summary"]:
        rows = _rows(report, entry["recipe"], entry["fraction"])
        assert len(rows) == 2 and entry["reference"] == ((entry["recipe"], None) in references)
        for row in rows:
            assert "robust_acc" not in row and "transfer_acc" not in row  # the old aliases are gone
            assert row["train_time"] > 0 and row["cost_vs_erm"] > 0
            assert row["worst_case"] == row["robust_acc_adaptive"]  # the suite is the threat-model attack alone
        for metric in ("clean_acc", "robust_acc_transfer", "robust_acc_adaptive", "asr_adaptive",
                       "train_time", "cost_vs_erm"):
            assert entry[metric]["mean"] == pytest.approx(sum(r[metric] for r in rows) / len(rows))
        if entry["recipe"] != "none":
            expected = paired_difference([r["robust_acc_adaptive"] for r in rows],
                                         [r["robust_acc_adaptive"] for r in _rows(report, "none", None)])
            assert entry["vs_none"]["robust_acc_adaptive"] == expected
        if entry["recipe"] in ("influence", "loss"):
            assert "vs_random" in entry
    # adversarial training costs more than the ERM fit it is measured against
    for name, _ in references:
        assert all(r["cost_vs_erm"] > 1.0 for r in _rows(report, name, None)), name
    assert report["recommendation"]["recipe"] in {k[0] for k in keys}


def test_paired_difference_known_answer():
    out = paired_difference([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, df=2) * std / sqrt(n), std = 1
    assert out["mean"] == 2.0 and out["std"] == 1.0
    assert out["ci95"] == pytest.approx([2.0 - half, 2.0 + half])
    assert paired_difference([1.0], [0.5])["ci95"] is None


def test_same_seed_gives_an_identical_report(tmp_path):
    options = dict(fractions=[0.1], mode="reweight", **TINY)
    defenses.run("moons", out=tmp_path / "a", **options)
    defenses.run("moons", out=tmp_path / "b", **options)
    first, second = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("a", "b"))
    assert without_timing(first) == without_timing(second)  # wall times are measurements, not results
    other = defenses.run("moons", **{**options, "seeds": [5, 6]})
    assert without_timing(other["per_seed"]) != without_timing(first["per_seed"])


class _Sealed(torch.Tensor):
    """A tensor that fails on every data access while ``armed`` (shape / dtype / device stay readable)."""

    armed = True
    METADATA = {torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.device.__get__,
                torch.Tensor.dim, torch.Tensor.size, torch.Tensor.__len__, torch.Tensor.is_floating_point}

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if cls.armed and func not in cls.METADATA:
            raise AssertionError(f"the test split was touched outside evaluation by {func}")
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def test_the_test_split_never_reaches_scoring_or_training(monkeypatch):
    """The test split is sealed; only ``evaluate_on_test`` may open it. Scoring, selection and
    training of every recipe run with it sealed, so any access there would raise."""
    def sealed_splits(seed):
        s = load_dataset("moons", seed=seed)
        test = tuple(t.as_subclass(_Sealed) for t in s.test)
        return Splits(s.name, s.train, s.val, test, s.input_shape, s.num_classes, s.bounds)

    with pytest.raises(AssertionError, match="touched outside evaluation"):
        defenses.prune(sealed_splits(0).test[0][:, 0], 0.1)

    opened = []
    real_evaluate = pipeline.evaluate_on_test

    def evaluate_unsealed(*args, **kwargs):
        _Sealed.armed = False
        try:
            opened.append(True)
            return real_evaluate(*args, **kwargs)
        finally:
            _Sealed.armed = True

    scored = []
    real_influence = recipes.influence_scores
    monkeypatch.setattr(pipeline, "evaluate_on_test", evaluate_unsealed)
    monkeypatch.setitem(recipes._RECIPES, ("evasion", "influence"), recipes.Recipe(
        "influence", recipes.score_based("influence", lambda ctx: scored.append(ctx) or real_influence(ctx)),
        True, ""))
    defenses.run(sealed_splits, fractions=[0.1], recipes=["none", "influence", "random", "loss", "train+val"],
                 **TINY)
    # base + influence, random, loss, train+val + the 3 references per seed ("none" reuses base)
    assert len(opened) == 2 * 8
    assert scored and all(not hasattr(ctx, "test") for ctx in scored)


def test_removal_gives_weight_0_and_keeps_the_step_count_of_none():
    seen, steps = [], []

    class Recording(ERM):
        def fit(self, model, train, *, weights=None, seed=0, val=None):
            seen.append((len(train[0]), None if weights is None else weights.clone()))
            steps.append(0)
            return super().fit(model, train, weights=weights, seed=seed, val=val)

        def begin_step(self, model, *, step, epoch):
            steps[-1] += 1

    trainer = Recording(epochs=2, lr=0.01, batch_size=32, progress=False)
    options = dict(model="logreg", seeds=1, trainer=trainer, progress=False, references=(),
                   recipes=["none", "influence", "random", "loss", "influence-misclassified"])
    defenses.run("moons", fractions=[0.1], **options)
    # base model, its timed twin (the cost unit), then the four removals: all on the 400 training samples
    assert [n for n, _ in seen] == [400] * 6 and all(w is None for _, w in seen[:2])
    assert all(int((w == 0).sum()) == 40 for _, w in seen[2:5]) and int((seen[5][1] == 0).sum()) <= 40
    assert steps == [2 * math.ceil(400 / 32)] * 6  # every removal trains for as many steps as "none"
    seen.clear()
    defenses.run("moons", fractions=[0.1], mode="reweight", scheme="hard", **options)
    assert [n for n, _ in seen] == [400] * 6
    assert all(int((w == 0).sum()) == 40 for _, w in seen[2:5])


def test_reference_rows_train_on_the_same_data_schedule_and_seed(monkeypatch):
    fits = []
    real_fit = defenses.Trainer.fit

    def recording_fit(self, model, train, *, weights=None, seed=0, val=None):
        fits.append((type(self).__name__, len(train[0]), seed, self.epochs, self.lr, self.batch_size,
                     getattr(self, "eps", None)))
        return real_fit(self, model, train, weights=weights, seed=seed, val=val)

    monkeypatch.setattr(defenses.Trainer, "fit", recording_fit)
    report = defenses.run("moons", model="logreg", seeds=[3], epochs=2, lr=0.02, batch_size=50, eps=0.3,
                          recipes=["none"], progress=False)
    assert fits == [(name, 400, 3, 2, 0.02, 50, eps) for name, eps in
                    (("ERM", None), ("ERM", None), ("FastAT", 0.3), ("PGDAT", 0.3), ("TRADES", 0.3))]
    assert [r["recipe"] for r in report["per_seed"]["runs"]] == ["none", "fast-at", "pgd-at", "trades"]
    fits.clear()
    adversarial = defenses.run("moons", model="logreg", seeds=[3], epochs=2, trainer="fast-at", recipes=["none"],
                               progress=False)
    assert adversarial["config"]["references"] == []  # an adversarial trainer is its own reference ("none")
    assert [f[0] for f in fits] == ["FastAT", "ERM"]  # the run's trainer, then the ERM fit that prices it
    assert adversarial["per_seed"]["runs"][0]["cost_vs_erm"] > 1.0


def test_asr_adaptive_is_the_brute_force_share_of_clean_correct_points_flipped():
    splits = load_dataset("digits", seed=0, n_train=300, n_val=60, n_test=120)
    model = ERM(epochs=5, lr=3e-3, batch_size=32, progress=False).fit(
        registry.model_factory("mlp", splits)(0), splits.train, seed=0)
    attack = attacks.PGD(0.1, steps=5, seed=0)
    suite = {"fgsm": attacks.FGSM(0.1)}
    metrics, x_adv = defenses.evaluate_on_test(model, splits.test, attack, suite=suite, threat="pgd", eval_subset=50,
                                               progress=False)
    X, y = splits.test[:2]
    with torch.no_grad():
        clean_ok = model(X).argmax(1) == y
        adv_ok = model(x_adv).argmax(1) == y
        fgsm_ok = model(attacks.FGSM(0.1)(model, X[:50], y[:50])).argmax(1) == y[:50]
    assert 0 < int((clean_ok & ~adv_ok).sum()) < int(clean_ok.sum())  # a regime where the count means something
    assert metrics["asr_adaptive"] == int((clean_ok & ~adv_ok).sum()) / int(clean_ok.sum())
    assert metrics["robust_acc_adaptive"] == float(adv_ok.double().mean())
    assert metrics["attacks"]["fgsm"]["asr"] == int((clean_ok[:50] & ~fgsm_ok).sum()) / int(clean_ok[:50].sum())
    assert metrics["attacks"]["fgsm"]["robust_acc"] == float(fgsm_ok.double().mean())
    pgd_subset = metrics["attacks"]["pgd"]["robust_acc"]
    assert metrics["worst_case"] <= min(pgd_subset, metrics["attacks"]["fgsm"]["robust_acc"])


def test_user_module_tensors_and_attack_callable_with_finetune():
    g = torch.Generator().manual_seed(0)
    X = torch.rand(300, 6, generator=g)
    y = (X[:, 0] + 0.3 * torch.randn(300, generator=g) > 0.5).long()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))

        def forward(self, x):
            return self.body(x)

    report = defenses.run((X, y), Net(), attacks.FGSM(0.05), fractions=[0.1], retrain="finetune", seeds=2,
                          epochs=3, lr=0.01, batch_size=32, bounds=(0.0, 1.0), progress=False)
    assert report["config"]["model"] == "Net" and report["config"]["attack"] == "FGSM"
    assert report["config"]["n_train"] == 195 and report["config"]["n_test"] == 60
    assert report["config"]["eps"] == 0.05
    none = _rows(report, "none", None)
    assert len(none) == 2  # finetune: "none" is a fine-tuned model, evaluated on its own


def test_a_registered_recipe_runs_once_per_seed(monkeypatch):
    calls = []

    def plain_on_val_too(ctx):
        calls.append(ctx.fraction)
        return recipes.train_and_val(ctx)

    monkeypatch.setitem(recipes._RECIPES, ("evasion", "mine"), recipes.Recipe("mine", plain_on_val_too, False, ""))
    report = defenses.run("moons", fractions=[0.05, 0.1], recipes=["none", "mine"], references=(), **TINY)
    assert calls == [None, None]
    assert [(e["recipe"], e["fraction"]) for e in report["summary"]] == [("none", None), ("mine", None)]
    assert "vs_none" in report["summary"][1]


def test_the_budget_free_linear_attack_reports_no_eps(tmp_path):
    report = defenses.run("moons", model="logreg", attack="linear", fractions=[0.1], seeds=1, epochs=2,
                          recipes=["none", "influence"], out=tmp_path, progress=False)
    assert report["config"]["eps"] is None and report["config"]["norm"] is None
    assert "Threat model: linear; scores" in (tmp_path / "report.md").read_text()
    # the closed-form move (true labels) flips every correct prediction of a linear model and
    # leaves the misclassified points wrong: robust accuracy 0, a lower bound (it was 1 - clean with the
    # paper's predicted-label move, which turned the misclassified points correct)
    base = report["base"]
    assert base["robust_acc_adaptive"]["mean"] == 0.0 < base["clean_acc"]["mean"]


def test_pgd_at_trainer_scores_at_adversarial_training_points():
    report = defenses.run("moons", model="mlp", trainer="pgd-at", fractions=[0.1], seeds=1, epochs=2,
                          train_steps=2, progress=False)
    assert report["config"]["trainer"] == "pgd-at"
    assert all(0.0 <= r["robust_acc_adaptive"] <= r["clean_acc"] + 1e-9 for r in report["per_seed"]["runs"])


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(fractions=[1.5]), ValueError, r"^fractions: every fraction must be in \(0, 1\)"),
        (dict(fractions=[]), ValueError, "^fractions: must be a non-empty list"),
        (dict(mode="drop"), ValueError, "^mode: must be one of prune, reweight"),
        (dict(recipes=["nope"]), ValueError, "^recipes: unknown recipe 'nope'"),
        (dict(seeds=0), ValueError, "^seeds: must be >= 1"),
        (dict(method="magic"), ValueError, "^method: unknown method 'magic'"),
        (dict(attack="cw"), ValueError, "^attack: unknown name 'cw'"),
        (dict(trainer="sgd"), ValueError, "^trainer: unknown name 'sgd'"),
        (dict(trainer="art-pgd-at", mode="reweight"), ValueError, "^mode: ART's trainers take no per-sample"),
        (dict(data="cifar"), ValueError, "^data: unknown data set 'cifar'"),
        (dict(data=42), TypeError, "^data: expected"),
    ],
)
def test_validation(kwargs, error, message):
    options = dict(data="moons", model="logreg", seeds=1, epochs=1, progress=False)
    options.update(kwargs)
    with pytest.raises(error, match=message):
        defenses.run(**options)


def _entry(name, clean, robust, cost, fraction=None):
    def stat(m):
        return {"mean": m, "std": 0.0, "n": 3}

    return {"recipe": name, "fraction": fraction, "clean_acc": stat(clean), "robust_acc_adaptive": stat(robust),
            "cost_vs_erm": stat(cost)}


def test_pareto_front_and_recommendation_known_answers():
    from defenses.report import pareto_front, recommend

    rows = [_entry("none", 0.938, 0.60, 1.0), _entry("lookahead", 0.941, 0.70, 3.4),
            _entry("fast-at", 0.952, 0.849, 1.9), _entry("pgd-at", 0.953, 0.859, 3.5),
            _entry("trades", 0.94, 0.85, 3.7)]
    assert [e["recipe"] for e in pareto_front(rows)] == ["none", "fast-at", "pgd-at"]  # lookahead, trades dominated
    pick = recommend(rows)
    assert (pick["recipe"], pick["fraction"]) == ("fast-at", None)  # within 1 point of pgd-at, cheaper
    assert pick["reason"].startswith("pick fast-at: robust 84.9 (adaptive) at 1.90x")
    # a clean-accuracy loss of more than a point excludes a row, and the line says what it would have given
    tabular = [_entry("none", 0.856, 0.69, 1.0), _entry("influence", 0.85, 0.718, 1.7, 0.05),
               _entry("fast-at", 0.838, 0.775, 3.8)]
    pick = recommend(tabular)
    assert (pick["recipe"], pick["fraction"]) == ("influence", 0.05)
    assert "fast-at is more robust (77.5, 3.80x)" in pick["reason"] and "1.8 clean points" in pick["reason"]
