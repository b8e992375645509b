"""Hessian-free inner-product influence (IP): the Hessian replaced by the identity.

    harm_i = - <grad f(theta), grad l_i(theta)>

(arXiv 2405.17490). With one aggregate objective all scores are a single forward-mode
directional derivative of the per-sample training losses along ``grad f``, streamed over the
training set: about the cost of a few forward passes, no per-sample gradients.
"""

from __future__ import annotations

import torch

from attacks.validation import check_bool
from robust_infl.engine import ScoringProblem, harm_along, harm_matrix, objective_gradient, target_gradients
from robust_infl.grad_norms import renormalised
from robust_infl.methods import register_method

__all__ = ["inner_product_influence", "per_target_harm"]


@register_method("ip", per_target=True)
def inner_product_influence(problem: ScoringProblem, *, renormalize: bool = False) -> torch.Tensor:
    """IP harm scores; ``problem.damping`` is ignored (H = I).

    With the scoring option ``aggregate=True`` (default): shape ``(n_train,)``, ``-<grad f, grad l_i>``
    by one jvp pass. ``aggregate=False``: the ``(n_train, n_target)`` matrix ``-<grad f_j, grad l_i>`` where ``f_j``
    is target sample j's own loss (at its adversarial point for ``Robust``), from per-sample
    gradients in batches (memory ``O((batch + n_target) * n_params)``). For ``Utility`` and
    ``Robust`` its row means equal the aggregate scores. Fairness objectives have no
    per-sample form and raise ``ValueError``.

    ``renormalize=True`` divides each training sample's score by its gradient norm
    ``||grad l_i||`` (renormalised influence, Hammoudeh & Lowd 2022; layer-factored norms, see
    :func:`robust_infl.grad_norms.renormalised`): a direction-only score, so that well-fitted
    samples with tiny gradients, such as backdoor poisons, are not ranked last for that reason alone.
    """
    check_bool(renormalize, "renormalize")
    params = problem.params
    if problem.aggregate:
        scores = harm_along(problem, params, objective_gradient(problem, params))
        return renormalised(problem, params, scores) if renormalize else scores
    out = per_target_harm(problem, params)
    return renormalised(problem, params, out.T).T if renormalize else out


def per_target_harm(problem: ScoringProblem, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """The ``(n_train, n_target)`` IP matrix ``-<grad f_j, grad l_i>`` at ``params`` (``f_j``: target sample j's
    own loss, at its adversarial point for ``Robust``), from per-sample gradients in batches."""
    return harm_matrix(problem, params, target_gradients(problem, params))
