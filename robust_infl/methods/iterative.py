"""Influence functions with an iterative inverse-Hessian-vector product: "if-cg" and "if-lissa".

Both approximate ``x = (H + damping I)^{-1} grad f`` with Hessian-vector products only (never the
d x d Hessian), then score every training sample with one forward-mode pass:

    harm_i = - <x, grad l_i(theta)>                  (the same quantity as "if-exact")

- "if-cg": conjugate gradient (Hestenes & Stiefel 1952; Martens 2010 for HVPs); each iteration is
  one pass of Hessian-vector products over the training set. The damped Hessian must be positive
  definite (``damping > 0`` at a minimum of the training loss).
- "if-lissa": the stochastic LiSSA recursion (Agarwal et al. 2017, as used by Koh & Liang 2017)
  ``h_0 = v, h_j = v + (I - (H_j + damping I) / scale) h_{j-1}``, estimate ``h_depth / scale``,
  averaged over ``repeats``; ``H_j`` is the Hessian of the mean loss on a minibatch drawn with a
  generator seeded by ``problem.seed``. It converges when ``scale`` exceeds the largest eigenvalue
  of the damped Hessian and ``depth`` is large compared to ``scale / (smallest eigenvalue)``.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.func import grad, jvp, vmap
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from attacks.inputs import as_labels, check_inputs, collate
from attacks.plumbing import make_generator
from attacks.validation import check_int, check_positive
from robust_infl.engine import (
    Params,
    ScoringProblem,
    check_finite_results,
    flatten,
    harm_of_directions,
    hessian_vector_products,
    solve_right_hand_sides,
    unflatten,
)
from robust_infl.methods import register_method
from robust_infl.inputs import call_attack

__all__ = [
    "conjugate_gradient_influence",
    "conjugate_gradient_solve",
    "lissa_influence",
    "damped_hvp",
    "sampled_batch",
    "batch_hessian_vector_products",
    "largest_eigenvalue",
]

DIVERGENCE_FACTOR = 1e8
"""LiSSA is declared divergent when its iterate grows beyond this multiple of ``||v||``."""


def damped_hvp(problem: ScoringProblem, vector: Tensor) -> Tensor:
    """``(H + damping I) @ vector`` in float64, ``H`` the Hessian of the mean training loss."""
    product = hessian_vector_products(problem, problem.params, vector.to(problem.dtype)).double()
    return product + problem.damping * vector


@register_method("if-cg", per_target=True)
def conjugate_gradient_influence(problem: ScoringProblem, *, tol: float = 1e-6, max_iter: int = 100) -> Tensor:
    """Influence-function harm with ``(H + damping I)^{-1} grad f`` solved by conjugate gradient.

    With the scoring option ``aggregate=False``: the ``(n_train, n_target)`` matrix, one solve per target
    sample's own loss gradient ``grad f_j``, all run side by side (:func:`conjugate_gradient_solve`).

    Args:
        tol: stop when ``||residual|| <= tol * ||grad f||`` (per right-hand side).
        max_iter: at most this many iterations (one pass of HVPs over the training set each); a
            ``RuntimeWarning`` reports the residual if ``tol`` is not reached.

    Raises ``ValueError`` naming ``damping`` when CG meets a direction of non-positive curvature
    (the damped Hessian is not positive definite: increase ``damping``).
    """
    tol = check_positive(tol, "tol")
    max_iter = check_int(max_iter, "max_iter", minimum=1)
    directions = conjugate_gradient_solve(problem, solve_right_hand_sides(problem), tol=tol, max_iter=max_iter)
    return harm_of_directions(problem, directions)


def conjugate_gradient_solve(problem: ScoringProblem, rhs: Tensor, *, tol: float, max_iter: int) -> Tensor:
    """``(H + damping I)^{-1} b`` for each row ``b`` of ``rhs`` (``(k, n_params)``, float64) by conjugate gradient,
    the k solves side by side: one vectorised pass of HVPs over the training set per iteration, rows leaving
    once ``||residual|| <= tol * ||b||``. ``RuntimeWarning`` with the largest relative residual when some row
    has not converged after ``max_iter`` iterations; ``ValueError`` naming ``damping`` at non-positive
    curvature."""
    x = torch.zeros_like(rhs)
    residual, direction = rhs.clone(), rhs.clone()
    norms = rhs.norm(dim=1)
    targets, rr = tol * norms, (residual * residual).sum(dim=1)
    bar = tqdm(range(max_iter), desc="if-cg iterations", disable=None if problem.progress else True, leave=False)
    for _ in bar:
        active = torch.nonzero(rr.sqrt() > targets).flatten()
        if active.numel() == 0:
            break
        p = direction[active]
        product = damped_hvp(problem, p)
        curvature = (p * product).sum(dim=1)
        if bool((curvature <= 0).any()):
            raise ValueError(
                f"damping: the damped Hessian is not positive definite (curvature {float(curvature.min()):.3g} "
                f"along a CG direction, damping={problem.damping}); increase damping"
            )
        step = rr[active] / curvature
        x[active] += step[:, None] * p
        residual[active] -= step[:, None] * product
        rr_next = (residual[active] * residual[active]).sum(dim=1)
        direction[active] = residual[active] + (rr_next / rr[active])[:, None] * p
        rr[active] = rr_next
    bar.close()
    relative = rr.sqrt() / norms.clamp_min(1e-300)
    if bool((rr.sqrt() > targets).any()):
        warnings.warn(
            f"max_iter: conjugate gradient stopped after {max_iter} iterations with relative residual "
            f"{float(relative.max()):.3g} > tol={tol}",
            RuntimeWarning,
            stacklevel=3,
        )
    return x


def sampled_batch(problem: ScoringProblem, params: Params, indices: Tensor, seed: int) -> tuple[Tensor, Tensor]:
    """The training samples ``indices`` as ``(x, y)`` on the problem's device and dtype.

    In ``train_loss="adversarial"`` mode ``x`` is replaced by ``train_attack`` at ``params``
    (seeded with ``seed``).
    """
    source = problem.train.source
    if isinstance(source, Dataset):
        x, y = collate([source[int(i)] for i in indices], "train")[:2]
        x, y = check_inputs(x, "train"), as_labels(y, "train")
    else:
        x, y = source[0][indices], source[1][indices]
    x, y = x.to(device=problem.device, dtype=problem.dtype), y.to(problem.device)
    if problem.train_loss == "adversarial":
        x = call_attack(problem.train_attack, problem.module_at(params), x, y, seed=seed, name="train_attack")
    return x, y


def batch_hessian_vector_products(
    problem: ScoringProblem, params: Params, x: Tensor, y: Tensor, vectors: Tensor
) -> Tensor:
    """``H_k @ vectors[k]`` for each k, ``H_k`` the Hessian of the MEAN loss on the batch ``(x[k], y[k])``.

    ``x`` is ``(k, b, ...)``, ``y`` is ``(k, b)`` and ``vectors`` is ``(k, n_params)``: k
    independent minibatch HVPs in one vectorised call.
    """

    def one(xk: Tensor, yk: Tensor, vector: Tensor) -> Tensor:
        def mean_loss(p: Params) -> Tensor:
            return problem.loss_fn(problem.outputs(p, xk), yk).mean()

        _, product = jvp(grad(mean_loss), (params,), (unflatten(vector, params),))
        return flatten(product, problem.param_names)

    products = vmap(one)(x, y, vectors.to(problem.dtype)).detach()
    check_finite_results(products, "Hessian-vector products", "a sampled training minibatch")
    return products


def largest_eigenvalue(problem: ScoringProblem, iterations: int = 20) -> float:
    """Power-iteration estimate of the largest eigenvalue of the damped training-loss Hessian.

    Seeded by ``problem.seed``; one pass of HVPs over the training set per iteration.
    """
    generator = make_generator(problem.seed)
    vector = torch.randn(problem.n_params, generator=generator, dtype=torch.float64).to(problem.device)
    eigenvalue = 0.0
    for _ in range(iterations):
        vector = vector / vector.norm()
        product = damped_hvp(problem, vector)
        eigenvalue = float(vector @ product)
        if float(product.norm()) == 0:
            break
        vector = product
    return abs(eigenvalue)


@register_method("if-lissa", per_target=True)
def lissa_influence(
    problem: ScoringProblem,
    *,
    depth: int = 1000,
    scale: Optional[float] = None,
    repeats: int = 1,
    hvp_batch_size: Optional[int] = None,
) -> Tensor:
    """Influence-function harm with ``(H + damping I)^{-1} grad f`` estimated by LiSSA.

    With the scoring option ``aggregate=False``: the ``(n_train, n_target)`` matrix, one recursion per target
    sample's own loss gradient ``grad f_j``, side by side, every step's minibatch shared by all targets.

    Args:
        depth: recursion steps per repeat (one minibatch HVP each).
        scale: must exceed the largest eigenvalue of the damped Hessian; ``None`` uses 1.5 times
            a 20-step power-iteration estimate of it (20 full passes of HVPs).
        repeats: independent recursions, run side by side (vectorised) and averaged; with
            full-batch HVPs they would be identical, so one is run.
        hvp_batch_size: minibatch size of each HVP, drawn without replacement; at least the number
            of training samples (or ``None`` with a batch size that large) uses the full training
            set in every step, which makes the recursion deterministic.

    Raises ``ValueError`` naming ``scale`` if the recursion diverges (scale too small).
    """
    depth = check_int(depth, "depth", minimum=1)
    repeats = check_int(repeats, "repeats", minimum=1)
    if scale is not None:
        scale = check_positive(scale, "scale")
    batch = problem.train.batch_size if hvp_batch_size is None else check_int(hvp_batch_size, "hvp_batch_size", minimum=1)
    if scale is None:
        scale = 1.5 * largest_eigenvalue(problem) or 1.0
    v = solve_right_hand_sides(problem)
    targets = v.shape[0]
    full_batch = batch >= problem.n_train
    rows = 1 if full_batch else repeats  # the recursions run side by side, targets within each repeat
    generator = make_generator(problem.seed)
    v = v.repeat(rows, 1)
    h = v.clone()
    limit = DIVERGENCE_FACTOR * max(float(v.norm(dim=1).max()), 1e-300)
    for step in tqdm(range(depth), desc="if-lissa steps", disable=None if problem.progress else True, leave=False):
        if full_batch:
            product = hessian_vector_products(problem, problem.params, h).double()
        else:
            x, y = _sampled_batches(problem, rows, batch, generator)
            x, y = x.repeat_interleave(targets, dim=0), y.repeat_interleave(targets, dim=0)
            product = batch_hessian_vector_products(problem, problem.params, x, y, h).double()
        h = v + h - (product + problem.damping * h) / scale
        if not bool(torch.isfinite(h).all()) or float(h.norm(dim=1).max()) > limit:
            raise ValueError(
                f"scale: the LiSSA recursion diverged at step {step + 1} (scale={scale:.4g}); scale must "
                "exceed the largest eigenvalue of the damped Hessian: increase it"
            )
    return harm_of_directions(problem, h.reshape(rows, targets, -1).mean(dim=0) / scale)


def _sampled_batches(
    problem: ScoringProblem, count: int, batch: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``count`` minibatches of ``batch`` distinct training samples, stacked: ``(count, batch, ...)``."""
    pairs = []
    for _ in range(count):
        indices = torch.randperm(problem.n_train, generator=generator)[:batch]
        attack_seed = int(torch.randint(2**31 - 1, (), generator=generator))
        pairs.append(sampled_batch(problem, problem.params, indices, attack_seed))
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])
