"""Engine building blocks at explicit parameters, the method registry, seeding and model modes."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust_infl as ri
from robust_infl import engine, methods
from robust_infl.models import MLP
from robust_infl.objectives import cross_entropy_loss
from robust_infl.inputs import validate_target
from robust_infl.options import ScoringOptions

from conftest import flat_grad


def make_problem(model, x, y, xt, yt, objective, param_names=None, **options):
    names = tuple(n for n, _ in model.named_parameters()) if param_names is None else param_names
    return engine.build_problem(model, (x, y), validate_target((xt, yt)), objective, loss_fn=cross_entropy_loss,
                                param_names=names, device=torch.device("cpu"),
                                options=ScoringOptions(**{"batch_size": 8, "progress": False, **options}))


@pytest.fixture
def mlp_and_data(mlp_problem):
    model, (x, y), (xt, yt) = mlp_problem(seed=3, n_features=5, n_classes=3, hidden=(7,), n_train=21, n_target=9)
    return model, x, y, xt, yt


def test_objective_gradient_at_perturbed_params_recomputes_the_attack_there(mlp_and_data, fgsm_attack):
    model, x, y, xt, yt = mlp_and_data
    problem = make_problem(model, x, y, xt, yt, ri.Robust(fgsm_attack(0.1)))
    perturbed = {name: p + 0.05 * torch.randn_like(p) for name, p in problem.params.items()}
    gradient = engine.flatten(engine.objective_gradient(problem, perturbed), problem.param_names)

    member = copy.deepcopy(model)
    member.load_state_dict(perturbed)
    x_adv = fgsm_attack(0.1)(member, xt, yt)
    expected = flat_grad(F.cross_entropy(member(x_adv), yt), member.parameters())
    torch.testing.assert_close(gradient, expected)
    prepared = problem.objective.prepare(member, problem.target, seed=problem.seed)  # the Objective interface
    value = prepared.combine(prepared.chunk_sums(member(prepared.inputs), slice(None), cross_entropy_loss))
    torch.testing.assert_close(value.detach(), F.cross_entropy(member(x_adv), yt).detach())


def test_directional_derivatives_and_per_sample_gradients_match_autograd(mlp_and_data):
    model, x, y, xt, yt = mlp_and_data
    problem = make_problem(model, x, y, xt, yt, ri.Utility())
    rows = torch.stack([flat_grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), model.parameters())
                        for i in range(21)])
    torch.testing.assert_close(engine.per_sample_gradients(problem, problem.params, (x, y)), rows)
    v = torch.randn(problem.n_params, dtype=torch.float64)
    torch.testing.assert_close(engine.directional_derivatives(problem, problem.params, v), rows @ v)
    as_dict = engine.unflatten(v, problem.params)
    torch.testing.assert_close(engine.directional_derivatives(problem, problem.params, as_dict), rows @ v)


def test_hessian_vector_products_match_the_autograd_hessian(mlp_and_data):
    model, x, y, xt, yt = mlp_and_data
    problem = make_problem(model, x, y, xt, yt, ri.Utility())
    names = problem.param_names

    def mean_loss(flat):
        return F.cross_entropy(torch.func.functional_call(model, engine.unflatten(flat, problem.params), (x,)), y)

    hessian = torch.autograd.functional.hessian(mean_loss, engine.flatten(problem.params, names))
    vectors = torch.randn(4, problem.n_params, dtype=torch.float64)
    torch.testing.assert_close(engine.hessian_vector_products(problem, problem.params, vectors, chunk_size=3), vectors @ hessian)
    torch.testing.assert_close(engine.hessian_vector_products(problem, problem.params, vectors[0]), hessian @ vectors[0])


class HalvedLogits(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return 0.5 * self.inner(x)


def test_pluggable_forward_is_used_by_every_operator(mlp_and_data):
    model, x, y, xt, yt = mlp_and_data
    problem = make_problem(model, x, y, xt, yt, ri.Utility())

    def halved_forward(params, buffers, inputs):
        return 0.5 * torch.func.functional_call(model, (params, buffers), (inputs,))

    scaled = problem.with_forward(halved_forward)
    halved = HalvedLogits(model)
    rows = torch.stack([flat_grad(F.cross_entropy(halved(x[i : i + 1]), y[i : i + 1]), halved.parameters())
                        for i in range(21)])
    objective_grad = flat_grad(F.cross_entropy(halved(xt), yt), halved.parameters())

    v = engine.objective_gradient(scaled, scaled.params)
    torch.testing.assert_close(engine.flatten(v, scaled.param_names), objective_grad)
    torch.testing.assert_close(engine.per_sample_gradients(scaled, scaled.params, (x, y)), rows)
    torch.testing.assert_close(engine.directional_derivatives(scaled, scaled.params, v), rows @ objective_grad)
    assert isinstance(scaled.module_at(scaled.params), nn.Module)
    assert scaled.module_at(scaled.params) is not model
    assert problem.module_at(problem.params) is model


def test_attacks_see_the_users_model_only_when_it_computes_the_same_function(mlp_and_data):
    model, x, y, xt, yt = mlp_and_data
    problem = make_problem(model, x, y, xt, yt, ri.Utility())
    assert problem.module_at(problem.params) is model
    assert problem.module_at(dict(problem.params)) is model  # the same tensors in a new dict
    perturbed = {name: p + 0.1 for name, p in problem.params.items()}
    wrapper = problem.module_at(perturbed)
    assert wrapper is not model
    torch.testing.assert_close(wrapper(xt), problem.outputs(perturbed, xt))
    # the model's own scored tensors but other unscored weights (a checkpoint's): a wrapper
    last_layer = tuple(name for name, _ in model.named_parameters())[-2:]
    partial = make_problem(model, x, y, xt, yt, ri.Utility(), param_names=last_layer)
    assert partial.module_at(partial.params) is model
    checkpoint = dataclasses.replace(partial, frozen={name: p + 0.1 for name, p in partial.frozen.items()})
    assert checkpoint.module_at(checkpoint.params) is not model


def test_method_registry_lists_looks_up_and_rejects(monkeypatch):
    assert "ip" in ri.available_methods()
    monkeypatch.setattr(methods, "_METHODS", dict(methods._METHODS))

    @ri.register_method("constant-test")
    def constant(problem, *, value: float = 1.0):
        return torch.full((problem.n_train,), value, dtype=problem.dtype)

    model = MLP(3, 2, hidden=(4,))
    data = (torch.randn(6, 3), torch.randint(0, 2, (6,)))
    scores = ri.influence(model, data, data, objective=ri.Utility(), method="constant-test", value=2.0, progress=False)
    torch.testing.assert_close(scores, torch.full((6,), 2.0))
    with pytest.raises(TypeError, match="^method_options: .*'bogus'"):
        ri.influence(model, data, data, objective=ri.Utility(), method="constant-test", bogus=1, progress=False)
    with pytest.raises(ValueError, match="^name: .*already registered"):
        ri.register_method("ip")(constant)
    with pytest.raises(ValueError, match="^method: unknown method 'nope'; valid names are .*constant-test.*ip"):
        ri.influence(model, data, data, objective=ri.Utility(), method="nope", progress=False)


def random_noise_attack(model, x, y):
    return x + 0.1 * torch.randn_like(x)


def test_same_seed_gives_identical_scores_and_leaves_global_rng_alone(mlp_and_data):
    model, x, y, xt, yt = mlp_and_data
    state = torch.random.get_rng_state()

    def score(seed):
        return ri.influence(model, (x, y), (xt, yt), objective=ri.Robust(random_noise_attack), seed=seed, progress=False)

    first, again, other = score(5), score(5), score(6)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert torch.equal(torch.random.get_rng_state(), state)


class FailingAttack:
    def __call__(self, model, x, y):
        raise RuntimeError("attack exploded")


def test_model_mode_is_restored_after_success_and_after_error(mlp_and_data, fgsm_attack):
    model, x, y, xt, yt = mlp_and_data
    model = nn.Sequential(model.net[0], nn.Dropout(0.5), *model.net[1:])
    model.train()
    model[1].eval()  # mixed modes must come back exactly
    seen_modes = []

    def spy_attack(m, inputs, labels):
        seen_modes.append(m.training)
        return fgsm_attack(0.1)(m, inputs, labels)

    ri.influence(model, (x, y), (xt, yt), objective=ri.Robust(spy_attack), progress=False)
    assert seen_modes == [False]
    assert model.training and not model[1].training and model[2].training
    with pytest.raises(RuntimeError, match="attack exploded"):
        ri.influence(model, (x, y), (xt, yt), objective=ri.Robust(FailingAttack()), progress=False)
    assert model.training and not model[1].training and model[2].training


def test_scores_are_computed_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.ReLU(), nn.Linear(8, 2)).double()
    x, y = torch.randn(12, 4, dtype=torch.float64), torch.randint(0, 2, (12,))
    model.train()
    in_train_mode = ri.influence(model, (x, y), (x, y), objective=ri.Utility(), progress=False)
    model.eval()
    in_eval_mode = ri.influence(model, (x, y), (x, y), objective=ri.Utility(), progress=False)
    torch.testing.assert_close(in_train_mode, in_eval_mode, rtol=0, atol=0)


def test_influence_docstring_lists_every_registered_method():
    for name in ri.available_methods():
        assert f'``"{name}"``' in ri.influence.__doc__.split("method:")[1].split("loss_fn:")[0], name
