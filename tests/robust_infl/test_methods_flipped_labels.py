"""Every registered method on a constructed case where the harmful samples are known.

Two Gaussian blobs, 10% of the training labels flipped, a small MLP trained to (near) convergence
with L2 regularisation; the objective is Utility on clean validation data. Flipped samples hurt the
validation loss, so every influence method must rank them on top (harm convention: larger = more
harmful), measured by the AUROC of the scores for the flipped mask; "random" must not.
Also: the same seed gives identical scores for every method.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from sklearn.metrics import roc_auc_score

import robust_infl as ri

N_TRAIN, N_VAL, DAMPING, STEPS, LR = 200, 200, 0.01, 300, 0.05
CHECKPOINT_EVERY = 100

OPTIONS = {
    "ip-ensemble": {"members": 3, "scale": 0.2},
    "if-cg": {"max_iter": 200},
    "if-lissa": {"depth": 100, "scale": 2.0, "hvp_batch_size": 32, "repeats": 2},
}


def blobs(generator: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.randint(0, 2, (n,), generator=generator)
    x = torch.randn(n, 2, generator=generator, dtype=torch.float64) + 1.5 * (2 * y[:, None] - 1).double()
    return x, y


@pytest.fixture(scope="module")
def noisy_problem():
    """A trained MLP, its noisy training set, the flipped mask, clean validation data and checkpoints."""
    generator = torch.Generator().manual_seed(0)
    x, y = blobs(generator, N_TRAIN)
    flipped = torch.randperm(N_TRAIN, generator=generator)[: N_TRAIN // 10]
    y[flipped] = 1 - y[flipped]
    mask = torch.zeros(N_TRAIN, dtype=torch.bool)
    mask[flipped] = True
    val = blobs(generator, N_VAL)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double()  # smooth: a true minimum
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    checkpoints = []
    for step in range(STEPS):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) + DAMPING / 2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        optimizer.step()
        if (step + 1) % CHECKPOINT_EVERY == 0:
            checkpoints.append({k: v.clone() for k, v in model.state_dict().items()})
    polish = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-10,
                               tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        polish.zero_grad()
        loss = F.cross_entropy(model(x), y) + DAMPING / 2 * sum((p**2).sum() for p in model.parameters())
        loss.backward()
        return loss

    for _ in range(3):
        polish.step(closure)  # to a minimum, where the damped Hessian is positive definite
    return model.eval(), (x, y), mask, val, checkpoints


def method_options(name: str, checkpoints: list) -> dict:
    if name == "tracin":
        return {"checkpoints": checkpoints, "lrs": LR}
    return OPTIONS.get(name, {})


def scores(noisy_problem, name: str, seed: int = 0) -> torch.Tensor:
    model, train, _, val, checkpoints = noisy_problem
    return ri.influence(model, train, val, objective=ri.Utility(), method=name, damping=DAMPING, seed=seed,
                        batch_size=64, progress=False, **method_options(name, checkpoints))


def test_every_issue_method_is_registered():
    expected = {"ip", "ip-ensemble", "tracin", "if-exact", "if-cg", "if-lissa", "datainf", "self", "loss", "random"}
    assert expected <= set(ri.available_methods())


@pytest.mark.parametrize("name", [m for m in ri.available_methods() if m != "random"])
def test_flipped_labels_are_ranked_most_harmful(noisy_problem, name):
    mask = noisy_problem[2]
    harm = scores(noisy_problem, name)
    auroc = roc_auc_score(mask.numpy(), harm.numpy())
    top = torch.topk(harm, int(mask.sum())).indices
    precision = float(mask[top].double().mean())
    print(f"{name}: AUROC {auroc:.3f}, precision@{int(mask.sum())} {precision:.2f}")
    assert harm.shape == (N_TRAIN,) and torch.isfinite(harm).all()
    assert auroc >= 0.9
    assert precision >= 0.6


def test_random_scores_do_not_find_flipped_labels(noisy_problem):
    mask = noisy_problem[2]
    aurocs = [roc_auc_score(mask.numpy(), scores(noisy_problem, "random", seed).numpy()) for seed in range(5)]
    assert abs(np.mean(aurocs) - 0.5) < 0.1


@pytest.mark.parametrize("name", ri.available_methods())
def test_same_seed_gives_identical_scores(noisy_problem, name):
    assert torch.equal(scores(noisy_problem, name, seed=3), scores(noisy_problem, name, seed=3))
