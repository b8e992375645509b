"""Results on disk are tamper-evident: every store file carries a SHA-256 checked when it is read back,
and its values must be finite; a changed file is refused with one line naming it."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from robust_infl.io import LOCK_FILE, checksum_path, lock_folder, write_checksum
from robust_infl.store import MANIFEST, ChunkStore, check_store_folder

SETTINGS = dict(identity={"method": "ip"}, n_rows=6, arrays={"scores": ()}, dtype="float32", chunk_size=3)


def written_store(tmp_path):
    store = ChunkStore(tmp_path / "st", **SETTINGS)
    store.write_chunk(0, {"scores": np.arange(3, dtype=np.float32)})
    store.write_chunk(1, {"scores": np.arange(3, 6, dtype=np.float32)})
    store.save_array("gradient", np.ones(4, dtype=np.float32))
    return tmp_path / "st"


def test_every_file_has_its_checksum_and_reads_back(tmp_path):
    folder = written_store(tmp_path)
    for name in ("scores_000000.npy", "scores_000001.npy", "gradient.npy"):
        assert checksum_path(folder / name).read_text().strip() == hashlib.sha256(
            (folder / name).read_bytes()).hexdigest()
    store = ChunkStore(folder, resume=True, **SETTINGS)
    np.testing.assert_array_equal(store.read(), np.arange(6, dtype=np.float32))
    np.testing.assert_array_equal(store.load_array("gradient"), np.ones(4, dtype=np.float32))


def test_a_hand_edited_chunk_is_refused_naming_the_file(tmp_path):
    folder = written_store(tmp_path)
    chunk = folder / "scores_000001.npy"
    values = np.load(chunk)
    values[1] = 1e6
    np.save(chunk, values)
    store = ChunkStore(folder, resume=True, **SETTINGS)
    with pytest.raises(ValueError, match=r"^store: '.*scores_000001.npy' was changed after it was written"):
        store.read()
    with pytest.raises(ValueError, match=r"^store: '.*scores_000001.npy' was changed"):
        store.read_chunk(1)
    np.testing.assert_array_equal(store.read_chunk(0), np.arange(3, dtype=np.float32))  # the others still read


def test_a_non_finite_value_is_refused_even_with_a_matching_checksum(tmp_path):
    folder = written_store(tmp_path)
    chunk = folder / "scores_000000.npy"
    values = np.load(chunk)
    values[0] = np.nan
    np.save(chunk, values)
    write_checksum(chunk)
    with pytest.raises(ValueError, match=r"^store: .*scores_000000.npy holds 1 NaN or infinite value"):
        ChunkStore(folder, resume=True, **SETTINGS).read()


def test_a_changed_whole_array_is_refused(tmp_path):
    folder = written_store(tmp_path)
    np.save(folder / "gradient.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match=r"^store: '.*gradient.npy' was changed"):
        ChunkStore(folder, resume=True, **SETTINGS).load_array("gradient")


def test_a_file_without_its_checksum_counts_as_not_written(tmp_path):
    """A process killed between a chunk and its checksum: the chunk is computed again on resume."""
    folder = written_store(tmp_path)
    checksum_path(folder / "scores_000001.npy").unlink()
    checksum_path(folder / "gradient.npy").unlink()
    store = ChunkStore(folder, resume=True, **SETTINGS)
    assert store.completed() == [0]
    assert store.load_array("gradient") is None
    with pytest.raises(ValueError, match=r"chunks \[1\] .* are not written yet"):
        store.read()


def test_a_store_of_the_format_without_checksums_is_refused_by_name(tmp_path):
    folder = written_store(tmp_path)
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(ValueError, match=r"differs in format_version \(stored 1, now 2\)"):
        ChunkStore(folder, resume=True, **SETTINGS)


def test_the_folder_checks_run_without_opening_a_store(tmp_path):
    folder = written_store(tmp_path)
    with pytest.raises(ValueError, match=r"^store: .* already holds a store \(manifest.json\); pass resume=True"):
        check_store_folder(folder, resume=False)
    check_store_folder(folder, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"^store: .*other is not empty and holds no manifest.json"):
        check_store_folder(tmp_path / "other", resume=True)


def test_a_locked_empty_folder_can_hold_a_new_store(tmp_path):
    with lock_folder(tmp_path / "st", "store"):
        assert (tmp_path / "st" / LOCK_FILE).exists()
        ChunkStore(tmp_path / "st", **SETTINGS).write_chunk(0, {"scores": np.zeros(3, dtype=np.float32)})
    assert not (tmp_path / "st" / LOCK_FILE).exists()
