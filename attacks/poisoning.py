"""Backdoor poisoning: a trigger, the poisoned training set it yields, and ART's poisoning attacks.

- :class:`Trigger` stamps ``x' = (1 - mask) * x + mask * pattern``. It is a callable
  ``attack(model, x, y) -> x'`` (the model and labels are not used), so it serves
  ``robust_infl.Robust(trigger)`` and :func:`attacks.evaluate` (``target_class=c`` gives the
  backdoor's attack success rate).
- :func:`poison`: BadNets (Gu et al. 2017, "BadNets: Identifying Vulnerabilities in the Machine
  Learning Model Supply Chain"): a share ``rate`` of the training set, drawn from the samples of
  the other classes, gets the trigger and the label ``target_class``; with ``clean_label=True``
  samples OF the target class get the trigger and keep their label.
- :meth:`Trigger.random_blend`: the blended injection of Chen et al. 2017 with a seeded uniform noise pattern.
- :class:`SIGTrigger` (Barni et al. 2019, clean-label sinusoidal signal) and :class:`WaNetTrigger`
  (Nguyen & Tran 2021, a smooth warp with its noise mode) are triggers of their own kind beside
  :class:`Trigger`; every trigger is a :class:`BackdoorTrigger` and serves :func:`poison`.
- :class:`AdaptiveBlendTrigger` (Qi et al. 2023, Adap-Blend): a blend pattern cut into cells, a random half
  of them on each poison and on as many cover samples under their true labels, the full pattern at test time.
- :func:`label_consistent_poison` (Turner et al. 2019): target-class samples are made hard by PGD on
  a proxy model before the trigger is stamped; labels kept.
- :class:`ARTPoison`: ART's ``PoisoningAttackBackdoor`` and ``PoisoningAttackCleanLabelBackdoor``
  (Turner et al. 2019, "Label-Consistent Backdoor Attacks": target-class samples are first pushed
  away from their class by PGD on a proxy model, then triggered) behind the same
  ``(X, y, poisoned_index)`` result.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .base import Attack, BinaryAsTwoLogits, check_batch
from .inputs import check_target_class
from .pgd import PGD
from .plumbing import frozen_in_eval, make_generator, seeded
from .validation import (check_choice, check_fraction, check_int, check_model, check_number, check_positive,
                         check_seed)

__all__ = ["BackdoorTrigger", "Trigger", "SIGTrigger", "WaNetTrigger", "AdaptiveBlendTrigger", "poison", "label_consistent_poison",
           "ARTPoison", "ART_POISON_NAMES", "check_rate", "check_target_class", "poison_count"]

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right", "all")
ART_POISON_NAMES = ("PoisoningAttackBackdoor", "PoisoningAttackCleanLabelBackdoor")


def check_rate(rate) -> float:
    """Return ``rate`` as a float after checking it is a number in the open interval (0, 1)."""
    return check_fraction(rate, "rate")


class BackdoorTrigger(Attack):
    """A backdoor trigger: ``apply(x)`` stamps every sample of a batch of ``input_shape`` samples (same
    dtype and device). It is an attack callable ``trigger(model, x, y)`` (model and labels unused), so
    it serves ``robust_infl.Robust(trigger)`` and :func:`attacks.evaluate` (``target_class=c``: the
    backdoor's attack success rate). ``noise_ratio`` > 0 (WaNet's noise mode, Adap-Blend's cover samples):
    :func:`poison` also gives ``noise_ratio`` times as many other samples the trigger's ``noise(x, generator)``
    under their true labels (:meth:`WaNetTrigger.noise`, :meth:`AdaptiveBlendTrigger.noise`). The poisons
    themselves get ``train_stamp(x, generator)``: ``apply(x)`` unless the attack trains on another stamp than it
    tests with (:class:`AdaptiveBlendTrigger`)."""

    noise_ratio = 0.0

    @property
    @abstractmethod
    def input_shape(self) -> tuple:
        """The shape of one sample the trigger stamps."""

    @abstractmethod
    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        """The stamped batch; ``x`` is a checked floating batch of ``input_shape`` samples."""

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The batch ``x`` (shape ``(n, *input_shape)``) with the trigger stamped on every sample."""
        return self._stamp(self._checked(x))

    def train_stamp(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The stamp :func:`poison` gives the poisons of the training set: :meth:`apply` (``generator``, a CPU
        generator, unused) unless a subclass trains on another stamp."""
        return self.apply(x)

    def _checked(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` after checking it is a floating batch of ``input_shape`` samples."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"x: must be a floating-point tensor, got {type(x).__name__}")
        if tuple(x.shape[1:]) != tuple(self.input_shape):
            raise ValueError(f"x: samples of shape {tuple(x.shape[1:])} do not match the trigger's "
                             f"{tuple(self.input_shape)}")
        return x

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.apply(x)


def _image_shape(input_shape, channels_first: bool = False) -> tuple:
    """``input_shape`` as a tuple of positive ints, checked to be an image shape ``(..., H, W)`` (``(C, H, W)``
    with ``channels_first``)."""
    shape = tuple(int(s) for s in input_shape)
    if channels_first and len(shape) != 3:
        raise ValueError(f"input_shape: must be an image shape (C, H, W), got {tuple(input_shape)}")
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"input_shape: must be an image shape (..., H, W), got {tuple(input_shape)}")
    return shape


class Trigger(BackdoorTrigger):
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
        """A ``size`` x ``size`` square of ``value`` in one ``corner`` of images of ``input_shape`` ``(..., H, W)``;
        ``corner="all"``: in each of the four corners (Turner et al. 2019's label-consistent trigger)."""
        shape = _image_shape(input_shape)
        check_int(size, "size", minimum=1, maximum=min(shape[-2:]))
        check_choice(corner, "corner", CORNERS)
        check_number(value, "value")
        height, width = shape[-2:]
        mask = torch.zeros(shape)
        for name in (CORNERS[:4] if corner == "all" else (corner,)):
            rows = slice(0, size) if name.startswith("top") else slice(height - size, height)
            cols = slice(0, size) if name.endswith("left") else slice(width - size, width)
            mask[..., rows, cols] = 1.0
        return cls(mask, torch.full(shape, float(value)))

    @classmethod
    def blend(cls, pattern: torch.Tensor, alpha: float) -> "Trigger":
        """Blend ``pattern`` over the whole input: ``x' = (1 - alpha) x + alpha pattern`` (Chen et al. 2017)."""
        check_fraction(alpha, "alpha", allow_one=True)
        if not isinstance(pattern, torch.Tensor):
            raise TypeError(f"pattern: must be a floating-point tensor, got {type(pattern).__name__}")
        return cls(torch.full(pattern.shape, float(alpha), dtype=pattern.dtype), pattern)

    @classmethod
    def random_blend(cls, input_shape: Sequence[int], alpha: float = 0.2, seed: int = 0) -> "Trigger":
        """Blended injection with a random pattern (Chen, Liu, Li, Lu & Song 2017, "Targeted Backdoor Attacks on
        Deep Learning Systems Using Data Poisoning", arXiv:1712.05526): a pattern of ``input_shape`` ``(..., H, W)``
        drawn uniformly in [0, 1) from ``seed``, blended over the whole image at ``alpha`` (the paper's 0.2, at
        training and at test time) by :meth:`Trigger.blend`."""
        return cls.blend(_random_pattern(input_shape, seed), alpha)

    @property
    def input_shape(self) -> tuple:
        """The mask's shape."""
        return tuple(self.mask.shape)

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.mask.to(device=x.device, dtype=x.dtype)
        return (1 - mask) * x + mask * self.pattern.to(device=x.device, dtype=x.dtype)

    def __repr__(self) -> str:
        return f"Trigger(mask of shape {tuple(self.mask.shape)}, {int((self.mask > 0).sum())} stamped values)"


class SIGTrigger(BackdoorTrigger):
    """SIG, the clean-label sinusoidal signal of Barni, Kallas & Tondi 2019, "A new Backdoor Attack in CNNs
    by Training Set Corruption without Label Poisoning" (ICIP): ``x' = clip(x + v, 0, 1)`` with
    ``v[..., i, j] = delta * sin(2 pi j frequency / m)`` along the ``m`` columns, the same on every row and
    channel. The paper poisons samples of the target class only, labels kept
    (``poison(..., clean_label=True)``), with ``delta = 20/255`` and ``frequency = 6`` at training, and
    tests with a stronger signal than it trains with: :meth:`train_stamp` (the poisons) adds the signal of
    amplitude ``delta``, :meth:`~BackdoorTrigger.apply` (test time) that of amplitude ``test_delta``.

    Arguments:
        input_shape: the shape of one image, ``(..., H, W)``.
        delta: the signal's amplitude at training, in (0, 1].
        frequency: the number of periods across the image's width, > 0.
        test_delta: the signal's amplitude at test time, in (0, 1] (default: ``delta``).
    """

    def __init__(self, input_shape: Sequence[int], delta: float = 20 / 255, frequency: float = 6, *,
                 test_delta: float = None):
        self._shape = _image_shape(input_shape)
        self.delta = check_number(delta, "delta", minimum=0, maximum=1, include_minimum=False)
        self.test_delta = self.delta if test_delta is None else check_number(
            test_delta, "test_delta", minimum=0, maximum=1, include_minimum=False)
        self.frequency = check_positive(frequency, "frequency")
        width = self._shape[-1]
        columns = torch.arange(width, dtype=torch.float64)
        self.wave = torch.sin(2 * math.pi * columns * self.frequency / width).expand(self._shape)

    @property
    def input_shape(self) -> tuple:
        """The image shape given."""
        return self._shape

    def _add(self, x: torch.Tensor, signal: torch.Tensor) -> torch.Tensor:
        return (x + signal.to(device=x.device, dtype=x.dtype)).clamp(0, 1)

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        return self._add(x, self.test_delta * self.wave)

    def train_stamp(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The poisons' stamp: the signal of amplitude ``delta`` (``generator`` unused)."""
        return self._add(self._checked(x), self.delta * self.wave)

    def __repr__(self) -> str:
        return (f"SIGTrigger({self._shape}, delta={self.delta:g}, test_delta={self.test_delta:g}, "
                f"frequency={self.frequency:g})")


class WaNetTrigger(BackdoorTrigger):
    """WaNet, the warping trigger of Nguyen & Tran 2021, "WaNet - Imperceptible Warping-based Backdoor
    Attack" (ICLR): a fixed smooth warping field resamples the image (``torch.nn.functional.grid_sample``,
    bilinear, ``align_corners=True``). As in the paper's code: a ``k`` x ``k`` grid of 2-D offsets drawn
    uniformly in [-1, 1] (seeded), divided by its mean absolute value, upsampled bicubically to H x W;
    ``field = clip(identity + s * offsets / H, -1, 1)`` in grid_sample's normalised coordinates. Noise mode:
    :func:`poison` also warps ``noise_ratio`` times as many other samples under their true labels, each by
    the field plus its own uniform noise in ``[-1/H, 1/H]`` (:meth:`noise`), so that the model learns the
    exact field, not any warp. The paper's defaults: ``k = 4``, ``s = 0.5``, ``noise_ratio = 2``.

    Arguments:
        input_shape: the shape of one image, ``(C, H, W)``.
        k: side of the random control grid, in ``[2, min(H, W)]``.
        s: warping strength, >= 0 (0: the identity).
        noise_ratio: noise-mode samples per poisoned sample, >= 0 (0: no noise mode).
        seed: seed of the control grid.
    """

    def __init__(self, input_shape: Sequence[int], k: int = 4, s: float = 0.5, noise_ratio: float = 2.0,
                 seed: int = 0):
        self._shape = _image_shape(input_shape, channels_first=True)
        height, width = self._shape[1:]
        self.k = check_int(k, "k", minimum=2, maximum=min(height, width))
        self.s = check_positive(s, "s", allow_zero=True)
        self.noise_ratio = check_positive(noise_ratio, "noise_ratio", allow_zero=True)
        self.seed = check_seed(seed)
        offsets = torch.rand(1, 2, self.k, self.k, generator=make_generator(self.seed), dtype=torch.float64) * 2 - 1
        offsets = offsets / offsets.abs().mean()
        offsets = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        rows, cols = torch.meshgrid(torch.linspace(-1, 1, height, dtype=torch.float64),
                                    torch.linspace(-1, 1, width, dtype=torch.float64), indexing="ij")
        identity = torch.stack((cols, rows), dim=-1)[None]
        self.field = (identity + self.s * offsets / height).clamp(-1, 1)

    @property
    def input_shape(self) -> tuple:
        """The image shape given."""
        return self._shape

    def _warp(self, x: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        field = field.to(device=x.device, dtype=x.dtype).expand(x.shape[0], -1, -1, -1)
        return F.grid_sample(x, field, mode="bilinear", padding_mode="zeros", align_corners=True).clamp(0, 1)

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        return self._warp(x, self.field)

    def noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The noise mode: each sample of ``x`` warped by the field plus its own uniform noise in
        ``[-1/H, 1/H]`` (drawn from ``generator``, a CPU generator), clipped to [-1, 1]."""
        x = self._checked(x)
        height = self._shape[1]
        jitter = torch.rand(x.shape[0], *self._shape[1:], 2, generator=generator, dtype=torch.float64) * 2 - 1
        return self._warp(x, (self.field + jitter / height).clamp(-1, 1))

    def __repr__(self) -> str:
        return f"WaNetTrigger({self._shape}, k={self.k}, s={self.s:g}, noise_ratio={self.noise_ratio:g}, seed={self.seed})"


def _random_pattern(input_shape: Sequence[int], seed: int) -> torch.Tensor:
    """A pattern of the image shape ``input_shape`` drawn uniformly in [0, 1) from ``seed`` (float32)."""
    return torch.rand(_image_shape(input_shape), generator=make_generator(check_seed(seed)))


class AdaptiveBlendTrigger(BackdoorTrigger):
    """Adap-Blend, the adaptive blended backdoor of Qi, Xie, Li, Wang & Mittal 2023, "Revisiting the Assumption
    of Latent Separability for Backdoor Defenses" (ICLR), built against defences that separate poisons from
    clean samples in the model's latent space. The blend ``pattern`` is cut into a ``g`` x ``g`` grid of
    ``pieces = g * g`` equal cells (cell ``c``: row block ``c // g``, column block ``c % g``). At training
    (:meth:`train_stamp`) each poison, relabelled to the target class, carries the pattern on its own random
    set of ``pieces - round(mask_rate * pieces)`` cells, ``x' = x + alpha * m * (pattern - x)``; and
    ``noise_ratio`` times as many other samples (the paper's "cover" or regularisation samples) carry a random
    set the same way under their TRUE labels (:meth:`noise`, through :func:`poison`'s noise mode), so that only
    the full pattern, used at test time (:meth:`~BackdoorTrigger.apply`: ``x + test_alpha * (pattern - x)``),
    activates the backdoor. The paper's code defaults (``poison_tool_box/adaptive_blend.py``): 16 pieces, mask rate 0.5,
    alpha 0.2 at training and test, as many cover samples as poisons. Its code draws the poisons from every
    class; :func:`poison` draws them from the other classes, as for BadNets.

    Arguments:
        pattern: the blend pattern, one image ``(..., H, W)`` with values in [0, 1]; ``g`` must divide H and W.
        alpha: blend weight of the training stamps, in (0, 1].
        pieces: the number of cells, a square ``g * g`` >= 4.
        mask_rate: share of the cells each training stamp leaves out, in [0, 1), leaving at least one.
        noise_ratio: cover samples per poison, >= 0.
        test_alpha: blend weight of the full pattern at test time (default: ``alpha``).
    """

    def __init__(self, pattern: torch.Tensor, alpha: float = 0.2, *, pieces: int = 16, mask_rate: float = 0.5,
                 noise_ratio: float = 1.0, test_alpha: float = None):
        if not isinstance(pattern, torch.Tensor) or not pattern.is_floating_point():
            raise TypeError(f"pattern: must be a floating-point tensor, got "
                            f"{pattern.dtype if isinstance(pattern, torch.Tensor) else type(pattern).__name__}")
        shape = _image_shape(pattern.shape)
        if not bool(torch.isfinite(pattern).all()) or float(pattern.min()) < 0 or float(pattern.max()) > 1:
            raise ValueError("pattern: values must be finite and lie in [0, 1]")
        self.alpha = check_fraction(alpha, "alpha", allow_one=True)
        self.test_alpha = self.alpha if test_alpha is None else check_fraction(test_alpha, "test_alpha", allow_one=True)
        self.pieces = check_int(pieces, "pieces", minimum=4)
        side = math.isqrt(self.pieces)
        if side * side != self.pieces or shape[-2] % side or shape[-1] % side:
            raise ValueError(f"pieces: must be a square g * g whose side g divides the image's height and width "
                             f"{shape[-2:]}, got {pieces}")
        self.mask_rate = check_fraction(mask_rate, "mask_rate", allow_zero=True)
        self.masked = round(self.mask_rate * self.pieces)
        if self.masked >= self.pieces:
            raise ValueError(f"mask_rate: {mask_rate:g} of {self.pieces} pieces leaves no cell of the pattern")
        self.noise_ratio = check_positive(noise_ratio, "noise_ratio", allow_zero=True)
        self.pattern = pattern.detach().clone()

    @classmethod
    def random(cls, input_shape: Sequence[int], seed: int = 0, **options) -> "AdaptiveBlendTrigger":
        """Adap-Blend with the pattern of :meth:`Trigger.random_blend` (uniform in [0, 1), drawn from ``seed``);
        ``options`` are those of the constructor."""
        return cls(_random_pattern(input_shape, seed), **options)

    @property
    def input_shape(self) -> tuple:
        """The pattern's shape."""
        return tuple(self.pattern.shape)

    def cell_masks(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` random cell masks of shape ``(n, H, W)`` (1: the pattern's cell is kept), each leaving out its
        own ``round(mask_rate * pieces)`` cells, drawn from ``generator`` (a CPU generator)."""
        side = math.isqrt(self.pieces)
        order = torch.rand(n, self.pieces, generator=generator).argsort(dim=1)
        kept = torch.ones(n, self.pieces)
        kept.scatter_(1, order[:, :self.masked], 0.0)
        height, width = self.input_shape[-2:]
        cells = kept.view(n, side, side)
        return cells.repeat_interleave(height // side, dim=1).repeat_interleave(width // side, dim=2)

    def _blend(self, x: torch.Tensor, weight) -> torch.Tensor:
        return x + weight * (self.pattern.to(device=x.device, dtype=x.dtype) - x)

    def _stamp(self, x: torch.Tensor) -> torch.Tensor:
        return self._blend(x, self.test_alpha)

    def train_stamp(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The poisons' stamp: each sample blended at ``alpha`` on its own random cells (:meth:`cell_masks`)."""
        x = self._checked(x)
        masks = self.cell_masks(x.shape[0], generator).to(device=x.device, dtype=x.dtype)
        masks = masks.view(x.shape[0], *([1] * (x.dim() - 3)), *masks.shape[1:])
        return self._blend(x, self.alpha * masks)

    def noise(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The cover samples' stamp, drawn as :meth:`train_stamp` (they keep their true labels)."""
        return self.train_stamp(x, generator)

    def __repr__(self) -> str:
        return (f"AdaptiveBlendTrigger({self.input_shape}, alpha={self.alpha:g}, test_alpha={self.test_alpha:g}, "
                f"pieces={self.pieces}, mask_rate={self.mask_rate:g}, noise_ratio={self.noise_ratio:g})")


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


def _check_trigger(trigger) -> None:
    if not isinstance(trigger, BackdoorTrigger):
        raise TypeError(f"trigger: must be an attacks.BackdoorTrigger (Trigger, SIGTrigger, WaNetTrigger, "
                        f"AdaptiveBlendTrigger), "
                        f"got {type(trigger).__name__}")


def _noise_mode(X_out: torch.Tensor, X: torch.Tensor, index: torch.Tensor, trigger: BackdoorTrigger, seed: int,
                rate: float) -> None:
    """WaNet's noise mode in place: ``round(noise_ratio * len(index))`` samples outside ``index``, drawn
    (seeded), get :meth:`WaNetTrigger.noise` and keep their labels."""
    count = round(trigger.noise_ratio * index.numel())
    if count == 0:
        return
    outside = torch.ones(X.shape[0], dtype=torch.bool)
    outside[index.cpu()] = False
    eligible = torch.nonzero(outside).flatten()
    if count > eligible.numel():
        raise ValueError(f"rate: {rate} with the trigger's noise_ratio {trigger.noise_ratio:g} asks for {count} "
                         f"noise-mode samples but only {eligible.numel()} samples are left")
    generator = make_generator(seed + 1)
    chosen = eligible[torch.randperm(eligible.numel(), generator=generator)[:count]].to(X.device)
    X_out[chosen] = trigger.noise(X[chosen], generator)


def poison(train, trigger: BackdoorTrigger, *, target_class: int, rate: float, seed: int, clean_label: bool = False):
    """Poison a share ``rate`` of ``train = (X, y)`` with ``trigger``; returns ``(X', y', poisoned_index)``.

    Dirty-label (BadNets, default): ``round(rate * n)`` samples drawn (seeded) from the classes other
    than ``target_class`` are stamped and relabelled ``target_class``. ``clean_label=True``: samples
    of ``target_class`` are stamped and keep their label (SIG's setting). A trigger with a noise mode
    (:class:`WaNetTrigger`, :class:`AdaptiveBlendTrigger`) also gives ``noise_ratio`` times as many other
    samples its ``noise`` stamp under their true labels; they are not in ``poisoned_index`` (they carry no
    backdoor). The poisons get the trigger's :meth:`~BackdoorTrigger.train_stamp` (its ``apply`` but for
    :class:`AdaptiveBlendTrigger`'s random cells). ``poisoned_index``
    is sorted; the inputs are not modified.
    """
    X, y = _train_tensors(train)
    _check_trigger(trigger)
    rate = check_rate(rate)
    target_class = check_target_class(target_class, int(y.max()) + 1)
    check_seed(seed)
    index = _candidates(y, target_class, rate, bool(clean_label), seed)
    X_out, y_out = X.clone(), y.clone()
    X_out[index] = trigger.train_stamp(X[index], make_generator(seed + 2))
    y_out[index] = target_class
    _noise_mode(X_out, X, index, trigger, seed, rate)
    return X_out, y_out, index


def label_consistent_poison(train, trigger: BackdoorTrigger, proxy: nn.Module, *, target_class: int, rate: float,
                            seed: int, eps: float = 0.3, steps: int = 20, norm: str = "linf"):
    """The label-consistent backdoor of Turner, Tsipras & Madry 2019, "Label-Consistent Backdoor Attacks"
    (arXiv:1912.02771); returns ``(X', y', poisoned_index)`` as :func:`poison` does.

    ``round(rate * n)`` samples of ``target_class``, drawn (seeded) as by ``poison(..., clean_label=True)``,
    are first made hard to classify by an untargeted :class:`~attacks.PGD` (``eps``, ``steps``, ``norm``,
    inputs kept in [0, 1]) on ``proxy``, a model trained on clean data (the paper uses an adversarially
    trained one: its perturbations change what the image shows, so the poisoned model has to lean on the
    trigger), then stamped with ``trigger`` (its :meth:`~BackdoorTrigger.train_stamp`); every label is kept.
    """
    X, y = _train_tensors(train)
    _check_trigger(trigger)
    check_model(proxy, "proxy", x=X[:1])
    rate = check_rate(rate)
    target_class = check_target_class(target_class, int(y.max()) + 1)
    check_seed(seed)
    attack = PGD(eps=eps, steps=steps, norm=norm, seed=seed)
    index = _candidates(y, target_class, rate, True, seed)
    X_out = X.clone()
    X_out[index] = trigger.train_stamp(attack(proxy, X[index], y[index]), make_generator(seed + 2))
    return X_out, y.clone(), index


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

    def poison(self, train, trigger: BackdoorTrigger, *, target_class: int, rate: float, seed: int,
               proxy: nn.Module = None):
        """Poison ``train`` as :func:`poison` does, through ART; ``proxy`` (a trained model) is needed
        by the clean-label attack."""
        from art.attacks.poisoning import PoisoningAttackBackdoor

        X, y = _train_tensors(train)
        _check_trigger(trigger)
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
