"""Third-party attacks behind the common interface, and own attacks checked against them."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from attacks import ART, FGSM, PGD, AutoAttack, TorchAttacks, accuracy, predict
from robust_infl.models import MLP, LogisticRegression, SmallCNN

from conftest import uniform_batch


@pytest.fixture(scope="module")
def digits_cnn():
    """A SmallCNN trained for a few epochs on 8x8 digits in [0, 1]; held-out 297 images."""
    digits = load_digits()
    X = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(digits.target)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SmallCNN(image_size=8)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(10):
            order = torch.randperm(1500)
            for i in range(0, 1500, 64):
                idx = order[i:i + 64]
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(X[idx]), y[idx]).backward()
                optimizer.step()
    model.eval()
    return model, X[1500:], y[1500:]


def robust_accuracy(model, attack, X, y):
    return accuracy(model, attack(model, X, y), y)


# ---------------------------------------------------------------- own attacks vs peers

@pytest.mark.parametrize("norm, eps, peer", [
    ("linf", 0.05, lambda eps: TorchAttacks("PGD", eps=eps, alpha=eps / 4, steps=10, random_start=False)),
    ("linf", 0.1, lambda eps: TorchAttacks("PGD", eps=eps, alpha=eps / 4, steps=10, random_start=False)),
    ("l2", 0.8, lambda eps: TorchAttacks("PGDL2", eps=eps, alpha=eps / 4, steps=10, random_start=False)),
    ("linf", 0.1, lambda eps: ART("ProjectedGradientDescent", eps=eps, eps_step=eps / 4, max_iter=10)),
    ("l2", 0.8, lambda eps: ART("ProjectedGradientDescent", norm=2, eps=eps, eps_step=eps / 4, max_iter=10)),
])
def test_own_pgd_matches_peer_pgd_within_one_point(digits_cnn, norm, eps, peer):
    model, X, y = digits_cnn
    clean = accuracy(model, X, y)
    own = robust_accuracy(model, PGD(eps, alpha=eps / 4, steps=10, norm=norm, random_start=False), X, y)
    theirs = robust_accuracy(model, peer(eps), X, y)
    print(f"{norm} eps={eps}: clean {clean:.3f} own {own:.3f} peer {theirs:.3f}")
    assert 0.05 < own < clean - 0.1  # a regime where the attack matters
    assert abs(own - theirs) <= 0.01


def test_own_fgsm_equals_torchattacks_fgsm(digits_cnn):
    model, X, y = digits_cnn
    ours = FGSM(0.1)(model, X, y)
    torch.testing.assert_close(ours, TorchAttacks("FGSM", eps=0.1)(model, X, y), atol=1e-6, rtol=0)


# ---------------------------------------------------------------- tabular and one-logit models

def test_adapters_attack_one_logit_tabular_models():
    model = LogisticRegression(5, 1)
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([[3.0, -2.0, 1.0, 0.5, -1.0]]))
        model.linear.bias.fill_(-0.6)
    x, _ = uniform_batch(24, 5)
    y = predict(model(x).detach())  # every point clean-correct
    low, high = x.min(dim=0).values, x.max(dim=0).values
    outputs = {
        "APGD": TorchAttacks("APGD", eps=0.2, steps=5)(model, x, y),
        "ART-FGM": ART("FastGradientMethod", eps=0.2, bounds=(low, high))(model, x, y),
        "AutoAttack": AutoAttack(0.2)(model, x, y),
    }
    for name, x_adv in outputs.items():
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype, name
        assert float((x_adv - x).abs().max()) <= 0.2 + 1e-6, name
        assert accuracy(model, x_adv, y) < 0.9, name
    assert bool((outputs["ART-FGM"] >= low - 1e-6).all() and (outputs["ART-FGM"] <= high + 1e-6).all())


def test_dtypes_round_trip():
    torch.manual_seed(0)
    model = MLP(5, 2, hidden=(8,))
    x, y = uniform_batch(24, 5)
    # ART computes in float32: float64 inputs to a float32 model come back as float64 ...
    assert ART("FastGradientMethod", eps=0.1)(model, x.double(), y).dtype == torch.float64
    # ... torchattacks computes in the model's dtype ...
    assert TorchAttacks("PGD", eps=0.1, steps=2)(model.double(), x.double(), y).dtype == torch.float64
    # ... and ART refuses a float64 model with a clear message.
    with pytest.raises(TypeError, match="^model:"):
        ART("FastGradientMethod", eps=0.1)(model, x.double(), y)


# ---------------------------------------------------------------- seeds and model state

def test_same_seed_same_output_for_third_party_attacks():
    torch.manual_seed(0)
    model = MLP(5, 3, hidden=(16,))
    x, y = uniform_batch(24, 5)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    for build in (lambda s: TorchAttacks("PGD", eps=0.2, steps=2, seed=s),
                  lambda s: ART("ProjectedGradientDescent", eps=0.2, eps_step=0.05, max_iter=2,
                                num_random_init=1, seed=s)):
        first = build(1)(model, x, y)
        assert torch.equal(first, build(1)(model, x, y))
        assert not torch.equal(first, build(2)(model, x, y))
    assert torch.equal(torch_state, torch.get_rng_state())
    assert np.array_equal(numpy_state, np.random.get_state()[1])


@pytest.mark.parametrize("attack", [
    TorchAttacks("PGD", eps=0.1, steps=2),
    AutoAttack(0.5),
    ART("ProjectedGradientDescent", eps=0.1, eps_step=0.05, max_iter=2),
], ids=lambda a: type(a).__name__)
def test_third_party_attacks_restore_mode_and_leave_no_gradients(attack):
    model = nn.Sequential(nn.Linear(5, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    model.train()
    model[0].weight.grad = torch.full_like(model[0].weight, 2.0)
    x, y = uniform_batch(8, 5)
    running_mean = model[1].running_mean.clone()
    attack(model, x, y)
    assert all(m.training for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 2.0))
    assert all(p.grad is None for p in list(model.parameters())[1:])
    assert torch.equal(model[1].running_mean, running_mean)


# ---------------------------------------------------------------- validation

def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match=r"^name: unknown torchattacks attack 'Nope'.*PGD.*Square"):
        TorchAttacks("Nope")
    with pytest.raises(ValueError, match=r"^name: unknown ART evasion attack 'Nope'.*ProjectedGradientDescent"):
        ART("Nope")
    with pytest.raises(ValueError, match="^name:"):
        TorchAttacks("MultiAttack")  # a wrapper, not an attack


def test_bad_adapter_arguments_raise_errors_naming_the_argument():
    torch.manual_seed(0)
    model = MLP(5, 2, hidden=(8,))
    x, y = uniform_batch(24, 5)
    with pytest.raises(TypeError, match="^kwargs: PGD"):
        TorchAttacks("PGD", epsilon=0.1)
    with pytest.raises(TypeError, match="^kwargs: FastGradientMethod"):
        ART("FastGradientMethod", budget=0.1)
    with pytest.raises(ValueError, match="^version:"):
        AutoAttack(0.1, version="fast")
    with pytest.raises(ValueError, match="^norm:"):
        AutoAttack(0.1, norm="l1")
    with pytest.raises(ValueError, match="^eps:"):
        AutoAttack(-0.1)
    with pytest.raises(ValueError, match="^x:"):
        TorchAttacks("PGD", eps=0.1)(model, x * 3, y)
    with pytest.raises(ValueError, match="^bounds:"):
        ART("FastGradientMethod", bounds=(torch.zeros(2), torch.ones(2)))(model, x, y)
    with pytest.raises(ValueError, match="^y:"):
        TorchAttacks("APGD", eps=0.1)(model, x, y + 2)


@pytest.mark.slow  # about 20 s: the authors' full AutoAttack on a superset of the images
def test_autoattack_authors_backend_agrees_with_torchattacks_within_one_point(digits_cnn):
    model, X, y = digits_cnn
    X, y = X[:100], y[:100]
    authors = AutoAttack(0.1, backend="autoattack")(model, X, y)
    theirs = AutoAttack(0.1, backend="torchattacks")(model, X, y)
    pgd = robust_accuracy(model, PGD(0.1, steps=10), X, y)
    assert float((authors - X).abs().max()) <= 0.1 + 1e-6 and 0.0 <= float(authors.min()) <= float(authors.max()) <= 1.0
    assert 0.2 < accuracy(model, authors, y) <= pgd  # a regime where the attack matters, at least as strong as PGD
    assert abs(accuracy(model, authors, y) - accuracy(model, theirs, y)) <= 0.01
    # the authors' code is the default, and it is at least as strong as PGD on the first 12 images alone too
    assert AutoAttack(0.1).backend == "autoattack"
    assert accuracy(model, authors[:12], y[:12]) <= robust_accuracy(model, PGD(0.1, steps=10), X[:12], y[:12])


def test_autoattack_components_run_alone_and_skip_what_the_class_count_forbids(digits_cnn):
    model, X, y = digits_cnn
    X, y = X[:40], y[:40]
    ce = AutoAttack(0.1, components=("apgd-ce",))(model, X, y)
    targeted = AutoAttack(0.1, components=("apgd-t",))(model, X, y)
    assert accuracy(model, ce, y) < accuracy(model, X, y) and accuracy(model, targeted, y) < accuracy(model, X, y)
    binary = LogisticRegression(5, 1)
    x, yb = uniform_batch(24, 5)
    assert torch.equal(AutoAttack(0.2, components=("apgd-t",))(binary, x, yb), x)  # needs >= 4 classes: skipped
    with pytest.raises(ValueError, match="^components:"):
        AutoAttack(0.1, components=("apgd-x",))
    with pytest.raises(ValueError, match="^components:"):
        AutoAttack(0.1, backend="torchattacks", components=("apgd-ce",))
    with pytest.raises(ValueError, match="^backend:"):
        AutoAttack(0.1, backend="cleverhans")
