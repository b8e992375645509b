"""The options of one scoring run, as one validated value (the role of Kronfluence's ``ScoreArguments``).

:func:`robust_infl.influence` and :func:`robust_infl.distributed.sharded_influence` take the same
options, as ``options=ScoringOptions(...)`` or as keywords of the same names (:func:`scoring_options`
merges the two at the public boundary); the value is passed down unchanged to
:func:`robust_infl.preparation.prepared_problem` and held by the
:class:`~robust_infl.engine.ScoringProblem` the methods read.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from robust_infl.objectives import Attack, LossFn
from attacks.validation import check_bool, check_device, check_int, check_number, check_seed
from robust_infl.inputs import check_train_loss

__all__ = ["ScoringOptions", "scoring_options"]


@dataclass(frozen=True)
class ScoringOptions:
    """Options shared by every scoring entry point; each is checked at construction (errors name it).

    Attributes:
        loss_fn: per-sample loss ``loss_fn(outputs, targets) -> (n,)``; None: the default loss
            (cross-entropy, or BCE with logits for one output).
        damping: ``lambda >= 0`` added to the Hessian (Hessian methods).
        batch_size: training (and target) samples per batch (> 0).
        params: names of the scored parameters (kept as a tuple); None: every trainable one.
        seed: seeds every random choice (>= 0).
        train_loss: ``"clean"`` or ``"adversarial"`` (training losses at ``train_attack(model, x, y)``).
        train_attack: the training-point attack; given with, and only with, ``"adversarial"``.
        device: where to compute (a valid torch device); None: the model's device.
        progress: show tqdm progress bars.
        aggregate: ``True``: one harm score per training sample on the objective, shape
            ``(n_train,)``; ``False``: the ``(n_train, n_target)`` matrix of harms on each target
            sample's own loss (the methods of :func:`robust_infl.methods.per_target_methods`, e.g. ``"ip"``
            and ``"trak"``; objectives ``Utility`` / ``Robust``).
    """

    loss_fn: Optional[LossFn] = None
    damping: float = 0.0
    batch_size: int = 256
    params: Optional[Sequence[str]] = None
    seed: int = 0
    train_loss: str = "clean"
    train_attack: Optional[Attack] = None
    device: Optional[Union[str, torch.device]] = None
    progress: bool = True
    aggregate: bool = True

    def __post_init__(self):
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"loss_fn: must be callable loss_fn(outputs, targets), got {type(self.loss_fn).__name__}")
        object.__setattr__(self, "damping", check_number(self.damping, "damping", minimum=0))
        object.__setattr__(self, "batch_size", check_int(self.batch_size, "batch_size", minimum=1))
        object.__setattr__(self, "seed", check_seed(self.seed))
        check_train_loss(self.train_loss, self.train_attack)
        check_bool(self.progress, "progress")
        check_bool(self.aggregate, "aggregate")
        if self.device is not None:
            check_device(self.device)
        if self.params is not None:
            if isinstance(self.params, str) or not isinstance(self.params, (list, tuple)):
                raise TypeError(f"params: expected a list of parameter names, got {type(self.params).__name__}")
            object.__setattr__(self, "params", tuple(self.params))


def scoring_options(options: Optional[ScoringOptions], keywords: dict[str, Any]) -> tuple[ScoringOptions, dict]:
    """The :class:`ScoringOptions` of a call and its other keywords.

    ``options`` (None: the defaults) with every keyword that names one of its fields put in
    (a keyword wins over the same field of ``options``; all are checked again); the keywords left
    over are returned beside it. ``TypeError`` naming ``options`` when it is not a ScoringOptions.
    """
    if options is None:
        options = ScoringOptions()
    elif not isinstance(options, ScoringOptions):
        raise TypeError(f"options: expected a robust_infl.ScoringOptions, got {type(options).__name__}")
    fields = {f.name for f in dataclasses.fields(ScoringOptions)}
    given = {k: v for k, v in keywords.items() if k in fields}
    rest = {k: v for k, v in keywords.items() if k not in fields}
    return (dataclasses.replace(options, **given) if given else options), rest
