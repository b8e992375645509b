"""The public entry point: :func:`influence` scores every training sample against an objective."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset
from torch.utils.data.dataloader import default_collate

from robust_infl.engine import build_problem, check_finite_results
from robust_infl.methods import check_method_options, get_method
from robust_infl.objectives import Attack, LossFn, Objective, default_loss_fn
from robust_infl.validation import (
    TargetSet,
    as_tensor,
    check_labels,
    check_model,
    check_nonnegative_float,
    check_positive_int,
    check_seed,
    check_train_loss,
    model_device,
    model_dtype,
    resolve_device,
    resolve_param_names,
    validate_target,
    validate_train,
)

__all__ = ["influence"]

PROBE_SIZE = 2


def influence(
    model: nn.Module,
    train: Union[tuple[Tensor, Tensor], Dataset],
    target: Union[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
    *,
    objective: Objective,
    method: str = "ip",
    loss_fn: Optional[LossFn] = None,
    damping: float = 0.0,
    batch_size: int = 256,
    params: Optional[Sequence[str]] = None,
    seed: int = 0,
    train_loss: str = "clean",
    train_attack: Optional[Attack] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    **method_options: Any,
) -> Tensor:
    """Harm score of every training sample on ``objective`` evaluated on ``target``.

    Harm convention: ``harm_i > 0`` is the first-order prediction that REMOVING training sample
    ``i`` DECREASES the objective, proportional to that predicted decrease (larger = more harmful).

    Args:
        model: the trained ``nn.Module``; scored in eval mode, its train/eval mode is restored after.
        train: ``(X, y)`` tensors or a sized ``Dataset`` of ``(x, y)`` items (streamed, not shuffled).
        target: ``(X, y)`` or ``(X, y, s)`` with a sensitive attribute ``s`` in {0, 1}.
        objective: ``Utility()``, ``Robust(attack)``, ``DemographicParity()``,
            ``EqualOpportunity()`` or another :class:`~robust_infl.objectives.Objective`.
        method: a name from ``robust_infl.available_methods()``; each method's options (passed as
            ``**method_options``) are documented in the docstring of its function, in the module named:

            - ``"ip"``: ``-<grad f, grad l_i>``, identity Hessian, one forward-mode pass
              (``methods.ip``; ``aggregate``).
            - ``"ip-ensemble"``: IP summed or averaged over seeded dropout-masked or weight-noised
              copies of the model (``methods.ensemble``; ``members``, ``perturbation``, ``scale``, ``combine``).
            - ``"tracin"``: learning-rate-weighted IP over saved checkpoints (``methods.tracin``;
              ``checkpoints``, ``lrs``).
            - ``"if-exact"``: influence function with the explicit damped Hessian, at most
              ``methods.hessian.MAX_PARAMS`` scored parameters (``methods.hessian``; ``hvp_chunk_size``).
            - ``"if-cg"``: influence function, ``H^{-1} grad f`` by conjugate gradient
              (``methods.iterative``; ``tol``, ``max_iter``).
            - ``"if-lissa"``: influence function, ``H^{-1} grad f`` by the LiSSA recursion
              (``methods.iterative``; ``depth``, ``scale``, ``repeats``, ``hvp_batch_size``).
            - ``"datainf"``: DataInf's layer-wise closed-form inverse (``methods.datainf``; ``lambda_scale``).
            - ``"self"``, ``"loss"``, ``"random"``: objective-free baselines, the squared gradient norm,
              the training loss and seeded noise (``methods.baselines``; no options).
        loss_fn: per-sample loss ``loss_fn(outputs, targets) -> (n,)``; default cross-entropy for
            >= 2 outputs, binary cross-entropy with logits for 1 output (labels are then checked
            against the model's classes).
        damping: ``lambda`` in ``H = (1/n) sum_i Hessian(l_i) + lambda * I`` (Hessian methods).
        batch_size: training (and target) samples per batch.
        params: names of the parameters to score (e.g. only the last layer); all trainable ones
            by default.
        seed: seeds every random choice (attacks, ensemble members); same seed, same scores.
        train_loss: ``"clean"``, or ``"adversarial"`` to take the per-sample training losses at
            ``train_attack(model, x, y)`` (adversarially trained models).
        train_attack: the training-point attack for ``train_loss="adversarial"``.
        device: where to compute; the model's device by default.
        progress: show tqdm progress bars over training batches.
        **method_options: passed to the method (see ``method``), e.g. ``aggregate=False`` for ``"ip"``
            (returns the ``(n_train, n_target)`` matrix of harms on each target sample's own loss);
            a name the method does not take raises ``TypeError``.

    Returns:
        A tensor of shape ``(n_train,)`` (or as documented by the method option) on ``device``, in
        the model's floating dtype.
    """
    check_model(model)
    if not isinstance(objective, Objective):
        raise TypeError(
            f"objective: expected an Objective such as robust_infl.Utility(), got {type(objective).__name__}"
        )
    if not isinstance(method, str):
        raise TypeError(f"method: expected a method name (str), got {type(method).__name__}")
    method_fn = get_method(method)
    check_method_options(method, method_options)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"loss_fn: must be callable loss_fn(outputs, targets), got {type(loss_fn).__name__}")
    damping = check_nonnegative_float("damping", damping)
    batch_size = check_positive_int("batch_size", batch_size)
    seed = check_seed(seed)
    check_train_loss(train_loss, train_attack)
    if not isinstance(progress, bool):
        raise TypeError(f"progress: must be True or False, got {type(progress).__name__}")
    device = resolve_device(device, model)
    param_names = resolve_param_names(model, params)
    train = validate_train(train)
    target_set = validate_target(target)

    with _eval_mode(model):
        checks_labels = loss_fn is None
        loss_fn, n_outputs = _check_model_fits_data(model, train, target_set, loss_fn, device)
        objective.check(target_set, n_outputs)
        problem = build_problem(
            model,
            train,
            target_set,
            objective,
            loss_fn=loss_fn,
            param_names=param_names,
            batch_size=batch_size,
            device=device,
            damping=damping,
            seed=seed,
            progress=progress,
            train_loss=train_loss,
            train_attack=train_attack,
            label_outputs=n_outputs if checks_labels and isinstance(train, Dataset) else None,
        )
        return method_fn(problem, **method_options).detach()


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode, restoring every submodule's own mode afterwards (even on error)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


def _probe_batch(train: Union[tuple[Tensor, Tensor], Dataset]) -> tuple[Tensor, Tensor]:
    if isinstance(train, tuple):
        return train[0][:PROBE_SIZE], train[1][:PROBE_SIZE]
    items = [train[i] for i in range(min(PROBE_SIZE, len(train)))]  # type: ignore[arg-type]
    if not all(isinstance(item, (tuple, list)) and len(item) >= 2 for item in items):
        raise ValueError("train: Dataset items must be (x, y) tuples")
    batch = default_collate([tuple(item[:2]) for item in items])
    return as_tensor("train", batch[0]), as_tensor("train", batch[1])


def _forward(name: str, model: nn.Module, x: Tensor, device: torch.device) -> Tensor:
    """Probe outputs of ``model`` on ``x``, computed where the model lives, returned on ``device``."""
    try:
        with torch.no_grad():
            outputs = model(x.to(device=model_device(model), dtype=model_dtype(model)))
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
                raise ValueError(
                    f"model: outputs of shape {tuple(out.shape)} are incompatible with the default loss, "
                    "which needs (batch, n_outputs) logits; pass a loss_fn"
                )
        n_outputs = outputs["train"].shape[1]
        if outputs["target"].shape[1] != n_outputs:
            raise ValueError(
                f"target: the model gives {outputs['target'].shape[1]} outputs on target inputs "
                f"but {n_outputs} on training inputs"
            )
        if isinstance(train, tuple):
            check_labels("train", train[1], n_outputs)
        else:
            check_labels("train", probes["train"][1], n_outputs)
        check_labels("target", target.y, n_outputs)
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
