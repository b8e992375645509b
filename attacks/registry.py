"""Attack names -> attacks, for the command line and the defence pipeline: ``make_attack(name, ...)``."""

from __future__ import annotations

from typing import Callable

from .adapters import AutoAttack
from .closed_form import LinearClosedForm
from .fgsm import FGSM
from .pgd import PGD

__all__ = ["ATTACK_NAMES", "AUTOATTACK_NAMES", "make_attack", "check_attack_bounds"]

ATTACK_NAMES = ("fgsm", "pgd", "linear", "autoattack", "apgd-ce", "apgd-t")
AUTOATTACK_NAMES = ("autoattack", "apgd-ce", "apgd-t")  # run AutoAttack's code, which clips to [0, 1]


def check_attack_bounds(name: str, bounds, argument: str = "attack") -> None:
    """``ValueError`` naming ``argument`` when attack ``name`` runs AutoAttack's code (it clips to [0, 1])
    and the data's ``bounds`` are not (0, 1)."""
    if name in AUTOATTACK_NAMES and (bounds is None or tuple(bounds) != (0.0, 1.0)):
        raise ValueError(f"{argument}: {name!r} runs AutoAttack's code, which clips to [0, 1]; this data "
                         f"has bounds {bounds}. Use pgd")


def make_attack(name: str, *, eps: float, norm: str = "linf", steps: int = 10, bounds=(0.0, 1.0),
                seed: int = 0) -> Callable:
    """Attack ``name`` as an ``attack(model, x, y)`` callable: ``fgsm``, ``pgd``, ``linear``, ``autoattack``
    (standard version), ``apgd-ce`` or ``apgd-t`` (targeted APGD-DLR; both single AutoAttack components).

    ``linear`` is the paper's closed-form boundary crossing (no budget: ``eps`` and ``norm`` are
    not used); ``autoattack`` and the APGD components run the authors' AutoAttack code, which
    clips to [0, 1], so they need data with bounds (0, 1).
    """
    if name not in ATTACK_NAMES:
        raise ValueError(f"attack: unknown name {name!r}; valid names are {', '.join(ATTACK_NAMES)}")
    if name == "fgsm":
        return FGSM(eps, norm=norm, bounds=bounds)
    if name == "pgd":
        return PGD(eps, steps=steps, norm=norm, bounds=bounds, seed=seed)
    if name == "linear":
        return LinearClosedForm()
    check_attack_bounds(name, bounds)
    if name == "autoattack":
        return AutoAttack(eps, norm=norm, seed=seed)
    return AutoAttack(eps, norm=norm, seed=seed, components=(name,))
