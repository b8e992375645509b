"""defense_references: every defence recipe beside adversarial-training references, with measured cost.

The benchmark behind the documentation's "Choosing a defence". Each setting is one
``defenses.run`` (the ``defend`` pipeline): plain training (ERM) as the base, the influence recipe and
its baselines at a 5% budget (removal as weight 0, so every retraining takes as many steps as
``none``), the ``lookahead`` recipe, plain training on train + validation, and the reference rows
``fast-at`` (FGSM from a random start, Wong et al. 2020), ``pgd-at`` and ``trades`` (beta 6; 3 PGD steps on MNIST,
5 on tabular data), all on the same training split with the same schedule and seed. Every model is
re-attacked (adaptive); MNIST and Fashion-MNIST also get APGD-CE (the AutoAttack authors' code) on the first 200 test
points, and the worst case over PGD and APGD-CE there is reported (the full default suite, with
targeted APGD-DLR, costs too much per model on a shared 2-core machine for 5 seeds x 10 models).
Cost is wall time over one ERM fit of the same schedule, measured in the same run, per seed.

The influence recipe also runs with the best scorer of the per-example LDS table on the SmallCNN
(``experiments/RESULTS.md``, section lds-per-example): TRAK (projection dimension 512) averaged over 10 models
trained on random halves of the training split (``method_options={"ensemble": 10}``; their training counted in
the row's cost). That is the setting ``mnist-cnn-trak``: ``none`` and ``influence`` alone, on the same data,
schedule and seeds as ``mnist-cnn``, in its own folder (the per-seed files of ``mnist-cnn`` hold the ip rows and
are reused as they are); its ``influence`` row joins the ``mnist-cnn`` table, and the section says whether the
two runs' ``none`` rows (the same base models) agree.

Settings: MNIST 3,500 training images / SmallCNN / PGD linf 0.1 (10 steps); Fashion-MNIST the same (3,500 /
500 / 1,000 images drawn from its 60,000 / 10,000, the same epochs and suite, so the two rows compare); Adult / logistic
regression / PGD L2 0.5; scikit-learn's breast_cancer (standardised, data the project was not tuned
on) / logistic regression / PGD L2 1.0. Five seeds; paired 95% t-intervals. Each setting resumes from
the per-seed results already in its folder (``defenses.run(..., resume=True)``), so seeds can be run
in separate processes and gathered there.

    python -m experiments.defense_references                          # every setting, then the RESULTS.md section
                                                                      # (Fashion-MNIST skipped, with a note, where
                                                                      # it is not installed: make setup)
    python -m experiments.defense_references --settings mnist-cnn     # one setting (the section is rewritten
                                                                      # from every setting's saved summary)
    python -m experiments.defense_references --settings               # none: only rewrite the section and plot
    python -m experiments.defense_references --settings fashion-mnist-cnn --seeds 2
                                                                      # the first 2 seeds (e.g. those a stopped run
                                                                      # saved), the summary and section from them
    python -m experiments.defense_references --quick                  # smoke test (tiny, 1 seed, no RESULTS.md)
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

import defenses
from defenses.report import pareto_front, recommend
from defenses.seed_results import SEEDS_DIR, read_seed_file
from defenses.stats import half_width, paired_difference
from experiments._results import experiment_arguments, save_figure, write_json, write_section
from robust_infl.datasets import find_fashion_mnist
from robust_infl.models import LogisticRegression

__all__ = ["Setting", "SETTINGS", "QUICK", "breast_cancer", "run_setting", "join_variants", "render", "main"]

RECIPES = ("none", "influence", "random", "loss", "lookahead", "train+val")


@dataclass(frozen=True)
class Setting:
    """One ``defenses.run`` of the benchmark (``options`` are its keyword arguments, ``recipes`` its recipes).

    A variant (``joins``: the name of another setting) runs other scoring options on that setting's data,
    schedule and seeds; its rows other than ``none`` join that setting's table, the recipe named with its method
    (and number of half models).
    """

    name: str
    data: object
    options: dict = field(default_factory=dict)
    seeds: int = 5
    recipes: tuple = RECIPES
    joins: Optional[str] = None


def breast_cancer():
    """scikit-learn's breast_cancer, standardised (569 x 30, two classes), as ``(X, y)`` tensors."""
    from sklearn.datasets import load_breast_cancer

    X, y = load_breast_cancer(return_X_y=True)
    X = torch.tensor((X - X.mean(0)) / X.std(0), dtype=torch.float32)
    return X, torch.tensor(y)


def _logreg(features: int):
    def build(seed: int):
        torch.manual_seed(seed)
        return LogisticRegression(features, 1)

    return build


MNIST_CNN = dict(model="cnn", attack="pgd", eps=0.1, norm="linf", steps=10, epochs=5, train_steps=3,
                 eval_attacks=["apgd-ce"], eval_subset=200)
HALF_MODELS = 10  # the trak variant's ensemble
SETTINGS = (
    Setting("mnist-cnn", "mnist", MNIST_CNN),
    Setting("mnist-cnn-trak", "mnist", dict(MNIST_CNN, method="trak", references=(),
                                            method_options={"proj_dim": 512, "ensemble": HALF_MODELS}),
            recipes=("none", "influence"), joins="mnist-cnn"),
    Setting("fashion-mnist-cnn", "fashion-mnist", dict(model="cnn", attack="pgd", eps=0.1, norm="linf", steps=10,
                                                       epochs=5, train_steps=3, eval_attacks=["apgd-ce"],
                                                       eval_subset=200, n_train=3500, n_val=500, n_test=1000)),
    Setting("adult-logreg", "adult", dict(model="logreg", attack="pgd", eps=0.5, norm="l2", steps=10)),
    Setting("breast_cancer-logreg", "breast_cancer", dict(attack="pgd", eps=1.0, norm="l2", steps=20, epochs=30,
                                                          lr=0.01, batch_size=32)),
)
QUICK = dict(seeds=1, n_train=300, n_val=100, n_test=100, epochs=1, steps=3, eval_subset=20)
QUICK_ENSEMBLE = dict(proj_dim=64, ensemble=2)  # a variant's scoring options in the smoke test


def run_setting(setting: Setting, *, seeds: int, quick: bool, out, progress: bool) -> dict:
    """The ``defenses.run`` report of one setting (``out``: its folder), with the wall time of this call in
    minutes (seeds reused from the folder take none)."""
    options = dict(setting.options, recipes=list(setting.recipes), fractions=[0.05], seeds=seeds, out=out,
                   progress=progress, resume=not quick)
    if quick and "ensemble" in options.get("method_options", {}):
        options["method_options"] = dict(options["method_options"], **QUICK_ENSEMBLE)
    data = setting.data
    if data == "breast_cancer":
        data, options["model"] = breast_cancer(), _logreg(30)
        options["bounds"] = None
    if quick:
        options.update({k: v for k, v in QUICK.items() if k not in ("n_train", "n_val", "n_test")
                        or isinstance(data, str)})
        if not isinstance(data, str):
            data = (data[0][:200], data[1][:200])
    start = time.perf_counter()
    report = defenses.run(data, **options)
    report["minutes"] = (time.perf_counter() - start) / 60
    return report


def _per_seed(folder, recipe: str) -> dict:
    """Seed -> the row of ``recipe`` in the per-seed files of a setting's ``folder``."""
    rows = {}
    for path in sorted((folder / SEEDS_DIR).glob("seed_*.json")):
        rows.update({r["seed"]: r for r in read_seed_file(path)["results"]["runs"] if r["recipe"] == recipe})
    return rows


def _versus(folder, variant: str, parent: str, recipe: str, seeds: set) -> dict:
    """Paired differences (:func:`defenses.stats.paired_difference`) of the clean and adaptive robust accuracy of
    ``recipe`` in the variant's per-seed files against the same recipe in its setting's, on those of ``seeds``
    both hold."""
    mine, theirs = _per_seed(folder / variant, recipe), _per_seed(folder / parent, recipe)
    seeds = sorted(set(mine) & set(theirs) & seeds)
    return {"seeds": seeds, **{m: paired_difference([mine[k][m] for k in seeds], [theirs[k][m] for k in seeds])
                               for m in ("robust_acc_adaptive", "clean_acc")}} if seeds else {}


def join_variants(saved: dict, folder=None) -> dict:
    """``saved`` (setting name -> saved report) with every variant's rows other than ``none`` added to the
    summary of the setting it joins (the recipe named with the variant's method and half models, e.g.
    ``influence (trak, 10 half models)``) and the variants removed.

    Each setting that received rows gets ``joined``: per variant its name, seeds, method and options, and
    ``same_none``: whether the variant ran the setting's seeds and its ``none`` row (its base models) has the
    setting's clean and robust accuracies (so the rows' Δ vs none, paired within the variant's run, are against
    the same models); with ``folder`` (the settings' folders), ``versus``: per joined recipe, its paired
    differences against the setting's own row of that recipe on their common seeds (:func:`_versus`)."""
    out = {name: dict(report, summary=list(report["summary"])) for name, report in saved.items()}
    for setting in SETTINGS:
        if setting.joins is None or setting.name not in out or setting.joins not in out:
            continue  # a variant whose setting was not run keeps a table of its own
        variant = out.pop(setting.name)
        parent, cfg = out[setting.joins], variant["config"]
        members = cfg["method_options"].get("ensemble")
        label = f"{cfg['method']}" + ("" if members is None else f", {members} half models")
        nones = [next((e for e in r["summary"] if e["recipe"] == "none"), None) for r in (variant, parent)]
        same = (None not in nones and cfg["seeds"] == parent["config"]["seeds"]
                and all(nones[0][m]["mean"] == nones[1][m]["mean"] for m in ("clean_acc", "robust_acc_adaptive")))
        parent["summary"] += [dict(e, recipe=f"{e['recipe']} ({label})", variant=setting.name)
                              for e in variant["summary"] if e["recipe"] != "none"]
        versus = {} if folder is None else {
            e["recipe"]: _versus(folder, setting.name, setting.joins, e["recipe"],
                                 set(cfg["seeds"]) & set(parent["config"]["seeds"]))
            for e in variant["summary"] if e["recipe"] != "none"}
        parent["joined"] = parent.get("joined", []) + [
            {"setting": setting.name, "label": label, "seeds": cfg["seeds"], "method": cfg["method"],
             "method_options": cfg["method_options"], "same_none": same, "versus": versus}]
    return out


def _pct(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _interval(stat: dict) -> str:
    lo, hi = stat["ci95"] if stat.get("ci95") else (float("nan"), float("nan"))
    return f"{100 * stat['mean']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"


def _delta(entry: dict, metric: str) -> str:
    stat = entry.get("vs_none", {}).get(metric)
    return "–" if stat is None else _interval(stat)


def render(reports: dict) -> str:
    """The RESULTS.md section: one table per setting, its Pareto front and its recommendation."""
    lines = ["## defense_references: every recipe beside adversarial-training references (experiments/defense_references.py)", "",
             "`python -m experiments.defense_references` (see its docstring). Plain training (ERM) as the base; "
             "influence / random / loss remove 5% (weight 0, as many steps as `none`); references trained on the "
             "same data with the same schedule and seed. Accuracies in % (mean ± std over seeds), Δ paired vs "
             "`none` with 95% t-interval; cost = wall time over one ERM fit of the same schedule in the same run "
             "(the machine was shared by other jobs; ratios, not seconds). Worst case: the share of the suite's "
             "subset correct under every attack of it.", ""]
    for name, report in reports.items():
        cfg = report["config"]
        suite = ", ".join(cfg["eval_attacks"])
        subset = "" if cfg["eval_subset"] is None else f" on the first {cfg['eval_subset']} test points"
        lines += [f"### {name}: {cfg['data']} / {cfg['model']} / {cfg['attack']} {cfg['norm']} eps={cfg['eps']}",
                  "", f"{len(cfg['seeds'])} seeds, n_train {cfg['n_train']}, n_test {cfg['n_test']}, "
                  f"{cfg['epochs']} epochs; suite: {suite}{subset}.", "",
                  "| row | cost vs ERM | clean | robust (adaptive) | ASR (adaptive) | worst case "
                  "| Δ robust vs none | Δ clean vs none |", "|---|---|---|---|---|---|---|---|"]
        front = {id(e) for e in pareto_front(report["summary"])}
        for entry in report["summary"]:
            label = entry["recipe"] + ("" if entry["fraction"] is None else f" @ {entry['fraction']:g}")
            label += " (reference)" if entry.get("reference") else ""
            label = f"**{label}**" if id(entry) in front else label
            lines.append(f"| {label} | {entry['cost_vs_erm']['mean']:.2f} ± {entry['cost_vs_erm']['std']:.2f} "
                         f"| {_pct(entry['clean_acc'])} | {_pct(entry['robust_acc_adaptive'])} "
                         f"| {_pct(entry['asr_adaptive'])} | {_pct(entry['worst_case'])} "
                         f"| {_delta(entry, 'robust_acc_adaptive')} | {_delta(entry, 'clean_acc')} |")
        for joined in report.get("joined", []):
            options = ", ".join(f"{k} {v}" for k, v in joined["method_options"].items())
            agree = ("equals this table's (the same base models)" if joined["same_none"] else
                     "**differs** from this table's (other seeds or base models: compare its Δ, not its accuracies)")
            lines += ["", f"Rows ({joined['label']}): the run `{joined['setting']}` (method {joined['method']}, "
                      f"{options}; seeds {', '.join(map(str, joined['seeds']))}), Δ paired against its own `none`, "
                      f"which {agree}; its cost includes training the half models."]
            for recipe, versus in joined.get("versus", {}).items():
                if versus:
                    lines[-1] += (f" Against this table's `{recipe}` row (method {report['config']['method']}), "
                                  f"paired on seeds {', '.join(map(str, versus['seeds']))}: Δ robust "
                                  f"{_interval(versus['robust_acc_adaptive'])}, Δ clean {_interval(versus['clean_acc'])}.")
        lines += ["", "Bold: the Pareto front of cost and adaptive robust accuracy. "
                  f"**Recommendation** ({name}): {report['recommendation']['reason']}", ""]
    lines += ["![robust accuracy against cost](plots/defense_references.png)", ""]
    return "\n".join(lines)


def plot(saved: dict, path) -> None:
    """One panel per setting: adaptive robust accuracy (95% interval) against cost, the Pareto front joined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(saved), figsize=(5 * len(saved), 4), squeeze=False)
    for ax, (name, report) in zip(axes[0], saved.items()):
        front = pareto_front(report["summary"])
        for entry in report["summary"]:
            label = entry["recipe"] + ("" if entry["fraction"] is None else f"@{entry['fraction']:g}")
            x, y = entry["cost_vs_erm"]["mean"], 100 * entry["robust_acc_adaptive"]["mean"]
            ax.errorbar(x, y, yerr=100 * half_width(entry["robust_acc_adaptive"]), capsize=3, linestyle="none",
                        marker="s" if entry.get("reference") else "o",
                        color="tab:red" if any(entry == f for f in front) else "tab:blue")
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.plot([e["cost_vs_erm"]["mean"] for e in front], [100 * e["robust_acc_adaptive"]["mean"] for e in front],
                color="tab:red", linewidth=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("cost (x one ERM fit)")
        ax.set_ylabel("robust acc, adaptive (%)")
    save_figure(fig, path)


def _skip_missing(setting: Setting) -> bool:
    """Whether ``setting`` needs Fashion-MNIST and it is not installed (then say so on stderr)."""
    if not (isinstance(setting.data, str) and setting.data.startswith("fashion-mnist")):
        return False
    try:
        find_fashion_mnist()
    except FileNotFoundError as err:
        print(f"defense_references: {setting.name} skipped: {err}", file=sys.stderr)
        return True
    return False


def main(argv=None) -> dict:
    """Run the chosen settings (``--settings``; default all), save each one's summary next to its report, and,
    unless ``--quick``, rewrite the RESULTS.md section from every setting's saved summary."""
    import argparse
    import json

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--settings", nargs="*", choices=[s.name for s in SETTINGS], default=None)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: its own, 5)")
    chosen, rest = parser.parse_known_args(argv)
    if chosen.seeds is not None and chosen.seeds < 1:
        parser.error(f"--seeds: must be an integer >= 1, got {chosen.seeds}")
    args = experiment_arguments(__doc__, "defense_references", rest)
    folder = args.out.with_suffix("")
    if chosen.settings is None:  # all of them, but a data set that must be installed first only where it is
        chosen.settings = [s.name for s in SETTINGS if not _skip_missing(s)]
    for setting in SETTINGS:
        if setting.name in chosen.settings:
            seeds = QUICK["seeds"] if args.quick else chosen.seeds or setting.seeds
            report = run_setting(setting, seeds=seeds, quick=args.quick, out=folder / setting.name,
                                 progress=not args.no_progress)
            write_json(folder / f"{setting.name}.json",
                       {k: report[k] for k in ("config", "summary", "recommendation", "minutes")})
    saved = join_variants({s.name: json.loads((folder / f"{s.name}.json").read_text()) for s in SETTINGS
                           if (folder / f"{s.name}.json").exists()}, folder)
    for report in saved.values():  # the rule of the current code, also for summaries saved by an earlier run
        report["recommendation"] = recommend(report["summary"])
    write_json(args.out, saved)
    plot(saved, args.plots / f"{args.name}.png")
    section = render(saved)
    print(section)
    if not args.quick:
        write_section("defense_references", section)
    return saved


if __name__ == "__main__":
    main()
