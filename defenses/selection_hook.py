"""A selection recipe's keep-mask or weights as a per-batch hook for your own training loop.

``hook = SelectionWeights(model, train, val, attack, recipe="influence", fraction=0.05)`` scores the
training samples once with the recipe's score (``influence``: harm on ``Robust(attack)`` over the
validation split; ``random``; ``loss``: the highest training loss) at the given trained model, and
turns the scores into ``hook.keep`` (prune: the keep-mask) and ``hook.weights`` (one per training
sample, mean 1; removal is weight 0). Inside the loop, ``hook(indices)`` returns the weights of the
batch's training indices; multiply the per-sample losses by them. The built-in recipes use the same
scores and selection (:func:`defenses.recipes.select_and_retrain`), so the loop gives the model the
pipeline would. Whether a selection pays off against adversarial training of equal cost is measured
in ``experiments/RESULTS.md`` (section ``defense_references``).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from attacks.inputs import as_data
from attacks.validation import check_choice

from .recipes import DefenceContext, influence_scores, random_scores, training_loss_scores
from .selection import REWEIGHT_SCHEMES, prune, reweight
from .trainers import check_weights

__all__ = ["SelectionWeights", "SELECTION_SCORES"]

SELECTION_SCORES = {"influence": influence_scores, "random": random_scores, "loss": training_loss_scores}
MODES = ("prune", "reweight")


class SelectionWeights:
    """Per-sample training weights of a selection recipe, for your own loop: ``weights = hook(indices)``.

    Args:
        model: the trained model the scores are taken at (not modified).
        train, val: ``(X, y[, s])``; the scores see the training and validation splits only.
        attack: ``attack(model, x, y) -> x_adv``, the threat model (used by ``influence``).
        recipe: ``"influence"``, ``"random"`` or ``"loss"``.
        fraction: the budget (share of training samples removed / down-weighted).
        mode: ``"prune"`` (weight 0 for the budget's most harmful) or ``"reweight"`` (``scheme``
            ``"smooth"`` with ``temperature``, or ``"hard"``; see :func:`defenses.reweight`).
        method, method_options: the influence method and its options.
        train_attack: for a PGD-AT loop, the attack of its training points (scores and losses are
            then taken there, as the pipeline does for adversarial trainers).
        seed: seed of the scoring.
    """

    def __init__(self, model: nn.Module, train, val, attack: Callable, *, recipe: str = "influence",
                 fraction: float = 0.05, mode: str = "prune", scheme: str = "smooth", temperature: float = 1.0,
                 method: str = "ip", method_options: Optional[dict] = None, train_attack: Optional[Callable] = None,
                 seed: int = 0, progress: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(attack):
            raise TypeError(f"attack: must be callable attack(model, x, y), got {type(attack).__name__}")
        check_choice(recipe, "recipe", tuple(SELECTION_SCORES))
        check_choice(mode, "mode", MODES)
        check_choice(scheme, "scheme", REWEIGHT_SCHEMES)
        train, val = as_data(train, "train"), as_data(val, "val")
        ctx = DefenceContext(model=model, train=train, val=val, trainer=None, attack=attack, seed=seed,
                             fraction=fraction, mode=mode, scheme=scheme, temperature=temperature, method=method,
                             method_options=dict(method_options or {}), train_attack=train_attack,
                             progress=progress)
        self.scores = SELECTION_SCORES[recipe](ctx).detach().cpu()
        if mode == "prune":
            self.keep: Optional[torch.Tensor] = prune(self.scores, fraction)
            raw = self.keep.to(torch.float32)
        else:
            self.keep = None
            raw = reweight(self.scores, scheme, fraction=fraction, temperature=temperature)
        self.weights = check_weights(raw, train[0].shape[0])  # mean 1, as the trainers normalise them

    def __call__(self, indices) -> torch.Tensor:
        """The weights of the training samples ``indices`` (a batch's indices into the training split, in
        ``[0, n)``; negative or larger indices raise ``ValueError``, non-integers ``TypeError``)."""
        index = torch.as_tensor(indices).cpu()
        if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
            raise TypeError(f"indices: must be integers, got {index.dtype}")
        n = self.weights.shape[0]
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError(f"indices: must be training-sample indices in [0, {n}), got values in "
                             f"[{int(index.min())}, {int(index.max())}]")
        return self.weights[index.long()]
