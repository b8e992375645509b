"""Names -> objects for the command line and the defence pipeline: data, model, attack, trainer, objective.

One table of per-data-set defaults (model, threat model, training hyper-parameters) so that the
CLI and :func:`defenses.run` agree. Images: PGD linf, eps 0.1, bounds (0, 1). Tabular data
(standardised features): PGD L2, eps 0.5, bounds None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from torch import nn

from robust_infl.datasets import DATASET_NAMES, Splits, load_dataset
from robust_infl.models import MODEL_NAMES, build_model

__all__ = [
    "DataDefaults",
    "DATA_DEFAULTS",
    "DATASET_NAMES",
    "MODEL_NAMES",
    "ATTACK_NAMES",
    "TRAINER_NAMES",
    "OBJECTIVE_NAMES",
    "data_defaults",
    "load_splits",
    "model_factory",
    "make_attack",
    "make_trainer",
    "make_objective",
]

ATTACK_NAMES = ("fgsm", "pgd", "linear", "autoattack", "apgd-ce", "apgd-t")
TRAINER_NAMES = ("erm", "fast-at", "pgd-at", "trades", "art-pgd-at", "art-trades")
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


def make_attack(name: str, *, eps: float, norm: str = "linf", steps: int = 10, bounds=(0.0, 1.0),
                seed: int = 0) -> Callable:
    """Attack ``name`` as an ``attack(model, x, y)`` callable: ``fgsm``, ``pgd``, ``linear``, ``autoattack``
    (standard version), ``apgd-ce`` or ``apgd-t`` (targeted APGD-DLR; both single AutoAttack components).

    ``linear`` is the paper's closed-form boundary crossing (no budget: ``eps`` and ``norm`` are
    not used); ``autoattack`` and the APGD components run the authors' AutoAttack code, which
    clips to [0, 1], so they need data with bounds (0, 1).
    """
    import attacks

    if name not in ATTACK_NAMES:
        raise ValueError(f"attack: unknown name {name!r}; valid names are {', '.join(ATTACK_NAMES)}")
    if name == "fgsm":
        return attacks.FGSM(eps, norm=norm, bounds=bounds)
    if name == "pgd":
        return attacks.PGD(eps, steps=steps, norm=norm, bounds=bounds, seed=seed)
    if name == "linear":
        return attacks.LinearClosedForm()
    if bounds is None or tuple(bounds) != (0.0, 1.0):
        raise ValueError(f"attack: {name!r} runs AutoAttack's code, which clips to [0, 1]; this data "
                         f"has bounds {bounds}. Use --attack pgd")
    if name == "autoattack":
        return attacks.AutoAttack(eps, norm=norm, seed=seed)
    return attacks.AutoAttack(eps, norm=norm, seed=seed, components=(name,))


def make_trainer(name: str, *, epochs: int, lr: float, batch_size: int, retrain: str = "scratch",
                 eps: float = 0.1, norm: str = "linf", bounds=(0.0, 1.0), train_steps: int = 5,
                 progress: bool = True):
    """Trainer ``name``: ``erm``, ``fast-at`` (Wong et al. 2020: FGSM from a random start, step
    1.25 eps), ``pgd-at`` (Madry), ``trades`` (beta 6), or ART's own ``art-pgd-at`` / ``art-trades``;
    the multi-step ones use ``train_steps`` PGD steps, all in the same ``eps``-ball as the evaluation attack.
    """
    from defenses.art_trainer import ARTTrainer
    from defenses.trainers import ERM, PGDAT, TRADES, FastAT

    common = dict(epochs=epochs, lr=lr, batch_size=batch_size, retrain=retrain, progress=progress)
    ball = dict(eps=eps, norm=norm, bounds=bounds)
    if name == "erm":
        return ERM(**common)
    if name == "fast-at":
        return FastAT(**ball, **common)
    if name == "pgd-at":
        return PGDAT(steps=train_steps, **ball, **common)
    if name == "trades":
        return TRADES(steps=train_steps, **ball, **common)
    if name in ("art-pgd-at", "art-trades"):
        return ARTTrainer("madry-pgd" if name == "art-pgd-at" else "trades", max_iter=train_steps, **ball, **common)
    raise ValueError(f"trainer: unknown name {name!r}; valid names are {', '.join(TRAINER_NAMES)}")


def make_objective(name: str, attack: Optional[Callable] = None):
    """Objective ``name``: ``utility``, ``robust`` (needs ``attack``), ``dp`` (demographic parity),
    ``eop`` (equal opportunity)."""
    import robust_infl

    if name == "utility":
        return robust_infl.Utility()
    if name == "robust":
        if attack is None:
            raise ValueError("attack: the robust objective needs an attack")
        return robust_infl.Robust(attack)
    if name == "dp":
        return robust_infl.DemographicParity()
    if name == "eop":
        return robust_infl.EqualOpportunity()
    raise ValueError(f"objective: unknown name {name!r}; valid names are {', '.join(OBJECTIVE_NAMES)}")
