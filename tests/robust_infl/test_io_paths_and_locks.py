"""Output folders and files: one run at a time per folder (a lock, stale locks of killed runs reported),
paths refused before any compute with one line naming the argument, write errors (a full disk) naming
the argument and the file, and files written together never left half replaced."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import robust_infl.io as rio
from robust_infl.io import (LOCK_FILE, StaleLockWarning, atomic_save_npys, check_output_file, check_output_folder,
                            lock_folder, output_errors, safe_load)

ROOT = Path(__file__).resolve().parents[2]
HOLD = "import sys, time; from robust_infl.io import lock_folder\n" \
       "with lock_folder(sys.argv[1], 'out'):\n    print('held', flush=True); time.sleep(120)\n"


def holder(folder: Path) -> subprocess.Popen:
    """A separate process holding the lock of ``folder`` (until killed)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_folder_in_use_is_refused_naming_it_and_the_process(tmp_path):
    process = holder(tmp_path / "run")
    try:
        with pytest.raises(ValueError, match=rf"^out: '.*run' is in use by another run, process {process.pid}\b"):
            with lock_folder(tmp_path / "run", "out"):
                pass
    finally:
        process.kill()
        process.wait()


def test_the_lock_is_released_on_exit_even_on_error(tmp_path):
    with pytest.raises(RuntimeError):
        with lock_folder(tmp_path / "run", "out"):
            assert (tmp_path / "run" / LOCK_FILE).exists()
            raise RuntimeError("boom")
    assert not (tmp_path / "run" / LOCK_FILE).exists()
    with lock_folder(tmp_path / "run", "out"):
        pass


def test_a_stale_lock_of_a_killed_run_is_reported_and_taken_over(tmp_path):
    process = holder(tmp_path / "run")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (tmp_path / "run" / LOCK_FILE).exists()  # left behind by the killed run
    with pytest.warns(StaleLockWarning, match=rf"^out: '.*run' held the lock of process {process.pid}\b.*killed"):
        with lock_folder(tmp_path / "run", "out"):
            pass
    assert not (tmp_path / "run" / LOCK_FILE).exists()


@pytest.mark.parametrize("check, what", [(check_output_folder, "folder"), (check_output_file, "file")])
def test_an_empty_path_is_refused(check, what, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=rf"^out: expected a {what} path, got ''$"):
        check("", "out")
    assert list(tmp_path.iterdir()) == []


def test_a_name_longer_than_the_file_system_allows_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"^out: the name 'aaa.*' is longer than the file system allows "
                                         r"\(300 bytes, at most \d+\)$"):
        check_output_folder(tmp_path / ("a" * 300), "out")
    with pytest.raises(ValueError, match=r"^save-weights: the name .* is longer than the file system allows"):
        check_output_file(tmp_path / ("b" * 300) / "w.pt", "save-weights")


def test_a_dangling_symbolic_link_is_named_as_such(tmp_path):
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"^out: cannot write '.*link': '.*link' is a symbolic link to '.*nowhere', "
                                         r"which does not exist$"):
        check_output_folder(tmp_path / "link", "out")


@pytest.mark.parametrize("special", ["/dev/null", "fifo"])
def test_a_device_or_pipe_is_not_read_as_weights(special, tmp_path):
    if special == "fifo":
        special = tmp_path / "fifo"
        os.mkfifo(special)
    with pytest.raises(ValueError, match=r"^weights: '.*' is not a regular file \(a device, pipe or socket\)"):
        safe_load(special, name="weights")


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_names_the_argument_and_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(np, "save", no_space)
    with pytest.raises(ValueError, match=r"^out: cannot write '.*s.npy' \(No space left on device; the files "
                                         r"written before it are complete and kept\)$"):
        with output_errors("out"):
            rio.atomic_save_npy(tmp_path / "s.npy", np.zeros(3))
    assert list(tmp_path.iterdir()) == []  # no temporary file left


def test_arrays_saved_together_are_all_replaced_or_none(tmp_path, monkeypatch):
    first, second = tmp_path / "s.npy", tmp_path / "s_rows.npy"
    atomic_save_npys({first: np.zeros(3), second: np.arange(3)})
    real_save, calls = np.save, []

    def second_fails(handle, array, **kwargs):
        calls.append(array)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(handle, array, **kwargs)

    monkeypatch.setattr(np, "save", second_fails)
    with pytest.raises(OSError) as info:
        atomic_save_npys({first: np.ones(3), second: np.arange(3) + 10})
    assert info.value.filename == str(second)
    monkeypatch.setattr(np, "save", real_save)
    np.testing.assert_array_equal(np.load(first), np.zeros(3))  # the first was not replaced alone
    np.testing.assert_array_equal(np.load(second), np.arange(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npy", "s_rows.npy"]


def test_a_weights_write_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(ValueError, match=r"^save-weights: cannot write '.*w.pt' \(No space left"):
        with output_errors("save-weights"):
            rio.atomic_save_tensor(tmp_path / "w.pt", {"w": torch.ones(1)})


def test_locking_waits_for_nothing(tmp_path):
    """Taking and refusing the lock is immediate (no polling)."""
    process = holder(tmp_path / "run")
    try:
        start = time.perf_counter()
        with pytest.raises(ValueError):
            with lock_folder(tmp_path / "run", "out"):
                pass
        assert time.perf_counter() - start < 1
    finally:
        process.kill()
        process.wait()
