"""TracIn (checkpoint version, Pruthi et al. 2020, "Estimating Training Data Influence by Tracing
Gradient Descent"), on an aggregate objective and in the harm convention:

    harm_i = - sum_t lr_t <grad f(theta_t), grad l_i(theta_t)>

over saved checkpoints theta_t with the learning rate lr_t in force around them. Each checkpoint
costs one objective gradient and one forward-mode directional-derivative pass (no per-sample
gradients). With one checkpoint (the trained model) and ``lrs=1`` it is exactly ``"ip"``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Any, Mapping, Sequence, Union

import torch
from torch import Tensor
from tqdm.auto import tqdm

from attacks.validation import check_bool
from robust_infl.engine import ScoringProblem, harm_along, objective_gradient
from robust_infl.grad_norms import renormalised
from robust_infl.io import safe_load
from robust_infl.methods import register_method

__all__ = ["tracin_influence", "load_checkpoint"]

Checkpoint = Union[Mapping[str, Tensor], str, os.PathLike]


def load_checkpoint(checkpoint: Checkpoint, index: int) -> Mapping[str, Tensor]:
    """A state dict as given, or read from a path with :func:`robust_infl.io.safe_load` (weights only, CPU).

    A file holding pickled objects other than tensors (which could run code) is refused with a
    ``ValueError`` naming ``checkpoints``.
    """
    if isinstance(checkpoint, Mapping):
        return checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        state = safe_load(checkpoint, name=f"checkpoints: checkpoint {index}")
        if not isinstance(state, Mapping):
            raise ValueError(f"checkpoints: checkpoint {index} does not hold a state dict, got {type(state).__name__}")
        return state
    raise TypeError(
        f"checkpoints: checkpoint {index} must be a state dict or a file path, got {type(checkpoint).__name__}"
    )


def _learning_rates(lrs: Any, n_checkpoints: int) -> list[float]:
    values = [lrs] * n_checkpoints if isinstance(lrs, numbers.Real) and not isinstance(lrs, bool) else lrs
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise TypeError(f"lrs: must be a number or a sequence of numbers, got {type(lrs).__name__}")
    if len(values) != n_checkpoints:
        raise ValueError(f"lrs: has {len(values)} entries but there are {n_checkpoints} checkpoints")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"lrs: every learning rate must be a finite number > 0, got {value!r}")
    return [float(v) for v in values]


def _tensors_from(state: Mapping[str, Tensor], reference: Mapping[str, Tensor], index: int, required: bool) -> dict:
    out = {}
    for name, ref in reference.items():
        if name not in state:
            if required:
                raise ValueError(f"checkpoints: checkpoint {index} lacks the scored parameter {name!r}")
            out[name] = ref
            continue
        value = state[name]
        if not isinstance(value, Tensor) or value.shape != ref.shape:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(
                f"checkpoints: checkpoint {index} has {name!r} of shape {shape}, expected {tuple(ref.shape)}"
            )
        out[name] = value.detach().to(device=ref.device, dtype=ref.dtype)
    return out


@register_method("tracin", single_model=True)
def tracin_influence(
    problem: ScoringProblem,
    *,
    checkpoints: Sequence[Checkpoint] = (),
    lrs: Union[float, Sequence[float]] = 1.0,
    renormalize: bool = False,
) -> Tensor:
    """TracIn harm scores, shape ``(n_train,)``.

    Args:
        checkpoints: state dicts (``model.state_dict()``) or paths of saved ones, one per
            checkpoint. Every scored parameter must be present; unscored parameters and buffers
            missing from a checkpoint are taken from the scored model.
        lrs: the learning rate of each checkpoint (a sequence of the same length) or one number
            for all.
        renormalize: divide each sample's term at each checkpoint by its gradient norm there
            (renormalised TracIn, Hammoudeh & Lowd 2022), from the layer-factored norms of
            :mod:`robust_infl.grad_norms` (no per-sample gradients for Linear / Conv2d layers).

    ``problem.damping`` is ignored. For ``Robust`` objectives the attack is recomputed at every
    checkpoint (and, with ``train_loss="adversarial"``, so are the training-point attacks).
    """
    if isinstance(checkpoints, (Mapping, str, os.PathLike)) or not isinstance(checkpoints, Sequence):
        raise TypeError(f"checkpoints: must be a list of state dicts or paths, got {type(checkpoints).__name__}")
    if len(checkpoints) == 0:
        raise ValueError("checkpoints: method 'tracin' needs at least one checkpoint (state dict or path)")
    check_bool(renormalize, "renormalize")
    rates = _learning_rates(lrs, len(checkpoints))
    total = torch.zeros(problem.n_train, dtype=problem.dtype, device=problem.device)
    for index, (checkpoint, rate) in enumerate(
        tqdm(list(zip(checkpoints, rates)), desc="tracin checkpoints", disable=None if problem.progress else True,
             leave=False)
    ):
        state = load_checkpoint(checkpoint, index)
        params = _tensors_from(state, problem.params, index, required=True)
        at_checkpoint = dataclasses.replace(
            problem,
            frozen=_tensors_from(state, problem.frozen, index, required=False),
            buffers=_tensors_from(state, problem.buffers, index, required=False),
        )
        term = harm_along(at_checkpoint, params, objective_gradient(at_checkpoint, params))
        total += rate * (renormalised(at_checkpoint, params, term) if renormalize else term)
    return total
