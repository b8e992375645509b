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
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn
from tqdm.auto import tqdm

import attacks
from attacks.inputs import as_data
from robust_infl.datasets import Splits
from robust_infl.io import held_output

from .eval_suite import build_suite, evaluate_suite
from .config import RunConfig, config_from_options
from .plan import MODES, RunPlan, plan_run, seeded_split
from .recipes import DefenceContext
from .references import erm_like
from .report import recommend, summarise, summarise_base, write_report
from .seed_results import SeedResults, prepare_out_folder, run_seeds
from .timing import cost_clock, timed
from .trainers import ERM

__all__ = ["run", "execute", "evaluate_on_test", "seeded_split", "MODES", "RunPlan", "plan_run"]


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
    without a suite) and ``worst_case`` (the share correct under every one of them).
    """
    X, y = as_data(test, "test")[:2]
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
               "attacks": per_attack["attacks"]}
    return metrics, x_adv


def _run_seed(seed: int, splits: Splits, tasks: list, bar, *, model_for: Callable, attack_fn: Callable,
              base_trainer, context: dict, references: dict, cost_unit, evaluation: dict) -> dict:
    """Train the base model of ``seed``, evaluate it, then run every ``(recipe, fraction)`` task and every
    reference trainer; every row records its wall time (``train_time``), its CPU time (``train_cpu_time``) and
    its ratio to ``cost_unit``'s fit (an ERM fit of the same schedule, timed right after the base model; NaN
    without one) on the clock of :func:`~defenses.timing.cost_clock`.

    Returns ``{"base": row, "runs": [row, ...]}``; ``context`` holds the :class:`DefenceContext`
    fields shared by the tasks, ``evaluation`` the options of :func:`evaluate_on_test`.
    """
    train, val = as_data(splits.train, "train"), as_data(splits.val, "val")
    _check_two_classes(train, seed)
    bar.set_postfix_str(f"seed {seed}: base model")
    base, base_time = timed(base_trainer.fit, model_for(seed, splits), train, seed=seed, val=val)
    clock = cost_clock(base)
    nan = {"wall": math.nan, "cpu": math.nan}
    erm_time = nan if cost_unit is None else timed(cost_unit.fit, model_for(seed, splits), train, seed=seed)[1]
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
        defended, seconds = timed(recipe.fn, DefenceContext(model=base, train=train, val=val, attack=attack_fn,
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
        reference, seconds = timed(trainer.fit, model_for(seed, splits), train, seed=seed, val=val)
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


def run(data: Union[str, Splits, Sequence, Callable] = "mnist", model: Union[str, nn.Module, Callable, None] = None,
        attack: Union[str, Callable] = "pgd", **options) -> dict:
    """Run the defence and its baselines over several seeds and return (and optionally write) the report.

    The run is planned first (:func:`defenses.plan.plan_run`: every argument checked and the inputs
    resolved into a :class:`~defenses.plan.RunPlan`, before any training), then executed
    (:func:`~defenses.pipeline.execute`); the report's ``config`` records the plan.

    ``data``, ``model``, ``attack`` and the keyword ``options`` are the fields of
    :class:`~defenses.config.RunConfig`, each documented there (an unknown one is a ``TypeError`` naming
    it; the backdoor-poisoning pipeline is :func:`defenses.run_poisoning`): the threat model, the
    scoring, the budgets and the selection, the training, the recipes and references, the evaluation
    suite, the seeds and split sizes, and the output folder. Your own data are tensors or numpy arrays
    (:mod:`attacks.inputs`); floating ``X`` of another dtype (numpy's float64) is converted to torch's
    default dtype (float32). Removal (prune mode) gives the removed
    samples weight 0, so every recipe trains for as many steps as ``none`` (ART's trainers, which take no
    weights, drop them).

    Returns:
        The report, with ``config``, ``base`` (metrics of the base model), ``per_seed`` rows, ``summary``
        (mean ± std over seeds, paired differences vs ``none`` and vs ``random``) and ``recommendation``
        (the row to pick, see :func:`defenses.report.recommend`). Every row holds ``clean_acc``,
        ``robust_acc_adaptive``, ``robust_acc_transfer``, ``asr_adaptive``, ``attacks`` (per attack of
        the suite), ``worst_case``, ``train_time`` (wall seconds to build the model: scoring, selection
        and training), ``train_cpu_time`` (this process's CPU seconds for it) and ``cost_vs_erm`` (its
        ratio to one ERM fit of the same schedule: CPU time on the CPU, which other jobs on a shared
        machine do not inflate; wall time on an accelerator).
    """
    config = config_from_options(RunConfig, dict(data=data, model=model, attack=attack, **options), "defenses.run")
    return execute(plan_run(config))


def execute(plan: RunPlan) -> dict:
    """Run a :class:`~defenses.plan.RunPlan` (see :func:`run`) and return (and with ``out`` write) its report.

    Every seed trains the base model, evaluates it, then runs each ``(recipe, fraction)`` task and
    each reference trainer (:func:`_run_seed`); the per-seed results are saved and reused on resume
    by :func:`defenses.seed_results.run_seeds`. The report's ``config`` is :meth:`RunPlan.config`.

    ``out`` is held for the whole run (:func:`robust_infl.io.held_output`: a second run into it is
    refused, and a failed write there names it).
    """
    with held_output(plan.settings.out):
        return _execute(plan)


def _execute(plan: RunPlan) -> dict:
    s = plan.settings
    if not isinstance(s, RunConfig):
        raise TypeError(f"plan: expected the plan of a RunConfig, got one of {type(s).__name__} "
                        "(a poisoning plan runs with defenses.poisoning.execute_poisoning)")
    if s.out is not None:
        prepare_out_folder(s.out, resume=s.resume, overwrite=s.overwrite)
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
