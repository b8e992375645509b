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
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from robust_infl.datasets import Splits
from robust_infl.experiment_setup import (DATA_DEFAULTS, USER_DATA_DEFAULTS, data_defaults, load_splits,
                                          make_attack, make_trainer, model_factory)
from robust_infl.store import data_hash, model_hash

from .art_trainer import ARTTrainer
from .data import as_tensors
from .recipes import DEFAULT_RECIPES, DefenceContext, get_recipe
from .report import METRICS, mean_std, summarise, write_report
from .seed_results import SeedResults
from .selection import REWEIGHT_SCHEMES
from .trainers import PGDAT
from .validation import check_bool, check_choice, check_int, check_positive

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
                     batch_size: int = 256, progress: bool = True) -> tuple:
    """Clean, adaptive robust and transfer accuracy of ``model`` on ``test``; the only reader of the test split.

    Returns ``(metrics, x_adv)`` where ``x_adv`` are this model's adversarial test points and
    ``transfer_acc`` is the accuracy on ``base_adversarial`` (on ``x_adv`` when None).
    """
    import attacks

    X, y = as_tensors(test, "test")[:2]
    results, adversarial = attacks.evaluate(model, (X, y), {"attack": attack}, batch_size=batch_size,
                                            progress=progress, return_adv=True)
    x_adv = adversarial["attack"]
    transfer = attacks.accuracy(model, base_adversarial if base_adversarial is not None else x_adv, y)
    return {"clean_acc": results["clean_acc"], "robust_acc": results["attack"]["robust_acc"],
            "transfer_acc": transfer}, x_adv


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


def _resume_settings(config: dict, model, bounds, train_steps: int, eval_batch_size: int) -> dict:
    """What per-seed results depend on besides the seed and its data: the config without the seed list,
    the bounds, the adversarial trainers' steps, the evaluation batch size and a given module's weights."""
    settings = {k: v for k, v in config.items() if k != "seeds"}
    settings.update(bounds=repr(bounds), train_steps=train_steps, eval_batch_size=eval_batch_size,
                    model_hash=model_hash(model) if isinstance(model, nn.Module) else None)
    return settings


def _run_seed(seed: int, splits: Splits, tasks: list, bar, *, model_for: Callable, attack_fn: Callable,
              base_trainer, eval_batch_size: int, progress: bool, context: dict) -> dict:
    """Train the base model of ``seed``, evaluate it, then run every ``(recipe, fraction)`` task.

    Returns ``{"base": row, "runs": [row, ...]}``; ``context`` holds the :class:`DefenceContext`
    fields shared by the tasks.
    """
    train, val = as_tensors(splits.train, "train"), as_tensors(splits.val, "val")
    _check_two_classes(train, seed)
    bar.set_postfix_str(f"seed {seed}: base model")
    base = base_trainer.fit(model_for(seed, splits), train, seed=seed, val=val)
    base_metrics, base_adversarial = evaluate_on_test(base, splits.test, attack_fn, batch_size=eval_batch_size,
                                                      progress=progress)
    bar.update()
    cache: dict = {}
    runs = []
    for recipe, fraction in tasks:
        bar.set_postfix_str(f"seed {seed}: {recipe.name}" + ("" if fraction is None else f" @ {fraction:g}"))
        defended = recipe.fn(DefenceContext(model=base, train=train, val=val, attack=attack_fn, seed=seed,
                                            fraction=fraction, cache=cache, **context))
        if defended is base:
            metrics = dict(base_metrics)
        else:
            metrics, _ = evaluate_on_test(defended, splits.test, attack_fn, base_adversarial,
                                          batch_size=eval_batch_size, progress=progress)
        runs.append({"seed": seed, "recipe": recipe.name, "fraction": fraction, **metrics})
        bar.update()
    return {"base": {"seed": seed, **base_metrics}, "runs": runs}


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
        return list(range(check_int(seeds, "seeds", 1)))
    if not isinstance(seeds, (list, tuple)) or not seeds:
        raise ValueError(f"seeds: must be a count >= 1 or a non-empty list of seeds, got {seeds!r}")
    for s in seeds:
        check_int(s, "seeds", 0)
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
        bounds: input range for named attacks and adversarial trainers; ``"auto"`` takes the data set's
            (images (0, 1), tabular None; None for your own tensors).
        method, method_options: influence method (``robust_infl.available_methods()``) and its options.
        fractions: budgets (share of the training set pruned / down-weighted); several give a plot.
        mode: ``"prune"`` (train on the kept samples) or ``"reweight"`` (``scheme``: ``"smooth"`` with
            ``temperature`` or ``"hard"``; see :func:`defenses.reweight`).
        retrain: ``"scratch"`` or ``"finetune"`` (from the base model) for the defended models.
        trainer: ``erm``, ``pgd-at``, ``trades``, ``art-pgd-at``, ``art-trades``, or a trainer object
            (``Trainer`` / ``ARTTrainer``); the base model is trained by it from scratch.
        recipes: names from ``defenses.available_recipes()``; ``none`` and ``random`` give the paired
            differences.
        seeds: a count N (seeds 0..N-1) or a list of seeds.
        epochs, lr, batch_size: training hyper-parameters (defaults per data set);
            ``train_steps``: PGD steps of adversarial trainers.
        n_train, n_val, n_test: split sizes of named data sets (defaults per data set).
        eval_batch_size: samples per attack call at evaluation.
        out: folder for ``report.json``, ``report.md`` and ``robust_vs_fraction.png`` (None: write nothing);
            each seed's results are also saved there as it completes (``seeds/seed_<k>.json``), and
            every file is written atomically.
        resume: reuse the per-seed results already in ``out`` (a run that crashed or was stopped, or
            more seeds added to a finished run); a seed file written with other settings is refused
            with a ``ValueError``. Custom model factories and attack callables are identified by their
            names only (see :mod:`defenses.seed_results`).
        progress: show progress bars.
        poison: a backdoor threat model (``defenses.poisoning.PoisonSpec``, a dict of its fields, or
            ``"badnets"`` / ``"clean-label"``): the training split of every seed is poisoned, and the
            poisoning recipes (``defenses.poisoning.POISON_RECIPES``; all by default) are run and
            reported instead (clean accuracy, ``asr_backdoor``, detection precision / recall / AUROC at
            the budget, evasion robust accuracy; see :func:`defenses.poisoning.run_poisoned`).
            ``method``, ``fractions``, ``mode`` and ``retrain`` do not apply.

    Returns:
        The report: ``config``, ``base`` (metrics of the base model), ``per_seed`` rows and ``summary``
        (mean ± std over seeds, paired differences vs ``none`` and vs ``random``).
    """
    check_bool(progress, "progress")
    check_bool(resume, "resume")
    if resume and out is None:
        raise ValueError("resume: needs out, the folder holding the per-seed results to reuse")
    fractions = _check_fractions(fractions)
    seeds = _check_seeds(seeds)
    check_choice(mode, "mode", MODES)
    check_choice(scheme, "scheme", REWEIGHT_SCHEMES)
    check_positive(temperature, "temperature")
    check_int(train_steps, "train_steps", 1)
    check_int(eval_batch_size, "eval_batch_size", 1)
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

    splits_for, defaults, data_label = _resolve_data(data, (n_train, n_val, n_test), bounds)
    model_for, model_label = _resolve_model(model, defaults)
    first = splits_for(seeds[0])
    data_label = data_label or first.name
    model_label = model_label or type(model_for(seeds[0], first)).__name__
    norm = defaults.norm if norm is None else check_choice(norm, "norm", ("linf", "l2"))
    eps = defaults.eps if eps is None else check_positive(eps, "eps")
    steps = defaults.steps if steps is None else check_int(steps, "steps", 1)
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
                               bounds=first.bounds, train_steps=train_steps, progress=progress)
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

        return run_poisoned(
            poison, seeds=seeds, splits_for=lambda seed: first if seed == seeds[0] else splits_for(seed),
            model_for=model_for, attack_for=attack_for, trainer=base_trainer,
            config={"data": data_label, "model": model_label, "attack": attack_label, "eps": eps, "norm": norm,
                    "steps": steps, "trainer": trainer_label, "seeds": seeds, "epochs": epochs, "lr": lr,
                    "batch_size": batch_size, "train_steps": train_steps, "n_train": int(first.train[0].shape[0]),
                    "n_val": int(first.val[0].shape[0]), "n_test": int(first.test[0].shape[0])},
            recipes=None if tuple(recipes) == tuple(DEFAULT_RECIPES) else list(recipes),
            eval_batch_size=eval_batch_size, out=out, resume=resume, progress=progress)

    budget_free_attack = attack_label == "linear"  # the closed-form attack has no eps, norm or steps
    config = {
        "data": data_label, "model": model_label, "attack": attack_label,
        "eps": None if budget_free_attack else eps, "norm": None if budget_free_attack else norm,
        "steps": None if budget_free_attack else steps, "method": method, "method_options": {k: repr(v) for k, v in method_options.items()},
        "fractions": fractions, "mode": mode, "scheme": scheme if mode == "reweight" else None,
        "temperature": temperature if mode == "reweight" and scheme == "smooth" else None,
        "retrain": retrain, "trainer": trainer_label, "recipes": list(recipes), "seeds": seeds,
        "epochs": epochs, "lr": lr, "batch_size": batch_size,
        "n_train": int(first.train[0].shape[0]), "n_val": int(first.val[0].shape[0]),
        "n_test": int(first.test[0].shape[0]),
    }

    budgeted = [r for r in chosen if r.uses_budget]
    once = [r for r in chosen if not r.uses_budget]
    tasks = [(r, None) for r in once] + [(r, f) for f in fractions for r in budgeted]
    saved = None if out is None else SeedResults(out, _resume_settings(config, model, bounds, train_steps,
                                                                        eval_batch_size))
    base_rows, rows = [], []
    with tqdm(total=len(seeds) * (1 + len(tasks)), desc="defence", disable=not progress) as bar:
        for seed in seeds:
            splits = first if seed == seeds[0] else splits_for(seed)
            fingerprint = None if saved is None else data_hash(splits.train, splits.val, splits.test)
            results = saved.load(seed, fingerprint) if resume else None
            if results is None:
                bar.set_postfix_str(f"seed {seed}")
                results = _run_seed(seed, splits, tasks, bar, model_for=model_for, attack_fn=attack_for(seed, splits),
                                    base_trainer=base_trainer, eval_batch_size=eval_batch_size, progress=progress,
                                    context=dict(trainer=trainer, mode=mode, scheme=scheme, temperature=temperature,
                                                 method=method, method_options=method_options,
                                                 train_attack=_training_attack(trainer, seed), progress=progress))
                if saved is not None:
                    saved.save(seed, fingerprint, results)
            else:
                bar.update(1 + len(tasks))
            base_rows.append(results["base"])
            rows += results["runs"]

    report = {
        "config": config,
        "base": {m: mean_std(r[m] for r in base_rows) for m in METRICS},
        "per_seed": {"base": base_rows, "runs": rows},
        "summary": summarise(rows, [r.name for r in chosen], fractions),
    }
    if out is not None:
        write_report(report, out)
    return report
