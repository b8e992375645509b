"""Shared helpers for experiment scripts: result sections in RESULTS.md, atomic writes, the statistics of
:mod:`defenses.stats` in the tuple form the experiments' JSON stores, formatted for their tables, and the
settings and measures several experiments share (an experiment imports the library and this module only)."""

from __future__ import annotations

import argparse
import fcntl
import json
import math
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional

import torch
from torch import nn

from attacks import predict
from attacks.plumbing import eval_mode
from defenses import ERM, stats
from defenses.seed_results import SeedResults
from robust_infl.io import atomic_write_text

EXPERIMENTS = Path(__file__).resolve().parent
RESULTS_MD = EXPERIMENTS / "RESULTS.md"

__all__ = ["write_section", "write_json", "mean_std", "paired_ci", "format_mean_std",
           "format_delta", "experiment_arguments", "scoring_benchmark_parser", "parse_benchmark_arguments",
           "save_figure", "cached", "SETTINGS_FINGERPRINT", "EXPERIMENTS", "RESULTS_MD", "group_gaps",
           "jaccard", "tabular_trainer", "ensemble_options"]


def write_json(path: Path, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write_text(Path(path), json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_section(name: str, markdown: str, results_md: Path = RESULTS_MD) -> None:
    """Replace (or append) the section ``name`` of RESULTS.md, delimited by HTML comment markers.

    Each experiment owns one section, so scripts can be rerun independently; the read-modify-write
    holds an exclusive lock on ``<results_md>.lock``, so scripts finishing at the same time do not
    drop each other's sections.
    """
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    with _locked(Path(str(results_md) + ".lock")):
        text = results_md.read_text() if results_md.exists() else "# Results\n\nEach section is written by the script it names.\n"
        if pattern.search(text):
            text = pattern.sub(lambda _: block, text)
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
        atomic_write_text(results_md, text)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def mean_std(values: Iterable[float]) -> tuple:
    """``(mean, std)`` of :func:`defenses.stats.mean_std` (sample std, 0 for a single value): the form the
    experiments' JSON stores."""
    stat = stats.mean_std(values)
    return stat["mean"], stat["std"]


def paired_ci(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> tuple:
    """``(mean, (low, high))``: :func:`defenses.stats.paired_difference` of a - b with its two-sided t interval,
    the form the experiments' JSON stores; ``(nan, nan)`` where that function gives no interval (one pair, or
    identical differences, whose zero-width interval would read as certainty)."""
    diff = stats.paired_difference(a, b, level)
    low, high = diff["ci95"] if diff["ci95"] is not None else (math.nan, math.nan)
    return diff["mean"], (low, high)


def format_mean_std(values: list, scale: float = 100.0, digits: int = 2) -> str:
    """``"mean ± std"`` of ``scale * values`` (sample std) with ``digits`` decimals."""
    m, s = mean_std([scale * v for v in values])
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def format_delta(a: list, b: list, scale: float = 100.0, digits: int = 2) -> str:
    """``"+d [lo, hi]"``: mean paired difference ``scale * (a - b)`` and its 95% t-interval (``"+d"`` alone
    where :func:`paired_ci` gives no interval)."""
    m, (lo, hi) = paired_ci([scale * v for v in a], [scale * v for v in b])
    if not math.isfinite(lo):
        return f"{m:+.{digits}f}"
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


def experiment_arguments(doc: str, name: str, argv: Optional[list] = None) -> argparse.Namespace:
    """The command line shared by the paper-experiment scripts, parsed from ``argv``.

    ``--quick`` (tiny configuration for the smoke test), ``--out`` (the JSON; default
    ``experiments/out/<name>[_quick].json``), ``--plots`` (folder of the PNGs), ``--no-progress``.
    The result also carries ``name``: ``<name>`` or ``<name>_quick``, the stem of the outputs.
    """
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny configuration for the smoke test")
    parser.add_argument("--out", type=Path, default=None, help=f"JSON path (default experiments/out/{name}[_quick].json)")
    parser.add_argument("--plots", type=Path, default=EXPERIMENTS / "plots", help="folder of the PNG")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    args.name = f"{name}_quick" if args.quick else name
    args.out = args.out or EXPERIMENTS / "out" / f"{args.name}.json"
    return args


def save_figure(fig, path: Path, dpi: int = 110) -> None:
    """Lay out ``fig``, write it as a PNG to ``path`` (creating the folder) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def scoring_benchmark_parser(doc: str, *, repeats: int) -> argparse.ArgumentParser:
    """The command line shared by the scoring benchmarks (SmallCNN on 4,000 inputs, 500 targets, batch 500):
    ``--n-train``, ``--n-target``, ``--batch-size``, ``--repeats``, ``--seed``, ``--threads`` and
    ``--write-results``. Add a script's own options to it."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=4000)
    parser.add_argument("--n-target", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--write-results", action="store_true", help="write a section of experiments/RESULTS.md")
    return parser


def parse_benchmark_arguments(parser: argparse.ArgumentParser, argv: Optional[list] = None) -> argparse.Namespace:
    """Parse ``argv`` and apply ``--threads`` (when given) to torch."""
    import torch

    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


# The per-seed files of these experiments are identified by their settings alone (which name the data,
# its sizes and the seed's split), so they carry no separate fingerprint of the data.
SETTINGS_FINGERPRINT = "in the settings"


def cached(results: Optional[SeedResults], seed: int, compute) -> tuple:
    """``(compute(), seconds it took)``, saved as ``seed``'s file of ``results`` (the library's per-seed cache,
    :class:`defenses.seed_results.SeedResults`, whose settings identify the run); a later call reads both back
    instead of computing, and refuses a file written with other settings.

    ``results=None`` always computes and stores nothing. Lets a long run resume after an interruption.
    """
    if results is not None:
        saved = results.load(seed, SETTINGS_FINGERPRINT)
        if saved is not None:
            return saved["result"], saved["seconds"]
    started = time.perf_counter()
    result = compute()
    seconds = time.perf_counter() - started
    if results is not None:
        results.save(seed, SETTINGS_FINGERPRINT, {"result": result, "seconds": seconds})
    return result, seconds


# ----------------------------------------------------------------- settings and measures shared by experiments
def group_gaps(model: nn.Module, X: torch.Tensor, y: torch.Tensor, s: torch.Tensor) -> dict:
    """Demographic-parity and equal-opportunity gaps of the model's hard predictions on ``(X, y, s)``.

    ``dp_gap = |P(yhat=1 | s=1) - P(yhat=1 | s=0)|`` and
    ``eo_gap = |P(yhat=1 | y=1, s=1) - P(yhat=1 | y=1, s=0)|`` (true-positive-rate gap);
    ``dp_signed`` and ``eo_signed`` are the same differences without the absolute value.
    """
    if not (torch.is_tensor(s) and s.shape == y.shape and bool(((s == 0) | (s == 1)).all())):
        raise ValueError("s: must be a 0/1 tensor with one entry per sample")
    for group in (0, 1):
        if not bool(((s == group) & (y == 1)).any()):
            raise ValueError(f"s: group {group} has no sample with y=1, the gaps are undefined")
    with eval_mode(model), torch.no_grad():
        positive = (predict(model(X)) == 1).to(torch.float64)
    rate = [positive[s == g].mean() for g in (0, 1)]
    tpr = [positive[(s == g) & (y == 1)].mean() for g in (0, 1)]
    dp, eo = float(rate[1] - rate[0]), float(tpr[1] - tpr[0])
    return {"dp_gap": abs(dp), "eo_gap": abs(eo), "dp_signed": dp, "eo_signed": eo}


def jaccard(a: torch.Tensor, b: torch.Tensor) -> float:
    """Jaccard overlap |a & b| / |a | b| of two boolean masks (1.0 when both are empty)."""
    union = int((a | b).sum())
    return 1.0 if union == 0 else int((a & b).sum()) / union


def tabular_trainer(model_name: str, config) -> ERM:
    """Full-batch Adam for logistic regression (a convex fit run close to convergence), mini-batch Adam for the MLP.

    The trainer of the fairness and synthetic experiments; ``config`` is any configuration with the fields
    used here (``n_train``, ``logreg_epochs``, ``logreg_lr``, ``mlp_epochs``, ``mlp_lr``, ``mlp_batch_size``,
    ``weight_decay``).
    """
    if model_name == "logreg":
        return ERM(epochs=config.logreg_epochs, lr=config.logreg_lr, batch_size=config.n_train,
                   weight_decay=config.weight_decay, progress=False)
    return ERM(epochs=config.mlp_epochs, lr=config.mlp_lr, batch_size=config.mlp_batch_size,
               weight_decay=config.weight_decay, progress=False)


def ensemble_options(model_name: str, members: int) -> dict:
    """The paper's ensembles: N(0, 0.01) weight noise for logistic regression, dropout U(0, 0.01) otherwise."""
    perturbation = "gaussian" if model_name == "logreg" else "dropout"
    return {"members": members, "perturbation": perturbation, "scale": 0.01}
