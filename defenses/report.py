"""Summaries of a defence run: mean +- std over seeds, paired differences, Markdown table, plots, files.

Per-seed rows are ``{"seed", "recipe", "fraction", "clean_acc", "robust_acc_adaptive",
"robust_acc_transfer", "asr_adaptive", "worst_case", "attacks", "train_time", "cost_vs_erm"}``
(``fraction`` None for budget-free recipes and reference trainers). ``robust_acc_adaptive`` is the
accuracy under the attack re-run on the defended model; ``robust_acc_transfer`` the accuracy on the
base model's adversarial test points; ``asr_adaptive`` the share of clean-correct test points the
adaptive attack flips; ``attacks`` maps each attack of the evaluation suite to its ``robust_acc``
and ``asr`` and ``worst_case`` is the share correct under all of them; ``train_time`` is the wall
time to build the model, ``train_cpu_time`` the process's CPU time for it and ``cost_vs_erm`` its
ratio to one ERM fit (CPU time on the CPU, wall time on an accelerator).

A poisoning report (:func:`defenses.run_poisoning`, its ``config`` holds ``poison``) has per-seed rows
``{"seed", "recipe", "evidence", "threat", "clean_acc", "asr_backdoor", "robust_acc_adaptive", "precision",
"recall", "auroc", "removed_share", "train_time", "train_cpu_time", "cost_vs_base"}``
(:data:`POISON_METRICS` and the recipe's time; ``cost_vs_base`` is its ratio to the base model's
training), summarised per recipe and evidence size by :func:`summarise_poisoned`;
:func:`recommend_poisoned` picks the row to use. :func:`render_markdown` and :func:`write_report` write both kinds.
"""

from __future__ import annotations

from pathlib import Path
import math
from typing import Callable, Iterable, Optional, Sequence

from robust_infl.io import atomic_write, atomic_write_json, atomic_write_text

from .stats import half_width, mean_std, paired_difference

__all__ = ["METRICS", "POISON_METRICS", "POISON_BASE_METRICS", "mean_std", "paired_difference", "format_interval",
           "summarise", "summarise_base", "summarise_poisoned", "without_timing", "TIMING_KEYS", "recommend",
           "recommend_poisoned", "BACKDOOR_REMOVED",
           "pareto_front", "is_poisoning", "render_markdown", "plot_robust_vs_fraction", "plot_robust_vs_cost",
           "plot_asr_by_recipe", "write_report"]

METRICS = ("clean_acc", "robust_acc_adaptive", "robust_acc_transfer", "asr_adaptive", "worst_case", "train_time",
           "train_cpu_time", "cost_vs_erm")
POISON_METRICS = ("clean_acc", "asr_backdoor", "robust_acc_adaptive", "precision", "recall", "auroc", "removed_share")
POISON_BASE_METRICS = ("clean_acc", "asr_backdoor", "robust_acc_adaptive")
BACKDOOR_REMOVED = 0.05
"""The mean backdoor ASR at or below which a row removes the backdoor (the trigger-unknown goal's 5%): where no
row that keeps clean accuracy lowers the attack success, :func:`recommend_poisoned` picks such a row, its clean
cost stated, rather than no defence."""
_ATTACK_METRICS = ("robust_acc", "asr")


# wall-time measurements (evasion rows; a poisoning run's per-seed "timing") and what reads them
TIMING_KEYS = ("train_time", "train_cpu_time", "cost_vs_erm", "cost_vs_base", "recommendation", "timing")


def without_timing(value):
    """A report (or part of one) without its wall-time measurements and the recommendation that reads them:
    what a run with the same seeds reproduces bit for bit."""
    if isinstance(value, dict):
        return {k: without_timing(v) for k, v in value.items() if k not in TIMING_KEYS}
    if isinstance(value, list):
        return [without_timing(v) for v in value]
    return value


def summarise_base(rows: list) -> dict:
    """Mean ± std over seeds of the base model's metrics (:data:`METRICS`)."""
    return {m: mean_std(r[m] for r in rows) for m in METRICS}


def _key(row: dict) -> tuple:
    return row["recipe"], row["fraction"]


def summarise(rows: list, recipes: Iterable[str], fractions: Iterable[float], *, reference: str = "none",
              control: str = "random") -> list:
    """One summary per (recipe, fraction): metrics over seeds and paired differences.

    Differences are taken per seed against the ``reference`` recipe (no defence) and, at the same
    fraction, against the ``control`` recipe (random selection), when those were run.
    """
    by_key: dict = {}
    for row in rows:
        by_key.setdefault(_key(row), {})[row["seed"]] = row
    budget_free = [r for r in recipes if (r, None) in by_key]
    order = [(r, None) for r in budget_free] + [(r, f) for f in fractions for r in recipes if (r, f) in by_key]
    summary = []
    for recipe, fraction in order:
        runs = by_key[(recipe, fraction)]
        seeds = sorted(runs)
        entry = {"recipe": recipe, "fraction": fraction, "seeds": seeds,
                 "reference": bool(runs[seeds[0]].get("reference", False))}
        for metric in METRICS:
            entry[metric] = mean_std(runs[s][metric] for s in seeds)
        entry["attacks"] = {name: {m: mean_std(runs[s]["attacks"][name][m] for s in seeds) for m in _ATTACK_METRICS}
                            for name in runs[seeds[0]]["attacks"]}
        for label, other_key in (("vs_" + reference, (reference, None)), ("vs_" + control, (control, fraction))):
            other = by_key.get(other_key)
            if other is None or other_key == (recipe, fraction) or set(other) != set(runs):
                continue
            entry[label] = {m: paired_difference([runs[s][m] for s in seeds], [other[s][m] for s in seeds])
                            for m in METRICS}
        summary.append(entry)
    return summary


def summarise_poisoned(rows: list, recipes: Sequence[str]) -> list:
    """Per (recipe, evidence): each metric's mean ± std over seeds (and ``cost_vs_base``'s, None when a seed file
    written before it was measured lacks it), paired differences vs ``none`` and ``random``."""
    by_key: dict = {}
    for row in rows:
        by_key.setdefault((row["recipe"], row["evidence"]), {})[row["seed"]] = row
    summary = []
    for (recipe, size), runs in sorted(by_key.items(), key=lambda kv: (list(recipes).index(kv[0][0]), kv[0][1] or 0)):
        seeds = sorted(runs)
        entry = {"recipe": recipe, "evidence": size, "threat": runs[seeds[0]]["threat"], "seeds": seeds}
        for metric in POISON_METRICS:
            values = [runs[s][metric] for s in seeds]
            entry[metric] = None if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values) \
                else mean_std(values)
        costs = [runs[s].get("cost_vs_base") for s in seeds]
        entry["cost_vs_base"] = None if None in costs else mean_std(costs)
        for control in ("none", "random"):
            other = by_key.get((control, None))
            if other is None or control == recipe or set(other) != set(runs):
                continue
            entry["vs_" + control] = {
                m: paired_difference([runs[s][m] for s in seeds], [other[s][m] for s in seeds])
                for m in POISON_METRICS
                if all(runs[s][m] is not None and other[s][m] is not None for s in seeds)}
        summary.append(entry)
    return summary


def _name(entry: dict) -> str:
    return entry["recipe"] + ("" if entry["fraction"] is None else f" @ {entry['fraction']:g}")


def pareto_front(summary: list, metric: str = "robust_acc_adaptive") -> list:
    """The entries no other entry beats on both mean ``cost_vs_erm`` (lower) and mean ``metric`` (higher),
    sorted by cost."""
    def dominated(e):
        return any(o["cost_vs_erm"]["mean"] <= e["cost_vs_erm"]["mean"] and o[metric]["mean"] >= e[metric]["mean"]
                   and (o["cost_vs_erm"]["mean"], o[metric]["mean"]) != (e["cost_vs_erm"]["mean"], e[metric]["mean"])
                   for o in summary)

    return sorted((e for e in summary if not dominated(e)), key=lambda e: e["cost_vs_erm"]["mean"])


def _cheapest_near_best(entries: list, none: Optional[dict], tolerance: float, score: Callable[[dict], float],
                        cost: Callable[[dict], float]) -> tuple:
    """The one selection rule of both pipelines' recommendations: among the ``entries`` whose mean clean accuracy
    is at most ``tolerance`` below ``none``'s (all of them when none qualifies or ``none`` is None), the
    cheapest whose ``score`` (higher is better) is within ``tolerance`` of the best, ties to the higher score.
    Returns ``(pick, best, allowed)``."""
    allowed = [e for e in entries if none is None or e["clean_acc"]["mean"] >= none["clean_acc"]["mean"] - tolerance]
    allowed = allowed or list(entries)
    best = max(allowed, key=score)
    close = [e for e in allowed if score(e) >= score(best) - tolerance]
    return min(close, key=lambda e: (cost(e), -score(e))), best, allowed


def recommend(summary: list, *, tolerance: float = 0.01) -> dict:
    """The row to pick: the cheapest (mean ``cost_vs_erm``) whose mean adaptive robust accuracy is within
    ``tolerance`` of the best row's, among the rows whose clean accuracy is at most ``tolerance`` below
    ``none``'s (all rows when none qualifies or ``none`` was not run).

    Returns ``{"recipe", "fraction", "reason"}`` (the reason in one line, figures in %; it also names the
    most robust row when the clean-accuracy bound excluded it).
    """
    none = next((e for e in summary if e["recipe"] == "none"), None)
    pick, best, allowed = _cheapest_near_best(summary, none, tolerance, lambda e: e["robust_acc_adaptive"]["mean"],
                                              lambda e: e["cost_vs_erm"]["mean"])
    robust, cost, clean = (pick[m]["mean"] for m in ("robust_acc_adaptive", "cost_vs_erm", "clean_acc"))
    kept = "" if len(allowed) == len(summary) else f" that keeps clean accuracy within {100 * tolerance:g} point(s)"
    if pick is best:
        why = f"the most robust row{kept}"
    else:
        why = (f"within {100 * tolerance:g} point(s) of the most robust row{kept} ({_name(best)}, "
               f"{100 * best['robust_acc_adaptive']['mean']:.1f}) and the cheapest such")
    clean_note = "" if none is None else f"clean {100 * clean:.1f} vs {100 * none['clean_acc']['mean']:.1f} for none"
    reason = (f"pick {_name(pick)}: robust {100 * robust:.1f} (adaptive) at {cost:.2f}x the cost of ERM, {why}"
              + (f"; {clean_note}" if clean_note else ""))
    strongest = max(summary, key=lambda e: e["robust_acc_adaptive"]["mean"])
    if none is not None and strongest["robust_acc_adaptive"]["mean"] > best["robust_acc_adaptive"]["mean"] + tolerance:
        lost = 100 * (none["clean_acc"]["mean"] - strongest["clean_acc"]["mean"])
        reason += (f"; if {lost:.1f} clean points are affordable, {_name(strongest)} is more robust "
                   f"({100 * strongest['robust_acc_adaptive']['mean']:.1f}, {strongest['cost_vs_erm']['mean']:.2f}x)")
    return {"recipe": pick["recipe"], "fraction": pick["fraction"], "reason": reason + "."}


def _poison_label(entry: dict) -> str:
    return entry["recipe"] + ("" if entry["evidence"] is None else f" K={entry['evidence']}")


def _poison_cost(entry: dict) -> float:
    return math.inf if entry.get("cost_vs_base") is None else entry["cost_vs_base"]["mean"]


def _pick_against_backdoor(entries: list, none: Optional[dict], tolerance: float) -> dict:
    """The cheapest row near the lowest attack success among those that keep clean accuracy
    (:func:`_cheapest_near_best`). Where ``none`` is among those rows (no row that keeps clean accuracy lowers the
    attack success by more than ``tolerance``; a timing-noise-cheaper row that does nothing is no pick): the row
    with the highest clean accuracy among those that remove the backdoor (mean ASR at most
    :data:`BACKDOOR_REMOVED`; ties to the cheaper), its clean cost stated by :func:`_describe_pick`, else ``none``
    (no row removes it, or there is no backdoor to remove)."""
    pick, best, allowed = _cheapest_near_best(entries, none, tolerance, lambda e: -e["asr_backdoor"]["mean"],
                                              _poison_cost)
    if not (any(e is none for e in allowed) and
            none["asr_backdoor"]["mean"] <= best["asr_backdoor"]["mean"] + tolerance):
        return pick
    removing = [e for e in entries if e is not none and e["asr_backdoor"]["mean"] <= BACKDOOR_REMOVED]
    if removing and none["asr_backdoor"]["mean"] > BACKDOOR_REMOVED:
        return max(removing, key=lambda e: (e["clean_acc"]["mean"], -_poison_cost(e)))
    return none


def _describe_pick(entry: dict, none: Optional[dict], tolerance: float) -> str:
    if entry is none:
        asr = 100 * entry["asr_backdoor"]["mean"]
        if entry["asr_backdoor"]["mean"] <= BACKDOOR_REMOVED:
            return f"pick none (no defence): the backdoor does not take (ASR {asr:.1f} without a defence)"
        return (f"pick none (no defence): no row that keeps clean accuracy within {100 * tolerance:g} point(s) lowers "
                f"the backdoor ASR ({asr:.1f}) by more than {100 * tolerance:g} point(s), and no row brings it to "
                f"{100 * BACKDOOR_REMOVED:g}% or below")
    parts = [f"backdoor ASR {100 * entry['asr_backdoor']['mean']:.1f}"
             + ("" if none is None else f" (none {100 * none['asr_backdoor']['mean']:.1f})")]
    if entry.get("recall") is not None:
        parts.append(f"{100 * entry['recall']['mean']:.1f}% of the poisons removed")
    costly = none is not None and entry["clean_acc"]["mean"] < none["clean_acc"]["mean"] - tolerance
    clean = f"clean {100 * entry['clean_acc']['mean']:.1f}"
    if none is not None:
        change = entry.get("vs_none", {}).get("clean_acc")
        clean += f" (none {100 * none['clean_acc']['mean']:.1f}" + (
            f"; {100 * change['mean']:+.1f}{format_interval(change)})" if costly and change else ")")
    parts.append(clean)
    cost = _poison_cost(entry)
    parts.append("cost not measured" if math.isinf(cost) else f"{cost:.2f}x the base model's training")
    why = (f", the row that removes the backdoor at the smallest clean cost (no row within {100 * tolerance:g} "
           "point(s) of clean accuracy lowers its ASR)" if costly else "")
    return f"pick {_poison_label(entry)}{why}: " + ", ".join(parts)


def recommend_poisoned(summary: list, *, tolerance: float = 0.01) -> dict:
    """The row of a poisoning summary (:func:`summarise_poisoned`) to pick against the backdoor, per defender
    threat model: with the trigger unknown (the rows that need no evidence) and with evidence known (every
    row). Among the rows whose clean accuracy is at most ``tolerance`` below ``none``'s (all rows when none
    qualifies or ``none`` was not run), the cheapest (mean ``cost_vs_base``) whose mean backdoor ASR is
    within ``tolerance`` of the lowest. Where ``none`` is itself within ``tolerance`` of that lowest ASR (no row
    that keeps clean accuracy lowers the attack success): the row that removes the backdoor (mean ASR at most
    :data:`BACKDOOR_REMOVED`) at the highest clean accuracy, with its clean change and paired interval in the
    reason, else ``none``. A backdoor left in place is a hole; a clean cost is stated and can be weighed.

    Returns ``{"unknown": label or None, "evidence": label or None, "reason": one line}`` (labels as in
    the report: ``recipe`` or ``recipe K=<evidence size>``; figures in %). The reason also names the
    lowest ASR of the rows not picked.
    """
    none = next((e for e in summary if e["recipe"] == "none"), None)
    unknown = [e for e in summary if e["threat"] != "evidence"]
    picks = {"unknown": _pick_against_backdoor(unknown, none, tolerance) if unknown else None,
             "evidence": (_pick_against_backdoor(summary, none, tolerance)
                          if len(unknown) < len(summary) else None)}
    clauses = [f"{threat}: {_describe_pick(pick, none, tolerance)}"
               for threat, pick in (("trigger unknown", picks["unknown"]), ("evidence known", picks["evidence"]))
               if pick is not None]
    others = [e for e in summary if e["recipe"] != "none" and all(e is not p for p in picks.values())]
    if others:
        best = min(others, key=lambda e: e["asr_backdoor"]["mean"])
        clauses.append(f"best other row: {_poison_label(best)}, "
                       f"backdoor ASR {100 * best['asr_backdoor']['mean']:.1f} at clean "
                       f"{100 * best['clean_acc']['mean']:.1f}, {_poison_cost(best):.2f}x")
    labels = {key: None if pick is None else _poison_label(pick) for key, pick in picks.items()}
    return {**labels, "reason": "; ".join(clauses) + "."}


def _pct(stat: Optional[dict], scale: float = 100.0, digits: int = 1) -> str:
    if stat is None:
        return "–"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def format_interval(stat: dict, scale: float = 100.0) -> str:
    """The 95% interval of a :func:`paired_difference` as `` [lo, hi]`` (scaled), its note where the
    interval is degenerate, or nothing (one pair)."""
    if stat.get("ci95"):
        lo, hi = stat["ci95"]
        return f" [{scale * lo:+.1f}, {scale * hi:+.1f}]"
    return f" [{stat['ci95_note']}]" if stat.get("ci95_note") else ""


def _delta(stat: Optional[dict], *, std: bool = True) -> str:
    if stat is None:
        return "–"
    return f"{100 * stat['mean']:+.1f}" + (f" ± {100 * stat['std']:.1f}" if std else "") + format_interval(stat)


def _threat(cfg: dict) -> str:
    """The attack with only the parameters it uses (eps / norm, steps)."""
    text = cfg["attack"] + ("" if cfg["eps"] is None else f" {cfg['norm']} eps={cfg['eps']}")
    return text + ("" if cfg.get("steps") is None else f", {cfg['steps']} steps")


def _bounds(cfg: dict) -> list:
    """The line on the input bounds of the attack and the adversarial trainers (none in older reports)."""
    if "bounds" not in cfg:
        return []
    return [f"Input bounds: {'none (unbounded)' if cfg['bounds'] is None else cfg['bounds']}.", ""]


def is_poisoning(report: dict) -> bool:
    """Whether ``report`` is a poisoning report (:func:`defenses.run_poisoning`)."""
    return "poison" in report["config"]


def render_markdown(report: dict) -> str:
    """The report as Markdown. Evasion: the before/after table (accuracies in %, mean ± std over seeds; Δ:
    paired, with 95% t-interval), the per-attack table of the evaluation suite and the recommended row;
    poisoning: :func:`_render_poisoning`."""
    if is_poisoning(report):
        return _render_poisoning(report)
    cfg = report["config"]
    references = cfg.get("references") or []
    lines = [
        f"# Defence report: {cfg['data']} / {cfg['model']} / {cfg['attack']}",
        "",
        f"Threat model: {_threat(cfg)}; scores: {cfg['method']} on Robust(attack) "
        f"over the validation split; mode={cfg['mode']}, retrain={cfg['retrain']}, trainer={cfg['trainer']}; "
        f"seeds {cfg['seeds']}.",
        "References (same data, schedule and seed): " + (", ".join(references) if references else
                                                           "none (the run's own trainer, row `none`)") + ".",
        "",
        *_bounds(cfg),
        "| recipe | fraction | clean acc | robust acc (adaptive) | robust acc (transfer) | ASR (adaptive) "
        "| worst case | cost vs ERM | Δ robust vs none | Δ robust vs random | Δ clean vs none |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["summary"]:
        fraction = "–" if entry["fraction"] is None else f"{entry['fraction']:g}"
        vs_none = entry.get("vs_none", {})
        vs_random = entry.get("vs_random", {})
        name = entry["recipe"] + (" (reference)" if entry.get("reference") else "")
        lines.append(
            f"| {name} | {fraction} | {_pct(entry['clean_acc'])} | {_pct(entry['robust_acc_adaptive'])} "
            f"| {_pct(entry['robust_acc_transfer'])} | {_pct(entry['asr_adaptive'])} | {_pct(entry['worst_case'])} "
            f"| {entry['cost_vs_erm']['mean']:.2f} | {_delta(vs_none.get('robust_acc_adaptive'))} "
            f"| {_delta(vs_random.get('robust_acc_adaptive'))} | {_delta(vs_none.get('clean_acc'))} |")
    base = report["base"]
    lines += ["", f"Base model (before any defence): clean {_pct(base['clean_acc'])}, "
              f"robust {_pct(base['robust_acc_adaptive'])}.",
              "Accuracies in %, mean ± std over seeds; Δ are paired per seed, mean ± std [95% t-interval]. "
              "Adaptive: the attack re-run on the model; transfer: the base model's adversarial test points; "
              "ASR: the share of clean-correct test points the adaptive attack flips. Cost: time to build the "
              "model (scoring, selection and training) over one ERM fit of the same schedule, same seed (CPU "
              "time of the process on the CPU, wall time on an accelerator)."]
    suite = cfg.get("eval_attacks") or []
    if len(suite) > 1:
        lines += ["", f"Evaluation suite on the first {cfg['eval_subset']} test points of each seed "
                  "(robust acc / ASR in %, adaptive); worst case: correct under every attack.", "",
                  "| recipe | fraction | " + " | ".join(suite) + " | worst case |",
                  "|---|---|" + "---|" * (len(suite) + 1)]
        for entry in report["summary"]:
            fraction = "–" if entry["fraction"] is None else f"{entry['fraction']:g}"
            cells = [f"{100 * entry['attacks'][a]['robust_acc']['mean']:.1f} / "
                     f"{100 * entry['attacks'][a]['asr']['mean']:.1f}" for a in suite]
            lines.append(f"| {entry['recipe']} | {fraction} | " + " | ".join(cells)
                         + f" | {_pct(entry['worst_case'])} |")
    if report.get("recommendation"):
        lines += ["", f"**Recommendation:** {report['recommendation']['reason']}"]
    return "\n".join(lines) + "\n"


def _render_poisoning(report: dict) -> str:
    """Markdown table of a poisoning report (percentages, mean ± std over seeds; Δ paired with 95% t-interval)."""
    cfg = report["config"]
    spec = cfg["poison"]
    lines = [f"# Poisoning report: {cfg['data']} / {cfg['model']} / trainer {cfg['trainer']}", "",
             f"{spec['attack']} at rate {spec['rate']:g}, target class {spec['target_class']}, patch "
             f"{spec['patch_size']}x{spec['patch_size']}; budget {spec['budget']:g} of the training split; "
             f"evasion attack {cfg['attack']}; seeds {cfg['seeds']}.", "",
             "| recipe | threat | K | clean acc | backdoor ASR | Δ ASR vs none | Δ clean vs none | precision | recall "
             "| AUROC | robust acc | removed | cost vs base |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["summary"]:
        vs_none = e.get("vs_none", {})
        lines.append(
            f"| {e['recipe']} | {e['threat']} | {e['evidence'] or '–'} | {_pct(e['clean_acc'])} "
            f"| {_pct(e['asr_backdoor'])} | {_delta(vs_none.get('asr_backdoor'), std=False)} "
            f"| {_delta(vs_none.get('clean_acc'), std=False)} | {_pct(e['precision'])} | {_pct(e['recall'])} "
            f"| {_pct(e['auroc'], 1.0, 3)} | {_pct(e['robust_acc_adaptive'])} | {_pct(e['removed_share'])} "
            f"| {'–' if e.get('cost_vs_base') is None else format(e['cost_vs_base']['mean'], '.2f')} |")
    lines += ["", "Percentages (AUROC as a number), mean ± std over seeds; Δ paired per seed with the 95% t-interval. "
              "Backdoor ASR: triggered test inputs of the other classes classified as the target class. "
              "Precision / recall of the removed samples against the true poisons; robust acc: the evasion "
              "attack re-run on each model; cost vs base: the recipe's time (detection and retraining) over the "
              "base model's training."]
    if report.get("recommendation"):
        lines += ["", f"**Recommendation:** {report['recommendation']['reason']}"]
    return "\n".join(lines) + "\n"


def plot_robust_vs_fraction(report: dict, path) -> None:
    """Adaptive robust accuracy against the budget, one line per recipe (budget-free ones dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    budgeted: dict = {}
    for entry in report["summary"]:
        if entry["fraction"] is None:
            ax.axhline(100 * entry["robust_acc_adaptive"]["mean"], linestyle="--", linewidth=1, label=entry["recipe"],
                       color="gray" if entry["recipe"] == "none" else None)
        else:
            budgeted.setdefault(entry["recipe"], []).append(entry)
    for recipe, entries in budgeted.items():
        ax.errorbar([e["fraction"] for e in entries], [100 * e["robust_acc_adaptive"]["mean"] for e in entries],
                    yerr=[100 * e["robust_acc_adaptive"]["std"] for e in entries], marker="o", capsize=3, label=recipe)
    cfg = report["config"]
    ax.set_xlabel(f"fraction {'removed' if cfg['mode'] == 'prune' else 'down-weighted'}")
    ax.set_ylabel("robust test accuracy, adaptive (%)")
    ax.set_title(f"{cfg['data']} / {cfg['model']} / {_threat(cfg)}")
    ax.legend()
    fig.tight_layout()
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(fig)


def plot_robust_vs_cost(report: dict, path) -> None:
    """Adaptive robust accuracy (mean with its 95% t-interval over seeds) against training cost (x ERM), one
    point per row, the Pareto front (no row both cheaper and more robust) joined and marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    front = pareto_front(summary)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for entry in summary:
        on_front = any(entry is f for f in front)
        ax.errorbar(entry["cost_vs_erm"]["mean"], 100 * entry["robust_acc_adaptive"]["mean"],
                    yerr=100 * half_width(entry["robust_acc_adaptive"]), marker="s" if entry.get("reference") else "o",
                    capsize=3, linestyle="none", color="tab:red" if on_front else "tab:blue")
        ax.annotate(_name(entry), (entry["cost_vs_erm"]["mean"], 100 * entry["robust_acc_adaptive"]["mean"]),
                    textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.plot([e["cost_vs_erm"]["mean"] for e in front], [100 * e["robust_acc_adaptive"]["mean"] for e in front],
            color="tab:red", linewidth=1, label="Pareto front")
    cfg = report["config"]
    ax.set_xlabel("training cost (x one ERM fit, same schedule)")
    ax.set_ylabel("robust test accuracy, adaptive (%), 95% interval")
    ax.set_title(f"{cfg['data']} / {cfg['model']} / {_threat(cfg)}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    finally:
        plt.close(fig)


def plot_asr_by_recipe(report: dict, path) -> None:
    """A poisoning report's backdoor ASR per recipe (mean ± std over seeds), the 5% mark dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report["summary"]
    labels = [e["recipe"] + ("" if e["evidence"] is None else f" K={e['evidence']}") for e in entries]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(entries) + 1.5))
    ax.barh(labels, [100 * e["asr_backdoor"]["mean"] for e in entries],
            xerr=[100 * e["asr_backdoor"]["std"] for e in entries], color="tab:red", alpha=0.7)
    ax.invert_yaxis()
    ax.axvline(5, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("backdoor attack success rate (%)")
    ax.set_title(f"{report['config']['data']} / {report['config']['poison']['attack']} / {report['config']['trainer']}")
    fig.tight_layout()
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    finally:
        plt.close(fig)


def write_report(report: dict, out_dir) -> dict:
    """Write ``report.json``, ``report.md`` and the plots: ``robust_vs_cost.png`` and, with several fractions,
    ``robust_vs_fraction.png`` (evasion), or ``asr_by_recipe.png`` (poisoning).

    Each file is written atomically (:mod:`robust_infl.io`): never half written.

    Returns ``{name: path}`` of the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["markdown"], render_markdown(report))
    if is_poisoning(report):
        paths["asr_plot"] = out / "asr_by_recipe.png"
        plot_asr_by_recipe(report, paths["asr_plot"])
        return paths
    paths["cost_plot"] = out / "robust_vs_cost.png"
    plot_robust_vs_cost(report, paths["cost_plot"])
    if len(report["config"]["fractions"]) > 1:
        paths["plot"] = out / "robust_vs_fraction.png"
        plot_robust_vs_fraction(report, paths["plot"])
    return paths
