"""The CLI's scale flags: `robust-infl score --store DIR --resume` after a real SIGKILL, and the same
command under `torchrun --nproc-per-node 2` (gloo on localhost), against one uninterrupted process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from defenses import cli

ROOT = Path(__file__).resolve().parents[2]
N_CHUNKS = 16  # 4096 training samples in chunks of 256
SCORE = ["score", "--data", "moons", "--n-train", "4096", "--n-val", "64", "--n-test", "64", "--epochs", "1",
         "--no-progress", "--top", "3"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def chunks_in(store: Path) -> int:
    return len(list(store.glob("scores_*.npy")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> np.ndarray:
    """The scores of one plain process (no store), single-threaded like the subprocesses."""
    out = tmp_path_factory.mktemp("one") / "scores.npy"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main([*SCORE, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return np.load(out)


def kill_after(command: list, store: Path, n_chunks: int) -> int:
    """Start ``command``, SIGKILL it once ``store`` holds ``n_chunks`` chunks; return how many it holds."""
    process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while chunks_in(store) < n_chunks:
        assert process.poll() is None, f"exited before the kill: {process.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    return chunks_in(store)


@pytest.mark.slow
def test_runs_killed_at_two_points_resume_to_the_scores_of_an_uninterrupted_run(tmp_path, uninterrupted):
    store = tmp_path / "store"
    command = [sys.executable, "-m", "defenses.cli", *SCORE, "--store", str(store), "--chunk-size", "256",
               "--resume", "--out", str(tmp_path / "scores.npy")]
    first = kill_after(command, store, 1)  # right after the first chunk
    second = kill_after(command, store, first + 3)  # a resumed run, killed a few chunks later
    assert 1 <= first < second < N_CHUNKS and not (tmp_path / "scores.npy").exists()

    resumed = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert chunks_in(store) == N_CHUNKS and not list(store.glob(".*.tmp"))
    assert np.array_equal(np.load(tmp_path / "scores.npy"), uninterrupted)


@pytest.mark.slow
def test_torchrun_with_two_processes_gives_the_one_process_scores(tmp_path, uninterrupted):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "defenses.cli", *SCORE, "--chunk-size", "256", "--store", str(tmp_path / "store"),
               "--out", str(tmp_path / "two.npy")]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved") == 1  # only rank 0 writes and prints
    assert chunks_in(tmp_path / "store") == N_CHUNKS
    two = np.load(tmp_path / "two.npy")
    assert two.shape == uninterrupted.shape == (4096,)
    assert np.abs(two - uninterrupted).max() <= 1e-6 * np.abs(uninterrupted).max()


def test_resume_needs_a_store(tmp_path, capsys):
    assert cli.main(["score", "--resume", "--out", str(tmp_path / "x.npy")]) == 2
    assert "resume: needs a store" in capsys.readouterr().err
