"""SPECTRE (Hayase, Kong, Somani and Oh, ICML 2021, "SPECTRE: Defending Against Backdoor Attacks Using
Robust Statistics"): robust covariance estimation, whitening and QUantum Entropy (QUE) scores on the
penultimate features of each class; no trusted data, no trigger.

Per class, following the authors' code (``SewoongLab/spectre-defense``, ``quantum_filters.jl`` and
``dkk17.jl``), with ``eps`` the expected number of poisons in the class:

1. centre the class's features and project them on their top ``K`` principal components (``K = 100``,
   at most the features' rank);
2. for each ``k`` of ``round(linspace(1, sqrt(K), 10) ** 2)``: estimate the covariance of the first ``k``
   components robustly (:func:`robust_covariance_subset`: Diakonikolas et al. 2017's filter, removing at
   most ``2 eps`` samples), whiten every sample by it (``k = 1``: no whitening) and score it by QUE
   (:func:`que_scores`, ``alpha = 4``); the ``1.5 eps`` highest are the suspects;
3. keep the ``k`` whose suspects' removal leaves the largest QUE statistic ``tr(Sigma' M)`` of the ``K``
   components (whitened by the covariance of the kept samples).

The class with the largest statistic is the suspected target (BackdoorBench's choice when the target is
unknown); its samples are ranked by their QUE scores. ``eps`` comes from the budget: the budget's
sample count over 1.5 (so that SPECTRE's ``1.5 eps`` removal is the budget), at most a third of the class.
The eigenvector of the filter is computed with ARPACK from a fixed start (the authors' ``ones``), so the
scores are deterministic.

One departure: every whitening floors the covariance's eigenvalues at 1e-3 of the largest. The penultimate
features of a ReLU network have near-degenerate directions (a unit active in a handful of samples of a
class); without the floor, whitening by the covariance of the samples that omit them divides by almost
zero and the class statistic grows without bound (to 6e8 on a clean MNIST class), which then decides the
suspected class. With it, the in-class QUE ranking of BadNets poisons on MNIST is unchanged or better
(AUROC 0.99-1.0). Choosing the class by the largest statistic remains the weak step on MNIST (see
``docs/poisoned-data.md``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.linalg import expm
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import nn

from attacks.inputs import as_data
from attacks.validation import check_fraction, check_int, check_positive

from .poison_detection import layer_features
from .selection import budget_size

__all__ = ["que_scores", "robust_covariance_subset", "spectre_class_scores", "spectre_scores"]

SPECTRE_ALPHA, SPECTRE_TAU, SPECTRE_DIMS = 4.0, 0.1, 100
_FILTER_LIMIT, _REMOVED = 2.0, 1.5  # the filter removes at most 2 eps samples; the flagged are 1.5 eps
_C = 10.0  # the filter's constant C of DKK17
_FLOOR = 1e-3  # eigenvalue floor of the whitening, relative to the largest (see the module)


def _inverse_sqrt(matrix: np.ndarray) -> np.ndarray:
    """``matrix ** -1/2`` of a symmetric positive semi-definite matrix (eigenvalues floored at ``_FLOOR`` times
    the largest)."""
    values, vectors = np.linalg.eigh(matrix)
    values = np.maximum(values, max(float(values.max()), 1e-300) * _FLOOR)
    return (vectors / np.sqrt(values)) @ vectors.T


def _covariance(rows: np.ndarray, *, corrected: bool = True) -> np.ndarray:
    return np.atleast_2d(np.cov(rows, rowvar=False, bias=not corrected))


def que_scores(white: np.ndarray, alpha: float = SPECTRE_ALPHA) -> tuple:
    """``(scores, statistic)``: the QUE score ``x_i' M x_i`` of every row of ``white`` (whitened samples) and
    ``tr(Sigma' M)``, with ``Sigma'`` their covariance and ``M = exp(alpha (Sigma' - I) / (||Sigma'||_2 - 1))``
    scaled to trace 1 (``M = 1`` for one dimension; ``I / k`` when ``||Sigma'||_2 <= 1``)."""
    white = np.asarray(white, dtype=np.float64).reshape(len(white), -1)
    sigma = _covariance(white)
    k = sigma.shape[0]
    top = float(np.linalg.norm(sigma, 2))
    if k == 1:
        m = np.ones((1, 1))
    elif top <= 1.0 + 1e-12:
        m = np.eye(k) / k
    else:
        m = expm(alpha * (sigma - np.eye(k)) / (top - 1.0))
        m /= np.trace(m)
    return _quadratic_forms(white, m), float(np.trace(sigma @ m))


def _keep_lowest(keep: np.ndarray, scores: np.ndarray, limit: int) -> np.ndarray:
    """``keep``, plus the ``n - limit`` lowest ``scores`` (a filter step never removes more than ``limit``)."""
    out = keep.copy()
    out[np.argsort(scores, kind="stable")[:max(0, len(scores) - limit)]] = True
    return out


def _quadratic_forms(rows: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``x_i' matrix x_i`` for every row ``x_i``."""
    return ((rows @ matrix) * rows).sum(1)


def _top_eigenpair(y: np.ndarray) -> tuple:
    """Largest-magnitude eigenpair of ``(1/n) sum_i (y_i y_i')^flat (y_i y_i')^flat' - I^flat I^flat'``."""
    n, d = y.shape
    identity = np.eye(d).ravel()
    if d <= 12:
        z = (y[:, :, None] * y[:, None, :]).reshape(n, d * d)
        values, vectors = np.linalg.eigh(z.T @ z / n - np.outer(identity, identity))
        top = int(np.argmax(np.abs(values)))
        return float(values[top]), vectors[:, top]

    def apply(v):
        v = v.reshape(d, d)
        return ((y.T * _quadratic_forms(y, v)) @ y / n - np.trace(v) * np.eye(d)).ravel()

    operator = LinearOperator((d * d, d * d), matvec=apply, dtype=np.float64)
    values, vectors = eigsh(operator, k=1, which="LM", v0=np.ones(d * d) / d)
    return float(values[0]), vectors[:, 0]


def _tail(t: np.ndarray, eps: float) -> np.ndarray:
    """DKK17's tail bound of the filter (``cov_Tail`` of the authors' code)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = 3 * eps / (t * np.log(t)) ** 2
    return np.where(t <= 10 * math.log(1 / eps), 1.0, bound)


def _filter_step(s: np.ndarray, eps: float, tau: float, limit: int):
    """One step of the covariance filter: the rows to keep, or None when the covariance is accepted (or no
    threshold is found)."""
    n, d = s.shape
    y = s @ _inverse_sqrt(s.T @ s / n)
    norms = (y * y).sum(1)
    far = norms >= _C * d * math.log(n / tau)
    if far.any():
        return _keep_lowest(~far, norms, limit)
    value, vector = _top_eigenpair(y)
    if value <= 1 + _C * eps * math.log(1 / eps) ** 2:  # (1 + C eps log^2(1/eps)) Q / 2, Q = 2 ||v||^2 = 2
        return None
    v = vector.reshape(d, d)
    v = (v + v.T) / 2
    p = (_quadratic_forms(y, v) - np.trace(v)) / math.sqrt(2)
    diffs = np.abs(p - np.median(p))
    ordered = np.sort(diffs)
    t = ordered - 3.0
    rank = np.arange(1, n + 1) / n
    found = np.flatnonzero((t > 0) & (rank >= _tail(np.where(t > 0, t, 1.0), eps)))
    if found.size == 0:
        return None
    return _keep_lowest(diffs <= t[found[0]], diffs, limit)


def robust_covariance_subset(s: np.ndarray, eps: float, *, tau: float = SPECTRE_TAU, limit: int) -> np.ndarray:
    """Boolean mask of the rows of ``s`` kept by Diakonikolas et al. (2017)'s robust covariance filter
    (``eps``: the corrupted fraction; at most ``limit`` rows removed), iterated until it accepts."""
    s = np.asarray(s, dtype=np.float64)
    index = np.arange(len(s))
    while limit > 0:
        keep = _filter_step(s[index], eps, tau, limit)
        if keep is None or keep.all():
            break
        limit -= int((~keep).sum())
        index = index[keep]
    mask = np.zeros(len(s), dtype=bool)
    mask[index] = True
    return mask


def spectre_class_scores(features: np.ndarray, eps: int, *, alpha: float = SPECTRE_ALPHA, tau: float = SPECTRE_TAU,
                         max_dims: int = SPECTRE_DIMS) -> tuple:
    """``(scores, statistic)`` of one class's ``features`` (rows): the QUE scores of the selected ``k`` and the
    class's QUE statistic, for ``eps`` expected poisons (see the module)."""
    features = np.asarray(features, dtype=np.float64)
    n = len(features)
    limit, flagged = round(_FILTER_LIMIT * eps), round(_REMOVED * eps)
    centred = features - features.mean(0)
    _, singular, vt = np.linalg.svd(centred, full_matrices=False)
    rank = int((singular > singular[0] * 1e-6).sum()) if singular.size and singular[0] > 0 else 0
    dims = min(max_dims, rank, n - limit - 2)
    if dims < 1:
        return np.zeros(n), 0.0
    projected = centred @ vt[:dims].T
    best_scores, best_statistic = np.zeros(n), -math.inf
    for k in np.unique(np.round(np.linspace(1, math.sqrt(dims), 10) ** 2).astype(int)):
        part = projected[:, :k]
        if k == 1:
            white = part
        else:
            kept = robust_covariance_subset(part, eps / n, tau=tau, limit=limit)
            white = part @ _inverse_sqrt(_covariance(part[kept], corrected=False))
        scores, _ = que_scores(white, alpha)
        selected = np.ones(n, dtype=bool)
        selected[np.argsort(-scores, kind="stable")[:flagged]] = False
        _, statistic = que_scores(projected @ _inverse_sqrt(_covariance(projected[selected])), alpha)
        if statistic > best_statistic:
            best_scores, best_statistic = scores, statistic
    return best_scores, best_statistic


def spectre_scores(model: nn.Module, train, *, budget: float, alpha: float = SPECTRE_ALPHA, tau: float = SPECTRE_TAU,
                   max_dims: int = SPECTRE_DIMS) -> torch.Tensor:
    """SPECTRE's scores of every training sample (larger = more suspicious), from the inputs of the model's last
    ``nn.Linear`` (its penultimate features): the samples of the class with the largest QUE statistic (the
    suspected target, ``int(y[scores.argmax()])``) first, by their QUE score; every other class after them,
    by the quantile of its samples' scores within the class. ``budget`` (a share of the training set) sets
    the expected poison count (see the module)."""
    X, y = as_data(train, "train")[:2]
    budget = check_fraction(budget, "budget")
    alpha = check_positive(alpha, "alpha")
    tau = check_fraction(tau, "tau")
    max_dims = check_int(max_dims, "max_dims", minimum=1)
    features = layer_features(model, X, linear="last").numpy()
    labels = y.cpu().numpy()
    expected = max(1, round(budget_size(len(labels), budget) / _REMOVED))
    quantiles = np.zeros(len(labels))
    statistics = {}
    for c in np.unique(labels):
        index = np.flatnonzero(labels == c)
        scores, statistics[c] = spectre_class_scores(features[index], min(expected, max(1, len(index) // 3)),
                                                     alpha=alpha, tau=tau, max_dims=max_dims)
        quantiles[index] = (np.argsort(np.argsort(scores, kind="stable"), kind="stable") + 1) / len(index)
    target = max(statistics, key=lambda c: (statistics[c], -c))
    return torch.from_numpy(quantiles + (labels == target)).double()
