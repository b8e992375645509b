"""Fast Gradient Sign Method (one step) in the linf or l2 norm."""

from __future__ import annotations

import torch
from torch import nn

from .base import Attack, check_logits
from .bounds import BoundsLike, check_bounds, check_within_bounds, resolve_bounds
from .plumbing import per_sample_loss
from .steps import ascent_direction, clamp_to
from .validation import check_eps, check_norm

__all__ = ["FGSM"]


class FGSM(Attack):
    r"""FGSM in the paper 'Explaining and Harnessing Adversarial Examples'
    [https://arxiv.org/abs/1412.6572].

    One step of size ``eps`` along the sign of the loss gradient (``norm="linf"``) or along the
    l2-normalised gradient (``norm="l2"``), then clipped to ``bounds``.

    Arguments:
        eps: perturbation budget (> 0) in the chosen norm.
        norm: ``"linf"`` or ``"l2"``.
        bounds: ``None`` (unbounded), ``(low, high)`` numbers, or per-feature tensors broadcastable
            to one sample's shape.

    Example::
        >>> x_adv = FGSM(eps=0.1)(model, x, y)
    """

    def __init__(self, eps: float, norm: str = "linf", bounds: BoundsLike = (0.0, 1.0)):
        self.eps = check_eps(eps)
        self.norm = check_norm(norm)
        self.bounds = check_bounds(bounds)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        bounds = resolve_bounds(self.bounds, x)
        check_within_bounds(x, bounds)
        x_grad = x.clone().requires_grad_(True)
        logits = model(x_grad)
        check_logits(logits, y)
        (grad,) = torch.autograd.grad(per_sample_loss(logits, y).sum(), x_grad)
        x_adv = x + self.eps * ascent_direction(grad, self.norm)
        return clamp_to(x_adv, bounds)
