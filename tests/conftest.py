"""Shared pytest fixtures."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

# Property tests draw the same examples on every run (CI must not depend on luck); no example database.
settings.register_profile("robust-infl", derandomize=True, database=None, deadline=None)
settings.load_profile("robust-infl")


@pytest.fixture(autouse=True)
def seeded_rng():
    """Seed torch and numpy before every test so that random test data is reproducible."""
    torch.manual_seed(0)
    np.random.seed(0)


def _per_sample_loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if outputs.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(outputs[:, 0], y.to(outputs.dtype), reduction="none")
    return F.cross_entropy(outputs, y.long(), reduction="none")


@pytest.fixture
def fgsm_attack():
    """Factory ``fgsm_attack(eps)`` of a deterministic one-step sign-gradient attack(model, x, y).

    The attack counts its calls in ``attack.calls`` and works for one-logit and multi-logit models.
    """

    def make(eps: float):
        def attack(model, x, y):
            attack.calls += 1
            x = x.detach().clone().requires_grad_(True)
            (grad_x,) = torch.autograd.grad(_per_sample_loss(model(x), y).sum(), x)
            return (x + eps * grad_x.sign()).detach()

        attack.calls = 0
        return attack

    return make
