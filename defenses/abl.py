"""Anti-Backdoor Learning (ABL; Li, Lyu, Koren, Lyu, Li and Ma, NeurIPS 2021, "Anti-Backdoor Learning:
Training Clean Models on Poisoned Data"), the field's reference training-time defence against backdoors.

Backdoor poisons are learnt faster than clean samples: their loss drops to near zero in the first
epochs. ABL trains in three phases:

1. **Isolation**: train from scratch with the local gradient ascent (LGA) loss
   ``sign(L - gamma) * L`` (:func:`lga_loss`, ``gamma = 0.5``), which holds the loss near ``gamma``: a
   batch below it is ascended, so clean samples stay near ``gamma`` while the quickly fitted poisons
   sink below it; then isolate the ``isolation_ratio`` (1%) of training samples with the lowest loss.
2. **Continued training** on the other samples, from the isolation model.
3. **Unlearning**: gradient ascent on the isolated samples' loss (SGD, momentum 0.9, lr ``5e-4``),
   which unlearns the trigger.

As in both reference implementations (the authors' ``bboylyg/ABL`` and BackdoorBench's
``defense/abl.py``), ``L`` in the LGA loss is the batch's mean loss. The paper trains 20 isolation, 60
further and 20 unlearning epochs (100 in all, a standard run's length); here the first two phases keep
those shares of the trainer's own ``epochs`` (20% and 60%, at least one epoch each: 1 + 3 of a 5-epoch
schedule), while the unlearning keeps the paper's 20 epochs, which pass over the isolated 1% only
(a fifth of one epoch of compute). Differences from the paper: the isolation and continued training use
the trainer's optimiser and learning rate (the paper: SGD, lr 0.1, with a step decay), the unlearning's
SGD has no Nesterov term, and no data augmentation.

With an adversarial trainer (:class:`~defenses.PGDAT`, :class:`~defenses.TRADES`, ...) the isolation is
plain LGA on the clean inputs (a trigger is fitted first on clean inputs; the trainer's optimiser,
learning rate and batch size), the continued training is the trainer's own (its adversarial steps),
and the unlearning is gradient ascent on the isolated samples' clean loss. Trainers outside
:class:`~defenses.Trainer` (e.g. :class:`~defenses.ARTTrainer`) are refused: the isolation and unlearning
run in this package's training loop.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from attacks.inputs import as_data
from attacks.validation import check_fraction, check_int, check_number, check_positive, check_seed

from .data import take
from .poison_detection import training_losses
from .selection import budget_size
from .trainers import Trainer

__all__ = ["lga_loss", "anti_backdoor_learning", "ABL_GAMMA", "ABL_ISOLATION_RATIO"]

ABL_GAMMA = 0.5
ABL_ISOLATION_RATIO = 0.01
_ISOLATION_SHARE, _CONTINUED_SHARE = 0.2, 0.6  # 20 and 60 of the paper's 100 epochs
_UNLEARNING_EPOCHS, _UNLEARNING_LR = 20, 5e-4


def lga_loss(losses: torch.Tensor, gamma: float = ABL_GAMMA) -> torch.Tensor:
    """The local gradient ascent loss ``sign(L - gamma) * L`` of ABL, ``L`` the mean of ``losses``."""
    mean = losses.mean()
    return torch.sign(mean - gamma) * mean


class _LocalGradientAscent(Trainer):
    """Plain training on the LGA loss of each batch's (weighted) mean loss."""

    def __init__(self, *, gamma: float, **trainer_options):
        super().__init__(**trainer_options)
        self.gamma = gamma

    def batch_loss(self, model, xb, yb, wb, step):
        """``sign(L - gamma) * L`` of the batch's weighted mean loss ``L``."""
        return lga_loss(wb * self.sample_losses(model, xb, yb, step), self.gamma)


class _GradientAscent(Trainer):
    """Gradient ascent on the (weighted) mean loss: ABL's unlearning step."""

    def batch_loss(self, model, xb, yb, wb, step):
        """The negated weighted mean loss."""
        return -super().batch_loss(model, xb, yb, wb, step)


def _phase_epochs(value: Optional[int], name: str, epochs: int, share: float) -> int:
    if value is None:
        return max(1, round(share * epochs))
    return check_int(value, name, minimum=1)


def anti_backdoor_learning(model: nn.Module, train, *, trainer: Trainer, seed: int = 0,
                           isolation_ratio: float = ABL_ISOLATION_RATIO, gamma: float = ABL_GAMMA,
                           isolation_epochs: Optional[int] = None, continued_epochs: Optional[int] = None,
                           unlearning_epochs: int = _UNLEARNING_EPOCHS,
                           unlearning_lr: float = _UNLEARNING_LR) -> tuple:
    """Train a copy of ``model`` on the poisoned ``train`` with Anti-Backdoor Learning (see the module).

    Args:
        model: the architecture (re-initialised under ``seed``; not changed).
        train: ``(X, y)``, the untrusted training data.
        trainer: a :class:`~defenses.Trainer`; its optimiser, learning rate, batch size and weight decay
            drive the isolation, its own ``fit`` the continued training.
        seed: fixes every phase.
        isolation_ratio: share of the training samples isolated (lowest loss; at least one), the paper's 1%.
        gamma: the LGA loss floor, the paper's 0.5.
        isolation_epochs, continued_epochs: epochs of the first two phases (default: 20% and 60% of
            ``trainer.epochs``, at least 1, the paper's 20 and 60 of 100).
        unlearning_epochs: gradient-ascent epochs over the isolated samples (the paper's 20).
        unlearning_lr: the unlearning's SGD learning rate (the authors' code: 5e-4).

    Returns:
        ``(model, isolated, scores)``: the defended model (eval mode), the boolean mask of the isolated
        samples and the negated per-sample losses after the isolation phase (larger = more suspicious).
    """
    if not isinstance(trainer, Trainer):
        raise TypeError(f"trainer: ABL needs a defenses.Trainer (its isolation and unlearning run in that training "
                        f"loop), got {type(trainer).__name__}")
    check_seed(seed)
    X, y = as_data(train, "train")[:2]
    isolation_ratio = check_fraction(isolation_ratio, "isolation_ratio")
    gamma = check_positive(gamma, "gamma")
    isolation_epochs = _phase_epochs(isolation_epochs, "isolation_epochs", trainer.epochs, _ISOLATION_SHARE)
    continued_epochs = _phase_epochs(continued_epochs, "continued_epochs", trainer.epochs, _CONTINUED_SHARE)
    unlearning_epochs = check_int(unlearning_epochs, "unlearning_epochs", minimum=0)
    unlearning_lr = check_number(unlearning_lr, "unlearning_lr", minimum=0, include_minimum=False)
    n_isolated = max(1, budget_size(len(y), isolation_ratio))
    if n_isolated >= len(y):
        raise ValueError(f"isolation_ratio: {isolation_ratio:g} of {len(y)} training samples isolates all of them; "
                         "it must leave at least one")
    shared = dict(batch_size=trainer.batch_size, weight_decay=trainer.weight_decay, progress=False,
                  loss_fn=trainer.loss_fn)
    isolation = _LocalGradientAscent(gamma=gamma, epochs=isolation_epochs, lr=trainer.lr, optimizer=trainer.optimizer,
                                     retrain="scratch", **shared)
    isolated_model = isolation.fit(model, (X, y), seed=seed)
    scores = -training_losses(isolated_model, (X, y))
    isolated = torch.zeros(len(y), dtype=torch.bool)
    isolated[torch.sort(-scores, stable=True).indices[:n_isolated]] = True
    continued = trainer.with_retrain("finetune")
    continued.epochs = continued_epochs
    defended = continued.fit(isolated_model, take((X, y), ~isolated), seed=seed)
    if unlearning_epochs:
        unlearning = _GradientAscent(epochs=unlearning_epochs, lr=unlearning_lr, optimizer="sgd", retrain="finetune",
                                     **shared)
        defended = unlearning.fit(defended, take((X, y), isolated), seed=seed)
    return defended, isolated, scores
