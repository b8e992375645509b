"""The closed-form move across a linear decision boundary, as used in arXiv 2405.17490."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import jacrev, vmap

from .base import Attack, check_logits, predict
from .validation import check_choice, check_eps

__all__ = ["LinearClosedForm", "LABEL_MODES"]

LABEL_MODES = ("true", "predicted")


class LinearClosedForm(Attack):
    r"""Closed-form boundary crossing for linear classifiers, the robustness attack of
    'Revisit, Extend, and Enhance Hessian-Free Influence Functions'
    [https://arxiv.org/abs/2405.17490] (DeepFool's
    one-step closed form [https://arxiv.org/abs/1511.04599] for the multi-class case).

    Binary model with one logit ``z(x) = w^T x + b``::

        x' = x - (1 + overshoot) * z(x) / ||w||^2 * w

    Multi-class model with logits ``z``: with ``c`` the predicted class and, for every other class
    ``k``, ``f_k = z_k - z_c`` and ``w_k = grad_x f_k``, move toward the nearest other class
    ``k* = argmin_k |f_k| / ||w_k||``::

        x' = x - (1 + overshoot) * f_k* / ||w_k*||^2 * w_k*

    ``w`` is taken by autograd at each point, so any model can be attacked, but the move is EXACT
    only for a model that is affine in ``x``: there every moved point's prediction flips (the logit
    difference becomes ``-overshoot`` times its old value). For other models it is one
    linearised step. No bounds and no budget are applied; points whose gradient is zero are
    returned unchanged.

    ``labels="true"`` (default): like every other attack, only the points classified correctly
    (prediction = ``y``) are moved, off their true class, and misclassified points stay as they
    are, so robust accuracy is a lower bound of clean accuracy. ``labels="predicted"``: as in the
    paper's code, EVERY point is moved across the boundary of its predicted class and ``y`` is
    ignored, so misclassified points may become correct (robust accuracy is then not a lower bound).

    Arguments:
        overshoot: how far past the boundary to go, as a fraction of the distance (>= 0).
        labels: ``"true"`` or ``"predicted"`` (the paper's protocol).

    Example::
        >>> x_adv = LinearClosedForm(overshoot=0.3)(logistic_regression, x, y)
    """

    def __init__(self, overshoot: float = 0.3, labels: str = "true"):
        self.overshoot = check_eps(overshoot, "overshoot", allow_zero=True)
        self.labels = check_choice(labels, "labels", LABEL_MODES)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        def logits_of_one(sample: torch.Tensor) -> torch.Tensor:
            return model(sample.unsqueeze(0)).squeeze(0)

        logits = model(x)
        check_logits(logits, y)
        jacobian = vmap(jacrev(logits_of_one))(x).flatten(2)  # (n, C, d)
        if logits.shape[1] == 1:
            margin, direction = logits[:, 0], jacobian[:, 0]
        else:
            rows = torch.arange(x.shape[0], device=x.device)
            predicted = logits.argmax(dim=1)
            margins = logits - logits[rows, predicted].unsqueeze(1)  # (n, C), <= 0
            directions = jacobian - jacobian[rows, predicted].unsqueeze(1)  # (n, C, d)
            distance = margins.abs() / directions.norm(dim=2)
            distance[rows, predicted] = math.inf
            nearest = distance.nan_to_num(nan=math.inf).argmin(dim=1)
            margin, direction = margins[rows, nearest], directions[rows, nearest]
        squared_norm = direction.pow(2).sum(dim=1)
        scale = torch.where(squared_norm > 0, margin / squared_norm.clamp_min(1e-30), torch.zeros_like(margin))
        step = (1.0 + self.overshoot) * scale.unsqueeze(1) * direction
        if self.labels == "true":
            step = step * (predict(logits) == y).to(step.dtype).unsqueeze(1)
        return x - step.view_as(x)
