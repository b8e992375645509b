"""Ensembles of trained models (``influence(Ensemble([...]), ...)``) against their definitions.

- Every method but "trak" and "tracin": the mean of ``influence`` called once per member with the same options
  (aggregate scores and per-target matrices; Robust with each member's own attack points, counted).
- "trak": TRAK's own ensemble, i.e. ``TRAKer`` called directly with one checkpoint per member (model ids
  0 .. M-1), its scores turned into harms with the members' mean ``-(1 - p_j)``; Robust with each member's attack
  points given to ``TRAKer`` as that checkpoint's targets; one member is plain "trak".
- Bad inputs are refused naming the argument: not a list, an empty list, a non-module, members of other
  architectures / output sizes / classes, "tracin" (one model's checkpoints), ``sharded_influence``.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import pytest
import torch
from torch import nn

import robust_infl as ri
from robust_infl.distributed import sharded_influence

from conftest import tiny_cnn_problem

N_TRAIN, N_TARGET = 120, 15


def mlp(seed: int, outputs: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, outputs)).double().eval()  # 67 parameters


@pytest.fixture
def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (N_TRAIN,), generator=generator)
    xt = torch.randn(N_TARGET, 4, generator=generator, dtype=torch.float64)
    yt = torch.randint(0, 3, (N_TARGET,), generator=generator)
    return (x, y), (xt, yt)


def per_model_mean(models, train, target, **keywords):
    return torch.stack([ri.influence(m, train, target, **keywords) for m in models]).mean(dim=0)


@pytest.mark.parametrize("method,extra", [
    ("ip", {}), ("if-exact", {"damping": 1e-2}), ("if-cg", {"damping": 1.0}), ("datainf", {"damping": 1e-2}),
    ("ip-ensemble", {"members": 3, "perturbation": "gaussian"}), ("self", {}), ("loss", {}), ("random", {}),
])
def test_every_one_model_method_is_the_mean_of_its_members(data, method, extra):
    train, target = data
    models = [mlp(seed) for seed in range(3)]
    options = ri.ScoringOptions(seed=4, batch_size=32, progress=False)
    keywords = dict(objective=ri.Utility(), method=method, options=options, **extra)
    harm = ri.influence(ri.Ensemble(models), train, target, **keywords)
    expected = per_model_mean(models, train, target, **keywords)
    assert harm.shape == (N_TRAIN,)
    torch.testing.assert_close(harm, expected, rtol=1e-10, atol=1e-12)
    if method not in ("random",):
        assert not torch.allclose(harm, ri.influence(models[0], train, target, **keywords))  # really averaged


def test_per_target_matrix_and_robust_objective_are_per_member(data, fgsm_attack):
    train, target = data
    models = [mlp(seed) for seed in range(3)]
    attack = fgsm_attack(0.2)
    keywords = dict(objective=ri.Robust(attack), method="ip", aggregate=False, progress=False)
    harm = ri.influence(ri.Ensemble(models), train, target, **keywords)
    assert attack._calls == 3  # once per member, at its own parameters, then held fixed
    expected = per_model_mean(models, train, target, **keywords)
    assert harm.shape == (N_TRAIN, N_TARGET)
    torch.testing.assert_close(harm, expected, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------------------------------------- TRAK's own
PROJ_DIM = 150  # > 100: TRAKer 0.3.2 frees its one-block CPU projection matrix before scoring, then fails
SEED, DAMPING = 5, 1e-3


def trak_members(n: int = 3) -> tuple:
    model, train, target = tiny_cnn_problem(N_TRAIN, N_TARGET)
    models = [model]
    for seed in range(1, n):
        torch.manual_seed(seed)
        other = copy.deepcopy(model)
        for layer in (other[0], other[3]):
            layer.reset_parameters()
        models.append(other.eval())
    return models, train, target


def traker_with_checkpoints(models, train, targets, tmp_path):
    """``TRAKer``'s scores with member ``k``'s state dict as model id ``k`` and ``targets[k]`` as its targets."""
    trak = pytest.importorskip("trak", reason="needs the trak extra (traker)")
    traker = trak.TRAKer(model=copy.deepcopy(models[0]), task="image_classification", train_set_size=N_TRAIN,
                         save_dir=str(tmp_path / "trak"), device="cpu", proj_dim=PROJ_DIM, use_half_precision=False,
                         projector_seed=SEED, lambda_reg=DAMPING, logging_level=logging.WARNING)
    for model_id, model in enumerate(models):
        traker.load_checkpoint(model.state_dict(), model_id=model_id)
        traker.featurize(batch=train, num_samples=N_TRAIN)
    traker.finalize_features()
    for model_id, (model, target) in enumerate(zip(models, targets)):
        traker.start_scoring_checkpoint("targets", model.state_dict(), model_id=model_id, num_targets=N_TARGET)
        traker.score(batch=target, num_samples=N_TARGET)
    return torch.from_numpy(np.array(traker.finalize_scores("targets"))).double()


def loss_per_margin(models, targets):
    """``mean_k dl_j/dm_j = -mean_k (1 - p_j)`` at each member's own targets."""
    with torch.no_grad():
        return torch.stack([-(1 - torch.softmax(m(x), dim=1)[torch.arange(x.shape[0]), y])
                            for m, (x, y) in zip(models, targets)]).mean(dim=0)


def trak(model, train, target, objective=None, **options):
    options = {"proj_dim": PROJ_DIM, "seed": SEED, "damping": DAMPING, "batch_size": 64, "progress": False, **options}
    return ri.influence(model, train, target, objective=objective or ri.Utility(), method="trak", **options)


def test_trak_ensemble_equals_traker_with_one_checkpoint_per_member(tmp_path):
    models, train, target = trak_members()
    targets = [target] * len(models)
    expected = traker_with_checkpoints(models, train, targets, tmp_path) * loss_per_margin(models, targets)[None, :]
    harm = trak(ri.Ensemble(models), train, target, aggregate=False)
    assert harm.shape == (N_TRAIN, N_TARGET)
    torch.testing.assert_close(harm, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    aggregate = trak(ri.Ensemble(models), train, target)
    torch.testing.assert_close(aggregate, expected.mean(dim=1), rtol=1e-4, atol=1e-4 * float(aggregate.abs().max()))
    # not the mean of the members' own TRAK scores (TRAK averages scores and out-to-loss weights apart)
    assert not torch.allclose(aggregate, per_model_mean(models, train, target, objective=ri.Utility(), method="trak",
                                                        proj_dim=PROJ_DIM, seed=SEED, damping=DAMPING,
                                                        batch_size=64, progress=False), rtol=1e-3)


def test_trak_ensemble_robust_uses_each_members_attack_points(fgsm_attack, tmp_path):
    models, train, target = trak_members(2)
    attack = fgsm_attack(0.1)
    targets = [(attack(m, *target), target[1]) for m in models]
    expected = traker_with_checkpoints(models, train, targets, tmp_path) * loss_per_margin(models, targets)[None, :]
    harm = trak(ri.Ensemble(models), train, target, objective=ri.Robust(attack), aggregate=False)
    torch.testing.assert_close(harm, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert attack._calls == 4  # twice here, once per member in the scoring


def test_one_member_trak_ensemble_is_trak():
    models, train, target = trak_members(1)
    assert torch.equal(trak(ri.Ensemble(models), train, target), trak(models[0], train, target))


# ---------------------------------------------------------------------------------------------- refusals
def test_bad_ensembles_are_refused_naming_models():
    with pytest.raises(TypeError, match="^models: expected a list"):
        ri.Ensemble(mlp(0))
    with pytest.raises(ValueError, match="^models: must hold at least one model"):
        ri.Ensemble([])
    with pytest.raises(TypeError, match="^models: model 1: must be a torch.nn.Module"):
        ri.Ensemble([mlp(0), "mlp"])
    with pytest.raises(ValueError, match=r"^models: model 1 does not have model 0's architecture: its parameter "
                                         r"'2.bias' is \(2,\) torch.float64, against \(3,\)"):
        ri.Ensemble([mlp(0), mlp(1, outputs=2)])
    with pytest.raises(ValueError, match="^models: model 1 does not have model 0's architecture: it lacks parameter '2.bias'"):
        ri.Ensemble([mlp(0), nn.Sequential(nn.Linear(4, 8), nn.Tanh()).double()])
    with pytest.raises(ValueError, match="^models: model 1 is a Linear, model 0 a Sequential"):
        ri.Ensemble([mlp(0), nn.Linear(4, 3)])
    with pytest.raises(ValueError, match="^models: model 1 does not have model 0's architecture: its parameter "
                                         "'0.bias' is .* torch.float32"):
        ri.Ensemble([mlp(0), mlp(1).float()])


def test_tracin_and_sharded_scoring_refuse_an_ensemble(data):
    train, target = data
    ensemble = ri.Ensemble([mlp(0), mlp(1)])
    with pytest.raises(ValueError, match="^model: method 'tracin' scores the checkpoints of one model"):
        ri.influence(ensemble, train, target, objective=ri.Utility(), method="tracin",
                     checkpoints=[mlp(0).state_dict()], progress=False)
    with pytest.raises(TypeError, match="^model: sharded_influence scores one nn.Module"):
        sharded_influence(ensemble, train, target, objective=ri.Utility(), progress=False)


def test_options_are_checked_before_any_member_is_scored(data):
    train, target = data
    ensemble = ri.Ensemble([mlp(0), mlp(1)])
    with pytest.raises(TypeError, match="^method_options: method 'ip' does not accept"):
        ri.influence(ensemble, train, target, objective=ri.Utility(), members=3)
    with pytest.raises(ValueError, match="^aggregate: method 'self'"):
        ri.influence(ensemble, train, target, objective=ri.Utility(), method="self", aggregate=False)
