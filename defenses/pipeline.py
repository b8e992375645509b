"""The closed loop: split, train, attack, score on validation, prune / reweight, retrain, re-attack, report.

For every seed: seeded train / validation / test split; train the base model; clean and robust
accuracy on test (keeping the base model's adversarial test points); then every recipe (see
:mod:`defenses.recipes`) -- the influence-guided defence and its baselines at the same budget --
builds a defended model from a :class:`~defenses.recipes.DefenceContext`, which holds the train
and validation splits only; each defended model is evaluated on test, adaptive (attack re-run on
it) and transfer (the base model's adversarial points). The test split is read in exactly one
place, :func:`evaluate_on_test`.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from attacks.base import attack_settings, plain_value
from attacks.plumbing import model_device
from attacks.validation import check_bool, check_choice, check_int, check_number, check_positive
from robust_infl.datasets import Splits
from robust_infl.experiment_setup import (DATA_DEFAULTS, USER_DATA_DEFAULTS, data_defaults, load_splits,
                                          make_attack, make_trainer, model_factory)
from robust_infl.io import check_output_folder
from robust_infl.store import data_hash, model_hash

from .art_trainer import ARTTrainer
from .data import as_tensors
from .eval_suite import build_suite, evaluate_suite, resolve_suite
from .recipes import DEFAULT_RECIPES, DefenceContext, get_recipe
from .references import erm_like, reference_trainers
from .report import recommend, summarise, summarise_base, write_report
from .seed_results import SeedResults, prepare_out_folder
from .selection import REWEIGHT_SCHEMES, check_budget
from .trainers import ERM, PGDAT

__all__ = ["run", "evaluate_on_test", "seeded_split", "MODES"]

MODES = ("prune", "reweight")


def seeded_split(data, seed: int, val_fraction: float = 0.15, test_fraction: float = 0.2,
                 bounds=None) -> Splits:
    """Split one data set ``(X, y[, s])`` into train / validation / test with a seeded permutation."""
    tensors = as_tensors(data, "data")
    n = tensors[0].shape[0]
    n_val, n_test = round(val_fraction * n), round(test_fraction * n)
    if not (0 < val_fraction < 1 and 0 < test_fraction < 1) or min(n_val, n_test, n - n_val - n_test) < 1:
        raise ValueError(f"data: cannot split {n} samples into train / validation ({val_fraction}) / test "
                         f"({test_fraction}) with at least one sample each")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    parts = (order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test])
    train, val, test = (tuple(t[idx] for t in tensors) for idx in parts)
    return _user_splits(train, val, test, bounds)


def _user_splits(train, val, test, bounds) -> Splits:
    train, val = as_tensors(train, "train"), as_tensors(val, "val")
    classes = int(max(int(train[1].max()), int(val[1].max()))) + 1
    return Splits("user", train, val, tuple(test), tuple(train[0].shape[1:]), max(classes, 2), bounds)


def _label(obj) -> str:
    if isinstance(obj, str):
        return obj
    return getattr(obj, "__name__", type(obj).__name__)


def evaluate_on_test(model: nn.Module, test, attack: Callable, base_adversarial: Optional[torch.Tensor] = None, *,
                     suite: Optional[dict] = None, threat: str = "attack", eval_subset: int = 200,
                     batch_size: int = 256, progress: bool = True) -> tuple:
    """Clean accuracy, adaptive and transfer robust accuracy, attack success and the suite's worst case of
    ``model`` on ``test``; the only reader of the test split.

    Returns ``(metrics, x_adv)`` where ``x_adv`` are this model's adversarial test points (``attack``,
    named ``threat``) and the metrics are ``clean_acc``, ``robust_acc_adaptive`` (accuracy on
    ``x_adv``), ``robust_acc_transfer`` (on ``base_adversarial``; on ``x_adv`` when None),
    ``asr_adaptive`` (the share of clean-correct test points the attack flips), ``attacks`` (per
    attack of ``suite`` plus the threat, on the first ``eval_subset`` test points; the whole split
    without a suite) and ``worst_case`` (the share correct under every one of them), with the old
    names ``robust_acc`` and ``transfer_acc`` as aliases.
    """
    import attacks

    X, y = as_tensors(test, "test")[:2]
    results, adversarial = attacks.evaluate(model, (X, y), {threat: attack}, batch_size=batch_size,
                                            progress=progress, return_adv=True)
    x_adv = adversarial[threat]
    transfer = attacks.accuracy(model, base_adversarial if base_adversarial is not None else x_adv, y)
    adaptive = results[threat]["robust_acc"]
    if suite:
        per_attack = evaluate_suite(model, X, y, threat, attack, suite, eval_subset, batch_size=batch_size,
                                    progress=progress)
    else:
        per_attack = {"attacks": {threat: dict(results[threat])}, "worst_case": adaptive, "eval_subset": len(X)}
    metrics = {"clean_acc": results["clean_acc"], "robust_acc_adaptive": adaptive, "robust_acc_transfer": transfer,
               "asr_adaptive": results[threat]["asr"], "worst_case": per_attack["worst_case"],
               "attacks": per_attack["attacks"], "robust_acc": adaptive, "transfer_acc": transfer}
    return metrics, x_adv


def _timed(fn: Callable, *args, **kwargs) -> tuple:
    """``(fn(*args, **kwargs), {"wall": seconds, "cpu": seconds})``: wall time and this process's CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn(*args, **kwargs)
    return value, {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def cost_clock(model: nn.Module) -> str:
    """The clock ``cost_vs_erm`` is read from: ``"cpu"`` (this process's CPU time, which other jobs on a shared
    machine do not inflate) for a model on the CPU, ``"wall"`` on an accelerator (whose work CPU time misses)."""
    return "cpu" if model_device(model).type == "cpu" else "wall"


def _training_attack(trainer, seed: int) -> Optional[Callable]:
    """The attack behind an adversarial trainer's training loss (None for clean or TRADES losses)."""
    import attacks

    if isinstance(trainer, PGDAT):
        if trainer.attack is not None:
            return trainer.attack
        return attacks.PGD(trainer.eps, alpha=trainer.alpha, steps=trainer.steps, norm=trainer.norm,
                           bounds=trainer.bounds, seed=seed)
    if isinstance(trainer, ARTTrainer) and trainer.name == "madry-pgd":
        return attacks.PGD(trainer.eps, alpha=trainer.eps_step, steps=trainer.max_iter, norm=trainer.norm,
                           bounds=trainer.bounds, seed=seed)
    return None


def _trainer_settings(trainer) -> dict:
    """Every parameter of ``trainer`` that changes a number, except those the config holds already."""
    covered = ("progress", "epochs", "lr", "batch_size", "retrain")  # in the config (or the trainer's repr)
    return {k: v for k, v in attack_settings(trainer).items() if k not in covered}


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
    ``damping`` are valid)."""
    from robust_infl.methods.hessian import check_exact_size
    from robust_infl.inputs import resolve_param_names

    if "damping" in method_options:
        check_number(method_options["damping"], "damping", minimum=0)
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
    if isinstance(data, (tuple, list)) and data and all(torch.is_tensor(t) for t in data):
        X = data[0]
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


def _run_seed(seed: int, splits: Splits, tasks: list, bar, *, model_for: Callable, attack_fn: Callable,
              base_trainer, context: dict, references: dict, cost_unit, evaluation: dict) -> dict:
    """Train the base model of ``seed``, evaluate it, then run every ``(recipe, fraction)`` task and every
    reference trainer; every row records its wall time (``train_time``), its CPU time (``train_cpu_time``) and
    its ratio to ``cost_unit``'s fit (an ERM fit of the same schedule, timed right after the base model; NaN
    without one) on the clock of :func:`cost_clock`.

    Returns ``{"base": row, "runs": [row, ...]}``; ``context`` holds the :class:`DefenceContext`
    fields shared by the tasks, ``evaluation`` the options of :func:`evaluate_on_test`.
    """
    train, val = as_tensors(splits.train, "train"), as_tensors(splits.val, "val")
    _check_two_classes(train, seed)
    bar.set_postfix_str(f"seed {seed}: base model")
    base, base_time = _timed(base_trainer.fit, model_for(seed, splits), train, seed=seed, val=val)
    clock = cost_clock(base)
    nan = {"wall": math.nan, "cpu": math.nan}
    erm_time = nan if cost_unit is None else _timed(cost_unit.fit, model_for(seed, splits), train, seed=seed)[1]
    if isinstance(base_trainer, ERM):  # the same fit twice: the faster one is the cost unit (no warm-up in it)
        base_time = erm_time = {k: min(base_time[k], erm_time[k]) for k in base_time}
    base_metrics, base_adversarial = evaluate_on_test(base, splits.test, attack_fn, **evaluation)
    bar.update()

    def row(name, fraction, metrics, seconds):
        return {"seed": seed, "recipe": name, "fraction": fraction, **metrics, "train_time": seconds["wall"],
                "train_cpu_time": seconds["cpu"], "cost_vs_erm": seconds[clock] / erm_time[clock]}

    cache: dict = {}
    runs = []
    for recipe, fraction in tasks:
        bar.set_postfix_str(f"seed {seed}: {recipe.name}" + ("" if fraction is None else f" @ {fraction:g}"))
        cache["reused_seconds"] = {"wall": 0.0, "cpu": 0.0}
        defended, seconds = _timed(recipe.fn, DefenceContext(model=base, train=train, val=val, attack=attack_fn,
                                                             seed=seed, fraction=fraction, cache=cache, **context))
        if defended is base:
            metrics, seconds = dict(base_metrics), base_time
        else:
            metrics, _ = evaluate_on_test(defended, splits.test, attack_fn, base_adversarial, **evaluation)
            # scores computed for an earlier task count here too
            seconds = {k: seconds[k] + cache["reused_seconds"][k] for k in seconds}
        runs.append(row(recipe.name, fraction, metrics, seconds))
        bar.update()
    for name, trainer in references.items():
        bar.set_postfix_str(f"seed {seed}: reference {name}")
        reference, seconds = _timed(trainer.fit, model_for(seed, splits), train, seed=seed, val=val)
        metrics, _ = evaluate_on_test(reference, splits.test, attack_fn, base_adversarial, **evaluation)
        runs.append({**row(name, None, metrics, seconds), "reference": True})
        bar.update()
    base_row = row(None, None, base_metrics, base_time)
    del base_row["recipe"], base_row["fraction"]
    return {"base": base_row, "runs": runs}


def _check_two_classes(train: tuple, seed: int) -> None:
    """Refuse a training split whose labels are all one class (nothing to defend, a degenerate model)."""
    classes = torch.unique(train[1])
    if classes.numel() < 2:
        raise ValueError(f"data: the training split of seed {seed} holds a single class "
                         f"({classes.tolist()}); a classifier and its defence need at least two")


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
        check_int(s, "seeds", minimum=0)
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
    if isinstance(data, (tuple, list)) and data and all(torch.is_tensor(t) for t in data):
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


def run(
    data: Union[str, Splits, Sequence, Callable] = "mnist",
    model: Union[str, nn.Module, Callable, None] = None,
    attack: Union[str, Callable] = "pgd",
    *,
    eps: Optional[float] = None,
    norm: Optional[str] = None,
    steps: Optional[int] = None,
    bounds="auto",
    method: str = "ip",
    method_options: Optional[dict] = None,
    fractions: Sequence[float] = (0.05,),
    mode: str = "prune",
    scheme: str = "smooth",
    temperature: float = 1.0,
    retrain: str = "scratch",
    trainer="erm",
    recipes: Sequence[str] = DEFAULT_RECIPES,
    references: Union[str, Sequence[str], None] = "auto",
    eval_attacks: Union[str, Sequence[str], None] = "auto",
    eval_subset: int = 200,
    seeds: Union[int, Sequence[int]] = 3,
    epochs: Optional[int] = None,
    lr: Optional[float] = None,
    batch_size: Optional[int] = None,
    train_steps: int = 5,
    n_train: Optional[int] = None,
    n_val: Optional[int] = None,
    n_test: Optional[int] = None,
    eval_batch_size: int = 256,
    out=None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    poison=None,
) -> dict:
    """Run the defence and its baselines over several seeds and return (and optionally write) the report.

    Args:
        data: a data set name (``mnist``, ``digits``, ``adult``, ``moons``, ``mnist-full``; split per
            seed), a ``robust_infl.datasets.Splits``, ``(train, val, test)`` splits, one ``(X, y[, s])``
            data set (split per seed: 65% / 15% / 20%), or a callable ``seed -> Splits``.
        model: a reference model name (``cnn``, ``mlp``, ``logreg``; default per data set), your own
            ``nn.Module`` (copied, then trained from scratch: every submodule needs
            ``reset_parameters``) or a factory ``seed -> nn.Module``.
        attack: ``fgsm``, ``pgd``, ``linear``, ``autoattack`` (built per seed from ``eps``, ``norm``,
            ``steps``, ``bounds``), or your own callable ``attack(model, x, y) -> x_adv``.
        eps, norm, steps: the threat model (defaults per data set: images linf 0.1, tabular l2 0.5; 10 steps).
        bounds: input range for named attacks and adversarial trainers; ``"auto"``: the ``bounds`` of
            an attack object that declares them, else the data set's (images (0, 1), tabular None),
            and for your own ``(X, y)`` tensors (0, 1) when every value of X lies in it, else None.
            The report shows them (``config["bounds"]``).
        method, method_options: influence method (``robust_infl.available_methods()``) and its options.
        fractions: budgets (share of the training set pruned / down-weighted); several give a plot.
        mode: ``"prune"`` (train on the kept samples) or ``"reweight"`` (``scheme``: ``"smooth"`` with
            ``temperature`` or ``"hard"``; see :func:`defenses.reweight`).
        retrain: ``"scratch"`` or ``"finetune"`` (from the base model) for the defended models.
        trainer: ``erm``, ``fast-at``, ``pgd-at``, ``trades``, ``art-pgd-at``, ``art-trades``, or a trainer object
            (``Trainer`` / ``ARTTrainer``); the base model is trained by it from scratch.
        recipes: names from ``defenses.available_recipes()``; ``none`` and ``random`` give the paired
            differences. Removal (prune mode) gives the removed samples weight 0, so every recipe
            trains for as many steps as ``none`` (ART's trainers, which take no weights, drop them).
        references: adversarial-training reference rows (:mod:`defenses.references`): ``"auto"`` runs
            ``fast-at``, ``pgd-at`` and ``trades`` with plain training (same data, schedule and seed;
            an adversarial ``trainer`` is its own reference, its ``none`` row); a list picks some, ``()`` none.
        eval_attacks: the evaluation suite besides the threat-model attack (:mod:`defenses.eval_suite`):
            ``"auto"`` adds APGD-CE and targeted APGD-DLR where the data allows (images in [0, 1]);
            a list of attack names; ``()`` none. ``eval_subset``: the suite runs on the first that many
            test points of each seed and gives per-attack results and ``worst_case``.
        seeds: a count N (seeds 0..N-1) or a list of seeds.
        epochs, lr, batch_size: training hyper-parameters (defaults per data set);
            ``train_steps``: PGD steps of adversarial trainers.
        n_train, n_val, n_test: split sizes of named data sets (defaults per data set).
        eval_batch_size: samples per attack call at evaluation.
        out: folder for ``report.json``, ``report.md`` and ``robust_vs_fraction.png`` (None: write nothing);
            each seed's results are also saved there as it completes (``seeds/seed_<k>.json``), and
            every file is written atomically.
        resume: reuse the per-seed results already in ``out`` (a run that crashed or was stopped, or
            more seeds added to a finished run); a seed file written with other settings (attack and
            its parameters, bounds, trainer, schedule, data, model; see :mod:`defenses.seed_results`)
            is refused with a ``ValueError``.
        overwrite: replace an earlier run in ``out``; without it (or ``resume``) a folder holding one
            is refused before any compute, and left untouched.
        progress: show one progress bar (on a terminal only) over the seeds and recipes.
        poison: a backdoor threat model (``defenses.poisoning.PoisonSpec``, a dict of its fields, or
            ``"badnets"`` / ``"clean-label"``): the training split of every seed is poisoned, and the
            poisoning recipes (``defenses.poisoning.POISON_RECIPES``; all by default) are run and
            reported instead (clean accuracy, ``asr_backdoor``, detection precision / recall / AUROC at
            the budget, evasion robust accuracy; see :func:`defenses.poisoning.run_poisoned`).
            ``method``, ``fractions``, ``mode`` and ``retrain`` do not apply.

    Returns:
        The report: ``config``, ``base`` (metrics of the base model), ``per_seed`` rows, ``summary``
        (mean ± std over seeds, paired differences vs ``none`` and vs ``random``) and ``recommendation``
        (the row to pick, see :func:`defenses.report.recommend`). Every row holds ``clean_acc``,
        ``robust_acc_adaptive``, ``robust_acc_transfer``, ``asr_adaptive``, ``attacks`` (per attack of
        the suite), ``worst_case``, ``train_time`` (wall seconds to build the model: scoring, selection
        and training), ``train_cpu_time`` (this process's CPU seconds for it) and ``cost_vs_erm`` (its
        ratio to one ERM fit of the same schedule: CPU time on the CPU, which other jobs on a shared
        machine do not inflate; wall time on an accelerator);
        ``robust_acc`` and ``transfer_acc`` are aliases of the adaptive and transfer accuracies.
    """
    check_bool(progress, "progress")
    check_bool(resume, "resume")
    check_bool(overwrite, "overwrite")
    if resume and out is None:
        raise ValueError("resume: needs out, the folder holding the per-seed results to reuse")
    if out is not None:
        check_output_folder(out, "out")
    fractions = _check_fractions(fractions)
    seeds = _check_seeds(seeds)
    check_choice(mode, "mode", MODES)
    check_choice(scheme, "scheme", REWEIGHT_SCHEMES)
    check_positive(temperature, "temperature")
    check_int(train_steps, "train_steps", minimum=1)
    check_int(eval_batch_size, "eval_batch_size", minimum=1)
    check_int(eval_subset, "eval_subset", minimum=1)
    if isinstance(recipes, str) or not recipes:
        raise ValueError(f"recipes: must be a non-empty list of recipe names, got {recipes!r}")
    chosen = [get_recipe(name) for name in recipes] if poison is None else []
    if len({r.name for r in chosen}) != len(chosen):
        raise ValueError(f"recipes: names must be distinct, got {list(recipes)}")
    if "influence" in recipes:
        import robust_infl

        if method not in robust_infl.available_methods():
            raise ValueError(f"method: unknown method {method!r}; valid names are "
                             f"{', '.join(robust_infl.available_methods())}")
    method_options = dict(method_options or {})

    bounds = _auto_bounds(data, attack, bounds)
    splits_for, defaults, data_label = _resolve_data(data, (n_train, n_val, n_test), bounds)
    model_for, model_label = _resolve_model(model, defaults)
    first = splits_for(seeds[0])
    for fraction in fractions:
        check_budget(int(first.train[0].shape[0]), fraction, "fractions", "training samples")
    first_model = model_for(seeds[0], first)
    if "influence" in recipes:
        _check_method_fits(method, method_options, first_model)
    data_label = data_label or first.name
    model_label = model_label or type(first_model).__name__
    norm = defaults.norm if norm is None else check_choice(norm, "norm", ("linf", "l2"))
    eps = defaults.eps if eps is None else check_positive(eps, "eps")
    steps = defaults.steps if steps is None else check_int(steps, "steps", minimum=1)
    epochs = defaults.epochs if epochs is None else epochs
    lr = defaults.lr if lr is None else lr
    batch_size = defaults.batch_size if batch_size is None else batch_size

    if isinstance(attack, str):
        attack_label = attack
        make_attack(attack, eps=eps, norm=norm, steps=steps, bounds=first.bounds)  # validate now, build per seed

        def attack_for(seed, splits):
            return make_attack(attack_label, eps=eps, norm=norm, steps=steps, bounds=splits.bounds, seed=seed)
    elif callable(attack):
        attack_label = _label(attack)
        eps, norm = getattr(attack, "eps", None), getattr(attack, "norm", None)

        def attack_for(seed, splits):
            return attack
    else:
        raise TypeError(f"attack: expected a name or a callable attack(model, x, y), got {type(attack).__name__}")

    if isinstance(trainer, str):
        trainer_label = trainer
        trainer = make_trainer(trainer, epochs=epochs, lr=lr, batch_size=batch_size, retrain=retrain,
                               eps=eps if eps is not None else defaults.eps, norm=norm or defaults.norm,
                               bounds=first.bounds, train_steps=train_steps, progress=False)
    elif callable(getattr(trainer, "fit", None)) and callable(getattr(trainer, "with_retrain", None)):
        trainer_label = repr(trainer)
        trainer = trainer.with_retrain(retrain)
    else:
        raise TypeError(f"trainer: expected a name or a trainer with fit() and with_retrain(), "
                        f"got {type(trainer).__name__}")
    if isinstance(trainer, ARTTrainer) and mode == "reweight" and scheme != "hard":
        raise ValueError("mode: ART's trainers take no per-sample weights; use --mode prune or --scheme hard "
                         "with an art-* trainer")
    base_trainer = trainer.with_retrain("scratch")
    if poison is not None:
        from .poisoning import run_poisoned

        if out is not None:
            prepare_out_folder(out, resume=resume, overwrite=overwrite)
        return run_poisoned(
            poison, seeds=seeds, splits_for=lambda seed: first if seed == seeds[0] else splits_for(seed),
            model_for=model_for, attack_for=attack_for, trainer=base_trainer,
            config={"data": data_label, "model": model_label, "attack": attack_label, "eps": eps, "norm": norm,
                    "steps": steps, "attack_settings": _attack_settings(attack_for(seeds[0], first),
                                                                       named=isinstance(attack, str)),
                    "bounds": plain_value(first.bounds), "trainer": trainer_label,
                    "trainer_settings": _trainer_settings(trainer), "seeds": seeds, "epochs": epochs, "lr": lr,
                    "batch_size": batch_size, "train_steps": train_steps, "n_train": int(first.train[0].shape[0]),
                    "n_val": int(first.val[0].shape[0]), "n_test": int(first.test[0].shape[0])},
            recipes=None if tuple(recipes) == tuple(DEFAULT_RECIPES) else list(recipes),
            eval_batch_size=eval_batch_size, out=out, resume=resume, progress=progress)
    references = reference_trainers(trainer, references, eps=eps, norm=norm, bounds=first.bounds,
                                    train_steps=train_steps)
    suite_names = resolve_suite(eval_attacks, attack_label, eps=eps, bounds=first.bounds,
                                num_classes=first.num_classes)

    first_attack = attack_for(seeds[0], first)
    config = {
        "data": data_label, "model": model_label, "attack": attack_label,
        **_threat_model(first_attack),
        "attack_settings": _attack_settings(first_attack, named=isinstance(attack, str)),
        "bounds": plain_value(first.bounds), "method": method,
        "method_options": {k: repr(v) for k, v in method_options.items()},
        "fractions": fractions, "mode": mode, "scheme": scheme if mode == "reweight" else None,
        "temperature": temperature if mode == "reweight" and scheme == "smooth" else None,
        "retrain": retrain, "trainer": trainer_label, "recipes": list(recipes), "references": list(references),
        "eval_attacks": [attack_label] + suite_names, "eval_subset": eval_subset if suite_names else None,
        "cost_unit": "one ERM fit of the same schedule, data and seed, timed after the base model; CPU time of "
                     "this process for models on the CPU, wall time on an accelerator",
        "seeds": seeds,
        "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "n_train": int(first.train[0].shape[0]), "n_val": int(first.val[0].shape[0]),
        "n_test": int(first.test[0].shape[0]),
    }

    budgeted = [r for r in chosen if r.uses_budget]
    once = [r for r in chosen if not r.uses_budget]
    tasks = [(r, None) for r in once] + [(r, f) for f in fractions for r in budgeted]
    saved = None
    if out is not None:
        prepare_out_folder(out, resume=resume, overwrite=overwrite)
        saved = SeedResults(out, _resume_settings(config, model, bounds, train_steps, eval_batch_size,
                                                  trainer=trainer, built_model=first_model))
    base_rows, rows = [], []
    evaluation = dict(threat=attack_label, eval_subset=eval_subset, batch_size=eval_batch_size, progress=False)
    per_seed = 1 + len(tasks) + len(references)
    with tqdm(total=len(seeds) * per_seed, desc="defence", disable=None if progress else True) as bar:
        for seed in seeds:
            splits = first if seed == seeds[0] else splits_for(seed)
            fingerprint = None if saved is None else data_hash(splits.train, splits.val, splits.test)
            results = saved.load(seed, fingerprint) if resume else None
            if results is None:
                bar.set_postfix_str(f"seed {seed}")
                seed_attack = attack_for(seed, splits)
                evaluation["suite"] = build_suite(suite_names, eps=eps, norm=norm, steps=steps, bounds=splits.bounds,
                                                  seed=seed)
                results = _run_seed(seed, splits, tasks, bar, model_for=model_for, attack_fn=seed_attack,
                                    base_trainer=base_trainer, references=references, cost_unit=erm_like(trainer),
                                    evaluation=evaluation,
                                    context=dict(trainer=trainer, mode=mode, scheme=scheme, temperature=temperature,
                                                 method=method, method_options=method_options,
                                                 train_attack=_training_attack(trainer, seed), progress=False))
                if saved is not None:
                    saved.save(seed, fingerprint, results)
            else:
                bar.update(per_seed)
            base_rows.append(results["base"])
            rows += results["runs"]

    report = {
        "config": config,
        "base": summarise_base(base_rows),
        "per_seed": {"base": base_rows, "runs": rows},
        "summary": summarise(rows, [r.name for r in chosen] + list(references), fractions),
    }
    report["recommendation"] = recommend(report["summary"])
    if out is not None:
        write_report(report, out)
    return report
