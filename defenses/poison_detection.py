"""Scores that flag backdoor poisons in a training set, larger = more suspicious, and their metrics.

- :func:`training_losses`: per-sample training loss of the trained model (poisons are the samples
  it fits best: a trigger is easier to learn than a digit; Li et al. 2021, Anti-Backdoor Learning).
- :func:`in_class_low_loss`: lowest loss first among the samples labelled ``target_class`` (every
  other sample ranked after them). The target class comes from the evidence
  (:func:`evidence_target_class`: the class the triggered inputs are pushed into) or, without any,
  from the training losses alone (:func:`estimate_target_class`).
- :func:`activation_defence_scores` and :func:`spectral_signature_scores`: ART's
  ``ActivationDefence`` (Chen et al. 2018, clustering of the last hidden layer's activations per
  class) and ``SpectralSignatureDefense`` (Tran et al. 2018, projection on the top singular vector
  per class), on the model's last hidden layer.
- :func:`layer_features` (with the training losses from the same pass: :func:`losses_and_features`),
  :func:`label_disagreement_scores`, :func:`contrast_scores` and :func:`separated_top`: the representation-contrast detector behind :func:`defenses.remove_poisons`.
  A sample's features are the inputs of the model's first ``nn.Linear`` (the flattened convolutional
  features of a CNN, the raw input of an MLP), where a trigger stays visible. Poisons labelled with
  the target class resemble the triggered evidence more than the class's own samples do:
  ``cos(h_i, mean evidence) - cos(h_i, mean of the class)``. Without evidence, the samples whose
  nearest neighbours carry other labels (dirty-label poisons look like their source class) serve as
  pseudo-evidence. The cut is the largest between-group-variance split (Otsu) of the in-class
  scores, capped at the budget, so that a clear separation removes the poisons and little else.
- :func:`detection_metrics`: precision and recall of the flagged samples, AUROC of the scores.
"""

from __future__ import annotations

import copy
import math
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from attacks.base import predict
from attacks.inputs import as_data, to_model
from attacks.plumbing import frozen_in_eval, model_device, seeded
from attacks.validation import check_choice

from .trainers import per_sample_loss

__all__ = [
    "training_losses",
    "in_class_low_loss",
    "evidence_target_class",
    "estimate_target_class",
    "over_represented_class",
    "over_represented_classes",
    "otsu_split",
    "activation_defence_scores",
    "spectral_signature_scores",
    "detection_metrics",
    "check_evidence",
    "layer_features",
    "label_disagreement_scores",
    "losses_and_features",
    "contrast_scores",
    "separated_top",
]


def training_losses(model: nn.Module, data, *, train_attack: Optional[Callable] = None,
                    batch_size: int = 128) -> torch.Tensor:
    """Per-sample loss of ``model`` on ``data`` (at ``train_attack``'s points when given), float64 on the CPU."""
    X, y = as_data(data, "data")[:2]
    device = model_device(model)
    out = []
    with frozen_in_eval(model):
        for start in range(0, X.shape[0], batch_size):
            xb, yb = to_model(X[start:start + batch_size], model), y[start:start + batch_size].to(device)
            if train_attack is not None:
                xb = train_attack(model, xb, yb)
            with torch.no_grad():
                out.append(per_sample_loss(model(xb), yb).double().cpu())
    return torch.cat(out)


def in_class_low_loss(losses: torch.Tensor, y: torch.Tensor, target_class: int) -> torch.Tensor:
    """Scores ranking the samples labelled ``target_class`` by lowest loss first, all others after them."""
    losses = losses.double().cpu()
    in_class = (y.cpu() == target_class).double()
    return -losses + in_class * (float(losses.max()) - float(losses.min()) + 1.0)


def check_evidence(evidence, input_shape: tuple, num_classes: int) -> tuple:
    """``evidence`` as ``(X_triggered, y_true)`` (normalised by :func:`attacks.inputs.as_data`) after checking
    the sample shape and labels (``ValueError`` naming ``evidence`` otherwise)."""
    if not isinstance(evidence, (tuple, list)) or len(evidence) != 2:
        raise ValueError(f"evidence: must be a pair (X_triggered, y_true) or None, got {type(evidence).__name__}")
    X, y = as_data(evidence, "evidence", max_fields=2)
    if tuple(X.shape[1:]) != tuple(input_shape):
        raise ValueError(f"evidence: X_triggered must have samples of shape {tuple(input_shape)}, "
                         f"got {tuple(X.shape[1:])}")
    if int(y.min()) < 0 or int(y.max()) >= num_classes:
        raise ValueError(f"evidence: labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]")
    return X, y


def evidence_target_class(model: nn.Module, evidence: tuple) -> int:
    """The class the model assigns most often to the triggered evidence inputs it misclassifies (all of
    them when it misclassifies none; ties: the smallest class): the class the trigger pushes them into."""
    X, y = evidence
    with frozen_in_eval(model), torch.no_grad():
        predicted = predict(model(to_model(X, model))).cpu()
    wrong = predicted != y.cpu()
    return int(torch.bincount(predicted[wrong] if wrong.any() else predicted).argmax())


def over_represented_classes(flagged: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Classes ordered by how much their share among the ``flagged`` samples exceeds their share of all samples."""
    y = y.cpu()
    classes = int(y.max()) + 1
    share_flagged = torch.bincount(y[flagged.cpu()], minlength=classes).double() / max(1, int(flagged.sum()))
    share_all = torch.bincount(y, minlength=classes).double().clamp_min(1) / y.numel()
    return torch.sort(-(share_flagged / share_all), stable=True).indices


def over_represented_class(flagged: torch.Tensor, y: torch.Tensor) -> int:
    """The class whose share among the ``flagged`` samples most exceeds its share of all samples."""
    return int(over_represented_classes(flagged, y)[0])


def estimate_target_class(losses: torch.Tensor, y: torch.Tensor, fraction: float) -> int:
    """Without evidence, the class most over-represented among the ``fraction`` lowest-loss samples
    (where fitted dirty-label poisons sit)."""
    k = max(1, round(fraction * losses.numel()))
    flagged = torch.zeros(losses.numel(), dtype=torch.bool)
    flagged[torch.sort(losses.double().cpu(), stable=True).indices[:k]] = True
    return over_represented_class(flagged, y)


def layer_features(model: nn.Module, X: torch.Tensor, *, batch_size: int = 512, linear: str = "first") -> torch.Tensor:
    """The inputs of the model's first (``linear="first"``) or last (``"last"``: the penultimate features)
    ``nn.Linear`` for every sample, flattened, float64 on the CPU."""
    return _features_and_outputs(model, X, batch_size, linear)[0]


def losses_and_features(model: nn.Module, data, *, batch_size: int = 128, linear: str = "first") -> tuple:
    """``(training_losses(model, data), layer_features(model, X))`` from one pass over ``data = (X, y)``."""
    X, y = as_data(data, "data")[:2]
    features, outputs = _features_and_outputs(model, X, batch_size, linear)
    return per_sample_loss(outputs, y.to(outputs.device)).double().cpu(), features


def _features_and_outputs(model: nn.Module, X: torch.Tensor, batch_size: int, linear: str) -> tuple:
    check_choice(linear, "linear", ("first", "last"))
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model: the feature-based detectors need a model with an nn.Linear layer (they read its inputs)")
    layer = linears[0] if linear == "first" else linears[-1]
    captured, outputs = [], []
    handle = layer.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0].detach().flatten(1)))
    try:
        with frozen_in_eval(model), torch.no_grad():
            for start in range(0, X.shape[0], batch_size):
                outputs.append(model(to_model(X[start:start + batch_size], model)))
    finally:
        handle.remove()
    return torch.cat(captured).double().cpu(), torch.cat(outputs)


def _unit(features: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(features, dim=1)


def label_disagreement_scores(features: torch.Tensor, y: torch.Tensor, *, k: int = 20,
                              chunk: int = 1024, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Share of each sample's ``k`` nearest neighbours (cosine similarity of ``features``, itself excluded)
    whose label differs from its own (deep k-NN, Peri et al. 2020); with ``rows`` (int64 indices), only for
    those samples (their neighbours still drawn from all), in their order."""
    unit, y = _unit(features), y.cpu()
    rows = torch.arange(len(y)) if rows is None else rows.cpu()
    out = torch.empty(len(rows), dtype=torch.float64)
    for start in range(0, len(rows), chunk):
        block = rows[start:start + chunk]
        sim = unit[block] @ unit.T
        sim[torch.arange(len(block)), block] = -math.inf
        neighbours = sim.topk(min(k, len(y) - 1), dim=1).indices
        out[start:start + chunk] = (y[neighbours] != y[block, None]).double().mean(1)
    return out


def contrast_scores(features: torch.Tensor, y: torch.Tensor, target_class: int,
                    evidence_features: torch.Tensor) -> torch.Tensor:
    """``cos(h_i, mean evidence) - cos(h_i, mean of the samples labelled target_class)`` for the samples of
    ``target_class``; every other sample is ranked after them (score shifted below their minimum)."""
    unit, y = _unit(features), y.cpu()
    in_class = y == target_class
    towards = _unit(_unit(evidence_features).mean(0, keepdim=True))[0]
    away = _unit(unit[in_class].mean(0, keepdim=True))[0]
    scores = unit @ towards - unit @ away
    return torch.where(in_class, scores, scores - 4.0)


def otsu_split(values: torch.Tensor) -> tuple:
    """``(count, separation)``: how many of the largest ``values`` lie above the cut maximising the
    between-group variance (Otsu), and that variance's share of the total (1: two point masses; about
    0.64 for one Gaussian)."""
    values = torch.sort(values.double(), descending=True, stable=True).values
    m = values.numel()
    if m < 2 or float(values[0] - values[-1]) == 0.0:
        return 0, 0.0
    high = torch.arange(1, m, dtype=torch.float64)
    mean_high = torch.cumsum(values, 0)[:-1] / high
    mean_low = (values.sum() - torch.cumsum(values, 0)[:-1]) / (m - high)
    between = high * (m - high) * (mean_high - mean_low) ** 2 / m**2
    best = int(between.argmax())
    return best + 1, float(between[best] / values.var(unbiased=False))


def separated_top(scores: torch.Tensor, candidates: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``candidates`` above the Otsu split of their scores (:func:`otsu_split`), at most
    the ``k`` highest."""
    index = torch.nonzero(candidates).flatten()
    flagged = torch.zeros(scores.numel(), dtype=torch.bool)
    count, _ = otsu_split(scores[index]) if index.numel() else (0, 0.0)
    order = torch.sort(scores[index].double(), descending=True, stable=True).indices
    flagged[index[order[:min(count, k)]]] = True
    return flagged


class _PenultimateLast(nn.Module):
    """The model with its output layer split off: ``output(body(x))``, the body registered LAST, so that
    ART's ``PyTorchClassifier`` sees the last hidden layer as its final layer (its poison defences read
    the activations of ``layer_names[-1]``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ValueError("model: ART's poison defences need a model whose output layer is an nn.Linear")
        body = copy.deepcopy(model)
        parent_name, _, attr = linears[-1].rpartition(".")
        parent = body.get_submodule(parent_name) if parent_name else body
        self.output = getattr(parent, attr)
        setattr(parent, attr, nn.Identity())
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.body(x))


def _art_classifier(model: nn.Module, X: torch.Tensor, num_classes: int):
    from art.estimators.classification import PyTorchClassifier

    wrapped = _PenultimateLast(model).eval()
    return PyTorchClassifier(model=wrapped, loss=nn.CrossEntropyLoss(), input_shape=tuple(X.shape[1:]),
                             nb_classes=num_classes, clip_values=(float(X.min()), float(X.max())))


def activation_defence_scores(model: nn.Module, train, *, nb_clusters: int = 2, nb_dims: int = 10,
                              reduce: str = "PCA", seed: int = 0) -> torch.Tensor:
    """ART ``ActivationDefence``'s clustering of the last hidden layer's activations (per class, ``reduce`` to
    ``nb_dims`` dimensions, k-means with ``nb_clusters``), scored by its relative-size analysis:
    ``1 - the share of its class that the sample's cluster holds``, so samples of small clusters come first.

    ART's ``cluster_analysis="relative-size"`` flags the clusters under 35% of their class, i.e. scores
    above 0.65 (its own analysis step is not called: in ART 1.20 it fails under numpy 2 when building
    its report).
    """
    from art.defences.detector.poison import ActivationDefence

    X, y = as_data(train, "train")[:2]
    num_classes = int(y.max()) + 1
    classifier = _art_classifier(model, X, num_classes)
    x_np, y_np = X.cpu().float().numpy(), np.eye(num_classes, dtype=np.float32)[y.cpu().numpy()]
    with seeded(seed, torch.device("cpu")):
        defence = ActivationDefence(classifier, x_np, y_np)
        defence.set_params(nb_clusters=nb_clusters, nb_dims=nb_dims, reduce=reduce)
        defence.clusterer = type(defence.clusterer)(n_clusters=nb_clusters, random_state=seed)
        clusters_by_class, _ = defence.cluster_activations()
    scores = torch.zeros(len(y), dtype=torch.float64)
    labels = y.cpu().numpy()
    for c, clusters in enumerate(clusters_by_class):
        index = np.flatnonzero(labels == c)
        clusters = np.asarray(clusters, dtype=np.int64)
        if index.size:
            share = np.bincount(clusters, minlength=nb_clusters) / index.size
            scores[torch.from_numpy(index)] = torch.from_numpy(1.0 - share[clusters]).double()
    return scores


def spectral_signature_scores(model: nn.Module, train) -> torch.Tensor:
    """ART's spectral-signature outlier score on the last hidden layer, as its quantile within the sample's
    class (ART flags the top ``1.5 * expected_pp_poison`` of every class, so ranking by this quantile and
    cutting at the budget flags what ART flags with ``expected_pp_poison = budget / 1.5``)."""
    from art.defences.detector.poison import SpectralSignatureDefense

    X, y = as_data(train, "train")[:2]
    num_classes = int(y.max()) + 1
    classifier = _art_classifier(model, X, num_classes)
    features = classifier.get_activations(X.cpu().float().numpy(), layer=len(classifier.layer_names) - 1,
                                          batch_size=512)
    features = np.reshape(features, (features.shape[0], -1))
    labels = y.cpu().numpy()
    scores = torch.zeros(len(y), dtype=torch.float64)
    for c in range(num_classes):
        index = np.flatnonzero(labels == c)
        if index.size < 2:
            continue
        raw = SpectralSignatureDefense.spectral_signature_scores(features[index])[:, 0]
        quantile = (np.argsort(np.argsort(raw, kind="stable"), kind="stable") + 1) / index.size
        scores[torch.from_numpy(index)] = torch.from_numpy(quantile).double()
    return scores


def detection_metrics(removed: torch.Tensor, poisoned_index: torch.Tensor,
                      scores: Optional[torch.Tensor] = None) -> dict:
    """``precision`` / ``recall`` of the ``removed`` mask against the true poisons, and the ``auroc`` of
    ``scores`` (poison vs clean, ties counted half; None without scores)."""
    from scipy.stats import rankdata

    n = removed.numel()
    is_poison = torch.zeros(n, dtype=torch.bool)
    is_poison[poisoned_index.cpu()] = True
    hits = int((removed.cpu() & is_poison).sum())
    out = {"removed": int(removed.sum()), "precision": hits / max(1, int(removed.sum())),
           "recall": hits / max(1, int(is_poison.sum())), "auroc": None}
    if scores is not None:
        ranks = rankdata(scores.double().cpu().numpy())
        pos, neg = int(is_poison.sum()), n - int(is_poison.sum())
        if pos and neg:
            out["auroc"] = float((ranks[is_poison.numpy()].sum() - pos * (pos + 1) / 2) / (pos * neg))
    return out
