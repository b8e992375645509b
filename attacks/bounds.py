"""Box constraints on the inputs an attack may produce.

``bounds`` is ``None`` (unbounded, e.g. standardised tabular features), a ``(low, high)`` pair of
numbers, or a ``(low, high)`` pair of tensors broadcastable to the shape of ONE sample (per-feature
bounds). Pairs are checked when an attack is built; tensor shapes are checked against the data
when the attack runs.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

__all__ = ["BoundsLike", "check_bounds", "resolve_bounds", "check_within_bounds"]

BoundValue = Union[float, int, torch.Tensor]
BoundsLike = Optional[Tuple[BoundValue, BoundValue]]
ResolvedBounds = Optional[Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]]]


def check_bounds(bounds) -> BoundsLike:
    """Validate the form of ``bounds`` (None or a ``(low, high)`` pair) and return it as a tuple.

    Number pairs must satisfy ``low < high``; tensor pairs must be floating point with
    ``low <= high`` wherever both are given element-wise. Raises ``ValueError``/``TypeError``
    starting with ``"bounds:"``.
    """
    if bounds is None:
        return None
    if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
        raise ValueError(f"bounds: expected None or a (low, high) pair, got {bounds!r}")
    low, high = bounds
    for name, value in (("low", low), ("high", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            raise TypeError(f"bounds: {name} must be a number or a tensor, got {type(value).__name__}")
        if isinstance(value, torch.Tensor) and not value.is_floating_point():
            raise TypeError(f"bounds: {name} must be a floating-point tensor, got {value.dtype}")
    if isinstance(low, torch.Tensor) or isinstance(high, torch.Tensor):
        low_t, high_t = torch.as_tensor(low), torch.as_tensor(high)
        try:
            ordered = bool(torch.all(low_t <= high_t))
        except RuntimeError as error:
            raise ValueError(f"bounds: low {tuple(low_t.shape)} and high {tuple(high_t.shape)} "
                             f"do not broadcast together") from error
        if not ordered:
            raise ValueError("bounds: low must be <= high for every feature")
        return (low, high)
    low, high = float(low), float(high)
    if not low < high:
        raise ValueError(f"bounds: low must be < high, got ({low}, {high})")
    return (low, high)


def resolve_bounds(bounds: BoundsLike, x: torch.Tensor) -> ResolvedBounds:
    """Return ``bounds`` ready to clamp a batch like ``x``.

    A pair of numbers stays as is; otherwise both ends become tensors on ``x``'s device and
    dtype, checked to broadcast to one sample's shape ``x.shape[1:]``.
    """
    if bounds is None:
        return None
    sample_shape = tuple(x.shape[1:])
    if not any(isinstance(value, torch.Tensor) for value in bounds):
        return bounds
    resolved = []
    for value in bounds:
        value = torch.as_tensor(value)
        if value.dim():
            try:
                fits = torch.broadcast_shapes(value.shape, sample_shape) == torch.Size(sample_shape)
            except RuntimeError:
                fits = False
            if not fits:
                raise ValueError(f"bounds: per-feature tensors of shape {tuple(value.shape)} do not "
                                 f"broadcast to one sample's shape {sample_shape}")
        resolved.append(value.to(device=x.device, dtype=x.dtype))
    return (resolved[0], resolved[1])


def check_within_bounds(x: torch.Tensor, bounds: ResolvedBounds) -> None:
    """Raise ``ValueError`` (``"x: ..."``) when some entry of ``x`` lies outside ``bounds``.

    An attack's projection keeps its budget only if the clean point itself is feasible.
    """
    if bounds is None:
        return
    low, high = bounds
    outside = int(((x < low) | (x > high)).sum())
    if outside:
        raise ValueError(f"x: {outside} value(s) lie outside bounds; clip the data to the bounds "
                         f"or pass bounds=None")
