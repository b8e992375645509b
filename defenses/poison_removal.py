"""Backdoor poisons in a training set: find them (:func:`contrast_detection`), remove them and retrain
(:func:`remove_poisons`).

:func:`remove_poisons` is the recommended recipe for each defender threat model (numbers: the
``poisoning`` section of ``experiments/RESULTS.md``). Both detect with :func:`contrast_detection`, the
representation contrast of :mod:`defenses.poison_detection`, cut at the Otsu split within the target
class (at most the budget), and retrain from scratch on the kept samples:

- evidence known (``evidence = (X_triggered, y_true)``): the target class is the one the model
  assigns the evidence to, the evidence's features are the pull, and the evidence is added to the
  retraining set under its true labels (x20 for plain training, x5 for adversarial trainers);
- trigger unknown (``evidence=None``): the target class and the pull come from the samples whose
  nearest neighbours (in the same features) carry other labels.

:func:`defenses.run_poisoning` measures it against the poisoning baselines (:mod:`defenses.poison_recipes`).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from attacks.inputs import as_data
from attacks.validation import check_fraction, check_seed

from . import poison_detection as detect
from .backdoor_scan import ScanResult, check_trusted, scan_backdoor
from .data import take
from .selection import check_budget, most_harmful

__all__ = ["remove_poisons", "detect_and_retrain", "scan_and_retrain", "contrast_detection", "with_evidence",
           "evidence_repeats"]


def evidence_repeats(trainer) -> int:
    """How often the evidence is repeated in the retraining set: x20 for plain training, x5 for trainers
    with an inner maximisation (adversarial training fits the few evidence inputs more readily)."""
    return 5 if hasattr(trainer, "eps") else 20


def with_evidence(train: tuple, evidence: Optional[tuple], repeats: int) -> tuple:
    if evidence is None:
        return train
    X, y = train[:2]
    return torch.cat([X] + [evidence[0].to(X)] * repeats), torch.cat([y] + [evidence[1].to(y)] * repeats)


def _contrast_in_class(features: torch.Tensor, y: torch.Tensor, target: int, pull: torch.Tensor, k: int) -> tuple:
    """Contrast scores towards ``pull`` in class ``target``, flagged by the Otsu split (at most ``k``), then once
    more with the flagged samples, mostly poisons and a less noisy pull than a few inputs, as the pull."""
    in_class = y.cpu() == target
    scores = detect.contrast_scores(features, y, target, pull)
    flagged = detect.separated_top(scores, in_class, k)
    if flagged.any():
        scores = detect.contrast_scores(features, y, target, features[flagged])
        flagged = detect.separated_top(scores, in_class, k)
    return scores, flagged


def contrast_detection(model: nn.Module, train: tuple, evidence: Optional[tuple], budget: float,
                       candidates: int = 3) -> tuple:
    """The detector of :func:`remove_poisons`: ``(scores, flagged_mask, target_class)``.

    Evidence known: the target class is the one the model assigns the evidence to, and the evidence's
    features are the pull. Trigger unknown: the ``candidates`` classes most over-represented among the
    budget's samples with the largest k-NN label disagreement are tried, each with the more disagreeing
    half of its samples among those as the pull (pseudo-evidence), and the class whose in-class scores
    split most cleanly in two (:func:`~defenses.poison_detection.otsu_split`) is taken. Scores:
    :func:`~defenses.poison_detection.contrast_scores`; flags: their Otsu split within the target class,
    at most the budget, then once more with the flagged samples as the pull.
    """
    X, y = train[:2]
    k = check_budget(len(y), budget, "budget", "training samples", allow_none=False)
    features = detect.layer_features(model, X)
    if evidence is not None:
        target = detect.evidence_target_class(model, evidence)
        return (*_contrast_in_class(features, y, target, detect.layer_features(model, evidence[0]), k), target)
    disagreement = detect.label_disagreement_scores(features, y)
    top = most_harmful(disagreement, budget)
    best = None
    for target in detect.over_represented_classes(top, y)[:candidates].tolist():
        chosen = torch.nonzero(top & (y.cpu() == target)).flatten()
        if chosen.numel() == 0:
            continue
        ranked = chosen[torch.sort(-disagreement[chosen], stable=True).indices]
        scores, flagged = _contrast_in_class(features, y, target, features[ranked[:max(1, ranked.numel() // 2)]], k)
        separation = detect.otsu_split(scores[y.cpu() == target])[1]
        if best is None or separation > best[0]:
            best = (separation, scores, flagged, target)
    return best[1], best[2], best[3]


def remove_poisons(model: nn.Module, train, evidence, *, trainer, budget: float, seed: int = 0, trusted=None,
                   progress: bool = False):
    """Find backdoor poisons in ``train``, remove at most ``budget`` of it and retrain with ``trainer``.

    Args:
        model: the model trained on the (possibly poisoned) ``train``.
        train: ``(X, y)`` the model was trained on.
        evidence: ``(X_triggered, y_true)``, triggered inputs with their true labels (threat model
            "evidence known"), or None ("trigger unknown").
        trainer: has ``fit(model, data, *, seed)`` (e.g. :class:`defenses.ERM`, :class:`defenses.PGDAT`);
            the returned model is trained by it from scratch.
        budget: the largest share of ``train`` removed, in (0, 1) (about twice the poison rate).
        seed: seed of the retraining (and of the scan's models).
        trusted: ``(X, y)`` clean data the model was not trained on (e.g. the validation split); used when
            ``evidence`` is None: the trigger-unknown scan :func:`~defenses.backdoor_scan.scan_backdoor`
            decides whether there is a backdoor at all. Without it (and without evidence) the older
            objective-free detector runs, which always removes samples.
        progress: show the scan's progress bar.

    Returns:
        ``(retrained_model, removed_index)``: the model retrained from scratch on the kept samples
        (plus the evidence under its true labels, repeated x20 for plain training and x5 for
        adversarial trainers, when given) and the sorted indices of the removed training samples.
        Detection: :func:`~defenses.poison_removal.contrast_detection`, or with ``trusted`` and no evidence
        :func:`~defenses.backdoor_scan.scan_backdoor`: when its verdict is "nothing found", nothing is
        removed and ``model`` itself is returned unchanged (not retrained).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: must be a torch.nn.Module, got {type(model).__name__}")
    X, y = as_data(train, "train")[:2]
    budget = check_fraction(budget, "budget")
    check_budget(len(y), budget, "budget", "training samples", allow_none=False)
    check_seed(seed)
    if not callable(getattr(trainer, "fit", None)):
        raise TypeError(f"trainer: must have a fit() method, got {type(trainer).__name__}")
    if evidence is not None:
        evidence = detect.check_evidence(evidence, tuple(X.shape[1:]), int(y.max()) + 1)
    elif trusted is not None:
        trusted = check_trusted(trusted, X, y)
        retrained, removed, _ = scan_and_retrain(model, (X, y), trusted, trainer, budget, seed, progress=progress)
        return retrained, torch.nonzero(removed).flatten()
    retrained, removed, _ = detect_and_retrain(model, (X, y), evidence, trainer, budget, seed)
    return retrained, torch.nonzero(removed).flatten()


def detect_and_retrain(model: nn.Module, train: tuple, evidence: Optional[tuple], trainer, budget: float,
                       seed: int) -> tuple:
    """The work of :func:`remove_poisons` on checked inputs, its detector run once:
    ``(retrained_model, removed_mask, scores)``."""
    trainer = trainer.with_retrain("scratch") if callable(getattr(trainer, "with_retrain", None)) else trainer
    scores, removed, _ = contrast_detection(model, train, evidence, budget)
    kept = with_evidence(take(train, ~removed), evidence, evidence_repeats(trainer))
    return trainer.fit(model, kept, seed=seed), removed, scores


def scan_and_retrain(model: nn.Module, train: tuple, trusted: tuple, trainer, budget: float, seed: int, *,
                     progress: bool = False, scan: Optional[ScanResult] = None) -> tuple:
    """The trigger-unknown work of :func:`remove_poisons` on checked inputs: ``(model, removed_mask, scan)``, the
    model retrained from scratch without the flagged samples when the scan (``scan``, or run now) found a
    backdoor, else ``model`` itself and an empty mask."""
    if scan is None:
        scan = scan_backdoor(model, train, trusted, budget=budget, trainer=trainer, seed=seed, progress=progress)
    removed = torch.zeros(len(train[1]), dtype=torch.bool)
    if not scan.found:
        return model, removed, scan
    removed[scan.flagged] = True
    trainer = trainer.with_retrain("scratch") if callable(getattr(trainer, "with_retrain", None)) else trainer
    return trainer.fit(model, take(train, ~removed), seed=seed), removed, scan
