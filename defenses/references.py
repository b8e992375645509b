"""Adversarial-training reference rows of a defence run, and the ERM fit that measures training cost.

A defence recipe is worth using only where it beats adversarial training at equal or lower cost
(``experiments/RESULTS.md``, section ``defense_references``), so a run with plain training (ERM)
also trains :data:`REFERENCE_TRAINERS` -- FGSM from a random start (``fast-at``), PGD-AT (``pgd-at``)
and TRADES (``trades``) -- on the same training split, with the same schedule (epochs, learning rate,
batch size, optimizer, weight decay, loss), the same initialisation and seed, in the threat model's
ball. A run whose own trainer is adversarial is its own reference: its ``none`` row is that trainer
alone. Training cost is reported as the ratio to one ERM fit of the same schedule on the same data.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

from .trainers import ERM, TRADES, FastAT, PGDAT, Trainer, per_sample_loss

__all__ = ["REFERENCE_TRAINERS", "reference_trainers", "erm_like"]

REFERENCE_TRAINERS = ("fast-at", "pgd-at", "trades")


def _schedule(trainer: Trainer) -> dict:
    """The schedule shared with ``trainer``: epochs, lr and its schedule, batch size, optimizer, weight decay, loss,
    progress."""
    loss_fn = None if trainer.loss_fn is per_sample_loss else trainer.loss_fn
    return dict(epochs=trainer.epochs, lr=trainer.lr, batch_size=trainer.batch_size, optimizer=trainer.optimizer,
                weight_decay=trainer.weight_decay, lr_schedule=trainer.lr_schedule, progress=trainer.progress,
                loss_fn=loss_fn, retrain="scratch")


def reference_trainers(trainer, references: Union[str, Sequence[str], None], *, eps: Optional[float],
                       norm: Optional[str], bounds, train_steps: int) -> dict:
    """``{name: trainer}`` of the reference rows of a run trained by ``trainer``.

    ``references="auto"``: :data:`REFERENCE_TRAINERS` when ``trainer`` is plain training (an
    :class:`~defenses.ERM`) and the threat model has a budget ``eps``; nothing otherwise (an
    adversarial trainer is its own reference). A list picks names from :data:`REFERENCE_TRAINERS`;
    None or ``()`` runs none. PGD-AT and TRADES take ``train_steps`` steps.
    """
    if references is None:
        return {}
    if isinstance(references, str):
        if references != "auto":
            raise ValueError(f"references: must be 'auto' or a list of names from {', '.join(REFERENCE_TRAINERS)}, "
                             f"got {references!r}")
        if not isinstance(trainer, ERM) or eps is None:
            return {}
        references = REFERENCE_TRAINERS
    if not isinstance(references, (list, tuple)):
        raise TypeError(f"references: must be 'auto' or a list of names, got {type(references).__name__}")
    unknown = [name for name in references if name not in REFERENCE_TRAINERS]
    if unknown:
        raise ValueError(f"references: unknown {unknown}; valid names are {', '.join(REFERENCE_TRAINERS)}")
    if references and eps is None:
        raise ValueError("references: adversarial training needs the threat model's eps (a custom or budget-free "
                         "attack has none); pass references=()")
    if references and not isinstance(trainer, Trainer):
        raise TypeError(f"references: need a defenses Trainer to copy the schedule from, got {type(trainer).__name__}")
    ball = dict(eps=eps, norm=norm or "linf", bounds=bounds)
    build = {"fast-at": lambda s: FastAT(**ball, **s), "pgd-at": lambda s: PGDAT(steps=train_steps, **ball, **s),
             "trades": lambda s: TRADES(steps=train_steps, **ball, **s)}
    return {name: build[name](_schedule(trainer)) for name in dict.fromkeys(references)}


def erm_like(trainer) -> Optional[Trainer]:
    """The ERM fit that is the cost unit of a run trained by ``trainer``: ``trainer`` itself (from scratch) when
    it is plain ERM, else ERM with its schedule (epochs, lr, batch size, and for a defenses Trainer its
    optimizer, weight decay and loss), or None when the schedule cannot be read."""
    if isinstance(trainer, ERM):
        return trainer.with_retrain("scratch")
    if isinstance(trainer, Trainer):
        return ERM(**_schedule(trainer))
    try:
        return ERM(epochs=trainer.epochs, lr=trainer.lr, batch_size=trainer.batch_size, progress=False)
    except (AttributeError, TypeError, ValueError):
        return None
