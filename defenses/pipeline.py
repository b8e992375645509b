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

import math
import time
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

import attacks
from attacks.plumbing import model_device
from robust_infl.datasets import Splits

from .data import as_tensors
from .eval_suite import build_suite, evaluate_suite
from .plan import MODES, RunPlan, RunSettings, plan_run, seeded_split
from .poisoning import run_poisoned
from .recipes import DEFAULT_RECIPES, DefenceContext
from .references import erm_like
from .report import recommend, summarise, summarise_base, write_report
from .seed_results import SeedResults, prepare_out_folder, run_seeds
from .trainers import ERM

__all__ = ["run", "execute", "evaluate_on_test", "seeded_split", "MODES", "RunPlan", "RunSettings", "plan_run"]


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

    The run is planned first (:func:`defenses.plan.plan_run`: every argument checked and the inputs
    resolved into a :class:`~defenses.plan.RunPlan`, before any training), then executed
    (:func:`execute`); the report's ``config`` records the plan.

    Args:
        data: a data set name (``mnist``, ``mnist-full``, ``fashion-mnist``, ``fashion-mnist-full``, ``digits``,
            ``adult``, ``moons``; split per seed), a ``robust_infl.datasets.Splits``, ``(train, val, test)``
            splits, one ``(X, y[, s])`` data set (split per seed: 65% / 15% / 20%), or a callable ``seed -> Splits``.
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
    settings = RunSettings(
        data=data, model=model, attack=attack, eps=eps, norm=norm, steps=steps, bounds=bounds, method=method,
        method_options=method_options, fractions=fractions, mode=mode, scheme=scheme, temperature=temperature,
        retrain=retrain, trainer=trainer, recipes=recipes, references=references, eval_attacks=eval_attacks,
        eval_subset=eval_subset, seeds=seeds, epochs=epochs, lr=lr, batch_size=batch_size, train_steps=train_steps,
        n_train=n_train, n_val=n_val, n_test=n_test, eval_batch_size=eval_batch_size, out=out, resume=resume,
        overwrite=overwrite, progress=progress, poison=poison)
    return execute(plan_run(settings))


def execute(plan: RunPlan) -> dict:
    """Run a :class:`~defenses.plan.RunPlan` (see :func:`run`) and return (and with ``out`` write) its report.

    Every seed trains the base model, evaluates it, then runs each ``(recipe, fraction)`` task and
    each reference trainer (:func:`_run_seed`); the per-seed results are saved and reused on resume
    by :func:`defenses.seed_results.run_seeds`. A poisoning plan is run by
    :func:`defenses.poisoning.run_poisoned`. The report's ``config`` is :meth:`RunPlan.config`.
    """
    s = plan.settings
    if s.out is not None:
        prepare_out_folder(s.out, resume=s.resume, overwrite=s.overwrite)
    if s.poison is not None:
        return run_poisoned(s.poison, seeds=plan.seeds, splits_for=plan.splits, model_for=plan.model_for,
                            attack_for=plan.attack_for, trainer=plan.base_trainer, config=plan.poison_config(),
                            recipes=plan.poison_recipes(), eval_batch_size=s.eval_batch_size, out=s.out,
                            resume=s.resume, progress=s.progress)
    config, tasks = plan.config(), plan.tasks()
    saved = None if s.out is None else SeedResults(s.out, plan.resume_settings(config))
    evaluation = dict(threat=plan.attack_label, eval_subset=s.eval_subset, batch_size=s.eval_batch_size,
                      progress=False)
    context = dict(trainer=plan.trainer, mode=s.mode, scheme=s.scheme, temperature=s.temperature, method=s.method,
                   method_options=plan.method_options, progress=False)
    per_seed = 1 + len(tasks) + len(plan.references)
    with tqdm(total=len(plan.seeds) * per_seed, desc="defence", disable=None if s.progress else True) as bar:
        def compute(seed, splits):
            bar.set_postfix_str(f"seed {seed}")
            seed_attack = plan.attack_for(seed, splits)
            evaluation["suite"] = build_suite(plan.suite_names, eps=plan.eps, norm=plan.norm, steps=plan.steps,
                                              bounds=splits.bounds, seed=seed)
            return _run_seed(seed, splits, tasks, bar, model_for=plan.model_for, attack_fn=seed_attack,
                             base_trainer=plan.base_trainer, references=plan.references,
                             cost_unit=erm_like(plan.trainer), evaluation=evaluation,
                             context=dict(context, train_attack=plan.trainer.training_attack(seed)))

        results = run_seeds(plan.seeds, plan.splits, compute, saved=saved, resume=s.resume,
                            on_reused=lambda seed: bar.update(per_seed))
    base_rows = [r["base"] for r in results]
    rows = [row for r in results for row in r["runs"]]
    report = {
        "config": config,
        "base": summarise_base(base_rows),
        "per_seed": {"base": base_rows, "runs": rows},
        "summary": summarise(rows, [r.name for r in plan.recipes] + list(plan.references), plan.fractions),
    }
    report["recommendation"] = recommend(report["summary"])
    if s.out is not None:
        write_report(report, s.out)
    return report
