"""The plan of a run: :func:`plan_run` checks a :class:`~defenses.config.RunConfig` (:func:`defenses.run`) or a
:class:`~defenses.config.PoisoningConfig` (:func:`defenses.run_poisoning`) and resolves it (data, model, attack,
trainer, recipes, references, evaluation suite, backdoor threat model) into a :class:`RunPlan` before any
training; :func:`defenses.pipeline.execute` and :func:`defenses.poisoning.execute_poisoning` run it. The
report's ``config`` is :meth:`RunPlan.config` (:meth:`RunPlan.poison_config`).
"""

from __future__ import annotations

import copy
import hashlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from attacks.inputs import as_data
from attacks.plumbing import make_generator
from attacks.base import attack_settings, plain_value
from attacks.registry import make_attack
from attacks.validation import check_bool, check_choice, check_int, check_number, check_positive, check_seed
from robust_infl.datasets import Splits
from robust_infl.registry import DATA_DEFAULTS, USER_DATA_DEFAULTS, data_defaults, load_splits, model_factory
from robust_infl.io import check_output_folder
from robust_infl.methods import available_methods
from robust_infl.methods.hessian import check_exact_size
from robust_infl.store import model_hash
from robust_infl.inputs import resolve_param_names

from .art_trainer import ARTTrainer
from .config import PoisoningConfig, PoisonSpec, RunConfig, SharedConfig
from .eval_suite import resolve_suite
from .recipes import ENSEMBLE_OPTION, available_recipes, get_recipe
from .references import reference_trainers
from .registry import make_trainer
from .selection import REWEIGHT_SCHEMES, check_budget

__all__ = ["RunPlan", "plan_run", "seeded_split", "MODES", "EmptyBudgetWarning"]

MODES = ("prune", "reweight")


class EmptyBudgetWarning(UserWarning, ValueError):
    """A budget (``fractions``) that selects no training sample, so its rows defend nothing. A warning for
    the API; the command line turns it into an error (it is also a ``ValueError``)."""

COST_UNIT = ("one ERM fit of the same schedule, data and seed, timed after the base model; CPU time of "
             "this process for models on the CPU, wall time on an accelerator")


@dataclass(frozen=True)
class RunPlan:
    """What a run executes, checked and resolved from its configuration (``settings``: a
    :class:`~defenses.config.RunConfig` or a :class:`~defenses.config.PoisoningConfig`).

    ``splits(seed)`` and ``model_for(seed, splits)`` give each seed's data and fresh model,
    ``attack_for(seed, splits)`` its threat-model attack; ``first`` and ``first_model`` are those of
    the first seed (built while planning, to check budgets and the method). ``eps``, ``norm`` and
    ``steps`` are the resolved threat model; ``trainer`` trains the defended models (in the run's
    ``retrain`` mode), ``base_trainer`` the base model (from scratch). ``recipes`` are the chosen
    recipes (:class:`~defenses.recipes.Recipe`), ``references`` the reference trainers and ``suite_names``
    the evaluation suite (None for a poisoning run, which has its own); ``poison`` the checked backdoor
    threat model of a poisoning run (None otherwise).
    """

    settings: SharedConfig
    seeds: list
    fractions: list
    method_options: dict
    bounds: Any
    first: Splits
    splits_for: Callable
    model_for: Callable
    first_model: nn.Module
    data_label: str
    model_label: str
    attack_label: str
    attack_for: Callable
    eps: Optional[float]
    norm: Optional[str]
    steps: Optional[int]
    epochs: Any
    lr: Any
    batch_size: Any
    trainer_label: str
    trainer: Any
    base_trainer: Any
    recipes: list
    references: Optional[dict]
    suite_names: Optional[list]
    poison: Optional[PoisonSpec] = None

    def splits(self, seed: int) -> Splits:
        """The data splits of ``seed`` (the first seed's are reused)."""
        return self.first if seed == self.seeds[0] else self.splits_for(seed)

    def tasks(self) -> list:
        """``(recipe, fraction)`` pairs of one seed: the budget-free recipes once, then each fraction."""
        budgeted = [r for r in self.recipes if r.uses_budget]
        once = [r for r in self.recipes if not r.uses_budget]
        return [(r, None) for r in once] + [(r, f) for f in self.fractions for r in budgeted]

    def _shared_config(self, first_attack) -> dict:
        """The ``config`` entries of both kinds of run: data, model, attack and its settings (``first_attack``:
        the first seed's), bounds, trainer, seeds, schedule and split sizes."""
        return {"data": self.data_label, "model": self.model_label, "attack": self.attack_label,
                "attack_settings": _attack_settings(first_attack, named=isinstance(self.settings.attack, str)),
                "bounds": plain_value(self.first.bounds), "trainer": self.trainer_label, "seeds": self.seeds,
                "epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size,
                "n_train": int(self.first.train[0].shape[0]), "n_val": int(self.first.val[0].shape[0]),
                "n_test": int(self.first.test[0].shape[0])}

    def config(self) -> dict:
        """The report's ``config``: what the run executes (data, model, threat model and attack settings,
        bounds, method, budgets, mode, trainer, recipes, references, evaluation suite, seeds, schedule, sizes)."""
        s = self.settings
        first_attack = self.attack_for(self.seeds[0], self.first)
        return {
            **self._shared_config(first_attack), **_threat_model(first_attack), "method": s.method,
            "method_options": {k: repr(v) for k, v in self.method_options.items()},
            "fractions": self.fractions, "mode": s.mode, "scheme": s.scheme if s.mode == "reweight" else None,
            "temperature": s.temperature if s.mode == "reweight" and s.scheme == "smooth" else None,
            "retrain": s.retrain, "recipes": list(s.recipes), "references": list(self.references),
            "eval_attacks": [self.attack_label] + self.suite_names,
            "eval_subset": s.eval_subset if self.suite_names else None,
            "cost_unit": COST_UNIT,
        }

    def poison_config(self) -> dict:
        """The report's ``config`` of a poisoning run: the shared entries, the threat model, the trainer's
        settings, the recipes and the backdoor threat model (``poison``)."""
        return {**self._shared_config(self.attack_for(self.seeds[0], self.first)), "eps": self.eps, "norm": self.norm,
                "steps": self.steps, "trainer_settings": _trainer_settings(self.trainer),
                "train_steps": self.settings.train_steps, "recipes": [r.name for r in self.recipes],
                "poison": self.poison.as_dict()}

    def resume_settings(self, config: dict) -> dict:
        """What per-seed results depend on (see :func:`_resume_settings`)."""
        s = self.settings
        return _resume_settings(config, s.model, self.bounds, s.train_steps, s.eval_batch_size,
                                trainer=self.trainer, built_model=self.first_model)


def plan_run(config: SharedConfig) -> RunPlan:
    """Check every option of a :class:`~defenses.config.RunConfig` or :class:`~defenses.config.PoisoningConfig`
    (errors name it) and resolve them into a :class:`RunPlan`, before any training and without writing anything."""
    if not isinstance(config, (RunConfig, PoisoningConfig)):
        raise TypeError(f"config: expected a RunConfig or a PoisoningConfig, got {type(config).__name__}")
    s = config
    poisoning = isinstance(s, PoisoningConfig)
    check_bool(s.progress, "progress")
    check_bool(s.resume, "resume")
    check_bool(s.overwrite, "overwrite")
    if s.resume and s.out is None:
        raise ValueError("resume: needs out, the folder holding the per-seed results to reuse")
    if s.out is not None:
        check_output_folder(s.out, "out")
    seeds = _check_seeds(s.seeds)
    check_int(s.train_steps, "train_steps", minimum=1)
    check_int(s.eval_batch_size, "eval_batch_size", minimum=1)
    if poisoning:
        fractions, method_options, chosen = [], {}, _chosen_recipes(s.recipes, "poisoning")
    else:
        fractions = _check_fractions(s.fractions)
        check_choice(s.mode, "mode", MODES)
        check_choice(s.scheme, "scheme", REWEIGHT_SCHEMES)
        check_positive(s.temperature, "temperature")
        check_int(s.eval_subset, "eval_subset", minimum=1)
        chosen = _chosen_recipes(s.recipes, "evasion")
        if "influence" in s.recipes and s.method not in available_methods():
            raise ValueError(f"method: unknown method {s.method!r}; valid names are {', '.join(available_methods())}")
        method_options = dict(s.method_options or {})
    influence = any(r.name == "influence" for r in chosen) and not poisoning

    bounds = _auto_bounds(s.data, s.attack, s.bounds)
    splits_for, defaults, data_label = _resolve_data(s.data, (s.n_train, s.n_val, s.n_test), bounds)
    model_for, model_label = _resolve_model(s.model, defaults)
    first = splits_for(seeds[0])
    n_train = int(first.train[0].shape[0])
    for fraction in fractions:
        if check_budget(n_train, fraction, "fractions", "training samples") == 0 and any(r.uses_budget for r in chosen):
            warnings.warn(f"fractions: {fraction:g} of {n_train} training samples selects none of them (the budget "
                          f"is fraction * n rounded half up), so its rows defend nothing; use at least "
                          f"{0.5 / n_train:g}", EmptyBudgetWarning, stacklevel=3)
    poison = PoisonSpec.of(s.poison).checked(first.num_classes, n_train) if poisoning else None
    first_model = model_for(seeds[0], first)
    if influence:
        _check_method_fits(s.method, method_options, first_model)
    norm = defaults.norm if s.norm is None else check_choice(s.norm, "norm", ("linf", "l2"))
    eps = defaults.eps if s.eps is None else check_positive(s.eps, "eps")
    steps = defaults.steps if s.steps is None else check_int(s.steps, "steps", minimum=1)
    epochs = defaults.epochs if s.epochs is None else s.epochs
    lr = defaults.lr if s.lr is None else s.lr
    batch_size = defaults.batch_size if s.batch_size is None else s.batch_size
    attack_label, attack_for, eps, norm = _resolve_attack(s.attack, eps, norm, steps, first)
    trainer_label, trainer = _resolve_trainer(
        s.trainer, epochs, lr, batch_size, retrain="scratch" if poisoning else s.retrain,
        soft_weights=not poisoning and s.mode == "reweight" and s.scheme != "hard", train_steps=s.train_steps,
        eps=eps if eps is not None else defaults.eps, norm=norm or defaults.norm, bounds=first.bounds)
    references = suite_names = None
    if not poisoning:
        references = reference_trainers(trainer, s.references, eps=eps, norm=norm, bounds=first.bounds,
                                        train_steps=s.train_steps)
        suite_names = resolve_suite(s.eval_attacks, attack_label, eps=eps, bounds=first.bounds,
                                    num_classes=first.num_classes)
    return RunPlan(
        settings=s, seeds=seeds, fractions=fractions, method_options=method_options, bounds=bounds, first=first,
        splits_for=splits_for, model_for=model_for, first_model=first_model, data_label=data_label or first.name,
        model_label=model_label or type(first_model).__name__, attack_label=attack_label, attack_for=attack_for,
        eps=eps, norm=norm, steps=steps, epochs=epochs, lr=lr, batch_size=batch_size, trainer_label=trainer_label,
        trainer=trainer, base_trainer=trainer.with_retrain("scratch"), recipes=chosen, references=references,
        suite_names=suite_names, poison=poison)


def _chosen_recipes(recipes, pipeline: str) -> list:
    """The registered recipes of ``pipeline`` named by ``recipes`` (distinct; a poisoning run's None: all of them
    registered ``by_default``)."""
    if pipeline == "poisoning" and recipes is None:
        recipes = [name for name in available_recipes(pipeline) if get_recipe(name, pipeline).by_default]
    if isinstance(recipes, str) or not isinstance(recipes, (list, tuple)) or not recipes:
        raise ValueError(f"recipes: must be a non-empty list of recipe names, got {recipes!r}")
    chosen = [get_recipe(name, pipeline) for name in recipes]
    if len({r.name for r in chosen}) != len(chosen):
        raise ValueError(f"recipes: names must be distinct, got {list(recipes)}")
    return chosen


def _resolve_attack(attack, eps, norm, steps, first: Splits) -> tuple:
    """``(label, attack_for(seed, splits), eps, norm)``: a named attack is checked now and built per seed;
    an attack object is used as given, its own ``eps`` and ``norm`` (None without) the threat model."""
    if isinstance(attack, str):
        make_attack(attack, eps=eps, norm=norm, steps=steps, bounds=first.bounds)  # validate now, build per seed

        def attack_for(seed, splits):
            return make_attack(attack, eps=eps, norm=norm, steps=steps, bounds=splits.bounds, seed=seed)

        return attack, attack_for, eps, norm
    if callable(attack):
        return _label(attack), (lambda seed, splits: attack), getattr(attack, "eps", None), getattr(attack, "norm", None)
    raise TypeError(f"attack: expected a name or a callable attack(model, x, y), got {type(attack).__name__}")


def _resolve_trainer(trainer, epochs, lr, batch_size, *, retrain: str, soft_weights: bool, train_steps: int, eps,
                     norm, bounds) -> tuple:
    """``(label, trainer)`` in the run's ``retrain`` mode: a name is built with the schedule and threat model; a
    trainer object needs ``fit``, ``with_retrain`` and ``training_attack``. ART's trainers take no soft weights
    (``soft_weights``: the run would give them)."""
    if isinstance(trainer, str):
        label = trainer
        trainer = make_trainer(trainer, epochs=epochs, lr=lr, batch_size=batch_size, retrain=retrain, eps=eps,
                               norm=norm, bounds=bounds, train_steps=train_steps, progress=False)
    elif all(callable(getattr(trainer, name, None)) for name in ("fit", "with_retrain", "training_attack")):
        label = repr(trainer)
        trainer = trainer.with_retrain(retrain)
    else:
        raise TypeError(f"trainer: expected a name or a trainer with fit(), with_retrain() and training_attack(), "
                        f"got {type(trainer).__name__}")
    if isinstance(trainer, ARTTrainer) and soft_weights:
        raise ValueError("mode: ART's trainers take no per-sample weights; use --mode prune or --scheme hard "
                         "with an art-* trainer")
    return label, trainer


def seeded_split(data, seed: int, val_fraction: float = 0.15, test_fraction: float = 0.2,
                 bounds=None) -> Splits:
    """Split one data set ``(X, y[, s])`` into train / validation / test with a seeded permutation."""
    tensors = as_data(data, "data")
    n = tensors[0].shape[0]
    n_val, n_test = round(val_fraction * n), round(test_fraction * n)
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1) or min(n_val, n_test, n - n_val - n_test) < 1:
        raise ValueError(f"data: cannot split {n} samples into train / validation ({val_fraction}) / test "
                         f"({test_fraction}) with at least one sample each")
    order = torch.randperm(n, generator=make_generator(seed))
    parts = (order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test])
    train, val, test = (tuple(t[idx] for t in tensors) for idx in parts)
    return _user_splits(train, val, test, bounds)


def _is_arrays(data) -> bool:
    """Whether ``data`` is one data set ``(X, y[, s])`` of tensors or numpy arrays (not ``(train, val, test)``)."""
    return isinstance(data, (tuple, list)) and bool(data) and all(isinstance(t, (torch.Tensor, np.ndarray))
                                                                  for t in data)


def _user_splits(train, val, test, bounds) -> Splits:
    """Splits of the user's data; floating ``X`` of another dtype (numpy's float64) in torch's default dtype
    (float32), the dtype of the models the factories build (:mod:`attacks.inputs`)."""
    dtype = torch.get_default_dtype()
    train, val, test = ((X.to(dtype), *rest) for X, *rest in (as_data(part, name) for part, name in
                                                             ((train, "train"), (val, "val"), (test, "test"))))
    classes = int(max(int(train[1].max()), int(val[1].max()))) + 1
    return Splits("user", train, val, test, tuple(train[0].shape[1:]), max(classes, 2), bounds)


def _label(obj) -> str:
    if isinstance(obj, str):
        return obj
    return getattr(obj, "__name__", type(obj).__name__)


LATER_TRAINER_DEFAULTS = {"lr_schedule": "constant"}
"""Trainer parameters added after per-seed results were first saved, with the default that reproduces the earlier
behaviour: left out of the resume settings at that default, so that those results stay resumable."""


def _trainer_settings(trainer) -> dict:
    """Every parameter of ``trainer`` that changes a number, except those the config holds already and those of
    :data:`LATER_TRAINER_DEFAULTS` at their default."""
    covered = ("progress", "epochs", "lr", "batch_size", "retrain")  # in the config (or the trainer's repr)
    return {k: v for k, v in attack_settings(trainer).items()
            if k not in covered and not (k in LATER_TRAINER_DEFAULTS and v == LATER_TRAINER_DEFAULTS[k])}


def _resume_settings(config: dict, model, bounds, train_steps: int, eval_batch_size: int, *, trainer,
                     built_model: nn.Module) -> dict:
    """What per-seed results depend on besides the seed and its data: the config without the seed list
    (it holds the attack's settings and the bounds), the bounds argument, the adversarial trainers'
    steps, the evaluation batch size, every trainer parameter, and a given module's weights (a
    factory's model: its architecture)."""
    settings = {k: v for k, v in config.items() if k != "seeds"}
    architecture = hashlib.sha256(repr(built_model).encode()).hexdigest()[:16]
    settings.update(bounds_argument=repr(bounds), train_steps=train_steps, eval_batch_size=eval_batch_size,
                    trainer_settings=_trainer_settings(trainer),
                    model_hash=model_hash(model) if isinstance(model, nn.Module) else f"architecture {architecture}")
    return settings


def _check_method_fits(method: str, method_options: dict, model: nn.Module) -> None:
    """Before any training: the influence method can score the models this run trains (tracin needs
    their checkpoints, which do not exist yet; if-exact at most its parameter limit; ``params`` and
    ``damping`` are valid; ``ensemble``, the influence recipes' number of half models, is an integer >= 1)."""
    if "damping" in method_options:
        check_number(method_options["damping"], "damping", minimum=0)
    if ENSEMBLE_OPTION in method_options:
        check_int(method_options[ENSEMBLE_OPTION], f"method_options: {ENSEMBLE_OPTION}", minimum=1)
    if method == "tracin":
        raise ValueError("method: 'tracin' needs checkpoints of the model it scores, and defenses.run trains a new "
                         "model per seed; score a model you trained with robust_infl.influence(method='tracin')")
    if method == "if-exact":
        check_exact_size(model, method_options.get("params"))
    else:
        resolve_param_names(model, method_options.get("params"))


def _auto_bounds(data, attack, bounds):
    """``bounds="auto"`` resolved where the data alone does not decide: the bounds of an attack object
    that declares them; for a named attack on your own ``(X, y)`` tensors, the attacks' default (0, 1)
    when every value of X lies in it, else None. Otherwise ``bounds`` as given (a named data set
    keeps its own bounds under ``"auto"``)."""
    if not isinstance(bounds, str):
        return bounds
    if not isinstance(attack, str) and hasattr(attack, "bounds"):
        return attack.bounds
    if _is_arrays(data):
        X = as_data(data, "data")[0]
        inside = X.is_floating_point() and X.numel() > 0 and bool(((X >= 0) & (X <= 1)).all())
        return (0.0, 1.0) if inside else None
    return bounds


def _threat_model(attack) -> dict:
    """``eps``, ``norm`` and ``steps`` of ``attack``: each None when the attack has no such parameter."""
    return {key: plain_value(getattr(attack, key, None)) for key in ("eps", "norm", "steps")}


def _attack_settings(attack, *, named: bool) -> dict:
    """The attack's class and parameters (:func:`attacks.attack_settings`); a named attack is built per
    seed, so its ``seed`` is recorded as the run's seed."""
    settings = attack_settings(attack)
    if named and "seed" in settings:
        settings["seed"] = "the run's seed"
    return settings


def _check_fractions(fractions) -> list:
    if isinstance(fractions, (int, float)) and not isinstance(fractions, bool):
        fractions = [fractions]
    if not isinstance(fractions, (list, tuple)) or not fractions:
        raise ValueError(f"fractions: must be a non-empty list of numbers in (0, 1), got {fractions!r}")
    out = []
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
            raise ValueError(f"fractions: every fraction must be in (0, 1), got {f!r}")
        if float(f) in out:
            raise ValueError(f"fractions: {f} is given twice")
        out.append(float(f))
    return sorted(out)


def _check_seeds(seeds) -> list:
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        return list(range(check_int(seeds, "seeds", minimum=1)))
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise ValueError(f"seeds: must be a count >= 1 or a non-empty list of seeds, got {seeds!r}")
    for s in seeds:
        check_seed(s, "seeds")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds: must be distinct, got {list(seeds)}")
    return list(seeds)


def _resolve_data(data, n_sizes: tuple, bounds) -> tuple:
    """``(splits_for(seed) -> Splits, defaults, label)`` for a name, Splits, (train, val, test), (X, y) or callable
    (label None: the name of the splits it returns)."""
    def with_bounds(splits: Splits) -> Splits:
        if isinstance(bounds, str):
            return splits
        return Splits(splits.name, splits.train, splits.val, splits.test, splits.input_shape, splits.num_classes,
                      bounds)

    def to_splits(value) -> Splits:
        if isinstance(value, Splits):
            return with_bounds(value)
        if isinstance(value, (tuple, list)) and len(value) == 3 and all(isinstance(p, (tuple, list)) for p in value):
            return _user_splits(*value, None if isinstance(bounds, str) else bounds)
        raise TypeError("data: expected a data set name, Splits, (train, val, test), (X, y[, s]) or a callable "
                        f"seed -> Splits, got {type(value).__name__}")

    if isinstance(data, str):
        defaults = data_defaults(data)
        return (lambda seed: with_bounds(load_splits(data, seed, *n_sizes))), defaults, data
    if _is_arrays(data):
        user_bounds = None if isinstance(bounds, str) else bounds
        return (lambda seed: seeded_split(data, seed, bounds=user_bounds)), USER_DATA_DEFAULTS, "user"
    if callable(data) and not isinstance(data, (Splits, tuple, list)):
        return (lambda seed: to_splits(data(seed))), USER_DATA_DEFAULTS, None
    fixed = to_splits(data)
    return (lambda seed: fixed), DATA_DEFAULTS.get(fixed.name, USER_DATA_DEFAULTS), fixed.name


def _resolve_model(model, defaults) -> tuple:
    """``(model_for(seed, splits) -> nn.Module, label)`` (label None: the class of the model a factory builds)."""
    if model is None:
        if not defaults.model:
            raise ValueError("model: required when the data is not a named data set")
        model = defaults.model
    if isinstance(model, str):
        return (lambda seed, splits: model_factory(model, splits)(seed)), model
    if isinstance(model, nn.Module):
        return (lambda seed, splits: copy.deepcopy(model)), type(model).__name__
    if callable(model):
        def build(seed, splits):
            built = model(seed)
            if not isinstance(built, nn.Module):
                raise TypeError(f"model: the factory must return an nn.Module, got {type(built).__name__}")
            return built
        return build, None
    raise TypeError(f"model: expected a name, an nn.Module or a factory seed -> nn.Module, got {type(model).__name__}")
