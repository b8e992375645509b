"""Trainers with per-sample weights and one seed: plain ERM, Madry PGD adversarial training, TRADES.

``Trainer.fit(model, train, weights=..., seed=...)`` returns a NEW trained model and never mutates
its input. ``retrain="scratch"`` re-initialises a deep copy (every submodule's ``reset_parameters``
under the seed); ``retrain="finetune"`` continues training a deep copy. The seed fixes the
initialisation, the data order (a ``torch.Generator``), the random starts of the inner attacks and
any randomness inside the model (e.g. dropout), so the same seed gives the same model.

Subclasses change what is minimised through two hooks:

- ``sample_losses(model, xb, yb, step) -> (b,)``: the per-sample training losses;
- ``batch_loss(model, xb, yb, wb, step) -> scalar``: how they are combined with the weights
  (default: ``mean(wb * sample_losses)``, with weights normalised to mean 1 over the training set);

and can follow the run through ``begin_fit`` (called once, sees the training and validation data)
and ``begin_step`` (called before every optimisation step with the step and epoch numbers).
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from attacks.bounds import check_bounds
from attacks.inputs import as_data, to_model
from attacks.pgd import PGD, pgd_ascent
from attacks.plumbing import frozen_in_eval, make_generator, model_device, model_dtype, per_sample_loss, seeded
from attacks.steps import random_delta
from attacks.validation import (check_bool, check_choice, check_int, check_labels, check_model, check_output_shape,
                                check_positive, check_seed)

from .data import batch_source

__all__ = [
    "Trainer",
    "ERM",
    "CheckpointingERM",
    "PGDAT",
    "TRADES",
    "FastAT",
    "per_sample_loss",
    "copy_for_training",
    "make_optimizer",
    "check_weights",
    "check_labels_fit",
    "batch_slices",
    "model_device",
    "RETRAIN_MODES",
    "OPTIMIZERS",
    "LR_SCHEDULES",
    "NORMS",
]

RETRAIN_MODES = ("scratch", "finetune")
OPTIMIZERS = ("adam", "sgd")
LR_SCHEDULES = ("constant", "cosine")
NORMS = ("linf", "l2")


def _class_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log class probabilities; one logit z is read as the two logits (0, z)."""
    if logits.shape[-1] == 1:
        z = logits.reshape(-1, 1)
        logits = torch.cat([torch.zeros_like(z), z], dim=1)
    return F.log_softmax(logits, dim=1)


def check_weights(weights, n: int) -> Optional[torch.Tensor]:
    """Validate per-sample ``weights`` (None, or ``n`` finite values >= 0 with a positive sum).

    Returns them as float32 normalised to mean 1, or None for uniform weights. Only their ratios matter:
    weights whose float32 sum would overflow (e.g. 3e38 each) are divided by their largest first.
    """
    if weights is None:
        return None
    w = torch.as_tensor(weights).detach().cpu().reshape(-1)
    w = w if w.is_floating_point() else w.to(torch.float32)
    if w.numel() != n:
        raise ValueError(f"weights: need one weight per training sample ({n}), got {w.numel()}")
    if not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError("weights: must be finite and >= 0")
    if w.sum() <= 0:
        raise ValueError("weights: at least one weight must be > 0")
    if not torch.isfinite(w.to(torch.float32).sum()):
        w = w.double() / w.double().max()
    w = w.to(torch.float32)
    return w / w.mean()


def check_labels_fit(model: nn.Module, X: torch.Tensor, y: Optional[torch.Tensor]) -> int:
    """Probe the model on ``X[:1]`` and return its number of outputs; errors name ``train`` or ``model``.

    The probe is one forward pass in eval mode (every module's mode restored after). Inputs the
    model cannot evaluate (e.g. the wrong width) raise ``ValueError`` naming ``train``; outputs
    other than ``(batch, n_outputs)`` logits one naming ``model`` (a binary model returns ONE logit
    as ``(n, 1)``; ``(n,)`` is refused, as everywhere in the project). Labels ``y`` (when given)
    must be class indices the outputs can take; one output means binary labels {0, 1}.
    """
    try:
        with frozen_in_eval(model), torch.no_grad():
            outputs = model(to_model(X[:1], model))
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"train: the model cannot evaluate inputs of shape {tuple(X.shape[1:])} ({detail})") from None
    check_output_shape(outputs, 1)
    if y is not None:
        check_labels(y, "train", outputs.shape[1])
    return outputs.shape[1]


def _has_batch_norm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def batch_slices(n: int, batch_size: int, merge_single: bool) -> list:
    """``(start, stop)`` of every batch of an epoch over ``n`` samples; with ``merge_single`` a last
    batch of ONE sample is joined to the one before (BatchNorm cannot normalise a batch of one)."""
    slices = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if merge_single and len(slices) > 1 and slices[-1][1] - slices[-1][0] == 1:
        slices[-2:] = [(slices[-2][0], n)]
    return slices


def make_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Adam, or SGD with momentum 0.9, over the trainable parameters of ``model``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: has no trainable parameters")
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)


def _cosine_lr(lr: float, step: int, total: int) -> float:
    """The cosine-annealed learning rate of step ``step`` (from 0) of ``total``: ``lr (1 + cos(pi step / total)) / 2``."""
    return lr * (1.0 + math.cos(math.pi * step / total)) / 2.0


def copy_for_training(model: nn.Module, retrain: str, seed: int) -> nn.Module:
    """Deep-copy ``model``; for ``retrain="scratch"`` re-initialise it with ``reset_parameters`` under ``seed``.

    Raises ``ValueError`` when ``"scratch"`` cannot reach some parameter (a parameter registered on
    a module without ``reset_parameters``).
    """
    check_model(model)
    check_choice(retrain, "retrain", RETRAIN_MODES)
    model = copy.deepcopy(model)
    if retrain == "finetune":
        return model
    resettable = [m for m in model.modules() if callable(getattr(m, "reset_parameters", None))]
    covered = {id(p) for m in resettable for p in m.parameters(recurse=False)}
    missing = [name for name, p in model.named_parameters() if id(p) not in covered]
    if missing:
        raise ValueError(f"retrain: 'scratch' cannot re-initialise {', '.join(missing)} (their modules "
                         "have no reset_parameters); use retrain='finetune' or add reset_parameters")
    with seeded(seed, numpy=False):
        for module in resettable:
            module.reset_parameters()
    return model


class Trainer:
    """Mini-batch training on per-sample weighted losses (base class; ``ERM`` is the plain case).

    Args:
        epochs: passes over the training data (default 10).
        lr: learning rate (default 1e-3, for Adam).
        batch_size: samples per step (default 64).
        optimizer: ``"adam"`` or ``"sgd"`` (momentum 0.9).
        weight_decay: L2 penalty of the optimizer.
        lr_schedule: ``"constant"`` (the default) or ``"cosine"``: the learning rate of step ``t`` of ``T``
            is ``lr * (1 + cos(pi t / T)) / 2``, annealed to 0 over the run, updated every step (as
            ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=T)`` stepped after every batch).
        retrain: ``"scratch"`` (re-initialise a copy) or ``"finetune"`` (continue from the given model).
        progress: show a tqdm progress bar (on a terminal only).
        loss_fn: per-sample loss ``(outputs, targets) -> (n,)``; default :func:`per_sample_loss`.
    """

    def __init__(
        self,
        *,
        epochs: int = 10,
        lr: float = 1e-3,
        batch_size: int = 64,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        retrain: str = "scratch",
        progress: bool = True,
        loss_fn: Optional[Callable] = None,
        lr_schedule: str = "constant",
    ):
        self.epochs = check_int(epochs, "epochs", minimum=1)
        self.lr = check_positive(lr, "lr")
        self.batch_size = check_int(batch_size, "batch_size", minimum=1)
        self.optimizer = check_choice(optimizer, "optimizer", OPTIMIZERS)
        self.weight_decay = check_positive(weight_decay, "weight_decay", allow_zero=True)
        self.lr_schedule = check_choice(lr_schedule, "lr_schedule", LR_SCHEDULES)
        self.retrain = check_choice(retrain, "retrain", RETRAIN_MODES)
        self.progress = check_bool(progress, "progress")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn: must be callable, got {type(loss_fn).__name__}")
        self.loss_fn = loss_fn or per_sample_loss

    def with_retrain(self, retrain: str) -> "Trainer":
        """A shallow copy of this trainer with another ``retrain`` mode."""
        other = copy.copy(self)
        other.retrain = check_choice(retrain, "retrain", RETRAIN_MODES)
        return other

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(epochs={self.epochs}, lr={self.lr}, batch_size={self.batch_size}, "
                f"optimizer={self.optimizer!r}, retrain={self.retrain!r}"
                + (f", lr_schedule={self.lr_schedule!r})" if self.lr_schedule != "constant" else ")"))

    def training_attack(self, seed: int) -> Optional[Callable]:
        """The attack ``attack(model, x, y) -> x_adv`` whose points this trainer's loss is taken at, built
        for run seed ``seed``; None when the loss is not a loss at attacked points (plain training)."""
        return None

    # ----------------------------------------------------------------- hooks for subclasses
    def begin_fit(self, model: nn.Module, train: tuple, val: Optional[tuple], *, seed: int,
                  steps_per_epoch: int) -> None:
        """Called once before the first step, with the model being trained (no-op by default)."""

    def begin_step(self, model: nn.Module, *, step: int, epoch: int) -> None:
        """Called before every optimisation step (no-op by default)."""

    def sample_losses(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, step: int) -> torch.Tensor:
        """Per-sample training losses of one batch, shape ``(b,)`` (clean loss by default)."""
        return self.loss_fn(model(xb), yb)

    def batch_loss(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, wb: torch.Tensor,
                   step: int) -> torch.Tensor:
        """The scalar minimised at one step: per-sample losses times the (mean-1) weights, averaged."""
        return (wb * self.sample_losses(model, xb, yb, step)).mean()

    # ----------------------------------------------------------------- training loop
    def fit(self, model: nn.Module, train, *, weights=None, seed: int = 0, val=None) -> nn.Module:
        """Train a copy of ``model`` on ``train`` and return it in eval mode (``model`` is not changed).

        With ``retrain="scratch"`` (the default) the copy is re-initialised under ``seed`` first, so
        ``fit(trained_model, data)`` trains a new model from scratch; ``retrain="finetune"`` continues
        from ``model``'s weights. ``train`` is ``(X, y[, s])`` (tensors or numpy arrays; ``X`` is trained
        on in the model's dtype, see :mod:`attacks.inputs`), a
        ``Dataset`` of ``(x, y, ...)`` items or a ``DataLoader`` over one: a ``Dataset`` other than a
        ``TensorDataset`` is streamed (each batch is read when it is needed), in this trainer's
        seeded order and batch size (a ``DataLoader``'s own batching and shuffling are not used).
        ``weights`` (one per sample, >= 0) scale the per-sample losses; ``val`` is passed to the
        hooks only (the base trainers do not use it). With BatchNorm layers a last batch of one
        sample is joined to the one before.
        """
        check_model(model)
        check_seed(seed)
        n, fetch, tensors = batch_source(train, "train")
        val = None if val is None else as_data(val, "val")
        w = check_weights(weights, n)
        checks_labels = self.loss_fn is per_sample_loss  # a custom loss_fn takes outputs of its own shape
        n_outputs = None
        if checks_labels:
            probe_x = tensors[0] if tensors is not None else fetch(torch.arange(1))[0]
            n_outputs = check_labels_fit(model, probe_x, None if tensors is None else tensors[1])
        device, dtype = model_device(model), model_dtype(model)
        slices = batch_slices(n, self.batch_size, _has_batch_norm(model))
        steps_per_epoch = len(slices)
        with seeded(seed, device, numpy=False):
            model = copy_for_training(model, self.retrain, seed)
            optimizer = make_optimizer(model, self.optimizer, self.lr, self.weight_decay)
            order_generator = make_generator(seed)
            self.begin_fit(model, tensors if tensors is not None else train, val, seed=seed,
                           steps_per_epoch=steps_per_epoch)
            model.train()
            step = 0
            with tqdm(total=self.epochs * steps_per_epoch, desc=type(self).__name__,
                      disable=None if self.progress else True, leave=False) as bar:
                for epoch in range(self.epochs):
                    order = torch.randperm(n, generator=order_generator)
                    for start, stop in slices:
                        idx = order[start:stop]
                        xb, yb = fetch(idx)
                        if tensors is None and checks_labels:
                            check_labels(yb, "train", n_outputs)
                        xb, yb = xb.to(device=device, dtype=dtype), yb.to(device)
                        wb = torch.ones(len(idx), device=device) if w is None else w[idx].to(device)
                        self.begin_step(model, step=step, epoch=epoch)
                        loss = self.batch_loss(model, xb, yb, wb, step)
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"lr: training diverged at step {step} (loss {loss.item()});"
                                                     " try a smaller learning rate")
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        if self.lr_schedule == "cosine":
                            for group in optimizer.param_groups:
                                group["lr"] = _cosine_lr(self.lr, step, self.epochs * steps_per_epoch)
                        optimizer.step()
                        step += 1
                        bar.update()
                        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        model.eval()
        return model


class ERM(Trainer):
    """Plain (weighted) empirical risk minimisation on the clean training points."""


class CheckpointingERM(ERM):
    """:class:`ERM` that keeps ``n_checkpoints`` evenly spaced copies of the weights of its latest fit:
    the checkpoints of ``robust_infl.influence(method="tracin", checkpoints=...)``.

    After ``fit``, ``checkpoints`` holds state dicts (detached copies) of the weights at the end of
    epochs ``round(k * epochs / n_checkpoints)`` for ``k = 1 .. n_checkpoints``; the last one is the
    returned model's. The training itself is :class:`ERM`'s, step for step.

    Args:
        n_checkpoints: how many, from 1 to ``epochs`` (default 3).
        **trainer_options: the options of :class:`Trainer`.
    """

    def __init__(self, *, n_checkpoints: int = 3, **trainer_options):
        super().__init__(**trainer_options)
        self.n_checkpoints = check_int(n_checkpoints, "n_checkpoints", minimum=1, maximum=self.epochs)
        self.checkpoints: list = []
        self._save_at: set = set()

    def begin_fit(self, model, train, val, *, seed, steps_per_epoch):
        """Reset the checkpoints and compute the steps after which one is saved."""
        super().begin_fit(model, train, val, seed=seed, steps_per_epoch=steps_per_epoch)
        self.checkpoints = []
        ends = {round(k * self.epochs / self.n_checkpoints) for k in range(1, self.n_checkpoints)}
        self._save_at = {epoch * steps_per_epoch for epoch in ends}

    def begin_step(self, model, *, step, epoch):
        """Save the weights when ``step`` is the first step after a checkpoint epoch."""
        if step in self._save_at:
            self.checkpoints.append(_state_copy(model))

    def fit(self, model, train, *, weights=None, seed: int = 0, val=None) -> nn.Module:
        """Train as :meth:`Trainer.fit` and append the final weights to ``checkpoints``."""
        trained = super().fit(model, train, weights=weights, seed=seed, val=val)
        self.checkpoints.append(_state_copy(trained))
        return trained


def _state_copy(model: nn.Module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


class _BallTrainer(Trainer):
    """Shared options of trainers with an inner maximisation in an ``eps``-ball."""

    def __init__(self, *, eps: float, norm: str = "linf", steps: int = 7, alpha: Optional[float] = None,
                 bounds=(0.0, 1.0), **trainer_options):
        super().__init__(**trainer_options)
        self.eps = check_positive(eps, "eps")
        self.norm = check_choice(norm, "norm", NORMS)
        self.steps = check_int(steps, "steps", minimum=1)
        self.alpha = 2.5 * self.eps / self.steps if alpha is None else check_positive(alpha, "alpha")
        self.bounds = check_bounds(bounds)
        self._noise: Optional[torch.Generator] = None

    def begin_fit(self, model, train, val, *, seed, steps_per_epoch):
        """Seed the generator of the inner attack's random starts."""
        self._noise = make_generator(seed)

    def _random_start(self, x: torch.Tensor) -> torch.Tensor:
        """A start drawn uniformly from the ``eps``-ball, as :class:`attacks.PGD` draws it (seeded generator)."""
        like = torch.empty(x.shape, dtype=x.dtype)
        return random_delta(like, self.eps, self.norm, self._noise).to(x.device)

    def _gaussian_start(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """A small Gaussian start ``N(0, scale^2)`` (seeded generator)."""
        return (scale * torch.randn(x.shape, generator=self._noise)).to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, eps={self.eps}, norm={self.norm!r}, steps={self.steps})"


class PGDAT(_BallTrainer):
    """Madry et al. (2018) PGD adversarial training: minimise the weighted loss at PGD points.

    The PGD points maximise the per-sample loss in the ``eps``-ball: a start drawn uniformly from the
    ball as :class:`attacks.PGD` draws it, then ``steps`` steps of size ``alpha`` (default
    ``2.5 * eps / steps``) with the attacks package's steps and projections. They are generated
    with the model in eval mode, then the training step is taken in train mode. ``attack`` (an
    ``attack(model, x, y) -> x_adv`` callable) replaces the built-in PGD when given.
    """

    def __init__(self, *, eps: float, norm: str = "linf", steps: int = 7, alpha: Optional[float] = None,
                 bounds=(0.0, 1.0), attack: Optional[Callable] = None, **trainer_options):
        super().__init__(eps=eps, norm=norm, steps=steps, alpha=alpha, bounds=bounds, **trainer_options)
        if attack is not None and not callable(attack):
            raise TypeError(f"attack: must be callable, got {type(attack).__name__}")
        self.attack = attack

    def adversarial_points(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """PGD points of one batch, generated with the model in eval mode (every module's mode restored)."""
        with frozen_in_eval(model):
            if self.attack is not None:
                return self.attack(model, xb, yb).detach()
            return pgd_ascent(lambda z: self.loss_fn(model(z), yb), xb, eps=self.eps, alpha=self.alpha,
                              steps=self.steps, norm=self.norm, bounds=self.bounds, start=self._random_start(xb),
                              iterate="delta")

    def training_attack(self, seed: int) -> Callable:
        """``attack`` when one was given, else :class:`attacks.PGD` with this trainer's ball, step and
        steps, seeded with ``seed``: the same PGD as :meth:`adversarial_points` up to rounding (which
        carries the perturbation, ``iterate="delta"``) and to the random starts (drawn from one
        generator per fit)."""
        if self.attack is not None:
            return self.attack
        return PGD(self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm, bounds=self.bounds, seed=seed)

    def sample_losses(self, model, xb, yb, step):
        """Per-sample loss at the PGD points."""
        return self.loss_fn(model(self.adversarial_points(model, xb, yb)), yb)


class FastAT(PGDAT):
    """Wong, Rice and Kolter (2020), "Fast is better than free": FGSM adversarial training from a random start.

    The training points are one signed-gradient step of size ``alpha`` (default ``1.25 * eps``, the
    paper's choice) from a start drawn uniformly from the ``eps``-ball, projected back onto the ball
    and clipped to ``bounds``: :class:`PGDAT` with ``steps=1`` and that step size, so it shares its
    ball, projections, seeding and :meth:`~PGDAT.adversarial_points`. Its cost is about two ERM
    steps per step; how it compares with the influence recipes is measured in ``experiments/RESULTS.md``
    (section ``defense_references``).
    """

    def __init__(self, *, eps: float, norm: str = "linf", alpha: Optional[float] = None, bounds=(0.0, 1.0),
                 **trainer_options):
        eps = check_positive(eps, "eps")
        super().__init__(eps=eps, norm=norm, steps=1, alpha=1.25 * eps if alpha is None else alpha,
                         bounds=bounds, **trainer_options)

    def __repr__(self) -> str:
        return f"{Trainer.__repr__(self)[:-1]}, eps={self.eps}, norm={self.norm!r}, alpha={self.alpha})"


class TRADES(_BallTrainer):
    """Zhang et al. (2019) TRADES: ``loss(f(x), y) + beta * KL(p(x) || p(x_adv))`` per sample.

    ``x_adv`` maximises the KL term in the ``eps``-ball from a small Gaussian start (0.001), with
    the model in eval mode; the clean distribution in the KL keeps its gradient, as in the paper.
    Its :meth:`~Trainer.training_attack` is None: the loss is not the label loss at attacked points.
    """

    def __init__(self, *, eps: float, beta: float = 6.0, norm: str = "linf", steps: int = 7,
                 alpha: Optional[float] = None, bounds=(0.0, 1.0), **trainer_options):
        super().__init__(eps=eps, norm=norm, steps=steps, alpha=alpha, bounds=bounds, **trainer_options)
        self.beta = check_positive(beta, "beta", allow_zero=True)

    def adversarial_points(self, model: nn.Module, xb: torch.Tensor) -> torch.Tensor:
        """Points in the ball maximising KL(p(x) || p(x_adv)), generated in eval mode (every module's mode restored)."""
        with frozen_in_eval(model):
            with torch.no_grad():
                clean_log_probs = _class_log_probs(model(xb))

            def kl_to_clean(z):
                return F.kl_div(_class_log_probs(model(z)), clean_log_probs, reduction="none",
                                log_target=True).sum(dim=1)

            return pgd_ascent(kl_to_clean, xb, eps=self.eps, alpha=self.alpha, steps=self.steps, norm=self.norm,
                              bounds=self.bounds, start=self._gaussian_start(xb, 0.001), iterate="delta")

    def sample_losses(self, model, xb, yb, step):
        """Clean loss plus ``beta`` times the per-sample KL to the adversarial prediction."""
        x_adv = self.adversarial_points(model, xb)
        logits = model(xb)
        clean_log_probs = _class_log_probs(logits)
        kl = F.kl_div(_class_log_probs(model(x_adv)), clean_log_probs, reduction="none", log_target=True).sum(dim=1)
        return self.loss_fn(logits, yb) + self.beta * kl
