"""Backdoor poisons: the attack x defence table (BackdoorBench's layout) on MNIST and Fashion-MNIST, 5 seeds.

Per data set, poison rate and trainer, one table per measure: rows are the poisoning recipes (defences),
columns the attacks; backdoor ASR and clean accuracy (mean over seeds, with the paired difference against
``none`` and its 95% interval), recall / precision of the samples a defence removes, and the cost of each
defence (CPU time as a multiple of one training run). Data: MNIST and Fashion-MNIST, 3,500 training / 500
validation / 1,000 test images, SmallCNN, 5 epochs; target class 0; budget twice the poison rate; plain
training (ERM) or PGD adversarial training (3 steps, linf 0.1). The trigger-unknown recipes run in every
setting; the evidence-known ``remove-poisons`` (K = 10 triggered validation inputs) in the dirty-label settings
(BadNets, blend, adaptive blend),
beside its honest baselines that use the same evidence alone (``evidence-retrain``: retrained with it;
``evidence-finetune``: the poisoned model fine-tuned on it and the clean validation split).

Each setting runs through ``defenses.run_poisoning`` with its per-seed cache in
``experiments/out/poisoning/<setting>`` (``resume``); a cached seed that lacks some of the requested recipes
runs only those, so recipes added later (a new defence) extend the table without rerunning the others.
Recipes not registered in this version are left out of the run.

The evidence-influence recipes (:data:`METHOD_RECIPES`: ``evidence-influence``, ip, and
``evidence-influence-trak``, TRAK over 10 models trained on random halves, the best per-example LDS on the
SmallCNN) run only where ``--only`` names them, into their own folder ``experiments/out/poisoning_methods``
(``--out experiments/out/poisoning_methods.json``), so the grid's per-seed files stay as they are; the section
takes their rows from there, seed by seed, where the base model is the grid's (its hash; otherwise refused).

``--write-results`` runs nothing: it writes
the ``poisoning`` section of ``experiments/RESULTS.md`` from the per-seed files (and the reports of the
earlier settings kept as they were), listing the seeds of every cell (``--quick``: a tiny digits run,
written nowhere but its JSON). The figures live there, not here.
"""

from __future__ import annotations

import argparse
import math
import json
from pathlib import Path
from typing import Optional

import defenses
from defenses.seed_results import SEEDS_DIR, read_seed_file, record_checksum
from robust_infl.io import atomic_write_json

try:
    from experiments._results import EXPERIMENTS, mean_std, paired_ci, save_figure, write_json, write_section
except ImportError:  # run as a script: python experiments/poisoning.py
    from _results import EXPERIMENTS, mean_std, paired_ci, save_figure, write_json, write_section

# The rows of the tables, in order: no defence, the trigger-unknown detectors (baselines, then the
# references of the field and the toolkit's scan), then the evidence-known removal. A recipe that this
# version does not register is left out of the run (its rows are added later from the same caches).
# remove-poisons-unknown (remove_poisons without evidence) is the backdoor-scan recipe itself (the same
# scan and retraining: equal rows on the first seeds it ran), so it is no row of its own.
UNKNOWN_RECIPES = ("low-loss", "knn-label", "activation-defence", "spectral-signature", "abl", "spectre", "asset",
                   "backdoor-scan")
# PGD-AT retrains at ~3.5x the cost of plain training: its rows are cut to the strongest baselines, ABL and the scan.
AT_UNKNOWN_RECIPES = ("knn-label", "spectral-signature", "abl", "backdoor-scan")
EVIDENCE = 10  # K of the evidence-known recipes (dirty-label settings only)
# The evidence-known rows: the evidence alone (retrained with it, fine-tuned on it), the honest baselines of
# remove-poisons, which removes samples with the same K triggered inputs.
EVIDENCE_RECIPES = ("evidence-retrain", "evidence-finetune", "remove-poisons")
DIRTY_LABEL = ("badnets", "blend", "adaptive-blend")  # the attacks whose settings run EVIDENCE_RECIPES
# The evidence-influence recipe with ip and with the best LDS method (TRAK over half models): opt-in (--only), in
# their own folder (METHODS_FOLDER next to the grid's), their rows joined to the grid's tables seed by seed.
METHOD_RECIPES = ("evidence-influence", "evidence-influence-trak")
METHODS_FOLDER = "poisoning_methods"
ROWS = ("none", *UNKNOWN_RECIPES, *EVIDENCE_RECIPES, *METHOD_RECIPES)
DATA = {"mnist": "mnist", "fmnist": "fashion-mnist"}
SIZES = dict(n_train=3500, n_val=500, n_test=1000)
TRAINERS = {"erm": "erm", "pgdat": "pgd-at"}
PRIORITY = {}


def _grid(priority: int, data: str, trainer: str, attacks: tuple, rates: tuple) -> dict:
    names = {}
    for attack in attacks:
        for rate in rates:
            name = f"{data}-{trainer}-{attack}{rate:g}"
            names[name] = (DATA[data], TRAINERS[trainer], attack, rate / 100)
            PRIORITY[name] = priority
    return names


# name -> (data, trainer, attack, rate), in priority order (the order the runs were started in). Fashion-MNIST
# at 5% comes early: at 1% its backdoors are weak (base ASR 0.46-0.58 BadNets, 0.09-0.12 blend in a probe).
# SIG and WaNet at the rates where they backdoor at all (SIG 9.5%, nearly the whole target class; WaNet 10%,
# still weak with this schedule) come next; PGD-AT on Fashion-MNIST (5%, where its backdoors take under plain
# training) last.
GRID = {
    **_grid(1, "mnist", "erm", ("badnets", "blend"), (1, 5)),
    **_grid(1, "fmnist", "erm", ("badnets", "blend"), (1, 5)),
    **_grid(2, "mnist", "pgdat", ("badnets",), (1,)),
    **_grid(2, "mnist", "erm", ("label-consistent",), (5,)),
    **_grid(2, "mnist", "erm", ("adaptive-blend",), (1,)),
    **_grid(3, "mnist", "erm", ("adaptive-blend",), (5,)),
    **_grid(3, "mnist", "pgdat", ("blend",), (1,)),
    **_grid(3, "mnist", "erm", ("sig",), (9.5,)),
    **_grid(3, "mnist", "erm", ("wanet",), (10,)),
    **_grid(4, "fmnist", "pgdat", ("badnets", "blend"), (5,)),
}
# Settings measured by an earlier version of this script (other recipes, K = 10 and 50, the earlier
# trigger-unknown detector as remove-poisons-unknown), kept as they were: the grid does not cover them.
KEPT = ("digits-erm-badnets5", "digits-erm-badnets1", "digits-erm-cleanlabel5", "digits-pgdat-badnets5",
        "mnist-erm-cleanlabel5", "mnist-pgdat-badnets5")
QUICK = ("digits", "erm", "badnets", 0.05)  # the smoke test's setting (tiny splits, one seed)


def recipes_of(setting: tuple, available: tuple, only: Optional[list] = None) -> list:
    """The recipes a grid setting ``(data, trainer, attack, rate)`` runs: ``none``, the trigger-unknown ones
    registered in ``available`` (a reduced list under PGD-AT) and, on the dirty-label attacks (:data:`DIRTY_LABEL`),
    the evidence-known ones (:data:`EVIDENCE_RECIPES`: the evidence alone, then ``remove-poisons``); with ``only``,
    ``none`` and those of them named there, plus the :data:`METHOD_RECIPES` named there (they run only when named)."""
    _, trainer, attack, _ = setting
    unknown = UNKNOWN_RECIPES if trainer == "erm" else AT_UNKNOWN_RECIPES
    wanted = ["none", *unknown] + (list(EVIDENCE_RECIPES) if attack in DIRTY_LABEL else [])
    if only is not None:
        wanted = [r for r in wanted if r in ("none", *only)] + [r for r in METHOD_RECIPES if r in only]
    return [r for r in wanted if r in available]


def run_setting(name: str, seeds: int, out_dir: Path, progress: bool, quick: bool = False,
                only: Optional[list] = None) -> dict:
    """Run (or resume, adding missing recipes) one grid setting (``--quick``: :data:`QUICK`) through
    ``defenses.run_poisoning``; ``only``: of its recipes, ``none`` and these."""
    data, trainer, attack, rate = QUICK if quick else GRID[name]
    recipes = recipes_of((data, trainer, attack, rate), defenses.available_recipes("poisoning"), only)
    sizes = dict(n_train=400, n_val=200, n_test=200) if quick else SIZES
    return defenses.run_poisoning(data, trainer=trainer, seeds=seeds, steps=10, train_steps=3, recipes=recipes,
                                  poison=dict(attack=attack, rate=rate, target_class=0, evidence=(EVIDENCE,),
                                              patch_size=2 if data == "digits" else 3, robust_n=100),
                                  out=out_dir / name, resume=True, progress=progress, **sizes)


def drop_rows(folder: Path, recipe: str) -> int:
    """Delete ``recipe``'s rows from the per-seed files in ``folder`` (after its code changed), each file
    rewritten atomically with its new checksum, so that the next run recomputes them; returns the rows deleted."""
    dropped = 0
    for path in sorted((folder / SEEDS_DIR).glob("seed_*.json")):
        record = {k: v for k, v in read_seed_file(path).items() if k != "sha256"}
        runs = record["results"]["runs"]
        kept = [row for row in runs if row["recipe"] != recipe]
        if len(kept) < len(runs):
            record["results"]["runs"] = kept
            atomic_write_json(path, {**record, "sha256": record_checksum(record)})
            dropped += len(runs) - len(kept)
    return dropped


def _seed_files(folder: Path) -> list:
    return sorted((folder / SEEDS_DIR).glob("seed_*.json"), key=lambda p: int(p.stem.split("_")[1]))


def method_rows(folder: Path, base_models: dict) -> list:
    """The rows of :data:`METHOD_RECIPES` in the per-seed files of ``folder`` (none: []), of the seeds whose base
    model has the hash ``base_models[seed]`` (the grid's); a seed trained on another base model is a ``ValueError``
    naming the file, a seed the grid lacks is left out."""
    rows = []
    for path in _seed_files(folder):
        results = read_seed_file(path)["results"]
        seed = results["base"]["seed"]
        if seed not in base_models:
            continue
        if results["base_model"] != base_models[seed]:
            raise ValueError(f"{path}: its base model differs from the grid's of seed {seed}; rerun it")
        rows += [row for row in results["runs"] if row["recipe"] in METHOD_RECIPES]
    return rows


def load_setting(folder: Path, methods: Optional[Path] = None) -> Optional[dict]:
    """A setting's measurements: ``{"data", "trainer", "attack", "rate", "budget", "base", "runs"}`` from its
    per-seed files (each checked by :func:`defenses.seed_results.read_seed_file`; the rows of the grid's
    recipes, :data:`ROWS`, with those of :data:`METHOD_RECIPES` from ``methods``, the setting's folder under
    :data:`METHODS_FOLDER`, see :func:`method_rows`), or for a kept setting from its report (all its rows); None
    where neither exists."""
    paths = _seed_files(folder)
    if folder.name in KEPT or not paths:
        if not (folder / "report.json").exists():
            return None
        report = json.loads((folder / "report.json").read_text())
        config, base, runs = report["config"], report["per_seed"]["base"], report["per_seed"]["runs"]
    else:
        saved = [read_seed_file(p) for p in paths]
        config = saved[0]["settings"]
        base = [s["results"]["base"] for s in saved]
        runs = [row for s in saved for row in s["results"]["runs"] if row["recipe"] in ROWS]
        if methods is not None:
            runs += method_rows(methods, {s["results"]["base"]["seed"]: s["results"]["base_model"] for s in saved})
    spec = config["poison"]
    return {"data": config["data"], "trainer": config["trainer"], "attack": spec["attack"], "rate": spec["rate"],
            "budget": spec["budget"], "base": base, "runs": runs}


def _row_key(row: dict) -> tuple:
    return row["recipe"], row["evidence"]


def _label(key: tuple) -> str:
    return key[0] + ("" if key[1] is None else f" K={key[1]}")


def _row_order(keys) -> list:
    order = list(ROWS)
    return sorted(set(keys), key=lambda k: (order.index(k[0]) if k[0] in order else len(order), k[0], k[1] or 0))


def cell(setting: dict, key: tuple) -> Optional[dict]:
    """One (recipe, K) row of one setting: per-metric means over its seeds, the paired differences of clean
    accuracy and ASR against ``none`` on the same seeds, its mean cost, and the seeds."""
    mine = {r["seed"]: r for r in setting["runs"] if _row_key(r) == key}
    if not mine:
        return None
    none = {r["seed"]: r for r in setting["runs"] if r["recipe"] == "none"}
    seeds = sorted(mine)
    out = {"seeds": seeds}
    for metric in ("clean_acc", "asr_backdoor", "recall", "precision", "removed_share", "cost_vs_base"):
        values = [mine[s].get(metric) for s in seeds]
        out[metric] = None if any(v is None for v in values) else mean_std(values)[0]
    paired = [s for s in seeds if s in none]
    for metric in ("clean_acc", "asr_backdoor"):
        out["d_" + metric] = (None if key[0] == "none" or not paired else
                              paired_ci([mine[s][metric] for s in paired], [none[s][metric] for s in paired]))
    return out


def _with_delta(value: float, delta: Optional[tuple]) -> str:
    text = f"{100 * value:.1f}"
    if delta is None:
        return text
    mean, (low, high) = delta
    if not math.isfinite(low):
        return f"{text} ({100 * mean:+.1f})"
    return f"{text} ({100 * mean:+.1f} ± {100 * (high - low) / 2:.1f})"


def _flags(c: dict, budget: float) -> str:
    if c["recall"] is None:
        return "–"
    text = f"{100 * c['recall']:.0f} / {100 * c['precision']:.0f}"
    removed = c["removed_share"]
    return text if abs(removed - budget) < 0.0015 else f"{text} (rm {100 * removed:.1f}%)"


def meets_goal(c: dict, budget: float) -> bool:
    """The trigger-unknown goal on seed means: ASR <= 5%, clean accuracy at most 1 point below ``none``'s,
    at most the budget removed."""
    return (c["asr_backdoor"] <= 0.05 and c["d_clean_acc"] is not None and c["d_clean_acc"][0] >= -0.01
            and (c["removed_share"] is None or c["removed_share"] <= budget + 1e-9))


def render_group(title: str, settings: dict) -> str:
    """The tables of one data set x rate x trainer: ``settings`` maps each attack to its setting's measurements."""
    attacks = list(settings)
    budget = next(iter(settings.values()))["budget"]
    keys = _row_order(_row_key(r) for s in settings.values() for r in s["runs"])
    cells = {(k, a): cell(settings[a], k) for k in keys for a in attacks}
    head = "| recipe | " + " | ".join(attacks) + " |"
    rule = "|---|" + "---|" * len(attacks)
    seeds = "; ".join(f"{a} {len(settings[a]['base'])}" for a in attacks)
    lines = [f"### {title}", "", f"Budget {100 * budget:g}% removed. Seeds per attack: {seeds} (a cell with fewer "
             "seeds says so).", ""]

    def table(caption: str, fmt) -> None:
        lines.extend([caption, "", head, rule])
        for k in keys:
            texts = []
            for a in attacks:
                c = cells[(k, a)]
                if c is None:
                    texts.append("")
                    continue
                text = fmt(c)
                short = len(c["seeds"]) < len(settings[a]["base"])
                texts.append(text + (f" [{len(c['seeds'])} seeds]" if short else ""))
            lines.append(f"| {_label(k)} | " + " | ".join(texts) + " |")
        lines.append("")

    table("Backdoor ASR % (paired Δ vs none ± 95% half-interval, points):",
          lambda c: _with_delta(c["asr_backdoor"], c["d_asr_backdoor"]))
    table("Clean accuracy % (paired Δ vs none ± 95% half-interval, points):",
          lambda c: _with_delta(c["clean_acc"], c["d_clean_acc"]))
    costs = {k: [cells[(k, a)]["cost_vs_base"] for a in attacks
                 if cells[(k, a)] is not None and cells[(k, a)]["cost_vs_base"] is not None] for k in keys}
    timed = any(costs.values())  # the earlier settings' rows carry no cost
    lines.extend(["Recall / precision % of the removed samples against the true poisons (rm: the share removed, "
                  "where not the budget)" + ("; cost: CPU time of the defence (detection and retraining; `none`: "
                  "the training itself) / one training run, mean over the cells:" if timed else ":"), "",
                  head[:-1] + ("| cost × |" if timed else "|"), rule + ("---|" if timed else "")])
    for k in keys:
        texts = ["" if cells[(k, a)] is None else _flags(cells[(k, a)], budget) for a in attacks]
        cost = (f" {sum(costs[k]) / len(costs[k]):.2f} |" if costs[k] else " – |") if timed else ""
        lines.append(f"| {_label(k)} | " + " | ".join(texts) + " |" + cost)
    lines += ["", "Trigger unknown, ASR <= 5% at <= 1 point of clean accuracy (seed means):"]
    for a in attacks:
        unknown = [k for k in keys if k[1] is None and k[0] != "none" and cells[(k, a)] is not None]
        if not unknown:
            continue
        best = min(unknown, key=lambda k: cells[(k, a)]["asr_backdoor"])
        met = [_label(k) for k in unknown if meets_goal(cells[(k, a)], budget)]
        clean = cells[(best, a)]["d_clean_acc"]
        clean = "" if clean is None else f", clean {100 * clean[0]:+.1f}"
        lines.append(f"- {a}: {', '.join(met) if met else '**nothing**'} (lowest ASR: {_label(best)} "
                     f"{100 * cells[(best, a)]['asr_backdoor']:.1f}%{clean})")
    return "\n".join(lines)


def groups(measured: dict) -> dict:
    """``{(data, trainer, rate): {attack: setting}}`` of the measured settings, in their order."""
    out: dict = {}
    for setting in measured.values():
        out.setdefault((setting["data"], setting["trainer"], setting["rate"]), {})[setting["attack"]] = setting
    return out


def _title(key: tuple) -> str:
    data, trainer, rate = key
    return f"{data}, {trainer}, {100 * rate:g}% poisoned"


def build_section(grid: dict, kept: dict, missing: list) -> str:
    """The ``poisoning`` section of RESULTS.md."""
    parts = ["## Poisoned training data (`experiments/poisoning.py`)", "",
             "BackdoorBench's layout: per data set, poison rate and trainer, rows are defences (poisoning recipes) "
             "and columns attacks. MNIST / Fashion-MNIST 3,500 training, 500 validation (10 of them triggered as "
             "the evidence of `remove-poisons`, the rest the clean split every recipe may use), 1,000 test images, "
             "SmallCNN, 5 epochs; target class 0; budget twice the rate. ASR: triggered test inputs of the other "
             "classes classified as class 0. Recall / precision: of the removed samples against the true poisons "
             "(– where a defence removes none by design). Δ are paired per seed against `none` (no defence); "
             "± the half-width of the 95% t-interval. Cost: CPU time of the defence over one training of the "
             "base model, measured in the same process (`cost_vs_base` of the per-seed rows). `backdoor-scan`: "
             "the trigger-unknown scan with the clean validation split as trusted data, retrained without what "
             "it flags, the model unchanged when its verdict is \"nothing found\" (`remove_poisons(model, train, "
             "None, ...)` runs the same: the recipe `remove-poisons-unknown` gives equal rows); `abl`: Anti-Backdoor "
             "Learning with its published defaults (it isolates 1% whatever the budget); `remove-poisons K=10`: "
             "`remove_poisons` with 10 triggered validation inputs as evidence (threat model \"evidence known\"); "
             "`evidence-retrain K=10` / `evidence-finetune K=10`: the same evidence alone, nothing removed "
             "(retrained from scratch on the training split plus the evidence under its true labels, repeated; "
             "the poisoned model fine-tuned on the evidence plus the clean validation split), the baselines "
             "that show what the removal adds; "
             "`evidence-influence K=10`: the budget's largest renormalised ip harms on the loss of the same 10 "
             "inputs under their true labels removed, retrained; `evidence-influence-trak K=10`: the same with TRAK "
             "(projection 512) over 10 models trained on random halves, their training in its cost (the best "
             "per-example LDS on the SmallCNN, section lds-per-example); these two ran in "
             "`experiments/out/poisoning_methods` on the grid's base models (same hash per seed).",
             ""]
    for key, settings in groups(grid).items():
        parts += [render_group(_title(key), settings), ""]
    if missing:
        parts += ["Not run (time): " + ", ".join(missing) + ".", ""]
    if kept:
        parts += ["### Earlier settings, kept as they were", "",
                  "Measured by an earlier version of this script (K = 10 and 50, `random` and `self`, the earlier "
                  "trigger-unknown detector as `remove-poisons-unknown`); the grid does not cover them: digits "
                  "(8x8, MLP, 2x2 patch), MNIST with ART's clean-label backdoor (too weak: base ASR 23-34%) and "
                  "MNIST PGD-AT BadNets 5%.", ""]
        for key, settings in groups(kept).items():
            parts += [render_group(_title(key), settings).replace("### ", "#### ", 1), ""]
    return "\n".join(parts)


def plot_asr(measured: dict, path: Path) -> None:
    """One heat map per data set x rate x trainer: the mean backdoor ASR of every recipe (rows) and attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups(measured)
    fig, axes = plt.subplots(len(grouped), 1, figsize=(8, 4.5 * len(grouped)), squeeze=False)
    for ax, (key, settings) in zip(axes[:, 0], grouped.items()):
        keys = _row_order(_row_key(r) for s in settings.values() for r in s["runs"])
        values = [[(cell(s, k) or {"asr_backdoor": math.nan})["asr_backdoor"] * 100 for s in settings.values()]
                  for k in keys]
        ax.imshow(values, cmap="Reds", vmin=0, vmax=100, aspect="auto")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, "" if math.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(settings)), list(settings))
        ax.set_yticks(range(len(keys)), [_label(k) for k in keys])
        ax.set_title(f"backdoor ASR %: {_title(key)}")
    save_figure(fig, path)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny digits run for the smoke test (writes only its JSON)")
    parser.add_argument("--settings", nargs="+", default=list(GRID), choices=list(GRID),
                        help="grid settings to run (default: all, in priority order)")
    parser.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default: 5)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON of the cells (default experiments/out/poisoning[_quick].json); the per-setting "
                             "reports and per-seed caches go in the folder of the same name without .json")
    parser.add_argument("--plots", type=Path, default=EXPERIMENTS / "plots", help="folder of the PNG")
    parser.add_argument("--write-results", action="store_true",
                        help="run nothing: write the poisoning section of RESULTS.md from the per-seed files of "
                             "every grid setting and the reports of the settings kept from earlier")
    parser.add_argument("--rerun", nargs="+", default=[], metavar="RECIPE",
                        help="first delete these recipes' rows from the settings' per-seed files (after their code "
                             "changed), so that the run recomputes them")
    parser.add_argument("--only", nargs="+", default=None, metavar="RECIPE",
                        help="run only these of the grid's recipes (and none); default: all that are registered. "
                             "The METHOD_RECIPES (evidence-influence, evidence-influence-trak) run only when named "
                             "here, with --out experiments/out/poisoning_methods.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    stem = "poisoning_quick" if args.quick else "poisoning"
    out = args.out or EXPERIMENTS / "out" / f"{stem}.json"
    folder = out.with_suffix("")
    names = ["quick"] if args.quick else args.settings
    grid, kept, missing = {}, {}, []
    if args.write_results:
        for name in GRID:
            measured = load_setting(folder / name, folder.parent / METHODS_FOLDER / name)
            (missing.append(name) if measured is None else grid.__setitem__(name, measured))
        kept = {name: m for name in KEPT if (m := load_setting(folder / name)) is not None}
    else:
        for name in names:
            for recipe in args.rerun:
                print(f"{name}: {drop_rows(folder / name, recipe)} rows of {recipe} deleted to rerun", flush=True)
            run_setting(name, 1 if args.quick else args.seeds, folder, not args.no_progress, quick=args.quick,
                        only=args.only)
            grid[name] = load_setting(folder / name)
    for key, settings in groups(grid).items():
        print(render_group(_title(key), settings), "\n", flush=True)
    measured = {**grid, **kept}
    if measured:
        write_json(out, {name: {_label(k): cell(m, k) for k in _row_order(_row_key(r) for r in m["runs"])}
                         for name, m in measured.items()})
        plot_asr(measured, args.plots / f"{stem}.png")
    if args.write_results:
        write_section("poisoning", build_section(grid, kept, missing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
