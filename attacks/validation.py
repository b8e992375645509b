"""Argument checks at the public boundary, shared by ``attacks``, ``robust_infl`` and ``defenses``.

One signature style, as scikit-learn's ``check_scalar``: the value first, then its name, then the
constraints (``check_int(steps, "steps", minimum=1)``). Each check returns the value in its plain
type (``int``, ``float``, ``bool``, ``str``, ``torch.device``) and raises before any compute, with one
message format: ``"<name>: must be <constraint>, got <value>"`` (``TypeError`` for a wrong type, whose
message ends with the type's name; ``ValueError`` for a wrong value).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "NORMS",
    "check_int",
    "check_number",
    "check_positive",
    "check_fraction",
    "check_eps",
    "check_bool",
    "check_choice",
    "check_norm",
    "check_seed",
    "SEED_MAX",
    "check_device",
    "check_model",
    "check_output_shape",
    "check_finite",
    "check_labels",
    "integer_labels",
]

NORMS = ("linf", "l2")
SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's largest seed; torch takes it too


def _interval(minimum, maximum, include_minimum: bool, include_maximum: bool) -> str:
    """The constraint ``> 0`` / ``>= 1`` / ``<= 1`` / ``in (0, 1]`` as text ('' when unconstrained)."""
    if minimum is not None and maximum is not None:
        return f"in {'[' if include_minimum else '('}{minimum}, {maximum}{']' if include_maximum else ')'}"
    if minimum is not None:
        return f"{'>=' if include_minimum else '>'} {minimum}"
    if maximum is not None:
        return f"{'<=' if include_maximum else '<'} {maximum}"
    return ""


def _outside(value, minimum, maximum, include_minimum: bool, include_maximum: bool) -> bool:
    if minimum is not None and (value < minimum or (value == minimum and not include_minimum)):
        return True
    return maximum is not None and (value > maximum or (value == maximum and not include_maximum))


def check_int(value: Any, name: str, *, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """``value`` as an ``int`` if it is an integer (bools refused) in ``[minimum, maximum]`` (bounds optional)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: must be an integer, got {type(value).__name__}")
    if _outside(value, minimum, maximum, True, True):
        raise ValueError(f"{name}: must be {_interval(minimum, maximum, True, True)}, got {value}")
    return int(value)


def check_number(
    value: Any,
    name: str,
    *,
    minimum: Optional[float] = None,
    maximum: Optional[float] = None,
    include_minimum: bool = True,
    include_maximum: bool = True,
) -> float:
    """``value`` as a ``float`` if it is a finite real number (bools refused) within the given bounds.

    ``include_minimum`` / ``include_maximum`` say whether a bound itself is allowed (``> 0`` is
    ``minimum=0, include_minimum=False``).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or _outside(value, minimum, maximum, include_minimum, include_maximum):
        constraint = _interval(minimum, maximum, include_minimum, include_maximum)
        raise ValueError(f"{name}: must be a finite number{' ' + constraint if constraint else ''}, got {value}")
    return float(value)


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """``value`` as a float if it is a finite number ``> 0`` (``>= 0`` with ``allow_zero``)."""
    return check_number(value, name, minimum=0, include_minimum=allow_zero)


def check_fraction(value: Any, name: str, *, allow_zero: bool = False, allow_one: bool = False) -> float:
    """``value`` as a float if it lies in ``(0, 1)`` (``0`` allowed with ``allow_zero``, ``1`` with ``allow_one``)."""
    return check_number(value, name, minimum=0, maximum=1, include_minimum=allow_zero, include_maximum=allow_one)


# The largest budget: beyond it, perturbed float32 inputs (3.4e38 at most) and the logits they give overflow.
EPS_MAX = 1e30


def check_eps(value: Any, name: str = "eps", *, allow_zero: bool = False) -> float:
    """A perturbation budget: a finite number ``> 0`` (``>= 0`` with ``allow_zero``) and at most
    :data:`EPS_MAX`, as a float.

    A budget of 0 is refused by default: it would silently turn robust accuracy into clean accuracy.
    """
    value = check_positive(value, name, allow_zero=allow_zero)
    if value > EPS_MAX:
        raise ValueError(f"{name}: must be at most {EPS_MAX:g} (perturbed float32 inputs overflow beyond it), "
                         f"got {value:g}")
    return value


def check_bool(value: Any, name: str) -> bool:
    """``value`` if it is ``True`` or ``False`` (``1``, ``0`` and other truthy values are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name}: must be True or False, got {type(value).__name__}")
    return value


def check_choice(value: Any, name: str, choices: Sequence) -> Any:
    """``value`` if it is one of ``choices`` (compared with ``==``)."""
    if value not in tuple(choices):
        raise ValueError(f"{name}: must be one of {', '.join(str(c) for c in choices)}, got {value!r}")
    return value


def check_norm(value: Any, name: str = "norm") -> str:
    """The norm name ``"linf"`` or ``"l2"`` (given in any letter case), lower-cased."""
    return check_choice(value.lower() if isinstance(value, str) else value, name, NORMS)


def check_seed(value: Any, name: str = "seed") -> int:
    """A random seed: an integer in ``[0, SEED_MAX]`` (``2**32 - 1``, the range numpy and scikit-learn
    take), as an ``int``."""
    return check_int(value, name, minimum=0, maximum=SEED_MAX)


def check_device(value: Any, name: str = "device") -> torch.device:
    """``value`` as a ``torch.device``; ``ValueError`` when it is not a valid device name or names a CUDA
    GPU this machine does not have (checked before any compute, not deep inside torch)."""
    try:
        resolved = torch.device(value)
    except (TypeError, RuntimeError) as err:
        raise ValueError(f"{name}: must be a valid torch device, got {value!r}") from err
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name}: {value!r} needs a CUDA GPU, but torch sees none here "
                             f"(torch.cuda.is_available() is False); use cpu")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"{name}: {value!r} does not exist; this machine has "
                             f"{torch.cuda.device_count()} CUDA GPU(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name}: {value!r} needs Apple's Metal GPU, but torch sees none here "
                         f"(torch.backends.mps.is_available() is False); use cpu")
    if resolved.type == "meta":
        raise ValueError(f"{name}: {value!r} holds no data; use cpu or a GPU")
    return resolved


def check_model(value: Any, name: str = "model", x: Optional[torch.Tensor] = None) -> nn.Module:
    """``value`` if it is a ``torch.nn.Module`` (``TypeError`` otherwise); ``ValueError`` when its parameters
    are meta tensors (no data) or live on another device than the batch ``x`` (if given)."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{name}: must be a torch.nn.Module, got {type(value).__name__}")
    if any(t.is_meta for t in (*value.parameters(), *value.buffers())):
        raise ValueError(f"{name}: its parameters are on the meta device (they hold no data); load real weights "
                         f"first (model.to_empty(device='cpu'), then load_state_dict)")
    if x is not None:
        for p in value.parameters():
            if p.device != x.device:
                raise ValueError(f"{name}: its parameters are on {p.device} but x is on {x.device}")
            break
    return value


def check_output_shape(outputs, n: int) -> None:
    """Raise ``ValueError`` naming ``model`` unless ``outputs`` are logits of shape ``(n, C)``.

    The project's one rule for binary models: ONE logit has shape ``(n, 1)``; a squeezed ``(n,)``
    output is refused everywhere (trainers, influence, evaluate and the attacks), never guessed.
    """
    if not isinstance(outputs, torch.Tensor):
        raise ValueError(f"model: must return a tensor of logits, got {type(outputs).__name__}")
    if outputs.dim() != 2 or outputs.shape[0] != n:
        hint = " (a binary model returns one logit as (n, 1): do not squeeze it)" if outputs.dim() == 1 else ""
        raise ValueError(f"model: must return logits of shape ({n}, C), got {tuple(outputs.shape)}{hint}")


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinite values."""
    if x.is_floating_point() or x.is_complex():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise ValueError(f"{name}: contains {bad} NaN or infinite value(s)")


def check_labels(y: torch.Tensor, name: str, n_outputs: int) -> None:
    """Raise ``ValueError`` unless ``y`` holds class indices a model with ``n_outputs`` logits can take.

    One output means binary labels {0, 1}; ``C >= 2`` outputs mean labels in ``[0, C)``.
    """
    if y.ndim != 1:
        raise ValueError(f"{name}: labels must be a 1-D tensor of class indices, got shape {tuple(y.shape)}")
    if y.numel() == 0:
        return
    y = integer_labels(y, name)
    n_classes = 2 if n_outputs == 1 else n_outputs
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= n_classes:
        raise ValueError(
            f"{name}: labels must lie in [0, {n_classes - 1}] for a model with {n_outputs} output(s), "
            f"got values in [{low}, {high}]"
        )


def integer_labels(y: torch.Tensor, name: str) -> torch.Tensor:
    """``y`` as class indices: integer tensors unchanged, whole-number floats as int64 (so that attacks,
    which take integer labels, see the same labels); other floats raise ``ValueError`` naming ``name``."""
    if not y.is_floating_point() or y.ndim != 1:
        return y
    check_finite(y, name)
    if not bool((y == torch.round(y)).all()):
        raise ValueError(f"{name}: labels must be integer class indices, got non-integer values")
    return y.long()
