"""Atomic file outputs and safe loading of tensors: one place for everything the toolkit writes or reads.

Every writer goes through :func:`atomic_write` (:func:`attacks.plumbing.atomic_write`): the content is written to a temporary file in the
destination's folder, flushed to disk (``fsync``) and renamed over the destination with
``os.replace``. A reader therefore sees the old file or the complete new one, never a half-written
file, even if the process is killed mid-write; the temporary file is removed on error.

:func:`safe_load` reads tensors and state dicts with ``torch.load(weights_only=True)``: a file
carrying pickled code (any object other than tensors, containers and plain values) is refused
with a ``ValueError`` before anything in it runs. :func:`safe_load_npz` reads named arrays from a
numpy ``.npz`` file by the same rule (``allow_pickle=False``).

:func:`lock_folder` gives one run at a time an output folder; :func:`output_errors` turns a failed write
(a full disk, a lost permission) into one line naming the argument and the file; :func:`write_checksum` /
:func:`verify_checksum` make stored results tamper-evident (SHA-256 beside each file).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import pickle
import socket
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping, Union

import numpy as np
import torch

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no folder locks
    fcntl = None

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
    "safe_load_npz",
    "check_output_file",
    "check_output_folder",
    "atomic_save_npys",
    "lock_folder",
    "LOCK_FILE",
    "StaleLockWarning",
    "output_errors",
    "held_output",
    "file_sha256",
    "write_checksum",
    "verify_checksum",
    "checksum_path",
]

PathLike = Union[str, os.PathLike]


def _shown(path: PathLike) -> str:
    """``path`` for a one-line message: quoted, and shortened in the middle beyond 120 characters."""
    text = os.fspath(path)
    return repr(text if len(text) <= 120 else f"{text[:60]}...{text[-57:]}")


def _check_path_text(path: Any, name: str, what: str) -> Path:
    """``path`` as a Path; ``TypeError`` / ``ValueError`` naming ``name`` for a non-path, an empty path, or a
    name longer than the file system allows."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a {what} path, got {type(path).__name__}")
    text = os.fspath(path)
    if isinstance(text, bytes) or not text.strip():
        raise ValueError(f"{name}: expected a {what} path, got {text!r}")
    try:
        limit = os.pathconf(_existing_ancestor(Path(text)), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    long = [part for part in Path(text).parts if len(os.fsencode(part)) > limit]
    if long:
        raise ValueError(f"{name}: the name {_shown(long[0])} is longer than the file system allows "
                         f"({len(os.fsencode(long[0]))} bytes, at most {limit})")
    return Path(text)


def _existing_ancestor(path: Path) -> Path:
    for parent in (path, *path.parents):
        try:
            if parent.is_dir():
                return parent
        except OSError:
            continue
    return Path(".")


def _probe_folder(folder: Path, name: str, shown: str) -> None:
    """Create ``folder`` (and its parents) and write and remove a probe file in it; ``ValueError`` naming
    ``name`` when that fails (a file in the way, a link to nowhere, no permission, a read-only file system)."""
    for parent in (folder, *folder.parents):
        if parent.is_symlink() and not parent.exists():
            raise ValueError(f"{name}: cannot write {shown!r}: {os.fspath(parent)!r} is a symbolic link to "
                             f"{os.readlink(parent)!r}, which does not exist")
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
    path = _check_path_text(path, name, "file")
    shown = os.fspath(path)
    if path.is_dir():
        raise ValueError(f"{name}: {shown!r} is a folder, expected a file path")
    _probe_folder(path.parent, name, shown)
    return path


def check_output_folder(path: PathLike, name: str) -> Path:
    """Check, before any compute, that ``path`` is (or can be created as) a writable folder; it is created.

    Raises ``ValueError`` starting with ``name`` when ``path`` is empty, a file, a link to nowhere,
    longer than the file system allows, or cannot be written.
    """
    path = _check_path_text(path, name, "folder")
    shown = os.fspath(path)
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


def _check_input_file(path: Any, name: str, what: str) -> str:
    """``path`` shown as text if it names a regular file; ``TypeError`` / ``ValueError`` starting with ``name``."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a file path, got {type(path).__name__}")
    shown = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{name}: {shown!r} is a folder, expected a file")
    if not os.path.exists(path):
        raise ValueError(f"{name}: no such file: {shown!r}")
    if not os.path.isfile(path):  # a device (/dev/null), a FIFO (reading it would block), a socket
        raise ValueError(f"{name}: {shown!r} is not a regular file (a device, pipe or socket), expected {what}")
    return shown


def safe_load(path: PathLike, name: str = "path") -> Any:
    """Tensors / a state dict saved with ``torch.save``, read with ``torch.load(weights_only=True)`` on the CPU.

    Raises ``ValueError`` starting with ``name`` when ``path`` is not a file, is not a torch file,
    or holds pickled objects other than tensors and plain containers (such a file could run code
    when unpickled; it is refused before anything in it runs).
    """
    shown = _check_input_file(path, name, "a file saved with torch.save")
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


def safe_load_npz(path: PathLike, name: str = "path", keys: tuple = ("X", "y")) -> tuple:
    """The arrays ``keys`` of the numpy ``.npz`` file ``path`` (``numpy.savez(path, X=..., y=...)``), in that order.

    Read with ``allow_pickle=False``: object arrays (pickled Python objects, which could run code when
    loaded) are refused. Raises ``ValueError`` starting with ``name`` when ``path`` is not a readable
    ``.npz`` file or lacks one of ``keys`` (the message lists the arrays it holds).
    """
    shown = _check_input_file(path, name, "a .npz file")
    try:
        archive = np.load(path, allow_pickle=False)
    except Exception as err:  # noqa: BLE001 - np.load raises many types for a file that is not an archive
        raise ValueError(f"{name}: cannot read {shown!r} as a .npz file ({type(err).__name__}: {err})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{name}: {shown!r} holds a single array (.npy), expected a .npz of "
                         f"{', '.join(keys)} (numpy.savez(path, {', '.join(f'{k}=...' for k in keys)}))")
    with archive:
        missing = [key for key in keys if key not in archive.files]
        if missing:
            raise ValueError(f"{name}: {shown!r} has no array {missing[0]!r} (it holds: "
                             f"{', '.join(archive.files) or 'nothing'}); save it with numpy.savez(path, "
                             f"{', '.join(f'{k}=...' for k in keys)})")
        arrays = []
        for key in keys:
            try:
                arrays.append(archive[key])
            except ValueError as err:  # object arrays under allow_pickle=False
                raise ValueError(f"{name}: refused to load {key!r} from {shown!r}: it holds Python objects, "
                                 f"which could run code when loaded ({err})") from None
            except Exception as err:  # noqa: BLE001 - a damaged member
                raise ValueError(f"{name}: cannot read {key!r} from {shown!r} ({type(err).__name__}: {err})") from None
    return tuple(arrays)


def atomic_save_npys(arrays: Mapping[PathLike, Any]) -> list:
    """Save several arrays together (:func:`atomic_save_npy`): every file is written in full before any of
    them is renamed into place, so a failure (a full disk) leaves all of them as they were, none half
    replaced. Returns the paths."""
    items = list(arrays.items())
    if not items:
        return []
    (path, array), rest = items[0], dict(items[1:])
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()

    def write(handle) -> None:
        np.save(handle, np.asarray(array), allow_pickle=False)
        handle.flush()
        atomic_save_npys(rest)  # the others are in place before this one is renamed

    return [atomic_write(path, write), *rest]


@contextmanager
def output_errors(name: str, folder: Union[PathLike, None] = None) -> Iterator[None]:
    """Turn an ``OSError`` raised while writing a file (a full disk, a lost permission, a vanished folder)
    into a ``ValueError`` of one line naming ``name`` and the file: ``"<name>: cannot write '<file>'
    (<reason>)"``. With ``folder``, only errors about files inside it are turned (an input that cannot be
    read keeps its own error). Files written before the error are complete (every writer here is
    atomic) and kept."""
    try:
        yield
    except OSError as err:
        if not err.filename or (folder is not None and not _inside(os.fsdecode(err.filename), folder)):
            raise
        reason = err.strerror or type(err).__name__
        if err.errno == errno.ENOSPC:
            reason += "; the files written before it are complete and kept"
        raise ValueError(f"{name}: cannot write {_shown(os.fsdecode(err.filename))} ({reason})") from err


def _inside(path: str, folder: PathLike) -> bool:
    """Whether ``path`` lies in ``folder`` (or is it)."""
    return os.path.join(os.path.abspath(path), "").startswith(os.path.join(os.path.abspath(os.fspath(folder)), ""))


LOCK_FILE = ".robust-infl.lock"


class StaleLockWarning(UserWarning):
    """An output folder held the lock of a run that ended without releasing it (killed); it was taken over."""


def _lock_owner(handle) -> dict:
    handle.seek(0)
    try:
        owner = json.loads(handle.read().decode("utf-8") or "null")
    except (ValueError, UnicodeDecodeError):
        owner = None
    return owner if isinstance(owner, dict) else {}


def _describe(owner: dict) -> str:
    host = owner.get("host")
    where = "" if host in (None, socket.gethostname()) else f" on {host}"
    return f"process {owner.get('pid', '?')}{where}" + (f" ({owner['command']})" if owner.get("command") else "")


@contextmanager
def lock_folder(folder: PathLike, name: str) -> Iterator[Path]:
    """Hold ``folder`` (created if missing) for this run: one run at a time per output folder.

    The lock is ``folder / LOCK_FILE`` holding this process's id, locked with ``fcntl.flock`` (which the
    system releases when the process ends, however it ends); it is removed on exit. A folder in use
    by a live run is refused with a ``ValueError`` naming ``name``, the folder and the process that
    holds it. A lock left by a run that was killed is detected (the file exists but nobody holds it),
    reported with a :class:`StaleLockWarning` naming that process, and taken over. Without ``fcntl``
    (Windows) no lock is taken.
    """
    folder = check_output_folder(folder, name)
    path = folder / LOCK_FILE
    if fcntl is None:  # pragma: no cover - Windows
        yield folder
        return
    with output_errors(name):
        while True:
            handle = open(path, "a+b")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _lock_owner(handle)
                handle.close()
                raise ValueError(f"{name}: {_shown(folder)} is in use by another run, {_describe(owner)}; wait for "
                                 "it to finish or use another folder") from None
            try:  # the file may have been removed by the holder between our open and our lock: retry then
                same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            handle.close()
    try:
        stale = _lock_owner(handle)
        if stale.get("pid") not in (None, os.getpid()):
            warnings.warn(f"{name}: {_shown(folder)} held the lock of {_describe(stale)}, which ended without "
                          "releasing it (killed?); taken over", StaleLockWarning, stacklevel=3)
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "command": " ".join(os.path.basename(a) if i == 0 else a
                                                     for i, a in enumerate(sys.argv))[:200]}).encode())
        handle.flush()
        yield folder
    finally:
        try:
            path.unlink(missing_ok=True)
        finally:
            handle.close()


@contextmanager
def held_output(folder: Union[PathLike, None], name: str = "out") -> Iterator[Union[Path, None]]:
    """An output folder held for a whole run: :func:`lock_folder` (one run at a time) and
    :func:`output_errors` (a failed write names ``name`` and the file); yields the folder. ``None`` (the run
    writes nothing) holds nothing and yields None."""
    if folder is None:
        yield None
        return
    with lock_folder(folder, name) as held, output_errors(name, held):
        yield held


def file_sha256(path: PathLike) -> str:
    """SHA-256 of the bytes of the file ``path`` (hex)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checksum_path(path: PathLike) -> Path:
    """Where :func:`write_checksum` keeps the checksum of ``path``: ``<path>.sha256`` beside it."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def write_checksum(path: PathLike) -> Path:
    """Write the SHA-256 of the file ``path`` beside it (:func:`checksum_path`), atomically."""
    return atomic_write_text(checksum_path(path), file_sha256(path) + "\n")


def verify_checksum(path: PathLike, name: str) -> None:
    """``ValueError`` naming ``name`` and the file unless ``path`` still has the SHA-256 written beside it."""
    stored = checksum_path(path)
    if not stored.is_file():
        raise ValueError(f"{name}: {_shown(path)} has no checksum ({stored.name} is missing); it was not written "
                         "by this version, or was copied without it")
    if stored.read_text().strip() != file_sha256(path):
        raise ValueError(f"{name}: {_shown(path)} was changed after it was written (its SHA-256 differs from "
                         f"{stored.name}); delete it to recompute it")
