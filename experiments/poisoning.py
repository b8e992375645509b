"""Backdoor poisons: find and remove them (``defenses.remove_poisons``) against every baseline, 5 seeds.

Settings: MNIST 3,500 + SmallCNN and sklearn digits + MLP (a 2x2 patch on the 8x8 images); BadNets
at 5% and 1% and ART's clean-label backdoor (5% of the training split, PGD linf 0.3 on a proxy);
plain training (ERM) and PGD adversarial training (3 steps, linf 0.1); evidence K = 10 and 50
triggered validation inputs with their true labels (threat model "evidence known") and none
("trigger unknown"). Budget: twice the poison rate. Each setting runs through
``defenses.run_poisoning`` with its per-seed cache in ``experiments/out/poisoning/<setting>``
(``resume``), so an interrupted run continues where it stopped.

Settings run in separate processes (``--settings``); ``--write-results`` then writes the ``poisoning``
section of ``experiments/RESULTS.md`` from their reports, with the seeds each one reached (``--quick``: a
tiny digits run, written nowhere but its JSON). The figures live there, not here. On the shared 2-core
machine the grid was cut to fit: MNIST with PGD-AT runs K = 50 only and no self-influence baseline; the
section lists the seeds of every setting and the settings not run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Optional

try:
    from experiments._results import EXPERIMENTS, format_delta, save_figure, write_json, write_section
except ImportError:  # run as a script: python experiments/poisoning.py
    from _results import EXPERIMENTS, format_delta, save_figure, write_json, write_section

ALL_RECIPES = ("none", "random", "low-loss", "self", "activation-defence", "spectral-signature", "knn-label",
               "remove-poisons-unknown", "evidence-retrain", "evidence-finetune", "evidence-class-low-loss",
               "remove-poisons")
# On a machine shared by four jobs the grid is cut to what finishes in time: the renormalised-influence
# detector ("evidence-influence", AUROC 0.91-0.93 on a first seed, see README) and the removal-only ablation
# ("contrast-removal-only") are left out of it; both stay available as recipes.
# MNIST with PGD adversarial training (3.5x the cost of a plain training per retraining) drops the
# self-influence baseline (AUROC ~0.1 under plain training: it ranks the poisons last) and K = 10.
AT_RECIPES = tuple(r for r in ALL_RECIPES if r != "self")

# the recommended recipes and the ablation of one of them are not baselines of the goal check
NOT_BASELINES = ("none", "remove-poisons", "remove-poisons-unknown", "contrast-removal-only")

# name -> (data, trainer, attack, rate, patch size)
SETTINGS = {
    "mnist-erm-badnets5": ("mnist", "erm", "badnets", 0.05, 3),
    "mnist-erm-badnets1": ("mnist", "erm", "badnets", 0.01, 3),
    "mnist-erm-cleanlabel5": ("mnist", "erm", "clean-label", 0.05, 3),
    "mnist-pgdat-badnets5": ("mnist", "pgd-at", "badnets", 0.05, 3),
    "mnist-pgdat-badnets1": ("mnist", "pgd-at", "badnets", 0.01, 3),
    "mnist-pgdat-cleanlabel5": ("mnist", "pgd-at", "clean-label", 0.05, 3),
    "digits-erm-badnets5": ("digits", "erm", "badnets", 0.05, 2),
    "digits-erm-badnets1": ("digits", "erm", "badnets", 0.01, 2),
    "digits-erm-cleanlabel5": ("digits", "erm", "clean-label", 0.05, 2),
    "digits-pgdat-badnets5": ("digits", "pgd-at", "badnets", 0.05, 2),
}


# Settings whose cached seeds predate a change of the code they exercise (named by the commit they ran at).
NOTES: dict = {}


def run_setting(name: str, seeds: int, out_dir: Path, progress: bool, quick: bool = False) -> dict:
    """Run (or resume) one setting through ``defenses.run_poisoning`` and return its report."""
    import defenses

    data, trainer, attack, rate, patch = SETTINGS[name]
    reduced = data == "mnist" and trainer != "erm"
    recipes = AT_RECIPES if reduced else ALL_RECIPES
    sizes = dict(n_train=400, n_val=200, n_test=200) if quick else {}
    return defenses.run_poisoning(data, trainer=trainer, seeds=seeds, steps=10, train_steps=3, recipes=list(recipes),
                        poison=dict(attack=attack, rate=rate, target_class=0, evidence=(50,) if reduced else (10, 50),
                                    patch_size=patch,
                                    robust_n=100 if quick else 500),
                        out=out_dir / name, resume=True, progress=progress, **sizes)


def _pct(stat: Optional[dict], digits: int = 1) -> str:
    return "–" if stat is None else f"{100 * stat['mean']:.{digits}f}"


def _goal(report: dict) -> list:
    """Per recommended recipe: which parts of the goal it meets (from the seed means)."""
    summary = {(e["recipe"], e["evidence"]): e for e in report["summary"]}
    base_asr = report["base"]["asr_backdoor"]["mean"]
    budget = report["config"]["poison"]["budget"]
    lines = []
    for key in [k for k in summary if k[0] in ("remove-poisons", "remove-poisons-unknown")]:
        e = summary[key]
        threat = "evidence" if key[0] == "remove-poisons" else "unknown"
        rivals = [v for k, v in summary.items() if k != key and k[0] not in NOT_BASELINES
                  and (threat == "evidence" and k[1] in (None, key[1]) or threat == "unknown" and v["threat"] == "unknown")]
        asr, recall = e["asr_backdoor"]["mean"], e["recall"]["mean"]
        best_rival_asr = min(v["asr_backdoor"]["mean"] for v in rivals)
        best_rival_recall = max((v["recall"]["mean"] for v in rivals if v["recall"] is not None), default=0.0)
        clean = e["vs_none"]["clean_acc"]["mean"] if "vs_none" in e else float("nan")
        checks = {
            "base ASR >= 0.9": base_asr >= 0.9,
            "ASR <= 0.05": asr <= 0.05,
            "clean cost <= 1 pt": clean >= -0.01,
            f"removed <= {budget:g}": e["removed_share"]["mean"] <= budget + 1e-9,
            "best ASR of all": asr <= best_rival_asr,
            "best recall of all": recall >= best_rival_recall,
        }
        label = key[0] + ("" if key[1] is None else f" K={key[1]}")
        met = ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in checks.items())
        lines.append(f"- {label}: ASR {100 * asr:.1f}% (best other {100 * best_rival_asr:.1f}%), recall "
                     f"{100 * recall:.1f}% (best other {100 * best_rival_recall:.1f}%), clean {100 * clean:+.1f} pts; {met}")
    return lines


def render_setting(name: str, report: dict) -> str:
    """One setting's table and goal check as Markdown."""
    cfg, spec = report["config"], report["config"]["poison"]
    rows = {(r["recipe"], r["evidence"], r["seed"]): r for r in report["per_seed"]["runs"]}
    seeds = cfg["seeds"]
    base = report["base"]
    lines = [f"### {name}: {cfg['data']} / {cfg['model']} / {cfg['trainer']}, {spec['attack']} {100 * spec['rate']:g}%",
             "",
             f"Base model: clean {_pct(base['clean_acc'])}%, backdoor ASR {_pct(base['asr_backdoor'])}%, "
             f"PGD robust {_pct(base['robust_acc_adaptive'])}%; budget {100 * spec['budget']:g}% removed; "
             f"seeds {seeds}.",
             *([""] + [NOTES[name]] if name in NOTES else []),
             "",
             "| recipe | K | clean % | Δ clean vs none [95% CI] | ASR % | Δ ASR vs none [95% CI] | recall % "
             "| precision % | AUROC | robust % | removed % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["summary"]:
        recipe, size = e["recipe"], e["evidence"]
        mine = [rows[(recipe, size, s)] for s in seeds]
        none = [rows[("none", None, s)] for s in seeds]
        d_clean = "–" if recipe == "none" else format_delta([r["clean_acc"] for r in mine], [r["clean_acc"] for r in none], digits=1)
        d_asr = "–" if recipe == "none" else format_delta([r["asr_backdoor"] for r in mine],
                                                           [r["asr_backdoor"] for r in none], digits=1)
        auroc = "–" if e["auroc"] is None else f"{e['auroc']['mean']:.3f}"
        lines.append(f"| {recipe} | {size or '–'} | {_pct(e['clean_acc'])} | {d_clean} | {_pct(e['asr_backdoor'])} "
                     f"| {d_asr} | {_pct(e['recall'])} | {_pct(e['precision'])} | {auroc} "
                     f"| {_pct(e['robust_acc_adaptive'])} | {_pct(e['removed_share'])} |")
    timing = report["per_seed"]["timing"]
    ratio = sum(t["detection_over_epoch"] for t in timing) / len(timing)
    lines += ["", f"Detection (trigger-unknown contrast detector over the training split) / one training epoch: "
              f"{ratio:.2f} (mean over seeds, measured in the same run).", "", "Goal check:"] + _goal(report)
    return "\n".join(lines)


def build_section(reports: dict, skipped: list) -> str:
    """The ``poisoning`` section of RESULTS.md."""
    parts = ["## Poisoned training data (`experiments/poisoning.py`)", "",
             "Backdoor ASR: triggered test inputs of the other classes classified as the target class 0. "
             "Recall / precision: of the removed samples against the true poisons; AUROC of each detector's "
             "scores (poisons vs clean). `remove-poisons` is `defenses.remove_poisons` with the evidence "
             "(K triggered validation inputs, true labels), `remove-poisons-unknown` without it. Δ are paired per "
             "seed against `none` (no defence) with 95% t-intervals. Robust %: PGD linf 0.1, 10 steps, re-run on "
             "each model, first 500 test inputs.", ""]
    for name, report in reports.items():
        parts += [render_setting(name, report), ""]
    if skipped:
        parts += ["Not run (time): " + ", ".join(skipped) + "."]
    return "\n".join(parts)


def plot_asr(reports: dict, path: Path) -> None:
    """One panel per setting: the backdoor ASR of every recipe (mean over seeds), the 5% goal dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(reports), 1, figsize=(8, 4.2 * len(reports)), squeeze=False)
    for ax, (name, report) in zip(axes[:, 0], reports.items()):
        entries = report["summary"]
        labels = [e["recipe"] + ("" if e["evidence"] is None else f" K={e['evidence']}") for e in entries]
        colours = ["tab:green" if e["recipe"].startswith("remove-poisons") else "tab:gray" for e in entries]
        ax.barh(labels, [100 * e["asr_backdoor"]["mean"] for e in entries],
                xerr=[100 * e["asr_backdoor"]["std"] for e in entries], color=colours)
        ax.invert_yaxis()
        ax.axvline(5, color="black", linestyle="--", linewidth=1)
        ax.set_xlim(0, 105)
        ax.set_title(name)
        ax.set_xlabel("backdoor ASR (%), mean ± std over seeds")
    save_figure(fig, path)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny digits run for the smoke test (writes only its JSON)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="settings to run (default: all)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default: 5)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON of the summaries (default experiments/out/poisoning[_quick].json); the per-setting "
                             "reports and per-seed caches go in the folder of the same name without .json")
    parser.add_argument("--plots", type=Path, default=EXPERIMENTS / "plots", help="folder of the PNG")
    parser.add_argument("--write-results", action="store_true",
                        help="run nothing: write the poisoning section of RESULTS.md from every setting whose "
                             "report in the output folder has at least --seeds seeds")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    stem = "poisoning_quick" if args.quick else "poisoning"
    out = args.out or EXPERIMENTS / "out" / f"{stem}.json"
    folder = out.with_suffix("")
    reports, skipped = {}, []
    names = ["digits-erm-badnets5"] if args.quick else args.settings
    for name in names:
        if args.write_results:
            path = folder / name / "report.json"
            report = json.loads(path.read_text()) if path.exists() else None
            if report is None or len(report["config"]["seeds"]) < args.seeds:
                skipped.append(name)
                continue
        else:
            report = run_setting(name, 1 if args.quick else args.seeds, folder, not args.no_progress, quick=args.quick)
        reports[name] = report
        print(render_setting(name, report), flush=True)
    if reports:
        write_json(out, {name: report["summary"] for name, report in reports.items()})
        plot_asr(reports, args.plots / f"{stem}.png")
    if args.write_results:
        write_section("poisoning", build_section(reports, skipped))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
