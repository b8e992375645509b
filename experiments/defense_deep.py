"""An influence-guided defence on deep models under adaptive attack.

Settings: MNIST subset (3,500 / 500 / 1,000) with the SmallCNN, PGD linf eps 0.1 (10 steps, alpha 0.02,
bounds [0, 1]); Adult (8,000 / 2,000 / 5,000) with an MLP(64, 64), PGD L2 eps 0.5 (10 steps, no bounds).
Both with plain training (ERM) and with PGD adversarial training (3 PGD steps per training point).

Recipes (each retrained from scratch with the seed): ``none`` (no defence), ``train+val`` (plain
training on train + validation, the fair reference for anything that uses the validation labels),
``random`` (remove 5% at random), ``ip-prune`` (remove the top 5% by IP harm on the adversarial
validation loss), three variants of it (``ensemble-prune``: scores of the paper's ip-ensemble;
``misclassified-prune``: the top harm among the samples the base model misclassifies, at their
adversarial training points under PGD-AT; ``iterative-prune``: 2.5% twice, re-scoring with the
retrained model in between; ``per-class-prune``: the top 5% within each class), fine-tuning
(``finetune-ip-prune``: two more epochs of the base model on the data without the top 5%, against
``finetune-all``, the same on all the data) and ``lookahead`` (:class:`defenses.LookaheadReweighting`, online one-step-lookahead
reweighting against the adversarial validation loss; the pipeline recipe ``lookahead``).

Every defended model is attacked again (adaptive): PGD (the threat model) on the whole test split,
and AutoAttack on a fixed test subset. AutoAttack here is, for MNIST, APGD-CE (50 steps) followed
on the surviving points by targeted APGD-DLR (torchattacks ``APGDT``, 9 target classes, 25 steps):
torchattacks' standard version (with FAB-T and Square, 5,000 queries) is too slow per model for this
grid on a CPU. For Adult (binary, unbounded features) it is APGD-CE (50 steps) followed by
targeted FAB (torchattacks): the DLR losses need >= 3 classes and torchattacks' L2 Square needs
square images. Both run on the model seen through an exact affine map of the data into the unit box
(torchattacks clips to [0, 1]; the map has a margin of eps, so the clipping never binds).

Hyper-parameters of the lookahead are fixed from the DESIGN leads (every 5 steps after one warm-up
epoch, 128 validation points attacked by 5-step PGD). The remaining options (validation objective,
weighting scheme, per-class normalisation, mix) were chosen for each trainer by ``--select`` on
separate seeds, scored on a held-out half of the validation split (never on test).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.defense_deep            # full run
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.defense_deep --quick    # smoke run
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.defense_deep --select   # lookahead options

The experiment's own variants are registered recipes (``defenses.register_recipe``); the trainers are the
library's (``defenses.make_trainer``). Per-seed results are saved under
``experiments/out/defense_deep/<data>-<trainer>/seeds/`` as each recipe finishes
(``defenses.seed_results.SeedResults``: a rerun skips finished recipes and refuses files written with
other settings); the summary goes to ``experiments/out/defense_deep.json`` and the ``defense_deep`` section
of ``experiments/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

import attacks
from defenses import DefenceContext, LookaheadReweighting, make_trainer, register_recipe
from defenses.data import take
from defenses.lookahead import ADVERSARIAL_TRAINING_OPTIONS, PLAIN_TRAINING_OPTIONS, validation_attack
from defenses.recipes import cached_scores, get_recipe, influence_scores
from defenses.seed_results import SeedResults
from defenses.selection import budget_size, prune
from experiments._results import mean_std, paired_ci, write_json, write_section
from robust_infl.datasets import load_dataset
from robust_infl.models import build_model
from robust_infl.store import data_hash

OUT = Path(__file__).with_name("out")
RECIPES = ("none", "train+val", "random", "ip-prune", "ensemble-prune", "misclassified-prune", "iterative-prune",
           "per-class-prune", "finetune-all", "finetune-ip-prune", "lookahead")
SCORED_RECIPES = ("ip-prune", "ensemble-prune", "misclassified-prune", "iterative-prune", "per-class-prune")
# The paper's ensemble for deep models: 6 dropout-masked copies, dropout rates drawn from U(0, 0.01).
ENSEMBLE_OPTIONS = {"members": 6, "perturbation": "dropout", "scale": 0.01}
ITERATIVE_ROUNDS = 2
FINETUNE_EPOCHS = 2
# Differences reported besides recipe - baseline: fine-tuning on the pruned data against fine-tuning on all of it.
EXTRA_PAIRS = (("finetune-ip-prune", "finetune-all"),)
TRAINERS = ("plain", "pgd-at")
TRAINER_NAMES = {"plain": "erm", "pgd-at": "pgd-at"}  # the library's trainer of each
METRICS = ("clean_acc", "pgd_acc", "aa_acc")
BASELINES = ("none", "random", "train+val")
FRACTION = 0.05
REGENERATE = "OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.defense_deep"


@dataclass(frozen=True)
class Setting:
    """One data set, model, threat model and training schedule."""

    data: str
    model: str
    sizes: tuple
    norm: str
    eps: float
    alpha: float
    bounds: Optional[tuple]
    epochs: int
    lr: float
    batch_size: int
    aa_points: int
    at_steps: int = 3


SETTINGS = {
    "mnist": Setting("mnist", "cnn", (3500, 500, 1000), "linf", 0.1, 0.02, (0.0, 1.0), epochs=5, lr=1e-3,
                     batch_size=64, aa_points=200),
    "adult": Setting("adult", "mlp", (8000, 2000, 5000), "l2", 0.5, 0.125, None, epochs=5, lr=2e-3,
                     batch_size=256, aa_points=1000),
}


QUICK_SIZES = {"mnist": (600, 200, 200), "adult": (2000, 500, 500)}


def quick(setting: Setting) -> Setting:
    """Small sizes and short training for a smoke run."""
    return replace(setting, sizes=QUICK_SIZES[setting.data], epochs=2, aa_points=50)


# --------------------------------------------------------------------------- attacks
def threat_attack(setting: Setting, seed: int) -> attacks.PGD:
    """The threat model: PGD with 10 steps and a random start."""
    return attacks.PGD(setting.eps, alpha=setting.alpha, steps=10, norm=setting.norm, bounds=setting.bounds,
                       seed=seed)


def autoattack(setting: Setting, seed: int) -> Callable:
    """The AutoAttack evaluation of this setting (see the module docstring)."""
    norm = {"linf": "Linf", "l2": "L2"}[setting.norm]
    if setting.bounds is None:
        return attacks.UnitBoxView(lambda eps: attacks.Cascade(
            attacks.TorchAttacks("APGD", seed=seed, eps=eps, norm=norm, steps=50, loss="ce"),
            attacks.TorchAttacks("FAB", seed=seed, eps=eps, norm=norm, multi_targeted=True, n_classes=2)), setting.eps)
    return attacks.Cascade(attacks.TorchAttacks("APGD", seed=seed, eps=setting.eps, norm=norm, steps=50, loss="ce"),
                   attacks.TorchAttacks("APGDT", seed=seed, eps=setting.eps, norm=norm, steps=25, n_classes=10))


def evaluate_model(model: nn.Module, test: tuple, setting: Setting, seed: int) -> dict:
    """Clean and PGD accuracy on the whole test split, AutoAttack accuracy on its first ``aa_points``."""
    X, y = test[0], test[1]
    pgd = attacks.evaluate(model, (X, y), {"pgd": threat_attack(setting, seed)}, progress=False)
    k = min(setting.aa_points, len(X))
    aa = attacks.evaluate(model, (X[:k], y[:k]), {"aa": autoattack(setting, seed)}, batch_size=k, progress=False)
    return {"clean_acc": pgd["clean_acc"], "pgd_acc": pgd["pgd"]["robust_acc"], "aa_acc": aa["aa"]["robust_acc"]}


# --------------------------------------------------------------------------- training
def trainer_for(setting: Setting, kind: str):
    """The library's ERM (``plain``) or PGD-AT (``pgd-at``, ``at_steps`` PGD steps) with the setting's schedule."""
    return make_trainer(TRAINER_NAMES[kind], epochs=setting.epochs, lr=setting.lr, batch_size=setting.batch_size,
                        eps=setting.eps, norm=setting.norm, bounds=setting.bounds, train_steps=setting.at_steps,
                        progress=False)


def ensemble_prune(ctx: DefenceContext) -> nn.Module:
    """The ``influence`` recipe with the paper's ip-ensemble scores (:data:`ENSEMBLE_OPTIONS`)."""
    return get_recipe("influence").fn(replace(ctx, method="ip-ensemble", method_options=ENSEMBLE_OPTIONS,
                                              cache=ctx.cache.setdefault("ensemble", {})))


def finetune_all(ctx: DefenceContext) -> nn.Module:
    """The base model fine-tuned for :data:`FINETUNE_EPOCHS` more epochs on all the training data."""
    return fine_tuner(ctx.trainer).fit(ctx.model, take(ctx.train, slice(None)), seed=ctx.seed)


def finetune_ip_prune(ctx: DefenceContext) -> nn.Module:
    """The base model fine-tuned for :data:`FINETUNE_EPOCHS` more epochs without the top ``fraction`` by IP harm."""
    keep = prune(cached_influence_scores(ctx), ctx.fraction)
    return fine_tuner(ctx.trainer).fit(ctx.model, take(ctx.train, keep), seed=ctx.seed)


def fine_tuner(trainer):
    """A copy of ``trainer`` that continues from the given model for :data:`FINETUNE_EPOCHS` epochs."""
    tuner = copy.copy(trainer)
    tuner.retrain, tuner.epochs = "finetune", FINETUNE_EPOCHS
    return tuner


def cached_influence_scores(ctx: DefenceContext) -> torch.Tensor:
    """The IP harm scores of the seed (computed once, shared with ``ip-prune``)."""
    return cached_scores(ctx, "influence", influence_scores)


def per_class_prune(ctx: DefenceContext) -> nn.Module:
    """Remove the top ``fraction`` by IP harm within each class (the class shares of the training set
    stay as they are), retrain from scratch on the rest."""
    scores, y = cached_influence_scores(ctx), ctx.train[1]
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    for label in torch.unique(y):
        members = torch.nonzero(y == label).flatten()
        keep[members] = prune(scores[members], ctx.fraction)
    return ctx.trainer.fit(ctx.model, take(ctx.train, keep), seed=ctx.seed, val=ctx.val)


def iterative_prune(ctx: DefenceContext, rounds: int = ITERATIVE_ROUNDS) -> nn.Module:
    """Remove the budget in ``rounds`` equal steps: score the kept samples with the current model, drop
    the most harmful share, retrain from scratch, score again with the retrained model, and so on."""
    n = ctx.train[0].shape[0]
    kept = torch.arange(n)
    model = ctx.model
    total = budget_size(n, ctx.fraction)
    for r in range(rounds):
        k = total * (r + 1) // rounds - (n - kept.numel())
        step_ctx = replace(ctx, model=model, train=take(ctx.train, kept), cache={})
        scores = influence_scores(step_ctx).detach().cpu()
        kept = kept[torch.sort(scores, stable=True).indices[: kept.numel() - k].sort().values]
        model = ctx.trainer.fit(ctx.model, take(ctx.train, kept), seed=ctx.seed, val=ctx.val)
    return model


register_recipe("ensemble-prune", ensemble_prune,
                description="influence with the paper's ip-ensemble scores (experiments/defense_deep.py)")
register_recipe("iterative-prune", iterative_prune,
                description="the budget in two rounds, re-scored with the retrained model (experiments/defense_deep.py)")
register_recipe("per-class-prune", per_class_prune,
                description="the top harm within each class (experiments/defense_deep.py)")
register_recipe("finetune-all", finetune_all, uses_budget=False,
                description="fine-tune the base model on all the data (experiments/defense_deep.py)")
register_recipe("finetune-ip-prune", finetune_ip_prune,
                description="fine-tune the base model without the top harm (experiments/defense_deep.py)")
# Rows named after the library's recipes they run; every other row is the recipe of its own name.
LIBRARY_RECIPES = {"ip-prune": "influence", "misclassified-prune": "influence-misclassified"}


def seed_results(setting: Setting, kind: str, tag: str) -> SeedResults:
    """The per-seed result files of one (setting, trainer) in ``OUT / tag / "<data>-<trainer>"``."""
    return SeedResults(OUT / tag / f"{setting.data}-{kind}", {"setting": asdict(setting), "trainer": kind,
                                                             "fraction": FRACTION})


def run_seed(setting: Setting, kind: str, seed: int, results: SeedResults, progress: bool) -> dict:
    """All recipes of one (setting, trainer, seed); finished recipes are read back from ``results``."""
    splits = load_dataset(setting.data, seed=seed, n_train=setting.sizes[0], n_val=setting.sizes[1],
                          n_test=setting.sizes[2])
    fingerprint = data_hash(splits.train, splits.val, splits.test)
    done = results.load(seed, fingerprint) or {}
    if all(r in done for r in RECIPES):
        return done
    train, val, test = splits.train[:2], splits.val[:2], splits.test[:2]
    trainer = trainer_for(setting, kind)
    start = time.perf_counter()
    base = trainer.fit(build_model(setting.model, splits.input_shape, splits.num_classes, seed=seed), train,
                       seed=seed)
    base_seconds = time.perf_counter() - start
    attack = threat_attack(setting, seed)
    ctx = DefenceContext(model=base, train=train, val=val, trainer=trainer, attack=attack, seed=seed,
                         fraction=FRACTION, mode="prune", train_attack=trainer.training_attack(seed),
                         progress=False, cache={})
    for recipe in RECIPES:
        if recipe in done:
            continue
        start = time.perf_counter()
        model = get_recipe(LIBRARY_RECIPES.get(recipe, recipe)).fn(ctx)
        seconds = base_seconds if recipe == "none" else time.perf_counter() - start
        start = time.perf_counter()
        done[recipe] = {**evaluate_model(model, test, setting, seed), "train_s": seconds,
                        "eval_s": time.perf_counter() - start}
        results.save(seed, fingerprint, done)
        if progress:
            row = done[recipe]
            tqdm.write(f"{setting.data} {kind} seed {seed} {recipe:>10}: clean {row['clean_acc']:.3f} "
                       f"pgd {row['pgd_acc']:.3f} aa {row['aa_acc']:.3f} ({row['train_s']:.0f}+{row['eval_s']:.0f} s)")
    return done


# --------------------------------------------------------------------------- summary
def summarise(per_seed: dict) -> dict:
    """Mean +- std per recipe and paired differences (points) vs each baseline, with 95% t-intervals."""
    seeds = sorted(per_seed, key=int)
    out = {"seeds": [int(s) for s in seeds], "recipes": {}, "differences": {}}
    for recipe in RECIPES:
        out["recipes"][recipe] = {m: mean_std(per_seed[s][recipe][m] for s in seeds) for m in METRICS}
    pairs = [(r, b) for r in RECIPES for b in BASELINES if r != b] + list(EXTRA_PAIRS)
    for recipe, baseline in pairs:
        diffs = {}
        for m in METRICS:
            mean, (low, high) = paired_ci([100 * per_seed[s][recipe][m] for s in seeds],
                                          [100 * per_seed[s][baseline][m] for s in seeds])
            diffs[m] = {"mean": float(mean), "ci95": [float(low), float(high)]}
        out["differences"][f"{recipe} - {baseline}"] = diffs
    return out


def goal_met(summary: dict, recipe: str = "lookahead") -> dict:
    """The issue's goal for ``recipe``: >= 2 points robust (PGD and AA) over none AND random with the
    95% interval above zero, clean accuracy down by <= 1 point vs none."""
    checks = {}
    for baseline in ("none", "random"):
        for m in ("pgd_acc", "aa_acc"):
            d = summary["differences"][f"{recipe} - {baseline}"][m]
            checks[f"{m} vs {baseline}"] = bool(d["mean"] >= 2 and d["ci95"][0] > 0)
    checks["clean drop <= 1 vs none"] = bool(summary["differences"][f"{recipe} - none"]["clean_acc"]["mean"] >= -1)
    return {"all": all(checks.values()), "checks": checks}


def _pct(ms) -> str:
    return f"{100 * ms[0]:.1f} ± {100 * ms[1]:.1f}"


def _diff(d) -> str:
    return f"{d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]"


def render_block(title: str, summary: dict) -> str:
    """Markdown tables of one (setting, trainer): accuracies, then paired differences."""
    minutes = f", {summary['compute_s'] / 60:.0f} min of training + evaluation" if "compute_s" in summary else ""
    lines = [f"### {title} ({len(summary['seeds'])} seeds{minutes})", "",
             "| recipe | clean acc | PGD acc (adaptive) | AutoAttack acc (adaptive) |", "|---|---|---|---|"]
    for recipe in RECIPES:
        r = summary["recipes"][recipe]
        lines.append(f"| {recipe} | {_pct(r['clean_acc'])} | {_pct(r['pgd_acc'])} | {_pct(r['aa_acc'])} |")
    lines += ["", "Paired differences in points, mean [95% t-interval]:", "",
              "| recipe - baseline | clean | PGD | AutoAttack |", "|---|---|---|---|"]
    keys = [f"{r} - {b}" for r in RECIPES if r not in BASELINES for b in BASELINES]
    for key in keys + [f"{r} - {b}" for r, b in EXTRA_PAIRS]:
        d = summary["differences"][key]
        lines.append(f"| {key} | {_diff(d['clean_acc'])} | {_diff(d['pgd_acc'])} | {_diff(d['aa_acc'])} |")
    met = goal_met(summary)
    failed = [k for k, ok in met["checks"].items() if not ok]
    lines += ["", f"Goal for `lookahead`: {'MET' if met['all'] else 'not met (' + '; '.join(failed) + ')'}."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- option selection
CANDIDATES = {
    "plain": {
        "adversarial, positive, mix 0.25": dict(),
        "adversarial, positive, mix 0.25, per class": dict(per_class=True),
        "clean+adversarial, positive, mix 0.25": dict(val_objective="clean+adversarial"),
        "clean+adversarial, positive, mix 0.25, per class": dict(val_objective="clean+adversarial", per_class=True),
        "adversarial, positive, mix 0.1": dict(mix=0.1),
    },
    "pgd-at": {
        "adversarial, positive, mix 0.25": dict(),
        "clean+adversarial, positive, mix 0.25": dict(val_objective="clean+adversarial"),
        "adversarial, sign, per class": dict(scheme="sign", per_class=True),
        "clean+adversarial, sign, per class": dict(val_objective="clean+adversarial", scheme="sign", per_class=True),
        "adversarial, positive, mix 0.1": dict(mix=0.1),
    },
}
REFERENCE = {"plain": "plain training (no reweighting)", "pgd-at": "pgd-at (no reweighting)"}
RECIPE_OPTIONS = {"plain": PLAIN_TRAINING_OPTIONS, "pgd-at": ADVERSARIAL_TRAINING_OPTIONS}
SELECT_SEEDS = (100, 101)
MAX_CLEAN_DROP = 1.0  # points; the bound on the clean-accuracy cost


def select_options(settings: list, kind: str, progress: bool) -> dict:
    """The trainer ``kind`` without and with each candidate lookahead variant, on seeds not used by the main run.

    The lookahead sees the first half of the validation split; clean and PGD accuracy are measured on
    the second half (no test data is read).
    """
    results = {}
    for setting in settings:
        for seed in SELECT_SEEDS:
            splits = load_dataset(setting.data, seed=seed, n_train=setting.sizes[0], n_val=setting.sizes[1],
                                  n_test=setting.sizes[2])
            half = setting.sizes[1] // 2
            val_used = tuple(t[:half] for t in splits.val[:2])
            val_held = tuple(t[half:] for t in splits.val[:2])
            trainer = trainer_for(setting, kind)
            fresh = build_model(setting.model, splits.input_shape, splits.num_classes, seed=seed)
            attack = threat_attack(setting, seed)
            models = {REFERENCE[kind]: trainer.fit(fresh, splits.train[:2], seed=seed)}
            for name, options in CANDIDATES[kind].items():
                models[name] = LookaheadReweighting(trainer, attack=validation_attack(attack), val=val_used,
                                                    **options).fit(fresh, splits.train[:2], seed=seed)
            for name, model in models.items():
                r = attacks.evaluate(model, val_held, {"pgd": attack}, progress=False)
                row = {"clean_acc": r["clean_acc"], "pgd_acc": r["pgd"]["robust_acc"]}
                results.setdefault(setting.data, {}).setdefault(name, {})[str(seed)] = row
                if progress:
                    tqdm.write(f"select {kind} {setting.data} seed {seed} {name}: clean {row['clean_acc']:.3f} "
                               f"pgd {row['pgd_acc']:.3f}")
    return results


def selected_variant(selection: dict, kind: str) -> tuple[str, dict]:
    """The rule: among the variants whose mean clean accuracy on the held-out validation half is at most
    :data:`MAX_CLEAN_DROP` points below the reference on every data set, the one with the highest PGD gain
    averaged over the data sets (all variants if none qualifies). Returns its name and the per-variant
    mean (PGD gain, clean change) per data set."""
    changes: dict = {}
    for data, variants in selection.items():
        reference = variants[REFERENCE[kind]]
        for name in CANDIDATES[kind]:
            seeds = sorted(variants[name])
            pgd = mean_std(100 * (variants[name][s]["pgd_acc"] - reference[s]["pgd_acc"]) for s in seeds)[0]
            clean = mean_std(100 * (variants[name][s]["clean_acc"] - reference[s]["clean_acc"]) for s in seeds)[0]
            changes.setdefault(name, {})[data] = (pgd, clean)
    qualified = [n for n, per_data in changes.items() if all(c >= -MAX_CLEAN_DROP for _, c in per_data.values())]
    pool = qualified or list(changes)
    best = max(pool, key=lambda n: sum(p for p, _ in changes[n].values()) / len(changes[n]))
    return best, changes


def render_selection(selection: dict, kind: str) -> str:
    """Markdown table of the option selection for ``kind`` (held-out validation half, paired vs no reweighting)."""
    label = "plain training" if kind == "plain" else "PGD-AT"
    lines = [f"### Lookahead options on top of {label} (selection on held-out validation, seeds "
             f"{', '.join(map(str, SELECT_SEEDS))})", "",
             "| data | variant | clean acc | PGD acc | PGD - reference | clean - reference |", "|---|---|---|---|---|---|"]
    best, changes = selected_variant(selection, kind)
    for data, variants in selection.items():
        for name in (REFERENCE[kind], *CANDIDATES[kind]):
            rows = variants[name]
            seeds = sorted(rows)
            clean = mean_std(rows[s]["clean_acc"] for s in seeds)
            pgd = mean_std(rows[s]["pgd_acc"] for s in seeds)
            dp, dc = changes[name][data] if name in changes else (0.0, 0.0)
            lines.append(f"| {data} | {name} | {_pct(clean)} | {_pct(pgd)} | {dp:+.1f} | {dc:+.1f} |")
    used = next(name for name, options in CANDIDATES[kind].items() if options == RECIPE_OPTIONS[kind])
    mean_gain = sum(p for p, _ in changes[best].values()) / len(changes[best])
    lines += ["", f"Rule: among the variants that cost at most {MAX_CLEAN_DROP:g} point of clean accuracy on every "
              f"data set, the highest PGD - reference averaged over the data sets: **{best}** ({mean_gain:+.2f} "
              f"points). The `lookahead` recipe uses on {label}: **{used}**."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main
def main() -> None:
    """Run (or resume) the experiment, print the tables and write JSON and the RESULTS.md section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (2 seeds); writes no RESULTS.md")
    parser.add_argument("--select", action="store_true",
                        help="run only the selection of the lookahead options (for --trainers)")
    parser.add_argument("--seeds", type=int, default=5, help="number of seeds 0..N-1 (default: %(default)s)")
    parser.add_argument("--data", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--no-progress", action="store_true", help="hide progress output")
    args = parser.parse_args()
    progress = not args.no_progress
    settings = [quick(SETTINGS[d]) if args.quick else SETTINGS[d] for d in args.data]
    tag = "defense_deep_quick" if args.quick else "defense_deep"

    if args.select:
        selection_file = OUT / f"{tag}_selection.json"
        selection = json.loads(selection_file.read_text()) if selection_file.exists() else {}
        for kind in args.trainers:
            # rerunning one data set or trainer keeps the others
            selection.setdefault(kind, {}).update(select_options(settings, kind, progress))
            write_json(selection_file, selection)
            print(render_selection(selection[kind], kind))
        return

    seeds = list(range(2 if args.quick else args.seeds))
    start = time.perf_counter()
    report = {"config": {"settings": {s.data: asdict(s) for s in settings}, "seeds": seeds, "fraction": FRACTION,
                         "recipes": list(RECIPES), "trainers": args.trainers}, "results": {}}
    jobs = [(s, k, seed) for s in settings for k in args.trainers for seed in seeds]
    per_seed: dict = {}
    for setting, kind, seed in tqdm(jobs, desc="defense_deep", disable=not progress):
        per_seed.setdefault((setting.data, kind), {})[str(seed)] = run_seed(setting, kind, seed,
                                                                            seed_results(setting, kind, tag), progress)
    blocks, summaries = [], {}
    for (data, kind), rows in per_seed.items():
        summary = summarise(rows)
        summary["goal"] = goal_met(summary)
        summary["compute_s"] = sum(r["train_s"] + r["eval_s"] for seed_rows in rows.values() for r in seed_rows.values())
        summaries[(data, kind)] = summary
        report["results"][f"{data}/{kind}"] = {"summary": summary, "per_seed": rows}
        blocks.append(render_block(f"{data}, {_trainer_label(kind)}", summary))
    report["seconds"] = time.perf_counter() - start
    write_json(OUT / f"{tag}.json", report)
    tables = "\n\n".join(blocks)
    print(tables)
    full_run = set(args.data) == set(SETTINGS) and set(args.trainers) == set(TRAINERS) and args.seeds >= 5
    if full_run and not args.quick:
        selection_file = OUT / f"{tag}_selection.json"
        selections = json.loads(selection_file.read_text()) if selection_file.exists() else {}
        selection = "\n\n".join(render_selection(selections[k], k) for k in TRAINERS if k in selections)
        write_section("defense_deep", _section(tables, selection, render_directions(summaries)))


def _trainer_label(kind: str) -> str:
    return "plain training" if kind == "plain" else f"PGD-AT ({SETTINGS['mnist'].at_steps} PGD steps)"


def render_directions(summaries: dict) -> str:
    """How close each direction came to the goal, from the summaries (points, paired, 95% intervals)."""
    lines = ["### Verdict", ""]
    for (data, kind), summary in summaries.items():
        failed = [k for k, ok in summary["goal"]["checks"].items() if not ok]
        others = [f"`{r}`" for r in SCORED_RECIPES if goal_met(summary, r)["all"]]
        lines.append(f"- {data}, {_trainer_label(kind)}: goal for `lookahead` "
                     + ("**met**" if not failed else f"not met ({'; '.join(failed)})")
                     + (f"; the goal criteria are met by {', '.join(others)} (exploratory, see below)" if others else ""))
    total = sum(summary["compute_s"] for summary in summaries.values())
    lines += ["", f"Compute: {total / 60:.0f} min of training + evaluation in all (sum over models, 1 thread each).",
              "", "### How close each direction came", ""]
    for (data, kind), summary in summaries.items():
        for recipe in ("lookahead", *SCORED_RECIPES):
            d = summary["differences"]
            parts = [f"PGD {_diff(d[f'{recipe} - {b}']['pgd_acc'])} / AutoAttack {_diff(d[f'{recipe} - {b}']['aa_acc'])}"
                     f" vs {b}" for b in BASELINES]
            clean = d[f"{recipe} - none"]["clean_acc"]["mean"]
            verdict = " — goal criteria **met**" if goal_met(summary, recipe)["all"] else ""
            lines.append(f"- {data}, {_trainer_label(kind)}, `{recipe}`: {'; '.join(parts)}; clean {clean:+.1f} vs "
                         f"none{verdict}.")
        for recipe, baseline in EXTRA_PAIRS:
            pair = summary["differences"][f"{recipe} - {baseline}"]
            lines.append(f"- {data}, {_trainer_label(kind)}, `{recipe}` vs `{baseline}`: PGD {_diff(pair['pgd_acc'])} / "
                         f"AutoAttack {_diff(pair['aa_acc'])}; clean {pair['clean_acc']['mean']:+.1f}.")
    lines += [
        "- Lookahead options on top of PGD-AT (clean+adversarial validation objective, sign weights, per-class "
        "normalisation, smaller mix): see the selection table; none beat plain PGD-AT on held-out validation.",
        "- Lookahead options on top of plain training, chosen on held-out validation before the test run under a "
        "clean-cost bound of 1 point (clean+adversarial validation objective, per-class normalisation, mix 0.1): "
        "see the selection table; the rule kept the default (adversarial objective, mix 0.25). Mix 0.1 cost no "
        "clean accuracy on Adult's validation half but gained only half as much robustness there.",
        "- Fine-tuning instead of retraining (`finetune-ip-prune`: the base model trained "
        f"{FINETUNE_EPOCHS} more epochs on the data without the top 5% by IP harm, against `finetune-all`, the "
        "same on all the data): see the `finetune-ip-prune - finetune-all` rows of the tables above.",
        "- The pruning directions (`ensemble-prune`, `misclassified-prune`, `iterative-prune`, `per-class-prune`) "
        "were all measured on the test split side by side, so a cell that meets the goal criteria among them is "
        "an exploratory finding (several comparisons, no selection on validation), not a confirmed recipe.",
    ]
    return "\n".join(lines)


def _section(tables: str, selection: str, directions: str) -> str:
    return "\n\n".join(part for part in (
        "## defense_deep: influence-guided defence on deep models (experiments/defense_deep.py)",
        f"Regenerate: `{REGENERATE}` (selection of the lookahead options: add `--select`). Accuracies in %, "
        "adaptive (each attack re-run on the defended model); PGD on the whole test split, AutoAttack on "
        "its first 200 (MNIST) / 1,000 (Adult) points (see the script's docstring for the AutoAttack "
        "variant). Budget of `random` and the `*-prune` recipes: 5% of the training set (`misclassified-prune` removes "
        "fewer when fewer are misclassified). `lookahead` is "
        "`robust-infl defend --recipes lookahead` (`defenses.LookaheadReweighting`).",
        directions, tables, selection) if part)


if __name__ == "__main__":
    main()
