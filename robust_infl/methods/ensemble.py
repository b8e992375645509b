"""IP-ensemble: the inner-product score summed (or averaged) over perturbed copies of the model.

    harm_i = combine over members m of  - <grad f(theta_m), grad l_i(theta_m)>

(arXiv 2405.17490, the "ensemble" variant). Member 0 is the trained model itself; the others are
fixed perturbed functions of it, drawn from a ``torch.Generator`` seeded with the scoring seed:

- ``perturbation="dropout"``: every non-final ``Linear`` / ``Conv`` layer's output is multiplied
  by an inverted-dropout mask (keep with probability ``1 - p``, scaled by ``1 / (1 - p)``), with
  a rate ``p ~ U(0, scale)`` drawn per member and per layer, as in the paper's code. The masks are
  applied by forward hooks inside the problem's pluggable forward, so the model needs no dropout
  layer. A mask has one entry per output feature of one sample and is shared by every sample, so
  a member is ONE fixed function: the same masks enter its objective gradient (and attack) and
  its training losses.
- ``perturbation="gaussian"``: N(0, scale^2) noise added to every scored parameter (the paper
  uses 0.01 for logistic regression).

For ``Robust`` objectives the attack is recomputed on each member. With the scoring option
``aggregate=False`` every member gives IP's ``(n_train, n_target)`` matrix (each target sample's own
loss, at the member's own attack point for ``Robust``), combined the same way.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from attacks.plumbing import make_generator
from attacks.validation import check_choice, check_fraction, check_int, check_positive
from robust_infl.engine import ForwardFn, ScoringProblem, harm_along, objective_gradient
from robust_infl.methods import register_method
from robust_infl.methods.ip import per_target_harm

__all__ = ["ip_ensemble_influence", "dropout_layers", "dropout_forward"]

PERTURBATIONS = ("dropout", "gaussian")
COMBINES = ("sum", "mean")
MASKED_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def dropout_layers(problem: ScoringProblem) -> list[tuple[nn.Module, torch.Size]]:
    """The non-final ``Linear`` / ``Conv`` modules in execution order, with one sample's output shape.

    Found by one probing forward pass on the first target sample; the last layer of these types to
    run is the output layer and is excluded.
    """
    seen: dict[nn.Module, torch.Size] = {}

    def record(module: nn.Module, inputs, output: Tensor) -> None:
        shape = output.shape[1:]
        if seen.setdefault(module, shape) != shape:
            raise ValueError(
                f"perturbation: layer {type(module).__name__} runs several times with different output "
                "shapes, so one dropout mask cannot fit it; use perturbation='gaussian'"
            )
        seen[module] = seen.pop(module)  # move to the end: order of the LAST call

    layers = [m for m in problem.model.modules() if isinstance(m, MASKED_LAYER_TYPES)]
    handles = [m.register_forward_hook(record) for m in layers]
    try:
        with torch.no_grad():
            problem.outputs(problem.params, problem.target.x[:1])
    finally:
        for handle in handles:
            handle.remove()
    return list(seen.items())[:-1]


def dropout_forward(problem: ScoringProblem, masks: Mapping[nn.Module, Tensor]) -> ForwardFn:
    """The problem's forward with each module's output multiplied by its mask (forward hooks)."""
    base = problem.forward

    def hook_for(mask: Tensor) -> Callable:
        return lambda module, inputs, output: output * mask

    def forward(all_params: Mapping[str, Tensor], buffers: Mapping[str, Tensor], x: Tensor) -> Tensor:
        handles = [module.register_forward_hook(hook_for(mask)) for module, mask in masks.items()]
        try:
            if base is not None:
                return base(all_params, buffers, x)
            return functional_call(problem.model, (dict(all_params), dict(buffers)), (x,))
        finally:
            for handle in handles:
                handle.remove()

    return forward


def _draw_masks(
    layers: list[tuple[nn.Module, torch.Size]], scale: float, generator: torch.Generator, problem: ScoringProblem
) -> dict[nn.Module, Tensor]:
    masks = {}
    for module, shape in layers:
        rate = float(torch.rand((), generator=generator, dtype=torch.float64)) * scale
        keep = torch.rand(shape, generator=generator, dtype=torch.float64) >= rate
        masks[module] = (keep / (1 - rate)).to(device=problem.device, dtype=problem.dtype)
    return masks


def _ip(problem: ScoringProblem, params: dict[str, Tensor]) -> Tensor:
    if not problem.aggregate:
        return per_target_harm(problem, params)
    return harm_along(problem, params, objective_gradient(problem, params))


@register_method("ip-ensemble", per_target=True)
def ip_ensemble_influence(
    problem: ScoringProblem,
    *,
    members: int = 5,
    perturbation: str = "dropout",
    scale: float = 0.01,
    combine: str = "sum",
) -> Tensor:
    """IP harm combined over ``members`` models (member 0 unperturbed), shape ``(n_train,)`` (with
    ``aggregate=False`` the ``(n_train, n_target)`` matrix, see the module docstring).

    Args:
        members: number of models M >= 1 (``members=1`` is exactly ``"ip"``).
        perturbation: ``"dropout"`` (functional dropout masks on the outputs of the non-final
            Linear/Conv layers, rates ~ U(0, scale)) or ``"gaussian"`` (N(0, scale^2) noise on the
            scored parameters).
        scale: the largest dropout rate (in (0, 1)) or the noise standard deviation (> 0).
        combine: ``"sum"`` (the paper) or ``"mean"`` of the member scores.

    ``problem.damping`` is ignored (H = I). Members are drawn from a generator seeded with
    ``problem.seed``: the same seed gives identical scores.
    """
    members = check_int(members, "members", minimum=1)
    perturbation = check_choice(perturbation, "perturbation", PERTURBATIONS)
    scale = check_fraction(scale, "scale") if perturbation == "dropout" else check_positive(scale, "scale")
    combine = check_choice(combine, "combine", COMBINES)
    layers = dropout_layers(problem) if perturbation == "dropout" and members > 1 else []
    if perturbation == "dropout" and members > 1 and not layers:
        raise ValueError(
            "perturbation: 'dropout' needs at least one Linear/Conv layer before the output layer; "
            "this model has none (e.g. logistic regression), use perturbation='gaussian'"
        )
    generator = make_generator(problem.seed)
    total = _ip(problem, problem.params)
    for _ in tqdm(range(1, members), desc="ip-ensemble members", disable=None if problem.progress else True,
                  leave=False):
        if perturbation == "dropout":
            member = problem.with_forward(dropout_forward(problem, _draw_masks(layers, scale, generator, problem)))
            total = total + _ip(member, problem.params)
        else:
            noisy = {
                name: p + scale * torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p)
                for name, p in problem.params.items()
            }
            total = total + _ip(problem, noisy)
    return total / members if combine == "mean" else total
