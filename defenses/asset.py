"""ASSET, Active Separation via Offset (Pan, Zeng, Jia et al., USENIX Security 2023, "ASSET: Robust Backdoor
Data Detection Across a Multiplicity of Deep Learning Paradigms"), for end-to-end supervised training, as in
the authors' demonstration (``ruoxi-jia-group/ASSET``, ``ASSET_demo.ipynb``) and BackdoorBench's port.

A small trusted clean base set and the untrusted training set are offset against each other. A freshly
initialised copy of the model is trained for one epoch over the training set; at every batch:

1. it minimises the variance of its outputs over the classes on a batch of the base set (flat outputs on
   clean data);
2. a fresh two-hidden-layer MLP (128 units, sigmoid output) is fitted for 100 alternating Adam steps to
   output 1 on the training batch and 0 on the base batch, on the poisoned model's features (the inputs of
   its first ``nn.Linear``: a CNN's last convolutional block, the analogue of the authors' ResNet body);
3. the training samples whose MLP output is an outlier of the batch (adjusted outlyingness > 2,
   :func:`adjusted_outlyingness`) have their loss maximised.

A sample's score is its loss under the offset model (poisons: high). The authors' learning rates (Adam,
1e-4 everywhere) are kept; the batch size is the trainer's (the demonstration: 512 of 50,000 CIFAR-10
images and a 1,000-image base set, about 100 steps; 512 on a 3,500-image set would give 7), and a base
batch is as large, drawn from the base set without replacement. The authors' threshold (a Gaussian fitted
to the lower half of the scores) is not used: the recipe removes the budget's highest scores.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from attacks.inputs import as_data, to_model
from attacks.plumbing import make_generator, model_device, seeded
from attacks.validation import check_int, check_positive, check_seed

from .poison_detection import layer_features, training_losses
from .trainers import copy_for_training, per_sample_loss

__all__ = ["medcouple", "adjusted_outlyingness", "asset_scores"]

_HIDDEN, _INNER_STEPS, _OUTLYING = 128, 100, 2.0


def medcouple(values: torch.Tensor) -> float:
    """The medcouple of ``values`` (Brys, Hubert and Struyf 2004; ties at the median as in statsmodels)."""
    z = np.sort(values.detach().double().cpu().numpy().ravel())
    z = z - np.median(z)
    lower, upper = z[z <= 0.0], z[z >= 0.0][:, None]
    tied = (lower == 0.0) & (upper == 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        kernel = (upper + lower) / np.where(tied, np.inf, upper - lower)
    ties = int((lower == 0.0).sum())
    if ties:
        block = np.ones((ties, ties)) - np.eye(ties)
        block -= 2 * np.triu(block)
        kernel[:ties, -ties:] = np.fliplr(block)
    return float(np.median(kernel))


def adjusted_outlyingness(values: torch.Tensor) -> torch.Tensor:
    """Hubert and Van der Veeken (2008)'s adjusted outlyingness of every value: its distance to the median
    over the distance from the median to the medcouple-adjusted boxplot whisker on its side."""
    values = values.detach().double().cpu().ravel()
    median = values.median()
    q1, q3 = torch.quantile(values, torch.tensor([0.25, 0.75], dtype=torch.float64))
    mc, iqr = medcouple(values), q3 - q1
    low, high = (-4.0, 3.0) if mc > 0 else (-3.0, 4.0)
    w1 = q1 - 1.5 * np.exp(low * mc) * iqr
    w2 = q3 + 1.5 * np.exp(high * mc) * iqr
    return torch.where(values > median, (values - median) / (w2 - median), (median - values) / (median - w1))


def _mlp(width: int, generator_seed: int) -> nn.Module:
    with seeded(generator_seed, numpy=False):
        return nn.Sequential(nn.Linear(width, _HIDDEN), nn.ReLU(), nn.Linear(_HIDDEN, _HIDDEN), nn.ReLU(),
                             nn.Linear(_HIDDEN, 1), nn.Sigmoid())


def asset_scores(model: nn.Module, train, base, *, seed: int = 0, batch_size: int = 64, lr: float = 1e-4,
                 inner_steps: int = _INNER_STEPS) -> torch.Tensor:
    """ASSET's score of every sample of ``train`` (larger = more suspicious; see the module).

    Args:
        model: the model trained on ``train`` (its features drive the separation; a re-initialised copy,
            under ``seed``, is offset).
        train: ``(X, y)``, the untrusted training data.
        base: ``(X, y)``, a small trusted clean set (e.g. the validation split).
        seed: fixes the re-initialisation, the batches and the MLPs.
        batch_size: samples per training batch and per base batch.
        lr: Adam's learning rate of every step (the authors' 1e-4).
        inner_steps: alternating steps of each batch's MLP (the authors' 100).
    """
    X, y = as_data(train, "train")[:2]
    Xb = as_data(base, "base")[0]
    check_seed(seed)
    batch_size = check_int(batch_size, "batch_size", minimum=1)
    lr = check_positive(lr, "lr")
    inner_steps = check_int(inner_steps, "inner_steps", minimum=1)
    features, base_features = layer_features(model, X).float(), layer_features(model, Xb).float()
    device = model_device(model)
    offset = copy_for_training(model, "scratch", seed)
    flatten = torch.optim.Adam(offset.parameters(), lr=lr)
    separate = torch.optim.Adam(offset.parameters(), lr=lr)
    generator = make_generator(seed)
    offset.train()
    order = torch.randperm(len(y), generator=generator)
    for number, start in enumerate(range(0, len(y), batch_size)):
        index = order[start:start + batch_size]
        chosen = torch.randperm(len(Xb), generator=generator)[:batch_size]
        outputs = offset(to_model(Xb[chosen], offset))
        flatten.zero_grad()
        outputs.var(dim=1).mean().backward()
        flatten.step()
        mlp = _mlp(features.shape[1], seed * 100_003 + number)
        fit_one, fit_zero = torch.optim.Adam(mlp.parameters(), lr=lr), torch.optim.Adam(mlp.parameters(), lr=lr)
        for _ in range(inner_steps):
            for optimizer, rows, target in ((fit_one, features[index], 1.0), (fit_zero, base_features[chosen], 0.0)):
                optimizer.zero_grad()
                ((mlp(rows).flatten() - target) ** 2).mean().backward()
                optimizer.step()
        with torch.no_grad():
            suspects = index[adjusted_outlyingness(mlp(features[index]).flatten()) > _OUTLYING]
        if suspects.numel() > 1:
            separate.zero_grad()
            (-per_sample_loss(offset(to_model(X[suspects], offset)), y[suspects].to(device)).mean()).backward()
            separate.step()
    offset.eval()
    return training_losses(offset, (X, y))
