"""Normalisation of the data given at the public boundary, and the seeded call of user-supplied attacks.

Scalars are checked with :mod:`attacks.validation`, data with :mod:`attacks.inputs` (the one rule of the API).

Every error names the argument it is about first (``"train: ..."``, ``"params: ..."``) and says
what was wrong, so that a bad call fails here and not with a stack trace from inside torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from attacks.inputs import as_data, check_dataset_size
from attacks.plumbing import model_device, seeded
from attacks.validation import check_choice, check_device, check_finite

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


def validate_train(train: Any) -> Union[tuple[Tensor, Tensor], Dataset]:
    """Check ``train`` (``(X, y[, ...])`` tensors or arrays, a sized ``Dataset`` of ``(x, y)`` or a
    ``DataLoader`` over one, whose dataset is used) and return it normalised
    (:func:`attacks.inputs.as_data`; a Dataset other than a ``TensorDataset`` is streamed, its batches
    checked as they are read)."""
    if isinstance(train, DataLoader):
        train = train.dataset  # streamed in this call's own batches, never shuffled
    if isinstance(train, Dataset):
        check_dataset_size(train, "train")
        return train
    return tuple(as_data(train, "train")[:2])


def validate_target(target: Any) -> TargetSet:
    """Check ``target`` (``(X, y)`` or ``(X, y, s)`` with ``s`` in {0, 1}, tensors or arrays, or a sized
    ``Dataset`` / ``DataLoader`` of such items, read whole: target sets are small) and return a
    :class:`TargetSet`."""
    x, y, *rest = as_data(target, "target", max_fields=3)
    s = None
    if rest:
        s = rest[0]
        if s.ndim != 1:
            raise ValueError(f"target: s must have shape ({x.shape[0]},), got {tuple(s.shape)}")
        check_finite(s, "target")
        if not bool(((s == 0) | (s == 1)).all()):
            raise ValueError("target: the sensitive attribute s must take values in {0, 1}")
    return TargetSet(x, y, s)


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
