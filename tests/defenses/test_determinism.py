"""Determinism on CPU: the same seed gives bitwise identical scores (every method), prune masks, reweighting
weights, attacks, splits and defence reports, in one process and in two separate processes; a different
seed changes what is random (random scores, ip-ensemble members, LiSSA minibatches, PGD starts, splits).

Run as a script (``python tests/defenses/test_determinism.py SEED``) it prints the fingerprints as JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # when run as a script
    sys.path.insert(0, str(ROOT))

import attacks  # noqa: E402
import defenses  # noqa: E402
import robust_infl as ri  # noqa: E402
from defenses.report import without_timing  # noqa: E402
from robust_infl.datasets import load_dataset  # noqa: E402
from robust_infl.models import MLP  # noqa: E402

METHOD_OPTIONS = {
    "ip": {},
    "ip-ensemble": dict(members=3),
    "tracin": dict(checkpoints="perturbed"),
    "if-exact": dict(damping=1.0),
    "if-cg": dict(damping=1.0),
    "if-lissa": dict(damping=1.0, scale=20.0, depth=5, repeats=2, hvp_batch_size=8),
    "datainf": {},
    "ekfac": {},
    "kfac": dict(use_empirical_fisher=True),
    "trak": dict(proj_dim=16),
    "self": {},
    "loss": {},
    "random": {},
}
RANDOM_PARTS = ("method:random", "method:ip-ensemble", "method:if-lissa", "method:trak", "pgd", "splits")


def digest(value) -> str:
    """SHA-256 of a tensor's bytes (dtype and shape included) or of a JSON-serialisable value."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        return hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode() + t.view(-1).view(torch.uint8).numpy().tobytes()
                              ).hexdigest()
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def fingerprints(seed: int) -> dict:
    """Fingerprints of everything seeded by ``seed`` on a tiny problem (a few seconds on one core)."""
    splits = load_dataset("moons", seed=seed, n_train=48, n_val=16, n_test=16)
    train, val = splits.train[:2], splits.val[:2]
    torch.manual_seed(0)
    model = MLP(2, 2, hidden=(6,)).eval()
    pgd = attacks.PGD(0.3, steps=3, norm="l2", bounds=None, seed=seed)
    out = {"splits": digest([digest(t) for t in (*splits.train, *splits.val, *splits.test)]),
           "pgd": digest(pgd(model, *val))}
    objective = ri.Robust(pgd)
    for method, options in METHOD_OPTIONS.items():
        if options.get("checkpoints") == "perturbed":
            options = {"checkpoints": [{k: v * 0.9 for k, v in model.state_dict().items()}, model.state_dict()]}
        scores = ri.influence(model, train, val, objective=objective, method=method, seed=seed, batch_size=16,
                              progress=False, **options)
        out[f"method:{method}"] = digest(scores)
    scores = ri.influence(model, train, val, objective=objective, seed=seed, progress=False)
    out["prune"] = digest(defenses.prune(scores, 0.2))
    out["reweight"] = digest(defenses.reweight(scores, fraction=0.2))
    report = defenses.run("moons", model="logreg", attack="pgd", seeds=[seed], epochs=1, n_train=60, n_val=30,
                          n_test=30, fractions=[0.1], progress=False)
    out["report"] = digest(without_timing(report))  # wall times are measurements, everything else is bitwise
    return out


@pytest.mark.slow  # runs the whole fingerprint in fresh processes
def test_same_seed_is_bitwise_identical_within_and_across_processes():
    """Twice in this process, and once in a fresh process (started first, it runs alongside)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
    other = subprocess.Popen([sys.executable, __file__, "3"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    first, second = fingerprints(3), fingerprints(3)
    assert set(first) == {f"method:{m}" for m in ri.available_methods()} | {"splits", "pgd", "prune", "reweight",
                                                                            "report"}
    assert first == second
    out, err = other.communicate(timeout=600)
    assert other.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == first


@pytest.mark.slow
def test_a_different_seed_changes_what_is_random():
    zero, one = fingerprints(0), fingerprints(1)
    for part in RANDOM_PARTS:
        assert zero[part] != one[part], part


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    print(json.dumps(fingerprints(int(sys.argv[1]))))
