"""Seeded Gaussian random projection of gradients, for train x target score matrices.

``RandomProjection(n_features, dim, seed)`` maps a vector ``g`` of ``n_features`` entries to
``g @ P`` with ``dim`` entries, where ``P`` has i.i.d. ``N(0, 1/dim)`` entries, so that
``E[<g P, h P>] = <g, h>`` (Johnson-Lindenstrauss): the inner products of projected per-sample
gradients estimate the exact train x target scores with a relative error of about
``1/sqrt(dim)``, from ``dim`` numbers per sample instead of ``n_features``.

``P`` is built in blocks of :data:`BLOCK_ROWS` rows; block ``j`` is drawn on the CPU from a
generator seeded with ``(seed, j)``, so the same seed gives the same ``P`` on every device, in
every process and whatever order the blocks are used in. The blocks are generated once and kept
(``4 * n_features * dim`` bytes in float32) unless ``cache=False``, which regenerates each block
when it is used (memory ``BLOCK_ROWS * dim``, at the cost of drawing ``P`` on every call).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor

from attacks.plumbing import make_generator
from attacks.validation import check_bool, check_int, check_seed

__all__ = ["RandomProjection", "BLOCK_ROWS"]

BLOCK_ROWS = 8192


class RandomProjection:
    """The seeded map ``g -> g @ P`` from ``n_features`` to ``dim`` entries, ``P_ij ~ N(0, 1/dim)``.

    Args:
        n_features: length of the vectors to project (e.g. the number of scored parameters).
        dim: the projected dimension ``k``.
        seed: seeds ``P`` (integer >= 0); the same seed gives the same projection everywhere.
        device: where ``P`` lives and the projection is computed (CPU by default).
        dtype: floating dtype of ``P`` (float32 by default).
        cache: keep ``P`` in memory after first use (default) or regenerate it on every call.
    """

    def __init__(
        self,
        n_features: int,
        dim: int,
        seed: int = 0,
        *,
        device: Optional[Union[str, torch.device]] = None,
        dtype: torch.dtype = torch.float32,
        cache: bool = True,
    ):
        self.n_features = check_int(n_features, "n_features", minimum=1)
        self.dim = check_int(dim, "dim", minimum=1)
        self.seed = check_seed(seed)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: must be a floating torch.dtype, got {dtype!r}")
        check_bool(cache, "cache")
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.dtype = dtype
        self.cache = cache
        self._blocks: dict[int, Tensor] = {}

    @property
    def n_blocks(self) -> int:
        """Number of row blocks of ``P``."""
        return math.ceil(self.n_features / BLOCK_ROWS)

    def block(self, index: int) -> Tensor:
        """Rows ``[index * BLOCK_ROWS, (index + 1) * BLOCK_ROWS)`` of ``P``, shape ``(rows, dim)``."""
        if index in self._blocks:
            return self._blocks[index]
        rows = min(BLOCK_ROWS, self.n_features - index * BLOCK_ROWS)
        state = np.random.SeedSequence([self.seed, index]).generate_state(1, dtype=np.uint64)[0]
        generator = make_generator(int(state))
        values = torch.randn(rows, self.dim, generator=generator, dtype=self.dtype)
        values = values.mul_(1.0 / math.sqrt(self.dim)).to(self.device)
        if self.cache:
            self._blocks[index] = values
        return values

    def matrix(self) -> Tensor:
        """The whole ``(n_features, dim)`` matrix ``P`` (for inspection and small problems)."""
        return torch.cat([self.block(j) for j in range(self.n_blocks)])

    def project(self, vectors: Tensor) -> Tensor:
        """``vectors @ P`` for ``vectors`` of shape ``(..., n_features)``; returns ``(..., dim)``.

        Computed on the projection's device in its dtype, block by block (no ``(n, n_features)``
        copy is made).
        """
        if not isinstance(vectors, Tensor):
            raise TypeError(f"vectors: expected a tensor, got {type(vectors).__name__}")
        if vectors.ndim == 0 or vectors.shape[-1] != self.n_features:
            raise ValueError(
                f"vectors: last dimension must be n_features={self.n_features}, got shape {tuple(vectors.shape)}"
            )
        vectors = vectors.to(device=self.device, dtype=self.dtype)
        out = vectors.new_zeros(*vectors.shape[:-1], self.dim)
        for j in range(self.n_blocks):
            out += vectors[..., j * BLOCK_ROWS : (j + 1) * BLOCK_ROWS] @ self.block(j)
        return out

    def __repr__(self) -> str:
        return f"RandomProjection(n_features={self.n_features}, dim={self.dim}, seed={self.seed})"
