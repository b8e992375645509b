"""Fairness on Adult: remove the training samples most harmful to a fairness objective.

Protocol (per seed, paired): split Adult (train / validation / test, sensitive attribute = sex) with
the seed; train logistic regression and an MLP (64-64) with :class:`defenses.ERM`; score every
training sample with ``ip`` and ``ip-ensemble`` against the demographic-parity or the
equal-opportunity objective on the VALIDATION split; drop the top 1 / 5 / 10 % by harm (or the
same number drawn at random) and retrain from the same initialisation and data order (removed
samples get weight 0). Report on the TEST split the accuracy and the gaps of the hard predictions:

- demographic parity (DP): ``|P(yhat=1 | s=1) - P(yhat=1 | s=0)|``;
- equal opportunity (EO): ``|P(yhat=1 | y=1, s=1) - P(yhat=1 | y=1, s=0)|``.

The objectives that are scored are the project's smooth surrogates (squared gap of the mean
positive-class probability, squared gap of the mean loss on y=1).

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.fairness [--quick]
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
from attacks import accuracy
from defenses import prune
from defenses.selection import uniform_scores
from experiments._results import (ensemble_options, experiment_arguments, format_delta, format_mean_std, group_gaps,
                                  jaccard, mean_std, paired_ci, save_figure, tabular_trainer,
                                  write_json, write_section)
from robust_infl.datasets import load_dataset
from robust_infl.models import build_model

__all__ = ["Config", "FULL", "QUICK", "group_shares", "run_seed", "summarise", "main"]

EXPERIMENTS = Path(__file__).resolve().parent
OBJECTIVES = {"dp": ri.DemographicParity, "eo": ri.EqualOpportunity}
GAP_OF_OBJECTIVE = {"dp": "dp_gap", "eo": "eo_gap"}
METHODS = ("ip", "ip-ensemble")
MODELS = ("logreg", "mlp")


@dataclass(frozen=True)
class Config:
    """Everything that defines one run of the experiment."""

    seeds: tuple = (0, 1, 2, 3, 4)
    n_train: int = 8000
    n_val: int = 2000
    n_test: int = 5000
    fractions: tuple = (0.01, 0.025, 0.05, 0.10)
    logreg_epochs: int = 200
    logreg_lr: float = 0.05
    mlp_epochs: int = 10
    mlp_lr: float = 1e-3
    mlp_batch_size: int = 128
    weight_decay: float = 1e-4
    ensemble_members: int = 6


FULL = Config()
QUICK = Config(seeds=(0, 1), n_train=1500, n_val=600, n_test=1000, fractions=(0.05,), logreg_epochs=60,
               mlp_epochs=3, ensemble_members=3)


def group_shares(mask: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> dict:
    """Share of each (y, s) cell among the samples selected by ``mask``, keys ``"y1_s0"`` etc."""
    n = max(int(mask.sum()), 1)
    return {f"y{a}_s{b}": int((mask & (y == a) & (s == b)).sum()) / n for a in (0, 1) for b in (0, 1)}


def test_metrics(model: nn.Module, test: tuple) -> dict:
    """Test accuracy and the two fairness gaps."""
    X, y, s = test
    return {"acc": accuracy(model, X, y), **group_gaps(model, X, y, s)}


def run_seed(seed: int, config: Config, progress: bool = False) -> dict:
    """All models, objectives, methods and budgets of one seed; returns the test metrics of each condition.

    Result keys: ``results[model]["none"]``, ``results[model]["random"][fraction]`` and
    ``results[model][objective][method][fraction]``, each a dict of metrics; fractions are strings.
    ``results[model][objective]["overlap"][fraction]`` is the Jaccard overlap of the samples removed
    by ip and ip-ensemble, ``...["ip_removed_groups"][fraction]`` the (y, s) shares of ip's removal.
    """
    data = load_dataset("adult", seed=seed, n_train=config.n_train, n_val=config.n_val, n_test=config.n_test)
    X, y, s = data.train
    results: dict = {}
    for model_name in MODELS:
        trainer = tabular_trainer(model_name, config)
        initial = build_model(model_name, data.input_shape, data.num_classes, seed=seed)
        base = trainer.fit(initial, (X, y), seed=seed)
        out: dict = {"none": test_metrics(base, data.test)}

        def retrained(scores: torch.Tensor, fraction: float) -> dict:
            keep = prune(scores, fraction)
            model = trainer.fit(initial, (X, y), weights=keep.float(), seed=seed)
            return test_metrics(model, data.test)

        chance = uniform_scores(len(y), seed)
        out["random"] = {str(f): retrained(chance, f) for f in config.fractions}
        for objective_name, objective in OBJECTIVES.items():
            out[objective_name] = {}
            removed = {}
            for method in METHODS:
                options = ensemble_options(model_name, config.ensemble_members) if method == "ip-ensemble" else {}
                scores = ri.influence(base, (X, y), data.val, objective=objective(), method=method, seed=seed,
                                      progress=progress, **options)
                out[objective_name][method] = {str(f): retrained(scores, f) for f in config.fractions}
                removed[method] = {str(f): ~prune(scores, f) for f in config.fractions}
            out[objective_name]["overlap"] = {f: jaccard(removed["ip"][f], removed["ip-ensemble"][f])
                                              for f in removed["ip"]}
            out[objective_name]["ip_removed_groups"] = {f: group_shares(mask, y, s)
                                                        for f, mask in removed["ip"].items()}
        results[model_name] = out
    return results


def _verdict(a: list, b: list) -> str:
    """'lower than' / 'higher than' if the 95% CI of the paired difference a - b excludes 0.

    Otherwise 'no different from'.
    """
    _, (lo, hi) = paired_ci(a, b)
    if hi < 0:
        return "lower than"
    if lo > 0:
        return "higher than"
    return "no different from"


def _conditions(result: dict, model_name: str, objective_name: str, fraction: str) -> dict:
    """The metrics of the four conditions compared in one table row of one seed."""
    by_method = result[model_name][objective_name]
    return {"none": result[model_name]["none"], "random": result[model_name]["random"][fraction],
            **{method: by_method[method][fraction] for method in METHODS}}


def summarise(per_seed: list, config: Config) -> tuple:
    """Markdown table rows, reading sentences and a nested summary dict from the per-seed results.

    One row per (model, objective, removed fraction): the targeted gap (DP gap for the DP
    objective, EO gap for the EO objective) and the accuracy of no removal, random removal, ip
    and ip-ensemble, and the paired differences of each method to random removal.
    """
    header = ("| model | objective | removed | targeted gap: none | random | ip | ip-ensemble | "
              "Δ gap ip − random | Δ gap ip-ens − random | other gap: none | ip | "
              "acc: none | random | ip | ip-ensemble | Δ acc ip − random |")
    rows = [header, "|" + "---|" * (header.count("|") - 1)]
    reading, summary = [], {}
    for model_name in MODELS:
        for objective_name in OBJECTIVES:
            gap = GAP_OF_OBJECTIVE[objective_name]
            other = GAP_OF_OBJECTIVE["eo" if objective_name == "dp" else "dp"]
            verdicts, flips = [], []
            for f in map(str, config.fractions):
                runs = [_conditions(r, model_name, objective_name, f) for r in per_seed]

                def values(condition: str, key: str) -> list:
                    return [run[condition][key] for run in runs]

                rows.append(
                    f"| {model_name} | {objective_name.upper()} | {100 * float(f):g}% | "
                    + " | ".join(format_mean_std(values(c, gap)) for c in ("none", "random", *METHODS)) + " | "
                    + " | ".join(format_delta(values(m, gap), values("random", gap)) for m in METHODS) + " | "
                    + " | ".join(format_mean_std(values(c, other)) for c in ("none", "ip")) + " | "
                    + " | ".join(format_mean_std(values(c, "acc")) for c in ("none", "random", *METHODS)) + " | "
                    + format_delta(values("ip", "acc"), values("random", "acc")) + " |")
                entry = {c: {k: mean_std(values(c, k)) for k in runs[0][c]} for c in runs[0]}
                for method in METHODS:
                    entry[method]["gap_vs_none"] = paired_ci(values(method, gap), values("none", gap))
                    entry[method]["gap_vs_random"] = paired_ci(values(method, gap), values("random", gap))
                    entry[method]["acc_vs_random"] = paired_ci(values(method, "acc"), values("random", "acc"))
                summary.setdefault(model_name, {}).setdefault(objective_name, {})[f] = entry
                signed = [mean_std(values(c, gap.replace("_gap", "_signed")))[0] for c in ("none", "ip")]
                flips.append(f"{100 * signed[0]:+.1f} → {100 * signed[1]:+.1f}")
                verdicts.append((_verdict(values("ip", gap), values("none", gap)),
                                 _verdict(values("ip", gap), values("random", gap)),
                                 format_delta(values("ip", "acc"), values("random", "acc"))))
            at = "/".join(f"{100 * f:g}" for f in config.fractions)
            if len(per_seed) > 1:
                reading.append(
                    f"{model_name}, {objective_name.upper()} objective, ip removing {at}%: test "
                    f"{gap.replace('_', ' ')} {' / '.join(v[0] for v in verdicts)} no removal and "
                    f"{' / '.join(v[1] for v in verdicts)} random removal; accuracy vs random "
                    f"{' / '.join(v[2] for v in verdicts)} points; signed {gap.replace('_gap', '').upper()} difference "
                    f"(s=1 minus s=0, points) {' / '.join(flips)}.")
            largest = str(config.fractions[-1])
            shares = {cell: mean_std([r[model_name][objective_name]["ip_removed_groups"][largest][cell]
                                      for r in per_seed])[0] for cell in ("y1_s1", "y1_s0", "y0_s1", "y0_s0")}
            overlap = mean_std([r[model_name][objective_name]["overlap"][largest] for r in per_seed])[0]
            reading.append(
                f"{model_name}, {objective_name.upper()} objective, {100 * float(largest):g}% removed by ip: "
                + ", ".join(f"{100 * v:.0f}% {cell.replace('_', ' ').replace('y', 'y=').replace('s', 's=')}"
                            for cell, v in shares.items())
                + f" (s=1: male); Jaccard overlap with ip-ensemble's removal {overlap:.2f}.")
            summary[model_name][objective_name]["ip_removed_groups"] = shares
            summary[model_name][objective_name]["overlap"] = overlap
    return rows, reading, summary


def plot(per_seed: list, config: Config, path: Path) -> None:
    """Signed gaps (s=1 minus s=0) and accuracy against the removed fraction, mean ± std over seeds.

    Signed gaps show what the absolute gaps hide: a first-order selection that overshoots pushes
    the gap through zero to the other side.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [0.0, *(100 * f for f in config.fractions)]
    fig, axes = plt.subplots(len(MODELS), 3, figsize=(14, 3.8 * len(MODELS)), squeeze=False)
    panels = [("dp", "dp_signed", "DP difference, DP objective"),
              ("eo", "eo_signed", "EO (TPR) difference, EO objective")]
    styles = {"ip": dict(marker="o"), "ip-ensemble": dict(marker="^", alpha=0.7), "random": dict(marker="s", ls="--")}

    def curve(ax, model_name: str, objective_name: str, condition: str, key: str, label: str) -> None:
        per_point = [[100 * _conditions(r, model_name, objective_name, str(config.fractions[0]))["none"][key]
                      for r in per_seed]]
        per_point += [[100 * _conditions(r, model_name, objective_name, str(f))[condition][key] for r in per_seed]
                      for f in config.fractions]
        stats = [mean_std(v) for v in per_point]
        ax.errorbar(xs, [m for m, _ in stats], yerr=[s for _, s in stats], capsize=3, label=label, **styles[condition])

    for row, model_name in enumerate(MODELS):
        for col, (objective_name, key, title) in enumerate(panels):
            ax = axes[row][col]
            for condition in (*METHODS, "random"):
                curve(ax, model_name, objective_name, condition, key, condition)
            ax.axhline(0.0, color="grey", lw=0.8)
            ax.set(title=f"{model_name}: {title}", xlabel="training samples removed (%)",
                   ylabel="s=1 minus s=0 (points)")
            ax.legend(fontsize=8)
        ax = axes[row][2]
        for objective_name in OBJECTIVES:
            curve(ax, model_name, objective_name, "ip", "acc", f"ip ({objective_name.upper()} objective)")
        curve(ax, model_name, "dp", "random", "acc", "random")
        ax.set(title=f"{model_name}: test accuracy", xlabel="training samples removed (%)", ylabel="accuracy (%)")
        ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def section(rows: list, reading: list, config: Config, command: str, plot_name: str) -> str:
    """The RESULTS.md section: configuration, command, table, plot link and the reading."""
    return "\n".join([
        "## Fairness: Adult, removing the samples most harmful to a fairness objective (experiments/fairness.py)",
        "",
        f"Regenerate: `{command}`",
        "",
        f"Configuration: Adult (sensitive attribute sex), {config.n_train} train / {config.n_val} validation / "
        f"{config.n_test} test rows, seeds {list(config.seeds)}; logistic regression (full-batch Adam, "
        f"{config.logreg_epochs} steps, lr {config.logreg_lr}) and MLP 64-64 (Adam, {config.mlp_epochs} epochs, "
        f"batch {config.mlp_batch_size}, lr {config.mlp_lr}), weight decay {config.weight_decay}. Scores: `ip` and "
        f"`ip-ensemble` ({config.ensemble_members} members; weight noise N(0, 0.01) for logistic regression, "
        "dropout U(0, 0.01) for the MLP) against the smooth DP / EO objective on the validation split. The top "
        f"{', '.join(f'{100 * f:g}%' for f in config.fractions)} by harm, or as many random samples, are removed "
        "and the model is retrained from the same initialisation and data order. Test split only for this table. "
        "Gaps are of hard predictions, in percentage points; Δ are paired differences (mean [95% t-interval]) "
        "over seeds; the targeted gap is the DP gap for the DP objective and the EO gap for the EO objective. "
        "Harm scores are first-order predictions for removing ONE sample; removing k% at once is not additive, "
        "so a large budget can overshoot.",
        "",
        *rows,
        "",
        f"![gaps and accuracy vs removed fraction](plots/{plot_name})",
        "",
        "Reading (generated from the confidence intervals above; 'no different from' = the 95% interval of the "
        "paired difference contains 0; verdicts and values are listed per removed fraction; a signed "
        "difference that changes sign means the removal overshot parity):",
        "",
        *[f"- {line}" for line in reading],
    ])


def main(argv: Optional[list] = None) -> dict:
    """Run the experiment, write the JSON, the plot and (full runs only) the RESULTS.md section."""
    args = experiment_arguments(__doc__, "fairness", argv)
    config = QUICK if args.quick else FULL
    per_seed = [run_seed(seed, config, progress=False)
                for seed in tqdm(config.seeds, desc="fairness seeds", disable=args.no_progress)]
    rows, reading, summary = summarise(per_seed, config)
    plot_name = f"{args.name}.png"
    plot(per_seed, config, args.plots / plot_name)
    result = {"config": dataclasses.asdict(config), "per_seed": per_seed, "summary": summary}
    write_json(args.out, result)
    if not args.quick:
        command = "OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.fairness"
        write_section("fairness", section(rows, reading, config, command, plot_name))
    print("\n".join(rows))
    return result


if __name__ == "__main__":
    main()
