"""EK-FAC / K-FAC ("ekfac", "kfac") against Kronfluence called directly, and the adapter's own contract.

- The adapter equals Kronfluence driven by an independent task written here (per-target-sample
  measurements, per-sample pairwise scores summed over the targets, no query aggregation) with the
  same factor options and damping, negated (Kronfluence's scores are positive for helpful samples).
- Kronfluence's "identity" strategy (no curvature) reproduces "ip" on every objective, fairness
  gaps included: the objective reaches Kronfluence as it should.
- Sign: with a huge damping (F + lambda I)^{-1} ~ I / lambda, so lambda * harm -> ip's harm.
- Factors are fitted once per model and reused across objectives; a changed model refits.
- Without Kronfluence, one ImportError names the extra.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robust_infl as ri
from robust_infl.methods.ekfac import clear_cache

from conftest import pearson, tiny_cnn_problem

kronfluence = pytest.importorskip("kronfluence", reason="needs the ekfac extra (kronfluence)")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402

N_TRAIN, N_TARGET = 60, 20
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # Kronfluence uses torch.cuda.amp


@pytest.fixture
def problem():
    return tiny_cnn_problem(N_TRAIN, N_TARGET)


class DirectTask(Task):
    """Cross-entropy training loss (empirical Fisher), each target sample's loss / n_target as measurement."""

    def compute_train_loss(self, batch, model, sample=False):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum")

    def compute_measurement(self, batch, model):
        x, y = batch
        return F.cross_entropy(model(x), y, reduction="sum") / N_TARGET


def direct_kronfluence(model, train, target, strategy, damping, tmp_path, per_query: bool = False) -> torch.Tensor:
    """Kronfluence's pairwise scores of every training sample, summed over the target samples (``per_query``:
    the ``(n_target, n_train)`` scores of each target sample's loss / n_target)."""
    from torch.utils.data import TensorDataset

    task = DirectTask()
    prepared = prepare_model(__import__("copy").deepcopy(model), task)
    analyzer = Analyzer("direct", prepared, task, cpu=True, disable_tqdm=True, output_dir=str(tmp_path))
    f64 = torch.float64
    factor_args = FactorArguments(strategy=strategy, use_empirical_fisher=True, activation_covariance_dtype=f64,
                                  gradient_covariance_dtype=f64, per_sample_gradient_dtype=f64, lambda_dtype=f64)
    score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=f64, precondition_dtype=f64,
                                score_dtype=f64)
    train_set, query = TensorDataset(*train), TensorDataset(*target)
    analyzer.fit_all_factors("f", train_set, per_device_batch_size=16, factor_args=factor_args)
    analyzer.compute_pairwise_scores("s", "f", query_dataset=query, train_dataset=train_set,
                                     per_device_query_batch_size=7, per_device_train_batch_size=16,
                                     score_args=score_args)
    scores = analyzer.load_pairwise_scores("s")["all_modules"]
    return scores if per_query else scores.sum(dim=0)


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_adapter_equals_kronfluence_called_directly(problem, method, tmp_path):
    model, train, target = problem
    expected = -direct_kronfluence(model, train, target, method, 1e-3, tmp_path)
    harm = ri.influence(model, train, target, objective=ri.Utility(), method=method, damping=1e-3,
                        use_empirical_fisher=True, batch_size=16, progress=False)
    assert pearson(harm, expected) >= 0.999
    torch.testing.assert_close(harm, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))


def test_robust_objective_equals_kronfluence_on_the_fixed_adversarial_points(problem, fgsm_attack, tmp_path):
    model, train, target = problem
    attack = fgsm_attack(0.1)
    x_adv = attack(model, *target)
    expected = -direct_kronfluence(model, train, (x_adv, target[1]), "ekfac", 1e-3, tmp_path)
    harm = ri.influence(model, train, target, objective=ri.Robust(attack), method="ekfac", damping=1e-3,
                        use_empirical_fisher=True, batch_size=16, progress=False)
    assert pearson(harm, expected) >= 0.999


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_per_target_matrix_equals_kronfluence_per_query_and_its_row_means_the_aggregate(problem, method, tmp_path):
    model, train, target = problem
    expected = -N_TARGET * direct_kronfluence(model, train, target, method, 1e-3, tmp_path, per_query=True).T
    options = dict(objective=ri.Utility(), method=method, damping=1e-3, use_empirical_fisher=True, batch_size=16,
                   progress=False)
    harm = ri.influence(model, train, target, aggregate=False, **options)
    assert harm.shape == (N_TRAIN, N_TARGET)
    torch.testing.assert_close(harm, expected, rtol=1e-6, atol=1e-9 * float(expected.abs().max()))
    aggregate = ri.influence(model, train, target, **options)
    torch.testing.assert_close(harm.mean(dim=1), aggregate, rtol=1e-6, atol=1e-9 * float(aggregate.abs().max()))


def test_per_target_identity_strategy_is_ip_per_target(problem):
    model, train, target = problem
    ip = ri.influence(model, train, target, objective=ri.Utility(), method="ip", aggregate=False, progress=False)
    identity = ri.influence(model, train, target, objective=ri.Utility(), method="ekfac", strategy="identity",
                            aggregate=False, progress=False)
    torch.testing.assert_close(identity, ip, rtol=1e-6, atol=1e-9 * float(ip.abs().max()))


def fairness_problem():
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double().eval()
    x, y = torch.randn(40, 4, generator=generator, dtype=torch.float64), torch.randint(0, 2, (40,), generator=generator)
    xt = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    yt, st = torch.arange(30) % 2, (torch.arange(30) // 2) % 2
    return model, (x, y), (xt, yt, st)


@pytest.mark.parametrize("objective", [ri.Utility(), ri.DemographicParity(), ri.EqualOpportunity()],
                         ids=["utility", "dp", "eo"])
def test_identity_strategy_reproduces_ip_on_every_objective(objective):
    model, train, target = fairness_problem()
    ip = ri.influence(model, train, target, objective=objective, method="ip", batch_size=16, progress=False)
    identity = ri.influence(model, train, target, objective=objective, method="ekfac", strategy="identity",
                            batch_size=16, progress=False)
    torch.testing.assert_close(identity, ip, rtol=1e-6, atol=1e-9 * float(ip.abs().max()))


@pytest.mark.parametrize("method", ["ekfac", "kfac"])
def test_sign_huge_damping_turns_into_ip_over_damping(problem, method):
    model, train, target = problem
    ip = ri.influence(model, train, target, objective=ri.Utility(), method="ip", progress=False)
    harm = ri.influence(model, train, target, objective=ri.Utility(), method=method, damping=1e6, progress=False)
    torch.testing.assert_close(1e6 * harm, ip, rtol=1e-3, atol=1e-4 * float(ip.abs().max()))


def test_factors_are_fitted_once_per_model_and_refitted_for_another(problem, monkeypatch):
    import kronfluence.computer.factor_computer as factor_computer

    calls = []
    original = factor_computer.fit_covariance_matrices_with_loader
    monkeypatch.setattr(factor_computer, "fit_covariance_matrices_with_loader",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    model, train, target = problem
    common = dict(method="ekfac", damping=1e-3, batch_size=16, seed=5, progress=False)
    ri.influence(model, train, target, objective=ri.Utility(), **common)
    ri.influence(model, train, target, objective=ri.Robust(lambda m, x, y: x + 0.05), **common)
    assert len(calls) == 1
    with torch.no_grad():
        model[3].bias.add_(0.5)
    ri.influence(model, train, target, objective=ri.Utility(), **common)
    assert len(calls) == 2
    clear_cache()
    ri.influence(model, train, target, objective=ri.Utility(), **common)
    assert len(calls) == 3


def test_params_select_whole_linear_or_conv_layers(problem):
    model, train, target = problem
    last = ri.influence(model, train, target, objective=ri.Utility(), method="ekfac", strategy="identity",
                        params=["3.weight", "3.bias"], progress=False)
    ip_last = ri.influence(model, train, target, objective=ri.Utility(), method="ip", params=["3.weight", "3.bias"],
                           progress=False)
    torch.testing.assert_close(last, ip_last, rtol=1e-6, atol=1e-9 * float(ip_last.abs().max()))
    with pytest.raises(ValueError, match=r"^params: Kronfluence scores a layer's parameters together"):
        ri.influence(model, train, target, objective=ri.Utility(), method="ekfac", params=["3.weight"], progress=False)


def test_options_are_checked_by_name(problem):
    model, train, target = problem
    with pytest.raises(ValueError, match=r"^strategy: must be one of"):
        ri.influence(model, train, target, objective=ri.Utility(), method="ekfac", strategy="lowrank", progress=False)
    with pytest.raises(TypeError, match=r"^use_empirical_fisher: must be True or False"):
        ri.influence(model, train, target, objective=ri.Utility(), method="kfac", use_empirical_fisher=1,
                     progress=False)


def test_without_the_extra_one_error_names_it(problem, monkeypatch):
    for name in [m for m in sys.modules if m == "kronfluence" or m.startswith("kronfluence.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "kronfluence", None)  # import kronfluence -> ImportError
    with pytest.raises(ImportError, match=r"^method: 'ekfac' and 'kfac' need Kronfluence.*robust-infl\[ekfac\]"):
        ri.influence(*problem, objective=ri.Utility(), method="ekfac", progress=False)


def test_the_package_does_not_import_kronfluence_until_asked():
    import subprocess

    code = "import sys, robust_infl, defenses; assert 'kronfluence' not in sys.modules and 'accelerate' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
