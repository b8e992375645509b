"""Adversarial attacks with one interface, ``attack(model, x, y) -> x_adv``.

Own attacks: :class:`FGSM`, :class:`PGD` (linf / l2, restarts), :class:`LinearClosedForm` (the
paper's closed-form boundary crossing).
"""

from .base import Attack, BinaryAsTwoLogits, per_sample_loss, predict
from .closed_form import LinearClosedForm
from .fgsm import FGSM
from .pgd import PGD

__all__ = [
    "Attack",
    "FGSM",
    "PGD",
    "LinearClosedForm",
    "per_sample_loss",
    "predict",
    "BinaryAsTwoLogits",
]
