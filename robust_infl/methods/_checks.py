"""Checks of method options (shared by the method modules); errors name the option first."""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

__all__ = ["positive_float", "fraction", "positive_int", "choice"]


def positive_float(name: str, value: Any) -> float:
    """``value`` as a float, or an error naming ``name`` unless it is a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be a finite number > 0, got {value}")
    return float(value)


def fraction(name: str, value: Any) -> float:
    """``value`` as a float, or an error naming ``name`` unless ``0 < value < 1``."""
    value = positive_float(name, value)
    if value >= 1:
        raise ValueError(f"{name}: must be < 1, got {value}")
    return value


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int, or an error naming ``name`` unless it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: must be an integer, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: must be >= 1, got {value}")
    return int(value)


def choice(name: str, value: Any, options: Sequence[str]) -> str:
    """``value`` unless it is not one of ``options`` (error naming ``name`` and the options)."""
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name}: must be one of {', '.join(repr(o) for o in options)}, got {value!r}")
    return value
