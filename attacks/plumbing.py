"""Torch plumbing shared by ``attacks``, ``robust_infl`` and ``defenses``: one implementation of each.

- :func:`per_sample_loss` (built from :func:`default_loss_fn`, which picks :func:`cross_entropy_loss` or
  :func:`binary_cross_entropy_loss` by the number of logits): the loss of every sample of a batch;
- :func:`model_device`, :func:`model_dtype`: where a model lives and in which floating dtype;
- :func:`eval_mode` / :func:`frozen_in_eval`: a model in eval mode (optionally with frozen parameters),
  every submodule's own mode restored on exit;
- :func:`seeded`, :func:`make_generator`: seeded random streams that leave the global ones untouched;
- :func:`atomic_write`: a file created or replaced so that a reader never sees it half-written.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .validation import check_output_shape

__all__ = [
    "per_sample_loss",
    "cross_entropy_loss",
    "binary_cross_entropy_loss",
    "default_loss_fn",
    "model_device",
    "model_dtype",
    "eval_mode",
    "frozen_in_eval",
    "seeded",
    "make_generator",
    "atomic_write",
]


def cross_entropy_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample cross-entropy of ``(n, C)`` logits against integer class labels; shape ``(n,)``."""
    return F.cross_entropy(outputs, targets.long(), reduction="none")


def binary_cross_entropy_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Per-sample binary cross-entropy of ``(n, 1)`` logits against 0/1 labels; shape ``(n,)``."""
    return F.binary_cross_entropy_with_logits(outputs[:, 0], targets.to(outputs.dtype), reduction="none")


def default_loss_fn(n_outputs: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The default per-sample loss: binary cross-entropy for one logit, cross-entropy otherwise."""
    return binary_cross_entropy_loss if n_outputs == 1 else cross_entropy_loss


# Reports and resumed runs identify a trainer's loss by a hash of this function's code and docstring
# (attacks.base.attack_settings): change either only together with a note that old runs do not resume.
def per_sample_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-sample loss, shape ``(n,)``: the engine's default (``robust_infl.objectives.default_loss_fn``),
    cross-entropy for >= 2 logits, BCE-with-logits for one logit ``(n, 1)`` (``(n,)`` is refused)."""
    check_output_shape(outputs, targets.shape[0])
    return default_loss_fn(outputs.shape[1])(outputs, targets)


def model_device(model: nn.Module, default: Optional[torch.device] = None) -> torch.device:
    """The device of the model's first parameter or buffer; ``default`` (CPU if None) when it has none."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu") if default is None else default


def model_dtype(model: nn.Module) -> torch.dtype:
    """The floating dtype of the model's parameters (float32 if it has none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@contextmanager
def eval_mode(model: nn.Module, *, frozen: bool = False) -> Iterator[None]:
    """Put ``model`` in eval mode; on exit (even on error) restore every submodule's own train / eval mode.

    With ``frozen=True`` the parameters are also frozen (``requires_grad=False``) inside, and each
    parameter's ``requires_grad`` and the ``.grad`` it held on entry are restored on exit.
    """
    modes = [(module, module.training) for module in model.modules()]
    params = list(model.parameters()) if frozen else []
    requires = [p.requires_grad for p in params]
    grads = [p.grad for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for module, training in modes:
            module.training = training
        for p, req, grad in zip(params, requires, grads):
            p.requires_grad_(req)
            p.grad = grad


def frozen_in_eval(model: nn.Module):
    """:func:`eval_mode` with frozen parameters: what an attack or an evaluation runs the model under."""
    return eval_mode(model, frozen=True)


@contextmanager
def seeded(seed: int, device: Optional[torch.device] = None, *, numpy: bool = True) -> Iterator[None]:
    """Seed torch's global generators (and numpy's with ``numpy=True``) with ``seed``; restore their states on exit.

    The CPU generator is always restored; the CUDA ones too when ``device`` is a CUDA device (every
    CUDA device's, since ``torch.manual_seed`` seeds them all). numpy is seeded with ``seed % 2**32``.
    For code that draws from the global generators (third-party attacks, ``reset_parameters``).
    """
    cuda = list(range(torch.cuda.device_count())) if device is not None and torch.device(device).type == "cuda" else []
    numpy_state = np.random.get_state() if numpy else None
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        try:
            if numpy:
                np.random.seed(seed % 2**32)
            yield
        finally:
            if numpy:
                np.random.set_state(numpy_state)


def make_generator(seed: int, device: Union[str, torch.device] = "cpu") -> torch.Generator:
    """A fresh ``torch.Generator`` on ``device`` seeded with ``seed`` (the global generators are untouched)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _file_mode(path: Path) -> int:
    """The permission bits a replaced file keeps, or those of a new file under the current umask."""
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(
    path: Union[str, os.PathLike],
    write: Callable[[Any], None],
    *,
    durable: bool = True,
    by_path: bool = False,
) -> Path:
    """Create or replace ``path`` atomically: ``write`` fills a temporary file next to it, renamed over ``path``.

    ``write`` receives the temporary file open for binary writing (a ``BinaryIO``), or with
    ``by_path=True`` its :class:`~pathlib.Path` (for writers that open the file themselves, e.g. a
    numpy memmap). ``durable``: fsync the file before the rename, so that it also survives a crash of
    the machine (the rename alone makes it survive the death of the process). The parent folders are
    created; the file gets the permissions an ordinary ``open(path, "w")`` would give it. On an error
    the temporary file is removed and ``path`` is left as it was, and an ``OSError`` (a full disk) names
    ``path`` as its ``filename``. Returns ``path`` as a ``Path``.
    """
    path = Path(path)
    try:
        return _atomic_write(path, write, durable, by_path)
    except OSError as err:
        own_temporary = err.filename is not None and Path(os.fsdecode(err.filename)).name.startswith(f".{path.name}.")
        if err.errno is None or not (err.filename is None or own_temporary):
            raise
        raise type(err)(err.errno, err.strerror, os.fspath(path)) from err


def _atomic_write(path: Path, write: Callable[[Any], None], durable: bool, by_path: bool) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _file_mode(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if not by_path:
                write(handle)
                handle.flush()
        if by_path:
            write(Path(tmp))
        if durable:
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path

