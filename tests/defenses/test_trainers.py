"""Trainers: determinism, no mutation, scratch vs finetune, weights as known answers, PGD-AT / TRADES."""

import pytest
import torch
from torch import nn

from attacks.pgd import pgd_ascent
from attacks.steps import random_delta
from defenses import ERM, PGDAT, TRADES, CheckpointingERM, FastAT, Trainer, per_sample_loss
from defenses.lookahead import LookaheadReweighting
from defenses.references import reference_trainers
from defenses.trainers import copy_for_training
from robust_infl.models import MLP, LogisticRegression

from conftest import flat_params, gaussian_blobs


def _erm(**kw):
    options = dict(epochs=3, lr=0.05, batch_size=16, progress=False)
    options.update(kw)
    return ERM(**options)


def test_fit_returns_new_model_and_leaves_input_untouched():
    model = MLP(5, 2, hidden=(8,))
    before = flat_params(model).clone()
    trained = _erm().fit(model, gaussian_blobs())
    assert trained is not model
    assert torch.equal(flat_params(model), before)
    assert not torch.equal(flat_params(trained), before)
    assert not trained.training


def test_same_seed_same_model_and_other_seed_differs():
    data = gaussian_blobs()
    a = _erm().fit(MLP(5, 2, hidden=(8,)), data, seed=3)
    b = _erm().fit(MLP(5, 2, hidden=(8,)), data, seed=3)
    c = _erm().fit(MLP(5, 2, hidden=(8,)), data, seed=4)
    assert torch.equal(flat_params(a), flat_params(b))
    assert not torch.equal(flat_params(a), flat_params(c))


def test_fit_does_not_disturb_global_rng():
    model, data = MLP(5, 2, hidden=(8,)), gaussian_blobs()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _erm().fit(model, data, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_scratch_reinitialises_and_finetune_continues():
    data = gaussian_blobs()
    torch.manual_seed(0)
    m1 = MLP(5, 2, hidden=(8,))
    torch.manual_seed(1)
    m2 = MLP(5, 2, hidden=(8,))
    # scratch ignores the starting weights: two different inits give the same result under one seed
    assert torch.equal(flat_params(_erm().fit(m1, data, seed=7)), flat_params(_erm().fit(m2, data, seed=7)))
    # finetune starts from the given weights: a tiny learning rate stays next to them
    tuned = _erm(retrain="finetune", lr=1e-6, epochs=1).fit(m1, data, seed=7)
    assert torch.allclose(flat_params(tuned), flat_params(m1), atol=1e-4)
    assert not torch.allclose(flat_params(_erm(lr=1e-6, epochs=1).fit(m1, data, seed=7)), flat_params(m1), atol=1e-4)


def test_zero_one_weights_equal_training_on_the_subset():
    """Full-batch SGD: mean-1 normalised 0/1 weights give exactly the gradient of the subset's mean loss."""
    X, y = gaussian_blobs(n=40)
    keep = torch.arange(40) % 3 != 0
    model = LogisticRegression(5, 1)
    sgd = dict(optimizer="sgd", lr=0.1, epochs=20, retrain="finetune")
    weighted = _erm(batch_size=40, **sgd).fit(model, (X, y), weights=keep.float())
    subset = _erm(batch_size=int(keep.sum()), **sgd).fit(model, (X[keep], y[keep]))
    assert torch.allclose(flat_params(weighted), flat_params(subset), atol=1e-5)


def test_integer_weights_equal_duplicated_samples():
    X, y = gaussian_blobs(n=30)
    counts = (torch.arange(30) % 3).long()  # 0, 1 or 2 copies
    model = MLP(5, 2, hidden=(6,))
    sgd = dict(optimizer="sgd", lr=0.05, epochs=15, retrain="finetune")
    weighted = _erm(batch_size=30, **sgd).fit(model, (X, y), weights=counts.float())
    dup = torch.repeat_interleave(torch.arange(30), counts)
    duplicated = _erm(batch_size=len(dup), **sgd).fit(model, (X[dup], y[dup]))
    assert torch.allclose(flat_params(weighted), flat_params(duplicated), atol=1e-5)


def test_per_sample_loss_matches_torch_losses():
    logits = torch.randn(7, 3)
    y = torch.randint(0, 3, (7,))
    assert torch.allclose(per_sample_loss(logits, y), nn.CrossEntropyLoss(reduction="none")(logits, y))
    z = torch.randn(7, 1)
    yb = torch.randint(0, 2, (7,))
    expected = nn.BCEWithLogitsLoss(reduction="none")(z.squeeze(1), yb.float())
    assert torch.allclose(per_sample_loss(z, yb), expected)


def test_hooks_see_every_step_and_epoch():
    seen = []

    class Recorder(ERM):
        def begin_fit(self, model, train, val, *, seed, steps_per_epoch):
            seen.append(("fit", steps_per_epoch, val is not None))

        def begin_step(self, model, *, step, epoch):
            seen.append((step, epoch))

    data = gaussian_blobs(n=40)
    Recorder(epochs=2, lr=0.01, batch_size=16, progress=False).fit(MLP(5, 2, hidden=(4,)), data, val=data)
    assert seen == [("fit", 3, True)] + [(s, s // 3) for s in range(6)]


def test_pgd_points_match_the_closed_form_worst_case_of_a_linear_model():
    """For a linear score w.x + b the linf worst case is x - eps * sign(w) * (2y - 1)."""
    X, y = gaussian_blobs(n=32)
    model = LogisticRegression(5, 1)
    trainer = PGDAT(eps=0.3, steps=10, bounds=None, epochs=1, lr=0.1, batch_size=32, progress=False)
    trainer.begin_fit(model, (X, y), None, seed=0, steps_per_epoch=1)
    x_adv = trainer.adversarial_points(model, X, y)
    w = model.linear.weight.detach().reshape(-1)
    expected = X - 0.3 * torch.sign(w) * (2 * y.float() - 1).unsqueeze(1)
    assert torch.allclose(x_adv, expected, atol=1e-6)


def test_l2_ball_and_bounds_are_respected():
    X = torch.rand(16, 1, 4, 4)
    y = torch.randint(0, 3, (16,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    start = torch.randn_like(X)
    x_adv = pgd_ascent(lambda z: per_sample_loss(model(z), y), X, eps=0.5, alpha=0.2, steps=5, norm="l2",
                       bounds=(0.0, 1.0), start=start, iterate="delta")
    assert ((x_adv - X).flatten(1).norm(dim=1) <= 0.5 + 1e-5).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (per_sample_loss(model(x_adv), y) >= per_sample_loss(model(X), y) - 1e-6).all()


def test_fast_at_points_are_one_fgsm_step_from_a_uniform_start_inside_ball_and_bounds():
    """Wong et al. (2020): x + clip(delta0 + 1.25 eps sign(grad), -eps, eps), clipped to [0, 1]."""
    g = torch.Generator().manual_seed(3)
    X, y = torch.rand(32, 1, 4, 4, generator=g), torch.randint(0, 3, (32,), generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3))
    eps = 0.1
    fast = FastAT(eps=eps, epochs=1, lr=0.1, batch_size=32, progress=False)
    assert (fast.steps, fast.alpha) == (1, pytest.approx(1.25 * eps))
    fast.begin_fit(model, (X, y), None, seed=5, steps_per_epoch=1)
    x_fast = fast.adversarial_points(model, X, y)

    start = random_delta(torch.empty(X.shape), eps, "linf", torch.Generator().manual_seed(5))
    start = (X + start).clamp(0, 1) - X
    z = (X + start).requires_grad_(True)
    (grad,) = torch.autograd.grad(per_sample_loss(model(z), y).sum(), z)
    expected = (X + (start + 1.25 * eps * grad.sign()).clamp(-eps, eps)).clamp(0, 1)
    torch.testing.assert_close(x_fast, expected, atol=1e-6, rtol=0)
    assert float((x_fast - X).abs().max()) <= eps + 1e-6
    assert float(x_fast.min()) >= 0.0 and float(x_fast.max()) <= 1.0

    pgd = PGDAT(eps=eps, steps=5, epochs=1, lr=0.1, batch_size=32, progress=False)
    pgd.begin_fit(model, (X, y), None, seed=5, steps_per_epoch=1)
    x_pgd = pgd.adversarial_points(model, X, y)
    assert float((x_fast - x_pgd).abs().max()) > 1e-3  # one big step is not five small ones
    with torch.no_grad():
        assert float(per_sample_loss(model(x_pgd), y).mean()) >= float(per_sample_loss(model(x_fast), y).mean()) - 1e-6


ROBUSTNESS_SCHEDULE = dict(epochs=30, lr=0.05, batch_size=50, progress=False)


def _non_robust_margin():
    """``(X, y, erm, robust_acc)``: feature 0 separates the classes by a margin smaller than eps = 0.3, feature 1
    is noisier but robust; ``erm`` is plainly trained on it, ``robust_acc(model)`` is accuracy under 10-step PGD."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (200,), generator=g)
    sign = 2 * y.float() - 1
    X = torch.stack([0.25 * sign + 0.05 * torch.randn(200, generator=g),
                     sign + 0.7 * torch.randn(200, generator=g)], dim=1)
    erm = ERM(**ROBUSTNESS_SCHEDULE).fit(MLP(2, 2, hidden=(16,)), (X, y))
    probe = PGDAT(eps=0.3, steps=10, bounds=None, **ROBUSTNESS_SCHEDULE)
    probe.begin_fit(None, None, None, seed=1, steps_per_epoch=1)

    def robust_acc(m):
        return (m(probe.adversarial_points(m, X, y)).argmax(1) == y).float().mean().item()

    return X, y, erm, robust_acc


def test_fast_at_trains_deterministically_and_is_more_robust_than_erm():
    X, y, erm, robust_acc = _non_robust_margin()
    fast = FastAT(eps=0.3, bounds=None, **ROBUSTNESS_SCHEDULE)
    first = fast.fit(MLP(2, 2, hidden=(16,)), (X, y), seed=1)
    assert torch.equal(flat_params(first), flat_params(fast.fit(MLP(2, 2, hidden=(16,)), (X, y), seed=1)))
    assert robust_acc(first) > robust_acc(erm) + 0.2


def test_pgd_at_is_more_robust_than_erm_on_its_own_attack():
    X, y, erm, robust_acc = _non_robust_margin()
    pgd = PGDAT(eps=0.3, steps=5, bounds=None, **ROBUSTNESS_SCHEDULE).fit(MLP(2, 2, hidden=(16,)), (X, y))
    assert robust_acc(pgd) > robust_acc(erm) + 0.2


def test_trades_with_beta_zero_is_erm():
    data = gaussian_blobs(n=48)
    options = dict(epochs=2, lr=0.05, batch_size=16, progress=False)
    erm = ERM(**options).fit(MLP(5, 2, hidden=(8,)), data, seed=2)
    trades = TRADES(eps=0.3, beta=0.0, steps=2, bounds=None, **options).fit(MLP(5, 2, hidden=(8,)), data, seed=2)
    assert torch.allclose(flat_params(erm), flat_params(trades), atol=1e-6)


def test_trades_points_increase_the_kl_and_one_logit_models_work():
    X, y = gaussian_blobs(n=32)
    model = LogisticRegression(5, 1)
    trainer = TRADES(eps=0.5, steps=5, bounds=None, epochs=1, lr=0.1, batch_size=32, progress=False)
    trainer.begin_fit(model, (X, y), None, seed=0, steps_per_epoch=1)
    x_adv = trainer.adversarial_points(model, X)
    p, q = torch.sigmoid(model(X)), torch.sigmoid(model(x_adv))
    kl = p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))
    assert (kl >= -1e-6).all() and kl.mean() > 1e-3
    trained = trainer.fit(model, (X, y), seed=0)
    assert torch.isfinite(flat_params(trained)).all()


def test_scratch_refuses_parameters_it_cannot_reset():
    class Bare(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(5, 2))

        def forward(self, x):
            return x @ self.w

    with pytest.raises(ValueError, match="^retrain: 'scratch' cannot re-initialise w"):
        copy_for_training(Bare(), "scratch", 0)
    assert isinstance(copy_for_training(Bare(), "finetune", 0), Bare)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(epochs=0), "^epochs: must be >= 1"),
        (dict(lr=-1.0), "^lr: must be a finite number > 0"),
        (dict(batch_size=0), "^batch_size: must be >= 1"),
        (dict(optimizer="rmsprop"), "^optimizer: must be one of"),
        (dict(retrain="warm"), "^retrain: must be one of"),
        (dict(weight_decay=-0.1), "^weight_decay: must be a finite number >= 0"),
        (dict(lr_schedule="step"), "^lr_schedule: must be one of"),
    ],
)
def test_constructor_validation(kwargs, message):
    options = dict(epochs=1, lr=0.1, batch_size=4, progress=False)
    options.update(kwargs)
    with pytest.raises(ValueError, match=message):
        ERM(**options)


def test_fit_validation():
    trainer = _erm()
    X, y = gaussian_blobs(n=10)
    with pytest.raises(ValueError, match="^weights: need one weight per training sample"):
        trainer.fit(MLP(5, 2), (X, y), weights=torch.ones(9))
    with pytest.raises(ValueError, match="^weights: must be finite and >= 0"):
        trainer.fit(MLP(5, 2), (X, y), weights=-torch.ones(10))
    with pytest.raises(ValueError, match="^weights: at least one weight"):
        trainer.fit(MLP(5, 2), (X, y), weights=torch.zeros(10))
    with pytest.raises(TypeError, match="^model: must be a torch.nn.Module"):
        trainer.fit("mlp", (X, y))
    with pytest.raises(ValueError, match=r"^train: X and y have different lengths \(10 vs 5\)"):
        trainer.fit(MLP(5, 2), (X, y[:5]))
    with pytest.raises(ValueError, match="^eps: must be a finite number > 0"):
        PGDAT(eps=-1, epochs=1, lr=0.1, batch_size=4)
    assert isinstance(trainer, Trainer)


def _same_weights(state: dict, model: nn.Module) -> bool:
    return state.keys() == model.state_dict().keys() and all(
        torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_checkpoints_are_the_weights_of_shorter_erm_runs_and_training_is_erms():
    torch.manual_seed(0)
    X, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    model = MLP(5, 3, hidden=(6,))
    schedule = dict(lr=0.01, batch_size=8, progress=False)
    trainer = CheckpointingERM(n_checkpoints=3, epochs=6, **schedule)
    trained = trainer.fit(model, (X, y), seed=3)
    assert len(trainer.checkpoints) == 3
    for checkpoint, epochs in zip(trainer.checkpoints, (2, 4, 6)):  # same seed: the same steps, stopped earlier
        assert _same_weights(checkpoint, ERM(epochs=epochs, **schedule).fit(model, (X, y), seed=3))
    assert _same_weights(trainer.checkpoints[-1], trained)
    trainer.fit(model, (X, y), seed=4)
    assert len(trainer.checkpoints) == 3 and not _same_weights(trainer.checkpoints[-1], trained)  # the latest fit's


@pytest.mark.parametrize("n_checkpoints, error", [(0, ValueError), (7, ValueError), (2.0, TypeError), (True, TypeError)])
def test_checkpoint_count_is_checked_against_the_epochs(n_checkpoints, error):
    with pytest.raises(error, match="^n_checkpoints: must be"):
        CheckpointingERM(n_checkpoints=n_checkpoints, epochs=6)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_cosine_schedule_is_torchs_cosine_annealing_stepped_every_batch(optimizer):
    X, y = gaussian_blobs(n=40, classes=3)
    start = copy_for_training(MLP(5, 3, hidden=(6,)), "scratch", 7)
    epochs, batch, lr, decay = 3, 16, 0.05, 1e-3
    trainer = ERM(epochs=epochs, lr=lr, batch_size=batch, optimizer=optimizer, weight_decay=decay,
                  lr_schedule="cosine", retrain="finetune", progress=False)
    trained = trainer.fit(start, (X, y), seed=7)
    # the same run by hand: torch's optimizer and CosineAnnealingLR(T_max = all steps), the trainer's data order
    model = copy_for_training(start, "finetune", 0)
    params = list(model.parameters())
    opt = (torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=decay) if optimizer == "sgd"
           else torch.optim.Adam(params, lr=lr, weight_decay=decay))
    steps = epochs * 3  # 40 samples in batches of 16
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    order_generator = torch.Generator().manual_seed(7)
    seen = []
    for _ in range(epochs):
        order = torch.randperm(40, generator=order_generator)
        for start_at in range(0, 40, batch):
            idx = order[start_at:start_at + batch]
            opt.zero_grad()
            per_sample_loss(model(X[idx]), y[idx]).mean().backward()
            seen.append(opt.param_groups[0]["lr"])
            opt.step()
            scheduler.step()
    assert seen[0] == lr and 0 < seen[-1] < 0.05 * lr
    assert torch.allclose(flat_params(trained), flat_params(model), atol=1e-6)
    constant = ERM(epochs=epochs, lr=lr, batch_size=batch, optimizer=optimizer, weight_decay=decay,
                   retrain="finetune", progress=False).fit(start, (X, y), seed=7)
    assert not torch.allclose(flat_params(constant), flat_params(trained), atol=1e-4)


def test_derived_trainers_inherit_the_learning_rate_schedule():
    base = ERM(epochs=3, lr=0.05, optimizer="sgd", weight_decay=5e-4, lr_schedule="cosine", progress=False)
    references = reference_trainers(base, ["fast-at", "pgd-at", "trades"], eps=0.1, norm="linf", bounds=(0, 1),
                                    train_steps=2)
    lookahead = LookaheadReweighting(base, attack=lambda model, x, y: x)
    for derived in (*references.values(), lookahead):
        assert (derived.lr_schedule, derived.lr, derived.epochs, derived.optimizer, derived.weight_decay) == \
            ("cosine", 0.05, 3, "sgd", 5e-4)
