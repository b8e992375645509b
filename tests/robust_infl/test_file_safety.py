"""Files: atomic outputs (never half written) and safe loading (a checkpoint carrying code is refused, unrun)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import robust_infl as ri
from defenses.report import write_report
from robust_infl.io import (atomic_save_npy, atomic_save_tensor, atomic_write, atomic_write_json, safe_load,
                            safe_load_npz, write_checksum)
from robust_infl.models import MLP
from robust_infl.store import ChunkStore

from conftest import CreatesMarkerWhenUnpickled


def malicious_checkpoint(tmp_path: Path, state: dict) -> tuple[Path, Path]:
    """A state dict plus a code-carrying object, saved with ``torch.save``; returns (file, marker)."""
    marker = tmp_path / "MARKER_code_ran"
    path = tmp_path / "checkpoint.pt"
    torch.save({**state, "extra": CreatesMarkerWhenUnpickled(marker)}, path)
    return path, marker


def test_the_malicious_file_really_runs_code_when_loaded_without_weights_only(tmp_path):
    path, marker = malicious_checkpoint(tmp_path, {"w": torch.ones(2)})
    torch.load(path, weights_only=False)  # what the toolkit must never do
    assert marker.exists()


def test_safe_load_refuses_pickled_code_and_never_runs_it(tmp_path):
    path, marker = malicious_checkpoint(tmp_path, {"w": torch.ones(2)})
    with pytest.raises(ValueError, match=r"^checkpoint: refused to load .*could run code.*GLOBAL") as info:
        safe_load(path, name="checkpoint")
    assert "\n" not in str(info.value)
    assert not marker.exists()


def test_tracin_refuses_a_malicious_checkpoint_path_and_never_runs_it(tmp_path):
    model = MLP(4, 3, hidden=(5,))
    path, marker = malicious_checkpoint(tmp_path, model.state_dict())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ValueError, match=r"^checkpoints: checkpoint 0: refused to load"):
        ri.influence(model, (x, y), (x, y), objective=ri.Utility(), method="tracin", checkpoints=[str(path)],
                     progress=False)
    assert not marker.exists()


def test_store_refuses_a_chunk_holding_pickled_objects_and_never_runs_it(tmp_path):
    settings = dict(identity={"method": "ip"}, n_rows=4, arrays={"scores": ()}, dtype="float32", chunk_size=4)
    ChunkStore(tmp_path / "store", **settings).write_chunk(0, {"scores": np.zeros(4, dtype=np.float32)})
    marker = tmp_path / "MARKER_code_ran"
    chunk = tmp_path / "store" / "scores_000000.npy"
    np.save(chunk, np.array([CreatesMarkerWhenUnpickled(marker)] * 4, dtype=object), allow_pickle=True)
    store = ChunkStore(tmp_path / "store", resume=True, **settings)
    with pytest.raises(ValueError, match="store: .*scores_000000.npy' was changed after it was written"):
        store.read()
    write_checksum(chunk)  # even with a matching checksum, the pickled objects are never loaded
    with pytest.raises(ValueError, match="store: .*scores_000000.npy is not a numeric .npy array"):
        store.read()
    assert not marker.exists()
    chunk.write_bytes(b"truncated")
    write_checksum(chunk)
    with pytest.raises(ValueError, match="scores_000000.npy is not a numeric .npy array"):
        store.read()


def test_safe_load_round_trips_a_state_dict_and_names_missing_or_corrupt_files(tmp_path):
    model = MLP(4, 3, hidden=(5,))
    path = atomic_save_tensor(tmp_path / "sub" / "weights.pt", model.state_dict())
    loaded = safe_load(path)
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match=r"^weights: no such file: '.*missing.pt'"):
        safe_load(tmp_path / "missing.pt", name="weights")
    (tmp_path / "corrupt.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"^weights: cannot read '.*corrupt.pt' as a file saved with torch.save"):
        safe_load(tmp_path / "corrupt.pt", name="weights")
    with pytest.raises(TypeError, match=r"^weights: expected a file path"):
        safe_load(3, name="weights")


def test_a_crash_while_writing_leaves_the_previous_file_intact_and_no_temporary_file(tmp_path):
    path = tmp_path / "report.json"
    atomic_write_json(path, {"score": 1.0, "nan": math.nan})
    assert json.loads(path.read_text()) == {"nan": None, "score": 1.0}

    def crash_half_way(handle):
        handle.write(b'{"score": 2')
        raise KeyboardInterrupt  # the process is stopped mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crash_half_way)
    assert json.loads(path.read_text()) == {"nan": None, "score": 1.0}
    assert os.listdir(tmp_path) == ["report.json"]


def test_numpy_outputs_are_written_atomically_and_read_back_without_pickle(tmp_path):
    scores = torch.randn(7, dtype=torch.float64)
    path = atomic_save_npy(tmp_path / "scores.npy", scores)
    assert np.array_equal(np.load(path, allow_pickle=False), scores.numpy())
    assert os.listdir(tmp_path) == ["scores.npy"]


def test_write_report_writes_every_file_atomically(tmp_path, monkeypatch):
    from defenses import report as report_module

    calls = []
    real = report_module.atomic_write_json

    def recording(path, obj):
        calls.append(Path(path).name)
        return real(path, obj)

    monkeypatch.setattr(report_module, "atomic_write_json", recording)
    entry = {"mean": 0.5, "std": 0.0, "n": 1}
    metrics = {m: entry for m in report_module.METRICS}
    report = {
        "config": {"data": "d", "model": "m", "attack": "pgd", "eps": 0.1, "norm": "linf", "method": "ip",
                   "mode": "prune", "retrain": "scratch", "trainer": "erm", "seeds": [0], "fractions": [0.1, 0.2]},
        "base": metrics,
        "summary": [{"recipe": "influence", "fraction": f, **metrics} for f in (0.1, 0.2)],
    }
    paths = write_report(report, tmp_path)
    assert calls == ["report.json"]
    assert sorted(os.listdir(tmp_path)) == ["report.json", "report.md", "robust_vs_cost.png", "robust_vs_fraction.png"]
    assert paths["plot"].read_bytes().startswith(b"\x89PNG") and paths["cost_plot"].read_bytes().startswith(b"\x89PNG")


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    """The temporary file's private mode (0600) must not leak into the result; a replaced file keeps its mode."""
    from robust_infl.io import atomic_write_text

    umask = os.umask(0o022)
    try:
        fresh = atomic_write_text(tmp_path / "report.md", "a")
        assert fresh.stat().st_mode & 0o777 == 0o644
        os.chmod(fresh, 0o640)
        atomic_write_text(fresh, "b")
        assert fresh.stat().st_mode & 0o777 == 0o640 and fresh.read_text() == "b"
    finally:
        os.umask(umask)


def test_safe_load_npz_reads_named_arrays_and_refuses_pickled_objects_unrun(tmp_path):
    X, y = np.arange(12, dtype=np.float32).reshape(3, 4), np.array([0, 1, 0])
    np.savez(tmp_path / "data.npz", X=X, y=y, extra=np.ones(2))
    read_X, read_y = safe_load_npz(tmp_path / "data.npz", "train")
    assert np.array_equal(read_X, X) and read_X.dtype == X.dtype and np.array_equal(read_y, y)
    marker = tmp_path / "MARKER_code_ran"
    np.savez(tmp_path / "evil.npz", X=X, y=np.array([CreatesMarkerWhenUnpickled(marker)] * 3, dtype=object))
    with pytest.raises(ValueError, match=r"^train: refused to load 'y' from .*evil.npz.*Python objects"):
        safe_load_npz(tmp_path / "evil.npz", "train")
    assert not marker.exists()


@pytest.mark.parametrize("make, message", [
    (lambda p: np.savez(p, X=np.ones((2, 2))), r"^trusted: '.*f.npz' has no array 'y' \(it holds: X\); save it with "
                                               r"numpy.savez\(path, X=..., y=...\)$"),
    (lambda p: p.write_text("not an archive"), r"^trusted: cannot read '.*f.npz' as a .npz file"),
    (lambda p: np.save(open(p, "wb"), np.ones(3)), r"^trusted: '.*f.npz' holds a single array \(.npy\)"),
    (lambda p: p.mkdir(), r"^trusted: '.*f.npz' is a folder, expected a file$"),
    (lambda p: None, r"^trusted: no such file: '.*f.npz'$"),
])
def test_safe_load_npz_names_the_argument_on_a_bad_file(tmp_path, make, message):
    make(tmp_path / "f.npz")
    with pytest.raises(ValueError, match=message):
        safe_load_npz(tmp_path / "f.npz", "trusted")
