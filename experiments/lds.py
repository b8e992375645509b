"""Linear datamodeling score: does the Hessian-free claim hold on a deep model?

The LDS (Park et al. 2023, "TRAK"; used by dattri and Kronfluence) asks how well a method's scores,
summed over a training subset, predict the objective of a model RETRAINED on that subset.
Set-up: MNIST (3,500 training images, 500 validation images), the reference SmallCNN, ERM with
Adam (5 epochs, lr 1e-3, batch 64). M random 50% subsets of the training set are drawn with the
seed; the full model and every subset model are trained from the SAME initialisation with the same
schedule (the trainer re-initialises under the seed; the data order is seeded too). On each
retrained model the objectives are measured on the validation images:

- Utility: the mean cross-entropy on the clean validation images;
- Robust(PGD): the mean cross-entropy at PGD (linf 0.1, 10 steps, alpha 0.02) points computed
  against THAT retrained model (the attack is re-run, not transferred).

Every method scores the full model once per objective (for Robust, the PGD points of the full
model are computed once and held fixed, as the objective prescribes).

Sign. ``harm_i > 0`` predicts that REMOVING sample i DECREASES the objective; to first order
``f(S) ~= f(full) - sum_{i not in S} harm_i`` (up to a positive factor). Because the total harm
is a constant, the objective of the model trained on S correlates NEGATIVELY with the summed harm
of the samples left OUT, i.e. POSITIVELY with the summed harm of the samples KEPT. So here

    LDS = Spearman over the M subsets of ( sum_{i in S} harm_i ,  f(model trained on S) )

taken on the aggregate objective; a good method has LDS near +1, ``random`` near 0.

Control: the same measurement (data, subsets, schedule, objectives) on a convex model, multinomial
logistic regression, with ip, tracin, self, loss and random: if first-order scores predict
retraining there, the measurement and its sign are sound and what the CNN shows is the CNN's.

Methods (the same model and data for all; time per scoring call reported): ``ip``,
``ip-ensemble`` with the paper's setting (6 members, dropout rates U(0, 0.01)) and a stronger
perturbation (U(0, 0.2)), ``tracin`` over the 5 end-of-epoch checkpoints (lr 1e-3), ``if-lissa``
(damping 0.01, 100 steps on minibatches of 256; its scale, 1.5 times a 10-step power-iteration
estimate of the largest eigenvalue of the damped Hessian, is computed once per model and shared
by both objectives, its cost counted in the first), ``datainf``, ``ekfac`` and
``kfac`` (Kronfluence's defaults: true Fisher, damping 1e-8), ``self``, ``loss``, ``random``.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.lds            # full run
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.lds --quick    # smoke run

Per-seed results are checkpointed under ``experiments/out/lds/`` (a rerun skips finished seeds;
``--seeds 1 2`` runs only those, e.g. in parallel processes, and writes nothing else);
the full run writes ``experiments/out/lds.json``, ``experiments/plots/lds.png`` and the ``lds``
section of ``experiments/RESULTS.md`` (the figures are there, not here).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

import attacks
import robust_infl as ri
from attacks.plumbing import make_generator
from defenses import CheckpointingERM, ERM
from defenses.data import take
from defenses.seed_results import SeedResults
from defenses.trainers import copy_for_training
from experiments._results import (cached, experiment_arguments, format_delta, mean_std, save_figure, write_json,
                                  write_section)
from robust_infl.datasets import load_dataset
from robust_infl.methods.iterative import largest_eigenvalue
from robust_infl.models import build_model
from robust_infl.options import ScoringOptions
from robust_infl.preparation import prepared_problem

__all__ = ["Config", "FULL", "QUICK", "METHODS", "CONTROL_METHODS", "MODELS", "OBJECTIVES", "subset_masks", "lds",
           "run_seed", "main"]

OUT = Path(__file__).resolve().parent / "out"
COMMAND = "OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.lds"
OBJECTIVES = ("utility", "robust")
METHODS = ("ip", "ip-ensemble", "ip-ensemble-strong", "tracin", "if-lissa", "datainf", "ekfac", "kfac", "self",
           "loss", "random")
OBJECTIVE_FREE = ("self", "loss", "random")
# The control: the same measurement on a convex model (multinomial logistic regression, same data and schedule).
CONTROL_METHODS = ("ip", "tracin", "self", "loss", "random")
MODELS = {"cnn": METHODS, "logreg": CONTROL_METHODS}
NOISE_SUBSETS = 25
"""Subsets retrained a second time (same initialisation, another data order) to measure the retraining noise."""


@dataclass(frozen=True)
class Config:
    """Everything that defines one run."""

    n_train: int = 3500
    n_val: int = 500
    n_subsets: int = 50
    seeds: tuple = (0, 1, 2)
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    eps: float = 0.1
    alpha: float = 0.02
    pgd_steps: int = 10
    ensemble_members: int = 6
    strong_scale: float = 0.2
    lissa_damping: float = 0.01
    lissa_depth: int = 100
    lissa_batch: int = 256
    lissa_power_steps: int = 10
    scoring_batch: int = 500


FULL = Config()
QUICK = replace(FULL, n_train=200, n_val=64, n_subsets=8, seeds=(0,), epochs=2, ensemble_members=3, lissa_depth=10,
                lissa_batch=64, lissa_power_steps=3, scoring_batch=200)


def lissa_scale(model: nn.Module, train: tuple, val: tuple, cfg: Config, seed: int) -> float:
    """1.5 times the power-iteration estimate of the largest eigenvalue of the damped training-loss Hessian
    (what ``if-lissa`` computes with ``scale=None``, once per model instead of once per objective)."""
    options = ScoringOptions(batch_size=cfg.scoring_batch, seed=seed, progress=False, damping=cfg.lissa_damping)
    with prepared_problem(model, train, val, ri.Utility(), options) as prepared:
        return 1.5 * largest_eigenvalue(prepared.problem, iterations=cfg.lissa_power_steps)


def method_call(method: str, cfg: Config, checkpoints: list, scale: float) -> tuple:
    """``(registered method name, options)`` of each method of this experiment."""
    if method == "ip-ensemble":
        return "ip-ensemble", {"members": cfg.ensemble_members, "perturbation": "dropout", "scale": 0.01}
    if method == "ip-ensemble-strong":
        return "ip-ensemble", {"members": cfg.ensemble_members, "perturbation": "dropout", "scale": cfg.strong_scale}
    if method == "tracin":
        return "tracin", {"checkpoints": checkpoints, "lrs": cfg.lr}
    if method == "if-lissa":
        return "if-lissa", {"damping": cfg.lissa_damping, "depth": cfg.lissa_depth, "hvp_batch_size": cfg.lissa_batch,
                            "scale": scale}
    return method, {}


def subset_masks(n: int, m: int, seed: int) -> torch.Tensor:
    """``(m, n)`` boolean masks, each keeping a seeded random half (``n // 2``) of the ``n`` samples."""
    generator = make_generator(10_000 + seed)
    masks = torch.zeros(m, n, dtype=torch.bool)
    for row in range(m):
        masks[row, torch.randperm(n, generator=generator)[: n // 2]] = True
    return masks


def lds(scores: torch.Tensor, masks: torch.Tensor, measured: np.ndarray) -> float:
    """Spearman correlation across subsets between the summed scores of the KEPT samples and the
    measured objective of the model trained on them (see the module docstring for the sign)."""
    predicted = (masks.double() @ scores.double()).numpy()
    return float(stats.spearmanr(predicted, measured).statistic)


def measure(model: nn.Module, val: tuple, pgd: attacks.PGD) -> dict:
    """Utility (clean mean loss) and Robust (mean loss at PGD points against THIS model) on ``val``."""
    x, y = val
    x_adv = pgd(model, x, y)
    with torch.no_grad():
        clean = torch.nn.functional.cross_entropy(model(x), y).item()
        robust = torch.nn.functional.cross_entropy(model(x_adv), y).item()
    return {"utility": clean, "robust": robust}


def run_seed(seed: int, cfg: Config, progress: bool = False, model_name: str = "cnn") -> dict:
    """Train model ``model_name`` (``"cnn"``, or the ``"logreg"`` control), score with its methods
    (:data:`MODELS`), retrain on the subsets, and compute every method's LDS."""
    methods = MODELS[model_name]
    splits = load_dataset("mnist", seed=seed, n_train=cfg.n_train, n_val=cfg.n_val, n_test=10)
    train, val = splits.train[:2], splits.val[:2]
    init = build_model(model_name, splits.input_shape, splits.num_classes, seed=seed)
    trainer = CheckpointingERM(n_checkpoints=cfg.epochs, epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
                               progress=False)
    started = time.perf_counter()
    model = trainer.fit(init, train, seed=seed)
    full_seconds = time.perf_counter() - started
    checkpoints = list(trainer.checkpoints)
    pgd = attacks.PGD(cfg.eps, alpha=cfg.alpha, steps=cfg.pgd_steps, norm="linf", bounds=(0.0, 1.0), seed=seed)
    objectives = {"utility": ri.Utility(), "robust": ri.Robust(pgd)}

    scores: dict = {}
    seconds: dict = {}
    began = time.perf_counter()
    scale = lissa_scale(model, train, val, cfg, seed) if "if-lissa" in methods else None
    scale_seconds = time.perf_counter() - began
    for method in tqdm(methods, desc=f"{model_name} seed {seed} scoring", disable=not progress, leave=False):
        name, options = method_call(method, cfg, checkpoints, scale)
        for objective in OBJECTIVES:
            if method in OBJECTIVE_FREE and objective != OBJECTIVES[0]:
                scores[method][objective], seconds[method][objective] = scores[method][OBJECTIVES[0]], 0.0
                continue
            began = time.perf_counter()
            try:
                harm = ri.influence(model, train, val, objective=objectives[objective], method=name, seed=seed,
                                    batch_size=cfg.scoring_batch, progress=False, **options).cpu()
            except ValueError as err:  # e.g. LiSSA diverging: recorded, not hidden
                harm, error = None, str(err)
            shared = scale_seconds if method == "if-lissa" and objective == OBJECTIVES[0] else 0.0
            seconds.setdefault(method, {})[objective] = time.perf_counter() - began + shared
            scores.setdefault(method, {})[objective] = harm if harm is not None else error

    masks = subset_masks(cfg.n_train, cfg.n_subsets, seed)
    measured = {objective: [] for objective in OBJECTIVES}
    retrain_seconds = []
    for row in tqdm(range(cfg.n_subsets), desc=f"{model_name} seed {seed} retraining", disable=not progress, leave=False):
        began = time.perf_counter()
        retrained = trainer.fit(init, take(train, masks[row]), seed=seed)
        retrain_seconds.append(time.perf_counter() - began)
        for objective, value in measure(retrained, val, pgd).items():
            measured[objective].append(value)

    result = {"seed": seed, "model": model_name, "full_model": measure(model, val, pgd), "full_train_seconds": full_seconds,
              "retrain_seconds": retrain_seconds, "measured": measured, "lds": {}, "predicted": {},
              "seconds": seconds, "errors": {}, "lissa_scale": scale}
    for method in methods:
        for objective in OBJECTIVES:
            harm = scores[method][objective]
            if isinstance(harm, str):
                result["errors"].setdefault(method, {})[objective] = harm
                continue
            result["lds"].setdefault(method, {})[objective] = lds(harm, masks, np.asarray(measured[objective]))
            result["predicted"].setdefault(method, {})[objective] = (masks.double() @ harm.double()).tolist()
    return result


def retraining_noise(seed: int, cfg: Config, measured: dict, progress: bool = False) -> dict:
    """How much of the measured objective the subset determines at all: the first subsets retrained again from
    the SAME initialisation with ANOTHER data order (seed + 1000), and the Spearman correlation, across those
    subsets, of the two runs' objectives (``measured``: the first run's). No score can predict one retraining
    better than another retraining of the same subset does."""
    splits = load_dataset("mnist", seed=seed, n_train=cfg.n_train, n_val=cfg.n_val, n_test=10)
    train, val = splits.train[:2], splits.val[:2]
    start = copy_for_training(build_model("cnn", splits.input_shape, splits.num_classes, seed=seed), "scratch", seed)
    trainer = ERM(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, retrain="finetune", progress=False)
    pgd = attacks.PGD(cfg.eps, alpha=cfg.alpha, steps=cfg.pgd_steps, norm="linf", bounds=(0.0, 1.0), seed=seed)
    k = min(NOISE_SUBSETS, cfg.n_subsets)
    masks = subset_masks(cfg.n_train, cfg.n_subsets, seed)[:k]
    again = {objective: [] for objective in OBJECTIVES}
    for row in tqdm(range(k), desc=f"seed {seed} retraining noise", disable=not progress, leave=False):
        for objective, value in measure(trainer.fit(start, take(train, masks[row]), seed=seed + 1000), val, pgd).items():
            again[objective].append(value)
    return {"seed": seed, "subsets": k, "again": again,
            "spearman": {o: float(stats.spearmanr(measured[o][:k], again[o]).statistic) for o in OBJECTIVES}}


def cached_noise(seed: int, cfg: Config, folder: Optional[Path], progress: bool) -> dict:
    """:func:`retraining_noise` of the seed's CNN run, kept in ``folder / "noise"`` like :func:`cached_seed`."""
    results = None if folder is None else SeedResults(folder / "noise", {**asdict(cfg), "seeds": None,
                                                                         "noise_subsets": NOISE_SUBSETS})
    return cached(results, seed, lambda: retraining_noise(seed, cfg, cached_seed(seed, cfg, folder, progress)["measured"],
                                                         progress))[0]


def cached_seed(seed: int, cfg: Config, folder: Optional[Path], progress: bool, model_name: str = "cnn") -> dict:
    """:func:`run_seed`, kept in ``folder / model_name`` (the per-seed files of
    :class:`defenses.seed_results.SeedResults`) with the configuration; a rerun with the same one reads it back,
    one with another configuration is refused."""
    settings = {**asdict(cfg), "seeds": None, **({} if model_name == "cnn" else {"model": model_name})}
    results = None if folder is None else SeedResults(folder / model_name, settings)
    return cached(results, seed, lambda: run_seed(seed, cfg, progress, model_name))[0]


def summarise(per_seed: list, methods: tuple = METHODS) -> dict:
    """Mean, std and per-seed LDS of every method and objective, and its mean scoring time."""
    summary = {}
    for method in methods:
        for objective in OBJECTIVES:
            values = [r["lds"][method][objective] for r in per_seed if objective in r["lds"].get(method, {})]
            times = [r["seconds"][method][objective] for r in per_seed]
            entry = {"values": values, "seconds": mean_std(times)[0], "failed": len(per_seed) - len(values)}
            if values:
                entry["mean"], entry["std"] = mean_std(values)
            summary.setdefault(method, {})[objective] = entry
    return summary


def table(summary: dict, per_seed: list, cfg: Config, methods: tuple = METHODS) -> list:
    """Markdown lines: LDS per method and objective (mean ± std over seeds), time, paired differences to ip."""
    def cell(entry: dict) -> str:
        if "mean" not in entry:
            return "failed"
        failed = f" ({entry['failed']} failed)" if entry["failed"] else ""
        return f"{entry['mean']:+.3f} ± {entry['std']:.3f}{failed}"

    def delta(method: str, objective: str) -> str:
        pairs = [(r["lds"][method][objective], r["lds"]["ip"][objective]) for r in per_seed
                 if objective in r["lds"].get(method, {}) and objective in r["lds"].get("ip", {})]
        if method == "ip" or len(pairs) < 2:
            return "-"
        return format_delta([a for a, _ in pairs], [b for _, b in pairs], scale=1.0, digits=3)

    lines = ["| method | LDS utility | LDS robust (PGD) | LDS - ip, utility [95% CI] | LDS - ip, robust [95% CI] | "
             "scoring time per objective (s) |", "|---|---|---|---|---|---|"]
    for method in methods:
        u, r = summary[method]["utility"], summary[method]["robust"]
        seconds = u["seconds"] if method in OBJECTIVE_FREE else (u["seconds"] + r["seconds"]) / 2
        lines.append(f"| {method} | {cell(u)} | {cell(r)} | {delta(method, 'utility')} | {delta(method, 'robust')} | "
                     f"{seconds:.1f} |")
    retrain = [s for r in per_seed for s in r["retrain_seconds"]]
    full = [r["full_train_seconds"] for r in per_seed]
    scoring = sum(t for r in per_seed for times in r["seconds"].values() for t in times.values()) / len(per_seed)
    lines += ["", f"Retraining cost: {mean_std(retrain)[0]:.1f} s per subset model (training only; the PGD "
              f"measurement comes on top), {cfg.n_subsets} subsets per seed = {sum(retrain) / len(per_seed) / 60:.1f} "
              f"min per seed; the full model trains in {mean_std(full)[0]:.1f} s. Scoring with all {len(methods)} "
              f"methods and both objectives: {scoring / 60:.1f} min per seed."]
    return lines


def plot(summaries: dict, path: Path) -> None:
    """Bar charts of the mean LDS (± std over seeds) of every method, one bar per objective, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"cnn": "SmallCNN", "logreg": "logistic regression (control)"}
    fig, axes = plt.subplots(1, len(summaries), figsize=(13, 4), width_ratios=[len(s) for s in summaries.values()],
                             squeeze=False)
    for ax, (model_name, summary) in zip(axes[0], summaries.items()):
        methods = list(summary)
        positions = np.arange(len(methods))
        for offset, objective in zip((-0.2, 0.2), OBJECTIVES):
            means = [summary[m][objective].get("mean", np.nan) for m in methods]
            stds = [summary[m][objective].get("std", 0.0) for m in methods]
            ax.bar(positions + offset, means, width=0.4, yerr=stds, label=objective, capsize=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(positions, methods, rotation=30, ha="right")
        ax.set_ylabel("LDS (Spearman)")
        ax.set_title(f"LDS on MNIST, {titles[model_name]}")
        ax.legend()
    save_figure(fig, path)


def main(argv: Optional[list] = None) -> dict:
    """Run every seed, print the table, write the JSON, the plot and (full run) the RESULTS.md section."""
    seeds_parser = argparse.ArgumentParser(add_help=False)
    seeds_parser.add_argument("--seeds", type=int, nargs="+", default=None,
                              help="run only these seeds (e.g. in parallel processes); writes no RESULTS.md section")
    seeds_parser.add_argument("--parts", nargs="+", choices=(*MODELS, "noise"), default=None,
                              help="with --seeds: run only these parts (the models' LDS, the retraining noise)")
    only, rest = seeds_parser.parse_known_args(argv)
    args = experiment_arguments(__doc__, "lds", rest)
    cfg = QUICK if args.quick else FULL
    folder = None if args.quick else OUT / "lds"
    seeds = cfg.seeds if only.seeds is None else tuple(only.seeds)
    parts = (*MODELS, "noise") if only.seeds is None or only.parts is None else tuple(only.parts)
    models = tuple(name for name in parts if name in MODELS)
    runs = {name: [cached_seed(seed, cfg, folder, not args.no_progress, name) for seed in seeds] for name in models}
    noise = [cached_noise(seed, cfg, folder, not args.no_progress) for seed in seeds] if "noise" in parts else []
    summaries = {name: summarise(runs[name], MODELS[name]) for name in models}
    lines = {name: table(summaries[name], runs[name], cfg, MODELS[name]) for name in models}
    for name in models:
        print(f"{name}:\n" + "\n".join(lines[name]))
    noise_line = ("Retraining noise: the first {k} subsets of each seed retrained again from the same initialisation "
                  "with another data order; Spearman between the two runs' objectives: utility {u}, robust {r} "
                  "(per seed). With the two runs = the subset's effect + independent noise, a score that predicted the "
                  "subset's expected objective perfectly would reach about the square root of this against one "
                  "retraining; the scores above reach about 0.")
    if noise:
        noise_line = noise_line.format(k=noise[0]["subsets"], u=", ".join(f"{n['spearman']['utility']:+.2f}" for n in noise),
                                       r=", ".join(f"{n['spearman']['robust']:+.2f}" for n in noise))
        print(noise_line)
    if only.seeds is not None:
        return {"summary": summaries, "per_seed": runs, "noise": noise}
    summary, per_seed, control = summaries["cnn"], runs["cnn"], runs["logreg"]
    write_json(args.out, {"config": asdict(cfg), "per_seed": per_seed, "summary": summary, "control_per_seed": control,
                          "control_summary": summaries["logreg"], "noise": noise})
    plot(summaries, args.plots / f"{args.name}.png")
    if not args.quick:
        header = [
            "## Linear datamodeling score on a deep model (experiments/lds.py)",
            "",
            f"MNIST, {cfg.n_train:,} training / {cfg.n_val} validation images, SmallCNN, ERM (Adam, {cfg.epochs} epochs, "
            f"lr {cfg.lr}, batch {cfg.batch_size}); {cfg.n_subsets} random 50% subsets per seed, each retrained from the "
            f"same initialisation with the same schedule; {len(cfg.seeds)} seeds (mean ± std over seeds, paired 95% "
            "t-intervals of the difference to ip). LDS = Spearman over subsets between the summed harm of the KEPT "
            "samples and the objective of the retrained model (positive = the scores predict retraining; random ~ 0). "
            f"Objectives on the validation images: mean loss (utility) and mean loss at PGD points (linf {cfg.eps}, "
            f"{cfg.pgd_steps} steps) re-computed against every retrained model (robust). Options: ip-ensemble 6 "
            f"dropout members with rates U(0, 0.01) (paper) or U(0, {cfg.strong_scale}) (strong); tracin over the "
            f"{cfg.epochs} end-of-epoch checkpoints; if-lissa damping {cfg.lissa_damping}, {cfg.lissa_depth} steps "
            f"on minibatches of {cfg.lissa_batch}, scale 1.5 x a {cfg.lissa_power_steps}-step power-iteration "
            "estimate of the top eigenvalue (once per model, its time counted in the utility call); ekfac / kfac "
            "through Kronfluence 1.0.1 with its defaults (true Fisher, damping 1e-8). Shared 2-core machine, one "
            "thread per process, seeds run in parallel processes.",
            "",
            "### SmallCNN",
            "",
        ]
        control = ["", "### Control: the same measurement on a convex model", "",
                   "Multinomial logistic regression on the same images, subsets, schedule and objectives (the "
                   "measurement itself is sound if the first-order scores predict retraining here).", ""]
        write_section("lds", "\n".join(header + lines["cnn"] + ["", noise_line] + control + lines["logreg"]
                                       + ["", f"Regenerate: `{COMMAND}` (seeds in parallel: one `{COMMAND} --seeds N` "
                                              "process per seed first; the plain command then reads their results)"]))
    return {"summary": summary, "per_seed": per_seed}


if __name__ == "__main__":
    main()
