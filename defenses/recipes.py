"""Defence recipes: name -> function that turns the trained base model into a defended model; the one
registry of both pipelines (evasion: :func:`defenses.run`; poisoning: :func:`defenses.run_poisoning`, whose
recipes live in :mod:`defenses.poison_recipes` and are registered with ``pipeline="poisoning"``).

An evasion recipe receives a :class:`DefenceContext` -- the trained model, the training and validation
splits, the trainer, the attack, the budget and the seed -- and returns a new ``nn.Module``. The
context holds NO test data, so nothing a recipe does (scoring, selection, training) can see the
test split. Add a recipe with one line::

    register_recipe("my-defence", my_function, uses_budget=False, description="...")

Built in:

- ``none``: no defence (scratch: the base model itself, which retraining on all data with the same
  seed reproduces exactly; finetune: fine-tuned on all data for the same epochs).
- ``influence``: harm on ``Robust(attack)`` over the VALIDATION split (``robust_infl.influence``),
  then prune (weight 0, so as many training steps as ``none``) / reweight by it; with the method option
  ``ensemble=n``, scored on ``n`` models trained on random halves instead of the base model
  (:func:`influence_scores`).
- ``random``: the same budget, chosen uniformly at random (seeded).
- ``loss``: the same budget, the samples with the highest training loss under the base model.
- ``influence-misclassified``: the largest harm among the samples the base model misclassifies (at
  their adversarial training points for adversarial trainers), at most the budget.
- ``train+val``: no selection, plain (re)training on train + validation (a fair reference for
  defences that use the validation labels).
- ``lookahead``: online lookahead reweighting (:mod:`defenses.lookahead`).

None of them is recommended by itself: a defence is worth using only where it beats the
adversarial-training references that ``defenses.run`` trains beside it (``fast-at``, ``pgd-at``,
``trades``; :mod:`defenses.references`) at equal or lower cost. Where each stands is measured in
``experiments/RESULTS.md`` (section ``defense_references``); the descriptions below say what a recipe
does, not how much it helps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import nn

import robust_infl
from attacks.base import predict
from attacks.plumbing import frozen_in_eval, model_device
from attacks.validation import check_bool, check_choice

from .ensembles import train_ensemble
from .selection import budget_size, prune, reweight, uniform_scores
from .trainers import per_sample_loss

__all__ = [
    "DefenceContext",
    "Recipe",
    "PIPELINES",
    "THREATS",
    "register_recipe",
    "available_recipes",
    "get_recipe",
    "score_based",
    "cached_scores",
    "select_and_retrain",
    "retrain_without",
    "DEFAULT_RECIPES",
]


@dataclass
class DefenceContext:
    """What a recipe may use. There is deliberately no test split here.

    Attributes:
        model: the trained base model (do not mutate it; trainers return copies).
        train, val: ``(X, y[, s])`` tensors.
        trainer: has ``fit(model, train, *, weights=None, seed=0, val=None) -> nn.Module``.
        attack: ``attack(model, x, y) -> x_adv``, the threat model being defended against.
        seed: the run's seed.
        fraction: the budget (share of training samples), None for budget-free recipes.
        mode: ``"prune"`` or ``"reweight"``; ``scheme`` / ``temperature``: the reweighting rule.
        method, method_options: the influence method and its options (``ensemble``: models trained on random
            halves scored instead of the base model, see ``influence_scores``).
        train_attack: the training-point attack of an adversarial trainer (None for ERM): scores
            and training losses are then taken at the adversarial training points.
        progress: show progress bars.
        cache: per-seed storage shared by the calls of one seed (scores do not depend on the budget).
    """

    model: nn.Module
    train: tuple
    val: tuple
    trainer: object
    attack: Callable
    seed: int
    fraction: Optional[float] = None
    mode: str = "prune"
    scheme: str = "smooth"
    temperature: float = 1.0
    method: str = "ip"
    method_options: dict = field(default_factory=dict)
    train_attack: Optional[Callable] = None
    progress: bool = True
    cache: dict = field(default_factory=dict)


PIPELINES = ("evasion", "poisoning")
THREATS = ("none", "unknown", "evidence")  # what a poisoning recipe knows of the backdoor


@dataclass(frozen=True)
class Recipe:
    """A registered recipe: ``fn(context)``; ``uses_budget`` False runs once per seed (evasion).

    ``pipeline`` is ``"evasion"`` (:func:`defenses.run`: ``fn(DefenceContext) -> nn.Module``) or
    ``"poisoning"`` (:func:`defenses.run_poisoning`: ``fn(PoisonContext) -> Outcome``, see
    :mod:`defenses.poison_recipes`); ``threat`` is a poisoning recipe's defender threat model: ``"none"`` (no
    defence), ``"unknown"`` (trigger unknown) or ``"evidence"`` (run once per evidence size K). ``by_default``
    False: a poisoning run naming no recipes leaves it out (an expensive recipe, run only when named).
    """

    name: str
    fn: Callable
    uses_budget: bool
    description: str
    pipeline: str = "evasion"
    threat: Optional[str] = None
    by_default: bool = True


_RECIPES: dict = {}  # (pipeline, name) -> Recipe


def register_recipe(name: str, fn: Callable, *, uses_budget: bool = True, description: str = "",
                    pipeline: str = "evasion", threat: Optional[str] = None, by_default: bool = True) -> Recipe:
    """Register ``fn`` under ``name`` (unique within its ``pipeline``) and return the :class:`~defenses.recipes.Recipe`.

    A poisoning recipe (``pipeline="poisoning"``) needs its ``threat``: ``"none"``, ``"unknown"`` or
    ``"evidence"``; an evasion recipe has none. ``by_default=False`` keeps a poisoning recipe out of a run that
    names no recipes (for the expensive ones).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise TypeError(f"fn: must be callable, got {type(fn).__name__}")
    check_choice(pipeline, "pipeline", PIPELINES)
    if pipeline == "poisoning":
        check_choice(threat, "threat", THREATS)
    elif threat is not None:
        raise ValueError(f"threat: only poisoning recipes have one, got {threat!r}")
    key = (pipeline, name)
    if key in _RECIPES and _RECIPES[key].fn is not fn:
        raise ValueError(f"name: {pipeline} recipe {name!r} is already registered")
    check_bool(by_default, "by_default")
    _RECIPES[key] = Recipe(name, fn, bool(uses_budget), description, pipeline, threat, by_default)
    return _RECIPES[key]


def available_recipes(pipeline: str = "evasion") -> tuple:
    """Names of the registered recipes of ``pipeline`` (``"evasion"`` or ``"poisoning"``), in registration order."""
    check_choice(pipeline, "pipeline", PIPELINES)
    return tuple(name for kind, name in _RECIPES if kind == pipeline)


def get_recipe(name: str, pipeline: str = "evasion") -> Recipe:
    """The ``pipeline`` recipe registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    if (pipeline, name) not in _RECIPES:
        kind = "" if pipeline == "evasion" else f"{pipeline} "
        raise ValueError(f"recipes: unknown {kind}recipe {name!r}; valid names are "
                         f"{', '.join(available_recipes(pipeline))}")
    return _RECIPES[(pipeline, name)]


def retrain_without(ctx: DefenceContext, keep: torch.Tensor) -> nn.Module:
    """Retrain with the samples outside the keep-mask removed: weight 0, so the retraining takes as many
    steps, in the same data order, as ``none`` (ART's trainers, which take no weights, drop the rows)."""
    return ctx.trainer.fit(ctx.model, ctx.train, weights=keep.to(torch.float32), seed=ctx.seed, val=ctx.val)


def select_and_retrain(ctx: DefenceContext, scores: torch.Tensor) -> nn.Module:
    """Prune (weight 0 for the most harmful, :func:`retrain_without`) or reweight (train on all, weighted) by
    ``scores``, then retrain."""
    if ctx.mode == "prune":
        return retrain_without(ctx, prune(scores, ctx.fraction))
    weights = reweight(scores, ctx.scheme, fraction=ctx.fraction, temperature=ctx.temperature)
    return ctx.trainer.fit(ctx.model, ctx.train, weights=weights, seed=ctx.seed, val=ctx.val)


def cached_scores(ctx: DefenceContext, name: str, score_fn: Callable[[DefenceContext], torch.Tensor]) -> torch.Tensor:
    """``score_fn(ctx)`` on the CPU, computed once per seed and kept in ``ctx.cache[name]``.

    The seconds it took (wall and CPU) are kept too; a call that reuses the scores adds them to
    ``ctx.cache["reused_seconds"]``, so every recipe that uses them is charged their cost.
    """
    if name not in ctx.cache:
        wall, cpu = time.perf_counter(), time.process_time()
        ctx.cache[name] = score_fn(ctx).detach().cpu()
        ctx.cache[f"{name}:seconds"] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}
    elif "reused_seconds" in ctx.cache:
        reused, spent = ctx.cache["reused_seconds"], ctx.cache[f"{name}:seconds"]
        ctx.cache["reused_seconds"] = {k: reused[k] + spent[k] for k in reused}
    return ctx.cache[name]


def score_based(name: str, score_fn: Callable[[DefenceContext], torch.Tensor]) -> Callable:
    """A recipe that scores the training samples once per seed (cached) and selects by the budget."""

    def recipe(ctx: DefenceContext) -> nn.Module:
        return select_and_retrain(ctx, cached_scores(ctx, name, score_fn))

    recipe.__name__ = f"{name}_recipe"
    return recipe


ENSEMBLE_OPTION = "ensemble"
"""The method option read by the influence recipes themselves (not by the method): score with that many models
trained on random halves of the training split (TRAK's recipe) instead of the base model."""


def influence_scores(ctx: DefenceContext) -> torch.Tensor:
    """Harm of every training sample on ``Robust(attack)`` measured on the validation split.

    With ``method_options["ensemble"] = n``: scored instead on ``n`` models trained from their own seeded
    initialisations on random halves of the training split by the run's trainer
    (:func:`defenses.ensembles.train_ensemble` with the context's seed), as one ``robust_infl.Ensemble`` (the
    mean of the members' scores; TRAK's own ensemble for ``trak``); their training is part of the recipe's cost.
    """
    options = dict(ctx.method_options)
    members = options.pop(ENSEMBLE_OPTION, None)
    model = ctx.model if members is None else train_ensemble(
        ctx.model, ctx.train[:2], ctx.trainer.with_retrain("scratch"), members, subset=0.5, seed=ctx.seed).ensemble
    adversarial = ctx.train_attack is not None
    return robust_infl.influence(
        model, ctx.train[:2], ctx.val, objective=robust_infl.Robust(ctx.attack), method=ctx.method,
        seed=ctx.seed, progress=ctx.progress, train_loss="adversarial" if adversarial else "clean",
        train_attack=ctx.train_attack, **options)


def random_scores(ctx: DefenceContext) -> torch.Tensor:
    """Uniform random scores (seeded): a random selection of the same budget."""
    return uniform_scores(ctx.train[0].shape[0], ctx.seed)


def _outputs_at_training_points(ctx: DefenceContext, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(outputs, labels)`` of the base model, batch by batch, at the training points its training loss is
    taken at (adversarial for adversarial trainers); eval mode, every submodule's mode restored after."""
    X, y = ctx.train[:2]
    device = model_device(ctx.model)
    with frozen_in_eval(ctx.model):
        for start in range(0, X.shape[0], batch_size):
            xb, yb = X[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
            if ctx.train_attack is not None:
                xb = ctx.train_attack(ctx.model, xb, yb)
            with torch.no_grad():
                yield ctx.model(xb), yb


def training_loss_scores(ctx: DefenceContext, batch_size: int = 512) -> torch.Tensor:
    """Per-sample training loss of the base model (at the adversarial training points for adversarial trainers),
    in eval mode; every submodule's mode is restored after."""
    batches = _outputs_at_training_points(ctx, batch_size)
    return torch.cat([per_sample_loss(out, yb).double().cpu() for out, yb in batches])


def misclassified_training_samples(ctx: DefenceContext, batch_size: int = 512) -> torch.Tensor:
    """Boolean mask of the training samples the base model misclassifies, at their adversarial training
    points for adversarial trainers (the points its training loss is taken at), in eval mode."""
    batches = _outputs_at_training_points(ctx, batch_size)
    return torch.cat([(predict(out) != yb).cpu() for out, yb in batches])


def influence_on_misclassified(ctx: DefenceContext) -> nn.Module:
    """Remove the samples with the largest harm (as ``influence``) among those the base model misclassifies:
    the budget's worth, or fewer when fewer are misclassified; retrain with weight 0 for them (both modes)."""
    scores = cached_scores(ctx, "influence", influence_scores).double()
    wrong = misclassified_training_samples(ctx)
    k = min(budget_size(scores.numel(), ctx.fraction), int(wrong.sum()))
    restricted = torch.where(wrong, scores, torch.tensor(-torch.inf, dtype=torch.float64))
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    keep[torch.sort(-restricted, stable=True).indices[:k]] = False
    return retrain_without(ctx, keep)


def no_defence(ctx: DefenceContext) -> nn.Module:
    """The undefended model: the base model (scratch), or fine-tuned on all data (finetune)."""
    if getattr(ctx.trainer, "retrain", "scratch") == "scratch":
        return ctx.model
    return ctx.trainer.fit(ctx.model, ctx.train, seed=ctx.seed, val=ctx.val)


def train_and_val(ctx: DefenceContext) -> nn.Module:
    """Plain (re)training on the training and validation splits together."""
    k = min(len(ctx.train), len(ctx.val))
    joined = tuple(torch.cat([a, b]) for a, b in zip(ctx.train[:k], ctx.val[:k]))
    return ctx.trainer.fit(ctx.model, joined, seed=ctx.seed)


register_recipe("none", no_defence, uses_budget=False, description="no defence")
register_recipe("influence", score_based("influence", influence_scores),
                description="prune / reweight by harm on Robust(attack) over the validation split")
register_recipe("random", score_based("random", random_scores), description="random selection, same budget")
register_recipe("loss", score_based("loss", training_loss_scores),
                description="highest training loss, same budget")
register_recipe("influence-misclassified", influence_on_misclassified,
                description="highest harm among the misclassified training samples, at most the budget "
                            "(exploratory; see experiments/RESULTS.md, defense_deep)")
register_recipe("train+val", train_and_val, uses_budget=False,
                description="plain training on train + validation")
from .lookahead import lookahead_recipe  # noqa: E402  (lookahead.py does not import this module)
register_recipe("lookahead", lookahead_recipe, uses_budget=False,
                description="online lookahead reweighting against the adversarial validation loss (several "
                            "times the cost of ERM; fast-at, cheaper, was more robust: experiments/RESULTS.md, "
                            "defense_references)")

DEFAULT_RECIPES = ("none", "influence", "random", "loss")
