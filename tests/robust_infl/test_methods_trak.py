"""TRAK ("trak") against TRAK's own ``TRAKer`` called directly, and the adapter's own contract.

- The per-target matrix equals ``TRAKer``'s scores (same model, data, CPU projector, seed, dimension
  and lambda_reg) turned into harms on each target's loss: ``harm_ij = -(1 - p_j) S_ij`` (TRAK's
  score is the rise of the target's margin when sample i is included; the loss falls by
  ``(1 - p_j)`` per unit of margin); the aggregate scores are its row means; Robust is the same at the
  attack points held fixed; scoring only some parameters is ``TRAKer(grad_wrt=...)``.
- Every objective, fairness gaps included, equals its own gradient (autograd) projected by
  ``TRAKer``'s projector and taken through ``TRAKer``'s finalised features and out-to-loss weights.
- A one-logit model equals ``TRAKer`` on the same model with the logits (0, z).
- Sign: a mislabelled training sample is the most harmful on clean validation data; with a huge
  damping TRAK's inverse is a multiple of the identity and its harms a projected ``"ip"``'s.
- Adversarial training points (train_loss="adversarial") equal TRAKer featurized at those points.
- Bad options are refused before any compute; without traker one ImportError names the extra.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust_infl as ri

from conftest import flat_grad, pearson, tiny_cnn_problem

pytest.importorskip("trak", reason="needs the trak extra (traker)")
from trak import TRAKer  # noqa: E402

N_TRAIN, N_TARGET = 200, 20
PROJ_DIM = 150  # > 100: TRAKer 0.3.2 frees its one-block CPU projection matrix before scoring, then fails
SEED = 5


@pytest.fixture
def problem():
    return tiny_cnn_problem(N_TRAIN, N_TARGET)


def direct_traker(model, train, target, tmp_path, damping=0.0, grad_wrt=None):
    """TRAKer's (n_train, n_target) scores, and the TRAKer (its store holds the features)."""
    traker = TRAKer(model=model, task="image_classification", train_set_size=train[0].shape[0],
                    save_dir=str(tmp_path / "trak"), device="cpu", proj_dim=PROJ_DIM, use_half_precision=False,
                    projector_seed=SEED, lambda_reg=damping, grad_wrt=grad_wrt, logging_level=logging.WARNING)
    traker.load_checkpoint(model.state_dict(), model_id=0)
    traker.featurize(batch=train, num_samples=train[0].shape[0])
    traker.finalize_features()
    traker.start_scoring_checkpoint("targets", model.state_dict(), model_id=0, num_targets=target[0].shape[0])
    traker.score(batch=target, num_samples=target[0].shape[0])
    scores = torch.from_numpy(np.array(traker.finalize_scores("targets"))).double()
    return scores, traker


def true_class_probability(model, x, y):
    with torch.no_grad():
        return torch.softmax(model(x), dim=1)[torch.arange(x.shape[0]), y]


def trak(model, train, target, objective=None, **options):
    options = {"proj_dim": PROJ_DIM, "seed": SEED, "batch_size": 64, "progress": False, **options}
    return ri.influence(model, train, target, objective=objective or ri.Utility(), method="trak", **options)


@pytest.mark.parametrize("damping", [0.0, 1e-2])
def test_per_target_matrix_equals_traker_called_directly(problem, damping, tmp_path):
    model, train, target = problem
    scores, _ = direct_traker(model, train, target, tmp_path, damping)
    expected = -scores * (1 - true_class_probability(model, *target))[None, :]
    harm = trak(model, train, target, damping=damping, aggregate=False)
    assert harm.shape == (N_TRAIN, N_TARGET) and harm.dtype == torch.float64
    torch.testing.assert_close(harm, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    aggregate = trak(model, train, target, damping=damping)
    # The aggregate contracts the targets before TRAK's float32 scoring, the matrix after it: equal up to float32
    # rounding through (Phi^T Phi + damping I)^-1, which damping 0 leaves ill-conditioned (and which differs
    # with the thread count).
    torch.testing.assert_close(aggregate, expected.mean(dim=1), rtol=1e-4, atol=1e-3 * float(aggregate.abs().max()))


def test_robust_objective_equals_traker_on_the_fixed_attack_points(problem, fgsm_attack, tmp_path):
    model, train, target = problem
    attack = fgsm_attack(0.1)
    x_adv = attack(model, *target)
    scores, _ = direct_traker(model, train, (x_adv, target[1]), tmp_path)
    expected = -scores * (1 - true_class_probability(model, x_adv, target[1]))[None, :]
    harm = trak(model, train, target, objective=ri.Robust(attack), aggregate=False)
    torch.testing.assert_close(harm, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))
    assert attack._calls == 2  # once here, once in the scoring (at the trained parameters, then held fixed)


def test_scoring_some_parameters_equals_traker_grad_wrt(problem, tmp_path):
    model, train, target = problem
    names = ["3.weight", "3.bias"]  # 147 parameters
    scores, _ = direct_traker(model, train, target, tmp_path, damping=1e-3, grad_wrt=names)
    expected = -scores * (1 - true_class_probability(model, *target))[None, :]
    harm = trak(model, train, target, damping=1e-3, params=names, aggregate=False)
    torch.testing.assert_close(harm, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def fairness_problem():
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2)).double().eval()  # 114 parameters
    x = torch.randn(N_TRAIN, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 2, (N_TRAIN,), generator=generator)
    xt = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    yt, st = torch.arange(30) % 2, (torch.arange(30) // 2) % 2
    return model, (x, y), (xt, yt, st)


def objective_value(objective, model, xt, yt, st):
    """Written out here from the objectives' definitions (not taken from the library)."""
    outputs = model(xt)
    if isinstance(objective, ri.Utility):
        return F.cross_entropy(outputs, yt)
    if isinstance(objective, ri.DemographicParity):
        prob = torch.softmax(outputs, dim=1)[:, 1]
        return (prob[st == 1].mean() - prob[st == 0].mean()) ** 2
    losses = F.cross_entropy(outputs, yt, reduction="none")
    return (losses[(yt == 1) & (st == 1)].mean() - losses[(yt == 1) & (st == 0)].mean()) ** 2


@pytest.mark.parametrize("objective", [ri.Utility(), ri.DemographicParity(), ri.EqualOpportunity()],
                         ids=["utility", "dp", "eo"])
def test_every_objective_is_its_gradient_through_traks_features(objective, tmp_path):
    model, train, target = fairness_problem()
    _, traker = direct_traker(model, train, target[:2], tmp_path, damping=1e-3)
    gradient = flat_grad(objective_value(objective, model, *target), list(model.parameters()))
    projected = traker.projector.project(gradient[None].float(), model_id=0) / traker.normalize_factor
    store = traker.saver.current_store
    features, out_to_loss = (torch.from_numpy(np.array(store[name])) for name in ("features", "out_to_loss"))
    expected = ((features @ projected.T) * out_to_loss)[:, 0].double()
    harm = trak(model, train, target, objective=objective, damping=1e-3)
    assert pearson(harm, expected) > 0.9999
    torch.testing.assert_close(harm, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


class ZeroThenLogit(nn.Module):
    """The logits (0, z) of a one-logit model: TRAK's softmax margin is then (2y - 1) z."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        z = self.model(x)
        return torch.cat([torch.zeros_like(z), z], dim=1)


def test_one_logit_model_equals_traker_on_the_logits_zero_and_z(tmp_path):
    model, train, target = fairness_problem()
    torch.manual_seed(2)
    one_logit = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1)).double().eval()
    scores, _ = direct_traker(ZeroThenLogit(one_logit), train, target[:2], tmp_path, damping=1e-3)
    with torch.no_grad():
        p = torch.sigmoid((2 * target[1] - 1).double() * one_logit(target[0])[:, 0])
    expected = -scores * (1 - p)[None, :]
    harm = trak(one_logit, train, target[:2], damping=1e-3, aggregate=False)
    torch.testing.assert_close(harm, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def blobs(generator, n):
    y = torch.randint(0, 2, (n,), generator=generator)
    return torch.randn(n, 2, generator=generator, dtype=torch.float64) + 2.0 * (2 * y[:, None] - 1).double(), y


def test_sign_a_mislabelled_sample_is_the_most_harmful():
    generator = torch.Generator().manual_seed(0)
    (x, y), val = blobs(generator, 60), blobs(generator, 60)
    flipped = int(torch.argmax(x[:, 0] * (2 * y - 1)))  # the most typical sample of its class
    y[flipped] = 1 - y[flipped]
    torch.manual_seed(0)
    model = nn.Linear(2, 2).double()
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + 1e-3 * model.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    harm = trak(model.eval(), (x, y), val, proj_dim=6)  # 6 parameters: the projection keeps everything
    assert int(torch.argmax(harm)) == flipped
    assert harm[flipped] > 0


def test_sign_huge_damping_gives_a_projected_ip(problem):
    model, train, target = problem
    ip = ri.influence(model, train, target, objective=ri.Utility(), method="ip", progress=False)
    harm = trak(model, train, target, damping=1e8, proj_dim=2048)  # (Phi^T Phi + lambda I)^{-1} ~ I / lambda
    assert pearson(harm, ip) > 0.95


@pytest.mark.parametrize("options, error, message", [
    ({"proj_dim": 0}, ValueError, r"^proj_dim: must be >= 1, got 0"),
    ({"proj_dim": 2.5}, TypeError, r"^proj_dim: "),
    ({"aggregate": 1}, TypeError, r"^aggregate: must be True or False"),
    ({"proj_dim": 178}, ValueError, r"^proj_dim: with damping=0 must be at most min\(n_train, n_params\) = 177"),
    ({"loss_fn": lambda out, y: F.cross_entropy(out, y, reduction="none")}, ValueError, r"^loss_fn: 'trak' models"),
    ({"seed": 2**63}, ValueError, r"^seed: must be in \[0, 4294967295\]"),
    ({"aggregate": False, "objective": ri.DemographicParity()}, ValueError, r"^aggregate: .* has no per-target"),
])
def test_bad_options_are_refused_before_any_compute(problem, options, error, message, monkeypatch):
    import robust_infl.methods.trak as trak_method

    model, train, (xt, yt) = problem
    target = (xt, yt % 2, torch.arange(N_TARGET) % 2) if "objective" in options else (xt, yt)
    if "objective" in options:
        model = nn.Sequential(nn.Flatten(), nn.Linear(36, 2)).double()
        train = (train[0], train[1] % 2)
    monkeypatch.setattr(trak_method, "_trak", lambda: pytest.fail("computed before checking"))
    with pytest.raises(error, match=message):
        trak(model, train, target, **options)


def test_an_objective_not_of_the_margins_is_refused(problem):
    class TopLogit(ri.Utility):
        def chunk_sums(self, outputs, labels, groups, loss_fn):
            return outputs[:, 0].sum().reshape(1)

    with pytest.raises(ValueError, match=r"^objective: 'trak' scores objectives that depend .* through its margin"):
        trak(*problem, objective=TopLogit(), damping=1e-3)


def test_without_the_extra_one_error_names_it(problem, monkeypatch):
    for name in [m for m in sys.modules if m == "trak" or m.startswith("trak.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "trak", None)  # import trak -> ImportError
    with pytest.raises(ImportError, match=r"^method: 'trak' needs TRAK's package traker.*robust-infl\[trak\]"):
        trak(*problem)


def test_the_package_does_not_import_trak_until_asked():
    code = "import sys, robust_infl, defenses; assert 'trak' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_adversarial_training_points_equal_traker_featurized_there(problem, fgsm_attack, tmp_path):
    model, (x, y), target = problem
    attack = fgsm_attack(0.05)
    scores, _ = direct_traker(model, (attack(model, x, y), y), target, tmp_path, damping=1e-3)
    expected = -scores * (1 - true_class_probability(model, *target))[None, :]
    harm = trak(model, (x, y), target, damping=1e-3, aggregate=False, train_loss="adversarial", train_attack=attack)
    torch.testing.assert_close(harm, expected, rtol=1e-5, atol=1e-6 * float(expected.abs().max()))


def test_the_projection_drawn_whole_equals_traks_block_by_block(problem, monkeypatch):
    """Below ``WHOLE_MATRIX_BYTES`` the projection matrix is drawn once from TRAK's block generator states; above
    it TRAK's ``BasicProjector`` draws the blocks at every batch: the same matrix, the same scores."""
    from robust_infl.methods import trak as trak_module

    model, train, target = problem
    whole = trak(model, train, target, damping=1e-3, aggregate=False)
    monkeypatch.setattr(trak_module, "WHOLE_MATRIX_BYTES", 0)
    by_block = trak(model, train, target, damping=1e-3, aggregate=False)
    torch.testing.assert_close(whole, by_block, rtol=1e-5, atol=1e-6 * float(by_block.abs().max()))
