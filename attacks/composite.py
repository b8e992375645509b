"""Attacks built from other attacks: a worst-case cascade, and a unit-box view for unbounded data.

- :class:`Cascade` runs attacks in turn, each on the points the previous ones left correctly
  classified, as AutoAttack does with its members; robust accuracy under it is at most that under any
  member.
- :class:`UnitBoxView` runs an attack that clips to ``[0, 1]`` (torchattacks' APGD, FAB, ...) on data
  with unbounded features (standardised tabular data) through an exact affine change of variables.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .base import Attack, predict
from .validation import check_eps

__all__ = ["Cascade", "UnitBoxView"]


class Cascade(Attack):
    """Run ``members`` in turn, each on the points still correctly classified (as AutoAttack does).

    The first member attacks the correctly classified clean points; a point keeps the first
    adversarial example that fools the model, and points no member fools keep the last member's
    example. Misclassified clean points stay as they are. Members are ``attack(model, x, y) -> x_adv``
    callables.
    """

    def __init__(self, *members: Callable):
        if not members:
            raise ValueError("members: a cascade needs at least one attack")
        for i, member in enumerate(members):
            if not callable(member):
                raise TypeError(f"members: member {i} must be callable attack(model, x, y), got {type(member).__name__}")
        self.members = members

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_adv = x.clone()
        for member in self.members:
            with torch.no_grad():
                alive = predict(model(x_adv)) == y
            if not bool(alive.any()):
                break
            x_adv[alive] = member(model, x[alive], y[alive]).to(x.dtype)
        return x_adv


class _AffineInput(nn.Module):
    """``model(offset + scale * u)``: the model seen on unit-box coordinates ``u``."""

    def __init__(self, model: nn.Module, offset: torch.Tensor, scale: float):
        super().__init__()
        self.model, self.offset, self.scale = model, offset, scale

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model(self.offset + self.scale * u)


class UnitBoxView(Attack):
    """Run an attack that clips to ``[0, 1]`` on unbounded data through an exact change of variables.

    For a batch ``x``, ``x = offset + scale * u`` with ``offset`` the per-feature minimum minus ``eps``
    and ONE scalar ``scale`` (the largest per-feature range plus ``2 eps``, times 1.01), so every
    ``u`` lies in ``[0, 1]`` with a margin of ``eps / scale`` on each side: the attack's clipping never
    binds, and L2 and linf balls of radius ``eps`` map to balls of radius ``eps / scale``. The attack
    ``build(eps / scale)`` then runs on the model seen in ``u`` coordinates; its result is mapped back.

    Args:
        build: ``build(eps_in_u) -> attack``, the attack for the scaled budget (e.g.
            ``lambda e: TorchAttacks("APGD", eps=e, norm="L2")``).
        eps: the budget in the data's own units (L2 or linf, whichever the built attack uses).
    """

    def __init__(self, build: Callable[[float], Callable], eps: float):
        if not callable(build):
            raise TypeError(f"build: must be callable build(eps) -> attack, got {type(build).__name__}")
        self.build, self.eps = build, check_eps(eps)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        low = x.min(dim=0).values - self.eps
        high = x.max(dim=0).values + self.eps
        scale = float((high - low).max()) * 1.01
        view = _AffineInput(model, low, scale).eval()
        u_adv = self.build(self.eps / scale)(view, (x - low) / scale, y)
        return low + scale * u_adv.to(x.dtype)
