"""Synthetic experiment: make_moons decision boundaries before and after removing
the training samples most harmful to the utility, robustness and fairness objectives.

Protocol (per seed, paired): draw make_moons (noise 0.2; sensitive attribute s = right half-plane)
and split it train / validation / test with the seed; train logistic regression and an MLP (64-64)
with :class:`defenses.ERM`; score every training sample with ``ip`` and ``ip-ensemble`` against
one objective on the VALIDATION split:

- utility: mean validation loss;
- robustness: mean validation loss at PGD-L2 points (eps 0.5 on standardised features);
- fairness: the smooth demographic-parity gap.

Remove the top k% by harm (or as many random samples) and retrain from the same initialisation
and data order (removed samples get weight 0). On the TEST split report the accuracy, the loss,
the robust accuracy under a fresh PGD attack on the retrained model (adaptive) and the hard
demographic-parity gap. Removed fractions 2.5, 5 and 10%; the plots show the first seed's boundaries
before (dashed) and after (solid) removing 10%, and each targeted metric against the fraction.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.synthetic [--quick]
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

import robust_infl as ri
from attacks import PGD, accuracy, evaluate, per_sample_loss
from defenses import prune
from defenses.selection import uniform_scores
from experiments._results import (ensemble_options, experiment_arguments, format_delta, format_mean_std, group_gaps,
                                  jaccard, mean_std, paired_ci, save_figure, tabular_trainer,
                                  write_json, write_section)
from robust_infl.datasets import load_dataset
from robust_infl.models import build_model

__all__ = ["Config", "FULL", "QUICK", "make_attack", "make_objective", "test_metrics", "run_seed", "summarise",
           "plot_boundaries", "plot_budgets", "main"]

EXPERIMENTS = Path(__file__).resolve().parent
MODELS = ("logreg", "mlp")
OBJECTIVES = ("utility", "robustness", "fairness")
METHODS = ("ip", "ip-ensemble")
# The test metric each objective is meant to improve, and whether larger is better.
TARGET_METRIC = {"utility": ("loss", False), "robustness": ("robust_acc", True), "fairness": ("dp_gap", False)}


@dataclass(frozen=True)
class Config:
    """Everything that defines one run of the experiment."""

    seeds: tuple = (0, 1, 2, 3, 4)
    n_train: int = 400
    n_val: int = 200
    n_test: int = 400
    fractions: tuple = (0.025, 0.05, 0.10)
    eps: float = 0.5
    pgd_steps: int = 20
    logreg_epochs: int = 300
    logreg_lr: float = 0.05
    mlp_epochs: int = 60
    mlp_lr: float = 0.01
    mlp_batch_size: int = 32
    weight_decay: float = 1e-4
    ensemble_members: int = 6


FULL = Config()
QUICK = Config(seeds=(0, 1), n_train=200, n_val=100, n_test=200, fractions=(0.1,), pgd_steps=5, logreg_epochs=100,
               mlp_epochs=15, ensemble_members=3)


def make_attack(config: Config, seed: int) -> PGD:
    """PGD-L2 on the standardised features (unbounded), seeded."""
    return PGD(eps=config.eps, norm="l2", steps=config.pgd_steps, bounds=None, seed=seed)


def make_objective(name: str, config: Config, seed: int) -> ri.Objective:
    """The validation objective called ``name`` (utility, robustness or fairness)."""
    if name == "utility":
        return ri.Utility()
    if name == "robustness":
        return ri.Robust(make_attack(config, seed))
    if name == "fairness":
        return ri.DemographicParity()
    raise ValueError(f"name: unknown objective {name!r}; valid names are {', '.join(OBJECTIVES)}")


def test_metrics(model: nn.Module, test: tuple, attack) -> dict:
    """Test accuracy, mean loss, adaptive robust accuracy under ``attack`` and the fairness gaps."""
    X, y, s = test
    with torch.no_grad():
        loss = float(per_sample_loss(model(X), y).mean())
    robust = evaluate(model, (X, y), {"pgd": attack}, progress=False)["pgd"]["robust_acc"]
    return {"acc": accuracy(model, X, y), "loss": loss, "robust_acc": robust, **group_gaps(model, X, y, s)}


def run_seed(seed: int, config: Config, keep_models: bool = False) -> tuple:
    """All models, objectives, methods and removed fractions of one seed.

    Returns ``(results, artefacts)``: ``results[model]["none"]``, ``results[model]["random"][fraction]``
    and ``results[model][objective][method][fraction]`` are test-metric dicts (fractions as strings;
    ``...[objective]["overlap"][fraction]`` is the Jaccard overlap of the ip and ip-ensemble removals).
    With ``keep_models`` the artefacts hold the data, the trained model and, per objective, the
    model retrained without ip's top harm at the largest fraction and its removal mask (for the
    plot); else they are empty.
    """
    data = load_dataset("moons", seed=seed, n_train=config.n_train, n_val=config.n_val, n_test=config.n_test)
    X, y, _ = data.train
    attack = make_attack(config, seed)
    largest = max(config.fractions)
    results: dict = {}
    artefacts: dict = {"data": data} if keep_models else {}
    for model_name in MODELS:
        trainer = tabular_trainer(model_name, config)
        initial = build_model(model_name, data.input_shape, data.num_classes, seed=seed)
        base = trainer.fit(initial, (X, y), seed=seed)
        out: dict = {"none": test_metrics(base, data.test, attack)}
        kept: dict = {"base": base}

        def retrain(scores: torch.Tensor, fraction: float) -> tuple:
            removed = ~prune(scores, fraction)
            return trainer.fit(initial, (X, y), weights=(~removed).float(), seed=seed), removed

        chance = uniform_scores(len(y), seed)
        out["random"] = {str(f): test_metrics(retrain(chance, f)[0], data.test, attack) for f in config.fractions}
        for objective_name in OBJECTIVES:
            out[objective_name] = {method: {} for method in METHODS}
            removals: dict = {method: {} for method in METHODS}
            for method in METHODS:
                options = ensemble_options(model_name, config.ensemble_members) if method == "ip-ensemble" else {}
                scores = ri.influence(base, (X, y), data.val, objective=make_objective(objective_name, config, seed),
                                      method=method, seed=seed, progress=False, **options)
                for f in config.fractions:
                    model, removals[method][f] = retrain(scores, f)
                    out[objective_name][method][str(f)] = test_metrics(model, data.test, attack)
                    if method == "ip" and f == largest:
                        kept[objective_name] = (model, removals[method][f])
            out[objective_name]["overlap"] = {str(f): jaccard(removals["ip"][f], removals["ip-ensemble"][f])
                                              for f in config.fractions}
        results[model_name] = out
        if keep_models:
            artefacts[model_name] = kept
    return results, artefacts


def _verdict(a: list, b: list, larger_is_better: bool) -> str:
    """'better than' / 'worse than' if the 95% CI of a - b excludes 0, else 'no different from' (not significant)."""
    _, (lo, hi) = paired_ci(a, b)
    if lo > 0 or hi < 0:
        return "better than" if (lo > 0) == larger_is_better else "worse than"
    return "no different from"


def summarise(per_seed: list, config: Config) -> tuple:
    """Markdown rows, reading sentences and a summary dict; one row per (model, objective, removed fraction)."""
    header = ("| model | objective | removed | targeted test metric | none | random | ip | ip-ensemble | Δ ip − none | "
              "Δ ip − random | Δ ip-ens − random | acc: none | random | ip | ip-ensemble | "
              "Jaccard(ip, ip-ens) |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    reading, summary = [], {}
    for model_name in MODELS:
        for objective_name in OBJECTIVES:
            key, larger_is_better = TARGET_METRIC[objective_name]
            scale, digits = (1.0, 3) if key == "loss" else (100.0, 2)
            label = {"loss": "loss", "robust_acc": "robust acc (%)", "dp_gap": "DP gap (pts)"}[key]
            verdicts, overlaps = [], []
            for f in map(str, config.fractions):
                runs = [{"none": r[model_name]["none"], "random": r[model_name]["random"][f],
                         **{m: r[model_name][objective_name][m][f] for m in METHODS}} for r in per_seed]

                def values(condition: str, metric: str) -> list:
                    return [run[condition][metric] for run in runs]

                overlap = [r[model_name][objective_name]["overlap"][f] for r in per_seed]
                rows.append(
                    f"| {model_name} | {objective_name} | {100 * float(f):g}% | {label} | "
                    + " | ".join(format_mean_std(values(c, key), scale, digits) for c in ("none", "random", *METHODS))
                    + " | " + format_delta(values("ip", key), values("none", key), scale, digits) + " | "
                    + " | ".join(format_delta(values(m, key), values("random", key), scale, digits) for m in METHODS)
                    + " | "
                    + " | ".join(format_mean_std(values(c, "acc")) for c in ("none", "random", *METHODS)) + " | "
                    + f"{mean_std(overlap)[0]:.2f} |")
                entry = {c: {k: mean_std(values(c, k)) for k in runs[0][c]} for c in runs[0]}
                for method in METHODS:
                    entry[method]["target_vs_none"] = paired_ci(values(method, key), values("none", key))
                    entry[method]["target_vs_random"] = paired_ci(values(method, key), values("random", key))
                entry["overlap"] = mean_std(overlap)
                overlaps.append(entry["overlap"][0])
                summary.setdefault(model_name, {}).setdefault(objective_name, {})[f] = entry
                verdicts.append((_verdict(values("ip", key), values("none", key), larger_is_better),
                                 _verdict(values("ip", key), values("random", key), larger_is_better),
                                 format_delta(values("ip", "acc"), values("none", "acc"))))
            if len(per_seed) > 1:
                at = "/".join(f"{100 * f:g}" for f in config.fractions)
                reading.append(
                    f"{model_name}, {objective_name} objective, ip removing {at}%: test {label} "
                    f"{' / '.join(v[0] for v in verdicts)} no removal, {' / '.join(v[1] for v in verdicts)} random "
                    f"removal; accuracy vs no removal {' / '.join(v[2] for v in verdicts)} points; Jaccard overlap of "
                    f"the ip and ip-ensemble removals {min(overlaps):.2f}-{max(overlaps):.2f}.")
    return rows, reading, summary


def _probability_grid(model: nn.Module, xx: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
    points = torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1)
    with torch.no_grad():
        out = model(points)
    prob = torch.sigmoid(out[:, 0]) if out.shape[1] == 1 else torch.softmax(out, dim=1)[:, 1]
    return prob.reshape(xx.shape)


def plot_boundaries(artefacts: dict, results: dict, fraction: float, path: Path) -> None:
    """One seed's decision boundaries before (dashed) and after (solid) removing ip's top ``fraction``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X, y, _ = artefacts["data"].train
    low, high = X.min(dim=0).values - 0.5, X.max(dim=0).values + 0.5
    xx, yy = torch.meshgrid(torch.linspace(float(low[0]), float(high[0]), 200),
                            torch.linspace(float(low[1]), float(high[1]), 200), indexing="xy")
    fig, axes = plt.subplots(len(MODELS), len(OBJECTIVES), figsize=(5 * len(OBJECTIVES), 4.3 * len(MODELS)),
                             squeeze=False)
    for row, model_name in enumerate(MODELS):
        kept = artefacts[model_name]
        before = _probability_grid(kept["base"], xx, yy)
        for col, objective_name in enumerate(OBJECTIVES):
            model, removed = kept[objective_name]
            after = _probability_grid(model, xx, yy)
            ax = axes[row][col]
            ax.contourf(xx, yy, after, levels=[0, 0.5, 1], colors=["#d8e6f3", "#f6dcd2"], alpha=0.8)
            ax.contour(xx, yy, before, levels=[0.5], colors="k", linestyles="--", linewidths=1.2)
            ax.contour(xx, yy, after, levels=[0.5], colors="firebrick", linewidths=1.8)
            ax.scatter(X[~removed, 0], X[~removed, 1], c=y[~removed], cmap="coolwarm", vmin=0, vmax=1, s=9, alpha=0.7)
            ax.scatter(X[removed, 0], X[removed, 1], c=y[removed], cmap="coolwarm", vmin=0, vmax=1, marker="X", s=60,
                       edgecolors="k", linewidths=0.8, label="removed (ip), coloured by label")
            key, _ = TARGET_METRIC[objective_name]
            old, new = results[model_name]["none"][key], results[model_name][objective_name]["ip"][str(fraction)][key]
            ax.set_title(f"{model_name}, {objective_name}: test {key} {old:.3f} → {new:.3f}", fontsize=10)
            ax.legend(loc="lower left", fontsize=8)
    fig.suptitle(f"make_moons, first seed: boundary before (dashed) and after removing {100 * fraction:g}% by ip "
                 "harm (solid)")
    save_figure(fig, path)


def plot_budgets(per_seed: list, config: Config, path: Path) -> None:
    """Each objective's targeted test metric against the removed fraction, mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [0.0, *(100 * f for f in config.fractions)]
    fig, axes = plt.subplots(len(MODELS), len(OBJECTIVES), figsize=(5 * len(OBJECTIVES), 3.6 * len(MODELS)),
                             squeeze=False)
    styles = {"ip": dict(marker="o"), "ip-ensemble": dict(marker="^", alpha=0.7), "random": dict(marker="s", ls="--")}
    for row, model_name in enumerate(MODELS):
        for col, objective_name in enumerate(OBJECTIVES):
            key, _ = TARGET_METRIC[objective_name]
            scale = 1.0 if key == "loss" else 100.0
            ax = axes[row][col]
            for condition in (*METHODS, "random"):
                values = [[scale * r[model_name]["none"][key] for r in per_seed]]
                values += [[scale * (r[model_name]["random"] if condition == "random"
                                     else r[model_name][objective_name][condition])[str(f)][key] for r in per_seed]
                           for f in config.fractions]
                stats = [mean_std(v) for v in values]
                ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, label=condition,
                            **styles[condition])
            ax.set(title=f"{model_name}, {objective_name} objective", xlabel="training samples removed (%)",
                   ylabel=f"test {key}" + ("" if key == "loss" else " (%)"))
            ax.legend(fontsize=8)
    save_figure(fig, path)


def section(rows: list, reading: list, config: Config, command: str, plot_names: tuple) -> str:
    """The RESULTS.md section: configuration, command, table, plot link and the reading."""
    return "\n".join([
        "## Synthetic: make_moons decision boundaries (experiments/synthetic.py)",
        "",
        f"Regenerate: `{command}`",
        "",
        f"Configuration: make_moons (noise 0.2, standardised; s = right half-plane), {config.n_train} train / "
        f"{config.n_val} validation / {config.n_test} test points, seeds {list(config.seeds)}; logistic regression "
        f"(full-batch Adam, {config.logreg_epochs} steps, lr {config.logreg_lr}) and MLP 64-64 (Adam, "
        f"{config.mlp_epochs} epochs, batch {config.mlp_batch_size}, lr {config.mlp_lr}), weight decay "
        f"{config.weight_decay}. Objectives on the validation split: utility (mean loss), robustness (mean loss "
        f"at PGD-L2 points, eps {config.eps}, {config.pgd_steps} steps), fairness (smooth demographic-parity gap). "
        f"`ip` and `ip-ensemble` ({config.ensemble_members} members: weight noise N(0, 0.01) for logistic "
        f"regression, dropout U(0, 0.01) for the MLP) remove the top "
        f"{', '.join(f'{100 * f:g}%' for f in config.fractions)} by harm; random "
        "removal of as many samples is the baseline; each model is retrained from the same initialisation and "
        "data order. Test split: loss, accuracy, robust accuracy under a fresh PGD on the retrained model "
        "(adaptive), hard DP gap. Δ are paired differences over seeds, mean [95% t-interval]; for loss and DP gap "
        "lower is better, for robust accuracy higher. "
        "Harm scores are first-order predictions for removing ONE sample; removing k% at once is not additive, "
        "so a large budget can overshoot.",
        "",
        *rows,
        "",
        f"![decision boundaries before and after removal](plots/{plot_names[0]})",
        "",
        f"![targeted metric vs removed fraction](plots/{plot_names[1]})",
        "",
        "Reading (generated from the confidence intervals above; 'no different from' = the 95% interval of the "
        "paired difference contains 0; the three verdicts are for the three fractions):",
        "",
        *[f"- {line}" for line in reading],
    ])


def main(argv: Optional[list] = None) -> dict:
    """Run the experiment, write the JSON, the plot and (full runs only) the RESULTS.md section."""
    args = experiment_arguments(__doc__, "synthetic", argv)
    config = QUICK if args.quick else FULL
    per_seed, first = [], {}
    for seed in tqdm(config.seeds, desc="synthetic seeds", disable=args.no_progress):
        results, artefacts = run_seed(seed, config, keep_models=not per_seed)
        per_seed.append(results)
        first = first or artefacts
    rows, reading, summary = summarise(per_seed, config)
    plot_names = (f"{args.name}.png", f"{args.name}_budgets.png")
    plot_boundaries(first, per_seed[0], max(config.fractions), args.plots / plot_names[0])
    plot_budgets(per_seed, config, args.plots / plot_names[1])
    result = {"config": dataclasses.asdict(config), "per_seed": per_seed, "summary": summary}
    write_json(args.out, result)
    if not args.quick:
        command = "OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.synthetic"
        write_section("synthetic", section(rows, reading, config, command, plot_names))
    print("\n".join(rows))
    return result


if __name__ == "__main__":
    main()
