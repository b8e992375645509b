"""Online one-step-lookahead reweighting against a robust validation objective.

The idea is Ren et al. (2018), "Learning to Reweight Examples for Robust Deep Learning"
(https://arxiv.org/abs/1803.09050): during training, weight each sample of the minibatch by how much
a small step on its loss would DECREASE a validation objective. To first order that decrease is
``lr * <grad l_i, grad f_val>``, so the weight is ``max(0, <grad l_i, v>)`` with ``v = grad f_val``,
normalised over the batch. Here ``f_val`` is the loss at ADVERSARIAL validation points (the threat
model of the defence), and the scores are the project's influence scores used locally: the same
``<grad l_i, v>`` as the Hessian-free inner-product influence, recomputed on the current weights.

Cost: ``v`` is refreshed every ``every`` steps from a seeded random batch of ``n_val_batch``
validation points (one attack and one backward pass, :func:`robust_infl.engine.objective_gradient`);
the alignments of the minibatch are ONE forward-mode jvp
(:func:`robust_infl.engine.directional_derivatives`), never per-sample gradients.

Two ways in: :class:`LookaheadReweighting`, a trainer (the recipe ``lookahead``), and
:class:`LookaheadWeights`, the same weights as a per-batch hook for your own training loop
(``weights = hook(xb, yb)``); the trainer is the hook inside the project's loop, one code path.

What it is worth: it costs several ERM fits, and on MNIST FGSM adversarial training from a random
start (``fast-at``), cheaper, is far more robust; on top of PGD-AT it does not help. The figures,
with 95% intervals and the adversarial-training references beside it, are in ``experiments/RESULTS.md``
(sections ``defense_references`` and ``defense_deep``); do not pick it where a cheaper reference
there dominates it. It uses labelled validation data that plain training does not use; compare it
with plain training on train + validation (the ``train+val`` recipe), too.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

import attacks
from attacks.inputs import as_data
from attacks.plumbing import eval_mode, make_generator, model_device
from attacks.validation import SEED_MAX, check_bool, check_choice, check_fraction, check_int, check_model, check_seed
from robust_infl.engine import build_problem, directional_derivatives, objective_gradient
from robust_infl.inputs import TargetSet
from robust_infl.objectives import Robust, Utility
from robust_infl.options import ScoringOptions

from .trainers import ERM, PGDAT, Trainer, per_sample_loss

__all__ = [
    "LookaheadReweighting",
    "LookaheadWeights",
    "lookahead_weights",
    "VAL_OBJECTIVES",
    "SCHEMES",
    "lookahead_recipe",
    "validation_attack",
    "PLAIN_TRAINING_OPTIONS",
    "ADVERSARIAL_TRAINING_OPTIONS",
]

VAL_OBJECTIVES = ("adversarial", "clean+adversarial")
SCHEMES = ("positive", "sign")


def lookahead_weights(alignment: torch.Tensor, *, mix: float, scheme: str = "positive",
                      labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Batch weights (mean 1, >= 0) from the alignments ``<grad l_i, v>`` of one minibatch.

    ``scheme="positive"`` (Ren et al.): ``max(0, alignment)``; ``"sign"``: 1 where the alignment
    is positive, 0 elsewhere (drops the gradient magnitude). The raw weights are normalised to mean 1
    (over the batch, or within each class of ``labels`` when given, which keeps the class balance of
    the batch); a batch (or class) with no positive alignment gets uniform weights. The result is
    ``mix * lookahead + (1 - mix) * 1``.
    """
    if not torch.is_tensor(alignment) or alignment.dim() != 1:
        raise TypeError("alignment: must be a 1-D tensor")
    check_choice(scheme, "scheme", SCHEMES)
    mix = check_fraction(mix, "mix", allow_zero=True, allow_one=True)
    raw = alignment.clamp_min(0) if scheme == "positive" else (alignment > 0).to(alignment.dtype)
    groups = torch.zeros_like(alignment, dtype=torch.long) if labels is None else labels.reshape(-1).long()
    if groups.numel() != alignment.numel():
        raise ValueError(f"labels: need one label per sample ({alignment.numel()}), got {groups.numel()}")
    _, group_index = torch.unique(groups, return_inverse=True)
    n_groups = int(group_index.max()) + 1
    sums = torch.zeros(n_groups, dtype=raw.dtype, device=raw.device).index_add_(0, group_index, raw)
    counts = torch.bincount(group_index, minlength=n_groups).to(raw.dtype)
    scale = torch.where(sums > 0, counts / sums.clamp_min(torch.finfo(raw.dtype).tiny), torch.zeros_like(sums))
    normalised = torch.where(sums[group_index] > 0, raw * scale[group_index], torch.ones_like(raw))
    return mix * normalised + (1 - mix)


def validation_attack(attack: Callable, steps: int = 5) -> Callable:
    """A cheaper copy of ``attack`` for the validation gradient: ``attacks.PGD`` with ``steps`` steps
    (step size ``2.5 * eps / steps``); any other attack is returned unchanged."""
    if isinstance(attack, attacks.PGD) and attack.steps > steps:
        return attacks.PGD(attack.eps, steps=steps, norm=attack.norm, random_start=attack.random_start,
                           restarts=attack.restarts, bounds=attack.bounds, seed=attack.seed)
    return attack


def _checked_options(*, every, mix, n_val_batch, val_objective, scheme, per_class) -> dict:
    """The options :class:`LookaheadWeights` and :class:`LookaheadReweighting` share, checked once (errors name them)."""
    return {"every": check_int(every, "every", minimum=1),
            "mix": check_fraction(mix, "mix", allow_zero=True, allow_one=True),
            "n_val_batch": check_int(n_val_batch, "n_val_batch", minimum=1),
            "val_objective": check_choice(val_objective, "val_objective", VAL_OBJECTIVES),
            "scheme": check_choice(scheme, "scheme", SCHEMES),
            "per_class": check_bool(per_class, "per_class")}


class LookaheadWeights:
    """Per-batch lookahead weights for your own training loop: ``weights = hook(xb, yb)``.

    Call it once per optimisation step with the batch the step trains on (the clean batch, or its
    adversarial points in a PGD-AT loop), at the model's current parameters, and multiply the
    per-sample losses by the result (mean 1 over the batch, >= 0, no gradient). The hook counts its
    calls as steps: after ``warmup_steps`` calls of uniform weights, every ``every`` calls it
    recomputes the gradient ``v`` of the validation objective at the model's current weights (a seeded
    batch of ``n_val_batch`` validation points; the loss at ``attack``'s adversarial points, or its mean
    with the clean loss for ``val_objective="clean+adversarial"``); each batch sample then gets the
    weight :func:`~defenses.lookahead.lookahead_weights` of its alignment ``<grad l_i, v>`` (one forward-mode jvp), mixed
    with uniform weights by ``mix``. :class:`LookaheadReweighting` is this hook inside the project's own
    training loop, so the two give the same model (``tests/defenses/test_lookahead.py``).

    Whether it pays off against adversarial training of equal cost is measured in
    ``experiments/RESULTS.md`` (section ``defense_references``): so far it does not.

    Args:
        model: the model being trained (read at its current parameters at every call; not modified).
        val: validation ``(X, y[, s])``.
        attack: ``attack(model, x, y) -> x_adv`` for the validation points.
        every, warmup_steps, mix, n_val_batch, val_objective, scheme, per_class: as in
            :class:`LookaheadReweighting` (``warmup_steps`` counts calls, not epochs).
        loss_fn: per-sample loss ``(outputs, targets) -> (n,)``; default :func:`~defenses.per_sample_loss`.
        seed: seed of the validation batches and of the attack's randomness inside the objective.
    """

    def __init__(self, model: nn.Module, val, attack: Callable, *, every: int = 5, warmup_steps: int = 0,
                 mix: float = 0.25, n_val_batch: int = 128, val_objective: str = "adversarial",
                 scheme: str = "positive", per_class: bool = False, loss_fn: Optional[Callable] = None,
                 seed: int = 0):
        check_model(model)
        if not callable(attack):
            raise TypeError(f"attack: must be callable attack(model, x, y), got {type(attack).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn: must be callable, got {type(loss_fn).__name__}")
        self.model = model
        self.val = as_data(val, "val")[:2]
        self.attack = attack
        vars(self).update(_checked_options(every=every, mix=mix, n_val_batch=n_val_batch,
                                           val_objective=val_objective, scheme=scheme, per_class=per_class))
        self.warmup_steps = check_int(warmup_steps, "warmup_steps", minimum=0)
        self.loss_fn = loss_fn or per_sample_loss
        self.seed = check_seed(seed)
        self.step = 0
        self.direction: Optional[dict] = None
        self._val_generator = make_generator(self.seed)

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The weights ``(b,)`` of the batch ``(xb, yb)`` at the model's current parameters (one step)."""
        if not torch.is_tensor(xb) or not torch.is_tensor(yb) or xb.shape[0] != yb.shape[0] or xb.shape[0] == 0:
            raise ValueError("xb: need a non-empty batch of inputs xb and labels yb with one label per input")
        since, self.step = self.step - self.warmup_steps, self.step + 1
        if since >= 0 and since % self.every == 0:
            self.direction = self.validation_gradient(refresh=since // self.every)
        if self.direction is None or self.mix == 0:
            return torch.ones(xb.shape[0], device=xb.device)
        alignment = self.alignments(xb, yb, self.direction)
        return lookahead_weights(alignment, mix=self.mix, scheme=self.scheme,
                                 labels=yb if self.per_class else None).detach()

    def _problem(self, train: tuple, target: TargetSet, objective, seed: int):
        names = tuple(name for name, p in self.model.named_parameters() if p.requires_grad)
        options = ScoringOptions(batch_size=max(train[0].shape[0], len(target)), seed=seed, progress=False)
        return build_problem(self.model, train, target, objective, loss_fn=self.loss_fn, param_names=names,
                             device=train[0].device, options=options)

    def validation_gradient(self, refresh: int = 0) -> dict:
        """Gradient of the validation objective on a fresh seeded batch, at the model's current weights."""
        X, y = self.val
        device = model_device(self.model)
        count = min(self.n_val_batch, X.shape[0])
        idx = torch.randperm(X.shape[0], generator=self._val_generator)[:count]
        target = TargetSet(X[idx].to(device), y[idx].to(device))
        objectives = [Robust(self.attack)] + ([Utility()] if self.val_objective == "clean+adversarial" else [])
        with eval_mode(self.model):
            gradients = []
            for objective in objectives:
                seed = (self.seed * 100_003 + refresh) % (SEED_MAX + 1)  # a valid seed for every valid self.seed
                problem = self._problem((target.x, target.y), target, objective, seed=seed)
                gradients.append(objective_gradient(problem, problem.params))
        return {name: sum(g[name] for g in gradients) / len(gradients) for name in gradients[0]}

    def alignments(self, x: torch.Tensor, y: torch.Tensor, direction: dict) -> torch.Tensor:
        """``<grad l_i, direction>`` for every sample of the batch: one forward-mode jvp, model in eval mode."""
        with eval_mode(self.model):
            problem = self._problem((x, y), TargetSet(x[:1], y[:1]), Utility(), seed=self.seed)
            return directional_derivatives(problem, problem.params, direction)


class LookaheadReweighting(Trainer):
    """Train like ``base`` (ERM or PGD-AT) with online one-step-lookahead sample weights.

    The project's training loop with a :class:`LookaheadWeights` hook inside: after ``warmup_epochs``
    of uniform weights, every ``every`` steps the gradient ``v`` of the validation objective is
    recomputed on ``n_val_batch`` validation points drawn with the seed: the mean loss at
    ``attack``'s adversarial points (``val_objective="adversarial"``), or the mean of the clean and the
    adversarial validation losses (``"clean+adversarial"``). At every step each minibatch sample gets
    the weight :func:`~defenses.lookahead.lookahead_weights` of its alignment ``<grad l_i, v>``, mixed with uniform weights
    (``mix``; ``mix=0`` is exactly ``base``). With a PGD-AT ``base`` the per-sample losses, their
    alignments and the training step are all at the adversarial training points. Static ``weights``
    given to :meth:`~defenses.Trainer.fit` multiply the lookahead weights.

    Idea: Ren et al. (2018), "Learning to Reweight Examples for Robust Deep Learning", with the
    validation loss replaced by the robust (adversarial) validation loss. It costs several ERM
    fits; whether it beats the adversarial-training references of the same cost is measured in
    ``experiments/RESULTS.md`` (section ``defense_references``; so far FGSM adversarial training,
    cheaper, is more robust).

    Args:
        base: an :class:`~defenses.ERM` or :class:`~defenses.PGDAT` trainer; its epochs, learning
            rate, batch size, optimizer, retrain mode, progress flag and loss are used.
        attack: ``attack(model, x, y) -> x_adv`` for the validation points (e.g. PGD with 5 steps).
        val: validation ``(X, y[, s])``; when None the ``val`` given to :meth:`~defenses.Trainer.fit` is used.
        every: steps between refreshes of ``v``.
        warmup_epochs: epochs of uniform weights before the first refresh.
        mix: share of the lookahead weights in ``[0, 1]``.
        n_val_batch: validation points per refresh (all of them if fewer).
        val_objective: ``"adversarial"`` or ``"clean+adversarial"``.
        scheme: ``"positive"`` (``max(0, alignment)``) or ``"sign"`` (``alignment > 0``).
        per_class: normalise the weights within each class of the minibatch.
    """

    def __init__(self, base: Trainer, *, attack: Callable, val=None, every: int = 5, warmup_epochs: int = 1,
                 mix: float = 0.25, n_val_batch: int = 128, val_objective: str = "adversarial",
                 scheme: str = "positive", per_class: bool = False):
        if not isinstance(base, (ERM, PGDAT)):
            raise TypeError(f"base: must be an ERM or PGDAT trainer, got {type(base).__name__}")
        super().__init__(epochs=base.epochs, lr=base.lr, batch_size=base.batch_size, optimizer=base.optimizer,
                         weight_decay=base.weight_decay, lr_schedule=base.lr_schedule, retrain=base.retrain,
                         progress=base.progress, loss_fn=base.loss_fn)
        if not callable(attack):
            raise TypeError(f"attack: must be callable attack(model, x, y), got {type(attack).__name__}")
        self.base = base
        self.attack = attack
        self.val = None if val is None else as_data(val, "val")[:2]
        vars(self).update(_checked_options(every=every, mix=mix, n_val_batch=n_val_batch,
                                           val_objective=val_objective, scheme=scheme, per_class=per_class))
        self.warmup_epochs = check_int(warmup_epochs, "warmup_epochs", minimum=0)
        self.hook: Optional[LookaheadWeights] = None

    def __repr__(self) -> str:
        return (f"LookaheadReweighting(base={self.base!r}, every={self.every}, warmup_epochs={self.warmup_epochs}, "
                f"mix={self.mix}, n_val_batch={self.n_val_batch}, val_objective={self.val_objective!r}, "
                f"scheme={self.scheme!r}, per_class={self.per_class}, retrain={self.retrain!r})")

    # ----------------------------------------------------------------- hooks
    def begin_fit(self, model, train, val, *, seed, steps_per_epoch):
        """Seed the base trainer; build the :class:`LookaheadWeights` hook of this fit on the validation data."""
        self.base.begin_fit(model, train, val, seed=seed, steps_per_epoch=steps_per_epoch)
        chosen = self.val if self.val is not None else (None if val is None else tuple(val[:2]))
        if chosen is None:
            raise ValueError("val: LookaheadReweighting needs validation data (pass val= to the trainer or to fit)")
        self.hook = LookaheadWeights(model, chosen, self.attack, every=self.every,
                                     warmup_steps=self.warmup_epochs * steps_per_epoch, mix=self.mix,
                                     n_val_batch=self.n_val_batch, val_objective=self.val_objective,
                                     scheme=self.scheme, per_class=self.per_class, loss_fn=self.loss_fn, seed=seed)

    def batch_loss(self, model, xb, yb, wb, step):
        """Weighted mean loss at the training points (adversarial for a PGD-AT base), weights from the hook."""
        x_train = self.training_points(model, xb, yb)
        wb = wb * self.hook(x_train, yb).to(wb.dtype)
        return (wb * self.loss_fn(model(x_train), yb)).mean()

    # ----------------------------------------------------------------- pieces
    def training_points(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        """The points the per-sample losses are taken at: ``xb`` (ERM) or the base's PGD points."""
        if isinstance(self.base, PGDAT):
            return self.base.adversarial_points(model, xb, yb)
        return xb


# Options on top of plain training (ERM): the variant chosen by ``python -m experiments.defense_deep
# --select`` (the highest mean held-out validation robust accuracy over MNIST and Adult among the variants
# that cost at most one point of clean accuracy on each).
PLAIN_TRAINING_OPTIONS: dict = dict()

# Options on top of PGD-AT: the variant with the best mean held-out validation robust accuracy over
# MNIST and Adult among those tried by ``python -m experiments.defense_deep --select`` (none of them
# beat plain PGD-AT; this one cost the least).
ADVERSARIAL_TRAINING_OPTIONS = dict(val_objective="clean+adversarial", scheme="sign", per_class=True)


def lookahead_recipe(ctx) -> nn.Module:
    """Pipeline recipe ``lookahead``: retrain with :class:`LookaheadReweighting` on top of the context's
    trainer against the threat-model attack (PGD cut to 5 steps) on the validation split.

    On ERM: :data:`PLAIN_TRAINING_OPTIONS`; on PGD-AT: :data:`ADVERSARIAL_TRAINING_OPTIONS`. Other
    trainers raise ``TypeError``.
    """
    if not isinstance(ctx.trainer, (ERM, PGDAT)):
        raise TypeError(f"trainer: the lookahead recipe runs on top of erm or pgd-at, got {type(ctx.trainer).__name__}")
    options = ADVERSARIAL_TRAINING_OPTIONS if isinstance(ctx.trainer, PGDAT) else PLAIN_TRAINING_OPTIONS
    trainer = LookaheadReweighting(ctx.trainer, attack=validation_attack(ctx.attack), val=ctx.val, **options)
    return trainer.fit(ctx.model, ctx.train, seed=ctx.seed)
