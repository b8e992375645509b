"""Clean accuracy, robust accuracy and attack success rate of a model under several attacks."""

from __future__ import annotations

import math
from typing import Callable, Dict, Iterator, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .base import Attack, check_attack_output, check_batch, predict
from .inputs import as_data, as_inputs, as_labels, check_dataset_size, check_not_empty, check_target_class, to_model
from .plumbing import frozen_in_eval
from .validation import check_int, check_labels, check_model, check_output_shape

__all__ = ["evaluate", "accuracy"]

RESERVED_KEYS = ("n", "clean_acc", "worst_case_robust_acc")


def _batches(data, batch_size: int) -> Tuple[int, Iterator[Tuple[torch.Tensor, torch.Tensor]]]:
    """Number of samples and an iterator of checked ``(x, y)`` batches of ``data`` (``s`` dropped).

    ``(X, y[, s])`` tensors or arrays are normalised whole (:func:`attacks.inputs.as_data`); a
    ``Dataset`` is streamed through a ``DataLoader`` of ``batch_size``, a ``DataLoader`` in its own
    batches, each batch checked by the same rules as it is read.
    """
    if isinstance(data, (DataLoader, Dataset)):
        loader = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size, shuffle=False)
        n = check_dataset_size(loader.dataset, "data")
        return n, ((as_inputs(batch[0], "data"), as_labels(batch[1], "data")) for batch in loader)
    if not isinstance(data, (tuple, list)):
        raise TypeError("data: expected (X, y), (X, y, s), a Dataset yielding such tuples or a DataLoader, "
                        f"got {type(data).__name__}")
    X, y = as_data(data, "data", max_fields=3)[:2]
    return len(X), ((X[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(X), batch_size))


@torch.no_grad()
def _predicted(model: nn.Module, x: torch.Tensor, where: str) -> torch.Tensor:
    """The model's predicted class of every sample (``ValueError`` on outputs other than finite ``(n, C)`` logits)."""
    logits = model(x)
    check_output_shape(logits, x.shape[0])
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"model: produced non-finite outputs on {where}")
    return predict(logits)


@torch.no_grad()
def _clean_predictions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, where: str, name: str) -> tuple:
    """:func:`_predicted` on clean inputs and the number of outputs, after checking that the labels ``y``
    (named ``name``) are classes of the model's outputs."""
    logits = model(x)
    check_output_shape(logits, x.shape[0])
    check_labels(y, name, logits.shape[1])
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"model: produced non-finite outputs on {where}")
    return predict(logits), logits.shape[1]


def accuracy(model: nn.Module, X: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Fraction of ``(X, y)`` the model classifies correctly, in eval mode (mode restored after).

    Works for ``C >= 2`` logits (argmax) and one-logit binary models (``logit > 0``). ``X`` is evaluated
    in the model's dtype on its device (:func:`attacks.inputs.to_model`).
    """
    check_model(model)
    check_batch(X, y)
    check_int(batch_size, "batch_size", minimum=1)
    check_not_empty(len(X), "X")
    correct = 0
    with frozen_in_eval(model):
        for i in range(0, len(X), batch_size):
            batch_x = to_model(X[i:i + batch_size], model)
            batch_y = y[i:i + batch_size].to(batch_x.device)
            where = f"the batch starting at index {i}"
            correct += int((_clean_predictions(model, batch_x, batch_y, where, "y")[0] == batch_y).sum())
    return correct / len(X)


def evaluate(model: nn.Module, data, attacks: Mapping[str, Callable], batch_size: int = 256,
             progress: bool = True, return_adv: bool = False, target_class: Optional[int] = None):
    """Attack ``model`` on ``data`` with every attack in ``attacks`` and measure the damage.

    Arguments:
        model: the classifier (evaluated in eval mode; its mode is restored afterwards).
        data: ``(X, y)``, ``(X, y, s)`` (``s`` is ignored; tensors or numpy arrays), a ``Dataset``
            yielding such tuples (streamed) or a ``DataLoader`` (streamed in its batches). ``X`` is
            converted to the model's dtype and device (:func:`attacks.inputs.to_model`: numpy's
            float64 into a float32 model is computed in float32); the labels must be classes of
            the model's outputs (``ValueError`` naming ``data``).
        attacks: maps a name to a callable ``attack(model, x, y) -> x_adv``; a result outside the
            budget or bounds the attack declares (``eps`` / ``norm`` / ``bounds``) raises ``ValueError``;
            a result of another floating dtype or device is converted to the batch's.
        batch_size: samples per attack call.
        progress: show a tqdm progress bar over batches.
        return_adv: also return the adversarial examples.
        target_class: for targeted attacks such as a backdoor :class:`~attacks.Trigger`: every
            attack's ``asr`` is then the fraction of the samples whose true class is NOT
            ``target_class`` that the model assigns to ``target_class`` once attacked (NaN when
            every sample is of that class); it must be a class of the model's outputs.

    Returns:
        A dict ``{"n": int, "clean_acc": float, "worst_case_robust_acc": float, <name>: {...}}``, per
        attack ``{"robust_acc": float, "asr": float}`` (no robust number at all when ``attacks`` is empty) where
        ``asr`` is the fraction of clean-correct samples
        that the attack flips (NaN when no sample is clean-correct) and a sample counts toward
        ``worst_case_robust_acc`` only if it is classified correctly clean AND after every attack.
        With ``return_adv=True``, a pair ``(results, {name: x_adv})`` with the adversarial
        examples on the data's device, in the data's dtype and order.
    """
    check_model(model)
    if target_class is not None:
        check_int(target_class, "target_class", minimum=0)  # its range: with the model's outputs, below
    if not isinstance(attacks, Mapping):
        raise TypeError(f"attacks: must map names to attack callables, got {type(attacks).__name__}")
    for name, attack in attacks.items():
        if not isinstance(name, str) or name in RESERVED_KEYS:
            raise ValueError(f"attacks: names must be strings other than {RESERVED_KEYS}, got {name!r}")
        if not callable(attack):
            raise TypeError(f"attacks: {name!r} is not callable")
    check_int(batch_size, "batch_size", minimum=1)
    n, batches = _batches(data, batch_size)

    clean_correct = 0
    worst_case_correct = 0
    robust_correct = {name: 0 for name in attacks}
    flipped = {name: 0 for name in attacks}
    not_target = 0
    adversarial: Dict[str, list] = {name: [] for name in attacks}
    with frozen_in_eval(model):
        start = 0
        total = len(data) if isinstance(data, DataLoader) else math.ceil(n / batch_size)
        for x, y in tqdm(batches, total=total, desc="evaluate", disable=None if progress else True):
            data_device, data_dtype = x.device, x.dtype
            x = to_model(x, model)
            y = y.to(x.device)
            where = f"the batch starting at index {start}"
            clean_pred, n_outputs = _clean_predictions(model, x, y, where, "data")
            if target_class is not None:
                check_target_class(target_class, max(n_outputs, 2))
            start += x.shape[0]
            clean_ok = clean_pred == y
            survives_all = clean_ok.clone()
            for name, attack in attacks.items():
                x_adv = attack(model, x, y)
                if not isinstance(x_adv, torch.Tensor) or x_adv.shape != x.shape:
                    shape = tuple(x_adv.shape) if isinstance(x_adv, torch.Tensor) else type(x_adv).__name__
                    raise ValueError(f"attacks: {name!r} returned {shape} for a batch of shape {tuple(x.shape)}")
                if not x_adv.is_floating_point():
                    raise TypeError(f"attacks: {name!r} returned {x_adv.dtype} for a batch of {x.dtype}")
                x_adv = x_adv.to(device=x.device, dtype=x.dtype)
                if not isinstance(attack, Attack):  # an Attack checks its own output
                    check_attack_output(attack, x, x_adv, f"attacks: {name!r}")
                adv_pred = _predicted(model, x_adv, f"the {name!r} adversarial examples of {where}")
                robust_ok = adv_pred == y
                robust_correct[name] += int(robust_ok.sum())
                if target_class is None:
                    flipped[name] += int((clean_ok & ~robust_ok).sum())
                else:
                    flipped[name] += int(((adv_pred == target_class) & (y != target_class)).sum())
                survives_all &= robust_ok
                if return_adv:
                    adversarial[name].append(x_adv.detach().to(device=data_device, dtype=data_dtype))
            clean_correct += int(clean_ok.sum())
            not_target += 0 if target_class is None else int((y != target_class).sum())
            worst_case_correct += int(survives_all.sum())

    results: Dict = {"n": n, "clean_acc": clean_correct / n}
    for name in attacks:
        base = clean_correct if target_class is None else not_target
        asr = flipped[name] / base if base else math.nan
        results[name] = {"robust_acc": robust_correct[name] / n, "asr": asr}
    if attacks:
        results["worst_case_robust_acc"] = worst_case_correct / n
    if return_adv:
        return results, {name: torch.cat(chunks) for name, chunks in adversarial.items()}
    return results
