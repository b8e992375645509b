"""TRAK through TRAK's own package ``traker`` (Park et al. 2023, "TRAK: Attributing Model Behavior at
Scale"): ``"trak"``.

TRAK linearises the model's output function around the trained parameters, projects the per-sample
gradients of that output with a seeded random matrix ``P`` (``proj_dim`` columns) and inverts the
Gauss-Newton matrix of the linearised problem in the projected space. For a classifier the output
function is the margin ``m(z) = log p_y - log(1 - p_y)`` (softmax; for one logit ``(2y - 1) * logit``),
with features ``phi(z) = P^T grad m(z) / sqrt(n_params)``. TRAK's score of training sample ``i`` on
target sample ``j`` is

    S_ij = phi_j^T (Phi^T Phi + lambda I)^{-1} phi_i Q_i,      Q_i = 1 - p_{y_i}(x_i),

TRAK's prediction of how much INCLUDING sample ``i`` raises target ``j``'s margin (positive = helpful;
``Phi`` stacks the training features, ``Q_i`` is TRAK's out-to-loss weight). Every objective of this
package depends on each target output only through its margin (checked: ``ValueError`` otherwise),
so its gradient is ``sum_j (df/dm_j) grad m_j`` and, taken through TRAK's projected features the way
``"ip"`` uses ``grad f``, the harm (removing ``i`` is predicted to DECREASE ``f``) is

    harm_i = sum_j (df/dm_j) S_ij.

For ``Utility`` and ``Robust`` (targets at the attack points computed once at the trained parameters
and held fixed, Danskin) ``df/dm_j = -(1 - p_j) / n_target``; ``aggregate=False`` returns
``harm_ij = (dl_j/dm_j) S_ij``, whose row means are the aggregate scores. For the fairness gaps
``df/dm_j`` is the derivative of the gap.

The computation is TRAK's code: its per-sample gradients (``FunctionalGradientComputer``, ``vmap``
of ``grad``), margin and out-to-loss weights (``ImageClassificationModelOutput``), CPU projector
(``BasicProjector`` with Gaussian entries, the one ``TRAKer`` picks on the CPU, seeded with the
scoring ``seed``; on a GPU the same seed draws another matrix) and score computer
(``BasicScoreComputer``: ``Phi^T Phi``, its inverse with ``lambda_reg = damping``, divided by its
mean absolute entry, and the products), in float32 as ``TRAKer(use_half_precision=False)``. What
``TRAKer`` keeps in memory-mapped files on disk is kept here in memory; the scores equal
``TRAKer``'s (tested). Two savings over ``TRAKer`` on the CPU: TRAK's ``BasicProjector`` draws every
block of its matrix again at every batch, here a matrix of at most :data:`WHOLE_MATRIX_BYTES` is drawn once
from the same blocks' generator states; and the per-sample gradients are flattened into one buffer kept
across batches (``experiments/bench_peers.py`` times both against ``TRAKer``). TRAK's scale is kept (features divided by ``sqrt(n_params)``, inverse by its
mean absolute entry): scores compare within one model, across its objectives, not with the units of
``"if-exact"``. One-logit models (binary cross-entropy) use the same margin, written here
(:class:`BinaryMargin`), since TRAK ships only the softmax one.

An :class:`~robust_infl.ensembles.Ensemble` of trained models is TRAK's own ensemble
(:func:`trak_ensemble_influence`): member ``k`` is ``TRAKer``'s model id ``k`` (its projector seeded with
``seed + 100000 k`` per block, as TRAK's ``BasicProjector``), and ``S`` and ``Q`` are the means over the
members of each member's scores and out-to-loss weights, as ``TRAKer.finalize_scores`` averages them;
``df/dm_j`` is averaged over the members too (each at its own attack points for ``Robust``).

TRAK is an optional extra (``pip install 'robust-infl[trak]'``, or ``make setup``); without it,
asking for ``"trak"`` raises one ``ImportError`` naming the extra.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.func import functional_call
from tqdm.auto import tqdm

from attacks.validation import check_int
from robust_infl.engine import ScoringProblem, check_finite_results, train_batches
from robust_infl.methods import register_method
from robust_infl.objectives import PreparedObjective, binary_cross_entropy_loss, cross_entropy_loss

__all__ = ["trak_influence", "trak_ensemble_influence", "BinaryMargin", "margins", "EXTRA", "DEFAULT_PROJ_DIM",
           "WHOLE_MATRIX_BYTES"]

EXTRA = "trak"
DEFAULT_PROJ_DIM = 2048
"""``TRAKer``'s default projection dimension."""
WHOLE_MATRIX_BYTES = 2**30
"""Largest projection matrix (``n_params x proj_dim`` float32) drawn once and held; a larger one is drawn block by
block at every batch, as TRAK's ``BasicProjector`` does."""
_MARGIN_RTOL = 1e-4  # how far df/doutputs may stray from the direction of the margin's gradient


def _trak() -> Any:
    """TRAK's package ``trak`` (PyPI ``traker``), or one ``ImportError`` naming the extra to install."""
    try:
        import trak
        import trak.gradient_computers
        import trak.modelout_functions
        import trak.projectors
        import trak.score_computers  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"method: 'trak' needs TRAK's package traker, which is not installed ({err}); install the optional "
            f"extra: pip install 'robust-infl[{EXTRA}]' (make setup installs it)"
        ) from err
    return trak


class BinaryMargin:
    """TRAK's model output for one logit ``z`` (binary cross-entropy): the margin
    ``log p_y - log(1 - p_y) = (2y - 1) z`` and its out-to-loss weight ``1 - p_y``; the interface of
    TRAK's ``AbstractModelOutput`` (what its softmax ``ImageClassificationModelOutput`` gives a model
    with the logits ``(0, z)``)."""

    @staticmethod
    def get_output(model, weights, buffers, x: Tensor, label: Tensor) -> Tensor:
        """The margin of one sample (``x`` and ``label`` without a batch dimension)."""
        logit = functional_call(model, (weights, buffers), x.unsqueeze(0))[0, 0]
        return (2 * label.to(logit.dtype) - 1) * logit

    @staticmethod
    def get_out_to_loss_grad(model, weights, buffers, batch) -> Tensor:
        """``1 - p_y`` of every sample of the batch, shape ``(b, 1)``."""
        x, y = batch
        logits = functional_call(model, (weights, buffers), x)[:, 0]
        return torch.sigmoid(-(2 * y.to(logits.dtype) - 1) * logits).detach().unsqueeze(-1)


def margins(outputs: Tensor, labels: Tensor) -> Tensor:
    """TRAK's margins ``log p_y - log(1 - p_y)`` of a batch of model outputs, shape ``(n,)``: for
    ``C >= 2`` logits ``z_y - logsumexp_{c != y} z_c``, for one logit ``(2y - 1) z``."""
    if outputs.shape[1] == 1:
        return (2 * labels.to(outputs.dtype) - 1) * outputs[:, 0]
    rows = torch.arange(outputs.shape[0], device=outputs.device)
    labels = labels.long()
    others = outputs.index_put((rows, labels), torch.tensor(-math.inf, dtype=outputs.dtype, device=outputs.device))
    return outputs[rows, labels] - torch.logsumexp(others, dim=1)


def _margin_weights(problem: ScoringProblem, prepared: PreparedObjective, aggregate: bool) -> Tensor:
    """``df/dm_j`` for every target sample ``j`` (``f`` the objective, or with ``aggregate=False`` the
    sum of the target losses, so that entry ``j`` is ``dl_j/dm_j``); ``ValueError`` when ``f`` depends on
    a target's outputs other than through its margin."""
    with torch.no_grad():
        outputs = torch.cat([problem.outputs(problem.params, prepared.inputs[start:start + problem.train.batch_size])
                             for start in range(0, prepared.inputs.shape[0], problem.train.batch_size)])
    check_finite_results(outputs, "outputs", "the target set")
    outputs.requires_grad_(True)
    if aggregate:
        value = prepared.combine(prepared.chunk_sums(outputs, slice(None), problem.loss_fn))
    else:
        value = problem.loss_fn(outputs, prepared.labels).sum()
    (d_outputs,) = torch.autograd.grad(value, outputs, allow_unused=True)
    d_outputs = torch.zeros_like(outputs) if d_outputs is None else d_outputs
    (d_margins,) = torch.autograd.grad(margins(outputs, prepared.labels).sum(), outputs)
    weights = (d_outputs * d_margins).sum(dim=1) / (d_margins * d_margins).sum(dim=1)
    residual = d_outputs - weights[:, None] * d_margins
    if float(residual.norm()) > _MARGIN_RTOL * float(d_outputs.norm()) + 1e-30:
        raise ValueError(f"objective: 'trak' scores objectives that depend on each target output only through its "
                         f"margin log p_y - log(1 - p_y); {problem.objective!r} does not")
    return weights.detach()


def _check(problem: ScoringProblem, proj_dim: int) -> int:
    """Validate the options and the problem before any compute; returns ``proj_dim``."""
    proj_dim = check_int(proj_dim, "proj_dim", minimum=1)
    if problem.loss_fn not in (cross_entropy_loss, binary_cross_entropy_loss):
        raise ValueError("loss_fn: 'trak' models the cross-entropy loss (TRAK's margin and out-to-loss weights); "
                         "leave loss_fn to the default")
    if problem.forward is not None:
        raise ValueError("method: 'trak' scores the model itself, not a custom forward")
    rank = min(problem.n_train, problem.n_params)
    if problem.damping == 0 and proj_dim > rank:
        raise ValueError(
            f"proj_dim: with damping=0 must be at most min(n_train, n_params) = {rank}, or Phi^T Phi is singular "
            f"(pass a smaller proj_dim or damping > 0, TRAK's lambda_reg), got {proj_dim}"
        )
    return proj_dim


class _Member:
    """TRAK's featuriser of one ensemble member (TRAK's model id ``model_id``): its gradient computer over a
    copy of the model and its projector, seeded as ``TRAKer`` seeds model ``model_id``'s."""

    def __init__(self, problem: ScoringProblem, proj_dim: int, model_id: int, trak: Any):
        f32 = torch.float32
        self.problem, self.model_id = problem, model_id
        self.binary = problem.loss_fn is binary_cross_entropy_loss
        model = copy.deepcopy(problem.model).to(problem.device).eval()
        output = BinaryMargin() if self.binary else trak.modelout_functions.ImageClassificationModelOutput()
        self.computer = trak.gradient_computers.FunctionalGradientComputer(
            model=model, task=output, grad_dim=problem.n_params, dtype=f32, device=problem.device,
            grad_wrt=list(problem.param_names))
        self.projector = trak.projectors.BasicProjector(
            grad_dim=problem.n_params, proj_dim=proj_dim, seed=problem.seed, device=problem.device, dtype=f32,
            proj_type=trak.projectors.ProjectionType.normal, model_id=model_id)
        self.normaliser = torch.sqrt(torch.tensor(problem.n_params, dtype=f32))
        self.matrix = self._whole_matrix(proj_dim) if problem.n_params * proj_dim * 4 <= WHOLE_MATRIX_BYTES else None
        self._flat = None  # the flattened per-sample gradients of a batch

    def _whole_matrix(self, proj_dim: int) -> Tensor:
        """TRAK's projection matrix whole: the projector's blocks, drawn once from their generator states (TRAK's
        ``BasicProjector`` draws every block again at every ``project`` call)."""
        projector = self.projector
        matrix = torch.empty(projector.grad_dim, proj_dim, dtype=projector.dtype, device=projector.device)
        for index, state in enumerate(projector.generator_states):
            start = index * projector.block_size
            stop = min(start + projector.block_size, proj_dim)
            projector.generate_sketch_matrix(state)
            matrix[:, start:stop] = projector.proj_matrix[:, :stop - start]
        projector.free_memory()
        return matrix

    def _project_whole(self, grads: dict, batch: int) -> Tensor:
        """``vectorize(grads) @ matrix``: the per-sample gradients flattened in their own order (as TRAK's
        ``trak.utils.vectorize`` flattens them), into one buffer kept across batches, times the whole matrix."""
        first = next(iter(grads.values()))
        if self._flat is None or self._flat.shape[0] < batch or self._flat.dtype != first.dtype:
            self._flat = torch.empty(batch, self.matrix.shape[0], dtype=first.dtype, device=first.device)
        flat = torch.cat([g.detach().reshape(batch, -1) for g in grads.values()], dim=1, out=self._flat[:batch])
        return flat.to(self.matrix.dtype) @ self.matrix

    def labelled(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The batch as TRAK's model outputs take it (TRAK indexes the softmax by the label)."""
        return x, (y if self.binary else y.long())

    def features(self, x: Tensor, y: Tensor, where: str) -> Tensor:
        """``P^T grad m(z) / sqrt(n_params)`` of every sample of the batch (TRAK's ``featurize``)."""
        grads = self.computer.compute_per_sample_grad(batch=self.labelled(x, y))
        if self.matrix is None:
            projected = self.projector.project(grads, model_id=self.model_id)
        else:
            projected = self._project_whole(grads, x.shape[0])
        projected /= self.normaliser
        check_finite_results(projected, "output gradients", where)
        return projected

    def train_features(self, scorer: Any, proj_dim: int) -> tuple[Tensor, Tensor]:
        """TRAK's finalised training features ``Phi (Phi^T Phi + lambda I)^{-1}`` and out-to-loss weights."""
        problem, f32 = self.problem, torch.float32
        phi = torch.empty(problem.n_train, proj_dim, dtype=f32, device=problem.device)
        out_to_loss = torch.empty(problem.n_train, dtype=f32, device=problem.device)
        for start, x, y in train_batches(problem, problem.params, desc="trak features"):
            phi[start:start + x.shape[0]] = self.features(x, y, f"the training batch starting at index {start}")
            out_to_loss[start:start + x.shape[0]] = self.computer.compute_loss_grad(
                self.labelled(x, y)).reshape(-1).to(f32)
        trak_features = scorer.get_x_xtx_inv(phi, scorer.get_xtx(phi))
        check_finite_results(trak_features, "TRAK features", "the training set (increase damping or lower proj_dim)")
        return trak_features, out_to_loss

    def target_features(self, prepared: PreparedObjective) -> Tensor:
        """The projected features of the target samples (at their attack points for ``Robust``)."""
        step = self.problem.train.batch_size
        return torch.cat([self.features(prepared.inputs[s:s + step], prepared.labels[s:s + step],
                                        f"the target chunk starting at index {s}")
                          for s in range(0, prepared.inputs.shape[0], step)])


def trak_ensemble_influence(problems: Sequence[ScoringProblem], *, proj_dim: int = DEFAULT_PROJ_DIM) -> Tensor:
    """TRAK's harm scores over an ensemble of trained models, one problem per member (see :func:`trak_influence`).

    As ``TRAKer`` with member ``k``'s weights loaded as model id ``k`` (its projector seeded accordingly):
    ``S = mean_k S_k`` and ``Q = mean_k Q_k``, TRAK's scores and out-to-loss weights averaged over the members
    (``TRAKer.finalize_scores``); the harm is ``harm_ij = w_j S_ij Q_i`` with ``w_j = mean_k df/dm_j`` at each
    member's own targets (its attack points for ``Robust``), summed over ``j`` for the aggregate scores. One
    member is :func:`trak_influence`.
    """
    first = problems[0]
    proj_dim = _check(first, proj_dim)
    for problem in problems[1:]:
        _check(problem, proj_dim)
    trak = _trak()
    aggregate, device, f32 = first.aggregate, first.device, torch.float32
    scorer = trak.score_computers.BasicScoreComputer(dtype=f32, device=device, lambda_reg=first.damping)
    prepared = [problem.objective.prepare(problem.module_at(problem.params), problem.target, seed=problem.seed)
                for problem in problems]
    weights = sum(_margin_weights(problem, objective, aggregate)
                  for problem, objective in zip(problems, prepared)) / len(problems)
    scores = None
    out_to_loss = torch.zeros(first.n_train, dtype=f32, device=device)
    for model_id, (problem, objective) in enumerate(tqdm(list(zip(problems, prepared)), desc="trak members",
                                                         disable=None if first.progress and len(problems) > 1
                                                         else True, leave=False)):
        member = _Member(problem, proj_dim, model_id, trak)
        phi_target = member.target_features(objective)
        if aggregate:
            phi_target = (weights.to(f32) @ phi_target)[None]
        trak_features, member_out_to_loss = member.train_features(scorer, proj_dim)
        if scores is None:
            scores = torch.zeros(first.n_train, phi_target.shape[0], dtype=f32)
        scorer.get_scores(trak_features, phi_target, accumulator=scores)
        out_to_loss += member_out_to_loss
    scores /= len(problems)
    out_to_loss /= len(problems)
    harm = scores.to(device=device, dtype=first.dtype) * out_to_loss.to(first.dtype)[:, None]
    harm = harm[:, 0] if aggregate else harm * weights[None, :]
    check_finite_results(harm, "TRAK scores", "the training set (increase damping or lower proj_dim)")
    return harm


@register_method("trak", per_target=True, ensemble=trak_ensemble_influence)
def trak_influence(problem: ScoringProblem, *, proj_dim: int = DEFAULT_PROJ_DIM) -> Tensor:
    """TRAK harm scores through TRAK's own code (see the module docstring), shape ``(n_train,)``.

    With the scoring option ``aggregate=False``: the ``(n_train, n_target)`` matrix of harms on each
    target sample's own loss (at its attack point for ``Robust``); ``Utility`` and ``Robust`` only.

    Args:
        proj_dim: TRAK's projection dimension (default 2048, ``TRAKer``'s); with ``damping=0`` at most
            ``min(n_train, n_params)``, where ``Phi^T Phi`` can be inverted.

    ``problem.seed`` seeds TRAK's projector (``projector_seed``); ``problem.damping`` is TRAK's
    ``lambda_reg``, added to ``Phi^T Phi``. Default losses only (TRAK's margin models the
    cross-entropy); the model itself, not a custom forward. Needs the ``trak`` extra
    (``ImportError`` naming it otherwise). An :class:`~robust_infl.ensembles.Ensemble` of models is
    scored by :func:`trak_ensemble_influence`, TRAK's own ensemble.
    """
    return trak_ensemble_influence([problem], proj_dim=proj_dim)
