"""attacks.evaluate and attacks.accuracy against brute-force and known answers."""

import math
import sys

import pytest
import torch
from torch.utils.data import TensorDataset

from attacks import FGSM, PGD, LinearClosedForm, accuracy, evaluate, predict
from robust_infl.models import MLP, LogisticRegression


def binary_linear_problem(n=50):
    """One-logit logistic regression with noisy labels: some points are misclassified."""
    g = torch.Generator().manual_seed(0)
    model = LogisticRegression(4, 1)
    x = torch.rand(n, 4, generator=g)
    with torch.no_grad():
        y = predict(model(x))
    flip = torch.rand(n, generator=g) < 0.2
    return model, x, torch.where(flip, 1 - y, y)


def multiclass_problem(n=61):
    g = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = MLP(4, 3, hidden=(12,))
    x = torch.rand(n, 4, generator=g)
    with torch.no_grad():
        y = predict(model(x))
    y[::4] = (y[::4] + 1) % 3
    return model, x, y


def identity(model, x, y):
    return x.clone()


def test_known_answers_with_identity_and_closed_form_attacks():
    model, x, y = binary_linear_problem()
    with torch.no_grad():
        correct = predict(model(x)) == y
    clean = float(correct.float().mean())
    assert 0.5 < clean < 1.0
    result = evaluate(model, (x, y), {"none": identity, "closed_form": LinearClosedForm()}, progress=False)
    assert result["n"] == len(x)
    assert result["clean_acc"] == pytest.approx(clean)
    assert result["none"] == {"robust_acc": pytest.approx(clean), "asr": 0.0}
    # With the true labels (default) the closed form flips every correct prediction of a linear model
    # and leaves the wrong ones wrong: robust accuracy 0, a lower bound like every other attack's.
    assert result["closed_form"] == {"robust_acc": 0.0, "asr": 1.0}
    assert result["worst_case_robust_acc"] == 0.0
    # The paper's variant moves every point off its PREDICTED class: the wrong become right.
    paper = evaluate(model, (x, y), {"paper": LinearClosedForm(labels="predicted")}, progress=False)
    assert paper["paper"]["robust_acc"] == pytest.approx(1 - clean) and paper["paper"]["asr"] == 1.0


def test_matches_a_brute_force_computation_for_any_batch_size():
    model, x, y = multiclass_problem()
    attacks = {"fgsm": FGSM(0.2), "pgd": PGD(0.2, steps=5, random_start=False)}
    with torch.no_grad():
        clean_ok = predict(model(x)) == y
        robust_ok = {name: predict(model(attack(model, x, y))) == y for name, attack in attacks.items()}
    for batch_size in (7, 256):
        result = evaluate(model, (x, y), attacks, batch_size=batch_size, progress=False)
        assert result["clean_acc"] == pytest.approx(float(clean_ok.float().mean()))
        for name, ok in robust_ok.items():
            assert result[name]["robust_acc"] == pytest.approx(float(ok.float().mean()))
            flipped = (clean_ok & ~ok).sum() / clean_ok.sum()
            assert result[name]["asr"] == pytest.approx(float(flipped))
        all_ok = clean_ok & robust_ok["fgsm"] & robust_ok["pgd"]
        assert result["worst_case_robust_acc"] == pytest.approx(float(all_ok.float().mean()))
        assert result["worst_case_robust_acc"] <= min(result["fgsm"]["robust_acc"], result["pgd"]["robust_acc"])


def test_return_adv_and_data_forms():
    model, x, y = multiclass_problem()
    attacks = {"pgd": PGD(0.2, steps=3, random_start=False)}
    result, adv = evaluate(model, (x, y), attacks, batch_size=16, progress=False, return_adv=True)
    torch.testing.assert_close(adv["pgd"], attacks["pgd"](model, x, y))
    assert accuracy(model, adv["pgd"], y) == pytest.approx(result["pgd"]["robust_acc"])
    s = torch.randint(0, 2, (len(x),))
    assert evaluate(model, (x, y, s), attacks, batch_size=16, progress=False) == result
    assert evaluate(model, TensorDataset(x, y, s), attacks, batch_size=16, progress=False) == result


def test_no_clean_correct_sample_gives_nan_asr():
    model, x, y = binary_linear_problem()
    with torch.no_grad():
        wrong = 1 - predict(model(x))
    result = evaluate(model, (x, wrong), {"none": identity}, progress=False)
    assert result["clean_acc"] == 0.0 and math.isnan(result["none"]["asr"])


def test_accuracy_handles_one_logit_models_and_restores_mode():
    model, x, y = binary_linear_problem()
    model.train()
    with torch.no_grad():
        expected = float(((model(x)[:, 0] > 0).long() == y).float().mean())
    assert accuracy(model, x, y, batch_size=9) == pytest.approx(expected)
    evaluate(model, (x, y), {"fgsm": FGSM(0.1)}, progress=False)
    assert model.training


def test_progress_bar_can_be_switched_off_and_shows_only_on_a_terminal(capsys, monkeypatch):
    model, x, y = binary_linear_problem()
    evaluate(model, (x, y), {"none": identity}, batch_size=10, progress=False)
    assert capsys.readouterr().err == ""
    evaluate(model, (x, y), {"none": identity}, batch_size=10, progress=True)
    assert capsys.readouterr().err == ""  # stderr is not a terminal here (no bars in logs)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    evaluate(model, (x, y), {"none": identity}, batch_size=10, progress=True)
    assert "evaluate" in capsys.readouterr().err


def test_bad_arguments_raise_errors_naming_the_argument():
    model, x, y = binary_linear_problem()
    with pytest.raises(ValueError, match="^attacks:"):
        evaluate(model, (x, y), {"clean_acc": identity}, progress=False)
    with pytest.raises(TypeError, match="^attacks:"):
        evaluate(model, (x, y), [identity], progress=False)
    with pytest.raises(ValueError, match="^attacks:.*'half'"):
        evaluate(model, (x, y), {"half": lambda m, a, b: a[:, :2]}, progress=False)
    with pytest.raises(ValueError, match="^batch_size:"):
        evaluate(model, (x, y), {}, batch_size=0, progress=False)
    with pytest.raises(ValueError, match="^data:"):
        evaluate(model, (x,), {}, progress=False)
    with pytest.raises(ValueError, match="^data:"):
        evaluate(model, (x[:0], y[:0]), {}, progress=False)
    with pytest.raises(ValueError, match=r"^data: X and y have different lengths \(50 vs 49\)"):
        evaluate(model, (x, y[:-1]), {}, progress=False)
    with pytest.raises(TypeError, match="^model:"):
        accuracy(identity, x, y)
