"""Models in the wrong state: BatchNorm / Dropout left in train mode (results as in eval mode, every
submodule's mode restored, running statistics untouched) and models that return NaN (a ValueError
naming ``model`` instead of NaN results)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import attacks
import robust_infl as ri

from conftest import uniform_batch

N_FEATURES, N_CLASSES = 4, 3
NAN_MARKER = 50.0  # inputs whose first feature is this make NaNModel return NaN


def batchnorm_dropout_model() -> nn.Module:
    """A small MLP with BatchNorm and Dropout whose running statistics are not the defaults."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(N_FEATURES, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5),
                          nn.Linear(8, N_CLASSES))
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, N_FEATURES) * 2 + 1)
    return model


def data(n=12, seed=0):
    return uniform_batch(n, N_FEATURES, seed, N_CLASSES)


def set_mixed_modes(model: nn.Module) -> dict:
    """Whole model in train mode except the BatchNorm layer; returns each submodule's mode."""
    model.train()
    model[1].eval()
    return {name: m.training for name, m in model.named_modules()}


def state_copy(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


METHOD_CASES = {
    "ip": {},
    "ip-ensemble": dict(members=3, perturbation="gaussian"),
    "tracin": dict(checkpoints="model", lrs=0.5),
    "if-exact": dict(damping=0.1),
    "loss": {},
    "self": {},
}


@pytest.mark.parametrize("method", sorted(METHOD_CASES))
def test_influence_scores_in_eval_mode_and_restores_every_mode(method):
    model = batchnorm_dropout_model()
    train, target = data(12, 0), data(6, 1)
    options = dict(METHOD_CASES[method])
    if options.get("checkpoints") == "model":
        options["checkpoints"] = [state_copy(model)]
    reference_model = copy.deepcopy(model).eval()
    expected = ri.influence(reference_model, train, target, objective=ri.Utility(), method=method, progress=False,
                            **options)
    modes, before = set_mixed_modes(model), state_copy(model)
    scores = ri.influence(model, train, target, objective=ri.Utility(), method=method, progress=False, **options)
    assert torch.equal(scores, expected)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("attack", [attacks.PGD(0.1, steps=3, seed=1), attacks.FGSM(0.1),
                                    attacks.LinearClosedForm()], ids=["pgd", "fgsm", "linear"])
def test_attacks_run_in_eval_mode_and_restore_every_mode(attack):
    model = batchnorm_dropout_model()
    x, y = data()
    expected = attack(copy.deepcopy(model).eval(), x, y)
    modes, before = set_mixed_modes(model), state_copy(model)
    assert torch.equal(attack(model, x, y), expected)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_evaluate_runs_in_eval_mode_and_restores_every_mode():
    model = batchnorm_dropout_model()
    x, y = data(20)
    chosen = {"pgd": attacks.PGD(0.2, steps=3, seed=0)}
    expected = attacks.evaluate(copy.deepcopy(model).eval(), (x, y), chosen, batch_size=8, progress=False)
    modes, before = set_mixed_modes(model), state_copy(model)
    assert attacks.evaluate(model, (x, y), chosen, batch_size=8, progress=False) == expected
    assert attacks.accuracy(model, x, y) == expected["clean_acc"]
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_loss_baseline_scores_in_eval_mode_and_restores_every_mode():
    from defenses.recipes import DefenceContext, training_loss_scores

    model = batchnorm_dropout_model()
    train = data(20)

    def scores(m):
        return training_loss_scores(DefenceContext(model=m, train=train, val=train, trainer=None, attack=None,
                                                   seed=0), batch_size=8)

    expected = scores(copy.deepcopy(model).eval())
    modes, before = set_mixed_modes(model), state_copy(model)
    assert torch.equal(scores(model), expected)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class NaNModel(nn.Module):
    """A linear model that returns NaN logits for inputs whose first feature equals ``NAN_MARKER``."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(N_FEATURES, N_CLASSES)

    def forward(self, x):
        out = self.linear(x)
        return out + torch.where(x[:, :1] == NAN_MARKER, float("nan"), 0.0)


def poisoned_data(n: int, poisoned_index: int):
    x, y = data(n)
    x[poisoned_index, 0] = NAN_MARKER
    return x, y


@pytest.mark.parametrize("method, options", [
    ("ip", {}), ("ip", dict(aggregate=False)), ("if-exact", dict(damping=0.1)), ("if-cg", dict(damping=0.1)),
    ("if-lissa", dict(damping=0.1, scale=10.0, depth=2)), ("datainf", {}),
    ("ip-ensemble", dict(perturbation="gaussian")),
    ("loss", {}), ("self", {}),
])
def test_a_model_returning_nan_on_training_samples_is_named(method, options):
    torch.manual_seed(0)
    train = poisoned_data(12, poisoned_index=9)
    where = r"(the training batch starting at index 8|the training set|a sampled training minibatch)"
    with pytest.raises(ValueError, match=rf"^model: produced non-finite .* on {where}$"):
        ri.influence(NaNModel(), train, data(6, 1), objective=ri.Utility(), method=method, batch_size=4,
                     progress=False, **options)


def test_a_model_returning_nan_on_the_target_set_is_named():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match=r"^model: produced non-finite outputs or gradients on the target set"):
        ri.influence(NaNModel(), data(12), poisoned_data(6, 4), objective=ri.Utility(), batch_size=4,
                     progress=False)
    with pytest.raises(ValueError, match=r"^model: produced non-finite outputs on the first train samples"):
        ri.influence(NaNModel(), poisoned_data(12, 0), data(6), objective=ri.Utility(), progress=False)


def test_attacks_and_evaluate_name_a_model_returning_nan():
    torch.manual_seed(0)
    x, y = poisoned_data(12, poisoned_index=5)
    for attack in (attacks.PGD(0.1, steps=2, bounds=None, random_start=False), attacks.FGSM(0.1, bounds=None),
                   attacks.LinearClosedForm()):
        with pytest.raises(ValueError, match=r"^model: produced non-finite outputs"):
            attack(NaNModel(), x, y)
    with pytest.raises(ValueError, match=r"^model: produced non-finite outputs on the batch starting at index 4"):
        attacks.evaluate(NaNModel(), (x, y), {}, batch_size=4, progress=False)
    with pytest.raises(ValueError, match=r"^model: produced non-finite outputs on the batch starting at index 4"):
        attacks.accuracy(NaNModel(), x, y, batch_size=4)
