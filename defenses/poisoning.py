"""The poisoning pipeline, :func:`run_poisoning`: per seed, poison the training split (BadNets patch, blended
noise pattern, Adap-Blend, ART's clean-label backdoor, SIG, WaNet or the label-consistent backdoor), train the
base model with the trainer, draw K triggered validation inputs of the other classes as evidence, run every
poisoning recipe (:mod:`defenses.poison_recipes`) and report clean accuracy, backdoor ASR (``asr_backdoor``),
detection precision / recall / AUROC at the budget and the evasion robust accuracy (``robust_acc_adaptive``:
the attack re-run on each model), with paired 95% intervals against ``none`` and ``random``
(:func:`defenses.report.summarise_poisoned`).

Its options are a :class:`~defenses.config.PoisoningConfig`, planned like the evasion pipeline's
(:func:`defenses.plan.plan_run`); the per-seed loop and its resumable cache are
:func:`defenses.seed_results.run_seeds`, the report files :func:`defenses.report.write_report`.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

import attacks
from attacks.inputs import as_data
from attacks.plumbing import make_generator
from robust_infl.io import held_output
from robust_infl.store import model_hash

from . import poison_detection as detect
from .config import PoisoningConfig, PoisonSpec, config_from_options
from .plan import RunPlan, plan_run
from .stats import mean_std
from .poison_recipes import PoisonContext
from .poison_removal import contrast_detection
from .recipes import Recipe
from .report import POISON_BASE_METRICS, recommend_poisoned, summarise_poisoned, write_report
from .seed_results import SeedResults, prepare_out_folder, run_seeds
from .timing import cost_clock, timed

__all__ = ["run_poisoning", "execute_poisoning", "poisoned_seed"]


def run_poisoning(data="mnist", model=None, attack="pgd", **options) -> dict:
    """Measure the poisoning defences over several seeds and return (and with ``out`` write) the report.

    ``data``, ``model``, ``attack`` and the keyword ``options`` are the fields of
    :class:`~defenses.config.PoisoningConfig` (each documented there; an unknown one is a ``TypeError``
    naming it): the backdoor threat model ``poison`` (a :class:`~defenses.config.PoisonSpec`, a dict of
    its fields, or an attack name of ``defenses.config.POISON_ATTACKS``), the poisoning ``recipes``
    (``defenses.available_recipes("poisoning")``; all by default), the trainer, schedule, seeds and output
    of :func:`defenses.run`. The run is planned first (every option checked before any training), then
    executed (:func:`~defenses.poisoning.execute_poisoning`).

    Returns:
        The report, with ``config``, ``base`` (mean ± std of the base model's ``clean_acc``, ``asr_backdoor`` and
        ``robust_acc_adaptive``), ``per_seed`` (``base``, ``runs`` and ``timing``) and ``summary`` (per
        recipe and evidence size: every metric's mean ± std over seeds and paired differences vs ``none``
        and ``random``). With ``out``: ``report.json``, ``report.md`` and ``asr_by_recipe.png`` there, and
        ``seeds/seed_<k>.json`` as each seed completes (``resume`` reuses them).
    """
    config = config_from_options(PoisoningConfig, dict(data=data, model=model, attack=attack, **options),
                                 "defenses.run_poisoning")
    return execute_poisoning(plan_run(config))


def _draw_evidence(val: tuple, trigger, target_class: int, size: int, seed: int) -> tuple:
    """The first ``size`` of a seeded permutation of the validation inputs of the other classes, triggered,
    with their true labels; and the validation split without them."""
    X, y = val[:2]
    others = torch.nonzero(y != target_class).flatten()
    if size > others.numel():
        raise ValueError(f"evidence: asks for {size} triggered inputs but the validation split holds only "
                         f"{others.numel()} outside the target class")
    chosen = others[torch.randperm(others.numel(), generator=make_generator(seed + 7919))[:size]]
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[chosen] = False
    return (trigger.apply(X[chosen]), y[chosen]), (X[rest], y[rest])


def _trigger(spec: PoisonSpec, input_shape: tuple, seed: int) -> attacks.BackdoorTrigger:
    """The trigger of ``spec.attack`` (WaNet's warp and the blend pattern drawn from ``seed``)."""
    if spec.attack == "sig":
        return attacks.SIGTrigger(input_shape, delta=spec.sig_delta, test_delta=spec.sig_test_delta)
    if spec.attack == "wanet":
        return attacks.WaNetTrigger(input_shape, s=spec.wanet_s, noise_ratio=spec.wanet_noise_ratio, seed=seed)
    if spec.attack == "blend":
        return attacks.Trigger.random_blend(input_shape, seed=seed)
    if spec.attack == "adaptive-blend":
        return attacks.AdaptiveBlendTrigger.random(input_shape, seed=seed)
    corner = "all" if spec.attack == "label-consistent" else "bottom-right"
    return attacks.Trigger.patch(input_shape, size=spec.patch_size, corner=corner)


def _poison_train(spec: PoisonSpec, train: tuple, trigger, trainer, model_for: Callable, seed: int):
    if spec.attack in ("badnets", "blend", "adaptive-blend", "sig", "wanet"):
        return attacks.poison(train[:2], trigger, target_class=spec.target_class, rate=spec.rate, seed=seed,
                              clean_label=spec.attack == "sig")
    proxy = trainer.fit(model_for(seed), train[:2], seed=seed)
    if spec.attack == "label-consistent":
        return attacks.label_consistent_poison(train[:2], trigger, proxy, target_class=spec.target_class,
                                               rate=spec.rate, seed=seed, eps=spec.clean_label_eps,
                                               steps=spec.clean_label_steps)
    art = attacks.ARTPoison("PoisoningAttackCleanLabelBackdoor", eps=spec.clean_label_eps,
                            eps_step=2.5 * spec.clean_label_eps / spec.clean_label_steps,
                            max_iter=spec.clean_label_steps)
    return art.poison(train[:2], trigger, target_class=spec.target_class, rate=spec.rate, seed=seed, proxy=proxy)


def _test_split(test, robust_n: Optional[int]) -> tuple:
    """``(X, y, robust_n)``: the test split and how many of its first inputs the evasion attack runs on."""
    X, y = as_data(test, "test")[:2]
    return X, y, len(y) if robust_n is None else min(robust_n, len(y))


def _test_metrics(model: nn.Module, test: tuple, trigger, target_class: int, attack: Callable,
                  eval_batch_size: int) -> dict:
    """Clean accuracy, backdoor ASR (targeted) on the whole test split, evasion robust accuracy on its first
    ``test[2]`` inputs."""
    X, y, robust_n = test
    backdoor = attacks.evaluate(model, (X, y), {"trigger": trigger}, target_class=target_class,
                                batch_size=eval_batch_size, progress=False)
    evasion = attacks.evaluate(model, (X[:robust_n], y[:robust_n]), {"attack": attack}, batch_size=eval_batch_size,
                               progress=False)
    return {"clean_acc": backdoor["clean_acc"], "asr_backdoor": backdoor["trigger"]["asr"],
            "robust_acc_adaptive": evasion["attack"]["robust_acc"]}


def poisoned_seed(seed: int, splits, spec: PoisonSpec, recipes: Sequence[Recipe], *, model_for: Callable, trainer,
                  attack: Callable, eval_batch_size: int = 256, progress: bool = False,
                  on_recipe: Optional[Callable[[str], None]] = None) -> dict:
    """One seed of :func:`execute_poisoning`: poison the training split, train the base model, draw the evidence,
    run every recipe (an evidence recipe once per evidence size) and measure each model on the test split.

    Returns ``{"base": row, "runs": [row, ...], "n_poisoned": int, "base_model": hash, "timing": {...}}``
    (``base_model``: :func:`robust_infl.store.model_hash` of the base model). Every row records the
    wall and CPU time of its recipe (detection and retraining; the base model's training for ``none``) as
    ``train_time`` / ``train_cpu_time``, and ``cost_vs_base``: that time over the base model's training, on
    the clock of :func:`~defenses.timing.cost_clock` (the first training of a process also pays torch's
    warm-up, which lowers the ratios of that seed a little).
    """
    train, val = as_data(splits.train, "train"), as_data(splits.val, "val")
    trigger = _trigger(spec, tuple(splits.input_shape), seed)
    trainer = trainer.with_retrain("scratch")
    X, y, poisoned_index = _poison_train(spec, train, trigger, trainer, lambda s: model_for(s, splits), seed)
    base, base_time = timed(trainer.fit, model_for(seed, splits), (X, y), seed=seed)
    clock = cost_clock(base)
    detection_time = timed(contrast_detection, base, (X, y), None, spec.budget)[1]["wall"]
    test = _test_split(splits.test, spec.robust_n)
    base_row = {"seed": seed, **_test_metrics(base, test, trigger, spec.target_class, attack, eval_batch_size)}
    evidence, rest = _draw_evidence(val, trigger, spec.target_class, max(spec.evidence), seed)
    cache: dict = {}
    runs = []
    for recipe in recipes:
        name, fn, threat = recipe.name, recipe.fn, recipe.threat
        for size in (spec.evidence if threat == "evidence" else (None,)):
            if on_recipe is not None:
                on_recipe(name if size is None else f"{name} K={size}")
            ctx = PoisonContext(model=base, train=(X, y), val=rest, trainer=trainer, budget=spec.budget, seed=seed,
                                evidence=None if size is None else (evidence[0][:size], evidence[1][:size]),
                                progress=progress, cache=cache)
            outcome, seconds = timed(fn, ctx)
            if threat == "none":  # no defence: its cost is the base training (a recipe that keeps the base
                seconds = base_time  # model, e.g. a scan that found nothing, costs its own detection time)
            metrics = (dict(base_row) if outcome.model is base else
                       _test_metrics(outcome.model, test, trigger, spec.target_class, attack, eval_batch_size))
            metrics.pop("seed", None)
            removed = outcome.removed if outcome.removed is not None else torch.zeros(len(y), dtype=torch.bool)
            found = detect.detection_metrics(removed, poisoned_index, outcome.scores)
            runs.append({"seed": seed, "recipe": name, "evidence": size, "threat": threat, **metrics,
                         "precision": found["precision"] if outcome.removed is not None else None,
                         "recall": found["recall"] if outcome.removed is not None else None,
                         "auroc": found["auroc"], "removed_share": found["removed"] / len(y),
                         "train_time": seconds["wall"], "train_cpu_time": seconds["cpu"],
                         "cost_vs_base": seconds[clock] / base_time[clock]})
    train_time = base_time["wall"]
    return {"base": base_row, "runs": runs, "n_poisoned": int(poisoned_index.numel()), "base_model": model_hash(base),
            "timing": {"train_s": train_time, "detection_s": detection_time,
                       "detection_over_epoch": detection_time / (train_time / max(1, getattr(trainer, "epochs", 1)))}}


def execute_poisoning(plan: RunPlan) -> dict:
    """Run the plan of a :class:`~defenses.config.PoisoningConfig` (see :func:`run_poisoning`) and return (and with
    ``out`` write) its report; the per-seed loop is :func:`defenses.seed_results.run_seeds`. ``out`` is held
    for the whole run (:func:`robust_infl.io.held_output`: a second run into it is refused).

    A seed's file is keyed by every setting but the recipes: resumed, a seed that lacks some of the requested
    recipes retrains its base model (the same weights: training is seeded), runs only those and adds their
    rows, so the report equals that of one run of all the recipes (its timings aside); rows of recipes not
    requested stay in the file and out of the report. A retrained base model that differs from the saved
    one (another torch build or thread count) is refused with a ``ValueError`` naming ``resume``."""
    with held_output(plan.settings.out):
        return _execute_poisoning(plan)


def _execute_poisoning(plan: RunPlan) -> dict:
    s, spec = plan.settings, plan.poison
    if s.out is not None:
        prepare_out_folder(s.out, resume=s.resume, overwrite=s.overwrite)
    config = plan.poison_config()
    saved = None if s.out is None else SeedResults(s.out, {k: v for k, v in config.items()
                                                           if k not in ("seeds", "recipes")})
    with tqdm(total=len(plan.seeds), desc="poisoning", disable=None if s.progress else True) as bar:
        def compute(seed, splits, recipes):
            results = poisoned_seed(seed, splits, spec, recipes, model_for=plan.model_for,
                                    trainer=plan.base_trainer, attack=plan.attack_for(seed, splits),
                                    eval_batch_size=s.eval_batch_size,
                                    on_recipe=lambda label: bar.set_postfix_str(f"seed {seed}: {label}"))
            bar.update()
            return results

        def extend(seed, splits, done):
            have = {row["recipe"] for row in done["runs"]}
            missing = [r for r in plan.recipes if r.name not in have]
            if not missing:
                return None
            added = compute(seed, splits, missing)
            if added["base"] != done["base"] or added["base_model"] != done.get("base_model", added["base_model"]):
                raise ValueError(f"resume: seed {seed}'s base model, retrained to add {', '.join(r.name for r in missing)}, "
                                 f"differs from the one its saved rows were measured on ({added['base']} vs "
                                 f"{done['base']}): training does not reproduce here; use another out folder or "
                                 "overwrite=True")
            return {**done, "runs": done["runs"] + added["runs"]}

        per_seed = run_seeds(plan.seeds, plan.splits, lambda seed, splits: compute(seed, splits, plan.recipes),
                             saved=saved, resume=s.resume, on_reused=lambda seed: bar.update(), extend=extend)
    order = {r.name: i for i, r in enumerate(plan.recipes)}
    base_rows = [r["base"] for r in per_seed]
    rows = sorted((row for r in per_seed for row in r["runs"] if row["recipe"] in order),
                  key=lambda row: (plan.seeds.index(row["seed"]), order[row["recipe"]], row["evidence"] or 0))
    report = {"config": config,
              "base": {m: mean_std(r[m] for r in base_rows) for m in POISON_BASE_METRICS},
              "per_seed": {"base": base_rows, "runs": rows, "timing": [r["timing"] for r in per_seed]},
              "summary": summarise_poisoned(rows, config["recipes"])}
    report["recommendation"] = recommend_poisoned(report["summary"])
    if s.out is not None:
        write_report(report, s.out)
    return report
