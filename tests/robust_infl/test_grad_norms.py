"""Layer-factored per-sample gradients against torch.func vmap(grad) (the engine's per_sample_gradients)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import robust_infl as ri
from robust_infl import engine
from robust_infl.grad_norms import ConvGradients, LinearGradients, batch_gradients, squared_gradient_norms
from robust_infl.models import SmallCNN
from robust_infl.objectives import cross_entropy_loss
from robust_infl.inputs import validate_target
from robust_infl.options import ScoringOptions

from conftest import max_relative_error


class Mixed(nn.Module):
    """Strided / dilated / grouped / bias-free convolutions, a Linear over positions (T > 1) on both
    cost branches, a layer called twice, a LayerNorm and an in-place ReLU after a covered layer."""

    def __init__(self, wide: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(4, 4, 3, padding=2, dilation=2, bias=False)
        self.grouped = nn.Conv2d(4, 6, (3, 1), padding=(1, 0), groups=2)
        self.narrow = nn.Linear(4, wide)  # T = 6 positions; T (d_in + d_out) > d_in d_out: formed gradients
        self.wide = nn.Linear(wide, 40)  # T = 6; Gram matrices once wide * 40 > 6 (wide + 40)
        self.twice = nn.Linear(40, 40)
        self.norm = nn.LayerNorm(40)
        self.head = nn.Linear(40, 5)

    def forward(self, x):
        h = torch.relu_(self.conv(x))
        h = self.grouped(self.dilated(h))  # (b, 6, 2, 2)
        h = self.narrow(h.flatten(2)[:, :, :4])  # (b, 6, wide)
        h = self.twice(torch.relu(self.twice(self.wide(h))))
        return self.head(self.norm(h).mean(1))


def make_problem(model, x, y, param_names=None, batch_size=4, **options):
    names = param_names or tuple(n for n, _ in model.named_parameters())
    return engine.build_problem(
        model, (x, y), validate_target((x[:3], y[:3])), ri.Utility(), loss_fn=cross_entropy_loss,
        param_names=names, device=torch.device("cpu"),
        options=ScoringOptions(batch_size=batch_size, **{"progress": False, **options}),
    )


def reference(problem, x, y):
    return engine.per_sample_gradients(problem, problem.params, (x, y))


@pytest.fixture
def mixed():
    torch.manual_seed(1)
    model = Mixed().double().eval()
    x = torch.rand(9, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 5, (9,))
    return model, x, y


def test_small_cnn_norms_inner_products_and_gradients_match_vmap_grad():
    torch.manual_seed(0)
    model = SmallCNN().double().eval()
    x, y = torch.rand(6, 1, 28, 28, dtype=torch.float64), torch.randint(0, 10, (6,))
    problem = make_problem(model, x, y)
    ref = reference(problem, x, y)
    grads = batch_gradients(problem, problem.params, (x, y))
    assert [type(layer) for layer in grads.layers] == [ConvGradients, ConvGradients, LinearGradients, LinearGradients]
    assert grads.dense is None
    assert max_relative_error(grads.sq_norms(), ref.square().sum(1)) <= 1e-5
    assert max_relative_error(grads.flatten(), ref) <= 1e-5
    other = batch_gradients(problem, problem.params, (x[:4], y[:4]))
    assert max_relative_error(grads.inner(other), ref @ ref[:4].T) <= 1e-5


def test_unusual_layers_are_covered_exactly_and_the_rest_falls_back(mixed):
    model, x, y = mixed
    problem = make_problem(model, x, y)
    ref = reference(problem, x, y)
    grads = batch_gradients(problem, problem.params, (x, y))
    covered = [name for layer in grads.layers for name in (layer.weight, layer.bias) if name]
    assert "grouped.weight" in covered and "dilated.weight" in covered and "wide.weight" in covered
    assert set(grads.dense_names) == {"twice.weight", "twice.bias", "norm.weight", "norm.bias"}
    assert max_relative_error(grads.sq_norms(), ref.square().sum(1)) <= 1e-5
    assert max_relative_error(grads.flatten(), ref) <= 1e-5
    assert max_relative_error(grads.inner(grads), ref @ ref.T) <= 1e-5


def test_both_cost_branches_of_linear_layers_over_positions(mixed):
    _, x, y = mixed
    for wide in (1, 30):  # wide=1: both layers form gradients; wide=30: "wide" uses the Gram matrices
        torch.manual_seed(2)
        model = Mixed(wide).double().eval()
        problem = make_problem(model, x, y, param_names=("narrow.weight", "narrow.bias", "wide.weight"))
        ref = reference(problem, x, y)
        grads = batch_gradients(problem, problem.params, (x, y))
        assert grads.dense is None and [layer.inputs.shape[1] for layer in grads.layers] == [6, 6]
        assert max_relative_error(grads.sq_norms(), ref.square().sum(1)) <= 1e-5


def test_parameter_subsets_bias_only_and_weight_only(mixed):
    model, x, y = mixed
    for names in (("head.bias",), ("head.weight",), ("conv.bias", "head.weight"), ("norm.weight",)):
        problem = make_problem(model, x, y, param_names=names)
        ref = reference(problem, x, y)
        grads = batch_gradients(problem, problem.params, (x, y))
        assert max_relative_error(grads.sq_norms(), ref.square().sum(1)) <= 1e-5
        assert max_relative_error(grads.inner(grads), ref @ ref.T) <= 1e-5
        assert max_relative_error(grads.flatten(), ref) <= 1e-5


def test_streamed_norms_at_adversarial_points_equal_the_self_method(mixed, fgsm_attack):
    model, x, y = mixed
    attack = fgsm_attack(0.05)
    problem = make_problem(model, x, y, train_loss="adversarial", train_attack=attack)
    expected = ri.influence(model, (x, y), (x[:3], y[:3]), objective=ri.Utility(), method="self",
                            batch_size=4, train_loss="adversarial", train_attack=attack, progress=False)
    assert max_relative_error(squared_gradient_norms(problem), expected) <= 1e-5


def test_small_groups_of_samples_give_the_same_norms(mixed, monkeypatch):
    from robust_infl import grad_norms

    model, x, y = mixed
    problem = make_problem(model, x, y)
    full = batch_gradients(problem, problem.params, (x, y)).sq_norms()
    monkeypatch.setattr(grad_norms, "MAX_TEMPORARY_ELEMENTS", 1)
    torch.testing.assert_close(batch_gradients(problem, problem.params, (x, y)).sq_norms(), full)


def test_inner_products_need_the_same_factored_layers(mixed):
    model, x, y = mixed
    grads = batch_gradients(make_problem(model, x, y), dict(make_problem(model, x, y).params), (x, y))
    subset = make_problem(model, x, y, param_names=("head.weight",))
    with pytest.raises(ValueError, match="^other:"):
        grads.inner(batch_gradients(subset, subset.params, (x, y)))
