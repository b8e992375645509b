"""ChunkStore: atomic chunk files, manifest, identity checks on resume, fingerprints."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from robust_infl.models import MLP
from robust_infl.store import MANIFEST, ChunkStore, data_hash, model_hash

IDENTITY = {"model_hash": "m1", "data_hash": "d1", "method": "ip", "options": {"seed": 0, "aggregate": False}}


def open_store(directory, **changes):
    settings = dict(identity=IDENTITY, n_rows=10, arrays={"scores": (3,)}, dtype="float32", chunk_size=4)
    return ChunkStore(directory, **{**settings, **changes})


def test_chunks_round_trip_memory_mapped_and_the_manifest_lists_them(tmp_path):
    store = open_store(tmp_path / "s")
    assert store.n_chunks == 3 and store.rows(2) == (8, 10) and store.completed() == []
    values = np.arange(30, dtype=np.float32).reshape(10, 3)
    store.write_chunk(2, {"scores": values[8:]})
    store.write_chunk(0, {"scores": torch.from_numpy(values[:4])})
    assert store.completed() == [0, 2] and not store.is_complete(1)
    chunk = store.read_chunk(2)
    assert isinstance(chunk, np.memmap) and np.array_equal(chunk, values[8:])
    manifest = json.loads((tmp_path / "s" / MANIFEST).read_text())
    assert manifest["completed"] == [0, 2] and manifest["model_hash"] == "m1" and manifest["chunk_size"] == 4
    with pytest.raises(ValueError, match=r"^store: chunks \[1\]"):
        store.read()
    store.write_chunk(1, {"scores": values[4:8]})
    assert np.array_equal(store.read(), values)
    assert not list((tmp_path / "s").glob(".*.tmp"))


def test_whole_arrays_are_saved_and_loaded(tmp_path):
    store = open_store(tmp_path)
    assert store.load_array("objective_gradient") is None
    store.save_array("objective_gradient", torch.arange(5.0))
    assert np.array_equal(store.load_array("objective_gradient"), np.arange(5.0))
    with pytest.raises(ValueError, match="^name:"):
        store.save_array("scores", np.zeros(2))


def test_an_existing_store_needs_resume_and_a_matching_identity(tmp_path):
    store = open_store(tmp_path)
    store.write_chunk(1, {"scores": np.ones((4, 3), np.float32)})
    with pytest.raises(ValueError, match="^store: .* already holds a store"):
        open_store(tmp_path)
    resumed = open_store(tmp_path, resume=True)
    assert resumed.completed() == [1]
    changed = {**IDENTITY, "model_hash": "m2", "options": {"seed": 1, "aggregate": False}}
    with pytest.raises(ValueError, match=r"^store: .*model_hash \(stored \"m1\", now \"m2\"\); options.seed") as info:
        open_store(tmp_path, identity=changed, resume=True)
    assert "data_hash" not in str(info.value)
    with pytest.raises(ValueError, match="chunk_size"):
        open_store(tmp_path, chunk_size=5, resume=True)
    with pytest.raises(ValueError, match="arrays"):
        open_store(tmp_path, arrays={"scores": ()}, resume=True)


def test_stray_temporary_files_are_removed_and_foreign_folders_refused(tmp_path):
    store = open_store(tmp_path / "s")
    stray = tmp_path / "s" / ".scores_000000.npy.123.tmp"
    stray.write_bytes(b"half a chunk")
    assert store.completed() == []
    open_store(tmp_path / "s", resume=True)
    assert not stray.exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="^store: .* not empty"):
        open_store(tmp_path / "other", resume=True)
    with pytest.raises(ValueError, match="^store: .* holds no manifest"):
        open_store(tmp_path / "empty", writer=False)


def test_writes_check_names_and_shapes(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(ValueError, match="^values: scores of chunk 2"):
        store.write_chunk(2, {"scores": np.zeros((4, 3), np.float32)})
    with pytest.raises(ValueError, match="^values: expected arrays"):
        store.write_chunk(0, {"other": np.zeros((4, 3))})
    with pytest.raises(ValueError, match="^chunk_size:"):
        open_store(tmp_path / "x", chunk_size=0)
    with pytest.raises(TypeError, match="^store:"):
        open_store(3)
    with pytest.raises(ValueError, match="^arrays:"):
        open_store(tmp_path / "y", arrays={"Bad-Name": ()})


def test_fingerprints_change_with_every_weight_and_sample():
    model = MLP(4, 2, hidden=(3,))
    before = model_hash(model)
    assert before == model_hash(model) and len(before) == 64
    with torch.no_grad():
        model.net[1].bias[0] += 1e-6
    assert model_hash(model) != before

    x, y = torch.randn(50, 4), torch.randint(0, 2, (50,))
    reference = data_hash((x, y))
    assert reference == data_hash((x.clone(), y.clone()))
    x2 = x.clone()
    x2[17, 2] += 1e-6
    assert data_hash((x2, y)) != reference
    assert data_hash((x.double(), y)) != reference
    assert data_hash(TensorDataset(x, y)) == data_hash(TensorDataset(x.clone(), y))
    assert data_hash(TensorDataset(x, y)) != data_hash(TensorDataset(x[:49], y[:49]))
    with pytest.raises(TypeError, match="^data:"):
        data_hash(object())

