"""A resumable on-disk store of per-training-sample results: chunked ``.npy`` files plus a manifest.

Layout of a store directory::

    manifest.json                  identity (model hash, data hash, method, options) and layout
    scores_000000.npy ...          one file per chunk of ``chunk_size`` training samples and array
    <name>.npy                     whole arrays a run needs again on resume (e.g. the objective gradient)
    <file>.npy.sha256              the SHA-256 of each of those files, written after it

Results on disk are tamper-evident: a file is read back only if its SHA-256 still matches the one
written beside it, and its values are finite; otherwise reading refuses with a ``ValueError`` naming
the file. A data file without its checksum (the process was killed between the two) counts as not
written, and is computed again on resume.

Every file is written to a temporary name in the same directory and then renamed with
``os.replace``, so a file that exists is complete: a process killed at any point leaves only
complete chunks behind (and stray ``*.tmp`` files, removed when the store is next opened). The
chunk files are the record of which chunks are done; the manifest's ``completed`` list is refreshed
by the writing process (rank 0 when several processes share a store) for people to read.

Opening a directory that holds a store needs ``resume=True``, and then the stored identity and
layout must equal this run's: any difference raises ``ValueError`` naming each field that differs.
Chunks are read back memory-mapped (``np.load(mmap_mode="r")``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from attacks.plumbing import atomic_write
from attacks.validation import check_bool, check_int
from robust_infl.inputs import TargetSet
from robust_infl.io import LOCK_FILE, checksum_path, verify_checksum, write_checksum

__all__ = ["ChunkStore", "model_hash", "data_hash", "check_store_folder", "MANIFEST", "FORMAT_VERSION"]

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: a SHA-256 beside every data file
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
# A Dataset is fingerprinted by its length and at most this many evenly spaced items.
DATASET_PROBES = 64


def _hash_tensor(digest: "hashlib._Hash", tensor: Tensor) -> None:
    array = tensor.detach().cpu().contiguous()
    digest.update(f"{array.dtype}|{tuple(array.shape)}|".encode())
    digest.update(array.reshape(-1).view(torch.uint8).numpy().tobytes() if array.numel() else b"")


def model_hash(model: nn.Module) -> str:
    """SHA-256 of the model's state dict (names, dtypes, shapes and bytes of every entry)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + b"\0")
        if isinstance(value, Tensor):
            _hash_tensor(digest, value)
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def data_hash(*parts: Any) -> str:
    """SHA-256 fingerprint of data: tensors and arrays (all bytes), tuples of them, and Datasets.

    A ``Dataset`` contributes its class name, its length and the items at up to
    :data:`DATASET_PROBES` evenly spaced indices (a streamed data set is not read in full).
    """
    digest = hashlib.sha256()

    def add(part: Any) -> None:
        if part is None:
            digest.update(b"None|")
        elif isinstance(part, Tensor):
            _hash_tensor(digest, part)
        elif isinstance(part, np.ndarray):
            _hash_tensor(digest, torch.from_numpy(np.ascontiguousarray(part)))
        elif isinstance(part, (tuple, list)):
            digest.update(f"seq{len(part)}|".encode())
            for item in part:
                add(item)
        elif isinstance(part, Dataset):
            n = len(part)  # type: ignore[arg-type]
            digest.update(f"{type(part).__qualname__}|{n}|".encode())
            for index in sorted(set(np.linspace(0, n - 1, min(n, DATASET_PROBES)).round().astype(int).tolist())):
                add(part[index])
        elif isinstance(part, (int, float, str, bool)):
            digest.update(f"{type(part).__name__}:{part!r}|".encode())
        elif isinstance(part, TargetSet):
            add((part.x, part.y, part.s))
        else:
            raise TypeError(f"data: cannot fingerprint a {type(part).__name__}")

    for part in parts:
        add(part)
    return digest.hexdigest()


def _differences(stored: Mapping[str, Any], wanted: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(stored) | set(wanted)):
        a, b = stored.get(key, "<missing>"), wanted.get(key, "<missing>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} (stored {_short(a)}, now {_short(b)})")
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _load_npy(path: Path) -> np.ndarray:
    """A numeric ``.npy`` file of the store, memory-mapped, after checking its checksum and that its values
    are finite; ``ValueError`` naming the file otherwise (changed, truncated, foreign or pickled object
    data, which is never loaded)."""
    verify_checksum(path, "store")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"store: {path} is not a numeric .npy array written by this store ({err}); "
                         "delete the store directory (or that file) and score again") from err
    if array.dtype.kind in "fc" and not np.isfinite(array).all():
        raise ValueError(f"store: {path} holds {int((~np.isfinite(array)).sum())} NaN or infinite value(s); "
                         "delete that file to compute it again")
    return array


def _written(path: Path) -> bool:
    """Whether the data file ``path`` and its checksum both exist (the checksum is written last)."""
    return path.exists() and checksum_path(path).exists()


def check_store_folder(directory: Union[str, os.PathLike], resume: bool) -> None:
    """Before any compute: ``ValueError`` naming ``store`` when ``directory`` holds a store and ``resume``
    is False, or is a non-empty folder that holds no store (the checks :class:`ChunkStore` makes)."""
    directory = Path(directory)
    if (directory / MANIFEST).exists():
        if not resume:
            raise ValueError(f"store: {directory} already holds a store ({MANIFEST}); pass resume=True "
                             "(--resume) to continue it, or choose another directory")
    elif directory.is_dir() and any(p.name != LOCK_FILE for p in directory.iterdir()):
        raise ValueError(f"store: {directory} is not empty and holds no {MANIFEST}; choose an empty directory")


class ChunkStore:
    """Chunked, memory-mapped arrays with one row per training sample, plus whole named arrays.

    Args:
        directory: the store's folder (created if missing).
        identity: what the results depend on, JSON-serialisable: e.g. ``{"model_hash": ...,
            "data_hash": ..., "method": ..., "options": {...}}``.
        n_rows: number of training samples.
        arrays: ``name -> row shape`` of each chunked array, e.g. ``{"scores": ()}`` or
            ``{"scores": (n_target,)}``; a chunk is complete when all its arrays are written.
        dtype: numpy dtype of the chunked arrays.
        chunk_size: training samples per chunk (the last chunk may be shorter).
        resume: continue a store found in ``directory`` (it must match); without it, a directory
            that already holds a store is refused.
        writer: this process creates the manifest and refreshes its ``completed`` list (only one
            process per store should; other processes need the manifest to exist already).
    """

    def __init__(
        self,
        directory: Union[str, os.PathLike],
        *,
        identity: Mapping[str, Any],
        n_rows: int,
        arrays: Mapping[str, tuple[int, ...]],
        dtype: Union[str, np.dtype],
        chunk_size: int,
        resume: bool = False,
        writer: bool = True,
    ):
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(f"store: expected a directory path, got {type(directory).__name__}")
        check_bool(resume, "resume")
        check_int(chunk_size, "chunk_size", minimum=1)
        for name in arrays:
            if not _NAME.match(name):
                raise ValueError(f"arrays: names must match {_NAME.pattern}, got {name!r}")
        self.directory = Path(directory)
        self.n_rows = int(n_rows)
        self.chunk_size = chunk_size
        self.arrays = {name: tuple(int(d) for d in shape) for name, shape in arrays.items()}
        self.dtype = np.dtype(dtype)
        self.writer = writer
        self._done: set[int] = set()
        self.manifest = {
            "format_version": FORMAT_VERSION,
            **json.loads(json.dumps(dict(identity))),
            "n_rows": self.n_rows,
            "chunk_size": chunk_size,
            "arrays": {name: list(shape) for name, shape in self.arrays.items()},
            "dtype": self.dtype.str,
        }
        self._open(resume)

    @property
    def n_chunks(self) -> int:
        """Number of chunks."""
        return math.ceil(self.n_rows / self.chunk_size)

    def rows(self, chunk: int) -> tuple[int, int]:
        """``(start, stop)``: the training samples of ``chunk``."""
        start = chunk * self.chunk_size
        return start, min(start + self.chunk_size, self.n_rows)

    def _open(self, resume: bool) -> None:
        path = self.directory / MANIFEST
        check_store_folder(self.directory, resume)
        if path.exists():
            stored = json.loads(path.read_text())
            stored.pop("completed", None)
            differences = _differences(stored, self.manifest)
            if differences:
                raise ValueError(
                    f"store: the store in {self.directory} was made for another run; differs in "
                    + "; ".join(differences)
                )
            if self.writer:
                for stray in self.directory.glob(".*.tmp"):
                    stray.unlink(missing_ok=True)
                self.refresh_manifest(rescan=True)
            return
        if not self.writer:
            raise ValueError(f"store: {self.directory} holds no {MANIFEST}; the writing process creates it first")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.refresh_manifest()

    def _chunk_path(self, name: str, chunk: int) -> Path:
        return self.directory / f"{name}_{chunk:06d}.npy"

    def is_complete(self, chunk: int) -> bool:
        """Whether every chunked array of ``chunk`` has been written."""
        return all(_written(self._chunk_path(name, chunk)) for name in self.arrays)

    def completed(self) -> list[int]:
        """Indices of the complete chunks."""
        return [chunk for chunk in range(self.n_chunks) if self.is_complete(chunk)]

    def write_chunk(self, chunk: int, values: Mapping[str, Union[np.ndarray, Tensor]]) -> None:
        """Write the arrays of ``chunk`` (one entry per chunked array, ``rows(chunk)`` rows each).

        Each file is written atomically, then its checksum; the chunk counts as complete once all of
        them exist.
        """
        if set(values) != set(self.arrays):
            raise ValueError(f"values: expected arrays {sorted(self.arrays)}, got {sorted(values)}")
        start, stop = self.rows(chunk)
        for name, shape in self.arrays.items():
            array = values[name]
            if isinstance(array, Tensor):
                array = array.detach().cpu().numpy()
            if array.shape != (stop - start, *shape):
                raise ValueError(f"values: {name} of chunk {chunk} must have shape {(stop - start, *shape)}, got {array.shape}")

            def write(tmp: Path, array=array) -> None:
                mapped = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=array.shape)
                mapped[...] = array
                mapped.flush()
                del mapped

            write_checksum(atomic_write(self._chunk_path(name, chunk), write, by_path=True))
        self._done.add(chunk)
        if self.writer:
            self.refresh_manifest()

    def read_chunk(self, chunk: int, name: str = "scores") -> np.ndarray:
        """The memory-mapped array ``name`` of a complete ``chunk``."""
        start, stop = self.rows(chunk)
        array = _load_npy(self._chunk_path(name, chunk))
        if array.shape != (stop - start, *self.arrays[name]) or array.dtype != self.dtype:
            raise ValueError(f"store: {self._chunk_path(name, chunk)} has shape {array.shape}, dtype {array.dtype}; "
                             f"expected {(stop - start, *self.arrays[name])}, {self.dtype}")
        return array

    def read(self, name: str = "scores", chunks: Optional[Iterable[int]] = None) -> np.ndarray:
        """The rows of ``chunks`` (all chunks by default, which must then be complete), concatenated."""
        chunks = range(self.n_chunks) if chunks is None else list(chunks)
        missing = [chunk for chunk in chunks if not self.is_complete(chunk)]
        if missing:
            raise ValueError(f"store: chunks {missing[:10]} of {self.directory} are not written yet")
        parts = [self.read_chunk(chunk, name) for chunk in chunks]
        if not parts:
            return np.empty((0, *self.arrays[name]), dtype=self.dtype)
        return np.concatenate(parts)

    def save_array(self, name: str, array: Union[np.ndarray, Tensor]) -> None:
        """Save a whole array (e.g. the objective gradient) atomically as ``<name>.npy``."""
        if not _NAME.match(name) or name in self.arrays:
            raise ValueError(f"name: must match {_NAME.pattern} and differ from the chunked arrays, got {name!r}")
        if isinstance(array, Tensor):
            array = array.detach().cpu().numpy()

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, array)

        write_checksum(atomic_write(self.directory / f"{name}.npy", write, by_path=True))

    def load_array(self, name: str) -> Optional[np.ndarray]:
        """The array saved as ``name`` (memory-mapped), or ``None`` if there is none (or not its checksum yet)."""
        path = self.directory / f"{name}.npy"
        return _load_npy(path) if _written(path) else None

    def refresh_manifest(self, rescan: bool = False) -> None:
        """Rewrite ``manifest.json`` (atomically) with the chunks known to be complete.

        Those are the chunks written through this object, and with ``rescan=True`` every chunk
        whose files exist (e.g. written by other processes).
        """
        if rescan:
            self._done.update(self.completed())
        text = json.dumps({**self.manifest, "completed": sorted(self._done)}, indent=1)
        # Not fsynced: the chunk files, not this list, record what is done.
        atomic_write(self.directory / MANIFEST, lambda tmp: tmp.write_text(text), durable=False, by_path=True)
