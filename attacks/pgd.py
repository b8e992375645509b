"""Projected Gradient Descent (Madry et al.) in the linf or l2 norm, with random restarts."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from .base import Attack, check_logits, predict
from .bounds import BoundsLike, check_bounds, check_within_bounds, resolve_bounds
from .plumbing import make_generator, per_sample_loss
from .steps import ascent_direction, clamp_to, per_sample_norm, project_l2_, random_delta
from .validation import check_bool, check_eps, check_int, check_norm, check_seed

__all__ = ["PGD", "pgd_ascent", "ITERATES"]

ITERATES = ("point", "delta")


def pgd_ascent(
    objective: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
    bounds,
    start: Optional[torch.Tensor] = None,
    iterate: str = "point",
) -> torch.Tensor:
    """Projected gradient ascent of ``objective(x_adv)`` (a per-sample vector) in the ``norm`` ball of
    radius ``eps`` around ``x``, intersected with ``bounds`` (None, ``(low, high)`` numbers or per-feature tensors): the one
    PGD loop, used by :class:`PGD` and by the adversarial trainers of ``defenses``.

    ``start`` is the initial perturbation (None: the clean point). Each of the ``steps`` steps
    moves ``alpha`` along the steepest ascent direction (the gradient sign for linf, the per-sample
    normalised gradient for l2), projects onto the ball and clips to ``bounds``. ``iterate`` picks
    what the loop carries, which changes only the rounding: ``"point"`` (the attack) carries the
    adversarial point and clamps a linf step into the feasible box at once (a start is clipped to
    ``bounds`` only); ``"delta"`` (the trainers) carries the perturbation, projected (the start
    too) and clipped as ``clip(x + delta) - x``. Returns the detached adversarial points.
    """
    bounds = resolve_bounds(bounds, x)
    if iterate == "point":
        if norm == "linf":
            feasible = (clamp_to(x - eps, bounds), clamp_to(x + eps, bounds))
        x_adv = x.clone()
        if start is not None:
            x_adv = clamp_to(x_adv.add_(start), bounds)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(objective(x_adv).sum(), x_adv)
            x_adv = x_adv.detach()
            if norm == "linf":
                x_adv.add_(grad.sign_(), alpha=alpha).clamp_(*feasible)
            else:
                x_adv.add_(grad.mul_(alpha / per_sample_norm(grad).clamp_min(1e-12)))
                x_adv = project_l2_(x_adv.sub_(x), eps).add_(x)
                if bounds is not None:
                    x_adv.clamp_(*bounds)
        return x_adv
    if iterate != "delta":
        raise ValueError(f"iterate: must be one of {ITERATES}, got {iterate!r}")

    def project(delta: torch.Tensor) -> torch.Tensor:
        delta = delta.clamp(-eps, eps) if norm == "linf" else project_l2_(delta, eps)
        return clamp_to(x + delta, bounds) - x

    delta = project(torch.zeros_like(x) if start is None else start.detach().clone())
    for _ in range(steps):
        delta.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x + delta).sum(), delta)
        with torch.no_grad():
            delta = project(delta + alpha * ascent_direction(grad, norm))
    return (x + delta).detach()


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
        checked = []

        def loss(x_adv: torch.Tensor) -> torch.Tensor:
            logits = model(x_adv)
            if not checked:
                check_logits(logits, y)
                checked.append(True)
            return per_sample_loss(logits, y)

        best = None
        for _ in range(self.restarts):
            start = None if generator is None else random_delta(x, self.eps, self.norm, generator)
            x_adv = pgd_ascent(loss, x, eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                               bounds=bounds, start=start)
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
