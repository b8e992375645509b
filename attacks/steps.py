"""Geometry of the linf and l2 threat models: ascent directions, projections, random starts.

Every function works on a whole batch at once; norms are taken per sample over all features.
"""

from __future__ import annotations

import torch

__all__ = ["ascent_direction", "per_sample_norm", "project_l2_", "clamp_to", "random_delta"]

_TINY = 1e-12


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """l2 norm of every sample of ``t``, shaped ``(n, 1, ..., 1)`` to broadcast against ``t``."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """Steepest ascent direction of unit size in ``norm``: ``sign(grad)`` for linf,
    ``grad / ||grad||_2`` for l2 (zero where the gradient is zero)."""
    if norm == "linf":
        return grad.sign()
    return grad / per_sample_norm(grad).clamp_min(_TINY)


def project_l2_(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """Project every sample of ``delta`` onto the l2 ball of radius ``eps``, in place."""
    return delta.mul_((eps / per_sample_norm(delta).clamp_min(_TINY)).clamp_max(1.0))


def clamp_to(x: torch.Tensor, bounds) -> torch.Tensor:
    """Clip ``x`` to resolved ``bounds`` (``None`` leaves it unchanged)."""
    if bounds is None:
        return x
    return x.clamp(bounds[0], bounds[1])


def random_delta(like: torch.Tensor, eps: float, norm: str, generator: torch.Generator) -> torch.Tensor:
    """A random perturbation per sample, uniform in the ``norm`` ball of radius ``eps``."""
    if norm == "linf":
        noise = torch.rand(like.shape, generator=generator, device=like.device, dtype=like.dtype)
        return noise.mul_(2 * eps).sub_(eps)
    direction = torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)
    direction /= per_sample_norm(direction).clamp_min(_TINY)
    n_features = like[0].numel()
    radius = torch.rand((like.shape[0],), generator=generator, device=like.device, dtype=like.dtype)
    radius = radius.pow_(1.0 / n_features).mul_(eps).view(-1, *([1] * (like.dim() - 1)))
    return direction.mul_(radius)
