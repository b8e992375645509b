"""Names -> objects for the command line and the defence pipeline: data, model, objective.

The attack names are in :mod:`attacks.registry`, the trainer names in :mod:`defenses.registry`.

One table of per-data-set defaults (model, threat model, training hyper-parameters) so that the
CLI and :func:`defenses.run` agree. Images: PGD linf, eps 0.1, bounds (0, 1); on Fashion-MNIST too,
the budget its robustness papers commonly use (e.g. Wong & Kolter 2018, provable defenses via the convex
outer adversarial polytope; MNIST's customary 0.3 leaves a small CNN almost no robust accuracy there). Tabular data
(standardised features): PGD L2, eps 0.5, bounds None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from robust_infl.datasets import DATASET_NAMES, Splits, load_dataset
from robust_infl.models import MODEL_NAMES, build_model
from robust_infl.objectives import DemographicParity, EqualOpportunity, Robust, Utility

__all__ = [
    "DataDefaults",
    "DATA_DEFAULTS",
    "DATASET_NAMES",
    "MODEL_NAMES",
    "OBJECTIVE_NAMES",
    "data_defaults",
    "load_splits",
    "model_factory",
    "make_objective",
]

OBJECTIVE_NAMES = ("utility", "robust", "dp", "eop")


@dataclass(frozen=True)
class DataDefaults:
    """Defaults for one data set: model, threat model and training hyper-parameters."""

    model: str
    norm: str
    eps: float
    steps: int
    epochs: int
    lr: float
    batch_size: int


_IMAGES = dict(norm="linf", eps=0.1, steps=10)
_TABULAR = dict(norm="l2", eps=0.5, steps=10)
DATA_DEFAULTS = {
    "mnist": DataDefaults(model="cnn", epochs=5, lr=1e-3, batch_size=64, **_IMAGES),
    "mnist-full": DataDefaults(model="cnn", epochs=3, lr=1e-3, batch_size=128, **_IMAGES),
    "fashion-mnist": DataDefaults(model="cnn", epochs=5, lr=1e-3, batch_size=64, **_IMAGES),
    "fashion-mnist-full": DataDefaults(model="cnn", epochs=3, lr=1e-3, batch_size=128, **_IMAGES),
    "digits": DataDefaults(model="mlp", epochs=30, lr=1e-3, batch_size=32, **_IMAGES),
    "adult": DataDefaults(model="logreg", epochs=5, lr=1e-2, batch_size=128, **_TABULAR),
    "moons": DataDefaults(model="mlp", epochs=50, lr=1e-2, batch_size=32, **_TABULAR),
}
# For data given as tensors by the user.
USER_DATA_DEFAULTS = DataDefaults(model="", norm="linf", eps=0.1, steps=10, epochs=10, lr=1e-3, batch_size=64)


def data_defaults(name: str) -> DataDefaults:
    """The defaults of data set ``name`` (see ``DATA_DEFAULTS``)."""
    if name not in DATA_DEFAULTS:
        raise ValueError(f"data: unknown data set {name!r}; valid names are {', '.join(DATA_DEFAULTS)}")
    return DATA_DEFAULTS[name]


def load_splits(name: str, seed: int, n_train: Optional[int] = None, n_val: Optional[int] = None,
                n_test: Optional[int] = None) -> Splits:
    """Seeded train / validation / test splits of data set ``name`` (see ``robust_infl.datasets``)."""
    data_defaults(name)
    return load_dataset(name, seed=seed, n_train=n_train, n_val=n_val, n_test=n_test)


def model_factory(name: str, splits: Splits) -> Callable[[int], nn.Module]:
    """``seed -> model``: the reference model ``name`` sized for ``splits``, initialised with the seed."""
    if name not in MODEL_NAMES:
        raise ValueError(f"model: unknown name {name!r}; valid names are {', '.join(MODEL_NAMES)}")
    shape, classes = tuple(splits.input_shape), splits.num_classes
    if name == "cnn" and len(shape) != 3:
        raise ValueError(f"model: 'cnn' needs image data, {splits.name} has samples of shape {shape}")

    def build(seed: int) -> nn.Module:
        return build_model(name, shape, classes, seed=seed)

    return build


def make_objective(name: str, attack: Optional[Callable] = None):
    """Objective ``name``: ``utility``, ``robust`` (needs ``attack``), ``dp`` (demographic parity),
    ``eop`` (equal opportunity)."""
    if name == "utility":
        return Utility()
    if name == "robust":
        if attack is None:
            raise ValueError("attack: the robust objective needs an attack")
        return Robust(attack)
    if name == "dp":
        return DemographicParity()
    if name == "eop":
        return EqualOpportunity()
    raise ValueError(f"objective: unknown name {name!r}; valid names are {', '.join(OBJECTIVE_NAMES)}")
