"""Chunked scoring of the training set, sharded over torch.distributed processes, resumable on disk.

:func:`sharded_influence` takes the arguments of :func:`robust_infl.influence` and computes the
same scores in chunks of ``chunk_size`` consecutive training samples:

- **Sharding.** With an initialised ``torch.distributed`` process group (``torchrun``; ``gloo``
  on CPU, ``nccl`` on GPU) rank ``r`` of ``W`` scores a contiguous run of chunks (the chunk
  indices split into ``W`` near-equal consecutive parts), so its samples are one contiguous range.
  Whatever the target needs once (the objective gradient, or the attacked target inputs) is
  computed on rank 0 and broadcast, so every rank scores against the same numbers. The rows are
  gathered with ``all_gather`` (padded to the longest shard) and every rank returns all scores.
  Without a process group it runs in one process.
- **Store.** With ``store=DIR`` each finished chunk is written atomically to a
  :class:`~robust_infl.store.ChunkStore`, with the objective gradient / attacked targets; with
  ``resume=True`` the chunks already on disk are read instead of recomputed. A run killed at any
  point and resumed returns exactly the scores of an uninterrupted run. Several ranks may share one
  store (a folder they all see); the layout does not depend on the number of ranks, so a run can
  be resumed with another number of processes.
- **Methods.** ``"ip"`` (``aggregate=True``: one forward-mode pass per chunk;
  ``aggregate=False``: the ``(n_train, n_target)`` matrix from layer-factored per-sample gradients,
  or its random-projection estimate with ``projection_dim=k``) and ``"self"`` (squared gradient
  norms). The score of a sample depends only on that sample and on quantities fixed before the
  chunks are scored, which is what makes chunking and sharding exact; methods that need the whole
  training set at once (Hessians) are not offered here.

``chunk_size`` must be a multiple of ``batch_size``: every batch is then the batch a single
:func:`robust_infl.influence` call would form, and adversarial training points get the same seeds.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from tqdm.auto import tqdm

from attacks.base import plain_value
from attacks.validation import check_bool, check_int, check_seed
from robust_infl.engine import (
    ScoringProblem,
    TrainStream,
    directional_derivatives,
    flatten,
    objective_gradient,
    train_batches,
    unflatten,
)
from robust_infl.grad_norms import BatchGradients, batch_gradients, squared_gradient_norms
from robust_infl.ensembles import Ensemble
from robust_infl.objectives import Objective, PreparedObjective
from robust_infl.methods import check_aggregate
from robust_infl.options import ScoringOptions, scoring_options
from robust_infl.projection import RandomProjection
from robust_infl.store import ChunkStore, data_hash, model_hash
from robust_infl.preparation import prepared_problem

__all__ = [
    "sharded_influence",
    "init_process_group_from_env",
    "rank_and_world_size",
    "shard_chunks",
    "gather_rows",
    "broadcast_from_rank0",
    "broadcast_module_state",
    "SHARDED_METHODS",
]

SHARDED_METHODS = ("ip", "self")
CHUNK_BATCHES = 16  # default chunk_size = CHUNK_BATCHES * batch_size


def init_process_group_from_env(device: Optional[Union[str, torch.device]] = None) -> bool:
    """Initialise the default process group from ``torchrun``'s environment when it is needed.

    Does nothing (returns ``False``) when a group already exists or ``WORLD_SIZE`` is unset or 1.
    The backend is ``nccl`` for a CUDA ``device`` (and the rank's GPU becomes ``cuda:LOCAL_RANK``),
    ``gloo`` otherwise. Returns ``True`` when it initialised the group.
    """
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = device is not None and torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True


def rank_and_world_size(group: Optional[Any] = None) -> tuple[int, int]:
    """``(rank, world_size)`` in ``group`` (the default group), ``(0, 1)`` without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def shard_chunks(n_chunks: int, rank: int, world_size: int) -> range:
    """The chunks of ``rank``: the ``rank``-th of ``world_size`` near-equal consecutive runs of chunks."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: must lie in [0, {world_size}), got {rank}")
    base, extra = divmod(n_chunks, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def _comm_device(group: Optional[Any]) -> torch.device:
    """Where the backend of ``group`` takes tensors: the current GPU for nccl, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(local: Tensor, group: Optional[Any] = None) -> Tensor:
    """Concatenate every rank's ``local`` rows in rank order (``all_gather``, padded to the longest).

    Row shapes and dtypes must agree across ranks; the row counts may differ (also be 0). Returns
    the whole array on every rank, on ``local``'s device. Without torch.distributed: ``local``.
    """
    rank, world_size = rank_and_world_size(group)
    if world_size == 1:
        return local
    device = _comm_device(group)
    count = torch.tensor([local.shape[0]], device=device)
    counts = [torch.zeros_like(count) for _ in range(world_size)]
    dist.all_gather(counts, count, group=group)
    longest = max(int(c) for c in counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[: int(c)] for part, c in zip(parts, counts)]).to(local.device)


def broadcast_from_rank0(tensor: Tensor, group: Optional[Any] = None) -> Tensor:
    """Rank 0's ``tensor`` on every rank (other ranks pass a tensor of the same shape and dtype)."""
    _, world_size = rank_and_world_size(group)
    if world_size == 1:
        return tensor
    device = _comm_device(group)
    buffer = tensor.to(device).contiguous()
    dist.broadcast(buffer, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
    return buffer.to(tensor.device)


def broadcast_module_state(module: nn.Module, group: Optional[Any] = None) -> nn.Module:
    """Copy rank 0's parameters and buffers into ``module`` on every rank (in place; returns it).

    For models trained on every rank: afterwards all ranks score exactly the same weights.
    """
    _, world_size = rank_and_world_size(group)
    if world_size > 1:
        with torch.no_grad():
            for tensor in list(module.parameters()) + list(module.buffers()):
                tensor.copy_(broadcast_from_rank0(tensor.detach(), group))
    return module


def _raise_on_any_rank(error: Optional[str], group: Optional[Any]) -> None:
    """Raise ``ValueError(message)`` on every rank if any rank reports one (all ranks must call)."""
    _, world_size = rank_and_world_size(group)
    if world_size > 1:
        messages: list[Optional[str]] = [None] * world_size
        dist.all_gather_object(messages, error, group=group)
        error = next((m for m in messages if m), None)
    if error:
        raise ValueError(error)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    try:
        return torch.empty((), dtype=dtype).numpy().dtype
    except TypeError as err:
        raise ValueError(f"store: the model's dtype {dtype} cannot be stored as .npy") from err


def sharded_influence(
    model: nn.Module,
    train: Union[tuple[Tensor, Tensor], Dataset],
    target: Union[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
    *,
    objective: Objective,
    method: str = "ip",
    options: Optional[ScoringOptions] = None,
    projection_dim: Optional[int] = None,
    projection_seed: int = 0,
    store: Optional[Union[str, os.PathLike]] = None,
    resume: bool = False,
    chunk_size: Optional[int] = None,
    group: Optional[Any] = None,
    **keywords: Any,
) -> Tensor:
    """Scores of :func:`robust_infl.influence`, computed chunk by chunk, sharded and resumable.

    The arguments shared with :func:`robust_infl.influence` mean the same: the scoring options are
    the fields of :class:`~robust_infl.options.ScoringOptions`, given as ``options=ScoringOptions(...)``
    or as keywords of the same names (a keyword wins over ``options``); ``aggregate=False`` gives the
    ``(n_train, n_target)`` matrix (method ``"ip"``), ``damping`` is ignored by both methods here (as by
    ``influence``), ``progress`` shows one bar over the chunks. The others:

    Args:
        method: ``"ip"`` (harm, as ``influence(method="ip")``) or ``"self"`` (``||grad l_i||^2``,
            as ``influence(method="self")``).
        options: the scoring options (None: the defaults of :class:`~robust_infl.options.ScoringOptions`).
        projection_dim: with ``aggregate=False``, estimate the matrix from per-sample gradients
            projected to this many dimensions by a :class:`~robust_infl.projection.RandomProjection`
            seeded with ``projection_seed`` (the projected training gradients are stored too).
        store: a directory for a :class:`~robust_infl.store.ChunkStore` of the results.
        resume: continue the store found in ``store`` (it must have been made by the same model,
            data, method and options); chunks already written are read, not recomputed.
        chunk_size: training samples per chunk, a multiple of ``batch_size`` (default
            ``16 * batch_size``).
        group: the ``torch.distributed`` process group to shard over (default group if one is
            initialised, else one process).
        **keywords: any field of ``options`` by name; another name raises ``TypeError``.

    Returns:
        Every training sample's score (``(n_train,)`` or ``(n_train, n_target)``) on ``device``
        in the model's dtype, on every rank.
    """
    if isinstance(model, Ensemble):
        raise TypeError("model: sharded_influence scores one nn.Module; score an Ensemble with robust_infl.influence "
                        "(or shard each member and average the scores)")
    if method not in SHARDED_METHODS:
        raise ValueError(f"method: sharded scoring offers {', '.join(SHARDED_METHODS)}, got {method!r}")
    options, unknown = scoring_options(options, keywords)
    if unknown:
        raise TypeError(f"{sorted(unknown)[0]}: not an argument of sharded_influence (its scoring options are the "
                        f"fields of robust_infl.ScoringOptions)")
    check_bool(resume, "resume")
    check_aggregate(method, options.aggregate, objective)
    if projection_dim is not None:
        projection_dim = check_int(projection_dim, "projection_dim", minimum=1)
        if options.aggregate:
            raise ValueError("projection_dim: only used for train x target matrices; pass aggregate=False")
    projection_seed = check_seed(projection_seed)
    progress, aggregate = options.progress, options.aggregate
    options = dataclasses.replace(options, progress=False)  # the chunks show progress
    batch_size = options.batch_size
    chunk_size = CHUNK_BATCHES * batch_size if chunk_size is None else check_int(chunk_size, "chunk_size", minimum=1)
    if chunk_size % batch_size:
        raise ValueError(f"chunk_size: must be a multiple of batch_size={batch_size}, got {chunk_size}")
    if resume and store is None:
        raise ValueError("resume: needs a store directory to resume from; pass store=DIR")

    with prepared_problem(model, train, target, objective, options) as prepared:
        problem, train = prepared.problem, prepared.train
        label_outputs = prepared.label_outputs
        scorer = _Scorer(problem, train, label_outputs, method, aggregate, projection_dim, projection_seed, group)
        chunks = None
        if store is not None:
            identity = {
                "model_hash": model_hash(model),
                "data_hash": data_hash(train, prepared.target),
                "method": method,
                "options": {
                    "objective": plain_value(objective), "aggregate": aggregate, "projection_dim": projection_dim,
                    "projection_seed": projection_seed,
                    "loss_fn": "default" if options.loss_fn is None else plain_value(options.loss_fn),
                    "params": list(problem.param_names), "seed": options.seed, "train_loss": options.train_loss,
                    "train_attack": plain_value(options.train_attack), "batch_size": options.batch_size,
                },
            }
            chunks = _open_store(store, identity, problem.n_train, scorer.row_arrays(), problem.dtype, chunk_size, resume, group)
        scorer.prepare(chunks)
        return scorer.score_all(chunk_size, chunks, progress)


def _open_store(
    directory, identity, n_rows, arrays, dtype, chunk_size, resume, group
) -> ChunkStore:
    """Open the store on rank 0 first (it creates or checks the manifest), then on the other ranks."""
    rank, _ = rank_and_world_size(group)
    opened, error = None, None
    if rank == 0:
        try:
            opened = ChunkStore(directory, identity=identity, n_rows=n_rows, arrays=arrays,
                                dtype=_numpy_dtype(dtype), chunk_size=chunk_size, resume=resume, writer=True)
        except (ValueError, TypeError, OSError) as err:
            error = str(err)
    _raise_on_any_rank(error, group)
    if rank != 0:
        try:
            opened = ChunkStore(directory, identity=identity, n_rows=n_rows, arrays=arrays,
                                dtype=_numpy_dtype(dtype), chunk_size=chunk_size, resume=True, writer=False)
        except (ValueError, TypeError, OSError) as err:
            error = str(err)
    _raise_on_any_rank(error, group)
    return opened


class _Scorer:
    """Scores chunks of training samples for one method, against quantities fixed beforehand."""

    def __init__(self, problem: ScoringProblem, train, label_outputs, method, aggregate, projection_dim,
                 projection_seed, group):
        self.problem = problem
        self.train = train
        self.label_outputs = label_outputs
        self.method = method
        self.aggregate = aggregate
        self.group = group
        self.projection = None
        if projection_dim is not None:
            self.projection = RandomProjection(problem.n_params, projection_dim, projection_seed,
                                               device=problem.device, dtype=problem.dtype)
        self.direction: Optional[Tensor] = None
        self.target_gradients: list[BatchGradients] = []
        self.target_projected: Optional[Tensor] = None

    def row_arrays(self) -> dict[str, tuple[int, ...]]:
        """The chunked arrays of a store and their row shapes."""
        if self.method == "self" or self.aggregate:
            return {"scores": ()}
        arrays = {"scores": (len(self.problem.target),)}
        if self.projection is not None:
            arrays["train_gradients"] = (self.projection.dim,)
        return arrays

    def _fixed(self, chunks: Optional[ChunkStore], name: str, shape: tuple, compute: Callable[[], Tensor]) -> Tensor:
        """A quantity computed (or loaded from the store) on rank 0, saved, and broadcast."""
        rank, _ = rank_and_world_size(self.group)
        value = torch.empty(shape, dtype=self.problem.dtype, device=self.problem.device)
        if rank == 0:
            stored = None if chunks is None else chunks.load_array(name)
            if stored is not None:
                value = torch.as_tensor(np.array(stored), device=self.problem.device)
            else:
                value = compute()
                if chunks is not None:
                    chunks.save_array(name, value)
        return broadcast_from_rank0(value, self.group)

    def prepare(self, chunks: Optional[ChunkStore]) -> None:
        """Compute what every chunk is scored against: ``grad f`` or the target gradients."""
        problem, params = self.problem, self.problem.params
        if self.method == "self":
            return
        if self.aggregate:
            self.direction = self._fixed(
                chunks, "objective_gradient", (problem.n_params,),
                lambda: flatten(objective_gradient(problem, params), problem.param_names),
            )
            return
        inputs = self._fixed(
            chunks, "target_inputs", tuple(problem.target.x.shape),
            lambda: problem.objective.prepare(problem.module_at(params), problem.target, seed=problem.seed).inputs,
        )
        prepared = PreparedObjective(problem.objective, inputs, problem.target.y, problem.target.s)
        step = problem.train.batch_size
        self.target_gradients = [
            batch_gradients(problem, params, (prepared.inputs[s : s + step], prepared.labels[s : s + step]))
            for s in range(0, len(problem.target), step)
        ]
        if self.projection is not None:
            self.target_projected = torch.cat([self.projection.project(g.flatten()) for g in self.target_gradients])
            self.target_gradients = []

    def _chunk_problem(self, start: int, stop: int) -> ScoringProblem:
        part = (self.train[0][start:stop], self.train[1][start:stop]) if isinstance(self.train, tuple) \
            else Subset(self.train, range(start, stop))
        # The engine seeds the attack of training batch k with seed + 1 + k: shift by the batches before.
        return dataclasses.replace(
            self.problem, train=TrainStream(part, self.problem.train.batch_size, self.label_outputs),
            options=dataclasses.replace(self.problem.options,
                                        seed=self.problem.seed + start // self.problem.train.batch_size),
        )

    def score_chunk(self, start: int, stop: int) -> dict[str, Tensor]:
        """The chunked arrays of training samples ``[start, stop)``."""
        problem = self._chunk_problem(start, stop)
        params = problem.params
        if self.method == "self":
            return {"scores": squared_gradient_norms(problem, params)}
        if self.aggregate:
            return {"scores": -directional_derivatives(problem, params, unflatten(self.direction, params))}
        scores, projected = [], []
        for _, x, y in train_batches(problem, params):
            gradients = batch_gradients(problem, params, (x, y))
            if self.projection is None:
                scores.append(-torch.cat([gradients.inner(t) for t in self.target_gradients], dim=1))
            else:
                projected.append(self.projection.project(gradients.flatten()))
                scores.append(-(projected[-1] @ self.target_projected.T))
        out = {"scores": torch.cat(scores)}
        if projected:
            out["train_gradients"] = torch.cat(projected)
        return out

    def score_all(self, chunk_size: int, chunks: Optional[ChunkStore], progress: bool) -> Tensor:
        """Score (or read from the store) this rank's chunks, then gather every rank's rows."""
        problem = self.problem
        n = problem.n_train
        n_chunks = -(-n // chunk_size)
        rank, world_size = rank_and_world_size(self.group)
        mine = shard_chunks(n_chunks, rank, world_size)
        rows = []
        shown = progress and rank == 0
        for chunk in tqdm(mine, desc=f"{self.method} chunks", disable=None if shown else True, leave=False):
            start, stop = chunk * chunk_size, min((chunk + 1) * chunk_size, n)
            if chunks is not None and chunks.is_complete(chunk):
                scores = torch.as_tensor(np.array(chunks.read_chunk(chunk)), device=problem.device)
            else:
                values = {name: value.detach() for name, value in self.score_chunk(start, stop).items()}
                if chunks is not None:
                    chunks.write_chunk(chunk, values)
                scores = values["scores"]
            rows.append(scores.to(problem.dtype))
        shape = () if self.method == "self" or self.aggregate else (len(problem.target),)
        local = torch.cat(rows) if rows else torch.empty((0, *shape), dtype=problem.dtype, device=problem.device)
        out = gather_rows(local, self.group)
        if chunks is not None and world_size > 1:
            dist.barrier(group=self.group)
            if rank == 0:
                chunks.refresh_manifest(rescan=True)
        return out
