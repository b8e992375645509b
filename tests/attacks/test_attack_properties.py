"""Property: attack budgets and bounds hold for random input shapes, batch sizes, norms, budgets and
restarts, and the same seed gives the same adversarial batch (tabular shapes with fixed size are
covered in ``test_own_attacks.py``)."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from attacks import FGSM, PGD

sample_shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3).map(tuple)


def linear_model(shape: tuple, n_outputs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(shape), n_outputs))


@settings(max_examples=25, deadline=None)
@given(shape=sample_shapes, n=st.integers(1, 5), norm=st.sampled_from(["linf", "l2"]), eps=st.floats(1e-3, 3.0),
       bounded=st.booleans(), restarts=st.integers(1, 2), n_outputs=st.sampled_from([1, 3]),
       use_pgd=st.booleans(), seed=st.integers(0, 10_000))
def test_budget_bounds_shape_and_seed_hold_for_random_shapes(shape, n, norm, eps, bounded, restarts, n_outputs,
                                                             use_pgd, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g, dtype=torch.float64)
    y = torch.randint(0, max(n_outputs, 2), (n,), generator=g)
    model = linear_model(shape, n_outputs, seed).double()
    bounds = (0.0, 1.0) if bounded else None
    attack = (PGD(eps, steps=2, norm=norm, bounds=bounds, restarts=restarts, seed=seed) if use_pgd
              else FGSM(eps, norm=norm, bounds=bounds))
    x_adv = attack(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    delta = (x_adv - x).flatten(1)
    size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
    assert float(size.max()) <= eps * (1 + 1e-9) + 1e-12
    if bounded:
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert torch.equal(attack(model, x, y), x_adv)
