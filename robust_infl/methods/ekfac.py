"""EK-FAC and K-FAC influence functions through Kronfluence (Grosse et al. 2023, "Studying Large
Language Model Generalization with Influence Functions"; George et al. 2018 for EK-FAC, Martens &
Grosse 2015 for K-FAC): ``"ekfac"`` and ``"kfac"``.

The Hessian of the mean training loss is replaced by a Kronecker-factored approximation of the
Fisher of every tracked ``nn.Linear`` / ``nn.Conv2d`` layer (block-diagonal over layers); EK-FAC
refits its eigenvalues in the Kronecker eigenbasis. Kronfluence's pairwise score of training
sample i against the objective is ``grad f^T (F + damping I)^{-1} grad l_i``, positive for a
HELPFUL sample; the harm is its negation (the same quantity and scale as ``"if-exact"`` with the
Hessian replaced by the approximation):

    harm_i = - grad f^T (F + damping I)^{-1} grad l_i

The objective enters as Kronfluence's measurement: the target set (at the adversarial points of
``Robust``, computed once at the trained parameters and held fixed) is Kronfluence's query set,
and its summed query gradient (``aggregate_query_gradients``) is ``grad f``. Non-linear objectives
(the fairness gaps) are measured on the whole target set in one batch.

Kronfluence is an optional extra (``pip install 'robust-infl[ekfac]'``, or ``make setup``, which
installs it without its declared ``torchvision``). It writes its factors and scores to disk: here
into a temporary folder of the process (removed at exit), never the working directory. The
factors depend only on the model, the training set and the factor options, so they are fitted
once per (model state-dict SHA-256, training-data fingerprint, scored modules, loss, options) and
reused when the same model is scored against several objectives. The training set is handed to
Kronfluence as tensors in memory (at the ``train_attack`` points for ``train_loss="adversarial"``).
With the scoring option ``aggregate=False`` the measurement is each target sample's own loss (at its
attack point for ``Robust``), Kronfluence's per-query scores (``aggregate_query_gradients=False``): the
``(n_train, n_target)`` matrix of harms on each target, whose row means are the aggregate scores of
``Utility`` and ``Robust``.
"""

from __future__ import annotations

import atexit
import copy
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from attacks.base import plain_value
from attacks.plumbing import seeded
from attacks.validation import check_bool, check_choice
from robust_infl.engine import ScoringProblem, check_finite_results, train_batches
from robust_infl.methods import register_method
from robust_infl.objectives import binary_cross_entropy_loss, cross_entropy_loss
from robust_infl.store import data_hash, model_hash

__all__ = ["ekfac_influence", "kfac_influence", "kronfluence_scores", "tracked_modules", "clear_cache", "EXTRA",
           "STRATEGIES", "DEFAULT_DAMPING"]

EXTRA = "ekfac"
STRATEGIES = ("identity", "diagonal", "kfac", "ekfac")
DEFAULT_DAMPING = 1e-8
"""Kronfluence's default ``damping_factor``, used when ``influence(damping=0)`` (the default)."""
SUPPORTED_MODULES = (nn.Linear, nn.Conv2d)

_cache_dir: Optional[Path] = None


def _kronfluence() -> Any:
    """The ``kronfluence`` package, or one ``ImportError`` naming the extra to install."""
    try:
        import kronfluence
        import kronfluence.analyzer  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"method: 'ekfac' and 'kfac' need Kronfluence, which is not installed ({err}); install the optional "
            f"extra: pip install 'robust-infl[{EXTRA}]' (make setup installs it, with kronfluence --no-deps)"
        ) from err
    return kronfluence


def _cache() -> Path:
    """This process's folder for Kronfluence's files (created on first use, removed at exit)."""
    global _cache_dir
    if _cache_dir is None:
        _cache_dir = Path(tempfile.mkdtemp(prefix="robust-infl-kronfluence-"))
        atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
    return _cache_dir


def clear_cache() -> None:
    """Delete every factor fitted so far in this process; the next scoring call fits its factors again."""
    if _cache_dir is not None:
        shutil.rmtree(_cache_dir, ignore_errors=True)
        _cache_dir.mkdir()


def tracked_modules(problem: ScoringProblem) -> list[str]:
    """Names of the modules owning the scored parameters; each must be a ``Linear`` or ``Conv2d``
    with ALL its parameters scored (Kronfluence scores a layer's weight and bias together)."""
    modules = dict(problem.model.named_modules())
    owners: list[str] = []
    for name in problem.param_names:
        owner = name.rpartition(".")[0]
        if owner not in owners:
            owners.append(owner)
    for owner in owners:
        module = modules[owner]
        if not isinstance(module, SUPPORTED_MODULES):
            raise ValueError(
                f"params: Kronfluence scores only Linear and Conv2d layers; {owner or 'the model'!r} is a "
                f"{type(module).__name__}; pass params= naming only such layers' parameters"
            )
        missing = [f"{owner}.{p}" for p, _ in module.named_parameters(recurse=False)
                   if f"{owner}.{p}" not in problem.param_names]
        if missing:
            raise ValueError(f"params: Kronfluence scores a layer's parameters together; add {missing} or drop "
                             f"the other parameters of {owner!r}")
    return owners


def _sampled_labels(outputs: Tensor, loss_fn) -> Tensor:
    """Labels drawn from the model's predictive distribution (the true Fisher): Bernoulli of the sigmoid
    for one logit (binary cross-entropy), categorical of the softmax otherwise."""
    with torch.no_grad():
        if loss_fn is binary_cross_entropy_loss:
            return torch.bernoulli(torch.sigmoid(outputs[:, 0]))
        return torch.multinomial(torch.softmax(outputs, dim=1), 1).flatten()


def _task(problem: ScoringProblem, modules: list[str], prepared) -> Any:
    """A Kronfluence ``Task``: the problem's per-sample loss for training, the objective as measurement."""
    from kronfluence.task import Task

    loss_fn, objective, linear = problem.loss_fn, problem.objective, problem.objective.linear
    aggregate = problem.aggregate

    class ObjectiveTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            outputs = model(x)
            labels = _sampled_labels(outputs, loss_fn) if sample else y
            return loss_fn(outputs, labels).sum()

        def compute_measurement(self, batch, model):
            x, y, s = batch if len(batch) == 3 else (*batch, None)
            if not aggregate:  # each query's own loss: Kronfluence takes per-query gradients of the sum
                return loss_fn(model(x), y).sum()
            sums = objective.chunk_sums(model(x), y, s, loss_fn)
            if not linear and x.shape[0] != prepared.labels.shape[0]:
                raise RuntimeError("a non-linear objective must be measured on the whole target set at once")
            return prepared.combine(sums)

        def get_influence_tracked_modules(self):
            return modules

    return ObjectiveTask()


def _arguments(problem: ScoringProblem, strategy: str, use_empirical_fisher: bool):
    """Kronfluence's factor and score arguments: its defaults, in float64 for a float64 model."""
    from kronfluence.arguments import FactorArguments, ScoreArguments

    dtype = torch.float64 if problem.dtype == torch.float64 else torch.float32
    factor_args = FactorArguments(
        strategy=strategy, use_empirical_fisher=use_empirical_fisher, activation_covariance_dtype=dtype,
        gradient_covariance_dtype=dtype, per_sample_gradient_dtype=dtype, lambda_dtype=dtype,
    )
    score_args = ScoreArguments(
        damping_factor=problem.damping if problem.damping > 0 else DEFAULT_DAMPING, aggregate_query_gradients=problem.aggregate,
        per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=dtype,
    )
    return factor_args, score_args


def _factors_name(problem: ScoringProblem, modules: list[str], factor_args) -> str:
    """Identity of the fitted factors: model hash, training-data fingerprint, modules, loss and options."""
    identity = {
        "model_hash": model_hash(problem.model),
        "train_hash": data_hash(problem.train.source),
        "device": str(problem.device),
        "dtype": str(problem.dtype),
        "modules": modules,
        "loss": plain_value(problem.loss_fn),
        "train_loss": problem.train_loss,
        "train_attack": plain_value(problem.train_attack),
        "seed": problem.seed,
        "factor_args": factor_args.to_str_dict(),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _training_set(problem: ScoringProblem) -> TensorDataset:
    """The training inputs (at ``train_attack`` for ``train_loss="adversarial"``) and labels, in order."""
    xs, ys = [], []
    for _, x, y in train_batches(problem, problem.params, desc="ekfac training set"):
        xs.append(x)
        ys.append(y)
    return TensorDataset(torch.cat(xs), torch.cat(ys))


def _target_set(prepared) -> TensorDataset:
    parts = (prepared.inputs, prepared.labels) if prepared.groups is None else (
        prepared.inputs, prepared.labels, prepared.groups)
    return TensorDataset(*parts)


def kronfluence_scores(problem: ScoringProblem, strategy: str, use_empirical_fisher: bool) -> Tensor:
    """Kronfluence's summed pairwise scores of every training sample against the objective, ``(n_train,)``
    (positive = helpful), or with ``problem.aggregate`` False the ``(n_train, n_target)`` scores against each
    target's own loss; the factors are fitted once per identity (see the module docstring)."""
    _kronfluence()
    from kronfluence.analyzer import Analyzer, prepare_model

    strategy = check_choice(strategy, "strategy", STRATEGIES)
    check_bool(use_empirical_fisher, "use_empirical_fisher")
    if not use_empirical_fisher and problem.loss_fn not in (cross_entropy_loss, binary_cross_entropy_loss):
        raise ValueError("use_empirical_fisher: the true Fisher samples labels for the default losses only; "
                         "pass use_empirical_fisher=True with a custom loss_fn")
    if problem.forward is not None:
        raise ValueError("method: Kronfluence scores the model itself, not a custom forward")
    modules = tracked_modules(problem)
    prepared = problem.objective.prepare(problem.module_at(problem.params), problem.target, seed=problem.seed)
    factor_args, score_args = _arguments(problem, strategy, use_empirical_fisher)
    factors_name = _factors_name(problem, modules, factor_args)
    train = _training_set(problem)
    query = _target_set(prepared)
    task = _task(problem, modules, prepared)
    model = prepare_model(copy.deepcopy(problem.model).to(problem.device), task)
    logging.getLogger("kronfluence").setLevel(logging.WARNING)
    analyzer = Analyzer("robust_infl", model, task, cpu=problem.device.type == "cpu",
                        disable_tqdm=not problem.progress, output_dir=str(_cache()))
    batch = problem.train.batch_size
    query_batch = len(query) if problem.aggregate and not problem.objective.linear else min(len(query), batch)
    scores_name = f"{factors_name}-{hashlib.sha256(repr(score_args).encode()).hexdigest()[:8]}"
    with warnings.catch_warnings(), seeded(problem.seed, problem.device, numpy=False):
        warnings.filterwarnings("ignore", category=FutureWarning, module="kronfluence")  # its torch.cuda.amp use
        analyzer.fit_all_factors(factors_name, train, per_device_batch_size=batch, factor_args=factor_args)
        analyzer.compute_pairwise_scores(
            scores_name, factors_name, query_dataset=query, train_dataset=train,
            per_device_query_batch_size=query_batch, per_device_train_batch_size=batch, score_args=score_args,
            overwrite_output_dir=True,
        )
    scores = analyzer.load_pairwise_scores(scores_name)["all_modules"]
    shutil.rmtree(analyzer.scores_output_dir(scores_name), ignore_errors=True)
    scores = (scores.reshape(-1) if problem.aggregate else scores.T).to(device=problem.device, dtype=problem.dtype)
    check_finite_results(scores, "Kronfluence scores", "the training set (increase damping)")
    return scores


@register_method("ekfac", per_target=True)
def ekfac_influence(problem: ScoringProblem, *, strategy: str = "ekfac", use_empirical_fisher: bool = False) -> Tensor:
    """EK-FAC influence-function harm scores through Kronfluence, shape ``(n_train,)``; with the scoring option
    ``aggregate=False`` the ``(n_train, n_target)`` matrix of harms on each target sample's own loss (``Utility``
    and ``Robust``).

    Args:
        strategy: Kronfluence's curvature approximation: ``"ekfac"`` (default), ``"kfac"``,
            ``"diagonal"`` or ``"identity"`` (no curvature: then exactly ``"ip"``'s scores).
        use_empirical_fisher: Kronfluence's option: the Fisher at the true labels (``True``) or at
            labels sampled from the model (``False``, the true Fisher; default losses only).

    ``problem.damping`` is Kronfluence's ``damping_factor`` (added to the approximate curvature's
    eigenvalues); ``damping=0`` (``influence``'s default) uses Kronfluence's default, 1e-8. Scored
    parameters must be whole ``Linear`` / ``Conv2d`` layers. Needs the ``ekfac`` extra
    (``ImportError`` naming it otherwise).
    """
    return -kronfluence_scores(problem, strategy, use_empirical_fisher)


@register_method("kfac", per_target=True)
def kfac_influence(problem: ScoringProblem, *, use_empirical_fisher: bool = False) -> Tensor:
    """K-FAC influence-function harm scores through Kronfluence (``"ekfac"`` with ``strategy="kfac"``)."""
    return -kronfluence_scores(problem, "kfac", use_empirical_fisher)
