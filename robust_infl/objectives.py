"""Objectives on the target (validation) split, all to be MINIMISED, and the default per-sample losses.

An objective is evaluated from model outputs in additive chunks so that the target set can be
streamed: ``chunk_sums`` maps the outputs of one chunk of target samples to a small vector of sums,
the sums of all chunks are added up, and ``combine`` turns the totals into the scalar objective.
The gradient of the objective therefore never needs the whole target set in memory at once.

``prepare`` runs once per parameter setting before any gradient is taken. It is where
:class:`Robust` calls its attack: the adversarial inputs are computed at the current parameters
and then held fixed (Danskin's theorem: the gradient of the worst-case loss is the gradient at the
worst-case point).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from attacks.plumbing import binary_cross_entropy_loss, cross_entropy_loss, default_loss_fn
from robust_infl.inputs import TargetSet, call_attack

__all__ = [
    "LossFn",
    "Attack",
    "Objective",
    "PreparedObjective",
    "Utility",
    "Robust",
    "DemographicParity",
    "EqualOpportunity",
    "cross_entropy_loss",
    "binary_cross_entropy_loss",
    "default_loss_fn",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Attack = Callable[[nn.Module, Tensor, Tensor], Tensor]


def positive_class_probability(outputs: Tensor) -> Tensor:
    """Probability of class 1: sigmoid of a single logit, or softmax[:, 1] of two logits."""
    if outputs.shape[1] == 1:
        return torch.sigmoid(outputs[:, 0])
    return torch.softmax(outputs, dim=1)[:, 1]


@dataclass(frozen=True)
class PreparedObjective:
    """An objective bound to concrete target inputs (adversarial ones for :class:`Robust`)."""

    objective: "Objective"
    inputs: Tensor
    labels: Tensor
    groups: Optional[Tensor]

    def chunk_sums(self, outputs: Tensor, chunk: slice, loss_fn: LossFn) -> Tensor:
        """Additive statistics of the target samples in ``chunk`` given their model outputs."""
        groups = None if self.groups is None else self.groups[chunk]
        return self.objective.chunk_sums(outputs, self.labels[chunk], groups, loss_fn)

    def combine(self, sums: Tensor) -> Tensor:
        """The scalar objective from the statistics summed over the whole target set."""
        return self.objective.combine(sums, self.labels, self.groups)


class Objective(abc.ABC):
    """A scalar to minimise on the target set, built from additive per-chunk statistics.

    Subclasses implement :meth:`chunk_sums` and :meth:`combine`, and may override
    :meth:`target_inputs` (to attack the inputs) and :meth:`check`. Class attributes:

    - ``requires_groups``: the target must be ``(X, y, s)`` with both groups present.
    - ``linear``: ``combine`` is linear and homogeneous in the sums, so chunk gradients add up.
    - ``per_sample``: the objective is the mean of the per-sample loss over the (possibly
      attacked) target inputs, so a per-target-sample objective (that sample's loss) exists;
      needed for train x target matrices (``aggregate=False``).
    """

    requires_groups: bool = False
    linear: bool = False
    per_sample: bool = False

    def check(self, target: TargetSet, n_outputs: Optional[int]) -> None:
        """Raise ``ValueError`` if the objective cannot be evaluated on ``target`` with this model."""

    def target_inputs(self, model: nn.Module, target: TargetSet, seed: int) -> Tensor:
        """The inputs the objective is evaluated on; the clean target inputs by default."""
        return target.x

    def prepare(self, model: nn.Module, target: TargetSet, seed: int = 0) -> PreparedObjective:
        """Bind the objective to its inputs at the model's current parameters (held fixed after)."""
        inputs = self.target_inputs(model, target, seed)
        return PreparedObjective(self, inputs.detach(), target.y, target.s)

    @abc.abstractmethod
    def chunk_sums(
        self, outputs: Tensor, labels: Tensor, groups: Optional[Tensor], loss_fn: LossFn
    ) -> Tensor:
        """Additive statistics (a 1-D tensor) of one chunk of target samples."""

    @abc.abstractmethod
    def combine(self, sums: Tensor, labels: Tensor, groups: Optional[Tensor]) -> Tensor:
        """The scalar objective from the statistics summed over all target samples."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Utility(Objective):
    """Mean per-sample loss on the target set."""

    linear = True
    per_sample = True

    def chunk_sums(self, outputs, labels, groups, loss_fn):
        return loss_fn(outputs, labels).sum().reshape(1)

    def combine(self, sums, labels, groups):
        return sums[0] / labels.shape[0]


class Robust(Utility):
    """Mean per-sample loss at the adversarial target points ``attack(model, x, y)``.

    ``attack`` is any callable returning adversarial inputs of the same shape. It is called once
    per parameter setting, with the model in eval mode, under a seeded random state (the
    ``seed`` of the scoring call), and its output is then held fixed.
    """

    def __init__(self, attack: Attack):
        if not callable(attack):
            raise TypeError(f"attack: must be a callable attack(model, x, y), got {type(attack).__name__}")
        self.attack = attack

    def target_inputs(self, model, target, seed):
        return call_attack(self.attack, model, target.x, target.y, seed=seed, name="attack")

    def __repr__(self) -> str:
        return f"Robust(attack={self.attack!r})"


def _check_groups(objective: Objective, target: TargetSet, mask: Optional[Tensor], where: str) -> None:
    if target.s is None:
        raise ValueError(
            f"target: {type(objective).__name__} needs a sensitive attribute; pass target=(X, y, s)"
        )
    groups = target.s if mask is None else target.s[mask]
    if not bool((groups == 1).any()) or not bool((groups == 0).any()):
        raise ValueError(f"target: {type(objective).__name__} needs both groups s=0 and s=1 {where}")


class DemographicParity(Objective):
    """Squared gap of the mean positive-class probability between groups s=1 and s=0.

    The positive-class probability is the sigmoid of a single logit, or softmax[:, 1] of two.
    """

    requires_groups = True

    def check(self, target, n_outputs):
        _check_groups(self, target, None, "in the target set")
        if n_outputs not in (1, 2):
            raise ValueError(
                f"objective: DemographicParity needs a binary model with 1 or 2 outputs, got {n_outputs}"
            )

    def chunk_sums(self, outputs, labels, groups, loss_fn):
        prob = positive_class_probability(outputs)
        return torch.stack([(prob * groups).sum(), (prob * (1 - groups)).sum()])

    def combine(self, sums, labels, groups):
        gap = sums[0] / groups.sum() - sums[1] / (1 - groups).sum()
        return gap * gap


class EqualOpportunity(Objective):
    """Squared gap of the mean per-sample loss on samples with y=1 between groups s=1 and s=0."""

    requires_groups = True

    def check(self, target, n_outputs):
        _check_groups(self, target, target.y == 1, "among the samples with y=1")

    def chunk_sums(self, outputs, labels, groups, loss_fn):
        positive = (labels == 1).to(outputs.dtype)
        losses = loss_fn(outputs, labels) * positive
        return torch.stack([(losses * groups).sum(), (losses * (1 - groups)).sum()])

    def combine(self, sums, labels, groups):
        positive = (labels == 1).to(groups.dtype)
        gap = sums[0] / (positive * groups).sum() - sums[1] / (positive * (1 - groups)).sum()
        return gap * gap
