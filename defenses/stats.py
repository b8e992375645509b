"""Statistics over seeds, the one place they are computed: mean ± sample std, and paired differences with
a two-sided t confidence interval.

Used by the defence and poisoning reports (:mod:`defenses.report`, :mod:`defenses.poisoning`) and by
every experiment script (``experiments/_results.py`` formats them).
"""

from __future__ import annotations

import math
from typing import Iterable

__all__ = ["DEGENERATE_INTERVAL", "mean_std", "half_width", "paired_difference"]

DEGENERATE_INTERVAL = "n/a: identical differences"


def mean_std(values: Iterable[float]) -> dict:
    """``{"mean", "std", "n"}`` with the sample standard deviation (0 for one value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("values: empty")
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": m, "std": s, "n": len(vals)}


def half_width(stat: dict, level: float = 0.95) -> float:
    """Half-width of the two-sided t interval of the mean of a :func:`mean_std` result (0 for one value)."""
    from scipy import stats

    if stat["n"] < 2:
        return 0.0
    return float(stats.t.ppf(0.5 + level / 2, stat["n"] - 1)) * stat["std"] / math.sqrt(stat["n"])


def paired_difference(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> dict:
    """Mean, std and two-sided t confidence interval (``ci95``) of ``a - b``.

    ``ci95`` is None for one pair, and for identical differences (std 0: a zero-width interval would
    read as certainty), which also get ``ci95_note`` ``"n/a: identical differences"``.
    """
    diffs = [float(x) - float(y) for x, y in zip(a, b, strict=True)]
    out = mean_std(diffs)
    if len(diffs) < 2:
        out["ci95"] = None
    elif out["std"] == 0.0:
        out["ci95"], out["ci95_note"] = None, DEGENERATE_INTERVAL
    else:
        half = half_width(out, level)
        out["ci95"] = [out["mean"] - half, out["mean"] + half]
    return out
