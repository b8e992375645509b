"""Ensembles of trained models: :class:`Ensemble`, scored by :func:`robust_infl.influence` as one model.

``influence(Ensemble([m1, m2, ...]), train, target, ...)`` averages a method's harm scores over models
trained independently (other seeds) and/or on random subsets of the training data (TRAK's recipe; see
``defenses.train_ensemble``, which trains them). Every member is one scoring problem built with the
run's options (same data, objective, loss, damping, seed, device); a ``Robust`` objective's attack runs
on each member at its own trained parameters and is held fixed there. The combination is the method's:

- ``"trak"``: TRAK's own ensemble (as ``TRAKer`` with one checkpoint per member, model ids ``0 .. M-1``):
  the members' scores averaged, times the members' out-to-loss weights averaged (see :mod:`robust_infl.methods.trak`).
- every other method: the mean of the members' scores, i.e. the mean of ``influence(member, ...)`` over
  the members, per-target matrices (``aggregate=False``) included.
- ``"tracin"`` scores the checkpoints of one model and is refused.

The cost is that of scoring each member once (plus, for the models, that of training them).
"""

from __future__ import annotations

from typing import Iterator, Sequence

from torch import nn

from attacks.plumbing import model_device
from attacks.validation import check_model

__all__ = ["Ensemble"]


def _layout(model: nn.Module) -> dict:
    """Name -> (kind, shape, dtype) of every parameter and buffer: what two members must share."""
    layout = {name: ("parameter", tuple(p.shape), p.dtype) for name, p in model.named_parameters()}
    layout.update({name: ("buffer", tuple(b.shape), b.dtype) for name, b in model.named_buffers()})
    return layout


def _difference(reference: dict, other: dict) -> str:
    """The first difference between two layouts, in words."""
    for name in sorted(set(reference) | set(other)):
        if name not in other:
            return f"it lacks {reference[name][0]} {name!r}"
        if name not in reference:
            return f"it has an extra {other[name][0]} {name!r}"
        if reference[name] != other[name]:
            kind, shape, dtype = other[name]
            _, ref_shape, ref_dtype = reference[name]
            return f"its {kind} {name!r} is {shape} {dtype}, against {ref_shape} {ref_dtype}"
    return ""


class Ensemble:
    """Trained models of one architecture, scored together by :func:`robust_infl.influence`.

    Args:
        models: a non-empty list or tuple of ``nn.Module`` of one class, with the same parameter and
            buffer names, shapes and dtypes (so the same output size), on one device; checked here
            (``TypeError`` / ``ValueError`` naming ``models``).

    The models are held, not copied; ``len``, iteration and indexing give them back.
    """

    def __init__(self, models: Sequence[nn.Module]):
        if isinstance(models, nn.Module) or not isinstance(models, (list, tuple)):
            raise TypeError(f"models: expected a list of trained nn.Module, got {type(models).__name__}")
        if not models:
            raise ValueError("models: must hold at least one model, got an empty list")
        for index, model in enumerate(models):
            check_model(model, f"models: model {index}")
        reference, device = _layout(models[0]), model_device(models[0])
        for index, model in enumerate(models[1:], start=1):
            if type(model) is not type(models[0]):
                raise ValueError(f"models: model {index} is a {type(model).__name__}, model 0 a "
                                 f"{type(models[0]).__name__}; an ensemble's models share one architecture")
            difference = _difference(reference, _layout(model))
            if difference:
                raise ValueError(f"models: model {index} does not have model 0's architecture: {difference}")
            if model_device(model) != device:
                raise ValueError(f"models: model {index} is on {model_device(model)}, model 0 on {device}; "
                                 f"move them to one device")
        self.models: tuple[nn.Module, ...] = tuple(models)

    def __len__(self) -> int:
        return len(self.models)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self.models)

    def __getitem__(self, index: int) -> nn.Module:
        return self.models[index]

    def __repr__(self) -> str:
        return f"Ensemble({len(self)} x {type(self.models[0]).__name__})"
