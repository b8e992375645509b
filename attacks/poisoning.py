"""Backdoor poisoning: a trigger, the poisoned training set it yields, and ART's poisoning attacks.

- :class:`Trigger` stamps ``x' = (1 - mask) * x + mask * pattern``. It is a callable
  ``attack(model, x, y) -> x'`` (the model and labels are not used), so it serves
  ``robust_infl.Robust(trigger)`` and :func:`attacks.evaluate` (``target_class=c`` gives the
  backdoor's attack success rate).
- :func:`poison`: BadNets (Gu et al. 2017, "BadNets: Identifying Vulnerabilities in the Machine
  Learning Model Supply Chain"): a share ``rate`` of the training set, drawn from the samples of
  the other classes, gets the trigger and the label ``target_class``; with ``clean_label=True``
  samples OF the target class get the trigger and keep their label.
- :class:`ARTPoison`: ART's ``PoisoningAttackBackdoor`` and ``PoisoningAttackCleanLabelBackdoor``
  (Turner et al. 2019, "Label-Consistent Backdoor Attacks": target-class samples are first pushed
  away from their class by PGD on a proxy model, then triggered) behind the same
  ``(X, y, poisoned_index)`` result.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np
import torch
from torch import nn

from .base import Attack, BinaryAsTwoLogits, check_batch
from .inputs import check_target_class
from .plumbing import frozen_in_eval, make_generator, seeded
from .validation import check_choice, check_fraction, check_int, check_number, check_seed

__all__ = ["Trigger", "poison", "ARTPoison", "ART_POISON_NAMES", "check_rate", "check_target_class", "poison_count"]

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
ART_POISON_NAMES = ("PoisoningAttackBackdoor", "PoisoningAttackCleanLabelBackdoor")


def check_rate(rate) -> float:
    """Return ``rate`` as a float after checking it is a number in the open interval (0, 1)."""
    return check_fraction(rate, "rate")


class Trigger(Attack):
    """A backdoor trigger ``x' = (1 - mask) * x + mask * pattern`` for samples of ``mask``'s shape.

    Arguments:
        mask: blending weights in [0, 1], one per input value (shape of one sample, e.g. ``(C, H, W)``).
        pattern: the values stamped in, same shape as ``mask``.

    ``trigger(model, x, y)`` (the attack interface; model and labels unused) and
    ``trigger.apply(x)`` return the stamped batch.
    """

    def __init__(self, mask: torch.Tensor, pattern: torch.Tensor):
        for name, value in (("mask", mask), ("pattern", pattern)):
            if not isinstance(value, torch.Tensor) or not value.is_floating_point():
                raise TypeError(f"{name}: must be a floating-point tensor, got "
                                f"{value.dtype if isinstance(value, torch.Tensor) else type(value).__name__}")
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"{name}: contains NaN or infinite values")
        if mask.shape != pattern.shape:
            raise ValueError(f"pattern: shape {tuple(pattern.shape)} does not match the mask's {tuple(mask.shape)}")
        if mask.dim() == 0:
            raise ValueError("mask: must have the shape of one sample, got a scalar")
        if float(mask.min()) < 0 or float(mask.max()) > 1:
            raise ValueError(f"mask: values must lie in [0, 1], got [{float(mask.min())}, {float(mask.max())}]")
        self.mask = mask.detach().clone()
        self.pattern = pattern.detach().clone()

    @classmethod
    def patch(cls, input_shape: Sequence[int], size: int = 3, corner: str = "bottom-right",
              value: float = 1.0) -> "Trigger":
        """A ``size`` x ``size`` square of ``value`` in one ``corner`` of images of ``input_shape`` ``(..., H, W)``."""
        shape = tuple(int(s) for s in input_shape)
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"input_shape: must be an image shape (..., H, W), got {tuple(input_shape)}")
        check_int(size, "size", minimum=1, maximum=min(shape[-2:]))
        check_choice(corner, "corner", CORNERS)
        check_number(value, "value")
        height, width = shape[-2:]
        rows = slice(0, size) if corner.startswith("top") else slice(height - size, height)
        cols = slice(0, size) if corner.endswith("left") else slice(width - size, width)
        mask = torch.zeros(shape)
        mask[..., rows, cols] = 1.0
        return cls(mask, torch.full(shape, float(value)))

    @classmethod
    def blend(cls, pattern: torch.Tensor, alpha: float) -> "Trigger":
        """Blend ``pattern`` over the whole input: ``x' = (1 - alpha) x + alpha pattern`` (Chen et al. 2017)."""
        check_fraction(alpha, "alpha", allow_one=True)
        if not isinstance(pattern, torch.Tensor):
            raise TypeError(f"pattern: must be a floating-point tensor, got {type(pattern).__name__}")
        return cls(torch.full(pattern.shape, float(alpha), dtype=pattern.dtype), pattern)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The batch ``x`` (shape ``(n, *mask.shape)``) with the trigger stamped on every sample."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x: must be a floating-point tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != tuple(self.mask.shape):
            raise ValueError(f"x: samples of shape {tuple(x.shape[1:])} do not match the trigger's "
                             f"{tuple(self.mask.shape)}")
        mask = self.mask.to(device=x.device, dtype=x.dtype)
        return (1 - mask) * x + mask * self.pattern.to(device=x.device, dtype=x.dtype)

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.apply(x)

    def __repr__(self) -> str:
        return f"Trigger(mask of shape {tuple(self.mask.shape)}, {int((self.mask > 0).sum())} stamped values)"


def _train_tensors(train) -> Tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(train, (tuple, list)) or len(train) < 2:
        raise TypeError(f"train: must be a tuple (X, y), got {type(train).__name__}")
    X, y = train[0], train[1]
    check_batch(X, y)
    return X, y


def poison_count(rate: float, n: int) -> int:
    """The number of poisons a ``rate`` plants on ``n`` samples, ``round(rate * n)``; ``ValueError`` naming
    ``rate`` when that is none."""
    count = round(rate * n)
    if count == 0:
        raise ValueError(f"rate: {rate:g} of {n} samples plants round(rate * n) = 0 poisons; "
                         f"use a rate >= {1 / n:.3g}")
    return count


def _candidates(y: torch.Tensor, target_class: int, rate: float, clean_label: bool, seed: int) -> torch.Tensor:
    """Sorted indices of ``round(rate * n)`` samples drawn (seeded) among the eligible ones: the other
    classes for dirty-label poisons, the target class for clean-label ones."""
    count = poison_count(rate, y.shape[0])
    eligible = torch.nonzero((y == target_class) if clean_label else (y != target_class)).flatten()
    if count > eligible.numel():
        kind = "of" if clean_label else "outside"
        raise ValueError(f"rate: {rate} asks for {count} poisons but only {eligible.numel()} samples lie "
                         f"{kind} the target class")
    order = torch.randperm(eligible.numel(), generator=make_generator(seed))
    return torch.sort(eligible[order[:count]].cpu()).values.to(y.device)


def poison(train, trigger: Trigger, *, target_class: int, rate: float, seed: int, clean_label: bool = False):
    """Poison a share ``rate`` of ``train = (X, y)`` with ``trigger``; returns ``(X', y', poisoned_index)``.

    Dirty-label (BadNets, default): ``round(rate * n)`` samples drawn (seeded) from the classes other
    than ``target_class`` are stamped and relabelled ``target_class``. ``clean_label=True``: samples
    of ``target_class`` are stamped and keep their label. ``poisoned_index`` is sorted; the inputs
    are not modified.
    """
    X, y = _train_tensors(train)
    if not isinstance(trigger, Trigger):
        raise TypeError(f"trigger: must be an attacks.Trigger, got {type(trigger).__name__}")
    rate = check_rate(rate)
    target_class = check_target_class(target_class, int(y.max()) + 1)
    check_seed(seed)
    index = _candidates(y, target_class, rate, bool(clean_label), seed)
    X_out, y_out = X.clone(), y.clone()
    X_out[index] = trigger.apply(X[index])
    y_out[index] = target_class
    return X_out, y_out, index


class ARTPoison:
    """ART's backdoor poisoning attacks behind :func:`poison`'s result, e.g.
    ``ARTPoison("PoisoningAttackCleanLabelBackdoor", eps=0.3, eps_step=0.03, max_iter=10)``.

    Arguments:
        name: ``"PoisoningAttackBackdoor"`` (dirty-label: ART stamps the drawn samples and relabels
            them) or ``"PoisoningAttackCleanLabelBackdoor"`` (label-consistent: ART perturbs
            target-class samples by PGD on ``proxy``, then stamps them; labels unchanged).
        **kwargs: arguments of that ART class (``norm``, ``eps``, ``eps_step``, ``max_iter``,
            ``num_random_init`` for the clean-label attack); the backdoor, proxy classifier, target
            and the share poisoned are filled in by :meth:`poison`.

    ``poison(train, trigger, *, target_class, rate, seed, proxy=None)`` returns ``(X', y', poisoned_index)``.
    """

    def __init__(self, name: str, **kwargs):
        if name not in ART_POISON_NAMES:
            raise ValueError(f"name: unknown ART poisoning attack {name!r}; valid names are {', '.join(ART_POISON_NAMES)}")
        reserved = {"backdoor", "proxy_classifier", "target", "pp_poison", "perturbation"} & set(kwargs)
        if name == "PoisoningAttackBackdoor" and kwargs:
            raise ValueError(f"kwargs: PoisoningAttackBackdoor takes only the trigger, got {sorted(kwargs)}")
        if reserved:
            raise ValueError(f"kwargs: {sorted(reserved)} are set by ARTPoison.poison")
        self.name = name
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"ARTPoison({self.name!r}, {self.kwargs!r})"

    def poison(self, train, trigger: Trigger, *, target_class: int, rate: float, seed: int,
               proxy: nn.Module = None):
        """Poison ``train`` as :func:`poison` does, through ART; ``proxy`` (a trained model) is needed
        by the clean-label attack."""
        from art.attacks.poisoning import PoisoningAttackBackdoor

        X, y = _train_tensors(train)
        if not isinstance(trigger, Trigger):
            raise TypeError(f"trigger: must be an attacks.Trigger, got {type(trigger).__name__}")
        rate = check_rate(rate)
        num_classes = int(y.max()) + 1
        target_class = check_target_class(target_class, num_classes)
        check_seed(seed)
        clean_label = self.name == "PoisoningAttackCleanLabelBackdoor"
        if clean_label and not isinstance(proxy, nn.Module):
            raise TypeError(f"proxy: the clean-label attack needs a trained nn.Module, got {type(proxy).__name__}")
        index = _candidates(y, target_class, rate, clean_label, seed)
        dtype = X.dtype

        def stamp(batch: np.ndarray) -> np.ndarray:
            return trigger.apply(torch.from_numpy(np.asarray(batch, dtype=np.float32))).numpy()

        backdoor = PoisoningAttackBackdoor(stamp)
        X_out, y_out = X.clone(), y.clone()
        picked = X[index].detach().cpu().float().numpy()
        with seeded(seed, X.device):
            if not clean_label:
                poisoned, _ = backdoor.poison(picked, y=np.eye(num_classes)[target_class], broadcast=True)
            else:
                poisoned = self._clean_label(backdoor, proxy, picked, target_class, num_classes)
        X_out[index] = torch.from_numpy(np.asarray(poisoned, dtype=np.float32)).to(device=X.device, dtype=dtype)
        y_out[index] = target_class
        return X_out, y_out, index

    def _clean_label(self, backdoor, proxy: nn.Module, picked: np.ndarray, target_class: int,
                     num_classes: int) -> np.ndarray:
        """ART's clean-label attack on the drawn target-class samples: its untargeted PGD on the proxy (the
        attack object's ``attack``), then its backdoor. The samples are drawn here, without replacement
        (``PoisoningAttackCleanLabelBackdoor.poison`` draws with replacement, so ``pp_poison`` would not
        give the poisoned share)."""
        from art.attacks.poisoning import PoisoningAttackCleanLabelBackdoor
        from art.estimators.classification import PyTorchClassifier

        with frozen_in_eval(proxy):
            classifier = PyTorchClassifier(model=BinaryAsTwoLogits(proxy), loss=nn.CrossEntropyLoss(),
                                           input_shape=picked.shape[1:], nb_classes=num_classes, clip_values=(0.0, 1.0))
            target = np.eye(num_classes, dtype=np.float32)[target_class]
            attack = PoisoningAttackCleanLabelBackdoor(backdoor=backdoor, proxy_classifier=classifier, target=target,
                                                       **self.kwargs)
            attack.attack.set_params(verbose=False)
            perturbed = attack.attack.generate(picked)
            poisoned, _ = backdoor.poison(perturbed, target, broadcast=True)
        return poisoned
