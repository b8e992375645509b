"""Turn harm scores into a data selection: prune (keep-mask), reweight (per-sample weights), relabel.

Scores follow the project's sign convention: larger = more harmful. Every rule spends the same
budget, ``budget_size(n, fraction)`` samples, so a defence and its baselines are comparable.
Ties are broken by sample index (the earlier sample counts as more harmful), so results are
deterministic.
"""

from __future__ import annotations

import math

import torch

from attacks.plumbing import make_generator
from attacks.validation import check_choice, check_fraction, check_number, check_positive

__all__ = ["prune", "reweight", "relabel", "budget_size", "check_budget", "most_harmful", "uniform_scores",
           "REWEIGHT_SCHEMES"]

REWEIGHT_SCHEMES = ("smooth", "hard")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the weights are float32


def _check_scores(scores) -> torch.Tensor:
    if not torch.is_tensor(scores):
        try:
            scores = torch.as_tensor(scores)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TypeError(f"scores: must be a 1-D tensor or array of numbers, got {type(scores).__name__}") from err
    if scores.dim() != 1 or scores.numel() == 0:
        raise ValueError(f"scores: must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise TypeError(f"scores: must be real numbers, got {scores.dtype}")
    scores = scores.detach().cpu().to(torch.float64)
    if not torch.isfinite(scores).all():
        raise ValueError("scores: contains NaN or infinite values")
    return scores


def budget_size(n: int, fraction: float) -> int:
    """Number of samples a ``fraction`` of ``n`` removes: ``fraction * n`` rounded half up."""
    return int(math.floor(check_fraction(fraction, "fraction", allow_zero=True) * n + 0.5))


def check_budget(n: int, fraction: float, name: str = "fraction", what: str = "samples", *,
                 allow_none: bool = True) -> int:
    """``budget_size(n, fraction)``, or ``ValueError`` starting with ``name`` when it is all ``n`` samples
    (after rounding, e.g. 0.999 of 300), which would leave nothing to train on, or (with
    ``allow_none=False``) when it is no sample at all."""
    k = budget_size(n, fraction)
    if k == 0 and not allow_none:
        raise ValueError(f"{name}: {fraction:g} of {n} {what} removes none of them (the budget is {name} * n "
                         f"rounded half up); use a {name} >= {0.5 / n:.3g}")
    if k >= n:
        raise ValueError(f"{name}: {fraction:g} of {n} {what} selects all {n} of them (the budget is "
                         f"fraction * n rounded half up); use a smaller fraction")
    return k


def most_harmful(scores, fraction: float) -> torch.Tensor:
    """Boolean mask of the ``budget_size(n, fraction)`` samples with the largest harm."""
    scores = _check_scores(scores)
    k = budget_size(scores.numel(), fraction)
    order = torch.sort(-scores, stable=True).indices
    flagged = torch.zeros(scores.numel(), dtype=torch.bool)
    flagged[order[:k]] = True
    return flagged


def prune(scores, fraction: float) -> torch.Tensor:
    """Keep-mask (``torch.bool``, True = keep) that drops the ``fraction`` with the largest harm.

    A fraction that would drop every sample (after rounding) raises ``ValueError``.
    """
    scores = _check_scores(scores)
    check_budget(scores.numel(), fraction)
    return ~most_harmful(scores, fraction)


def reweight(scores, scheme: str = "smooth", *, fraction: float, temperature: float = 1.0,
             w_max: float = 1.0) -> torch.Tensor:
    """Per-sample training weights in ``[0, w_max]`` (float32), non-increasing in harm.

    - ``scheme="hard"``: ``w_max`` for kept samples and 0 for the ``fraction`` with the largest harm
      (the weights of :func:`prune`).
    - ``scheme="smooth"``: ``w_max * sigmoid(-(harm - c) / (temperature * s))``, with ``c`` the harm
      threshold of the same budget (midway between the last pruned and the first kept score) and
      ``s`` the standard deviation of the scores. The top ``fraction`` gets weights below
      ``w_max / 2``; a small temperature approaches the hard scheme, a large one uniform weights.

    A budget of no sample (``fraction * n`` rounding to 0) leaves every weight at ``w_max``, as
    :func:`prune` keeps every sample; one that would down-weight every sample raises ``ValueError``.
    """
    scores = _check_scores(scores)
    check_choice(scheme, "scheme", REWEIGHT_SCHEMES)
    k = check_budget(scores.numel(), fraction)
    flagged = most_harmful(scores, fraction)
    check_number(w_max, "w_max", minimum=0, include_minimum=False, maximum=FLOAT32_MAX)
    if scheme == "smooth":
        check_positive(temperature, "temperature")
    if scheme == "hard" or k == 0:  # no sample flagged: every weight w_max, as prune keeps every sample
        return (~flagged).to(torch.float32) * float(w_max)
    spread = scores.std(unbiased=False)
    scale = spread if spread > 0 else torch.tensor(1.0, dtype=torch.float64)
    center = 0.5 * (scores[flagged].min() + scores[~flagged].max())
    return (float(w_max) * torch.sigmoid(-(scores - center) / (temperature * scale))).to(torch.float32)


def relabel(scores, labels: torch.Tensor, predictions: torch.Tensor, fraction: float) -> tuple:
    """Relabel the ``fraction`` with the largest harm to the model's prediction (label-noise repair).

    ``predictions`` are class indices ``(n,)``, or the model's outputs: logits ``(n, C)`` (argmax) or
    one binary logit ``(n, 1)`` (positive = class 1). Returns ``(new_labels, flagged)``; every
    sample is kept (a fraction may relabel all of them).
    """
    scores = _check_scores(scores)
    n = scores.numel()
    if not torch.is_tensor(labels) or labels.shape != (n,) or labels.is_floating_point():
        raise ValueError(f"labels: must be an integer tensor of shape ({n},)")
    if not torch.is_tensor(predictions) or predictions.shape[0] != n or predictions.dim() > 2:
        raise ValueError(f"predictions: must be class indices ({n},) or model outputs ({n}, C)")
    if predictions.dim() == 2:
        n_classes = max(predictions.shape[1], 2)
        if int(labels.max()) >= n_classes or int(labels.min()) < 0:
            raise ValueError(f"predictions: outputs of {n_classes} classes cannot relabel labels that reach class "
                             f"{int(labels.max()) if int(labels.max()) >= n_classes else int(labels.min())}")
        predicted = (predictions[:, 0] > 0).long() if predictions.shape[1] == 1 else predictions.argmax(dim=1)
    elif predictions.is_floating_point():
        raise ValueError("predictions: a 1-D tensor must hold class indices, not floats")
    else:
        predicted = predictions
    flagged = most_harmful(scores, fraction)
    new_labels = labels.clone()
    new_labels[flagged] = predicted[flagged].to(labels.device, labels.dtype)
    return new_labels, flagged


def uniform_scores(n: int, seed: int) -> torch.Tensor:
    """``n`` uniform float64 scores from a generator seeded with ``seed``: the random-selection baseline
    (same seed, same selection)."""
    return torch.rand(n, generator=make_generator(seed), dtype=torch.float64)
