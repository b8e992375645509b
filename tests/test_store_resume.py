"""Resumable scoring: a process killed with SIGKILL mid-run and resumed gives the uninterrupted scores."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import robust_infl as ri
from robust_infl.distributed import sharded_influence
from robust_infl.models import MLP

ROOT = Path(__file__).resolve().parents[1]
N_TRAIN, BATCH = 1024, 16

# The scoring run killed in a subprocess; the same data and model as `setting()` below.
WORKER = """
import sys
import torch
import robust_infl as ri
from robust_infl.distributed import sharded_influence
from robust_infl.models import MLP

torch.manual_seed(0)
model = MLP(20, 5, hidden=(32,)).eval()
x, y = torch.randn({n}, 20), torch.randint(0, 5, ({n},))
xt, yt = torch.randn(40, 20), torch.randint(0, 5, (40,))

def shift(model, x, y):
    return x + 0.1

sharded_influence(model, (x, y), (xt, yt), objective=ri.Robust(shift), batch_size={b}, chunk_size={b},
                  store=sys.argv[1], resume=True, progress=False)
""".format(n=N_TRAIN, b=BATCH)


def setting():
    torch.manual_seed(0)
    model = MLP(20, 5, hidden=(32,)).eval()
    x, y = torch.randn(N_TRAIN, 20), torch.randint(0, 5, (N_TRAIN,))
    xt, yt = torch.randn(40, 20), torch.randint(0, 5, (40,))
    return model, (x, y), (xt, yt)


def shift(model, x, y):
    return x + 0.1


def chunk_files(store: Path) -> int:
    return len(list(store.glob("scores_*.npy")))


def start_worker(tmp_path: Path, store: Path) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(store)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def kill_after(process: subprocess.Popen, store: Path, n_chunks: int, timeout: float = 120.0) -> int:
    """SIGKILL ``process`` as soon as ``store`` holds at least ``n_chunks`` chunks; return how many it held."""
    deadline = time.monotonic() + timeout
    while chunk_files(store) < n_chunks:
        assert process.poll() is None, f"worker exited early: {process.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "worker made no progress"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    return chunk_files(store)


@pytest.mark.slow
def test_sigkilled_runs_resume_to_the_scores_of_an_uninterrupted_run(tmp_path):
    total = N_TRAIN // BATCH
    store = tmp_path / "store"
    first = kill_after(start_worker(tmp_path, store), store, 1)
    second = kill_after(start_worker(tmp_path, store), store, first + 5)
    assert 1 <= first < second < total, (first, second, total)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the worker: the same kernels, bit for bit
    try:
        model, train, target = setting()
        run = dict(objective=ri.Robust(shift), batch_size=BATCH, chunk_size=BATCH, progress=False)
        resumed = sharded_influence(model, train, target, store=store, resume=True, **run)
        uninterrupted = sharded_influence(model, train, target, **run)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(resumed, uninterrupted)
    assert chunk_files(store) == total and not list(store.glob(".*.tmp"))


def test_resume_reads_finished_chunks_and_the_stored_attack_instead_of_recomputing(tmp_path, fgsm_attack):
    torch.manual_seed(1)
    model = MLP(6, 3, hidden=(8,)).double().eval()
    x, y = torch.randn(70, 6, dtype=torch.float64), torch.randint(0, 3, (70,))
    xt, yt = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
    for options in (dict(aggregate=True), dict(aggregate=False), dict(aggregate=False, projection_dim=12)):
        attack = fgsm_attack(0.1)
        store = tmp_path / str(len(list(tmp_path.iterdir())))
        run = dict(objective=ri.Robust(attack), batch_size=5, chunk_size=10, progress=False, store=store, **options)
        full = sharded_influence(model, (x, y), (xt, yt), **run)
        assert attack.calls == 1
        for chunk in (0, 3, 6):  # as if the run had died before writing them
            (store / f"scores_{chunk:06d}.npy").unlink()
        resumed = sharded_influence(model, (x, y), (xt, yt), resume=True, **run)
        assert torch.equal(resumed, full)
        assert attack.calls == 1  # the attacked targets / objective gradient came from the store
        assert torch.equal(sharded_influence(model, (x, y), (xt, yt), resume=True, **run), full)


def test_resume_refuses_a_store_of_another_model_or_other_options(tmp_path):
    torch.manual_seed(2)
    model = MLP(6, 3, hidden=(8,)).eval()
    x, y = torch.randn(30, 6), torch.randint(0, 3, (30,))
    target = (torch.randn(5, 6), torch.randint(0, 3, (5,)))
    run = dict(objective=ri.Utility(), batch_size=5, progress=False, store=tmp_path / "s")
    sharded_influence(model, (x, y), target, **run)
    with pytest.raises(ValueError, match="^store: .*already holds a store"):
        sharded_influence(model, (x, y), target, **run)
    with pytest.raises(ValueError, match=r"^store: .*options\.batch_size \(stored 5, now 10\)"):
        sharded_influence(model, (x, y), target, resume=True, **{**run, "batch_size": 10})
    with torch.no_grad():
        model.net[1].weight[0, 0] += 1.0
    with pytest.raises(ValueError, match="^store: .*differs in model_hash"):
        sharded_influence(model, (x, y), target, resume=True, **run)
    with pytest.raises(ValueError, match="^store: .*differs in data_hash"):
        sharded_influence(model, (x + 1, y), target, resume=True, **run)
