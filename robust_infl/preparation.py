"""Shared preparation of a scoring run: validate the common arguments, probe the model on the data,
and build the :class:`~robust_infl.engine.ScoringProblem` in eval mode.

Used by :func:`robust_infl.influence` and :func:`robust_infl.distributed.sharded_influence`, so that
both validate and set up a problem the same way.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from attacks.inputs import as_labels, check_inputs, collate, to_model
from attacks.plumbing import eval_mode
from attacks.validation import check_labels, check_model
from robust_infl.engine import ScoringProblem, build_problem, check_finite_results
from robust_infl.inputs import TargetSet, resolve_device, resolve_param_names, validate_target, validate_train
from robust_infl.objectives import LossFn, Objective, default_loss_fn
from robust_infl.options import ScoringOptions

__all__ = ["PreparedProblem", "prepared_problem"]

PROBE_SIZE = 2


@dataclass(frozen=True)
class PreparedProblem:
    """A validated scoring run: the problem, the validated training and target sets, and what was checked.

    ``label_outputs`` is the number of classes streamed Dataset labels are checked against batch by
    batch (``None`` when they are not checked there).
    """

    problem: ScoringProblem
    train: Union[tuple[Tensor, Tensor], Dataset]
    target: TargetSet
    label_outputs: Optional[int]


@contextmanager
def prepared_problem(
    model: nn.Module,
    train: Union[tuple[Tensor, Tensor], Dataset],
    target: Union[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
    objective: Objective,
    options: ScoringOptions,
) -> Iterator[PreparedProblem]:
    """Validate the arguments shared by the scoring entry points (errors name the argument; ``options``
    were checked when built), probe the model on a few train and target samples, and yield the built
    problem with the model in eval mode; every submodule's own train/eval mode is restored on exit
    (even on error).
    """
    check_model(model)
    if not isinstance(objective, Objective):
        raise TypeError(
            f"objective: expected an Objective such as robust_infl.Utility(), got {type(objective).__name__}"
        )
    if not isinstance(options, ScoringOptions):
        raise TypeError(f"options: expected robust_infl.ScoringOptions, got {type(options).__name__}")
    device = resolve_device(options.device, model)
    param_names = resolve_param_names(model, options.params)
    train = validate_train(train)
    target_set = validate_target(target)

    with eval_mode(model):
        checks_labels = options.loss_fn is None and isinstance(train, Dataset)  # the default loss checks labels
        loss_fn, n_outputs = _check_model_fits_data(model, train, target_set, options.loss_fn, device)
        objective.check(target_set, n_outputs)
        label_outputs = n_outputs if checks_labels else None
        problem = build_problem(
            model,
            train,
            target_set,
            objective,
            loss_fn=loss_fn,
            param_names=param_names,
            device=device,
            options=options,
            label_outputs=label_outputs,
        )
        yield PreparedProblem(problem, train, target_set, label_outputs)


def _probe_batch(train: Union[tuple[Tensor, Tensor], Dataset]) -> tuple[Tensor, Tensor]:
    if isinstance(train, tuple):
        return train[0][:PROBE_SIZE], train[1][:PROBE_SIZE]
    items = [train[i] for i in range(min(PROBE_SIZE, len(train)))]  # type: ignore[arg-type]
    x, y = collate(items, "train")[:2]
    return check_inputs(x, "train"), as_labels(y, "train")


def _forward(name: str, model: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    """Probe outputs of ``model`` on ``x``, computed where the model lives, returned on ``device``."""
    try:
        with torch.no_grad():
            outputs = model(to_model(x, model))
    except RuntimeError as err:
        raise ValueError(
            f"{name}: the model cannot evaluate inputs of shape {tuple(x.shape[1:])} ({err})"
        ) from err
    if not isinstance(outputs, Tensor):
        raise ValueError(f"model: must return a tensor of outputs, got {type(outputs).__name__}")
    check_finite_results(outputs, "outputs", f"the first {name} samples")
    return outputs.to(device)


def _check_model_fits_data(
    model: nn.Module,
    train: Union[tuple[Tensor, Tensor], Dataset],
    target: TargetSet,
    loss_fn: Optional[LossFn],
    device: torch.device,
) -> tuple[LossFn, Optional[int]]:
    """Probe the model on a few train and target samples; check that its outputs fit the loss (and,
    for the default loss, that the labels fit its classes). Return the loss and the number of
    outputs (``None`` when the outputs are not ``(batch, n_outputs)``)."""
    probes = {"train": _probe_batch(train), "target": (target.x[:PROBE_SIZE], target.y[:PROBE_SIZE])}
    outputs = {name: _forward(name, model, x, device) for name, (x, _) in probes.items()}
    if loss_fn is None:
        for name, out in outputs.items():
            if out.ndim != 2 or out.shape[0] != probes[name][0].shape[0] or out.shape[1] < 1:
                # the project's one rule (as attacks.base.check_output_shape): (n,) is refused, not guessed
                hint = " (a binary model returns one logit as (n, 1): do not squeeze it)" if out.ndim == 1 else ""
                raise ValueError(
                    f"model: outputs of shape {tuple(out.shape)} are incompatible with the default loss, "
                    f"which needs (batch, n_outputs) logits{hint}; pass a loss_fn"
                )
        n_outputs = outputs["train"].shape[1]
        if outputs["target"].shape[1] != n_outputs:
            raise ValueError(
                f"target: the model gives {outputs['target'].shape[1]} outputs on target inputs "
                f"but {n_outputs} on training inputs"
            )
        if isinstance(train, tuple):
            check_labels(train[1], "train", n_outputs)
        else:
            check_labels(probes["train"][1], "train", n_outputs)
        check_labels(target.y, "target", n_outputs)
        return default_loss_fn(n_outputs), n_outputs
    for name, out in outputs.items():
        y = probes[name][1].to(device)
        losses = loss_fn(out, y)
        if not isinstance(losses, Tensor) or losses.shape != (y.shape[0],):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"loss_fn: must return per-sample losses of shape ({y.shape[0]},) for the model's outputs "
                f"of shape {tuple(out.shape)}, got {shape}"
            )
    out = outputs["train"]
    return loss_fn, (out.shape[1] if out.ndim == 2 else None)
