"""Atomic file outputs and safe loading of tensors: one place for everything the toolkit writes or reads.

Every writer goes through :func:`atomic_write` (:func:`attacks.plumbing.atomic_write`): the content is written to a temporary file in the
destination's folder, flushed to disk (``fsync``) and renamed over the destination with
``os.replace``. A reader therefore sees the old file or the complete new one, never a half-written
file, even if the process is killed mid-write; the temporary file is removed on error.

:func:`safe_load` reads tensors and state dicts with ``torch.load(weights_only=True)``: a file
carrying pickled code (any object other than tensors, containers and plain values) is refused
with a ``ValueError`` before anything in it runs.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from attacks.plumbing import atomic_write

__all__ = [
    "PathLike",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_tensor",
    "atomic_save_npy",
    "json_safe",
    "safe_load",
    "check_output_file",
    "check_output_folder",
]

PathLike = Union[str, os.PathLike]


def _probe_folder(folder: Path, name: str, shown: str) -> None:
    """Create ``folder`` (and its parents) and write and remove a probe file in it; ``ValueError`` naming
    ``name`` when that fails (a file in the way, no permission, a read-only file system)."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{name}: cannot write {shown!r}: {os.fspath(parent)!r} is a file, not a folder")
            break
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-probe.", suffix=".tmp")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"{name}: cannot write to {os.fspath(folder)!r} ({err.strerror or err})") from None


def check_output_file(path: PathLike, name: str) -> Path:
    """Check, before any compute, that a file can be written at ``path`` (its folder is created).

    Raises ``ValueError`` starting with ``name`` when ``path`` is a folder, a file stands where a
    folder on its way should be, or the folder cannot be written. Returns ``path`` as a Path.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a file path, got {type(path).__name__}")
    path, shown = Path(path), os.fspath(path)
    if path.is_dir():
        raise ValueError(f"{name}: {shown!r} is a folder, expected a file path")
    _probe_folder(path.parent, name, shown)
    return path


def check_output_folder(path: PathLike, name: str) -> Path:
    """Check, before any compute, that ``path`` is (or can be created as) a writable folder; it is created.

    Raises ``ValueError`` starting with ``name`` when ``path`` is a file or cannot be written.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a folder path, got {type(path).__name__}")
    path, shown = Path(path), os.fspath(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name}: {shown!r} is a file, expected a folder")
    _probe_folder(path, name, shown)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda handle: handle.write(data))


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats replaced by ``None`` (JSON has no NaN) and tuples as lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def atomic_write_json(path: PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON with sorted keys (non-finite floats as ``null``) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")


def atomic_save_tensor(path: PathLike, obj: Any) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (tensors, state dicts: what :func:`safe_load` reads back)."""
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def atomic_save_npy(path: PathLike, array: Any) -> Path:
    """``numpy.save`` of ``array`` (a tensor is moved to the CPU first) to ``path`` atomically."""
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    return atomic_write(path, lambda handle: np.save(handle, np.asarray(array), allow_pickle=False))


def safe_load(path: PathLike, name: str = "path") -> Any:
    """Tensors / a state dict saved with ``torch.save``, read with ``torch.load(weights_only=True)`` on the CPU.

    Raises ``ValueError`` starting with ``name`` when ``path`` is not a file, is not a torch file,
    or holds pickled objects other than tensors and plain containers (such a file could run code
    when unpickled; it is refused before anything in it runs).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a file path, got {type(path).__name__}")
    shown = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{name}: {shown!r} is a folder, expected a file")
    if not os.path.isfile(path):
        raise ValueError(f"{name}: no such file: {shown!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        blocked = next((line for line in lines if "GLOBAL" in line), None)
        if blocked is None:
            detail = next((line for line in lines if line.startswith("Unsupported")), lines[-1] if lines else "")
            raise ValueError(f"{name}: cannot read {shown!r} as a file saved with torch.save ({detail})") from None
        raise ValueError(
            f"{name}: refused to load {shown!r}: it holds pickled objects other than tensors and plain "
            f"containers, which could run code when loaded (torch.load weights_only=True: {blocked.rstrip('.')}). "
            "Save a state dict instead: torch.save(model.state_dict(), path)"
        ) from None
    except Exception as err:  # noqa: BLE001 - the weights-only unpickler runs no code; any failure is a bad file
        raise ValueError(
            f"{name}: cannot read {shown!r} as a file saved with torch.save ({type(err).__name__}: {err})"
        ) from None
