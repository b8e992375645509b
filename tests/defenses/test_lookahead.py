"""Lookahead reweighting: weights, jvp alignments against brute force, determinism, base-trainer contract."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from defenses import (ERM, PGDAT, TRADES, DefenceContext, LookaheadReweighting, LookaheadWeights, Trainer,
                      available_recipes, per_sample_loss)
from defenses.lookahead import lookahead_weights, validation_attack
from defenses.recipes import get_recipe
from robust_infl.models import MLP

from conftest import centred_blobs, flat_params


def _erm(**kw):
    options = dict(epochs=3, lr=0.02, batch_size=16, progress=False)
    options.update(kw)
    return ERM(**options)


def _pgdat(**kw):
    options = dict(eps=0.3, norm="l2", steps=2, bounds=None, epochs=2, lr=0.02, batch_size=16, progress=False)
    options.update(kw)
    return PGDAT(**options)


@pytest.fixture
def setup(fgsm_attack):
    train, val = centred_blobs(96, seed=0), centred_blobs(40, seed=1)
    return train, val, fgsm_attack(0.2)


@pytest.mark.parametrize("scheme", ["positive", "sign"])
@pytest.mark.parametrize("mix", [0.0, 0.25, 1.0])
def test_weights_are_nonnegative_with_mean_one(scheme, mix):
    alignment = torch.randn(50, generator=torch.Generator().manual_seed(0))
    w = lookahead_weights(alignment, mix=mix, scheme=scheme)
    assert (w >= 0).all()
    assert torch.isclose(w.mean(), torch.tensor(1.0))
    if mix == 1.0:
        assert (w[alignment <= 0] == 0).all()
        expected = alignment.clamp_min(0) if scheme == "positive" else (alignment > 0).float()
        assert torch.allclose(w, expected / expected.mean())


def test_per_class_weights_have_mean_one_in_every_class_and_no_signal_gives_uniform():
    g = torch.Generator().manual_seed(1)
    alignment, labels = torch.randn(60, generator=g), torch.randint(0, 4, (60,), generator=g)
    w = lookahead_weights(alignment, mix=1.0, labels=labels)
    for c in range(4):
        assert torch.isclose(w[labels == c].mean(), torch.tensor(1.0))
    assert torch.equal(lookahead_weights(-alignment.abs(), mix=1.0), torch.ones(60))


def test_alignments_equal_brute_force_per_sample_gradient_dot_products(setup):
    train, val, attack = setup
    model = MLP(5, 3, hidden=(7,))
    direction = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    hook = LookaheadWeights(model, val, attack)
    x, y = train[0][:12], train[1][:12]
    fast = hook.alignments(x, y, direction)
    brute = []
    for i in range(12):
        grads = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        brute.append(sum((g * direction[name]).sum() for g, (name, _) in zip(grads, model.named_parameters())))
    assert torch.allclose(fast, torch.stack(brute), atol=1e-5, rtol=1e-4)


def test_validation_gradient_is_the_gradient_of_the_loss_at_the_attacked_validation_points(setup):
    train, val, attack = setup
    model = MLP(5, 3, hidden=(7,))
    for objective in ("adversarial", "clean+adversarial"):
        v = LookaheadWeights(model, val, attack, n_val_batch=1000, val_objective=objective).validation_gradient()
        x_adv = attack(model, *val)
        loss = F.cross_entropy(model(x_adv), val[1])
        if objective == "clean+adversarial":
            loss = (loss + F.cross_entropy(model(val[0]), val[1])) / 2
        expected = torch.autograd.grad(loss, list(model.parameters()))
        for (name, _), g in zip(model.named_parameters(), expected):
            assert torch.allclose(v[name], g, atol=1e-6)


def test_alignments_downweight_flipped_labels():
    """Ren et al.'s motivating case: samples with wrong labels conflict with a clean validation loss."""
    X, y = centred_blobs(200, seed=2)
    flipped = torch.arange(200) < 40
    noisy = torch.where(flipped, (y + 1) % 3, y)
    val = centred_blobs(100, seed=3)
    model = _erm(epochs=2).fit(MLP(5, 3, hidden=(16,)), (X, noisy), seed=0)
    hook = LookaheadWeights(model, val, lambda m, x, t: x, n_val_batch=100)
    alignment = hook.alignments(X, noisy, hook.validation_gradient())
    assert alignment[flipped].mean() < 0 < alignment[~flipped].mean()
    kept = lookahead_weights(alignment, mix=1.0, scheme="sign")
    assert kept[flipped].mean() < 0.6 * kept[~flipped].mean()


def test_same_seed_same_model_other_seed_differs(setup):
    train, val, attack = setup
    trainer = LookaheadReweighting(_erm(), attack=attack, val=val, every=2, warmup_epochs=1)
    a = trainer.fit(MLP(5, 3, hidden=(8,)), train, seed=3)
    b = trainer.fit(MLP(5, 3, hidden=(8,)), train, seed=3)
    c = trainer.fit(MLP(5, 3, hidden=(8,)), train, seed=4)
    assert torch.equal(flat_params(a), flat_params(b))
    assert not torch.equal(flat_params(a), flat_params(c))


@pytest.mark.parametrize("make_base", [_erm, _pgdat])
def test_mix_zero_is_exactly_the_base_trainer_and_mix_changes_it(setup, make_base):
    train, val, attack = setup
    base = make_base()
    model = MLP(5, 3, hidden=(8,))
    reference = base.fit(model, train, seed=1)
    same = LookaheadReweighting(base, attack=attack, val=val, mix=0.0, warmup_epochs=0).fit(model, train, seed=1)
    other = LookaheadReweighting(base, attack=attack, val=val, mix=0.5, warmup_epochs=0).fit(model, train, seed=1)
    assert torch.equal(flat_params(reference), flat_params(same))
    assert not torch.equal(flat_params(reference), flat_params(other))


def _users_own_loop(model, train, hook_for, *, epochs, lr, batch_size, seed, attack=None):
    """A plain PyTorch loop as a user writes it (Adam, shuffled batches), optionally PGD-AT, weighted by the hook."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    order_generator = torch.Generator().manual_seed(seed)
    hook = hook_for(model)
    X, y = train
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(X), generator=order_generator)
        for start in range(0, len(X), batch_size):
            xb, yb = X[order[start:start + batch_size]], y[order[start:start + batch_size]]
            if attack is not None:
                xb = attack(model, xb, yb)
            weights = hook(xb, yb)
            loss = (weights * per_sample_loss(model(xb), yb)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@pytest.mark.parametrize("adversarial", [False, True])
def test_the_hook_in_a_users_own_loop_gives_the_model_of_the_built_in_trainer(setup, adversarial):
    train, val, attack = setup
    base = (_pgdat if adversarial else _erm)(retrain="finetune")
    options = dict(every=2, warmup_epochs=1, mix=0.5, n_val_batch=32)
    init = MLP(5, 3, hidden=(8,))
    built_in = LookaheadReweighting(base, attack=attack, val=val, **options).fit(init, train, seed=7)
    steps_per_epoch = -(-len(train[0]) // base.batch_size)
    hook_options = dict(options, warmup_steps=steps_per_epoch)
    hook_options.pop("warmup_epochs")
    if adversarial:
        base.begin_fit(None, None, None, seed=7, steps_per_epoch=steps_per_epoch)  # the trainer's PGD generator
    own = _users_own_loop(copy.deepcopy(init), train,
                          lambda model: LookaheadWeights(model, val, attack, seed=7, **hook_options),
                          epochs=base.epochs, lr=base.lr, batch_size=base.batch_size, seed=7,
                          attack=base.adversarial_points if adversarial else None)
    torch.testing.assert_close(flat_params(own), flat_params(built_in), atol=1e-6, rtol=0)
    plain = _users_own_loop(copy.deepcopy(init), train, lambda model: (lambda xb, yb: torch.ones(len(xb))),
                            epochs=base.epochs, lr=base.lr, batch_size=base.batch_size, seed=7,
                            attack=None)
    assert not torch.allclose(flat_params(own), flat_params(plain), atol=1e-4)


def test_hook_validation(setup):
    train, val, attack = setup
    model = MLP(5, 3, hidden=(8,))
    for kwargs, message in ((dict(model=3), "^model:"), (dict(attack=None), "^attack:"), (dict(mix=2.0), "^mix:"),
                            (dict(warmup_steps=-1), "^warmup_steps:"), (dict(val=(torch.zeros(3, 5),)), "^val:")):
        options = {**dict(model=model, val=val, attack=attack), **kwargs}
        with pytest.raises((TypeError, ValueError), match=message):
            LookaheadWeights(options.pop("model"), options.pop("val"), options.pop("attack"), **options)
    with pytest.raises(ValueError, match="^xb:"):
        LookaheadWeights(model, val, attack)(train[0][:0], train[1][:0])


def test_respects_the_trainer_interface(setup):
    train, val, attack = setup
    trainer = LookaheadReweighting(_erm(retrain="finetune"), attack=attack, every=3)
    assert isinstance(trainer, Trainer)
    assert (trainer.epochs, trainer.lr, trainer.batch_size, trainer.retrain) == (3, 0.02, 16, "finetune")
    model = MLP(5, 3, hidden=(8,))
    before = flat_params(model).clone()
    trained = trainer.fit(model, train, seed=0, val=val)  # validation data from fit
    assert trained is not model and not trained.training
    assert torch.equal(flat_params(model), before)
    scratch = trainer.with_retrain("scratch")
    assert scratch.retrain == "scratch" and trainer.retrain == "finetune"
    weights = torch.ones(96)
    weights[:48] = 0  # static weights still apply
    assert not torch.equal(flat_params(trainer.fit(model, train, seed=0, val=val)),
                           flat_params(trainer.fit(model, train, seed=0, val=val, weights=weights)))
    with pytest.raises(ValueError, match="^val:"):
        trainer.fit(model, train, seed=0)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(base=TRADES(eps=0.1, epochs=1, lr=0.1, batch_size=4)), TypeError, "^base:"),
    (dict(attack=3), TypeError, "^attack:"),
    (dict(mix=1.5), ValueError, "^mix:"),
    (dict(mix=-0.1), ValueError, "^mix:"),
    (dict(every=0), ValueError, "^every:"),
    (dict(warmup_epochs=-1), ValueError, "^warmup_epochs:"),
    (dict(n_val_batch=0), ValueError, "^n_val_batch:"),
    (dict(val_objective="clean"), ValueError, "^val_objective:"),
    (dict(scheme="softmax"), ValueError, "^scheme:"),
    (dict(per_class=1), TypeError, "^per_class:"),
    (dict(val=(torch.zeros(3, 5),)), ValueError, "^val:"),
])
def test_constructor_validation(fgsm_attack, kwargs, error, message):
    options = dict(base=_erm(), attack=fgsm_attack(0.1))
    options.update(kwargs)
    base = options.pop("base")
    with pytest.raises(error, match=message):
        LookaheadReweighting(base, **options)


def test_validation_attack_shortens_pgd_only():
    import attacks

    pgd = attacks.PGD(0.1, alpha=0.02, steps=10, seed=3)
    short = validation_attack(pgd)
    assert isinstance(short, attacks.PGD) and short.steps == 5 and short.eps == 0.1 and short.seed == 3
    other = attacks.FGSM(0.1)
    assert validation_attack(other) is other


def test_lookahead_recipe_is_registered_and_retrains_from_scratch(setup):
    import attacks

    train, val, _ = setup
    assert "lookahead" in available_recipes()
    trainer = _erm()
    base = trainer.fit(MLP(5, 3, hidden=(8,)), train, seed=0)
    ctx = DefenceContext(model=base, train=train, val=val, trainer=trainer, seed=0,
                         attack=attacks.PGD(0.2, steps=4, norm="l2", bounds=None), progress=False)
    defended = get_recipe("lookahead").fn(ctx)
    assert isinstance(defended, nn.Module) and defended is not base
    assert not torch.equal(flat_params(defended), flat_params(base))
    ctx.trainer = _pgdat()
    assert isinstance(get_recipe("lookahead").fn(ctx), nn.Module)
    ctx.trainer = TRADES(eps=0.1, norm="l2", bounds=None, epochs=1, lr=0.1, batch_size=16, progress=False)
    with pytest.raises(TypeError, match="^trainer:"):
        get_recipe("lookahead").fn(ctx)
