"""Adversarial attacks with one interface, ``attack(model, x, y) -> x_adv``, and their evaluation.

Own attacks: :class:`FGSM`, :class:`PGD` (linf / l2, restarts), :class:`LinearClosedForm` (the
paper's closed-form boundary crossing).
:func:`evaluate` reports clean accuracy, robust accuracy and attack success rate.
"""

from .base import Attack, BinaryAsTwoLogits, per_sample_loss, predict
from .closed_form import LinearClosedForm
from .evaluate import accuracy, evaluate
from .fgsm import FGSM
from .pgd import PGD

__all__ = [
    "Attack",
    "FGSM",
    "PGD",
    "LinearClosedForm",
    "evaluate",
    "accuracy",
    "per_sample_loss",
    "predict",
    "BinaryAsTwoLogits",
]
