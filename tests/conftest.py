"""Shared pytest fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

import robust_infl as ri
from robust_infl import datasets
from robust_infl.models import MLP

# Property tests draw the same examples on every run (CI must not depend on luck); no example database.
settings.register_profile("robust-infl", derandomize=True, database=None, deadline=None)
settings.load_profile("robust-infl")


@pytest.fixture(autouse=True)
def seeded_rng():
    """Seed torch and numpy before every test so that random test data is reproducible."""
    torch.manual_seed(0)
    np.random.seed(0)


def _per_sample_loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # Written out here, not taken from attacks.plumbing: the brute-force references stay independent of the library.
    if outputs.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(outputs[:, 0], y.to(outputs.dtype), reduction="none")
    return F.cross_entropy(outputs, y.long(), reduction="none")


@pytest.fixture
def fgsm_attack():
    """Factory ``fgsm_attack(eps)`` of a deterministic one-step sign-gradient attack(model, x, y).

    The attack counts its calls in ``attack._calls`` (private: a function's public attributes are part of
    its settings, :func:`attacks.plain_value`, and a resumed store compares them) and works for one-logit
    and multi-logit models.
    """

    def make(eps: float):
        def attack(model, x, y):
            attack._calls += 1
            x = x.detach().clone().requires_grad_(True)
            (grad_x,) = torch.autograd.grad(_per_sample_loss(model(x), y).sum(), x)
            return (x + eps * grad_x.sign()).detach()

        attack._calls = 0
        return attack

    return make


ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "experiments" / "RESULTS.md"


def run_experiment(module: str, out_dir: Path, limit: float) -> tuple:
    """Run ``python -m experiments.<module> --quick`` into ``out_dir``, killed after ``limit`` seconds.

    Returns ``(returncode, stdout, stderr, seconds, RESULTS.md before, RESULTS.md after)``.
    """
    before = RESULTS_MD.read_text() if RESULTS_MD.exists() else None
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", f"experiments.{module}", "--quick", "--no-progress", "--out",
         str(out_dir / f"{module}.json"), "--plots", str(out_dir)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        process.kill()
        stdout, stderr = process.communicate()
    seconds = time.monotonic() - start
    after = RESULTS_MD.read_text() if RESULTS_MD.exists() else None
    return process.returncode, stdout, stderr, seconds, before, after


def pytest_collection_modifyitems(config, items):
    """Every test under ``tests/experiments/`` checks an experiment's results, not library behaviour: it is
    ``slow`` (run by ``make test-all``, not by ``make test``)."""
    experiments = ROOT / "tests" / "experiments"
    for item in items:
        if experiments in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def run_quick():
    """Runner ``run_quick(module, tmp_path, timeout)`` of ``python -m experiments.<module> --quick``.

    It writes the JSON and the plots into ``tmp_path``, checks that the script exits cleanly within
    ``timeout`` seconds, writes its ``<module>_quick.png``, prints a table and leaves experiments/RESULTS.md
    untouched, and returns the JSON.
    """

    def run(module: str, tmp_path: Path, timeout: int) -> dict:
        returncode, stdout, stderr, seconds, before, after = run_experiment(module, tmp_path, timeout)
        assert seconds <= timeout, f"experiments.{module} --quick took {seconds:.0f} s (limit {timeout} s)"
        assert returncode == 0, stderr[-3000:]
        assert (tmp_path / f"{module}_quick.png").stat().st_size > 10_000
        assert after == before, "a quick run must not write RESULTS.md"
        assert "| " in stdout  # the tables are printed
        return json.loads((tmp_path / f"{module}.json").read_text())

    return run


# The command line on moons with a logistic regression, one epoch and 40 / 20 / 20 samples: for CLI checks
# that need a run but not its numbers.
CLI_TINY = ["--data", "moons", "--model", "logreg", "--epochs", "1", "--n-train", "40", "--n-val", "20",
            "--n-test", "20", "--no-progress"]


# ---------------------------------------------------------------- shared data, models and helpers
# Plain factories (import them: ``from conftest import gaussian_blobs``) build small, seeded data sets;
# each call returns new tensors, so no test can change another's data.

def seeded_images(n: int = 40, seed: int = 0, classes: int = 4, shape: tuple = (1, 8, 8),
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` seeded uniform images of ``shape`` in [0, 1) and cyclic labels over ``classes``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g, dtype=dtype), torch.arange(n) % classes


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same dtype, shape and bytes."""
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def flat_params(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter of ``model`` as one detached flat vector (to compare weights)."""
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def gaussian_blobs(n: int = 64, d: int = 5, seed: int = 0, classes: int = 2, shift: float = 1.5,
                   flip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded labels ``y`` in ``range(classes)`` and ``X = N(0, I) + shift * (y - 0.5)`` in every feature.

    With ``flip > 0`` that share of the labels (drawn after ``X``) is flipped ``y -> 1 - y`` (two classes).
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    X = torch.randn(n, d, generator=g) + shift * (y.float() - 0.5).unsqueeze(1)
    if flip:
        y = torch.where(torch.rand(n, generator=g) < flip, 1 - y, y)
    return X, y


def centred_blobs(n: int = 96, d: int = 5, seed: int = 0, classes: int = 3,
                  centres_seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded labels and ``X = centre[y] + N(0, I)`` around ``N(0, 4 I)`` class centres.

    The centres come from the data's own generator, or from ``centres_seed`` so that several splits share them.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    centres_generator = g if centres_seed is None else torch.Generator().manual_seed(centres_seed)
    centres = torch.randn(classes, d, generator=centres_generator) * 2
    return centres[y] + torch.randn(n, d, generator=g), y


def square_blobs(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternating labels 0, 1, 0, ... and 2-D points uniform in a 0.5-square, shifted by 0.4 for class 1."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    return torch.rand(n, 2, generator=g) * 0.5 + 0.4 * y.float().unsqueeze(1), y


def uniform_batch(n: int, d: int, seed: int = 0, classes: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded inputs uniform in ``[0, 1]^d`` with uniformly random labels in ``range(classes)``."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, d, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.fixture
def mlp_problem():
    """Factory ``mlp_problem(seed, n_features, n_classes, hidden, n_train, n_target)`` of a float64 problem.

    Returns ``(model, (x, y), (xt, yt))``: an untrained float64 MLP in eval mode (initialised after
    ``torch.manual_seed(seed)``) and Gaussian train and target inputs with uniformly random labels.
    """

    def make(seed: int, n_features: int, n_classes: int, hidden: tuple, n_train: int, n_target: int):
        torch.manual_seed(seed)
        model = MLP(n_features, n_classes, hidden=hidden).double().eval()
        x, y = torch.randn(n_train, n_features, dtype=torch.float64), torch.randint(0, n_classes, (n_train,))
        xt, yt = torch.randn(n_target, n_features, dtype=torch.float64), torch.randint(0, n_classes, (n_target,))
        return model, (x, y), (xt, yt)

    return make


def flat_grad(value: torch.Tensor, parameters) -> torch.Tensor:
    """The gradient of the scalar ``value`` with respect to ``parameters`` as one flat vector."""
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(parameters))])


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    """Pearson correlation of two score vectors (in float64)."""
    return float(torch.corrcoef(torch.stack([a.double(), b.double()]))[0, 1])


def max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``."""
    return float((a - b).abs().max() / b.abs().max())


def in_unit_interval(value: float) -> bool:
    """Whether ``value`` is a share in ``[0, 1]``."""
    return 0.0 <= value <= 1.0


class CreatesMarkerWhenUnpickled:
    """An object whose unpickling calls ``open(marker, "w")``: code hidden in a checkpoint file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def influence_scorer(batch_size: int):
    """``score(model, train, target, objective=None, **options)``: ``robust_infl.influence`` scoring in batches
    of ``batch_size``, without a progress bar, on ``Utility()`` unless an objective is given."""

    def score(model, train, target, objective=None, **options):
        options = {"batch_size": batch_size, "progress": False, **options}
        return ri.influence(model, train, target, objective=objective or ri.Utility(), **options)

    return score


def fashion_mnist_installed() -> bool:
    """Whether Fashion-MNIST's IDX files are where the loader looks (``make setup`` puts them there)."""
    try:
        datasets.find_fashion_mnist()
    except FileNotFoundError:
        return False
    return True


def tiny_cnn_problem(n_train: int, n_target: int) -> tuple:
    """``(model, (x, y), (xt, yt))``: a seeded float64 CNN (177 parameters, 3 classes, eval mode) and seeded
    6x6 one-channel images with random labels, for checks against a peer library on the same model."""
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(48, 3)).double().eval()
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(n_train, 1, 6, 6, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (n_train,), generator=generator)
    xt = torch.rand(n_target, 1, 6, 6, generator=generator, dtype=torch.float64)
    yt = torch.randint(0, 3, (n_target,), generator=generator)
    return model, (x, y), (xt, yt)
