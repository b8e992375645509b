"""Linear datamodeling score: does the Hessian-free claim hold on a deep model?

The LDS (Park et al. 2023, "TRAK"; used by dattri and Kronfluence) asks how well a method's scores,
summed over a training subset, predict the objective of a model RETRAINED on that subset. Two
protocols, both here:

- AGGREGATE (the default, ``--protocol aggregate``; the ``lds`` section of RESULTS.md): one Spearman
  correlation over the subsets between the summed harm and the MEAN validation objective. Not the
  field's measure: the mean objective varies little between half-subsets beside retraining noise.
- PER-EXAMPLE (``--protocol per-example``; the ``lds-per-example`` section and
  ``defenses/lds_reference.json``): the field's (dattri, TRAK), described at the end of this docstring.

Aggregate protocol. Set-up: MNIST (3,500 training images, 500 validation images), the reference SmallCNN, ERM with
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

Per-example protocol (``--protocol per-example``). For each target image j (test images), the
Spearman correlation over M random alpha-subsets S of the training set between
``sum_{i in S} harm_ij`` (``harm_ij``: the method's harm on target j's own loss) and the output on j of
the model retrained on S, averaged over the targets. Outputs: the loss on j (utility), and the loss at
j's PGD point re-computed against each retrained model (robust); the scores take the targets at the
PGD points of the scored model, held fixed (the per-target form of ``Robust``). Sign: by the paragraph
above, kept harm correlates POSITIVELY with the loss, so a good method is near +1 and ``random`` near
0. Every subset is retrained ``--runs`` times (default 2), each from its own seeded initialisation
(``--init fresh``, the field's) or all from the seed's one initialisation with other data orders
(``--init same``); the ground truth is the mean over the retrainings (dattri's), and the per-target
Spearman between the two retrainings is printed as the retraining-noise ceiling. Options: ``--setup``
(``logreg`` and ``mlp``: dattri's MNIST benchmarks, 5,000 training / 500 test images, 100 subsets,
alpha 0.5; ``cnn``: the SmallCNN set-up above with 100 test targets and 40 subsets; ``cnn-sgd``: the same
SmallCNN and data with a lower-noise training schedule, see :data:`SETUPS`), ``--subsets``,
``--alpha``, ``--runs``, ``--targets``, ``--init``, ``--seeds``, ``--methods``, ``--ensemble-sizes``.
Scorers with a per-target matrix: ``ip``, ``ip-ensemble`` (6 dropout-perturbed copies, rates U(0, 0.01),
the paper's; ``ip-ensemble-strong``: U(0, 0.2)), ``datainf``, ``trak``, ``ekfac``, ``kfac``
(``influence(..., aggregate=False)``), ``tracin`` (the learning-rate-weighted sum of ip's matrix over
the checkpoints), ``if-cg`` / ``if-lissa`` (one solve per target, side by side; only where named in
``--methods``, see :data:`ON_REQUEST`) and ``random``; ``ip`` and ``trak`` also over models trained on
random halves (TRAK's recipe, ``--ensemble-sizes``: trained by :func:`defenses.train_ensemble`, scored as one
:class:`robust_infl.Ensemble`, i.e. the members' mean for ip and TRAK's own ensemble for trak, each member
at its own PGD points); the others are listed with the reason in :data:`NOT_PER_TARGET`. More retrainings
(``--total-runs R``): added to the cached ones; the headline stays the mean of the first ``--runs`` (2, as
cached), and every row also gives the LDS against the mean of the first r retrainings, r = 1..R, beside
the noise-limited cap ``sqrt(r c / (1 + (r - 1) c))`` (``c``: the mean Spearman between two retrainings,
over all pairs): the LDS a perfect predictor of each subset's expected output would reach. Cost: scoring time (plus the ensemble's training) over one full training run,
measured in the same process. Caches: ``experiments/out/lds/per_example/<setup>-<hash>/`` (the
retraining outputs, saved after every subset, and each method's row as it finishes; a rerun resumes).
``--report`` writes the section and the reference JSON from every cached set-up::

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.lds --protocol per-example --setup cnn
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.lds --protocol per-example --report

Aggregate per-seed results are checkpointed under ``experiments/out/lds/`` (a rerun skips finished seeds;
``--seeds 1 2`` runs only those, e.g. in parallel processes, and writes nothing else);
the full run writes ``experiments/out/lds.json``, ``experiments/plots/lds.png`` and the ``lds``
section of ``experiments/RESULTS.md`` (the figures are there, not here).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
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
from attacks.plumbing import make_generator, seeded
from attacks.validation import check_int
from defenses import CheckpointingERM, ERM, TrainedEnsemble, train_ensemble
from defenses.data import take
from defenses.seed_results import SeedResults
from defenses.stats import half_width
from defenses.stats import mean_std as mean_std_stat
from defenses.trainers import copy_for_training
from experiments._results import (cached, experiment_arguments, format_delta, mean_std, save_figure, write_json,
                                  write_section)
from robust_infl.datasets import load_dataset
from robust_infl.io import atomic_save_npys, atomic_write_json, json_safe
from robust_infl.methods.iterative import largest_eigenvalue
from robust_infl.models import MLP, Normalize, build_model
from robust_infl.options import ScoringOptions
from robust_infl.preparation import prepared_problem

__all__ = ["Config", "FULL", "QUICK", "METHODS", "CONTROL_METHODS", "MODELS", "OBJECTIVES", "subset_masks", "lds",
           "run_seed", "main", "Setup", "SETUPS", "PER_EXAMPLE_METHODS", "ENSEMBLE_METHODS", "NOT_PER_TARGET",
           "ON_REQUEST", "columnwise_spearman", "per_example_lds", "retrained_outputs", "score_matrix", "per_example_seed",
           "per_example_report", "per_example_main"]

OUT = Path(__file__).resolve().parent / "out"
REFERENCE = Path(__file__).resolve().parent.parent / "defenses" / "lds_reference.json"
"""The per-example table as data, read to tell a user how far a method's scores can be trusted."""
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
    if method == "if-cg":
        return "if-cg", {"damping": cfg.lissa_damping, "max_iter": 100}
    if method == "if-lissa":
        return "if-lissa", {"damping": cfg.lissa_damping, "depth": cfg.lissa_depth, "hvp_batch_size": cfg.lissa_batch,
                            "scale": scale}
    return method, {}


def subset_masks(n: int, m: int, seed: int, alpha: float = 0.5) -> torch.Tensor:
    """``(m, n)`` boolean masks, each keeping a seeded random ``int(alpha * n)`` of the ``n`` samples (a half,
    ``n // 2``, by default)."""
    generator = make_generator(10_000 + seed)
    masks = torch.zeros(m, n, dtype=torch.bool)
    keep = int(alpha * n)
    for row in range(m):
        masks[row, torch.randperm(n, generator=generator)[:keep]] = True
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



# ---------------------------------------------------------------------------------------------------------------
# The per-example protocol (the field's LDS: dattri, TRAK)
# ---------------------------------------------------------------------------------------------------------------

PER_EXAMPLE_METHODS = ("ip", "ip-ensemble", "ip-ensemble-strong", "tracin", "if-cg", "if-lissa", "datainf", "trak", "ekfac",
                       "kfac", "random")
"""Single-model scorers of the per-example protocol (each gives a train x target matrix, see :func:`score_matrix`)."""
ENSEMBLE_METHODS = ("ip", "trak")
"""Scorers also averaged over models trained on random halves (TRAK's recipe)."""
NOT_PER_TARGET = {
    "if-exact": "the explicit Hessian is limited to small models (methods.hessian.MAX_PARAMS scored parameters; "
                "logistic regression on MNIST has 7,850)",
}
"""Scorers of the toolkit the per-example table does not measure, and why."""
ON_REQUEST = {
    "if-cg": "damping 0.01, at most 100 iterations, each a pass of HVPs over the training set for every target side "
             "by side: run on logistic regression (its row gives the cost), not on the networks (the SmallCNN: 200 "
             "targets x up to 100 HVP passes per seed, hours on this machine)",
    "if-lissa": "the aggregate protocol's settings (damping 0.01, 100 steps on minibatches of 256, scale 1.5 x a "
                "power iteration), one recursion per target side by side: run on logistic regression, not on the "
                "networks (the SmallCNN: 200 targets x 100 minibatch HVPs per seed)",
}
"""Per-target scorers run only where ``--methods`` names them (cost), with their settings and where they ran."""
MODEL_TITLES = {"cnn": "SmallCNN", "mlp": "MLP", "mlp-dropout": "MLP (dropout 0.1)", "logreg": "logistic regression"}
DATTRI_DROPOUT = 0.1


@dataclass(frozen=True)
class Setup:
    """One set-up of the per-example protocol: data, model, training, subsets and threat model. Everything here
    identifies the retraining outputs (the per-seed caches); methods, ensemble sizes and seeds are run options."""

    data: str = "mnist"
    model: str = "cnn"
    hidden: tuple = (64, 64)
    n_train: int = 3500
    n_targets: int = 100
    n_subsets: int = 40
    alpha: float = 0.5
    runs: int = 2
    init: str = "fresh"
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    optimizer: str = "adam"
    eps: float = 0.1
    pgd_alpha: float = 0.02
    pgd_steps: int = 10
    proj_dim: int = 512
    checkpoints: int = 5
    scoring_batch: int = 250
    normalize: bool = False
    weight_decay: float = 0.0
    lr_schedule: str = "constant"


MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
"""dattri's MNIST transform (``Normalize((0.1307,), (0.3081,))``), applied inside the model with ``normalize``, so
that the attack still works on images in [0, 1]."""


SETUPS = {
    # The project's SmallCNN set-up (the aggregate protocol's data and schedule), 100 test images as targets.
    "cnn": Setup(),
    # dattri's MNIST + MLP benchmark: 5,000 training / 500 test images, SGD (momentum 0.9) lr 0.01, 50 epochs,
    # batch 64, its 784-128-64-10 ReLU network with dropout 0.1 after each hidden layer, 100 subsets, alpha 0.5.
    "mlp": Setup(data="mnist-full", model="mlp-dropout", hidden=(128, 64), n_train=5000, n_targets=500,
                 n_subsets=100, epochs=50, lr=0.01, optimizer="sgd", normalize=True),
    # The same network without dropout (the project's MLP).
    "mlp-nodropout": Setup(data="mnist-full", model="mlp", hidden=(128, 64), n_train=5000, n_targets=500,
                           n_subsets=100, epochs=50, lr=0.01, optimizer="sgd", normalize=True),
    # dattri's MNIST + logistic regression: plain SGD lr 0.01, 20 epochs, batch 32; the project's SGD has momentum
    # 0.9, so lr 0.001 (the same steady-state step).
    "logreg": Setup(data="mnist-full", model="logreg", n_train=5000, n_targets=500, n_subsets=100, epochs=20,
                    lr=1e-3, batch_size=32, optimizer="sgd", normalize=True),
    # The same on the raw images in [0, 1] (without dattri's normalisation).
    "logreg-raw": Setup(data="mnist-full", model="logreg", n_train=5000, n_targets=500, n_subsets=100, epochs=20,
                        lr=1e-3, batch_size=32, optimizer="sgd"),
    # The SmallCNN set-up with a lower-noise training schedule (a CHANGED set-up, reported beside cnn's rows): under
    # cnn's Adam (5 epochs) two fresh retrainings of a subset agree only at a per-target Spearman of ~0.11, which
    # caps any score at ~0.43 against the mean of 2. Same architecture, data, subsets, targets and attack; trained
    # with SGD (momentum 0.9) at lr 0.05 annealed to 0 by a per-step cosine, weight decay 5e-4, 10 epochs, batch 64,
    # on dattri's normalisation: the highest agreement of four schedules probed (seed 0, 20 subsets x 2 fresh
    # retrainings, 100 targets; utility / robust): SGD lr 0.01 constant 0.23 / 0.21, the same with weight decay
    # 5e-4 0.22 / 0.20, this one 0.28 / 0.24, the same for 20 epochs 0.25 / 0.20 (no better for twice the cost).
    "cnn-sgd": Setup(n_subsets=30, optimizer="sgd", lr=0.05, epochs=10, weight_decay=5e-4, lr_schedule="cosine",
                     normalize=True),
    "quick": Setup(n_train=160, n_targets=12, n_subsets=8, epochs=1, proj_dim=64, checkpoints=1, scoring_batch=80),
}
SETUP_NOTES = {
    "cnn-sgd": "A CHANGED set-up, beside cnn's rows and not instead of them: the same SmallCNN, data, subsets, "
               "targets and attack, trained with a lower-noise schedule (SGD with momentum 0.9, lr 0.05 annealed to 0 "
               "by a per-step cosine, weight decay 5e-4, 10 epochs, batch 64, dattri's MNIST normalisation inside "
               "the model) instead of cnn's Adam (lr 1e-3, 5 epochs). Costs are in units of one training run of "
               "THIS schedule.",
}
"""A sentence printed under a set-up's heading in the report (what it changes against the set-up it derives from)."""
INIT_MODES = ("fresh", "same")


def columnwise_spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation between column j of ``a`` and column j of ``b`` (both ``(m, t)``), for every j, as
    :func:`scipy.stats.spearmanr` (average ranks for ties); NaN where a column is constant."""
    ra, rb = stats.rankdata(a, axis=0), stats.rankdata(b, axis=0)
    ra, rb = ra - ra.mean(axis=0), rb - rb.mean(axis=0)
    denominator = np.sqrt((ra * ra).sum(axis=0) * (rb * rb).sum(axis=0))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(axis=0) / denominator, np.nan)


def per_example_lds(scores: np.ndarray, masks: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """The per-example LDS of every target: Spearman over the subsets between ``sum_{i in S} scores[i, j]`` and
    ``outputs[S, j]`` (the output on target j of the model retrained on subset S). ``scores``: ``(n_train, t)``
    harms, ``masks``: ``(m, n_train)`` kept samples, ``outputs``: ``(m, t)``; returns ``(t,)`` (average it over
    the targets for the LDS). Harm convention: kept harm correlates POSITIVELY with the target's loss."""
    predicted = np.asarray(masks, dtype=np.float64) @ np.asarray(scores, dtype=np.float64)
    return columnwise_spearman(predicted, np.asarray(outputs, dtype=np.float64))


def build(setup: Setup, shape: tuple, classes: int, seed: int) -> nn.Module:
    """The set-up's model, initialised with ``seed`` (the MLP with the set-up's hidden widths), after dattri's
    normalisation with ``setup.normalize``."""
    if setup.model == "mlp-dropout":  # dattri's MLP: dropout after each hidden layer's ReLU
        layers, width = [nn.Flatten()], int(np.prod(shape))
        with seeded(seed, numpy=False):
            for h in setup.hidden:
                layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(DATTRI_DROPOUT)]
                width = h
            model = nn.Sequential(*layers, nn.Linear(width, classes))
    elif setup.model == "mlp":
        with seeded(seed, numpy=False):
            model = MLP(int(np.prod(shape)), classes, setup.hidden)
    else:
        model = build_model(setup.model, shape, classes, seed=seed)
    return nn.Sequential(Normalize(MNIST_MEAN, MNIST_STD), model) if setup.normalize else model


def setup_data(setup: Setup, seed: int) -> tuple:
    """``(train, targets, input_shape, classes)``: the seed's training set and target (test) images."""
    splits = load_dataset(setup.data, seed=seed, n_train=setup.n_train, n_val=10, n_test=setup.n_targets)
    return splits.train[:2], splits.test[:2], tuple(splits.input_shape), splits.num_classes


def setup_trainer(setup: Setup) -> CheckpointingERM:
    """The set-up's trainer; it keeps ``setup.checkpoints`` evenly spaced checkpoints (for tracin)."""
    return CheckpointingERM(n_checkpoints=setup.checkpoints, epochs=setup.epochs, lr=setup.lr,
                            batch_size=setup.batch_size, optimizer=setup.optimizer, weight_decay=setup.weight_decay,
                            lr_schedule=setup.lr_schedule, progress=False)


def setup_attack(setup: Setup, seed: int) -> attacks.PGD:
    """The set-up's PGD (linf), seeded."""
    return attacks.PGD(setup.eps, alpha=setup.pgd_alpha, steps=setup.pgd_steps, norm="linf", bounds=(0.0, 1.0),
                       seed=seed)


def target_losses(model: nn.Module, targets: tuple, pgd: attacks.PGD) -> tuple:
    """Per-target losses ``(utility, robust)``: clean, and at PGD points computed against THIS model."""
    x, y = targets
    x_adv = pgd(model, x, y)
    with torch.no_grad():
        clean = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        robust = torch.nn.functional.cross_entropy(model(x_adv), y, reduction="none")
    return clean.numpy(), robust.numpy()


def retrain_seed(setup: Setup, seed: int, subset: int, run: int) -> int:
    """The training seed of retraining ``run`` of subset ``subset`` (distinct for every pair and seed)."""
    return 1_000_000 * (seed + 1) + 1_000 * (run + 1) + subset


def retrained_outputs(setup: Setup, seed: int, folder: Optional[Path], progress: bool,
                      total_runs: Optional[int] = None) -> dict:
    """The ground truth of seed ``seed``: every subset (``alpha`` of the training set, seeded) retrained
    ``total_runs`` times (default ``setup.runs``), from a fresh seeded initialisation per retraining
    (``init="fresh"``, the field's) or from the seed's one initialisation with another data order (``"same"``),
    and its per-target losses, clean and at PGD points re-computed against that model. ``{"utility", "robust"}:
    (n_subsets, runs, n_targets)`` and the training seconds ``(n_subsets, runs)``; saved after every subset under
    ``folder`` (a rerun resumes; a larger ``total_runs`` adds retrainings to the cached ones, never recomputes
    them, and ``runs`` is at least what the cache holds)."""
    total = setup.runs if total_runs is None else max(setup.runs, total_runs)
    train, targets, shape, classes = setup_data(setup, seed)
    masks = subset_masks(setup.n_train, setup.n_subsets, seed, setup.alpha)
    trainer = setup_trainer(setup)
    pgd = setup_attack(setup, seed)
    start = copy_for_training(build(setup, shape, classes, seed), "scratch", seed)
    paths = None if folder is None else {k: folder / f"truth_seed{seed}_{k}.npy" for k in ("utility", "robust", "seconds")}
    truth = {"utility": np.full((setup.n_subsets, 0, setup.n_targets), np.nan),
             "robust": np.full((setup.n_subsets, 0, setup.n_targets), np.nan),
             "seconds": np.full((setup.n_subsets, 0), np.nan)}
    if paths is not None and all(p.exists() for p in paths.values()):
        truth = {k: np.load(p) for k, p in paths.items()}
    missing = total - truth["seconds"].shape[1]
    if missing > 0:  # more retrainings asked for than cached: new NaN columns, the cached ones kept
        truth = {k: np.concatenate([v, np.full((v.shape[0], missing, *v.shape[2:]), np.nan)], axis=1)
                 for k, v in truth.items()}
    todo = [row for row in range(setup.n_subsets) if np.isnan(truth["seconds"][row]).any()]
    for row in tqdm(todo, desc=f"{setup.model} seed {seed} retraining", disable=not progress, leave=False):
        for run in np.flatnonzero(np.isnan(truth["seconds"][row])):
            began = time.perf_counter()
            subset_seed = retrain_seed(setup, seed, row, int(run))
            if setup.init == "fresh":
                model = trainer.fit(start, take(train, masks[row]), seed=subset_seed)
            else:
                model = trainer.with_retrain("finetune").fit(start, take(train, masks[row]), seed=subset_seed)
            truth["seconds"][row, run] = time.perf_counter() - began
            truth["utility"][row, run], truth["robust"][row, run] = target_losses(model, targets, pgd)
        if paths is not None:
            atomic_save_npys({paths[k]: truth[k] for k in paths})
    return truth


def both_targets(model: nn.Module, targets: tuple, pgd: attacks.PGD) -> tuple:
    """The targets twice: clean, then at their PGD points against ``model`` (held fixed: the per-target form of
    ``Robust``). A per-target score on these ``2 t`` inputs under ``Utility`` gives the utility matrix (first
    ``t`` columns) and the robust one (last ``t``) in one call."""
    x, y = targets
    return torch.cat([x, pgd(model, x, y)]), torch.cat([y, y])


def score_matrix(method: str, model: nn.Module, train: tuple, targets: tuple, setup: Setup, seed: int,
                 checkpoints: list) -> np.ndarray:
    """The ``(n_train, 2 t)`` harm matrix of ``method`` on each target's own loss (clean, then at its PGD point):
    ``influence(..., aggregate=False)`` for the methods registered per target (ip, if-cg, if-lissa, datainf, trak,
    ekfac, kfac); tracin as the sum over the checkpoints of ip's matrix at each (times the learning rate, a
    constant factor here); random as seeded noise."""
    common = dict(objective=ri.Utility(), seed=seed, batch_size=setup.scoring_batch, progress=False, aggregate=False)
    if method == "random":
        generator = make_generator(seed)
        return torch.randn(setup.n_train, targets[0].shape[0], generator=generator, dtype=torch.float64).numpy()
    if method == "tracin":
        total = np.zeros((setup.n_train, targets[0].shape[0]))
        for state in checkpoints:
            at = copy.deepcopy(model)
            at.load_state_dict(state)
            total += setup.lr * ri.influence(at, train, targets, method="ip", **common).double().numpy()
        return total
    name, options = method_call(method, FULL, [], None)
    if method == "trak":
        options = {"proj_dim": setup.proj_dim}
    return ri.influence(model, train, targets, method=name, **common, **options).double().numpy()


def _lds_pair(scores: np.ndarray, masks: np.ndarray, truth: dict, t: int, runs: int) -> dict:
    """Mean per-example LDS, utility and robust, against the mean output over the first ``runs`` retrainings of
    each subset (dattri's ground truth; the headline), against the first retraining alone, and, where the cache
    holds more retrainings, against the mean of the first r for every r (``by_runs``)."""
    out: dict = {}
    total = truth["utility"].shape[1]
    for index, objective in enumerate(OBJECTIVES):
        block = scores[:, index * t:(index + 1) * t]
        out[objective] = float(np.nanmean(per_example_lds(block, masks, truth[objective][:, :runs].mean(axis=1))))
        out[f"{objective}_one_run"] = float(np.nanmean(per_example_lds(block, masks, truth[objective][:, 0])))
        if total > runs:
            for r in range(1, total + 1):
                value = float(np.nanmean(per_example_lds(block, masks, truth[objective][:, :r].mean(axis=1))))
                out.setdefault("by_runs", {}).setdefault(str(r), {})[objective] = value
    return out


def noise_ceiling(truth: dict) -> dict:
    """Per-target Spearman over the subsets between two retrainings of each subset, averaged over targets (the
    retraining-noise ceiling; needs ``runs >= 2``): between the first two (``utility``, ``robust``) and averaged
    over every pair of the cached retrainings (``pairs``)."""
    runs = truth["utility"].shape[1]
    if runs < 2:
        return {}
    out = {o: float(np.nanmean(columnwise_spearman(truth[o][:, 0], truth[o][:, 1]))) for o in OBJECTIVES}
    if runs > 2:
        out["pairs"] = {o: float(np.mean([np.nanmean(columnwise_spearman(truth[o][:, a], truth[o][:, b]))
                                           for a in range(runs) for b in range(a + 1, runs)])) for o in OBJECTIVES}
        out["runs"] = runs
    return out


def noise_cap(correlation: float, runs: int) -> float:
    """The LDS a perfect predictor of each subset's expected output would reach against the mean of ``runs``
    retrainings when two single retrainings correlate ``correlation`` (output = the subset's effect + independent
    noise; Spearman taken as Pearson): ``sqrt(runs c / (1 + (runs - 1) c))``."""
    c = max(float(correlation), 0.0)
    return float(np.sqrt(runs * c / (1 + (runs - 1) * c))) if c > 0 else 0.0


def per_example_seed(setup: Setup, seed: int, methods: tuple, sizes: tuple, folder: Optional[Path],
                     progress: bool, total_runs: Optional[int] = None) -> dict:
    """Seed ``seed`` of the per-example protocol: the ground truth (``total_runs`` retrainings per subset, see
    :func:`retrained_outputs`), the full model, every method's matrix and LDS, and the ensembles over models
    trained on random halves (each row saved as it finishes; a cached row is re-scored only when the cache holds
    more retrainings than its ``by_runs``)."""
    path = None if folder is None else folder / f"seed_{seed}.json"
    result = json.loads(path.read_text()) if path is not None and path.exists() else {"seed": seed, "rows": {}}
    truth = retrained_outputs(setup, seed, folder, progress, total_runs)
    held = truth["utility"].shape[1]

    def done(name: str) -> bool:
        row = result["rows"].get(name)
        return row is not None and ("error" in row or held <= setup.runs or str(held) in row.get("by_runs", {}))

    result["noise"] = noise_ceiling(truth)
    result["retrain_seconds"] = float(np.mean(truth["seconds"]))
    train, targets, shape, classes = setup_data(setup, seed)
    masks = subset_masks(setup.n_train, setup.n_subsets, seed, setup.alpha).numpy()
    pgd = setup_attack(setup, seed)
    t = setup.n_targets
    trainer = setup_trainer(setup)
    began = time.perf_counter()
    model = trainer.fit(build(setup, shape, classes, seed), train, seed=seed)
    full_seconds = time.perf_counter() - began  # this process's: costs are ratios measured side by side
    result.setdefault("full_train_seconds", full_seconds)
    checkpoints = list(trainer.checkpoints)
    both = both_targets(model, targets, pgd)

    def save() -> None:
        if path is not None:
            atomic_write_json(path, result)

    for method in methods:
        if done(f"{method} x1"):
            continue
        began = time.perf_counter()
        try:
            scores = score_matrix(method, model, train, both, setup, seed, checkpoints)
        except (ValueError, ImportError) as err:  # recorded, not hidden
            result["rows"][f"{method} x1"] = {"method": method, "models": 1, "error": str(err)}
            save()
            continue
        seconds = time.perf_counter() - began
        result["rows"][f"{method} x1"] = {"method": method, "models": 1, "seconds": seconds,
                                          **({"proj_dim": setup.proj_dim} if method == "trak" else {}),
                                          "cost": seconds / full_seconds, **_lds_pair(scores, masks, truth, t, setup.runs)}
        save()
    wanted = [m for m in ENSEMBLE_METHODS if m in methods]
    if sizes and wanted and not all(done(f"{m} halves x{k}") for m in wanted for k in sizes):
        n = max(sizes)
        members = half_models(model, train, trainer, setup, seed, n)
        per_member = members.seconds["wall"] / n
        for method in wanted:
            for k in sizes:
                name = f"{method} halves x{k}"
                if done(name):
                    continue
                began = time.perf_counter()
                scores = ensemble_matrix(method, ri.Ensemble(list(members.models[:k])), train, targets, setup, seed,
                                         pgd)
                seconds = k * per_member + time.perf_counter() - began
                result["rows"][name] = {"method": f"{method} (halves)", "models": k, "seconds": seconds,
                                        **({"proj_dim": setup.proj_dim} if method == "trak" else {}),
                                        "cost": seconds / full_seconds,
                                        **_lds_pair(scores, masks, truth, t, setup.runs)}
                save()
    save()
    return result


def half_models(model: nn.Module, train: tuple, trainer: CheckpointingERM, setup: Setup, seed: int,
                n: int) -> TrainedEnsemble:
    """The seed's ``n`` models trained on random halves (TRAK's recipe), through :func:`defenses.train_ensemble`:
    member ``k`` on the k-th half drawn by :func:`subset_masks` (seed + 500,000) from its own seeded
    initialisation (:func:`retrain_seed` with run 900)."""
    halves = subset_masks(setup.n_train, n, seed + 500_000, 0.5)
    return train_ensemble(model, train, trainer, n, subsets=list(halves),
                          seeds=[retrain_seed(setup, seed, k, 900) for k in range(n)])


class AttackSecondCopy:
    """An attack on targets given twice (clean, then again): the first copy kept, ``attack`` run on the second.
    Under :class:`robust_infl.Robust` (attack at each model's own parameters, held fixed) one per-target matrix
    then holds the clean losses (first ``t`` columns) and those at each model's own PGD points (last ``t``)."""

    def __init__(self, attack: attacks.PGD):
        self.attack = attack

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = x.shape[0] // 2
        return torch.cat([x[:t], self.attack(model, x[t:], y[t:])])


def ensemble_matrix(method: str, ensemble: ri.Ensemble, train: tuple, targets: tuple, setup: Setup, seed: int,
                    pgd: attacks.PGD) -> np.ndarray:
    """The ``(n_train, 2 t)`` harm matrix of ``method`` over an :class:`robust_infl.Ensemble` (the library's
    combination: the members' mean for ``ip``, TRAK's own ensemble for ``trak``), each member at its own PGD
    points for the robust half (:class:`AttackSecondCopy`)."""
    x, y = targets
    options = {"proj_dim": setup.proj_dim} if method == "trak" else {}
    return ri.influence(ensemble, train, (torch.cat([x, x]), torch.cat([y, y])), method=method,
                        objective=ri.Robust(AttackSecondCopy(pgd)), seed=seed, batch_size=setup.scoring_batch,
                        progress=False, aggregate=False, **options).double().numpy()


SCORING_FIELDS = ("proj_dim", "checkpoints", "scoring_batch")
"""Fields of :class:`Setup` that only the scoring reads (left out of the cache folder's name)."""
LATER_FIELDS = {"weight_decay": 0.0, "lr_schedule": "constant"}
"""Fields added to :class:`Setup` after caches were written: left out of the cache folder's name at these
defaults, so that the earlier set-ups keep their folders."""


def setup_folder(out: Path, name: str, setup: Setup) -> Path:
    """The cache folder of one set-up: ``out / <name>-<hash of the set-up but its scoring fields>`` (with its
    settings in ``settings.json``), so that another data, model, training or subset configuration never reads
    these results."""
    settings = json_safe(asdict(setup))
    identity = {k: v for k, v in settings.items()
                if k not in SCORING_FIELDS and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    folder = out / f"{name}-{digest}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "settings.json", {"name": name, "setup": settings})
    return folder


def summarise_rows(per_seed: list) -> list:
    """One entry per row (method and number of models) over the seeds: mean LDS with its 95% t-interval over
    seeds per objective, the one-retraining LDS, and the mean cost as a multiple of one training run."""
    names = []
    for result in per_seed:
        names += [n for n in result["rows"] if n not in names]
    order = list(PER_EXAMPLE_METHODS)

    def rank(name: str) -> tuple:
        method, _, models = name.rpartition(" x")
        base = method.removesuffix(" halves")
        return (method != base, order.index(base) if base in order else len(order), base, int(models))

    names.sort(key=rank)
    entries = []
    for name in names:
        rows = [r["rows"][name] for r in per_seed if name in r["rows"] and "error" not in r["rows"][name]]
        errors = [r["rows"][name]["error"] for r in per_seed if "error" in r["rows"].get(name, {})]
        first = next((r["rows"][name] for r in per_seed if name in r["rows"]), {})
        entry = {"row": name, "method": first.get("method", name), "models": first.get("models", 1),
                 "seeds": len(rows), "errors": errors, "proj_dim": first.get("proj_dim")}
        if rows:
            entry["cost"] = float(np.mean([r["cost"] for r in rows]))
            for key in (*OBJECTIVES, *(f"{o}_one_run" for o in OBJECTIVES)):
                stat = mean_std_stat([r[key] for r in rows])
                half = half_width(stat)
                entry[key] = {"mean": stat["mean"], "values": [r[key] for r in rows],
                              "ci": [stat["mean"] - half, stat["mean"] + half] if len(rows) > 1 else None}
            held = [max(map(int, r["by_runs"])) for r in rows if "by_runs" in r]
            if held and len(held) == len(rows):  # every seed's row against more retrainings: the common most
                runs = str(min(held))
                entry["more"] = {"runs": int(runs)}
                for objective in OBJECTIVES:
                    values = [r["by_runs"][runs][objective] for r in rows]
                    stat = mean_std_stat(values)
                    half = half_width(stat)
                    entry["more"][objective] = {"mean": stat["mean"], "values": values,
                                                "ci": [stat["mean"] - half, stat["mean"] + half] if len(rows) > 1
                                                else None}
        entries.append(entry)
    return entries


def best_within(entries: list, budget: float = 2.0, objective: str = "robust") -> Optional[dict]:
    """The scorer (not the ``random`` baseline) with the highest mean headline LDS on ``objective`` among those
    costing at most ``budget`` training runs (None if none)."""
    within = [e for e in entries if objective in e and e.get("cost", np.inf) <= budget and e["method"] != "random"]
    return max(within, key=lambda e: e[objective]["mean"]) if within else None


def per_example_table(name: str, setup: Setup, per_seed: list) -> list:
    """Markdown lines of one set-up: every row's LDS (utility, robust; mean and 95% interval over seeds), the
    one-retraining LDS, the cost, and the retraining-noise ceiling."""
    def cell(entry: dict, key: str) -> str:
        if key not in entry:
            return "failed: " + "; ".join(entry["errors"])[:80]
        value = entry[key]
        if value["ci"] is None:
            return f"{value['mean']:+.3f}"
        return f"{value['mean']:+.3f} [{value['ci'][0]:+.3f}, {value['ci'][1]:+.3f}]"

    def short(entry: dict, key: str) -> str:
        return f"{entry[key]['mean']:+.3f}" if key in entry else "-"

    entries = summarise_rows(per_seed)
    more = max((e["more"]["runs"] for e in entries if "more" in e), default=None)
    extra = (f" LDS utility / robust, mean of {more} retrainings |" if more else "")
    lines = [f"| method | models | seeds | LDS utility | LDS robust (PGD) | one retraining: utility / robust |{extra} "
             f"cost (x one training run) |", "|---|---|---|---|---|---|" + ("---|" if more else "") + "---|"]
    for entry in entries:
        cost = f"{entry['cost']:.2f}" if "cost" in entry else "-"
        proj = entry.get("proj_dim") or (setup.proj_dim if entry["method"].startswith("trak") else None)
        label = entry["method"] + (f", proj_dim {proj}" if proj else "")
        column = ""
        if more:
            found = entry.get("more", {})
            column = (f" {cell(found, 'utility')} / {cell(found, 'robust')} |" if found.get("runs") == more
                      else " - |")
        lines.append(f"| {label} | {entry['models']} | {entry['seeds']} | {cell(entry, 'utility')} | {cell(entry, 'robust')} | "
                     f"{short(entry, 'utility_one_run')} / {short(entry, 'robust_one_run')} |{column} {cost} |")
    noise = [r["noise"] for r in per_seed if r.get("noise")]
    if noise:
        lines += ["", "Retraining-noise ceiling (per target, Spearman over the subsets between two retrainings of "
                  f"each subset, averaged over targets): utility {np.mean([n['utility'] for n in noise]):+.3f}, robust "
                  f"{np.mean([n['robust'] for n in noise]):+.3f} (mean over {len(noise)} seed(s))."]
        pairs = [n["pairs"] for n in noise if "pairs" in n]
        if not (pairs and more):  # the headline ground truth's cap (with more retrainings: in the next sentence)
            c = {o: float(np.mean([n[o] for n in noise])) for o in OBJECTIVES}
            lines[-1] += (f" The noise-limited cap, the LDS a perfect predictor of each subset's expected output would "
                          f"reach against the mean of {setup.runs} retrainings, sqrt(r c / (1 + (r - 1) c)): utility "
                          f"{noise_cap(c['utility'], setup.runs):.2f}, robust {noise_cap(c['robust'], setup.runs):.2f}.")
        if pairs and more:
            c = {o: float(np.mean([p[o] for p in pairs])) for o in OBJECTIVES}
            caps = "; ".join(f"mean of {r}: utility {noise_cap(c['utility'], r):.2f}, robust {noise_cap(c['robust'], r):.2f}"
                             for r in sorted({1, setup.runs, more}))
            lines.append(f"Over all pairs of the {more} retrainings: utility {c['utility']:+.3f}, robust "
                         f"{c['robust']:+.3f} ({len(pairs)} seed(s)). The noise-limited cap, the LDS a perfect predictor "
                         f"of each subset's expected output would reach against the mean of r retrainings, "
                         f"sqrt(r c / (1 + (r - 1) c)): {caps}. The last column measures against that less noisy "
                         f"ground truth: a CHANGED protocol (the field's, dattri's, uses one or two retrainings), "
                         f"reported beside the headline, not instead of it.")
    best = best_within(entries)
    if best is not None:
        lines += ["", f"Best method at a cost of at most 2 training runs (robust, headline): {best['method']} x"
                  f"{best['models']} ({best['robust']['mean']:+.3f}, cost {best['cost']:.2f})."]
        best_more = best_within([{**e["more"], "method": e["method"], "models": e["models"], "cost": e["cost"]}
                                 for e in entries if more and e.get("more", {}).get("runs") == more])
        if best_more is not None:
            lines[-1] += (f" Against the mean of {more} retrainings: {best_more['method']} x{best_more['models']} "
                          f"({best_more['robust']['mean']:+.3f}, cost {best_more['cost']:.2f}).")
    full = np.mean([r["full_train_seconds"] for r in per_seed])
    lines += ["", f"{setup.model} on {setup.data}, {setup.n_train:,} training images, {setup.n_targets} targets "
              f"(test images), {setup.n_subsets} subsets of alpha = {setup.alpha}, {setup.runs} retraining(s) per "
              f"subset ({setup.init} initialisation), seeds {', '.join(str(r['seed']) for r in per_seed)}; one full "
              f"training run {full:.1f} s."]
    return lines


def reference_entries(name: str, setup: Setup, per_seed: list) -> list:
    """The entries of ``defenses/lds_reference.json`` of one set-up."""
    out = []
    for entry in summarise_rows(per_seed):
        for objective in OBJECTIVES:
            if objective not in entry:
                continue
            out.append({"data": "mnist", "setup": name, "model": MODEL_TITLES[setup.model], "objective": objective,
                        "method": entry["method"], "models": entry["models"], "lds": entry[objective]["mean"],
                        "ci": entry[objective]["ci"], "seeds": entry["seeds"], "cost_vs_training": entry["cost"],
                        "init": setup.init, "subsets": setup.n_subsets, "retrainings": setup.runs,
                        "n_train": setup.n_train, "targets": setup.n_targets,
                        **({"more_retrainings": {"retrainings": entry["more"]["runs"],
                                                 "lds": entry["more"][objective]["mean"],
                                                 "ci": entry["more"][objective]["ci"]}} if "more" in entry else {})})
    return out


def per_example_report(out: Path) -> list:
    """Every set-up cached under ``out`` (not the quick one): the RESULTS.md section ``lds-per-example`` and
    ``defenses/lds_reference.json``. Returns the section's lines."""
    lines = [
        "## Per-example linear datamodeling score (experiments/lds.py --protocol per-example)",
        "",
        "The field's protocol (dattri, TRAK): for each target image j, the Spearman correlation over M random "
        "alpha-subsets S between sum_{i in S} harm_ij and the loss on j of the model retrained on S, averaged over "
        "the targets; utility = the loss on the clean target, robust = the loss at j's PGD point (linf 0.1, 10 "
        "steps) re-computed against every retrained model (scores: at the PGD points of the scored model, held "
        "fixed). Harm convention: kept harm correlates positively with the loss, so a good method is near +1, "
        "random near 0. The ground truth is the mean over the retrainings of each subset (dattri's); 'one "
        "retraining' uses the first alone. Interval: 95% t-interval over seeds. Cost: scoring time (plus, for "
        "the ensembles, the training of their models) over the time of one full training run, measured in the "
        "same process (one CPU thread). Half models: trained from fresh initialisations on random halves of the "
        "training set (TRAK's recipe) by defenses.train_ensemble and scored as one robust_infl.Ensemble, each "
        "member at its own PGD points: for ip the members' mean, for trak TRAK's own ensemble (scores and "
        "out-to-loss weights averaged separately, as TRAKer). Where a set-up holds more than two retrainings per "
        "subset, a further column gives the LDS against their mean, with the noise-limited cap of each ground "
        "truth below the table: a less noisy but CHANGED ground truth, beside the field's, not instead of it. "
        "Not measured per example: "
        + "; ".join(f"{m} ({why})" for m, why in NOT_PER_TARGET.items()) + ". Only where named: "
        + "; ".join(f"{m} ({why})" for m, why in ON_REQUEST.items()) + ".",
        "",
    ]
    entries = []
    for folder in sorted(p for p in out.iterdir() if (p / "settings.json").exists()):
        settings = json.loads((folder / "settings.json").read_text())
        name = settings["name"]
        if name == "quick":
            continue
        setup = Setup(**{k: tuple(v) if isinstance(v, list) else v for k, v in settings["setup"].items()})
        per_seed = [json.loads(p.read_text()) for p in sorted(folder.glob("seed_*.json"))]
        if not per_seed:
            continue
        lines += [f"### {MODEL_TITLES[setup.model]} ({name}, {setup.n_subsets} subsets, {setup.runs} retraining(s) "
                  f"per subset, {setup.init} initialisation)", "",
                  *([SETUP_NOTES[name], ""] if name in SETUP_NOTES else []),
                  *per_example_table(name, setup, per_seed), ""]
        entries += reference_entries(name, setup, per_seed)
    lines.append(f"Regenerate: `{COMMAND} --protocol per-example --setup logreg|mlp|cnn|cnn-sgd --seeds 0 1 2`, then "
                 f"`{COMMAND} --protocol per-example --report`.")
    atomic_write_json(REFERENCE, {"protocol": "per-example LDS (dattri / TRAK): Spearman over random alpha-subsets "
                                              "between the summed harm of the kept samples and the retrained model's "
                                              "loss on each target, averaged over targets",
                                  "source": "experiments/lds.py", "entries": entries})
    write_section("lds-per-example", "\n".join(lines))
    return lines


def per_example_main(argv: Optional[list] = None) -> dict:
    """The per-example protocol's command line: run one set-up's seeds (resumable), print its table; with
    ``--report``, write the RESULTS.md section and ``defenses/lds_reference.json`` from every cached set-up."""
    parser = argparse.ArgumentParser(description="Per-example LDS (the field's protocol; see the module docstring)")
    parser.add_argument("--protocol", choices=("aggregate", "per-example"), default="per-example")
    parser.add_argument("--setup", choices=tuple(SETUPS), default="cnn",
                        help="cnn (the project's SmallCNN), cnn-sgd (the same with a lower-noise training "
                             "schedule), mlp / logreg (dattri's MNIST set-ups), quick")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", choices=PER_EXAMPLE_METHODS,
                        default=[m for m in PER_EXAMPLE_METHODS if m not in ON_REQUEST],
                        help=f"default: all but {', '.join(ON_REQUEST)} (run only where named: cost)")
    parser.add_argument("--ensemble-sizes", type=int, nargs="*", default=[1, 5, 10],
                        help="numbers of half models averaged (ip and trak); none: no ensembles")
    parser.add_argument("--subsets", type=int, default=None, help="number M of random subsets")
    parser.add_argument("--alpha", type=float, default=None, help="fraction of the training set kept per subset")
    parser.add_argument("--runs", type=int, default=None, help="retrainings per subset (2: the noise ceiling)")
    parser.add_argument("--total-runs", type=int, default=None,
                        help="retrainings per subset to hold in the cache (at least --runs; added to the cached "
                             "ones): rows then also give the LDS against the mean of the first r, r = 1..this "
                             "(the headline stays the mean of the first --runs)")
    parser.add_argument("--targets", type=int, default=None, help="number of target (test) images")
    parser.add_argument("--init", choices=INIT_MODES, default=None,
                        help="fresh: each retraining from its own seeded initialisation (the field's); same: all "
                             "from the seed's one initialisation, another data order")
    parser.add_argument("--out", type=Path, default=OUT / "lds" / "per_example", help="cache folder")
    parser.add_argument("--report", action="store_true",
                        help="write the RESULTS.md section and defenses/lds_reference.json from every cached set-up")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.report:
        lines = per_example_report(args.out)
        print("\n".join(lines))
        return {"lines": lines}
    overrides = {k: v for k, v in (("n_subsets", args.subsets), ("alpha", args.alpha), ("runs", args.runs),
                                    ("n_targets", args.targets), ("init", args.init)) if v is not None}
    setup = replace(SETUPS[args.setup], **overrides)
    check_int(setup.n_subsets, "--subsets", minimum=2)
    check_int(setup.runs, "--runs", minimum=1)
    if args.total_runs is not None:
        check_int(args.total_runs, "--total-runs", minimum=setup.runs)
    if not 0 < setup.alpha < 1:
        raise SystemExit(f"--alpha: must be in (0, 1), got {setup.alpha}")
    folder = setup_folder(args.out, args.setup, setup)
    per_seed = [per_example_seed(setup, seed, tuple(args.methods), tuple(sorted(set(args.ensemble_sizes))), folder,
                                 not args.no_progress, args.total_runs) for seed in args.seeds]
    lines = per_example_table(args.setup, setup, per_seed)
    print("\n".join(lines))
    return {"setup": asdict(setup), "per_seed": per_seed, "summary": summarise_rows(per_seed)}


def main(argv: Optional[list] = None) -> dict:
    """Run every seed, print the table, write the JSON, the plot and (full run) the RESULTS.md section; with
    ``--protocol per-example``, the per-example protocol instead (:func:`per_example_main`)."""
    protocol = argparse.ArgumentParser(add_help=False)
    protocol.add_argument("--protocol", choices=("aggregate", "per-example"), default="aggregate")
    if protocol.parse_known_args(argv)[0].protocol == "per-example":
        return per_example_main(argv)
    seeds_parser = argparse.ArgumentParser(add_help=False)
    seeds_parser.add_argument("--protocol", choices=("aggregate",), default="aggregate",
                              help="aggregate (this one) or per-example (see --protocol per-example --help)")
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
            "## Linear datamodeling score on a deep model, aggregate protocol (experiments/lds.py)",
            "",
            "The AGGREGATE protocol (one correlation per seed, on the mean validation objective); the field's "
            "per-example protocol is in the next section (lds-per-example).",
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
