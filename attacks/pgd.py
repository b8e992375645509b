"""Projected Gradient Descent (Madry et al.) in the linf or l2 norm, with random restarts."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import Attack, check_logits, predict
from .bounds import BoundsLike, check_bounds, check_within_bounds, resolve_bounds
from .plumbing import make_generator, per_sample_loss
from .validation import check_bool, check_eps, check_int, check_norm, check_seed
from .steps import clamp_to, per_sample_norm, project_l2_, random_delta

__all__ = ["PGD"]


class PGD(Attack):
    r"""PGD in the paper 'Towards Deep Learning Models Resistant to Adversarial Attacks'
    [https://arxiv.org/abs/1706.06083].

    ``steps`` ascent steps on the per-sample loss. linf: a sign step of size ``alpha``, then
    projection onto the intersection of the linf ball and ``bounds`` (one clamp). l2: a step of
    size ``alpha`` along the normalised gradient, projection onto the l2 ball, then clipping to
    ``bounds`` (clipping toward the clean point never leaves the ball). With ``restarts > 1`` each
    restart starts from a fresh random point and the worst case per sample is kept: a
    misclassified result beats a correctly classified one, otherwise the higher loss wins.

    Arguments:
        eps: perturbation budget (> 0) in the chosen norm.
        alpha: step size (> 0); default ``2.5 * eps / steps``.
        steps: number of gradient steps (>= 1).
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a point drawn uniformly from the ``eps`` ball (clipped to
            ``bounds``) instead of the clean point.
        restarts: number of runs; the worst case per sample is returned (without a random
            start every run is the same).
        bounds: ``None`` (unbounded), ``(low, high)`` numbers, or per-feature tensors broadcastable
            to one sample's shape.
        seed: seed of the random starts; the same seed gives the same output on every call.

    Example::
        >>> x_adv = PGD(eps=0.1, steps=20, restarts=2)(model, x, y)
    """

    def __init__(self, eps: float, alpha: Optional[float] = None, steps: int = 10, norm: str = "linf",
                 random_start: bool = True, restarts: int = 1, bounds: BoundsLike = (0.0, 1.0),
                 seed: int = 0):
        self.eps = check_eps(eps)
        self.steps = check_int(steps, "steps", minimum=1)
        self.alpha = 2.5 * self.eps / self.steps if alpha is None else check_eps(alpha, "alpha")
        self.norm = check_norm(norm)
        self.random_start = check_bool(random_start, "random_start")
        self.restarts = check_int(restarts, "restarts", minimum=1)
        self.bounds = check_bounds(bounds)
        self.seed = check_seed(seed)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bounds = resolve_bounds(self.bounds, x)
        check_within_bounds(x, bounds)
        generator = make_generator(self.seed, x.device) if self.random_start else None
        if self.norm == "linf":
            # The feasible set is a box: the linf ball intersected with the bounds.
            feasible = (clamp_to(x - self.eps, bounds), clamp_to(x + self.eps, bounds))
        best = None
        for _ in range(self.restarts):
            x_adv = x.clone()
            if generator is not None:
                x_adv = clamp_to(x_adv.add_(random_delta(x, self.eps, self.norm, generator)), bounds)
            for step in range(self.steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv)
                if step == 0 and best is None:
                    check_logits(logits, y)
                loss = per_sample_loss(logits, y).sum()
                (grad,) = torch.autograd.grad(loss, x_adv)
                x_adv = x_adv.detach()
                if self.norm == "linf":
                    x_adv.add_(grad.sign_(), alpha=self.alpha).clamp_(*feasible)
                else:
                    x_adv.add_(grad.mul_(self.alpha / per_sample_norm(grad).clamp_min(1e-12)))
                    x_adv = project_l2_(x_adv.sub_(x), self.eps).add_(x)
                    if bounds is not None:
                        x_adv.clamp_(*bounds)
            if self.restarts == 1:
                return x_adv
            best = self._keep_worst(model, x_adv, y, best)
        return best[0]

    @staticmethod
    @torch.no_grad()
    def _keep_worst(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, best):
        """Merge one restart into the running worst case ``(x, misclassified, loss)`` per sample."""
        logits = model(x_adv)
        wrong, loss = predict(logits) != y, per_sample_loss(logits, y)
        if best is None:
            return x_adv, wrong, loss
        best_x, best_wrong, best_loss = best
        better = (wrong & ~best_wrong) | ((wrong == best_wrong) & (loss > best_loss))
        mask = better.view(-1, *([1] * (x_adv.dim() - 1)))
        return torch.where(mask, x_adv, best_x), best_wrong | wrong, torch.where(better, loss, best_loss)
