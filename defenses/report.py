"""Summaries of a defence run: mean +- std over seeds, paired differences, Markdown table, plot, files.

Per-seed rows are ``{"seed", "recipe", "fraction", "clean_acc", "robust_acc", "transfer_acc"}``
(``fraction`` None for budget-free recipes). ``robust_acc`` is adaptive (the attack re-run on the
defended model); ``transfer_acc`` is the accuracy on the base model's adversarial test points.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable, Optional

from robust_infl.io import atomic_write, atomic_write_json, atomic_write_text

__all__ = ["METRICS", "mean_std", "paired_difference", "summarise", "render_markdown", "plot_robust_vs_fraction",
           "write_report"]

METRICS = ("clean_acc", "robust_acc", "transfer_acc")
DEGENERATE_INTERVAL = "n/a: identical differences"
_LABELS = {"clean_acc": "clean acc", "robust_acc": "robust acc (adaptive)", "transfer_acc": "robust acc (transfer)"}


def mean_std(values: Iterable[float]) -> dict:
    """``{"mean", "std", "n"}`` with the sample standard deviation (0 for one value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("values: empty")
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": m, "std": s, "n": len(vals)}


def paired_difference(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> dict:
    """Mean, std and two-sided t confidence interval (``ci95``) of ``a - b``.

    ``ci95`` is None for one pair, and for identical differences (std 0: a zero-width interval would
    read as certainty), which also get ``ci95_note`` ``"n/a: identical differences"``.
    """
    from scipy import stats

    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    out = mean_std(diffs)
    if len(diffs) < 2:
        out["ci95"] = None
    elif out["std"] == 0.0:
        out["ci95"], out["ci95_note"] = None, DEGENERATE_INTERVAL
    else:
        half = float(stats.t.ppf(0.5 + level / 2, len(diffs) - 1)) * out["std"] / math.sqrt(len(diffs))
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out


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
        entry = {"recipe": recipe, "fraction": fraction, "seeds": seeds}
        for metric in METRICS:
            entry[metric] = mean_std(runs[s][metric] for s in seeds)
        for label, other_key in (("vs_" + reference, (reference, None)), ("vs_" + control, (control, fraction))):
            other = by_key.get(other_key)
            if other is None or other_key == (recipe, fraction) or set(other) != set(runs):
                continue
            entry[label] = {m: paired_difference([runs[s][m] for s in seeds], [other[s][m] for s in seeds])
                            for m in METRICS}
        summary.append(entry)
    return summary


def _pct(stat: dict) -> str:
    return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _delta(stat: Optional[dict]) -> str:
    if stat is None:
        return "–"
    text = f"{100 * stat['mean']:+.1f} ± {100 * stat['std']:.1f}"
    if stat.get("ci95"):
        lo, hi = stat["ci95"]
        text += f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    elif stat.get("ci95_note"):
        text += f" [{stat['ci95_note']}]"
    return text


def _threat(cfg: dict) -> str:
    """The attack with only the parameters it uses (eps / norm, steps)."""
    text = cfg["attack"] + ("" if cfg["eps"] is None else f" {cfg['norm']} eps={cfg['eps']}")
    return text + ("" if cfg.get("steps") is None else f", {cfg['steps']} steps")


def _bounds(cfg: dict) -> list:
    """The line on the input bounds of the attack and the adversarial trainers (none in older reports)."""
    if "bounds" not in cfg:
        return []
    return [f"Input bounds: {'none (unbounded)' if cfg['bounds'] is None else cfg['bounds']}.", ""]


def render_markdown(report: dict) -> str:
    """The before/after table (accuracies in %, mean ± std over seeds; Δ: paired, with 95% t-interval)."""
    cfg = report["config"]
    lines = [
        f"# Defence report: {cfg['data']} / {cfg['model']} / {cfg['attack']}",
        "",
        f"Threat model: {_threat(cfg)}; scores: {cfg['method']} on Robust(attack) "
        f"over the validation split; mode={cfg['mode']}, retrain={cfg['retrain']}, trainer={cfg['trainer']}; "
        f"seeds {cfg['seeds']}.",
        "",
        *_bounds(cfg),
        "| recipe | fraction | clean acc | robust acc (adaptive) | robust acc (transfer) "
        "| Δ robust vs none | Δ robust vs random | Δ clean vs none |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in report["summary"]:
        fraction = "–" if entry["fraction"] is None else f"{entry['fraction']:g}"
        vs_none = entry.get("vs_none", {})
        vs_random = entry.get("vs_random", {})
        lines.append(
            f"| {entry['recipe']} | {fraction} | {_pct(entry['clean_acc'])} | {_pct(entry['robust_acc'])} "
            f"| {_pct(entry['transfer_acc'])} | {_delta(vs_none.get('robust_acc'))} "
            f"| {_delta(vs_random.get('robust_acc'))} | {_delta(vs_none.get('clean_acc'))} |")
    base = report["base"]
    lines += ["", f"Base model (before any defence): clean {_pct(base['clean_acc'])}, "
              f"robust {_pct(base['robust_acc'])}.",
              "Accuracies in %, mean ± std over seeds; Δ are paired per seed, mean ± std [95% t-interval]. "
              "Adaptive: the attack re-run on the defended model; transfer: the base model's adversarial test points."]
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
            ax.axhline(100 * entry["robust_acc"]["mean"], linestyle="--", linewidth=1, label=entry["recipe"],
                       color="gray" if entry["recipe"] == "none" else None)
        else:
            budgeted.setdefault(entry["recipe"], []).append(entry)
    for recipe, entries in budgeted.items():
        ax.errorbar([e["fraction"] for e in entries], [100 * e["robust_acc"]["mean"] for e in entries],
                    yerr=[100 * e["robust_acc"]["std"] for e in entries], marker="o", capsize=3, label=recipe)
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


def write_report(report: dict, out_dir) -> dict:
    """Write ``report.json``, ``report.md`` and, with several fractions, ``robust_vs_fraction.png``.

    Each file is written atomically (:mod:`robust_infl.io`): never half written.

    Returns ``{name: path}`` of the files written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    atomic_write_json(paths["json"], report)
    atomic_write_text(paths["markdown"], render_markdown(report))
    if len(report["config"]["fractions"]) > 1:
        paths["plot"] = out / "robust_vs_fraction.png"
        plot_robust_vs_fraction(report, paths["plot"])
    return paths
