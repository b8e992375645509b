"""DataInf (Kwon et al. 2023, "DataInf: Efficiently Estimating Data Influence in LoRA-tuned LLMs
and Diffusion Models"): a closed-form, layer-wise inverse-Hessian approximation.

The Hessian is replaced by the block-diagonal damped Fisher, one block per layer l:
``G_l + lambda_l I`` with ``G_l = (1/n) sum_i g_il g_il^T`` (``g_il``: the layer-l part of the
gradient of sample i's loss). DataInf swaps the inverse and the average,

    (G_l + lambda_l I)^{-1}  ~=  (1/n) sum_i (g_il g_il^T + lambda_l I)^{-1},

and inverts each rank-one term with Sherman-Morrison,
``(g g^T + lambda I)^{-1} = (1/lambda) (I - g g^T / (lambda + ||g||^2))``, so for ``v = grad f``

    x_l = (1/(n lambda_l)) sum_i [ v_l - (g_il^T v_l) / (lambda_l + ||g_il||^2) g_il ]
        = (v_l - u_l / n) / lambda_l,      u_l = sum_i c_il g_il,  c_il = (g_il^T v_l) / (lambda_l + ||g_il||^2)

and ``harm_k = -sum_l <x_l, g_kl>``. The default damping is ``lambda_l = lambda_scale * mean_i
||g_il||^2`` (the paper's heuristic with ``lambda_scale = 0.1``). A "layer" is the module owning a
scored parameter (its weight and bias together).

Per target (scoring option ``aggregate=False``): ``v`` is each target sample's own loss gradient ``v_j``
(at its attack point for ``Robust``); ``x_l`` is linear in ``v`` (the damping does not depend on it), so
``harm_kj = -sum_l <x_l(v_j), g_kl>``, whose row means are the aggregate scores for ``Utility`` and
``Robust``. Computed from per-sample gradients in three passes over the training set (the norms and
``g_il^T v_jl``; ``u_jl = sum_i c_ilj g_il`` as one matrix product per batch and layer; the scores), with
memory ``O((batch + n_target) * n_params + n_train * n_target * n_layers)``.

Cost (aggregate): one pass of per-sample gradients (``vmap(grad)``, for the norms and ``g_il^T v_l``), one
pass of ordinary weighted backward passes (``u_l`` is the layer-l part of the gradient of
``sum_i c_il l_i``; one per layer, vectorised over layers) and one forward-mode pass for the scores.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import grad, vmap

from attacks.validation import check_positive
from robust_infl.engine import (
    Params,
    ScoringProblem,
    flat_objective_gradient,
    harm_along,
    per_sample_gradients,
    target_gradients,
    train_batches,
)
from robust_infl.methods import register_method

__all__ = ["datainf_influence", "layer_columns"]


def layer_columns(problem: ScoringProblem) -> list[Tensor]:
    """For each layer (module owning scored parameters), the indices of its flattened-gradient columns."""
    columns: dict[str, list[Tensor]] = {}
    offset = 0
    for name in problem.param_names:
        size = problem.params[name].numel()
        columns.setdefault(name.rpartition(".")[0], []).append(torch.arange(offset, offset + size))
        offset += size
    return [torch.cat(parts).to(problem.device) for parts in columns.values()]


def _layer_matrix(problem: ScoringProblem, columns: list[Tensor]) -> Tensor:
    """``(n_layers, n_params)`` 0/1 matrix: row l selects layer l's columns."""
    selector = torch.zeros(len(columns), problem.n_params, dtype=problem.dtype, device=problem.device)
    for layer, cols in enumerate(columns):
        selector[layer, cols] = 1
    return selector


@register_method("datainf", per_target=True)
def datainf_influence(problem: ScoringProblem, *, lambda_scale: float = 0.1) -> Tensor:
    """DataInf harm scores, shape ``(n_train,)`` (with ``aggregate=False`` the ``(n_train, n_target)``
    matrix, see the module docstring).

    Args:
        lambda_scale: ``lambda_l = lambda_scale * mean_i ||g_il||^2`` for each layer l.

    ``problem.damping`` is not used (DataInf sets its own per-layer damping). A layer whose
    per-sample gradients are all zero contributes nothing.
    """
    lambda_scale = check_positive(lambda_scale, "lambda_scale")
    if not problem.aggregate:
        return _per_target(problem, lambda_scale)
    params = problem.params
    v = flat_objective_gradient(problem, params)
    selector = _layer_matrix(problem, layer_columns(problem))
    n_layers = selector.shape[0]

    norms = torch.empty(problem.n_train, n_layers, dtype=problem.dtype, device=problem.device)
    dots = torch.empty_like(norms)
    for start, x, y in train_batches(problem, params, desc="datainf per-sample gradients"):
        g = per_sample_gradients(problem, params, (x, y), f"the training batch starting at index {start}")
        norms[start : start + x.shape[0]] = (g * g) @ selector.T
        dots[start : start + x.shape[0]] = (g * v) @ selector.T
    lambdas = lambda_scale * norms.mean(dim=0)
    active = lambdas > 0
    coefficients = torch.where(active, dots / (lambdas + norms).clamp_min(torch.finfo(problem.dtype).tiny), 0.0)

    u = torch.zeros(n_layers, problem.n_params, dtype=problem.dtype, device=problem.device)
    for start, x, y in train_batches(problem, params, desc="datainf weighted gradients"):
        weights = coefficients[start : start + x.shape[0]].T  # (n_layers, b)

        def weighted_loss(p: Params, w: Tensor) -> Tensor:
            return (w * problem.loss_fn(problem.outputs(p, x), y)).sum()

        grads = vmap(grad(weighted_loss), in_dims=(None, 0))(params, weights)
        u += torch.cat([grads[name].reshape(n_layers, -1) for name in problem.param_names], dim=1).detach()
    u = (u * selector).sum(dim=0)  # layer l's block of the l-th weighted gradient

    layer_lambda = (selector * torch.where(active, lambdas, 1.0)[:, None]).sum(dim=0)
    layer_active = (selector * active[:, None].to(problem.dtype)).sum(dim=0)
    direction = layer_active * (v - u / problem.n_train) / layer_lambda
    return harm_along(problem, params, direction)


def _per_target(problem: ScoringProblem, lambda_scale: float) -> Tensor:
    """The ``(n_train, n_target)`` DataInf matrix: the aggregate computation with one ``v_j`` per target sample."""
    params = problem.params
    v = target_gradients(problem, params)  # (t, p)
    columns = layer_columns(problem)
    selector = _layer_matrix(problem, columns)
    n_layers, t = selector.shape[0], v.shape[0]

    def batches(desc: str):
        for start, x, y in train_batches(problem, params, desc=desc):
            yield start, per_sample_gradients(problem, params, (x, y), f"the training batch starting at index {start}")

    norms = torch.empty(problem.n_train, n_layers, dtype=problem.dtype, device=problem.device)
    dots = torch.empty(problem.n_train, n_layers, t, dtype=problem.dtype, device=problem.device)
    for start, g in batches("datainf per-sample gradients"):
        norms[start : start + g.shape[0]] = (g * g) @ selector.T
        for layer, cols in enumerate(columns):
            dots[start : start + g.shape[0], layer] = g[:, cols] @ v[:, cols].T
    lambdas = lambda_scale * norms.mean(dim=0)
    active = lambdas > 0
    denominator = (lambdas + norms).clamp_min(torch.finfo(problem.dtype).tiny)
    coefficients = torch.where(active[None, :, None], dots / denominator[:, :, None], 0.0)  # (n, L, t)

    u = torch.zeros(t, problem.n_params, dtype=problem.dtype, device=problem.device)
    for start, g in batches("datainf weighted gradients"):
        c = coefficients[start : start + g.shape[0]]
        for layer, cols in enumerate(columns):
            u[:, cols] += c[:, layer].T @ g[:, cols]

    layer_lambda = (selector * torch.where(active, lambdas, 1.0)[:, None]).sum(dim=0)
    layer_active = (selector * active[:, None].to(problem.dtype)).sum(dim=0)
    direction = layer_active * (v - u / problem.n_train) / layer_lambda  # (t, p)
    out = torch.empty(problem.n_train, t, dtype=problem.dtype, device=problem.device)
    for start, g in batches("datainf train x target"):
        out[start : start + g.shape[0]] = -(g @ direction.T)
    return out
