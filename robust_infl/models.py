"""Reference models: a small CNN for images, an MLP and logistic regression for tabular data.

Inputs are raw features (images in [0, 1]); any normalisation lives inside the model, as in
RobustBench, so attacks work in input space.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from attacks.plumbing import seeded

__all__ = ["Normalize", "SmallCNN", "MLP", "LogisticRegression", "build_model", "MODEL_NAMES"]

MODEL_NAMES = ("cnn", "mlp", "logreg")


class Normalize(nn.Module):
    """Subtract ``mean`` and divide by ``std`` (buffers, broadcast over the feature dims)."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (ReLU, 2x2 max-pool) and a two-layer head.

    With the defaults on 1x28x28 inputs it has about 106k parameters.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        image_size: int = 28,
        channels: Sequence[int] = (16, 32),
        hidden: int = 64,
        mean: float = 0.0,
        std: float = 1.0,
    ):
        super().__init__()
        c1, c2 = channels
        self.normalize = Normalize(mean, std)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


class MLP(nn.Module):
    """Fully connected ReLU network; ``num_classes=1`` gives a single binary logit."""

    def __init__(self, in_features: int, num_classes: int = 2, hidden: Sequence[int] = (64, 64)):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LogisticRegression(nn.Module):
    """A single linear layer; ``num_classes=1`` is binary logistic regression (one logit)."""

    def __init__(self, in_features: int, num_classes: int = 1):
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.flatten(x))


def build_model(name: str, input_shape: Sequence[int], num_classes: int, seed: int = 0) -> nn.Module:
    """Build a reference model by name (``"cnn"``, ``"mlp"``, ``"logreg"``) with seeded init.

    ``input_shape`` excludes the batch dimension. Binary problems get one output logit for
    ``logreg`` and two for the others.
    """
    if name not in MODEL_NAMES:
        raise ValueError(f"model: unknown name {name!r}; valid names are {', '.join(MODEL_NAMES)}")
    if num_classes < 2:
        raise ValueError(f"num_classes: need at least 2 classes, got {num_classes}")
    with seeded(seed, numpy=False):
        shape = tuple(int(d) for d in input_shape)
        n_features = 1
        for d in shape:
            n_features *= d
        if name == "cnn":
            if len(shape) != 3 or shape[1] != shape[2]:
                raise ValueError(f"input_shape: the CNN needs (C, H, H) images, got {shape}")
            model: nn.Module = SmallCNN(shape[0], num_classes, shape[1])
        elif name == "mlp":
            model = MLP(n_features, num_classes)
        else:
            model = LogisticRegression(n_features, 1 if num_classes == 2 else num_classes)
    return model
