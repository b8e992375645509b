"""Train the members of an ensemble of models (TRAK's recipe: models trained on random subsets of the data),
for :class:`robust_infl.Ensemble` and ``robust_infl.influence(Ensemble(...), ...)``.

:func:`train_ensemble` trains ``n`` models with any project trainer, each from its own seeded initialisation
and, with ``subset < 1``, on its own seeded random subset of the training data; it returns them with their
subsets, seeds and the cost counted: the measured wall and CPU seconds (:mod:`defenses.timing`) and the
multiple of one full training, ``n * subset`` (per-sample gradient steps; every member runs the trainer's
epochs over its subset).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from attacks.inputs import as_data, check_dataset_size
from attacks.validation import SEED_MAX, check_bool, check_fraction, check_int, check_model, check_seed
from robust_infl.ensembles import Ensemble

from .data import take
from .timing import cost_clock, timed

__all__ = ["TrainedEnsemble", "train_ensemble", "member_seeds"]


@dataclass(frozen=True)
class TrainedEnsemble:
    """The members trained by :func:`train_ensemble`.

    Attributes:
        models: the trained models, in eval mode.
        subsets: each member's training indices into the data (sorted; all of them with ``subset=1``).
        seeds: each member's training seed (initialisation, data order, the trainer's randomness).
        seconds: ``{"wall": ..., "cpu": ...}``: the measured time of all the trainings together.
        clock: the clock a cost ratio is read from (:func:`defenses.timing.cost_clock`).
        trainings: the cost as a multiple of one full training on all the data, ``n * subset``
            (per-sample gradient steps).
    """

    models: tuple[nn.Module, ...]
    subsets: tuple[torch.Tensor, ...]
    seeds: tuple[int, ...]
    seconds: dict
    clock: str
    trainings: float

    @property
    def ensemble(self) -> Ensemble:
        """The models as a :class:`robust_infl.Ensemble`, to score with ``robust_infl.influence``."""
        return Ensemble(list(self.models))


def member_seeds(seed: int, index: int) -> tuple[int, int]:
    """``(training seed, subset seed)`` of member ``index`` of the ensemble of ``seed``: independent draws of
    ``numpy.random.SeedSequence([seed, index])``, so no two members (of one or two ensembles) share them."""
    state = np.random.SeedSequence([check_seed(seed), index]).generate_state(2, dtype=np.uint64)
    return int(state[0] % (SEED_MAX + 1)), int(state[1] % (SEED_MAX + 1))


def _subset_taker(data: Any):
    """``(n_samples, take(indices) -> the data restricted to them)``: tensors are indexed, a Dataset wrapped."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(dataset, Dataset) and not isinstance(dataset, TensorDataset):
        return check_dataset_size(dataset, "data"), (lambda index: Subset(dataset, index.tolist()))
    tensors = as_data(dataset, "data")
    return tensors[0].shape[0], (lambda index: take(tensors, index))


def _explicit_members(subsets: Sequence, seeds: Sequence, n: int, n_samples: int) -> tuple[list, list]:
    """The given members' sorted training indices (from index tensors or boolean masks) and seeds, checked."""
    if isinstance(subsets, (str, bytes)) or not isinstance(subsets, Sequence) or len(subsets) != n:
        raise ValueError(f"subsets: must be a list of n = {n} index tensors or boolean masks, got "
                         f"{len(subsets) if isinstance(subsets, Sequence) else type(subsets).__name__}")
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence) or len(seeds) != n:
        raise ValueError(f"seeds: must be a list of n = {n} seeds, got "
                         f"{len(seeds) if isinstance(seeds, Sequence) else type(seeds).__name__}")
    chosen = []
    for index, given in enumerate(subsets):
        given = torch.as_tensor(given)
        if given.dtype == torch.bool:
            if given.shape != (n_samples,):
                raise ValueError(f"subsets: mask {index} must have shape ({n_samples},), got {tuple(given.shape)}")
            given = torch.nonzero(given).flatten()
        given = given.long().flatten().unique()  # sorted, distinct
        if given.numel() == 0 or int(given.min()) < 0 or int(given.max()) >= n_samples:
            raise ValueError(f"subsets: subset {index} must hold indices in [0, {n_samples}), at least one")
        chosen.append(given)
    return chosen, [check_seed(s, f"seeds[{index}]") for index, s in enumerate(seeds)]


def train_ensemble(model: nn.Module, data: Any, trainer: Any, n: int, *, subset: float = 0.5, seed: int = 0,
                   progress: bool = False, subsets: Optional[Sequence] = None,
                   seeds: Optional[Sequence[int]] = None) -> TrainedEnsemble:
    """Train ``n`` members of an ensemble with ``trainer``, each on its own seeded random subset of ``data``.

    Args:
        model: the architecture; every member is a copy of it re-initialised under its own seed
            (``trainer.fit`` with ``retrain="scratch"``), ``model`` itself is not changed.
        data: the training data, ``(X, y[, s])`` tensors or arrays, a ``Dataset`` or a ``DataLoader`` (as
            ``trainer.fit`` takes it).
        trainer: any project trainer (:class:`defenses.Trainer` and its subclasses, :class:`defenses.ARTTrainer`)
            with ``retrain="scratch"``.
        n: the number of members (>= 1).
        subset: the fraction of the data each member trains on, in ``(0, 1]`` (``0.5``: random halves,
            TRAK's recipe; ``1``: every member on all the data, only the seeds differ).
        seed: member ``k`` trains under the seeds :func:`defenses.ensembles.member_seeds` ``(seed, k)``.
        progress: show a progress bar over the members.
        subsets, seeds: the members given explicitly instead (both or neither): member ``k`` trains on
            ``subsets[k]`` (indices into ``data``, or a boolean mask over it) under seed ``seeds[k]``, e.g. to
            re-create an ensemble whose subsets and seeds were drawn elsewhere; ``subset`` and ``seed`` are then
            not used, and the cost is the members' sizes summed over the size of ``data``.

    Returns:
        A :class:`TrainedEnsemble`: the models, their subsets and seeds, and the cost.
    """
    check_model(model)
    if not callable(getattr(trainer, "fit", None)):
        raise TypeError(f"trainer: expected a project trainer such as defenses.ERM(), got {type(trainer).__name__}")
    if getattr(trainer, "retrain", None) != "scratch":
        raise ValueError(f"trainer: an ensemble's members train from their own initialisations; use a trainer with "
                         f"retrain='scratch', got retrain={getattr(trainer, 'retrain', None)!r}")
    n = check_int(n, "n", minimum=1)
    subset = check_fraction(subset, "subset", allow_one=True)
    check_seed(seed)
    check_bool(progress, "progress")
    if (subsets is None) != (seeds is None):
        raise ValueError("subsets: give the members' subsets and seeds together, or neither")
    n_samples, restrict = _subset_taker(data)
    if subsets is None:
        size = max(1, round(subset * n_samples))
        draws = [member_seeds(seed, index) for index in range(n)]
        seeds = [train_seed for train_seed, _ in draws]
        subsets = [torch.randperm(n_samples, generator=torch.Generator().manual_seed(subset_seed))[:size].sort().values
                   if size < n_samples else torch.arange(n_samples) for _, subset_seed in draws]
    else:
        subsets, seeds = _explicit_members(subsets, seeds, n, n_samples)
    models = []
    seconds = {"wall": 0.0, "cpu": 0.0}
    for chosen, train_seed in tqdm(list(zip(subsets, seeds)), desc="ensemble members",
                                   disable=None if progress else True, leave=False):
        whole = chosen.numel() == n_samples
        member, spent = timed(trainer.fit, model, data if whole else restrict(chosen), seed=train_seed)
        for clock in seconds:
            seconds[clock] += spent[clock]
        models.append(member)
    return TrainedEnsemble(models=tuple(models), subsets=tuple(subsets), seeds=tuple(seeds), seconds=seconds,
                           clock=cost_clock(model), trainings=sum(c.numel() for c in subsets) / n_samples)
