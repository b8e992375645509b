"""Trainer names -> trainers, for the command line and the defence pipeline: ``make_trainer(name, ...)``."""

from __future__ import annotations

from .art_trainer import ARTTrainer
from .trainers import ERM, PGDAT, TRADES, FastAT

__all__ = ["TRAINER_NAMES", "make_trainer"]

TRAINER_NAMES = ("erm", "fast-at", "pgd-at", "trades", "art-pgd-at", "art-trades")


def make_trainer(name: str, *, epochs: int, lr: float, batch_size: int, retrain: str = "scratch",
                 eps: float = 0.1, norm: str = "linf", bounds=(0.0, 1.0), train_steps: int = 5,
                 progress: bool = True):
    """Trainer ``name``: ``erm``, ``fast-at`` (Wong et al. 2020: FGSM from a random start, step
    1.25 eps), ``pgd-at`` (Madry), ``trades`` (beta 6), or ART's own ``art-pgd-at`` / ``art-trades``;
    the multi-step ones use ``train_steps`` PGD steps, all in the same ``eps``-ball as the evaluation attack.
    """
    common = dict(epochs=epochs, lr=lr, batch_size=batch_size, retrain=retrain, progress=progress)
    ball = dict(eps=eps, norm=norm, bounds=bounds)
    if name == "erm":
        return ERM(**common)
    if name == "fast-at":
        return FastAT(**ball, **common)
    if name == "pgd-at":
        return PGDAT(steps=train_steps, **ball, **common)
    if name == "trades":
        return TRADES(steps=train_steps, **ball, **common)
    if name in ("art-pgd-at", "art-trades"):
        return ARTTrainer("madry-pgd" if name == "art-pgd-at" else "trades", max_iter=train_steps, **ball, **common)
    raise ValueError(f"trainer: unknown name {name!r}; valid names are {', '.join(TRAINER_NAMES)}")
