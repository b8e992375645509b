"""The evaluation suite of a defence run: more attacks than the threat model, and the worst case over them.

The threat-model attack runs on the whole test split (``robust_acc_adaptive``); the suite's attacks,
the threat-model attack among them, run on a fixed subset (the first ``eval_subset`` test points of
each seed), which gives the per-attack results and ``worst_case``: the share of the subset that is
classified correctly clean AND after every attack of the suite. ``"auto"`` picks the threat-model
attack plus APGD-CE and targeted APGD-DLR (the first two components of AutoAttack, from its authors'
code) where the data allows them: inputs in [0, 1], a budget (``eps``), and at least 4 classes for
targeted APGD-DLR.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

import attacks
from attacks.registry import ATTACK_NAMES, check_attack_bounds, make_attack

__all__ = ["AUTO_SUITE", "resolve_suite", "build_suite", "evaluate_suite"]

AUTO_SUITE = ("apgd-ce", "apgd-t")
_CLASSES_NEEDED = {"apgd-t": 4}


def resolve_suite(eval_attacks: Union[str, Sequence[str], None], threat: str, *, eps: Optional[float], bounds,
                  num_classes: int) -> list:
    """Names of the suite's attacks besides the threat-model attack ``threat``.

    ``"auto"``: :data:`AUTO_SUITE` where the data allows (see the module docstring); None or ``()``:
    none; a list of names from ``attacks.registry.ATTACK_NAMES``: those (``threat``
    dropped, duplicates dropped), validated now.
    """
    if eval_attacks is None:
        return []
    if isinstance(eval_attacks, str):
        if eval_attacks != "auto":
            raise ValueError(f"eval_attacks: must be 'auto' or a list of attack names, got {eval_attacks!r}")
        if eps is None or bounds is None or tuple(bounds) != (0.0, 1.0):
            return []
        return [name for name in AUTO_SUITE if name != threat and _CLASSES_NEEDED.get(name, 2) <= num_classes]
    if not isinstance(eval_attacks, (list, tuple)):
        raise TypeError(f"eval_attacks: must be 'auto' or a list of attack names, got {type(eval_attacks).__name__}")
    unknown = [name for name in eval_attacks if name not in ATTACK_NAMES]
    if unknown:
        raise ValueError(f"eval_attacks: unknown {unknown}; valid names are {', '.join(ATTACK_NAMES)}")
    if eps is None and any(name != "linear" for name in eval_attacks):
        raise ValueError("eval_attacks: the threat model has no eps (a custom or budget-free attack); "
                         "only 'linear' can be added")
    for name in eval_attacks:
        check_attack_bounds(name, bounds, "eval_attacks")
    return [name for name in dict.fromkeys(eval_attacks) if name != threat]


def build_suite(names: Sequence[str], *, eps, norm, steps, bounds, seed: int) -> dict:
    """``{name: attack}`` of the suite's attacks for one seed (see ``make_attack``)."""
    return {name: make_attack(name, eps=eps, norm=norm, steps=steps, bounds=bounds, seed=seed) for name in names}


def evaluate_suite(model: nn.Module, X: torch.Tensor, y: torch.Tensor, threat: str, threat_attack: Callable,
                   suite: dict, subset: int, *, batch_size: int, progress: bool) -> dict:
    """Per-attack results and the worst case over the suite on the first ``subset`` points of ``(X, y)``.

    Returns ``{"attacks": {name: {"robust_acc", "asr"}}, "worst_case": float, "eval_subset": int}``
    with ``threat`` among the attacks.
    """
    k = min(int(subset), X.shape[0])
    chosen = {threat: threat_attack, **suite}
    results = attacks.evaluate(model, (X[:k], y[:k]), chosen, batch_size=batch_size, progress=progress)
    return {"attacks": {name: dict(results[name]) for name in chosen},
            "worst_case": results["worst_case_robust_acc"], "eval_subset": k}
