"""Objective-independent baselines: "self" (self-influence), "loss" (training loss), "random".

They ignore the objective and the target set (and ``damping``); larger = more suspicious, as in
every method, so they plug into the same pruning code:

- "self": ``||grad l_i(theta)||^2``, the self-influence with the identity Hessian (TracIn's
  self-influence at one checkpoint); large for mislabelled and atypical samples.
- "loss": the per-sample training loss ``l_i(theta)``.
- "random": standard normal draws from a generator seeded with ``problem.seed`` (a control).

With ``train_loss="adversarial"`` "self" and "loss" are taken at the adversarial training points.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attacks.plumbing import make_generator
from robust_infl.engine import ScoringProblem, check_finite_results, train_batches
from robust_infl.grad_norms import squared_gradient_norms
from robust_infl.methods import register_method

__all__ = ["self_influence", "loss_score", "random_score"]


@register_method("self")
def self_influence(problem: ScoringProblem) -> Tensor:
    """Squared norm of each training sample's loss gradient over the scored parameters, ``(n_train,)``.

    Per layer from the layer's inputs and output gradients where the layer allows it (Linear,
    Conv2d; see :mod:`robust_infl.grad_norms`), so the per-sample gradients are not formed.
    """
    norms = squared_gradient_norms(problem)
    check_finite_results(norms, "outputs or loss gradients", "the training set")
    return norms


@register_method("loss")
def loss_score(problem: ScoringProblem) -> Tensor:
    """Per-sample training loss at the scored model, ``(n_train,)``."""
    out = torch.empty(problem.n_train, dtype=problem.dtype, device=problem.device)
    for start, x, y in train_batches(problem, problem.params, desc="training loss"):
        with torch.no_grad():
            losses = problem.loss_fn(problem.outputs(problem.params, x), y)
        check_finite_results(losses, "outputs (losses)", f"the training batch starting at index {start}")
        out[start : start + x.shape[0]] = losses
    return out


@register_method("random")
def random_score(problem: ScoringProblem) -> Tensor:
    """Seeded standard normal scores, ``(n_train,)`` (same seed, same scores, on any device)."""
    generator = make_generator(problem.seed)
    return torch.randn(problem.n_train, generator=generator, dtype=torch.float64).to(
        device=problem.device, dtype=problem.dtype
    )
