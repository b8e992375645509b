"""Exact influence function ("if-exact") with an explicitly built, damped Hessian.

    H = (1/n) sum_i Hessian(l_i) + damping * I,     harm_i = - grad f^T H^{-1} grad l_i

(Koh & Liang 2017). With theta minimising (1/n) sum_i l_i + damping/2 * ||theta||^2, removing
sample i moves theta by about (1/n) H^{-1} grad l_i, so ``harm_i / n`` is the first-order
predicted DECREASE of the objective. ``H`` is built column by column from Hessian-vector
products over one pass of the training set; the linear system is solved in float64 and the
scores come from one directional-derivative pass along ``H^{-1} grad f``. Only for small
parameter counts (at most :data:`MAX_PARAMS` scored parameters).
"""

from __future__ import annotations

import torch

from attacks.validation import check_int
from robust_infl.engine import (ScoringProblem, harm_of_directions, hessian_vector_products,
                                solve_right_hand_sides)
from robust_infl.methods import register_method
from robust_infl.inputs import resolve_param_names

__all__ = ["MAX_PARAMS", "exact_influence", "damped_hessian", "check_exact_size"]

MAX_PARAMS = 5000
"""Largest number of scored parameters for which "if-exact" builds the d x d Hessian."""


def check_exact_size(model: torch.nn.Module, params=None) -> None:
    """Before any compute: ``ValueError`` naming ``params`` when ``model``'s scored parameters (``params``, or
    all trainable ones) exceed :data:`MAX_PARAMS`, so that "if-exact" is refused before training, not after."""
    sizes = dict(model.named_parameters())
    count = sum(sizes[name].numel() for name in resolve_param_names(model, params))
    if count > MAX_PARAMS:
        raise ValueError(f"params: method 'if-exact' supports at most {MAX_PARAMS} scored parameters, the model has "
                         f"{count}; score a subset (params / --params, e.g. {list(sizes)[-2:]}) or use method 'ip'")


def damped_hessian(problem: ScoringProblem, hvp_chunk_size: int = 256) -> torch.Tensor:
    """The symmetrised ``(d, d)`` float64 matrix ``(1/n) sum_i Hessian(l_i) + damping * I``."""
    if problem.n_params > MAX_PARAMS:
        raise ValueError(
            f"params: method 'if-exact' builds the full Hessian and supports at most {MAX_PARAMS} scored "
            f"parameters, got {problem.n_params}; score a subset (e.g. params=[last-layer names]) or use method='ip'"
        )
    eye = torch.eye(problem.n_params, dtype=problem.dtype, device=problem.device)
    hessian = hessian_vector_products(problem, problem.params, eye, chunk_size=hvp_chunk_size).double()
    hessian = (hessian + hessian.T) / 2
    return hessian + problem.damping * torch.eye(problem.n_params, dtype=torch.float64, device=problem.device)


@register_method("if-exact", per_target=True)
def exact_influence(problem: ScoringProblem, *, hvp_chunk_size: int = 256) -> torch.Tensor:
    """Exact-Hessian harm scores ``-grad f^T H^{-1} grad l_i``, shape ``(n_train,)``; with the scoring option
    ``aggregate=False`` the ``(n_train, n_target)`` matrix ``-grad f_j^T H^{-1} grad l_i`` (``f_j``: target
    sample j's own loss), one solve with every target gradient as a right-hand side.

    ``hvp_chunk_size`` bounds how many Hessian columns are computed at once (memory). Raises
    ``ValueError`` naming ``params`` above :data:`MAX_PARAMS` scored parameters, and naming
    ``damping`` when the damped Hessian is singular.
    """
    check_int(hvp_chunk_size, "hvp_chunk_size", minimum=1)
    hessian = damped_hessian(problem, hvp_chunk_size)
    try:
        directions = torch.linalg.solve(hessian, solve_right_hand_sides(problem).T).T
    except torch.linalg.LinAlgError as err:
        raise ValueError(
            f"damping: the damped Hessian is singular (damping={problem.damping}); use damping > 0"
        ) from err
    return harm_of_directions(problem, directions)
