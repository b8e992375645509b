"""Own attacks (FGSM, PGD, LinearClosedForm): budgets, bounds, closed-form answers, restarts,
seeding, model-state hygiene and argument validation."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attacks import FGSM, PGD, LinearClosedForm, per_sample_loss, predict
from robust_infl.models import MLP, LogisticRegression, SmallCNN

from conftest import uniform_batch

N_FEATURES = 6


def tabular_mlp(num_classes=3, seed=0):
    torch.manual_seed(seed)
    return MLP(N_FEATURES, num_classes, hidden=(16,))


def tabular_batch(n=40, seed=0, num_classes=3):
    return uniform_batch(n, N_FEATURES, seed, num_classes)


# ---------------------------------------------------------------- budgets and bounds

BOUND_KINDS = ("none", "floats", "per_feature")


def make_bounds(kind, x):
    if kind == "none":
        return None
    if kind == "floats":
        return (0.0, 1.0)
    # Tight per-feature bounds (the batch's own range) so that they bind.
    return (x.min(dim=0).values, x.max(dim=0).values)


@settings(max_examples=30, deadline=None)
@given(norm=st.sampled_from(["linf", "l2"]), eps=st.floats(1e-3, 2.0),
       kind=st.sampled_from(BOUND_KINDS), use_pgd=st.booleans(), seed=st.integers(0, 1000))
def test_budget_and_bounds_hold(norm, eps, kind, use_pgd, seed):
    model = tabular_mlp(seed=seed % 7)
    x, y = tabular_batch(seed=seed)
    bounds = make_bounds(kind, x)
    attack = (PGD(eps, steps=3, norm=norm, bounds=bounds, seed=seed) if use_pgd
              else FGSM(eps, norm=norm, bounds=bounds))
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps + 1e-6
    if bounds is not None:
        low, high = (torch.as_tensor(b) for b in bounds)
        assert bool((x_adv >= low - 1e-6).all()) and bool((x_adv <= high + 1e-6).all())


def test_budget_holds_on_images_with_random_start():
    model = SmallCNN(image_size=8)
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    for norm, eps in (("linf", 0.1), ("l2", 1.5)):
        x_adv = PGD(eps, steps=4, norm=norm, restarts=2)(model, x, y)
        delta = (x_adv - x).flatten(1)
        size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= eps + 1e-6
        assert 0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0


def test_unbounded_pgd_on_standardised_features_uses_the_full_budget():
    model = tabular_mlp()
    x = torch.randn(30, N_FEATURES, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 3, (30,), generator=torch.Generator().manual_seed(3))
    x_adv = PGD(0.5, steps=10, norm="l2", bounds=None)(model, x, y)
    norms = (x_adv - x).norm(dim=1)
    assert float(norms.max()) <= 0.5 + 1e-6
    assert float(norms.min()) > 0.45  # nothing clips an unbounded l2 step: it ends near the sphere


def test_pgd_increases_the_loss_and_beats_fgsm_per_step_budget():
    model = tabular_mlp()
    x, y = tabular_batch(n=200)
    with torch.no_grad():
        clean = per_sample_loss(model(x), y)
        fgsm = per_sample_loss(model(FGSM(0.2)(model, x, y)), y)
        pgd = per_sample_loss(model(PGD(0.2, steps=10)(model, x, y)), y)
    assert float(fgsm.mean()) > float(clean.mean())
    assert float(pgd.mean()) >= float(fgsm.mean())


def test_fgsm_matches_the_closed_form_sign_step():
    model = tabular_mlp()
    x, y = tabular_batch()
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(per_sample_loss(model(x_req), y).sum(), x_req)
    expected = (x + 0.05 * grad.sign()).clamp(0, 1)
    assert torch.equal(FGSM(0.05)(model, x, y), expected)
    expected_l2 = (x + 0.3 * grad / grad.norm(dim=1, keepdim=True)).clamp(0, 1)
    torch.testing.assert_close(FGSM(0.3, norm="l2")(model, x, y), expected_l2)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_on_a_one_logit_linear_model_reaches_the_known_optimum(norm):
    # For z = w^T x + b with BCE, the worst case in the ball is x - eps * s * u with s = +1 for
    # label 1 and -1 for label 0, and u = sign(w) (linf) or w / ||w|| (l2).
    model = LogisticRegression(N_FEATURES, 1)
    x, y = tabular_batch(n=100, num_classes=2)
    w = model.linear.weight[0].detach()
    u = w.sign() if norm == "linf" else w / w.norm()
    s = (2 * y - 1).float().unsqueeze(1)
    x_adv = PGD(0.4, steps=5, norm=norm, bounds=None, random_start=False)(model, x, y)
    torch.testing.assert_close(x_adv, x - 0.4 * s * u)
    with torch.no_grad():
        margin = (model(x)[:, 0] * s[:, 0]) / (w.abs().sum() if norm == "linf" else w.norm())
        wrong = predict(model(x_adv)) != y
    assert torch.equal(wrong, margin < 0.4)


# ---------------------------------------------------------------- closed form

def test_closed_form_binary_matches_the_paper_formula_and_flips_every_point():
    model = LogisticRegression(N_FEATURES, 1)
    x, y = tabular_batch(n=64, num_classes=2)
    x_adv = LinearClosedForm(overshoot=0.3, labels="predicted")(model, x, y)  # the paper's variant
    w, b = model.linear.weight[0].detach(), model.linear.bias.detach()
    z = x @ w + b
    expected = x - (1.3 * z / w.dot(w)).unsqueeze(1) * w
    torch.testing.assert_close(x_adv, expected)
    with torch.no_grad():
        assert bool((predict(model(x_adv)) != predict(model(x))).all())
        torch.testing.assert_close(model(x_adv)[:, 0], -0.3 * z)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_closed_form_multiclass_moves_to_the_nearest_other_class(num_classes):
    model = LogisticRegression(N_FEATURES, num_classes)
    x, y = tabular_batch(n=64, num_classes=num_classes)
    x_adv = LinearClosedForm(overshoot=0.1, labels="predicted")(model, x, y)  # the paper's variant
    # Brute force with the explicit weights, one sample at a time.
    W, b = model.linear.weight.detach(), model.linear.bias.detach()
    for i in range(len(x)):
        z = W @ x[i] + b
        c = int(z.argmax())
        best = None
        for k in range(num_classes):
            if k == c:
                continue
            f, w = z[k] - z[c], W[k] - W[c]
            distance = float(f.abs() / w.norm())
            if best is None or distance < best[0]:
                best = (distance, f, w)
        _, f, w = best
        torch.testing.assert_close(x_adv[i], x[i] - 1.1 * f / w.dot(w) * w)
    with torch.no_grad():
        assert bool((predict(model(x_adv)) != predict(model(x))).all())


@pytest.mark.parametrize("num_classes", [1, 4])
def test_closed_form_with_true_labels_moves_only_the_correct_points_so_robust_acc_is_a_lower_bound(num_classes):
    model = LogisticRegression(N_FEATURES, num_classes)
    x, y = tabular_batch(n=64, num_classes=max(num_classes, 2))
    with torch.no_grad():
        correct = predict(model(x)) == y
    assert 0 < int(correct.sum()) < len(x)
    x_adv = LinearClosedForm(overshoot=0.3)(model, x, y)
    paper = LinearClosedForm(overshoot=0.3, labels="predicted")(model, x, y)
    torch.testing.assert_close(x_adv[correct], paper[correct])  # the same move where prediction = label
    assert torch.equal(x_adv[~correct], x[~correct])  # misclassified points stay as they are
    with torch.no_grad():
        assert not bool((predict(model(x_adv)) == y).any())  # a linear model: every point ends up wrong


def _deepfool_step_by_hand(model, x_i, overshoot):
    """One linearised DeepFool step for one point, by autograd class by class: the nearest other class's
    logit difference f and its gradient w, x - (1 + overshoot) * f / ||w||^2 * w."""
    x_i = x_i.unsqueeze(0).requires_grad_(True)
    logits = model(x_i)[0]
    c = int(logits.argmax())
    best = None
    for k in range(logits.shape[0]):
        if k != c:
            f = logits[k] - logits[c]
            (w,) = torch.autograd.grad(f, x_i, retain_graph=True)
            f = f.detach()
            if best is None or abs(float(f)) / float(w.norm()) < abs(float(best[0])) / float(best[1].norm()):
                best = (f, w)
    f, w = best
    return (x_i - (1 + overshoot) * f / w.pow(2).sum() * w).detach()[0]


def test_closed_form_on_a_nonlinear_model_is_one_linearised_deepfool_step():
    torch.manual_seed(0)
    model = SmallCNN(image_size=8).eval()
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(dim=1)  # every point classified correctly, so every point moves
    x_adv = LinearClosedForm(overshoot=0.3)(model, x, y)
    expected = torch.stack([_deepfool_step_by_hand(model, x[i], 0.3) for i in range(5)])
    torch.testing.assert_close(x_adv, expected, rtol=1e-4, atol=1e-6)
    assert bool(((x_adv - x).flatten(1).norm(dim=1) > 0).all())


# ---------------------------------------------------------------- restarts and seeds

def test_restarts_keep_the_worst_case_per_sample():
    model = tabular_mlp()
    x, y = tabular_batch(n=300)
    single = PGD(0.15, steps=2, restarts=1, seed=5)(model, x, y)
    multi = PGD(0.15, steps=2, restarts=4, seed=5)(model, x, y)  # restart 0 draws the same start
    with torch.no_grad():
        wrong_single, wrong_multi = predict(model(single)) != y, predict(model(multi)) != y
        loss_single, loss_multi = per_sample_loss(model(single), y), per_sample_loss(model(multi), y)
    assert bool((wrong_multi | ~wrong_single).all())
    both_right = ~wrong_single & ~wrong_multi
    assert bool((loss_multi[both_right] >= loss_single[both_right] - 1e-6).all())
    assert not torch.equal(single, multi)


def test_same_seed_same_output_and_global_rng_untouched():
    model = SmallCNN(image_size=8)
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    state = torch.get_rng_state()
    first = PGD(0.1, steps=2, restarts=2, seed=3)(model, x, y)
    assert torch.equal(first, PGD(0.1, steps=2, restarts=2, seed=3)(model, x, y))
    assert not torch.equal(first, PGD(0.1, steps=2, restarts=2, seed=4)(model, x, y))
    assert torch.equal(state, torch.get_rng_state())


# ---------------------------------------------------------------- model state

class DropoutNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(N_FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.body(x))


@pytest.mark.parametrize("attack", [FGSM(0.1), PGD(0.1, steps=2), LinearClosedForm()], ids=repr)
def test_mode_grads_and_requires_grad_are_restored(attack):
    model = DropoutNet()
    model.train()
    model.body[3].eval()  # mixed modes must survive as they were
    model.head.bias.requires_grad_(False)
    model.head.weight.grad = torch.ones_like(model.head.weight)
    x, y = tabular_batch()
    running_mean = model.body[1].running_mean.clone()
    x_adv = attack(model, x, y)
    assert model.training and model.body[0].training and not model.body[3].training
    assert model.head.weight.requires_grad and not model.head.bias.requires_grad
    assert torch.equal(model.head.weight.grad, torch.ones_like(model.head.weight))
    assert all(p.grad is None for name, p in model.named_parameters() if name != "head.weight")
    assert torch.equal(model.body[1].running_mean, running_mean)  # eval mode: BN stats untouched
    assert torch.equal(attack(model, x, y), x_adv)  # dropout off: deterministic


def test_attacks_work_inside_no_grad():
    model = tabular_mlp()
    x, y = tabular_batch()
    with torch.no_grad():
        x_adv = PGD(0.1, steps=2)(model, x, y)
    assert not torch.equal(x_adv, x)


def test_empty_batch_returns_empty():
    x, y = torch.rand(0, N_FEATURES), torch.zeros(0, dtype=torch.long)
    assert PGD(0.1)(tabular_mlp(), x, y).shape == (0, N_FEATURES)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("build, argument", [
    (lambda: PGD(-1), "eps"),
    (lambda: FGSM(-0.1), "eps"),
    (lambda: PGD(math.nan), "eps"),
    (lambda: PGD(0.1, norm="l1"), "norm"),
    (lambda: FGSM(0.1, norm="inf"), "norm"),
    (lambda: PGD(0.1, steps=0), "steps"),
    (lambda: PGD(0.1, restarts=0), "restarts"),
    (lambda: PGD(0.1, alpha=-1.0), "alpha"),
    (lambda: PGD(0.1, seed=-1), "seed"),
    (lambda: PGD(0.1, bounds=(1.0, 0.0)), "bounds"),
    (lambda: PGD(0.1, bounds=(0.0,)), "bounds"),
    (lambda: PGD(0.1, bounds=(torch.ones(3), torch.zeros(3))), "bounds"),
    (lambda: LinearClosedForm(overshoot=-0.5), "overshoot"),
])
def test_bad_arguments_raise_value_error_naming_the_argument(build, argument):
    with pytest.raises(ValueError, match=f"^{argument}:"):
        build()


@pytest.mark.parametrize("build, argument", [
    (lambda: PGD("0.1"), "eps"),
    (lambda: PGD(0.1, steps=2.5), "steps"),
    (lambda: PGD(0.1, bounds=("a", 1.0)), "bounds"),
])
def test_bad_argument_types_raise_type_error_naming_the_argument(build, argument):
    with pytest.raises(TypeError, match=f"^{argument}:"):
        build()


def test_bad_calls_raise_errors_naming_the_argument():
    model = tabular_mlp()
    x, y = tabular_batch()
    attack = PGD(0.1, steps=1)
    with pytest.raises(ValueError, match="^bounds:.*broadcast"):
        PGD(0.1, bounds=(torch.zeros(4), torch.ones(4)))(model, x, y)
    with pytest.raises(ValueError, match="^y:"):
        attack(model, x, y[:-1])
    with pytest.raises(ValueError, match="^y:"):
        attack(model, x, y + 3)  # labels beyond the model's 3 classes
    with pytest.raises(TypeError, match="^y:"):
        attack(model, x, y.float())
    with pytest.raises(TypeError, match="^x:"):
        attack(model, x.long(), y)
    with pytest.raises(ValueError, match="^x:"):
        attack(model, x + 2.0, y)  # outside the (0, 1) bounds
    with pytest.raises(TypeError, match="^model:"):
        attack(lambda t: t, x, y)
    with pytest.raises(ValueError, match="^model:.*meta"):
        attack(tabular_mlp().to("meta"), x, y)
