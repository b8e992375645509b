"""Seeded Gaussian random projection: reproducible, blockwise exact, unbiased inner products."""

from __future__ import annotations

import pytest
import torch

from robust_infl import projection
from robust_infl.projection import RandomProjection


def test_same_seed_same_projection_different_seed_different():
    g = torch.randn(5, 300)
    a = RandomProjection(300, 16, seed=3).project(g)
    assert torch.equal(a, RandomProjection(300, 16, seed=3).project(g))
    assert not torch.allclose(a, RandomProjection(300, 16, seed=4).project(g))


def test_blocks_cover_the_matrix_whatever_the_cache_and_call_order(monkeypatch):
    monkeypatch.setattr(projection, "BLOCK_ROWS", 64)
    cached = RandomProjection(300, 8, seed=1)
    fresh = RandomProjection(300, 8, seed=1, cache=False)
    backwards = RandomProjection(300, 8, seed=1)
    late_blocks = [backwards.block(j) for j in reversed(range(backwards.n_blocks))][::-1]
    matrix = cached.matrix()
    assert matrix.shape == (300, 8) and cached.n_blocks == 5
    assert torch.equal(torch.cat(late_blocks), matrix)
    g = torch.randn(4, 300)
    torch.testing.assert_close(cached.project(g), g @ matrix)
    assert torch.equal(fresh.project(g), cached.project(g))
    # nothing kept without the cache: every block is drawn anew, while the cached projection returns its own
    assert all(fresh.block(j) is not fresh.block(j) for j in range(fresh.n_blocks))
    assert all(cached.block(j) is cached.block(j) for j in range(cached.n_blocks))
    torch.testing.assert_close(cached.project(g[0]), g[0] @ matrix)  # a single vector


def test_entries_have_variance_one_over_dim_and_inner_products_are_unbiased():
    dim = 256
    matrix = RandomProjection(2000, dim, seed=0, dtype=torch.float64).matrix()
    assert abs(float(matrix.mean())) < 5 / (dim * 2000**0.5)  # 5 standard errors of the mean
    assert float(matrix.var() * dim) == pytest.approx(1.0, abs=0.02)
    g, h = torch.randn(2000, dtype=torch.float64), torch.randn(2000, dtype=torch.float64)
    h = h + g  # correlated vectors
    estimates = torch.stack([
        RandomProjection(2000, dim, seed=s, dtype=torch.float64).project(torch.stack([g, h])).prod(0).sum()
        for s in range(40)
    ])
    exact = float(g @ h)
    # Gaussian JL: the variance of one estimate is (|g|^2 |h|^2 + <g, h>^2) / dim
    expected_std = ((float(g.norm() * h.norm()) ** 2 + exact**2) / dim) ** 0.5
    assert float(estimates.std()) == pytest.approx(expected_std, rel=0.4)
    assert abs(float(estimates.mean()) - exact) < 4 * expected_std / 40**0.5


def test_dtype_and_device_of_the_output():
    p = RandomProjection(10, 3, seed=0, dtype=torch.float64)
    out = p.project(torch.randn(2, 10))
    assert out.dtype == torch.float64 and out.device.type == "cpu"
    assert torch.equal(RandomProjection(10, 3, seed=0, device="cpu").matrix(), RandomProjection(10, 3).matrix())


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n_features=0, dim=3), ValueError, "^n_features:"),
        (dict(n_features=5, dim=2.0), TypeError, "^dim:"),
        (dict(n_features=5, dim=2, seed=-1), ValueError, "^seed:"),
        (dict(n_features=5, dim=2, dtype=torch.int64), TypeError, "^dtype:"),
        (dict(n_features=5, dim=2, cache=1), TypeError, "^cache:"),
    ],
)
def test_invalid_arguments_name_themselves(kwargs, error, message):
    with pytest.raises(error, match=message):
        RandomProjection(**kwargs)


def test_project_checks_its_input():
    p = RandomProjection(5, 2)
    with pytest.raises(ValueError, match="^vectors:"):
        p.project(torch.randn(3, 4))
    with pytest.raises(TypeError, match="^vectors:"):
        p.project([1.0] * 5)
