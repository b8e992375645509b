"""Shared pytest fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import settings

# Property tests draw the same examples on every run (CI must not depend on luck); no example database.
settings.register_profile("robust-infl", derandomize=True, database=None, deadline=None)
settings.load_profile("robust-infl")


@pytest.fixture(autouse=True)
def seeded_rng():
    """Seed torch and numpy before every test so that random test data is reproducible."""
    torch.manual_seed(0)
    np.random.seed(0)


def _per_sample_loss(outputs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if outputs.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(outputs[:, 0], y.to(outputs.dtype), reduction="none")
    return F.cross_entropy(outputs, y.long(), reduction="none")


@pytest.fixture
def fgsm_attack():
    """Factory ``fgsm_attack(eps)`` of a deterministic one-step sign-gradient attack(model, x, y).

    The attack counts its calls in ``attack.calls`` and works for one-logit and multi-logit models.
    """

    def make(eps: float):
        def attack(model, x, y):
            attack.calls += 1
            x = x.detach().clone().requires_grad_(True)
            (grad_x,) = torch.autograd.grad(_per_sample_loss(model(x), y).sum(), x)
            return (x + eps * grad_x.sign()).detach()

        attack.calls = 0
        return attack

    return make


ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "experiments" / "RESULTS.md"


@pytest.fixture
def run_quick():
    """Runner ``run_quick(module, tmp_path, timeout)`` of ``python -m experiments.<module> --quick``.

    It writes the JSON and the plots into ``tmp_path``, checks that the script exits cleanly, writes its
    ``<module>_quick.png``, prints a table and leaves experiments/RESULTS.md untouched, and returns the JSON.
    """

    def run(module: str, tmp_path: Path, timeout: int) -> dict:
        out = tmp_path / f"{module}.json"
        before = RESULTS_MD.read_text() if RESULTS_MD.exists() else None
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        completed = subprocess.run(
            [sys.executable, "-m", f"experiments.{module}", "--quick", "--no-progress", "--out", str(out),
             "--plots", str(tmp_path)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert (tmp_path / f"{module}_quick.png").stat().st_size > 10_000
        after = RESULTS_MD.read_text() if RESULTS_MD.exists() else None
        assert after == before, "a quick run must not write RESULTS.md"
        assert "| " in completed.stdout  # the tables are printed
        return json.loads(out.read_text())

    return run
