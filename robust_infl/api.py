"""The public entry point: :func:`influence` scores every training sample against an objective."""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from robust_infl.methods import check_method_options, get_method
from robust_infl.objectives import Attack, LossFn, Objective
from robust_infl.options import ScoringOptions
from robust_infl.preparation import prepared_problem

__all__ = ["influence"]


def influence(
    model: nn.Module,
    train: Union[tuple[Tensor, Tensor], Dataset],
    target: Union[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
    *,
    objective: Objective,
    method: str = "ip",
    loss_fn: Optional[LossFn] = None,
    damping: float = 0.0,
    batch_size: int = 256,
    params: Optional[Sequence[str]] = None,
    seed: int = 0,
    train_loss: str = "clean",
    train_attack: Optional[Attack] = None,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    **method_options: Any,
) -> Tensor:
    """Harm score of every training sample on ``objective`` evaluated on ``target``.

    Harm convention: ``harm_i > 0`` is the first-order prediction that REMOVING training sample
    ``i`` DECREASES the objective, proportional to that predicted decrease (larger = more harmful).
    The scoring keywords ``loss_fn`` to ``progress`` are checked, and passed down, as one
    :class:`~robust_infl.options.ScoringOptions`.

    Args:
        model: the trained ``nn.Module``; scored in eval mode, its train/eval mode is restored after.
        train: ``(X, y)`` tensors or arrays, a sized ``Dataset`` of ``(x, y)`` items (streamed, not
            shuffled) or a ``DataLoader`` over one (its dataset is streamed in ``batch_size`` batches).
        target: ``(X, y)`` or ``(X, y, s)`` with a sensitive attribute ``s`` in {0, 1}, or a
            ``Dataset`` / ``DataLoader`` of such items (read whole).
        objective: ``Utility()``, ``Robust(attack)``, ``DemographicParity()``,
            ``EqualOpportunity()`` or another :class:`~robust_infl.objectives.Objective`.
        method: a name from ``robust_infl.available_methods()``; each method's options (passed as
            ``**method_options``) are documented in the docstring of its function, in the module named:

            - ``"ip"``: ``-<grad f, grad l_i>``, identity Hessian, one forward-mode pass
              (``methods.ip``; ``aggregate``).
            - ``"ip-ensemble"``: IP summed or averaged over seeded dropout-masked or weight-noised
              copies of the model (``methods.ensemble``; ``members``, ``perturbation``, ``scale``, ``combine``).
            - ``"tracin"``: learning-rate-weighted IP over saved checkpoints (``methods.tracin``;
              ``checkpoints``, ``lrs``).
            - ``"if-exact"``: influence function with the explicit damped Hessian, at most
              ``methods.hessian.MAX_PARAMS`` scored parameters (``methods.hessian``; ``hvp_chunk_size``).
            - ``"if-cg"``: influence function, ``H^{-1} grad f`` by conjugate gradient
              (``methods.iterative``; ``tol``, ``max_iter``).
            - ``"if-lissa"``: influence function, ``H^{-1} grad f`` by the LiSSA recursion
              (``methods.iterative``; ``depth``, ``scale``, ``repeats``, ``hvp_batch_size``).
            - ``"datainf"``: DataInf's layer-wise closed-form inverse (``methods.datainf``; ``lambda_scale``).
            - ``"ekfac"``, ``"kfac"``: influence function with Kronfluence's (E)K-FAC curvature, factors
              cached per model (``methods.ekfac``; ``strategy``, ``use_empirical_fisher``; ``damping`` is
              its ``damping_factor``); needs the ``ekfac`` extra.
            - ``"trak"``: TRAK through TRAK's package ``traker``: projected per-sample margin gradients
              with a Gauss-Newton inverse in the projected space (``methods.trak``; ``proj_dim``,
              ``aggregate``; ``seed`` seeds its projector, ``damping`` is its ``lambda_reg``); needs
              the ``trak`` extra.
            - ``"self"``, ``"loss"``, ``"random"``: objective-free baselines, the squared gradient norm,
              the training loss and seeded noise (``methods.baselines``; no options).
        loss_fn: per-sample loss ``loss_fn(outputs, targets) -> (n,)``; default cross-entropy for
            >= 2 outputs, binary cross-entropy with logits for 1 output (labels are then checked
            against the model's classes).
        damping: ``lambda`` in ``H = (1/n) sum_i Hessian(l_i) + lambda * I`` (Hessian methods; for
            ``"ekfac"`` / ``"kfac"`` added to the approximate curvature, ``0`` meaning Kronfluence's default;
            for ``"trak"`` TRAK's ``lambda_reg``, added to its ``Phi^T Phi``).
        batch_size: training (and target) samples per batch.
        params: names of the parameters to score (e.g. only the last layer); all trainable ones
            by default.
        seed: seeds every random choice (attacks, ensemble members); same seed, same scores.
        train_loss: ``"clean"``, or ``"adversarial"`` to take the per-sample training losses at
            ``train_attack(model, x, y)`` (adversarially trained models).
        train_attack: the training-point attack for ``train_loss="adversarial"``.
        device: where to compute; the model's device by default.
        progress: show tqdm progress bars over training batches.
        **method_options: passed to the method (see ``method``), e.g. ``aggregate=False`` for ``"ip"``
            (returns the ``(n_train, n_target)`` matrix of harms on each target sample's own loss);
            a name the method does not take raises ``TypeError``.

    Returns:
        A tensor of shape ``(n_train,)`` (or as documented by the method option) on ``device``, in
        the model's floating dtype.
    """
    if not isinstance(method, str):
        raise TypeError(f"method: expected a method name (str), got {type(method).__name__}")
    method_fn = get_method(method)
    check_method_options(method, method_options)
    options = ScoringOptions(loss_fn=loss_fn, damping=damping, batch_size=batch_size, params=params, seed=seed,
                             train_loss=train_loss, train_attack=train_attack, device=device, progress=progress)
    with prepared_problem(model, train, target, objective, options) as prepared:
        return method_fn(prepared.problem, **method_options).detach()
