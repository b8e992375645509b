"""Fidelity benchmark: how well does each influence method predict what retraining does?

For every method of ``robust_infl`` (harm convention: harm > 0 predicts that removing the sample
DECREASES the objective), compare the predicted harm with the ACTUAL decrease of the objective on
the validation split after removing training samples and retraining:

- Logistic regression (convex; float64): exact leave-one-out. The model minimises mean BCE +
  ``l2``/2 ||theta||^2 (Newton's method to machine precision); every one of the n refits is
  warm-started Newton, vectorised over all refits. The IF methods use ``damping = l2``.
- MLP (ReLU, float64): removal of random groups of 1% of the training set. The full model and
  every group-removed model are retrained from the SAME initialisation for the same number of
  full-batch Adam steps (vectorised over models with ``torch.func.vmap``); the predicted group
  harm is the sum of its members' harms. Repeated for several seeds (initialisations); the
  table shows the mean +- std over seeds of the per-seed correlations. The Hessian-based methods
  use a larger damping here (``mlp_damping``): the trained weights are not an exact minimum and
  the Hessian damped only by ``l2`` is indefinite.

Data: make_moons (noise 0.2) with 10% of the training labels flipped, and an Adult subset; both
standardised, with a sensitive attribute (moons: synthetic right half-plane; Adult: sex).
Objectives on the validation split: Utility (mean loss), Robust (L2 attack: the exact linear
worst case for logistic regression, PGD-L2 for the MLP; recomputed on every retrained model for
the actual value) and DemographicParity. Metrics: Pearson and Kendall tau between predicted harm
and actual decrease; the paper's synthetic sanity check, the AUROC with which each method's
Utility scores separate the flipped-label samples of moons; the wall time of each scoring call.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.fidelity [--quick] [--no-progress]

The full run writes ``experiments/out/fidelity.json`` and the ``fidelity`` section of
``experiments/RESULTS.md``; ``--quick`` (a smoke test) writes only
``experiments/out/fidelity_quick.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy import stats
from sklearn.metrics import roc_auc_score
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

import robust_infl as ri
from attacks import PGD
from attacks.plumbing import make_generator, seeded
from experiments._results import mean_std, write_json, write_section
from robust_infl.datasets import flip_labels, load_dataset
from robust_infl.models import MLP, LogisticRegression
from robust_infl.objectives import binary_cross_entropy_loss, cross_entropy_loss
from robust_infl.inputs import TargetSet

__all__ = ["Config", "FULL", "QUICK", "Task", "load_tasks", "run_logreg", "run_mlp", "summarise", "main"]

OUT = Path(__file__).resolve().parent / "out"
COMMAND = "OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.fidelity"
METHODS = ("ip", "ip-ensemble", "tracin", "if-exact", "if-cg", "if-lissa", "datainf", "self", "loss", "random")
OBJECTIVES = ("utility", "robust", "fairness")
DATASETS = ("moons", "adult")


@dataclass(frozen=True)
class Config:
    """Everything that defines one run of the benchmark."""

    n_moons: int = 400
    n_adult: int = 1000
    n_val: int = 300
    flip_fraction: float = 0.10
    l2: float = 0.01
    eps: float = 0.5  # L2 budget on standardised features
    pgd_steps: int = 10
    logreg_gd_steps: int = 100  # full-batch GD from zero before Newton (the TracIn trajectory)
    newton_steps: int = 50  # at most; stops at machine precision
    mlp_hidden: tuple = (16, 16)
    mlp_damping: float = 0.1  # at damping = l2 the MLP's damped Hessian is indefinite (CG refuses it)
    mlp_steps: int = 500
    mlp_lr: float = 0.01
    mlp_seeds: tuple = (0, 1, 2)
    group_fraction: float = 0.01
    checkpoints: int = 5
    ensemble_members: int = 6  # the trained model plus 5 perturbed copies, as in the paper
    lissa_depth: int = 1000
    lissa_batch: int = 100
    cg_max_iter: int = 200
    data_seed: int = 0


FULL = Config()
QUICK = dataclasses.replace(
    FULL, n_moons=150, n_adult=200, n_val=100, mlp_hidden=(8, 8), mlp_steps=150, mlp_seeds=(0,),
    group_fraction=0.1, lissa_depth=100, cg_max_iter=50, pgd_steps=5,
)


@dataclass(frozen=True)
class Task:
    """A training set (possibly with flipped labels) and its validation split with groups."""

    name: str
    train: tuple  # (x, y)
    val: TargetSet
    flipped: Optional[Tensor]  # mask of flipped training labels, or None


@dataclass
class RunResult:
    """What one (model, data set, seed) run produced.

    ``rows``: one dict per (objective, method) with Pearson, Kendall tau and seconds (or an
    error); ``aurocs``: flipped-label AUROC per method; ``ground_truth``: the cost of the refits;
    ``predicted[(objective, method)]`` and ``actual[objective]``: per removal set, for averaging
    over seeds.
    """

    rows: list
    aurocs: list
    ground_truth: dict
    predicted: dict
    actual: dict


def load_tasks(cfg: Config) -> list[Task]:
    """make_moons with flipped labels and an Adult subset, in float64."""
    tasks = []
    for name, n_train in (("moons", cfg.n_moons), ("adult", cfg.n_adult)):
        splits = load_dataset(name, seed=cfg.data_seed, n_train=n_train, n_val=cfg.n_val, n_test=50)
        x, y, _ = splits.train
        flipped = None
        if name == "moons":
            y, flipped = flip_labels(y, cfg.flip_fraction, 2, seed=cfg.data_seed)
        xv, yv, sv = splits.val
        tasks.append(Task(name, (x.double(), y), TargetSet(xv.double(), yv, sv.double()), flipped))
    return tasks


# ------------------------------------------------------------------------------------------ objectives


def linear_worst_case(eps: float) -> Callable:
    """Exact worst-case L2 perturbation of radius ``eps`` for a one-logit LINEAR model (an attack).

    The logit's input gradient is the weight vector w, so the worst case moves every point by
    ``eps`` along ``-(2y - 1) w / ||w||``. Works on any module computing a linear logit.
    """

    def attack(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        inputs = x.detach().clone().requires_grad_(True)
        (w,) = torch.autograd.grad(model(inputs)[:, 0].sum(), inputs)
        return (x - eps * (2 * y - 1).to(x.dtype)[:, None] * w / w.norm(dim=1, keepdim=True)).detach()

    return attack


def make_objectives(kind: str, cfg: Config) -> dict:
    """Utility, Robust (linear worst case or PGD-L2) and DemographicParity objectives."""
    attack = linear_worst_case(cfg.eps) if kind == "logreg" else PGD(
        eps=cfg.eps, steps=cfg.pgd_steps, norm="l2", random_start=False, bounds=None)
    return {"utility": ri.Utility(), "robust": ri.Robust(attack), "fairness": ri.DemographicParity()}


def objective_value(objective: ri.Objective, model: nn.Module, val: TargetSet, loss_fn: Callable) -> float:
    """The objective on the validation split at the model's weights (attacks run on this model)."""
    prepared = objective.prepare(model, val, seed=0)
    with torch.no_grad():
        outputs = model(prepared.inputs)
        return float(prepared.combine(prepared.chunk_sums(outputs, slice(None), loss_fn)))


# --------------------------------------------------------------------------------- logistic regression


def _logreg_newton(theta: Tensor, x1: Tensor, y: Tensor, weights: Tensor, l2: float, max_steps: int) -> Tensor:
    """Newton's method for ``(G, d+1)`` logistic regressions (weights ``(G, n)``), all at once.

    Minimises ``sum_i w_i BCE_i / sum_i w_i + l2/2 ||theta||^2`` per row (``x1`` is ``[x, 1]``)
    until every gradient entry is below 1e-12 or after ``max_steps`` steps.
    """
    scaled = weights / weights.sum(dim=1, keepdim=True)
    eye = torch.eye(x1.shape[1], dtype=x1.dtype)
    for _ in range(max_steps):
        p = torch.sigmoid(theta @ x1.T)  # (G, n)
        gradient = (scaled * (p - y)) @ x1 + l2 * theta
        if float(gradient.abs().max()) < 1e-12:
            break
        hessian = (x1.T * (scaled * p * (1 - p))[:, None, :]) @ x1 + l2 * eye
        theta = theta - torch.linalg.solve(hessian, gradient.unsqueeze(-1)).squeeze(-1)
    return theta


def _as_logreg(theta: Tensor, template: LogisticRegression) -> LogisticRegression:
    template.load_state_dict({"linear.weight": theta[:-1].reshape(1, -1), "linear.bias": theta[-1:]})
    return template


def run_logreg(task: Task, cfg: Config, progress: bool) -> RunResult:
    """Exact leave-one-out fidelity of every method on logistic regression."""
    x, y = task.train
    n, d = x.shape
    x1, yf = torch.cat([x, torch.ones(n, 1, dtype=x.dtype)], dim=1), y.double()
    theta, checkpoints = torch.zeros(1, d + 1, dtype=x.dtype), []
    lr = 1.0
    every = cfg.logreg_gd_steps // cfg.checkpoints
    for step in range(cfg.logreg_gd_steps):  # the GD trajectory TracIn traces
        p = torch.sigmoid(theta @ x1.T)
        theta = theta - lr * (((p - yf) / n) @ x1 + cfg.l2 * theta)
        if (step + 1) % every == 0:
            checkpoints.append(_as_logreg(theta[0].clone(), LogisticRegression(d, 1).double()).state_dict())
    theta = _logreg_newton(theta, x1, yf, torch.ones(1, n, dtype=x.dtype), cfg.l2, cfg.newton_steps)[0]
    model = _as_logreg(theta, LogisticRegression(d, 1).double()).eval()

    start = time.perf_counter()
    leave_one_out = 1 - torch.eye(n, dtype=x.dtype)
    refits = torch.cat([_logreg_newton(theta.expand(len(rows), -1).clone(), x1, yf, leave_one_out[rows], cfg.l2,
                                       cfg.newton_steps) for rows in torch.arange(n).split(100)])
    objectives = make_objectives("logreg", cfg)
    template = LogisticRegression(d, 1).double().eval()
    actual = {}
    for name, objective in objectives.items():
        before = objective_value(objective, model, task.val, binary_cross_entropy_loss)
        actual[name] = np.array([before - objective_value(objective, _as_logreg(t, template), task.val,
                                                          binary_cross_entropy_loss) for t in refits])
    ground_truth = {"model": "logreg", "dataset": task.name, "seed": 0, "refits": n,
                    "seconds": time.perf_counter() - start}
    return _score_and_compare(model, task, objectives, actual, None, (checkpoints, lr), "logreg", 0, cfg, progress,
                              ground_truth)


# ------------------------------------------------------------------------------------------------ MLP


def _train_mlps(model: nn.Module, init: dict, x: Tensor, y: Tensor, weights: Tensor, cfg: Config) -> tuple[dict, list]:
    """Full-batch Adam from the same ``init`` for every row of ``weights`` ``(G, n)``, vectorised.

    Minimises ``sum_i w_i CE_i / sum_i w_i + l2/2 ||theta||^2``. Returns the stacked final
    parameters and ``cfg.checkpoints`` evenly spaced state dicts of row 0.
    """

    def loss(params: dict, w: Tensor) -> Tensor:
        losses = F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")
        return (w * losses).sum() / w.sum() + cfg.l2 / 2 * sum((p * p).sum() for p in params.values())

    gradient_fn = vmap(grad(loss))
    params = {k: v.expand(weights.shape[0], *v.shape).clone() for k, v in init.items()}
    first = {k: torch.zeros_like(v) for k, v in params.items()}
    second = {k: torch.zeros_like(v) for k, v in params.items()}
    beta1, beta2, checkpoints = 0.9, 0.999, []
    every = cfg.mlp_steps // cfg.checkpoints
    for step in range(1, cfg.mlp_steps + 1):
        grads = gradient_fn(params, weights)
        for k in params:
            first[k].mul_(beta1).add_(grads[k], alpha=1 - beta1)
            second[k].mul_(beta2).addcmul_(grads[k], grads[k], value=1 - beta2)
            step_size = cfg.mlp_lr * (1 - beta2**step) ** 0.5 / (1 - beta1**step)
            params[k] = params[k] - step_size * first[k] / (second[k].sqrt() + 1e-8)
        if step % every == 0:
            checkpoints.append({k: v[0].clone() for k, v in params.items()})
    return params, checkpoints


def run_mlp(task: Task, cfg: Config, seed: int, progress: bool) -> RunResult:
    """Group-removal fidelity of every method on an MLP trained from seed ``seed``."""
    x, y = task.train
    n = x.shape[0]
    with seeded(seed, numpy=False):
        model = MLP(x.shape[1], 2, hidden=cfg.mlp_hidden).double().eval()
    init = {k: v.detach().clone() for k, v in model.named_parameters()}
    n_groups = round(1 / cfg.group_fraction)
    order = torch.randperm(n, generator=make_generator(cfg.data_seed))
    groups = list(order.tensor_split(n_groups))
    start = time.perf_counter()
    weights = torch.ones(n_groups + 1, n, dtype=x.dtype)
    for row, members in enumerate(groups, start=1):
        weights[row, members] = 0
    trained, checkpoints = _train_mlps(model, init, x, y, weights, cfg)

    def model_at(row: int) -> nn.Module:
        copy = MLP(x.shape[1], 2, hidden=cfg.mlp_hidden).double().eval()
        copy.load_state_dict({k: v[row] for k, v in trained.items()})
        return copy

    full = model_at(0)
    retrained = [model_at(row) for row in range(1, n_groups + 1)]
    objectives = make_objectives("mlp", cfg)
    actual = {}
    for name, objective in objectives.items():
        before = objective_value(objective, full, task.val, cross_entropy_loss)
        after = [objective_value(objective, m, task.val, cross_entropy_loss) for m in retrained]
        actual[name] = before - np.array(after)
    ground_truth = {"model": "mlp", "dataset": task.name, "seed": seed, "refits": n_groups + 1,
                    "seconds": time.perf_counter() - start}
    return _score_and_compare(full, task, objectives, actual, groups, (checkpoints, cfg.mlp_lr), "mlp", seed, cfg,
                              progress, ground_truth)


# ------------------------------------------------------------------------------------------- scoring


def method_options(method: str, kind: str, tracin: tuple, cfg: Config) -> dict:
    """The options each method runs with in this benchmark."""
    checkpoints, lr = tracin
    options = {
        "ip-ensemble": {"members": cfg.ensemble_members, "perturbation": "gaussian" if kind == "logreg" else "dropout",
                        "scale": 0.01},
        "tracin": {"checkpoints": checkpoints, "lrs": lr},
        "if-cg": {"max_iter": cfg.cg_max_iter},
        "if-lissa": {"depth": cfg.lissa_depth, "hvp_batch_size": cfg.lissa_batch},
    }
    return options.get(method, {})


def _score_and_compare(model, task, objectives, actual, groups, tracin, kind, seed, cfg, progress, ground_truth):
    """Score with every method and objective; correlate with the actual decreases; AUROC on flips."""
    damping = cfg.l2 if kind == "logreg" else cfg.mlp_damping
    result = RunResult([], [], ground_truth, {}, actual)
    for objective_name, objective in objectives.items():
        for method in tqdm(METHODS, desc=f"{kind} {task.name} seed {seed} {objective_name}", disable=not progress,
                           leave=False):
            row = {"model": kind, "dataset": task.name, "objective": objective_name, "method": method, "seed": seed}
            start = time.perf_counter()
            try:
                harm = ri.influence(model, task.train, (task.val.x, task.val.y, task.val.s), objective=objective,
                                    method=method, damping=damping, batch_size=task.train[0].shape[0], seed=seed,
                                    progress=False, **method_options(method, kind, tracin, cfg))
            except (ValueError, RuntimeError) as err:
                result.rows.append({**row, "error": str(err), "seconds": time.perf_counter() - start})
                continue
            row["seconds"] = time.perf_counter() - start
            predicted = harm.numpy() if groups is None else np.array([float(harm[g].sum()) for g in groups])
            row["pearson"] = float(stats.pearsonr(predicted, actual[objective_name])[0])
            row["kendall"] = float(stats.kendalltau(predicted, actual[objective_name])[0])
            result.rows.append(row)
            result.predicted[objective_name, method] = predicted
            if objective_name == "utility" and task.flipped is not None:
                result.aurocs.append({"model": kind, "dataset": task.name, "method": method, "seed": seed,
                                      "auroc": float(roc_auc_score(task.flipped.numpy(), harm.numpy()))})
    return result


# ------------------------------------------------------------------------------------------ reporting


def seed_averaged(results: list) -> list:
    """MLP correlations between the seed-averaged predicted group harm and seed-averaged actual decrease."""
    out = []
    mlp = [r for r in results if r.ground_truth["model"] == "mlp"]
    for dataset in dict.fromkeys(r.ground_truth["dataset"] for r in mlp):
        runs = [r for r in mlp if r.ground_truth["dataset"] == dataset]
        for objective in OBJECTIVES:
            actual = np.mean([r.actual[objective] for r in runs], axis=0)
            for method in METHODS:
                if not all((objective, method) in r.predicted for r in runs):
                    continue
                predicted = np.mean([r.predicted[objective, method] for r in runs], axis=0)
                out.append({"model": "mlp", "dataset": dataset, "objective": objective, "method": method,
                            "seeds": [r.ground_truth["seed"] for r in runs],
                            "pearson": float(stats.pearsonr(predicted, actual)[0]),
                            "kendall": float(stats.kendalltau(predicted, actual)[0])})
    return out


def _cell(values: list, with_std: bool) -> str:
    if not values:
        return "fails"
    mean, std = mean_std(values)
    return f"{mean:.2f} ± {std:.2f}" if with_std else f"{mean:.2f}"


def _correlation_table(title: str, rows: list, kind: str, metric: str, with_std: bool) -> str:
    columns = [(d, o) for d in DATASETS for o in OBJECTIVES]
    lines = [f"### {title}", "", "| method | " + " | ".join(f"{d} {o}" for d, o in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for method in METHODS:
        cells = [_cell([r[metric] for r in rows if r["model"] == kind and r["dataset"] == d and r["objective"] == o
                        and r["method"] == method and metric in r], with_std) for d, o in columns]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(rows: list, aurocs: list, averaged: list, ground_truth: list, cfg: Config, elapsed: float) -> str:
    """The Markdown section: correlation tables, the AUROC sanity check and timings."""
    sections = [
        "## Fidelity: predicted harm vs. actual decrease after removal and retraining (experiments/fidelity.py)",
        f"Regenerate: `{COMMAND}` (total {elapsed / 60:.1f} min on this machine). Raw numbers: "
        "`experiments/out/fidelity.json`.",
        f"Set-up: make_moons ({cfg.n_moons} training rows, {cfg.flip_fraction:.0%} labels flipped) and an Adult subset "
        f"({cfg.n_adult} rows), {cfg.n_val} validation rows each, standardised features; L2 coefficient {cfg.l2}; "
        f"damping of the Hessian-based methods {cfg.l2} for logistic regression and {cfg.mlp_damping} for the MLP "
        f"(with {cfg.l2} the damped Hessian at the Adam-trained MLP weights is indefinite and if-cg refuses it); "
        f"Robust = L2 attack with eps {cfg.eps} (exact linear worst case for logistic regression, PGD-L2 "
        f"{cfg.pgd_steps} steps for the MLP); fairness = DemographicParity. Options: ip-ensemble "
        f"{cfg.ensemble_members} members (logreg: Gaussian weight noise 0.01; MLP: dropout rates U(0, 0.01)), "
        f"TracIn over {cfg.checkpoints} checkpoints of the training run, if-cg max {cfg.cg_max_iter} iterations, "
        f"if-lissa depth {cfg.lissa_depth} with minibatches of {cfg.lissa_batch} and auto scale, DataInf "
        "lambda_scale 0.1. The tables give the Pearson and Kendall tau correlations between predicted harm and actual "
        "decrease (higher is better); 'fails' means the method raised (message in the JSON).",
    ]
    logreg = "Logistic regression, exact leave-one-out (every training sample)"
    mlp = (f"MLP {cfg.mlp_hidden}, random groups of {cfg.group_fraction:.0%} removed, retrained from the same "
           f"initialisation ({cfg.mlp_steps} full-batch Adam steps)")
    seeds = list(cfg.mlp_seeds)
    sections += [
        _correlation_table(f"{logreg}: Pearson", rows, "logreg", "pearson", False),
        _correlation_table(f"{logreg}: Kendall tau", rows, "logreg", "kendall", False),
        _correlation_table(f"{mlp}: Pearson, mean ± std of the per-seed values over seeds {seeds}", rows, "mlp",
                           "pearson", True),
        _correlation_table(f"{mlp}: Kendall tau, mean ± std over seeds {seeds}", rows, "mlp", "kendall", True),
        _correlation_table(f"{mlp}: Pearson of the seed-averaged prediction with the seed-averaged actual decrease",
                           averaged, "mlp", "pearson", False),
    ]
    lines = ["### Sanity check: AUROC of the Utility scores for the flipped-label moons samples", "",
             "| method | logistic regression | MLP (mean ± std over seeds) |", "|---|---|---|"]
    for method in METHODS:
        cells = [_cell([a["auroc"] for a in aurocs if a["model"] == kind and a["method"] == method], kind == "mlp")
                 for kind in ("logreg", "mlp")]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    sections.append("\n".join(lines))
    settings = [(k, d) for k in ("logreg", "mlp") for d in DATASETS]
    lines = ["### Time per scoring call (seconds, median over objectives and seeds; shared 2-core machine)", "",
             "| method | " + " | ".join(f"{k} {d}" for k, d in settings) + " |", "|---|" + "---|" * len(settings)]
    for method in METHODS:
        cells = [f"{np.median([r['seconds'] for r in rows if (r['model'], r['dataset'], r['method']) == key]):.2f}"
                 for key in ((k, d, method) for k, d in settings)]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    truths = [[g for g in ground_truth if (g["model"], g["dataset"]) == setting] for setting in settings]
    cells = [f"{np.median([g['seconds'] for g in runs]):.1f} ({runs[0]['refits']} refits)" for runs in truths]
    lines.append("| *ground truth: all refits + objectives* | " + " | ".join(cells) + " |")
    sections.append("\n".join(lines))
    return "\n\n".join(sections)


def main() -> None:
    """Run the benchmark, print the tables and write the JSON (and, for a full run, RESULTS.md)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run; does not touch RESULTS.md")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args()
    cfg, progress = (QUICK if args.quick else FULL), not args.no_progress
    start = time.perf_counter()
    tasks = load_tasks(cfg)
    runs = [("logreg", task, 0) for task in tasks] + [("mlp", task, s) for task in tasks for s in cfg.mlp_seeds]
    results = [run_logreg(task, cfg, progress) if kind == "logreg" else run_mlp(task, cfg, seed, progress)
               for kind, task, seed in tqdm(runs, desc="fidelity", disable=not progress)]
    elapsed = time.perf_counter() - start
    rows = [row for r in results for row in r.rows]
    aurocs = [a for r in results for a in r.aurocs]
    ground_truth = [r.ground_truth for r in results]
    averaged = seed_averaged(results)
    markdown = summarise(rows, aurocs, averaged, ground_truth, cfg, elapsed)
    print(markdown)
    payload = {"config": dataclasses.asdict(cfg), "command": COMMAND + (" --quick" if args.quick else ""),
               "seconds": elapsed, "rows": rows, "auroc": aurocs, "seed_averaged": averaged,
               "ground_truth": ground_truth}
    write_json(OUT / ("fidelity_quick.json" if args.quick else "fidelity.json"), payload)
    if not args.quick:
        write_section("fidelity", markdown)


if __name__ == "__main__":
    main()
