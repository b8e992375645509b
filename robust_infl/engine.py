"""Building blocks of every influence method: the scoring problem and its differential operators.

A :class:`ScoringProblem` bundles what a method needs (model, scored parameter names, functional
parameters and buffers, per-sample loss, the objective and its target set, the batched training
stream, device, seed, progress flag and training-loss mode). The operators below all take the
parameter dict EXPLICITLY, so a method can evaluate them at perturbed weights (ensemble members)
or at checkpoints (TracIn) without touching the model:

- :func:`objective_gradient` -- ``grad f`` on the target set (attack computed once at ``params``).
- :func:`directional_derivatives` -- ``<grad l_i, v>`` for every training sample by forward-mode AD
  (``torch.autograd.forward_ad`` dual tensors), streaming the training set; per-sample gradients are never formed and the
  memory does not grow with the number of training samples.
- :func:`per_sample_gradients` / :func:`target_gradients` -- flattened per-sample gradients
  (``vmap(grad(...))``) for train x target matrices, self-influence and Hessian methods.
- :func:`hessian_vector_products` -- products with the Hessian of the mean training loss.

Parameter dicts map the scored names (``problem.param_names``) to tensors; the unscored
parameters (``problem.frozen``) and buffers are added by :meth:`ScoringProblem.outputs`. The model
forward is pluggable (``problem.forward``), e.g. to run the network with functional dropout masks.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping, Optional, Union

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from attacks.inputs import as_labels, check_inputs
from attacks.plumbing import model_device, model_dtype
from attacks.validation import check_labels
from robust_infl.inputs import TargetSet, call_attack
from robust_infl.objectives import Attack, LossFn, Objective, PreparedObjective
from robust_infl.options import ScoringOptions

__all__ = [
    "ForwardFn",
    "Params",
    "TrainStream",
    "ScoringProblem",
    "build_problem",
    "flatten",
    "unflatten",
    "train_batches",
    "objective_gradient",
    "target_gradients",
    "check_per_target",
    "directional_derivatives",
    "flat_objective_gradient",
    "harm_along",
    "harm_matrix",
    "solve_right_hand_sides",
    "harm_of_directions",
    "per_sample_gradients",
    "hessian_vector_products",
    "check_finite_results",
    "piece_size",
    "CPU_PIECE",
]

Params = dict[str, Tensor]
ForwardFn = Callable[[Mapping[str, Tensor], Mapping[str, Tensor], Tensor], Tensor]


class TrainStream:
    """The training set as fixed-order batches ``(start, x, y)`` on a device, in a floating dtype.

    ``source`` is ``(X, y)`` tensors (sliced directly) or a sized ``Dataset`` of ``(x, y, ...)``
    items (read with a non-shuffling ``DataLoader``; extra item fields are ignored). Batches from
    a Dataset are checked on the fly: finite inputs, and labels valid for ``label_outputs``
    logits when that is set (the default loss).
    """

    def __init__(
        self,
        source: Union[tuple[Tensor, Tensor], Dataset],
        batch_size: int,
        label_outputs: Optional[int] = None,
    ):
        self.source = source
        self.batch_size = batch_size
        self.label_outputs = label_outputs
        self.n = source[0].shape[0] if isinstance(source, tuple) else len(source)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return self.n

    @property
    def n_batches(self) -> int:
        """Number of batches per pass."""
        return math.ceil(self.n / self.batch_size)

    def _raw_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        if isinstance(self.source, tuple):
            x, y = self.source
            for start in range(0, self.n, self.batch_size):
                yield x[start : start + self.batch_size], y[start : start + self.batch_size]
            return
        loader = DataLoader(self.source, batch_size=self.batch_size, shuffle=False)
        for item in loader:
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise ValueError("train: Dataset items must be (x, y) tuples")
            x, y = check_inputs(item[0], "train"), as_labels(item[1], "train")
            if self.label_outputs is not None:
                check_labels(y, "train", self.label_outputs)
            yield x, y

    def batches(
        self, device: torch.device, dtype: torch.dtype, progress: bool = False, desc: str = "train"
    ) -> Iterator[tuple[int, Tensor, Tensor]]:
        """Yield ``(start, x, y)``: the batch's first index, inputs in ``dtype`` and labels, on ``device``."""
        start = 0
        bar = tqdm(total=self.n_batches, desc=desc, disable=None if progress else True, leave=False)
        try:
            for x, y in self._raw_batches():
                yield start, x.to(device=device, dtype=dtype), y.to(device)
                start += x.shape[0]
                bar.update(1)
        finally:
            bar.close()


@dataclass(frozen=True)
class ScoringProblem:
    """Everything an influence method needs, validated and on one device.

    ``params`` holds the scored parameters (detached), ``frozen`` the other parameters; both with
    ``buffers`` are passed to ``forward(all_params, buffers, x)``, by default
    ``torch.func.functional_call`` of the model (in eval mode during scoring). ``options`` are the
    run's :class:`~robust_infl.options.ScoringOptions`; ``damping``, ``seed``, ``progress``, ``aggregate``,
    ``train_loss`` (``"clean"`` or ``"adversarial"``: per-sample training losses at
    ``train_attack(model, x, y)``) and ``train_attack`` read them. ``loss_fn``, ``param_names`` and
    ``device`` are the resolved ones (defaults filled in from the model).
    """

    model: nn.Module
    objective: Objective
    target: TargetSet
    train: TrainStream
    loss_fn: LossFn
    param_names: tuple[str, ...]
    params: Params
    frozen: Params
    buffers: Params
    device: torch.device
    dtype: torch.dtype
    options: ScoringOptions
    forward: Optional[ForwardFn] = None

    @property
    def damping(self) -> float:
        """``lambda`` of the damped Hessian (``options.damping``)."""
        return self.options.damping

    @property
    def seed(self) -> int:
        """The seed of every random choice (``options.seed``)."""
        return self.options.seed

    @property
    def progress(self) -> bool:
        """Whether to show progress bars (``options.progress``)."""
        return self.options.progress

    @property
    def train_loss(self) -> str:
        """``"clean"`` or ``"adversarial"`` (``options.train_loss``)."""
        return self.options.train_loss

    @property
    def train_attack(self) -> Optional[Attack]:
        """The training-point attack of ``train_loss="adversarial"`` (``options.train_attack``)."""
        return self.options.train_attack

    @property
    def aggregate(self) -> bool:
        """One score per training sample (True) or the train x target matrix (``options.aggregate``)."""
        return self.options.aggregate

    @property
    def n_train(self) -> int:
        """Number of training samples."""
        return len(self.train)

    @property
    def n_params(self) -> int:
        """Number of scored parameters (length of a flattened gradient)."""
        return sum(p.numel() for p in self.params.values())

    def outputs(self, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
        """Model outputs on ``x`` with the scored parameters set to ``params``."""
        all_params = {**self.frozen, **params}
        if self.forward is not None:
            return self.forward(all_params, self.buffers, x)
        return functional_call(self.model, (all_params, self.buffers), (x,))

    def with_forward(self, forward: ForwardFn) -> "ScoringProblem":
        """A copy of the problem whose model forward is ``forward(all_params, buffers, x)``."""
        return dataclasses.replace(self, forward=forward)

    def module_at(self, params: Mapping[str, Tensor]) -> nn.Module:
        """An ``nn.Module`` computing :meth:`outputs` at ``params``, for attacks.

        The user's model itself exactly when it computes the same function: the problem has no
        custom forward, computes on the model's device, and ``params`` (with ``frozen`` and
        ``buffers``) are the model's own tensors, i.e. share their memory (see
        :meth:`holds_model_state`). Anything else (perturbed weights, a checkpoint, a custom
        forward, another device) gets a wrapper module with the given weights, in eval mode.
        """
        if self.forward is None and model_device(self.model) == self.device and self.holds_model_state(params):
            return self.model
        return _ParametrisedModule(self, params)

    def holds_model_state(self, params: Mapping[str, Tensor]) -> bool:
        """Whether ``params``, ``frozen`` and ``buffers`` are exactly the model's own parameters and
        buffers (the same tensors in memory, as :func:`build_problem` takes them on the model's device)."""
        own = {**dict(self.model.named_parameters()), **dict(self.model.named_buffers())}
        given = {**self.frozen, **params, **self.buffers}
        return given.keys() == own.keys() and all(_same_memory(given[name], own[name]) for name in own)


def _same_memory(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` view the same memory with the same layout (e.g. ``b`` and ``b.detach()``)."""
    return (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr())


class _ParametrisedModule(nn.Module):
    """The problem's forward at fixed parameters, wrapped as a module an attack can call."""

    def __init__(self, problem: ScoringProblem, params: Mapping[str, Tensor]):
        super().__init__()
        self._problem = problem
        self._names = list(params)
        self.weights = nn.ParameterList(
            [nn.Parameter(params[name].detach(), requires_grad=False) for name in self._names]
        )
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self._problem.outputs(dict(zip(self._names, self.weights)), x)


def build_problem(
    model: nn.Module,
    train: Union[tuple[Tensor, Tensor], Dataset],
    target: TargetSet,
    objective: Objective,
    *,
    loss_fn: LossFn,
    param_names: tuple[str, ...],
    device: torch.device,
    options: ScoringOptions,
    label_outputs: Optional[int] = None,
    forward: Optional[ForwardFn] = None,
) -> ScoringProblem:
    """Assemble a :class:`ScoringProblem` from already validated pieces (see ``robust_infl.api``): the
    resolved ``loss_fn``, ``param_names`` and ``device``, and the run's ``options`` (training batches of
    ``options.batch_size``)."""
    dtype = model_dtype(model)
    scored = set(param_names)
    named = dict(model.named_parameters())
    return ScoringProblem(
        model=model,
        objective=objective,
        target=target.to(device, dtype),
        train=TrainStream(train, options.batch_size, label_outputs),
        loss_fn=loss_fn,
        param_names=tuple(param_names),
        params={name: named[name].detach().to(device) for name in param_names},
        frozen={name: p.detach().to(device) for name, p in named.items() if name not in scored},
        buffers={name: b.to(device) for name, b in model.named_buffers()},
        device=device,
        dtype=dtype,
        options=options,
        forward=forward,
    )


def flatten(tensors: Mapping[str, Tensor], names: tuple[str, ...]) -> Tensor:
    """Concatenate the flattened ``tensors[name]`` in the order of ``names``."""
    return torch.cat([tensors[name].reshape(-1) for name in names])


def unflatten(vector: Tensor, like: Mapping[str, Tensor]) -> Params:
    """Split a flat ``vector`` into tensors shaped like the values of ``like`` (in its key order)."""
    out, offset = {}, 0
    for name, ref in like.items():
        out[name] = vector[offset : offset + ref.numel()].view_as(ref)
        offset += ref.numel()
    if offset != vector.numel():
        raise ValueError(f"vector: has {vector.numel()} entries, expected {offset}")
    return out


def check_finite_results(values: Union[Tensor, Mapping[str, Tensor]], what: str, where: str) -> None:
    """Raise ``ValueError`` naming ``model`` if ``values`` (a tensor or a dict of them) hold NaN or infinity.

    Called on results the methods compute anyway (losses, gradients), so a model that returns
    NaN fails with a clear message instead of giving NaN scores, at no extra forward pass.
    """
    tensors = values.values() if isinstance(values, Mapping) else (values,)
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise ValueError(f"model: produced non-finite {what} on {where}")


def _as_param_dict(v: Union[Mapping[str, Tensor], Tensor], params: Params) -> Params:
    if isinstance(v, Tensor):
        return unflatten(v.to(next(iter(params.values())).dtype), params)
    return {name: v[name] for name in params}


def train_batches(
    problem: ScoringProblem, params: Params, desc: str = "train"
) -> Iterator[tuple[int, Tensor, Tensor]]:
    """Yield ``(start, x, y)`` training batches, with ``x`` attacked at ``params`` in adversarial mode.

    In ``train_loss="adversarial"`` mode each batch is replaced by ``train_attack(module, x, y)``
    computed at ``params`` under the seed ``problem.seed + 1 + batch_index`` (so every pass and every
    method sees the same adversarial points), then held fixed.
    """
    batches = problem.train.batches(problem.device, problem.dtype, problem.progress, desc)
    if problem.train_loss != "adversarial":
        yield from batches
        return
    module = problem.module_at(params)
    for index, (start, x, y) in enumerate(batches):
        x_adv = call_attack(problem.train_attack, module, x, y, seed=problem.seed + 1 + index, name="train_attack")
        yield start, x_adv, y


def _prepare(problem: ScoringProblem, params: Params) -> PreparedObjective:
    return problem.objective.prepare(problem.module_at(params), problem.target, seed=problem.seed)


# On CPU, one pass (forward, forward-mode or backward) over more than a few hundred samples can be
# slower per sample: its activations (25 MB per layer for 500 SmallCNN images) outgrow the processor
# caches and are freshly allocated on every call. Measured on the SmallCNN with 28x28 images at 1 thread
# (the experiments/bench_peers.py setting): the forward-mode pass over batches of 500 took 1.0-1.8x as
# long as over pieces of 128 (varying from run to run and with the load of the machine), the objective
# gradient 1.4x; pieces of 64 to 256 were equally fast. So on CPU every batch is computed in pieces of
# at most this many samples; elsewhere whole.
CPU_PIECE = 128


def piece_size(problem: ScoringProblem) -> int:
    """Samples per pass: ``batch_size``, capped at :data:`CPU_PIECE` on CPU."""
    size = problem.train.batch_size
    return min(size, CPU_PIECE) if problem.device.type == "cpu" else size


def _target_chunks(problem: ScoringProblem) -> list[slice]:
    step = piece_size(problem)
    return [slice(start, start + step) for start in range(0, len(problem.target), step)]


def objective_gradient(problem: ScoringProblem, params: Params) -> Params:
    """Gradient of the objective with respect to the scored parameters, at ``params``.

    The objective is prepared at ``params`` (a :class:`~robust_infl.objectives.Robust` attack runs
    once there and is held fixed). The target set is streamed in chunks of :func:`piece_size`; for a
    non-linear objective (fairness gaps) a first no-grad pass collects the chunk statistics and the
    second pass differentiates their linearisation, which gives the exact gradient.
    """
    prepared = _prepare(problem, params)
    chunks = _target_chunks(problem)

    def chunk_sums(p: Params, chunk: slice) -> Tensor:
        return prepared.chunk_sums(problem.outputs(p, prepared.inputs[chunk]), chunk, problem.loss_fn)

    if len(chunks) == 1:
        gradient = grad(lambda p: prepared.combine(chunk_sums(p, chunks[0])))(params)
        check_finite_results(gradient, "outputs or gradients", "the target set (objective gradient)")
        return gradient
    if problem.objective.linear:
        weight_of_chunk = None
    else:
        with torch.no_grad():
            totals = sum(chunk_sums(params, chunk) for chunk in chunks)
        weight_of_chunk = grad(prepared.combine)(totals)
    gradient = {name: torch.zeros_like(p) for name, p in params.items()}
    for chunk in chunks:
        if weight_of_chunk is None:
            part = grad(lambda p: prepared.combine(chunk_sums(p, chunk)))(params)
        else:
            part = grad(lambda p: (weight_of_chunk * chunk_sums(p, chunk)).sum())(params)
        for name in gradient:
            gradient[name] += part[name]
    check_finite_results(gradient, "outputs or gradients", "the target set (objective gradient)")
    return gradient


def directional_derivatives(
    problem: ScoringProblem, params: Params, v: Union[Mapping[str, Tensor], Tensor]
) -> Tensor:
    """``<grad l_i(params), v>`` for every training sample ``i``, shape ``(n_train,)``.

    One forward-mode pass of the per-sample losses along ``v`` per training batch (in pieces of
    :func:`piece_size` samples); ``v`` is a parameter dict or a flat vector. Memory is that of one
    batch. The losses and derivatives are checked to be finite (``ValueError`` naming ``model`` and
    the batch otherwise).

    The pass uses ``torch.autograd.forward_ad`` dual tensors directly, the forward-mode machinery
    under ``torch.func.jvp``: same derivatives, without ``jvp``'s wrapper, which computed each
    max-pool's indices twice.
    """
    tangent = _as_param_dict(v, params)
    if not all(bool(torch.isfinite(t).all()) for t in tangent.values()):
        raise ValueError("v: the direction of the directional derivatives holds NaN or infinite values")
    out = torch.empty(problem.n_train, dtype=problem.dtype, device=problem.device)
    step = piece_size(problem)
    for batch_start, x_batch, y_batch in train_batches(problem, params, desc="directional derivatives"):
        for offset in range(0, x_batch.shape[0], step):
            x, y = x_batch[offset : offset + step], y_batch[offset : offset + step]
            losses, derivative = _forward_mode_losses(problem, params, tangent, x, y)
            start = batch_start + offset
            where = f"the training batch starting at index {start}"
            check_finite_results(losses, "outputs (losses)", where)
            check_finite_results(derivative, "loss gradients", where)
            out[start : start + x.shape[0]] = derivative.detach()
    return out


def _forward_mode_losses(problem: ScoringProblem, params: Params, tangent: Params, x: Tensor, y: Tensor):
    """Per-sample losses at ``params`` and their derivatives along ``tangent`` (zeros where a loss does not
    depend on the scored parameters)."""
    with fwAD.dual_level():
        duals = {name: fwAD.make_dual(params[name], tangent[name]) for name in params}
        losses, derivative = fwAD.unpack_dual(problem.loss_fn(problem.outputs(duals, x), y))
    return losses, torch.zeros_like(losses) if derivative is None else derivative


def flat_objective_gradient(problem: ScoringProblem, params: Params) -> Tensor:
    """:func:`objective_gradient` at ``params`` as one flat vector (``problem.param_names`` order), ``(n_params,)``."""
    return flatten(objective_gradient(problem, params), problem.param_names)


def harm_along(problem: ScoringProblem, params: Params, direction: Union[Mapping[str, Tensor], Tensor]) -> Tensor:
    """Harm scores ``-<grad l_i(params), direction>`` of every training sample, shape ``(n_train,)``.

    ``direction`` is ``grad f`` (inner-product methods) or an approximation of ``H^{-1} grad f``
    (influence functions), as a parameter dict or a flat vector of any floating dtype. The one place
    where the sign convention is applied: positive = removing the sample is predicted to DECREASE
    the objective.
    """
    return -directional_derivatives(problem, params, direction)


def harm_matrix(problem: ScoringProblem, params: Params, directions: Tensor) -> Tensor:
    """The ``(n_train, k)`` matrix ``-<grad l_i(params), directions[j]>``: :func:`harm_along` for each row of
    ``directions`` (``(k, n_params)``, e.g. the target gradients ``grad f_j`` or ``H^{-1} grad f_j``), from
    per-sample gradients in training batches (memory ``O((batch + k) * n_params)``)."""
    directions = directions.to(device=problem.device, dtype=problem.dtype)
    out = torch.empty(problem.n_train, directions.shape[0], dtype=problem.dtype, device=problem.device)
    for start, x, y in train_batches(problem, params, desc="train x target harms"):
        where = f"the training batch starting at index {start}"
        out[start : start + x.shape[0]] = -(per_sample_gradients(problem, params, (x, y), where) @ directions.T)
    return out


def solve_right_hand_sides(problem: ScoringProblem) -> Tensor:
    """What an influence function solves ``(H + damping I) x = b`` for, as the rows ``b`` of a float64
    ``(k, n_params)`` matrix: the objective's gradient (one row) or, with ``aggregate=False``, each target
    sample's own loss gradient; :func:`harm_of_directions` turns the solutions into scores."""
    if problem.aggregate:
        return flat_objective_gradient(problem, problem.params).double()[None]
    return target_gradients(problem, problem.params).double()


def harm_of_directions(problem: ScoringProblem, directions: Tensor) -> Tensor:
    """The scores along the solutions for :func:`solve_right_hand_sides`' rows: ``(n_train,)`` by
    :func:`harm_along` (aggregate), else the ``(n_train, n_target)`` :func:`harm_matrix`."""
    if problem.aggregate:
        return harm_along(problem, problem.params, directions[0])
    return harm_matrix(problem, problem.params, directions)


def per_sample_gradients(
    problem: ScoringProblem, params: Params, batch: tuple[Tensor, Tensor], where: str = "a batch of samples"
) -> Tensor:
    """Flattened per-sample loss gradients ``(b, n_params)`` of the batch ``(x, y)`` at ``params``.

    The batch is used as given (take it from :func:`train_batches` to get adversarial training
    points). Columns follow ``problem.param_names``. Non-finite gradients raise ``ValueError``
    naming ``model`` and ``where`` (e.g. ``"the training batch starting at index 128"``).
    """
    x, y = batch

    def sample_loss(p: Params, xi: Tensor, yi: Tensor) -> tuple[Tensor, Tensor]:
        loss = problem.loss_fn(problem.outputs(p, xi.unsqueeze(0)), yi.unsqueeze(0)).sum()
        return loss, loss.detach()

    grads, losses = vmap(grad(sample_loss, has_aux=True), in_dims=(None, 0, 0))(params, x, y)
    flat = torch.cat([grads[name].reshape(x.shape[0], -1) for name in problem.param_names], dim=1).detach()
    check_finite_results(losses, "outputs (losses)", where)
    check_finite_results(flat, "loss gradients", where)
    return flat


def check_per_target(objective: Objective) -> None:
    """Refuse ``aggregate=False`` (scores per target sample) for an objective without per-target-sample
    values (fairness objectives): the one check behind the ``aggregate`` option of every entry point."""
    if not objective.per_sample:
        raise ValueError(f"aggregate: {objective!r} has no per-target-sample value; use aggregate=True")


def target_gradients(problem: ScoringProblem, params: Params) -> Tensor:
    """Flattened gradients ``(n_target, n_params)`` of each target sample's objective term.

    Defined for per-sample objectives (``objective.per_sample``: Utility, Robust), whose
    per-target-sample value is that sample's loss at the (possibly attacked) target input.
    """
    check_per_target(problem.objective)
    prepared = _prepare(problem, params)
    return torch.cat(
        [
            per_sample_gradients(
                problem,
                params,
                (prepared.inputs[chunk], prepared.labels[chunk]),
                where=f"the target chunk starting at index {chunk.start}",
            )
            for chunk in _target_chunks(problem)
        ]
    )


def hessian_vector_products(
    problem: ScoringProblem, params: Params, vectors: Tensor, chunk_size: Optional[int] = None
) -> Tensor:
    """``H @ v`` for each row ``v`` of ``vectors`` (shape ``(k, n_params)`` or ``(n_params,)``).

    ``H`` is the Hessian of the MEAN training loss at ``params`` over the scored parameters
    (no damping), accumulated over one pass of the training stream with forward-over-reverse AD,
    vectorised over the rows in chunks of ``chunk_size`` (all at once when ``None``).
    """
    single = vectors.ndim == 1
    rows = vectors.reshape(1, -1) if single else vectors
    rows = rows.to(device=problem.device, dtype=problem.dtype)
    total = torch.zeros_like(rows)
    for _, x, y in train_batches(problem, params, desc="Hessian-vector products"):

        def batch_loss(p: Params) -> Tensor:
            return problem.loss_fn(problem.outputs(p, x), y).sum()

        def hvp(row: Tensor) -> Tensor:
            _, product = jvp(grad(batch_loss), (params,), (unflatten(row, params),))
            return flatten(product, problem.param_names)

        total += vmap(hvp, chunk_size=chunk_size)(rows).detach()
    check_finite_results(total, "Hessian-vector products", "the training set")
    total /= problem.n_train
    return total[0] if single else total
