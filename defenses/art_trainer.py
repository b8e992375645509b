"""Reuse the Adversarial Robustness Toolbox's own adversarial trainers behind the ``Trainer.fit`` interface.

``ARTTrainer("madry-pgd", ...)`` runs ART's ``AdversarialTrainerMadryPGD`` (linf; for ``norm="l2"``
ART's ``AdversarialTrainer`` with an L2 ``ProjectedGradientDescent`` and ratio 1, which is the same
protocol), ``ARTTrainer("trades", ...)`` runs ``AdversarialTrainerTRADESPyTorch`` with an ART PGD
attack, and ``ARTTrainer(factory)`` runs any ART trainer built by ``factory(classifier)``.

ART trainers do not take per-sample weights. Weights that are all 0 or 1 (pruning) are honoured by
training on the samples with weight 1; other weights raise ``ValueError``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from attacks import PGD, BinaryAsTwoLogits
from attacks.inputs import as_data
from attacks.plumbing import model_device, model_dtype, seeded
from attacks.validation import check_bool, check_choice, check_int, check_model, check_positive, check_seed

from .trainers import NORMS, OPTIMIZERS, RETRAIN_MODES, check_labels_fit, copy_for_training, make_optimizer

__all__ = ["ARTTrainer", "ART_TRAINER_NAMES"]

ART_TRAINER_NAMES = ("madry-pgd", "trades")
_ART_CLASS_NAMES = {"AdversarialTrainerMadryPGD": "madry-pgd", "AdversarialTrainerTRADESPyTorch": "trades"}
# ART modules whose training loops draw tqdm bars that ART offers no switch for.
_ART_PROGRESS_MODULES = ("art.defences.trainer.adversarial_trainer",
                         "art.defences.trainer.adversarial_trainer_trades_pytorch")


@contextlib.contextmanager
def _art_progress(enabled: bool):
    """Silence the progress bars inside ART's trainers while the block runs (when not ``enabled``)."""
    if enabled:
        yield
        return
    saved = []
    for name in _ART_PROGRESS_MODULES:
        module = importlib.import_module(name)
        for attr in ("tqdm", "trange"):
            if hasattr(module, attr):
                original = getattr(module, attr)
                saved.append((module, attr, original))
                setattr(module, attr, functools.partial(original, disable=True))
    try:
        yield
    finally:
        for module, attr, original in saved:
            setattr(module, attr, original)


def _subset_for_weights(weights, n: int) -> Optional[torch.Tensor]:
    """The keep-mask of 0/1 ``weights`` (None keeps everything); ValueError for other weights."""
    if weights is None:
        return None
    w = torch.as_tensor(weights).detach().cpu().reshape(-1)
    if w.numel() != n:
        raise ValueError(f"weights: need one weight per training sample ({n}), got {w.numel()}")
    if not ((w == 0) | (w == 1)).all():
        raise ValueError("weights: ART's trainers take no per-sample weights; only 0/1 weights (pruning) "
                         "can be honoured, by training on the samples with weight 1. Use mode='prune' or "
                         "scheme='hard', or a defenses trainer (ERM, PGDAT, TRADES) for other weights")
    keep = w == 1
    if not keep.any():
        raise ValueError("weights: at least one weight must be 1")
    return keep


class ARTTrainer:
    """An ART adversarial trainer with the ``fit(model, train, *, weights, seed, val)`` interface.

    Args:
        name: ``"madry-pgd"`` / ``"AdversarialTrainerMadryPGD"``, ``"trades"`` /
            ``"AdversarialTrainerTRADESPyTorch"``, or a callable ``factory(classifier) -> ART trainer``
            (any ``art.defences.trainer.Trainer``) for an existing set-up.
        epochs, lr, batch_size, optimizer, weight_decay, retrain, progress: as in
            :class:`defenses.Trainer`.
        eps: attack budget of the inner PGD; ``eps_step`` its step (default ``2.5 * eps / max_iter``);
            ``max_iter`` its steps; ``num_random_init`` its random starts; ``norm`` ``"linf"`` or ``"l2"``.
        beta: TRADES trade-off.
        bounds: ``(low, high)`` input range (ART's ``clip_values``) or None.
    """

    def __init__(
        self,
        name: Union[str, Callable],
        *,
        epochs: int,
        lr: float,
        batch_size: int,
        eps: float = 0.1,
        eps_step: Optional[float] = None,
        max_iter: int = 7,
        num_random_init: int = 1,
        norm: str = "linf",
        beta: float = 6.0,
        bounds=(0.0, 1.0),
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        retrain: str = "scratch",
        progress: bool = True,
    ):
        if callable(name):
            self.name = name
        elif isinstance(name, str) and (name in ART_TRAINER_NAMES or name in _ART_CLASS_NAMES):
            self.name = _ART_CLASS_NAMES.get(name, name)
        else:
            valid = ", ".join(ART_TRAINER_NAMES + tuple(_ART_CLASS_NAMES))
            raise ValueError(f"name: must be one of {valid} or a factory(classifier), got {name!r}")
        self.epochs = check_int(epochs, "epochs", minimum=1)
        self.lr = check_positive(lr, "lr")
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.eps = check_positive(eps, "eps")
        self.max_iter = check_int(max_iter, "max_iter", minimum=1)
        self.eps_step = 2.5 * self.eps / self.max_iter if eps_step is None else check_positive(eps_step, "eps_step")
        self.num_random_init = check_int(num_random_init, "num_random_init", minimum=0)
        self.norm = check_choice(norm, "norm", NORMS)
        self.beta = check_positive(beta, "beta", allow_zero=True)
        if bounds is not None and (not isinstance(bounds, (tuple, list)) or len(bounds) != 2
                                   or not bounds[0] < bounds[1]):
            raise ValueError(f"bounds: must be None or a (low, high) pair with low < high, got {bounds!r}")
        self.bounds = None if bounds is None else (float(bounds[0]), float(bounds[1]))
        self.optimizer = check_choice(optimizer, "optimizer", OPTIMIZERS)
        self.weight_decay = check_positive(weight_decay, "weight_decay", allow_zero=True)
        self.retrain = check_choice(retrain, "retrain", RETRAIN_MODES)
        self.progress = check_bool(progress, "progress")

    def __repr__(self) -> str:
        name = self.name if isinstance(self.name, str) else getattr(self.name, "__name__", "factory")
        return (f"ARTTrainer({name!r}, epochs={self.epochs}, lr={self.lr}, batch_size={self.batch_size}, "
                f"eps={self.eps}, norm={self.norm!r}, retrain={self.retrain!r})")

    def with_retrain(self, retrain: str) -> "ARTTrainer":
        """A copy of this trainer with another ``retrain`` mode."""
        other = copy.copy(self)
        other.retrain = check_choice(retrain, "retrain", RETRAIN_MODES)
        return other

    def training_attack(self, seed: int) -> Optional[Callable]:
        """For ``"madry-pgd"``, :class:`attacks.PGD` with this trainer's ``eps``, ``eps_step``, ``max_iter``,
        ``norm`` and ``bounds``, seeded with ``seed``; None for TRADES (a KL term, not the label loss at
        attacked points) and for a factory (whose attack is not known)."""
        if self.name != "madry-pgd":
            return None
        return PGD(self.eps, alpha=self.eps_step, steps=self.max_iter, norm=self.norm, bounds=self.bounds, seed=seed)

    def _pgd(self, classifier):
        from art.attacks.evasion import ProjectedGradientDescent

        return ProjectedGradientDescent(classifier, norm=np.inf if self.norm == "linf" else 2, eps=self.eps,
                                        eps_step=self.eps_step, max_iter=self.max_iter,
                                        num_random_init=self.num_random_init, verbose=False)

    def _build(self, classifier):
        from art.defences.trainer import (AdversarialTrainer, AdversarialTrainerMadryPGD,
                                          AdversarialTrainerTRADESPyTorch)

        if callable(self.name):
            return self.name(classifier)
        if self.name == "trades":
            return AdversarialTrainerTRADESPyTorch(classifier, self._pgd(classifier), beta=self.beta)
        if self.norm == "linf":
            return AdversarialTrainerMadryPGD(classifier, nb_epochs=self.epochs, batch_size=self.batch_size,
                                              eps=self.eps, eps_step=self.eps_step, max_iter=self.max_iter,
                                              num_random_init=self.num_random_init)
        return AdversarialTrainer(classifier, self._pgd(classifier), ratio=1.0)

    def fit(self, model: nn.Module, train, *, weights=None, seed: int = 0, val=None) -> nn.Module:
        """Train a copy of ``model`` with the ART trainer and return it in eval mode.

        ``val`` is accepted for interface compatibility and not used; ``seed`` seeds torch and
        NumPy's global generators (ART draws from them) for the duration of the call.
        """
        from art.estimators.classification import PyTorchClassifier

        check_model(model)
        check_seed(seed)
        X, y = as_data(train, "train")[:2]
        X = X.to(model_dtype(model))  # ART passes the arrays to the model as they are
        keep = _subset_for_weights(weights, X.shape[0])
        if keep is not None:
            X, y = X[keep], y[keep]
        n_outputs = check_labels_fit(model, X, y)  # X's width and the output shape, before any compute
        device = model_device(model)
        with seeded(seed, device):
            model = copy_for_training(model, self.retrain, seed)
            net = BinaryAsTwoLogits(model).eval()  # ART sets the training mode itself
            num_classes = max(n_outputs, 2)  # one logit z is shown to ART as (0, z)
            classifier = PyTorchClassifier(
                model=net, loss=nn.CrossEntropyLoss(), optimizer=make_optimizer(
                    net, self.optimizer, self.lr, self.weight_decay),
                input_shape=tuple(X.shape[1:]), nb_classes=num_classes, clip_values=self.bounds,
                device_type="gpu" if device.type == "cuda" else "cpu")
            trainer = self._build(classifier)
            with _art_progress(self.progress):
                trainer.fit(X.cpu().numpy(), y.cpu().numpy(), nb_epochs=self.epochs, batch_size=self.batch_size)
        model.eval()
        return model
