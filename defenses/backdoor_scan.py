"""Scan a training set for a backdoor without knowing the trigger: :func:`scan_backdoor`, with a verdict.

The scan needs a small trusted clean set (e.g. the validation split) and trains two models of the scanned
model's architecture, re-initialised, with plain training:

- the *trusted* model, on the trusted set alone (``trusted_epochs``, default :data:`TRUSTED_EPOCHS`): it has
  never seen the trigger, so a dirty-label poison (an image of class a labelled t) has a high loss under it;
- the *early* model, a few epochs on the (possibly poisoned) training set (``early_epochs``, default
  :data:`EARLY_EPOCHS`): a trigger is learnt before the rare hard samples are, so the poisons' loss is
  already low.

A sample's suspicion score is ``loss_trusted(x_i, y_i) - loss_early(x_i, y_i)`` (in nats): a dirty-label
poison is a clear image of another class, which the trusted model assigns confidently to that class, while the
early model, trained on it, already gives its label weight. Natural hard samples score high too, but
spread over the classes; poisons pile up in the target class. Two counts per class measure that pile-up, each
as its excess over the rate of the other classes (:func:`class_excess`):

- the tail (:func:`tail_excess`): the samples scoring above :data:`SCORE_TAIL` nats;
- the k-NN candidates (:func:`knn_candidates`): the samples scoring above :data:`KNN_SCORE` nats whose nearest
  neighbours under the trusted model carry another label in at least a share :data:`KNN_DISAGREEMENT` (a poison
  looks like its source class to a model that never saw the trigger). This count finds poisons whose trigger
  the early model has only half learnt (Adap-Blend's partial triggers at 1%), too few of them in the tail.

The statistic ``excess`` is per class the larger of the two; the class where it is largest is its suspected
target. Its flagged samples are those of that class scoring above :data:`FLAG_SCORE` nats, at most the budget,
most suspicious first (the flag cut decides what is removed once a backdoor is found, not the verdict; at half a
nat rather than the first 2, it finds the poisons of Fashion-MNIST whose source classes resemble the target, at a
small loss of precision).

A clean-label poison (SIG's signal added to images of the target class, under their own label) has a low loss
under both models and looks like its class to the trusted model: neither count sees it. It shifts the
distribution of its class, though, away from the trusted set's, which holds no trigger. The second statistic,
``shift`` (:func:`shift_scores`, :func:`class_shift`), measures that per class: the samples of each class and the
trusted samples of the same class are split in :data:`SHIFT_FOLDS` folds; the direction from the trusted
samples' mean to the training samples' mean in the trusted model's features (standardised), taken on the other
folds, scores each held-out sample; the class's statistic is the Mann-Whitney z-score of its training samples'
scores against its trusted samples', per fold, summed over folds over the square root of their count. Where the
trusted set is drawn like the training data, the held-out scores of the two are exchangeable and the statistic
is about standard normal, whatever the features; a triggered share of the class moves it up (SIG at 9.5%: about
10). Its largest possible value, when every training sample outscores every trusted one, is about
``sqrt(3 m)`` for ``m`` trusted samples of the class (about 11.4 at 50, 6.6 at 20 with 60 training samples): with
fewer than about 15 trusted samples per class it cannot pass the default threshold. Its flagged samples are those
of its class whose conformal p-value against the same fold's trusted scores is at most :data:`SHIFT_FLAG_P`, most
suspicious first.

A third statistic, ``mislabel``, counts per class (:func:`class_excess`) the samples that look mislabelled to the
trusted model alone (:func:`knn_candidates` of the trusted loss: above :data:`MISLABEL_LOSS` nats, the 20 nearest
neighbours carrying another label in at least :data:`KNN_DISAGREEMENT`), whatever the early model made of them. It
finds dirty-label poisons whose trigger the early model has not learnt at all (Adap-Blend at 1%, where the
regularisation samples slow the trigger's learning: then the loss gap is small and neither count of ``excess``
passes its threshold). Its clean-data spread is narrower than the tail count's, hence its own, lower threshold
:data:`MISLABEL_THRESHOLD`. Where it decides, the flagged samples are those of its class scoring above
:data:`FLAG_SCORE` nats of loss gap, as for ``excess``.

A backdoor is found when ``excess`` exceeds :data:`VERDICT_THRESHOLD`, ``shift`` exceeds :data:`SHIFT_THRESHOLD`
or ``mislabel`` exceeds :data:`MISLABEL_THRESHOLD`, each calibrated on clean data
(``experiments/scan_calibration.py``; section ``scan_calibration`` of ``experiments/RESULTS.md``, where the
statistic's distribution on clean and poisoned seeds is listed, on the seeds the defaults were chosen on and on
fresh seeds checked afterwards); otherwise nothing is flagged. The verdict names the statistic that decided it:
the first of ``excess``, ``shift`` and ``mislabel`` above its threshold, else (nothing found) the one closest
to its threshold (the largest value over threshold); its class is the suspected target and its flagged samples
are removed. The defaults (trusted
epochs, early epochs, tail, k-NN cuts, thresholds, folds) were calibrated together, for MNIST and Fashion-MNIST
with a small CNN: change one and recalibrate. The shift statistic assumes that the trusted set is drawn like the
training data: a trusted set from another source shifts every class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from attacks.inputs import as_data
from attacks.validation import (check_bool, check_fraction, check_int, check_model, check_number, check_positive,
                                check_seed)

from . import poison_detection as detect
from .selection import budget_size, check_budget
from .timing import timed
from .trainers import ERM

__all__ = ["ScanResult", "ScanScores", "scan_backdoor", "scan_scores", "class_statistics", "tail_excess",
           "class_excess", "gap_flags", "knn_candidates", "shift_scores", "class_shift", "shift_flags", "check_trusted",
           "VERDICT_STATISTIC", "VERDICT_THRESHOLD", "SHIFT_STATISTIC", "SHIFT_THRESHOLD", "SHIFT_FOLDS",
           "SHIFT_FLAG_P", "MISLABEL_STATISTIC", "MISLABEL_THRESHOLD", "MISLABEL_LOSS", "DEFAULT_SCAN_BUDGET",
           "TRUSTED_EPOCHS", "EARLY_EPOCHS", "SCORE_TAIL", "FLAG_SCORE", "KNN_SCORE", "KNN_DISAGREEMENT"]

DEFAULT_SCAN_BUDGET = 0.1
TRUSTED_EPOCHS = 10
EARLY_EPOCHS = 2
SCORE_TAIL = 5.0
FLAG_SCORE = 0.5
KNN_SCORE = 3.0
KNN_DISAGREEMENT = 0.95
VERDICT_STATISTIC = "excess"
VERDICT_THRESHOLD = 10.0
SHIFT_STATISTIC = "shift"
SHIFT_THRESHOLD = 6.0
SHIFT_FOLDS = 2
SHIFT_FLAG_P = 0.1
MISLABEL_STATISTIC = "mislabel"
MISLABEL_LOSS = 5.0
MISLABEL_THRESHOLD = 7.0


@dataclass(frozen=True)
class ScanResult:
    """What :func:`scan_backdoor` found.

    Attributes:
        found: the verdict: a backdoor was found (``value > threshold``).
        statistic: the name of the statistic that decided the verdict (``excess``, ``shift`` or ``mislabel``; see
            the module).
        value: its value on the scanned data.
        threshold: its threshold, calibrated on clean data.
        target_class: the suspected target class (reported even when nothing is found).
        flagged: int64 indices into the training set, most suspicious first; empty when nothing is found.
        scores: the suspicion score of every training sample under the deciding statistic (higher = more
            suspicious), float64: ``loss_gap`` for ``excess`` and ``mislabel``, ``shift_scores`` for ``shift``.
        budget: the largest share of the training set that may be flagged.
        timing: wall seconds of the scan (``scan_s``) and its parts (``trusted_model_s``, ``early_model_s``,
            ``scoring_s``); ``training_s``, one training run of the scanned model (given as
            ``training_seconds``, else estimated as the early model's time per epoch times the epochs of a
            plain ``trainer``, else None), and ``vs_training``, the scan's time over it (None when unknown).
        statistics: every statistic the scan computed (the verdict's among them).
        candidates: the samples the scan flags when it finds a backdoor, whatever its verdict (``flagged`` when
            found), most suspicious first.
        loss_gap: every sample's ``loss_trusted - loss_early`` (nats), the score of ``excess``.
        shift_scores: every sample's held-out shift score (:func:`shift_scores`), the score of ``shift``.
    """

    found: bool
    statistic: str
    value: float
    threshold: float
    target_class: Optional[int]
    flagged: torch.Tensor
    scores: torch.Tensor
    budget: float
    timing: dict
    statistics: dict = field(default_factory=dict)
    candidates: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    loss_gap: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    shift_scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))

    def as_dict(self) -> dict:
        """The result as plain JSON-ready values (lists, floats)."""
        return {"found": bool(self.found), "statistic": self.statistic, "value": float(self.value),
                "threshold": float(self.threshold), "target_class": self.target_class,
                "flagged": [int(i) for i in self.flagged.tolist()], "scores": [float(s) for s in self.scores.tolist()],
                "budget": float(self.budget), "timing": {k: (None if v is None else float(v))
                                                         for k, v in self.timing.items()},
                "statistics": {k: float(v) for k, v in self.statistics.items()}}


def _scan_trainer(trainer, epochs: int) -> ERM:
    """Plain training with ``trainer``'s learning rate, batch size and optimizer (defaults without one)."""
    options = {name: getattr(trainer, name) for name in ("lr", "batch_size", "optimizer", "weight_decay")
               if trainer is not None and hasattr(trainer, name)}
    return ERM(epochs=epochs, retrain="scratch", progress=False, **options)


@dataclass(frozen=True)
class ScanScores:
    """The per-sample scores of one scan (:func:`scan_scores`).

    Attributes:
        loss_gap: ``loss_trusted - loss_early`` of every training sample (nats), float64.
        knn: the :func:`knn_candidates` mask among them.
        mislabel: the mask of the samples that look mislabelled to the trusted model (:func:`knn_candidates` of its
            loss, above :data:`MISLABEL_LOSS` nats).
        shift: the held-out shift score of every training sample (:func:`shift_scores`), float64.
        shift_z: the per-class shift statistic (:func:`class_shift`).
        shift_p: every training sample's conformal p-value against its class's trusted shift scores.
        seconds: wall and CPU seconds of training the trusted model, the early model, and scoring.
    """

    loss_gap: torch.Tensor
    knn: torch.Tensor
    mislabel: torch.Tensor
    shift: torch.Tensor
    shift_z: torch.Tensor
    shift_p: torch.Tensor
    seconds: dict


def scan_scores(model: nn.Module, train: tuple, trusted: tuple, *, trainer=None, trusted_epochs: int = TRUSTED_EPOCHS,
                early_epochs: int = EARLY_EPOCHS, seed: int = 0, progress: bool = False) -> ScanScores:
    """The per-sample scores of :func:`scan_backdoor` on checked inputs (:class:`ScanScores`): the loss gap, the
    :func:`knn_candidates` among them (under the trusted model), the samples that look mislabelled to it, the
    shift scores, statistic and p-values (the trusted model's features), and the seconds of training the trusted
    model, the early model and scoring (the k-NN search and the shift included)."""
    seconds = {}
    with tqdm(total=3, desc="scan", disable=None if progress else True, leave=False) as bar:
        bar.set_postfix_str("trusted model")
        trusted_model, seconds["trusted"] = timed(_scan_trainer(trainer, trusted_epochs).fit, model, trusted,
                                                  seed=seed)
        bar.update()
        bar.set_postfix_str("early model")
        early, seconds["early"] = timed(_scan_trainer(trainer, early_epochs).fit, model, train, seed=seed)
        bar.update()
        bar.set_postfix_str("scores")
        parts, seconds["scoring"] = timed(_score_parts, trusted_model, early, train, trusted, seed)
        bar.update()
    return ScanScores(*parts, seconds=seconds)


def _for_inference(model: nn.Module, X: torch.Tensor) -> nn.Module:
    """One of the scan's own models, for its forward passes: where the inputs are image batches (4-D), its 4-D
    weights in channels-last memory format (the same function; a SmallCNN's forward pass over MNIST about 3x
    faster on one CPU thread, outputs equal up to float rounding, about 1e-6)."""
    return model.to(memory_format=torch.channels_last) if X.dim() == 4 else model


def _score_parts(trusted_model: nn.Module, early: nn.Module, train: tuple, trusted: tuple, seed: int) -> tuple:
    trusted_model, early = _for_inference(trusted_model, train[0]), _for_inference(early, train[0])
    trusted_losses, features = detect.losses_and_features(trusted_model, train)
    gap = trusted_losses - detect.training_losses(early, train)
    trusted_features = detect.layer_features(trusted_model, trusted[0], batch_size=128)
    shift, trusted_shift, fold, trusted_fold = shift_scores(features, train[1], trusted_features, trusted[1], seed=seed)
    z, p = class_shift(shift, trusted_shift, train[1], trusted[1], fold, trusted_fold)
    knn_rows, mislabel_rows = gap > KNN_SCORE, trusted_losses > MISLABEL_LOSS
    disagreeing = _disagreeing(features, train[1], knn_rows | mislabel_rows)  # one k-NN search for both counts
    return gap, knn_rows & disagreeing, mislabel_rows & disagreeing, shift, z, p


def _folds(y: torch.Tensor, folds: int, generator: torch.Generator) -> torch.Tensor:
    """A seeded fold (0..folds-1) per sample, balanced within each label of ``y``."""
    order = torch.randperm(len(y), generator=generator)
    order = order[torch.sort(y[order], stable=True).indices]  # by label, random within each label
    starts = torch.searchsorted(y[order], y[order], right=False)
    fold = torch.empty(len(y), dtype=torch.long)
    fold[order] = (torch.arange(len(y)) - starts) % folds
    return fold


def shift_scores(features: torch.Tensor, y: torch.Tensor, trusted_features: torch.Tensor, yt: torch.Tensor, *,
                 folds: int = SHIFT_FOLDS, seed: int = 0) -> tuple:
    """``(scores, trusted_scores, fold, trusted_fold)``: cross-fitted mean-difference scores of the training
    samples (``features``, labels ``y``) and the trusted ones (``trusted_features``, ``yt``). Features are
    standardised over both sets; the samples of each class are split in ``folds`` seeded folds (balanced per
    class, training and trusted apart); a sample of class ``c`` in fold ``k`` scores its inner product with
    the mean of the training samples of class ``c`` outside fold ``k`` minus the mean of the trusted ones there
    (higher: more like the training set's share that the trusted set lacks). A class or fold without samples
    on either side leaves its samples at 0."""
    X, Xt = features.double().cpu(), trusted_features.double().cpu()
    y, yt = y.long().cpu(), yt.long().cpu()
    both = torch.cat([X, Xt])
    mean, std = both.mean(0), both.std(0).clamp_min(1e-12)
    generator = torch.Generator().manual_seed(seed)
    fold, trusted_fold = _folds(y, folds, generator), _folds(yt, folds, generator)
    groups = (int(max(y.max(), yt.max())) + 1) * folds
    means = []  # per (class, fold): the mean of the standardised samples of that class outside the fold
    for data, group in ((X, y * folds + fold), (Xt, yt * folds + trusted_fold)):
        sums = torch.zeros(groups, X.shape[1], dtype=X.dtype).index_add_(0, group, data).view(-1, folds, X.shape[1])
        counts = torch.bincount(group, minlength=groups).double().view(-1, folds, 1)
        outside_sums = (sums.sum(1, keepdim=True) - sums).view(groups, -1)
        outside = (counts.sum(1, keepdim=True) - counts).view(groups, 1)
        means.append(((outside_sums / outside.clamp_min(1) - mean) / std, outside > 0))
    (train_mean, n), (trusted_mean, m) = means
    direction = torch.where(n & m, train_mean - trusted_mean, torch.zeros_like(train_mean))
    weights = direction / std  # (x - mean) / std . d = x . (d / std) - mean . (d / std)
    offsets = weights @ mean
    scores = (X @ weights.T).gather(1, (y * folds + fold)[:, None]).squeeze(1) - offsets[y * folds + fold]
    trusted_group = yt * folds + trusted_fold
    trusted_scores = (Xt @ weights.T).gather(1, trusted_group[:, None]).squeeze(1) - offsets[trusted_group]
    return scores, trusted_scores, fold, trusted_fold


def class_shift(scores: torch.Tensor, trusted_scores: torch.Tensor, y: torch.Tensor, yt: torch.Tensor,
                fold: torch.Tensor, trusted_fold: torch.Tensor) -> tuple:
    """``(z, p)`` of held-out :func:`shift_scores`: per class, the Mann-Whitney z-score of its training samples'
    scores against its trusted samples' in each fold (ties counted half), summed over the folds holding both
    over the square root of their count (0 where none does); per training sample, its conformal p-value
    ``(1 + #trusted of its class and fold scoring at least as high) / (1 + #trusted of its class and fold)``
    (1 where that fold holds no trusted sample)."""
    y, yt = y.long().cpu(), yt.long().cpu()
    classes = int(max(y.max(), yt.max())) + 1
    folds = int(max(fold.max(), trusted_fold.max())) + 1
    z, p = torch.zeros(classes, dtype=torch.float64), torch.ones(len(y), dtype=torch.float64)
    for c in range(classes):
        parts = []
        for k in range(folds):
            rows = torch.nonzero((y == c) & (fold == k)).flatten()
            reference = torch.sort(trusted_scores[(yt == c) & (trusted_fold == k)].double()).values
            n, m = rows.numel(), reference.numel()
            if n == 0 or m == 0:
                continue
            values = scores[rows].double()
            below = torch.searchsorted(reference, values, right=False).double()
            at_most = torch.searchsorted(reference, values, right=True).double()
            p[rows] = (1 + m - below) / (1 + m)
            u = float((below + at_most).sum()) / 2
            parts.append((u / (n * m) - 0.5) / math.sqrt((n + m + 1) / (12 * n * m)))
        if parts:
            z[c] = sum(parts) / math.sqrt(len(parts))
    return z, p


def shift_flags(scores: torch.Tensor, p: torch.Tensor, y: torch.Tensor, target: int, k: int,
                flag_p: float = SHIFT_FLAG_P) -> torch.Tensor:
    """The samples of class ``target`` whose shift p-value is at most ``flag_p``, highest shift score first, at
    most ``k``."""
    rows = torch.nonzero((y == target) & (p <= flag_p)).flatten()
    return rows[torch.sort(-scores[rows], stable=True).indices][:k]


def knn_candidates(scores: torch.Tensor, features: torch.Tensor, y: torch.Tensor, *, score: float = KNN_SCORE,
                   disagreement: float = KNN_DISAGREEMENT) -> torch.Tensor:
    """Boolean mask of the samples scoring above ``score`` whose 20 nearest neighbours in ``features`` (the
    trusted model's, :func:`~defenses.poison_detection.label_disagreement_scores`) carry another label in at
    least a share ``disagreement``: a dirty-label poison looks like its source class to a model that never saw
    the trigger, even where the early model has not fitted it well enough for the tail."""
    return _disagreeing(features, y, scores > score, disagreement)


def _disagreeing(features: torch.Tensor, y: torch.Tensor, candidates: torch.Tensor,
                 disagreement: float = KNN_DISAGREEMENT) -> torch.Tensor:
    """The mask of the ``candidates`` (a boolean mask) whose 20 nearest neighbours in ``features`` carry another
    label in at least a share ``disagreement``; the k-NN search runs for the candidates alone."""
    mask = torch.zeros(len(y), dtype=torch.bool)
    rows = torch.nonzero(candidates).flatten()
    if rows.numel():
        mask[rows] = detect.label_disagreement_scores(features, y, rows=rows) >= disagreement
    return mask


def _top_class(per_class: torch.Tensor) -> int:
    """The class where a per-class statistic is largest (the smallest such class on ties)."""
    return int(torch.sort(-per_class, stable=True).indices[0])


def class_excess(flags: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per class ``c``: ``(n_c - m_c) / sqrt(m_c + 1)``, where ``n_c`` counts the ``flags`` (a boolean mask) among
    the samples labelled ``c`` and ``m_c`` is the count expected at the rate of all other classes (a
    Poisson-style excess)."""
    classes = int(y.max()) + 1
    n = torch.bincount(y, weights=flags.double(), minlength=classes)
    size = torch.bincount(y, minlength=classes).double()
    rest = (size.sum() - size).clamp_min(1)
    expected = size * (n.sum() - n) / rest
    return (n - expected) / (expected + 1).sqrt()


def tail_excess(scores: torch.Tensor, y: torch.Tensor, tail: float = SCORE_TAIL) -> torch.Tensor:
    """Per class: the :func:`class_excess` of the samples whose score exceeds ``tail``."""
    return class_excess(scores > tail, y)


def gap_flags(scores: torch.Tensor, y: torch.Tensor, target: int, k: int,
              flag_score: float = FLAG_SCORE) -> torch.Tensor:
    """The samples of class ``target`` scoring above ``flag_score``, highest score first, at most ``k``."""
    in_class = torch.nonzero(y == target).flatten()
    order = in_class[torch.sort(-scores[in_class], stable=True).indices]
    return order[:min(int((scores[order] > flag_score).sum()), k)]


def class_statistics(scores: torch.Tensor, y: torch.Tensor, k: int, tail: float = SCORE_TAIL,
                     flag_score: float = FLAG_SCORE, knn: Optional[torch.Tensor] = None) -> tuple:
    """``(target_class, flagged, statistics)`` of per-sample ``scores`` with labels ``y`` (and ``knn``, the
    :func:`knn_candidates` mask, when given): the suspected target is the class with the largest excess, per
    class the larger of its :func:`tail_excess` and the :func:`class_excess` of ``knn``; flagged are its samples
    scoring above ``flag_score`` (at most ``k``, most suspicious first). Statistics: ``excess`` (the verdict's:
    that class's excess), ``tail_excess`` and ``knn_excess`` (each one's largest value over the classes; no
    ``knn_excess`` without ``knn``), ``tail_count`` (the class's samples scoring above ``tail``),
    ``over_representation`` (its share among the ``k`` highest scores over its share of all samples) and
    ``otsu_separation`` (the between-group share of the variance of its scores,
    :func:`~defenses.poison_detection.otsu_split`)."""
    tails = tail_excess(scores, y, tail)
    excess = tails if knn is None else torch.maximum(tails, class_excess(knn, y))
    target = _top_class(excess)
    top = torch.zeros(len(y), dtype=torch.bool)
    top[torch.sort(-scores, stable=True).indices[:k]] = True
    in_class = torch.nonzero(y == target).flatten()
    share_top = float((top & (y == target)).sum()) / max(1, int(top.sum()))
    _, separation = detect.otsu_split(scores[in_class])
    flagged = gap_flags(scores, y, target, k, flag_score)
    statistics = {"excess": float(excess[target]), "tail_excess": float(tails.max())}
    if knn is not None:
        statistics["knn_excess"] = float(class_excess(knn, y).max())
    statistics.update(tail_count=float((scores[in_class] > tail).sum()),
                      over_representation=share_top / (in_class.numel() / len(y)),
                      otsu_separation=float(separation))
    return target, flagged, statistics


def _check_pair(data, name: str) -> tuple:
    X, y = as_data(data, name)[:2]
    if len(y) < 2:
        raise ValueError(f"{name}: must hold at least 2 samples, got {len(y)}")
    return X, y.long().cpu()


def check_trusted(trusted, X: torch.Tensor, y: torch.Tensor) -> tuple:
    """``trusted`` as ``(X, y)`` after checking it against the training inputs ``X`` and labels ``y``: at least
    two samples of the same shape, labels within the training labels' range (``ValueError`` naming ``trusted``)."""
    Xt, yt = _check_pair(trusted, "trusted")
    if tuple(Xt.shape[1:]) != tuple(X.shape[1:]):
        raise ValueError(f"trusted: samples must have the training samples' shape {tuple(X.shape[1:])}, "
                         f"got {tuple(Xt.shape[1:])}")
    if int(yt.min()) < 0 or int(yt.max()) > int(y.max()):
        raise ValueError(f"trusted: labels must lie in the training labels' range [0, {int(y.max())}], "
                         f"got [{int(yt.min())}, {int(yt.max())}]")
    return Xt, yt


def scan_backdoor(model: nn.Module, train, trusted, *, budget: float = DEFAULT_SCAN_BUDGET, trainer=None,
                  seed: int = 0, progress: bool = False, trusted_epochs: int = TRUSTED_EPOCHS,
                  early_epochs: int = EARLY_EPOCHS, training_seconds: Optional[float] = None,
                  threshold: Optional[float] = None, tail: float = SCORE_TAIL,
                  flag_score: float = FLAG_SCORE, shift: bool = True,
                  shift_threshold: Optional[float] = None, mislabel: bool = True,
                  mislabel_threshold: Optional[float] = None) -> ScanResult:
    """Scan ``train`` for a backdoor, trigger unknown, with the help of the clean ``trusted`` set.

    Args:
        model: the model trained on ``train``; only its architecture is used (re-initialised for the scan's
            own two models, which are trained with plain training).
        train: ``(X, y)``, the possibly poisoned training set.
        trusted: ``(X, y)``, clean data the model was not trained on (e.g. the validation split), samples of
            the same shape and classes.
        budget: the largest share of ``train`` that may be flagged, in (0, 1).
        trainer: the trainer ``model`` was trained with (optional): the scan's models use its learning rate,
            batch size and optimizer, and the cost ratio its epochs when it is plain training.
        seed: seed of the scan's two models (initialisation and data order).
        progress: show a progress bar.
        trusted_epochs: epochs of the trusted model.
        early_epochs: epochs of the early model.
        training_seconds: wall seconds one training run of ``model`` took, to report the scan's cost over it.
        threshold: the verdict's threshold (default :data:`~defenses.backdoor_scan.VERDICT_THRESHOLD`,
            calibrated on clean data).
        tail: the score (nats) above which a sample counts towards the verdict statistic (default
            :data:`~defenses.backdoor_scan.SCORE_TAIL`); the default threshold is calibrated for the default
            tail and epochs, on MNIST and Fashion-MNIST with a small CNN: recalibrate them on clean data of
            your own elsewhere.
        flag_score: the score (nats) above which a sample of the suspected class is flagged when a backdoor is
            found (default :data:`~defenses.backdoor_scan.FLAG_SCORE`); it does not change the verdict.
        shift: whether the ``shift`` statistic takes part in the verdict (False: the others alone, as before
            clean-label poisons were covered; the shift scores are computed either way).
        shift_threshold: the threshold of the ``shift`` statistic, > 0 (default
            :data:`~defenses.backdoor_scan.SHIFT_THRESHOLD`, calibrated on clean data).
        mislabel: whether the ``mislabel`` statistic takes part in the verdict (False: ``excess`` and ``shift``,
            the scan before it was added; the statistic is computed either way).
        mislabel_threshold: the threshold of the ``mislabel`` statistic, > 0 (default
            :data:`~defenses.backdoor_scan.MISLABEL_THRESHOLD`, calibrated on clean data).

    Returns:
        A :class:`~defenses.ScanResult`: the verdict, its statistic, value and threshold, the suspected target class,
        the flagged indices (empty when nothing is found), every sample's score, the budget and the timing.
    """
    check_model(model)
    X, y = _check_pair(train, "train")
    Xt, yt = check_trusted(trusted, X, y)
    budget = check_fraction(budget, "budget")
    check_budget(len(y), budget, "budget", "training samples", allow_none=False)
    check_seed(seed)
    check_bool(progress, "progress")
    trusted_epochs = check_int(trusted_epochs, "trusted_epochs", minimum=1)
    early_epochs = check_int(early_epochs, "early_epochs", minimum=1)
    if trainer is not None and not callable(getattr(trainer, "fit", None)):
        raise TypeError(f"trainer: must have a fit() method, got {type(trainer).__name__}")
    if training_seconds is not None:
        training_seconds = check_positive(training_seconds, "training_seconds")
    threshold = VERDICT_THRESHOLD if threshold is None else check_number(threshold, "threshold")
    check_bool(shift, "shift")
    shift_threshold = SHIFT_THRESHOLD if shift_threshold is None else check_positive(shift_threshold, "shift_threshold")
    check_bool(mislabel, "mislabel")
    mislabel_threshold = (MISLABEL_THRESHOLD if mislabel_threshold is None
                          else check_positive(mislabel_threshold, "mislabel_threshold"))
    tail = check_number(tail, "tail")
    flag_score = check_number(flag_score, "flag_score")
    parts = scan_scores(model, (X, y), (Xt, yt), trainer=trainer, trusted_epochs=trusted_epochs,
                        early_epochs=early_epochs, seed=seed, progress=progress)
    k = budget_size(len(y), budget)
    target, flagged, statistics = class_statistics(parts.loss_gap, y, k, tail, flag_score, parts.knn)
    shift_target = _top_class(parts.shift_z)
    statistics[SHIFT_STATISTIC] = float(parts.shift_z[shift_target])
    mislabels = class_excess(parts.mislabel, y)
    mislabel_target = _top_class(mislabels)
    statistics[MISLABEL_STATISTIC] = float(mislabels[mislabel_target])
    # (statistic, threshold, target class, scores, flags), in the verdict's order of precedence
    verdicts = [(VERDICT_STATISTIC, threshold, target, parts.loss_gap, lambda: flagged)]
    if shift:
        verdicts.append((SHIFT_STATISTIC, shift_threshold, shift_target, parts.shift,
                         lambda: shift_flags(parts.shift, parts.shift_p, y, shift_target, k)))
    if mislabel:
        verdicts.append((MISLABEL_STATISTIC, mislabel_threshold, mislabel_target, parts.loss_gap,
                         lambda: gap_flags(parts.loss_gap, y, mislabel_target, k, flag_score)))
    passed = [verdict for verdict in verdicts if statistics[verdict[0]] > verdict[1]]
    # nothing found: the one closest to its threshold (``excess`` where its threshold is not positive)
    closest = max(verdicts, key=lambda v: statistics[v[0]] / v[1] if v[1] > 0 else math.inf)
    statistic, limit, target, scores, flags = passed[0] if passed else closest
    value, flagged = statistics[statistic], flags()
    found = value > limit
    seconds = parts.seconds
    total = sum(part["wall"] for part in seconds.values())
    epochs = getattr(trainer, "epochs", None) if trainer is not None and not hasattr(trainer, "eps") else None
    estimated = None if epochs is None else seconds["early"]["wall"] * epochs / early_epochs
    timing = {"scan_s": total, "trusted_model_s": seconds["trusted"]["wall"],
              "early_model_s": seconds["early"]["wall"], "scoring_s": seconds["scoring"]["wall"],
              "training_s": training_seconds if training_seconds is not None else estimated,
              "vs_training": None}
    if timing["training_s"]:
        timing["vs_training"] = total / timing["training_s"]
    return ScanResult(found=bool(found), statistic=statistic, value=float(value), threshold=limit,
                      target_class=target, flagged=flagged if found else torch.zeros(0, dtype=torch.long),
                      scores=scores.double(), budget=budget, timing=timing, statistics=statistics,
                      candidates=flagged, loss_gap=parts.loss_gap.double(), shift_scores=parts.shift.double())
