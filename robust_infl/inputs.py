"""Normalisation of the data given at the public boundary, and the seeded call of user-supplied attacks.

Scalars and tensors are checked with :mod:`attacks.validation`.

Every error names the argument it is about first (``"train: ..."``, ``"params: ..."``) and says
what was wrong, so that a bad call fails here and not with a stack trace from inside torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.dataloader import default_collate

from attacks.plumbing import model_device, seeded
from attacks.validation import as_tensor, check_choice, check_dataset_size, check_device, check_finite, integer_labels

__all__ = [
    "TargetSet",
    "check_train_loss",
    "resolve_device",
    "validate_train",
    "validate_target",
    "resolve_param_names",
    "call_attack",
]

TRAIN_LOSSES = ("clean", "adversarial")


@dataclass(frozen=True)
class TargetSet:
    """Target (validation) samples: inputs ``x``, labels ``y``, optional 0/1 group ``s``."""

    x: Tensor
    y: Tensor
    s: Optional[Tensor] = None

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device, dtype: torch.dtype) -> "TargetSet":
        """The same samples with floating inputs (and groups) in ``dtype`` on ``device``."""
        s = None if self.s is None else self.s.to(device=device, dtype=dtype)
        return TargetSet(self.x.to(device=device, dtype=dtype), self.y.to(device), s)


def check_train_loss(train_loss: Any, train_attack: Any) -> None:
    """Check the training-loss mode and that an attack comes with (and only with) ``"adversarial"``."""
    check_choice(train_loss, "train_loss", TRAIN_LOSSES)
    if train_loss == "adversarial" and not callable(train_attack):
        raise ValueError("train_attack: train_loss='adversarial' needs a callable train_attack(model, x, y)")
    if train_loss == "clean" and train_attack is not None:
        raise ValueError("train_attack: only used with train_loss='adversarial'; pass train_loss='adversarial'")


def _check_pair(name: str, x: Tensor, y: Tensor) -> None:
    if x.dtype == torch.bool or x.is_complex():
        raise TypeError(f"{name}: X must hold real numbers (a floating or integer tensor), got {x.dtype}")
    if y.is_complex():
        raise TypeError(f"{name}: y must hold class labels (an integer tensor), got {y.dtype}")
    if x.ndim == 0:
        raise ValueError(f"{name}: X must have a leading sample dimension, got a scalar")
    if y.ndim == 0 or y.shape[0] != x.shape[0]:
        n_labels = "a scalar" if y.ndim == 0 else y.shape[0]
        raise ValueError(f"{name}: X and y have different lengths ({x.shape[0]} vs {n_labels})")
    if x.shape[0] == 0:
        raise ValueError(f"{name}: is empty (0 samples)")
    check_finite(x, name)


def validate_train(train: Any) -> Union[tuple[Tensor, Tensor], Dataset]:
    """Check ``train`` (``(X, y)``, a sized ``Dataset`` of ``(x, y)`` or a ``DataLoader`` over one, whose
    dataset is used) and return it normalised."""
    if isinstance(train, DataLoader):
        train = train.dataset  # streamed in this call's own batches, never shuffled
    if isinstance(train, Dataset):
        try:
            n = len(train)  # type: ignore[arg-type]
        except TypeError as err:
            raise TypeError("train: a Dataset must define __len__") from err
        if n == 0:
            raise ValueError("train: is empty (0 samples)")
        return train
    if not isinstance(train, (tuple, list)) or len(train) != 2:
        raise TypeError(
            f"train: expected (X, y) or a torch.utils.data.Dataset of (x, y), got {type(train).__name__}"
            + (f" of length {len(train)}" if isinstance(train, (tuple, list)) else "")
        )
    x, y = as_tensor(train[0], "train"), as_tensor(train[1], "train")
    _check_pair("train", x, y)
    return x, integer_labels(y, "train")


def validate_target(target: Any) -> TargetSet:
    """Check ``target`` (``(X, y)`` or ``(X, y, s)`` with ``s`` in {0, 1}, tensors or arrays, or a sized
    ``Dataset`` / ``DataLoader`` of such items, read whole: target sets are small) and return a
    :class:`TargetSet`."""
    if isinstance(target, DataLoader):
        target = target.dataset
    if isinstance(target, Dataset):
        target = _collate_whole("target", target)
    if not isinstance(target, (tuple, list)) or len(target) not in (2, 3):
        raise TypeError(f"target: expected (X, y) or (X, y, s), or a Dataset of such items, got {type(target).__name__}")
    x, y = as_tensor(target[0], "target"), as_tensor(target[1], "target")
    _check_pair("target", x, y)
    y = integer_labels(y, "target")
    s = None
    if len(target) == 3:
        s = as_tensor(target[2], "target")
        if s.ndim != 1 or s.shape[0] != x.shape[0]:
            raise ValueError(f"target: s must have shape ({x.shape[0]},), got {tuple(s.shape)}")
        check_finite(s, "target")
        if not bool(((s == 0) | (s == 1)).all()):
            raise ValueError("target: the sensitive attribute s must take values in {0, 1}")
    return TargetSet(x, y, s)


def _collate_whole(name: str, dataset: Dataset) -> tuple:
    """Every item of a sized ``dataset`` stacked into a tuple of tensors (``ValueError`` naming ``name``)."""
    items = [dataset[i] for i in range(check_dataset_size(dataset, name))]
    if not all(isinstance(item, (tuple, list)) and len(item) in (2, 3) for item in items):
        raise ValueError(f"{name}: Dataset items must be (x, y) or (x, y, s) tuples")
    return tuple(default_collate([tuple(item) for item in items]))


def resolve_param_names(model: nn.Module, params: Optional[Sequence[str]]) -> tuple[str, ...]:
    """Names of the parameters to score: all trainable ones by default, else the given names."""
    named = dict(model.named_parameters())
    if params is None:
        names = tuple(name for name, p in named.items() if p.requires_grad)
        if not names:
            raise ValueError("params: the model has no trainable parameters")
        return names
    if isinstance(params, str) or not isinstance(params, (list, tuple)):
        raise TypeError(f"params: expected a list of parameter names, got {type(params).__name__}")
    if not params:
        raise ValueError("params: the list of parameter names is empty")
    unknown = [name for name in params if name not in named]
    if unknown:
        raise ValueError(f"params: unknown parameter name(s) {unknown}; valid names are {list(named)}")
    if len(set(params)) != len(params):
        raise ValueError(f"params: duplicate parameter names in {list(params)}")
    return tuple(params)


def call_attack(
    attack: Callable[[nn.Module, Tensor, Tensor], Tensor],
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    seed: int,
    name: str,
) -> Tensor:
    """Run ``attack(model, x, y)`` under a seeded random state and check what it returns.

    The global torch (CPU and the current accelerator) and numpy random states are restored
    afterwards, so the attack is reproducible and leaves the caller's random streams untouched.
    Gradients are enabled inside (attacks differentiate with respect to the input). The result is
    detached; an error naming ``name`` is raised unless it is a finite tensor of ``x``'s shape.
    """
    with seeded(seed, x.device), torch.enable_grad():
        x_adv = attack(model, x, y)
    if not isinstance(x_adv, Tensor):
        raise TypeError(f"{name}: must return a tensor of adversarial inputs, got {type(x_adv).__name__}")
    if x_adv.shape != x.shape:
        raise ValueError(f"{name}: returned shape {tuple(x_adv.shape)}, expected the input shape {tuple(x.shape)}")
    x_adv = x_adv.detach().to(device=x.device, dtype=x.dtype)
    check_finite(x_adv, name)
    return x_adv


def resolve_device(device: Any, model: nn.Module) -> torch.device:
    """``device`` as a ``torch.device`` (with an index for CUDA); the model's device when ``None``."""
    if device is None:
        return model_device(model)
    resolved = check_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", torch.cuda.current_device())
    return resolved
