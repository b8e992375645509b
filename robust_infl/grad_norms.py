"""Per-sample gradients in layer-factored form: fast squared norms and inner products.

The per-sample gradient of a ``nn.Linear`` or ``nn.Conv2d`` weight is built from two things the
forward and backward passes already compute: the layer's input ``a_i`` and the gradient of the loss
with respect to its output ``delta_i``.

- Linear with ``T`` input vectors per sample (``T = 1`` for ``(batch, d_in)`` inputs)::

      grad_W l_i = sum_t delta_{i,t} a_{i,t}^T          grad_b l_i = sum_t delta_{i,t}

  For ``T = 1`` the squared norm is ``||a_i||^2 ||delta_i||^2`` and the inner product of two samples
  is ``(a_i . a_j + 1)(delta_i . delta_j)`` (weight and bias), so the ``d_out x d_in`` gradient is
  never formed. For ``T > 1`` the squared norm comes from the Gram matrices,
  ``sum((A_i A_i^T) * (D_i D_i^T))`` (cost ``T^2 (d_in + d_out)``), or from the formed gradient
  ``D_i^T A_i`` (cost ``T d_in d_out``), whichever is cheaper.
- Conv2d: the per-sample weight gradients of a whole batch are ONE grouped weight-gradient
  convolution (``torch.nn.grad.conv2d_weight`` with the samples as groups), i.e. the unfold trick
  ``g_i^T U_i`` without materialising the unfolded patches ``U_i``; the bias gradient is the sum of
  ``delta_i`` over positions.

One forward pass with a zero "probe" added to each covered layer's output and one backward pass
to the probes give every ``a_i`` and ``delta_i`` of a batch. Covered: ``nn.Linear`` and
``nn.Conv2d`` (zero padding mode, numeric padding) that the forward pass calls exactly once, on
inputs whose first dimension is the sample, and whose parameters no other module shares. Every
other scored parameter falls back to ``torch.func.vmap(grad(...))`` per-sample gradients of that
parameter alone. As for every per-sample gradient, the model must not mix samples (eval-mode
BatchNorm is fine).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from robust_infl.engine import Params, ScoringProblem, per_sample_gradients, train_batches

__all__ = [
    "LinearGradients",
    "ConvGradients",
    "BatchGradients",
    "batch_gradients",
    "squared_gradient_norms",
    "renormalised",
]

# Largest temporary (in elements) formed at once; a batch is processed in groups of samples under it.
MAX_TEMPORARY_ELEMENTS = 2**24


def _in_groups(n: int, per_sample_elements: int, fn: Callable[[slice], Tensor]) -> Tensor:
    """``fn(group)`` over consecutive groups of the ``n`` samples, sized so that a temporary of
    ``per_sample_elements`` per sample stays under :data:`MAX_TEMPORARY_ELEMENTS`; concatenated."""
    size = max(1, MAX_TEMPORARY_ELEMENTS // max(1, per_sample_elements))
    return torch.cat([fn(slice(start, start + size)) for start in range(0, n, size)])


@dataclass(frozen=True)
class LinearGradients:
    """Per-sample gradients of one ``nn.Linear``: inputs ``(b, T, d_in)``, output gradients ``(b, T, d_out)``.

    ``weight`` / ``bias`` are the scored parameter names (``None`` when not scored).
    """

    weight: Optional[str]
    bias: Optional[str]
    inputs: Tensor
    output_grads: Tensor

    def blocks(self) -> dict[str, Tensor]:
        """The formed per-sample gradients of each scored parameter: ``name -> (b, numel)``."""
        out = {}
        if self.weight is not None:
            out[self.weight] = torch.bmm(self.output_grads.transpose(1, 2), self.inputs).flatten(1)
        if self.bias is not None:
            out[self.bias] = self.output_grads.sum(dim=1)
        return out

    def sq_norms(self) -> Tensor:
        """Squared norms of the per-sample gradients of the scored parameters, ``(b,)``."""
        a, d = self.inputs, self.output_grads
        b, t, d_in = a.shape
        d_out = d.shape[2]
        total = d.sum(dim=1).square().sum(1) if self.bias is not None else torch.zeros(b, dtype=d.dtype, device=d.device)
        if self.weight is None:
            return total
        if t == 1:
            return total + a[:, 0].square().sum(1) * d[:, 0].square().sum(1)
        if t * (d_in + d_out) < d_in * d_out:
            gram = lambda s: ((a[s] @ a[s].transpose(1, 2)) * (d[s] @ d[s].transpose(1, 2))).sum((1, 2))  # noqa: E731
            return total + _in_groups(b, t * t, gram)
        formed = lambda s: torch.bmm(d[s].transpose(1, 2), a[s]).square().sum((1, 2))  # noqa: E731
        return total + _in_groups(b, d_in * d_out, formed)

    def inner(self, other: "LinearGradients") -> Tensor:
        """Inner products of this layer's per-sample gradients with ``other``'s, ``(b, b')``."""
        if self.inputs.shape[1] == 1 and other.inputs.shape[1] == 1:
            products = self.output_grads[:, 0] @ other.output_grads[:, 0].T
            if self.weight is None:
                return products
            inputs = self.inputs[:, 0] @ other.inputs[:, 0].T
            return (inputs + 1.0) * products if self.bias is not None else inputs * products
        return _inner_of_blocks(self.blocks(), other.blocks())


@dataclass(frozen=True)
class ConvGradients:
    """Per-sample gradients of one ``nn.Conv2d``: its inputs ``(b, C_in, H, W)``, output gradients
    ``(b, C_out, H', W')`` and the module (for its stride, padding, dilation and groups).
    """

    weight: Optional[str]
    bias: Optional[str]
    inputs: Tensor
    output_grads: Tensor
    module: nn.Conv2d

    def _weight_gradients(self, group: slice) -> Tensor:
        x, d = self.inputs[group], self.output_grads[group]
        b, c_in, h, w = x.shape
        c_out = d.shape[1]
        conv = self.module
        weight_shape = (b * c_out, c_in // conv.groups, *conv.kernel_size)
        grads = torch.nn.grad.conv2d_weight(
            x.reshape(1, b * c_in, h, w), weight_shape, d.reshape(1, b * c_out, *d.shape[2:]),
            stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=b * conv.groups,
        )
        return grads.reshape(b, -1)

    def blocks(self) -> dict[str, Tensor]:
        """The formed per-sample gradients of each scored parameter: ``name -> (b, numel)``."""
        out = {}
        if self.weight is not None:
            out[self.weight] = self._weight_gradients(slice(None))
        if self.bias is not None:
            out[self.bias] = self.output_grads.sum(dim=(2, 3))
        return out

    def sq_norms(self) -> Tensor:
        """Squared norms of the per-sample gradients of the scored parameters, ``(b,)``."""
        d = self.output_grads
        total = d.sum(dim=(2, 3)).square().sum(1) if self.bias is not None else torch.zeros(d.shape[0], dtype=d.dtype, device=d.device)
        if self.weight is None:
            return total
        numel = self.module.weight.numel()
        return total + _in_groups(d.shape[0], numel, lambda s: self._weight_gradients(s).square().sum(1))

    def inner(self, other: "ConvGradients") -> Tensor:
        """Inner products of this layer's per-sample gradients with ``other``'s, ``(b, b')``."""
        return _inner_of_blocks(self.blocks(), other.blocks())


LayerGradients = Union[LinearGradients, ConvGradients]


def _inner_of_blocks(mine: dict[str, Tensor], theirs: dict[str, Tensor]) -> Tensor:
    return sum(mine[name] @ theirs[name].T for name in mine)


@dataclass(frozen=True)
class BatchGradients:
    """Per-sample gradients of a batch over all scored parameters, factored per layer where possible.

    ``layers`` hold the covered Linear / Conv2d parameters; ``dense`` holds ``(b, p)`` per-sample
    gradients (``vmap(grad)``) of the remaining parameters ``dense_names`` (``None`` if there are
    none), whose sizes are ``dense_sizes``. ``param_names`` is the problem's order of all scored
    parameters (the column order of :meth:`flatten`).
    """

    layers: tuple[LayerGradients, ...]
    dense: Optional[Tensor]
    dense_names: tuple[str, ...]
    dense_sizes: tuple[int, ...]
    param_names: tuple[str, ...]

    def sq_norms(self) -> Tensor:
        """``||grad l_i||^2`` over all scored parameters, shape ``(b,)``."""
        parts = [layer.sq_norms() for layer in self.layers]
        if self.dense is not None:
            parts.append(self.dense.square().sum(1))
        return torch.stack(parts).sum(0)

    def inner(self, other: "BatchGradients") -> Tensor:
        """The matrix of inner products ``<grad l_i, grad l'_j>`` with another batch, ``(b, b')``.

        Both must come from the same problem (the same layers are then covered in both).
        """
        if self.layer_names() != other.layer_names():
            raise ValueError("other: its gradients are factored over other layers; build both from one problem")
        parts = [mine.inner(theirs) for mine, theirs in zip(self.layers, other.layers)]
        if self.dense is not None:
            parts.append(self.dense @ other.dense.T)
        return torch.stack(parts).sum(0)

    def flatten(self) -> Tensor:
        """The formed per-sample gradients ``(b, n_params)``, columns in ``param_names`` order."""
        blocks: dict[str, Tensor] = {}
        for layer in self.layers:
            blocks.update(layer.blocks())
        if self.dense is not None:
            blocks.update(zip(self.dense_names, self.dense.split(list(self.dense_sizes), dim=1)))
        return torch.cat([blocks[name] for name in self.param_names], dim=1)

    def layer_names(self) -> list[tuple[Optional[str], Optional[str]]]:
        """``(weight, bias)`` scored names of each factored layer, in order."""
        return [(layer.weight, layer.bias) for layer in self.layers]


def batch_gradients(problem: ScoringProblem, params: Params, batch: tuple[Tensor, Tensor]) -> BatchGradients:
    """Per-sample loss gradients of the batch ``(x, y)`` at ``params``, factored per layer.

    One forward and one backward pass (to zero probes on the covered layers' outputs) for the
    Linear / Conv2d parameters; ``vmap(grad)`` restricted to the other scored parameters. The batch
    is used as given (take it from :func:`~robust_infl.engine.train_batches` to get adversarial
    training points).
    """
    x, y = batch
    captured = _capture_layers(problem, params, x, y)
    covered = {name for layer in captured for name in (layer.weight, layer.bias) if name is not None}
    dense_names = tuple(name for name in problem.param_names if name not in covered)
    dense = None
    if dense_names:
        sub_problem = dataclasses.replace(
            problem,
            param_names=dense_names,
            params={name: params[name] for name in dense_names},
            frozen={**problem.frozen, **{name: params[name] for name in covered}},
        )
        dense = per_sample_gradients(sub_problem, sub_problem.params, (x, y))
    sizes = tuple(params[name].numel() for name in dense_names)
    return BatchGradients(tuple(captured), dense, dense_names, sizes, problem.param_names)


def squared_gradient_norms(problem: ScoringProblem, params: Optional[Params] = None) -> Tensor:
    """``||grad l_i||^2`` at ``params`` (default ``problem.params``) for every training sample, ``(n_train,)``.

    Streams the training set in batches (adversarial training points in ``train_loss="adversarial"``
    mode); memory is that of one batch.
    """
    params = problem.params if params is None else params
    out = torch.empty(problem.n_train, dtype=problem.dtype, device=problem.device)
    for start, x, y in train_batches(problem, params, desc="squared gradient norms"):
        out[start : start + x.shape[0]] = batch_gradients(problem, params, (x, y)).sq_norms().detach()
    return out


def renormalised(problem: ScoringProblem, params: Params, scores: Tensor) -> Tensor:
    """``scores_i / ||grad l_i(params)||`` (Hammoudeh & Lowd 2022, "Identifying a Training-Set Attack's
    Target Using Renormalized Influence Estimation"), the norms from :func:`squared_gradient_norms`.

    A sample with a zero gradient gets score 0 (its inner products are 0 too).
    """
    norms = squared_gradient_norms(problem, params).sqrt()
    return torch.where(norms > 0, scores / norms.clamp_min(torch.finfo(norms.dtype).tiny), torch.zeros_like(scores))


def _supported(module: nn.Module) -> bool:
    if type(module) is nn.Linear:
        return True
    return type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)


def _candidate_layers(problem: ScoringProblem) -> list[tuple[nn.Module, Optional[str], Optional[str]]]:
    """Supported modules owning at least one scored parameter (not shared with another module),
    with the scored names of their weight and bias (``None`` when not scored)."""
    scored = set(problem.param_names)
    owners: dict[int, int] = {}
    for module in problem.model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    candidates = []
    for prefix, module in problem.model.named_modules():
        if not _supported(module) or any(owners[id(p)] > 1 for p in module.parameters(recurse=False)):
            continue
        names = [
            name if getattr(module, attr) is not None and name in scored else None
            for attr in ("weight", "bias")
            for name in [f"{prefix}.{attr}" if prefix else attr]
        ]
        if any(names):
            candidates.append((module, names[0], names[1]))
    return candidates


def _capture_layers(problem: ScoringProblem, params: Params, x: Tensor, y: Tensor) -> list[LayerGradients]:
    """Forward with zero probes added to the candidate layers' outputs, backward to the probes.

    Returns the factored gradients of the layers the forward called exactly once with the sample
    dimension first.
    """
    candidates = _candidate_layers(problem)
    calls: dict[nn.Module, list[tuple[Tensor, Tensor]]] = {module: [] for module, _, _ in candidates}

    def add_probe(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        probe = output.new_zeros(()).expand(output.shape).requires_grad_(True)
        calls[module].append((inputs[0].detach(), probe))
        return output + probe

    handles = [module.register_forward_hook(add_probe) for module, _, _ in candidates]
    try:
        with torch.enable_grad():
            losses = problem.loss_fn(problem.outputs(params, x), y)
    finally:
        for handle in handles:
            handle.remove()
    covered = [
        (module, weight, bias)
        for module, weight, bias in candidates
        if len(calls[module]) == 1 and calls[module][0][0].shape[0] == x.shape[0]
    ]
    if not covered:
        return []
    probes = [calls[module][0][1] for module, _, _ in covered]
    grads = torch.autograd.grad(losses.sum(), probes, allow_unused=True)
    layers: list[LayerGradients] = []
    for (module, weight, bias), probe, grad in zip(covered, probes, grads):
        inputs = calls[module][0][0]
        output_grads = torch.zeros(probe.shape, dtype=probe.dtype, device=probe.device) if grad is None else grad
        if isinstance(module, nn.Conv2d):
            layers.append(ConvGradients(weight, bias, inputs, output_grads, module))
        else:
            b = inputs.shape[0]
            layers.append(LinearGradients(weight, bias, inputs.reshape(b, -1, inputs.shape[-1]),
                                          output_grads.reshape(b, -1, output_grads.shape[-1])))
    return layers
