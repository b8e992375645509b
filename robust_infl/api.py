"""The public entry point: :func:`influence` scores every training sample against an objective."""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Optional, Union

from torch import Tensor, nn
from torch.utils.data import Dataset

from robust_infl.ensembles import Ensemble
from robust_infl.methods import check_aggregate, check_method_options, get_ensemble, get_method
from robust_infl.objectives import Objective
from robust_infl.options import ScoringOptions, scoring_options
from robust_infl.preparation import prepared_problem

__all__ = ["influence"]


def influence(
    model: Union[nn.Module, Ensemble],
    train: Union[tuple[Tensor, Tensor], Dataset],
    target: Union[tuple[Tensor, Tensor], tuple[Tensor, Tensor, Tensor]],
    *,
    objective: Objective,
    method: str = "ip",
    options: Optional[ScoringOptions] = None,
    **keywords: Any,
) -> Tensor:
    """Harm score of every training sample on ``objective`` evaluated on ``target``.

    Harm convention: ``harm_i > 0`` is the first-order prediction that REMOVING training sample
    ``i`` DECREASES the objective, proportional to that predicted decrease (larger = more harmful).
    The scoring options (``loss_fn``, ``damping``, ``batch_size``, ``params``, ``seed``, ``train_loss``,
    ``train_attack``, ``device``, ``progress``, ``aggregate``) are the fields of
    :class:`~robust_infl.options.ScoringOptions`, given as ``options=ScoringOptions(...)`` or as
    keywords of the same names (a keyword wins over ``options``), exactly as for
    :func:`robust_infl.distributed.sharded_influence`; they are checked before any compute.

    Args:
        model: the trained ``nn.Module``; scored in eval mode, its train/eval mode is restored after. Or an
            :class:`~robust_infl.ensembles.Ensemble` of trained models of one architecture: the method's
            scores averaged over them (for ``"trak"`` TRAK's own ensemble; ``"tracin"`` is refused), each
            member scored with these same options (see :mod:`robust_infl.ensembles`).
        train: ``(X, y)`` tensors or arrays, a sized ``Dataset`` of ``(x, y)`` items (streamed, not
            shuffled) or a ``DataLoader`` over one (its dataset is streamed in ``batch_size`` batches).
        target: ``(X, y)`` or ``(X, y, s)`` with a sensitive attribute ``s`` in {0, 1}, or a
            ``Dataset`` / ``DataLoader`` of such items (read whole).
        objective: ``Utility()``, ``Robust(attack)``, ``DemographicParity()``,
            ``EqualOpportunity()`` or another :class:`~robust_infl.objectives.Objective`.
        method: a name from ``robust_infl.available_methods()``; each method's options (passed as
            keywords) are documented in the docstring of its function, in the module named:

            - ``"ip"``: ``-<grad f, grad l_i>``, identity Hessian, one forward-mode pass
              (``methods.ip``; ``renormalize``; ``aggregate=False`` also for ``ip-ensemble``, ``if-exact``, ``if-cg``,
              ``if-lissa``, ``datainf``, ``trak``, ``ekfac``, ``kfac``).
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
              its ``damping_factor``; ``aggregate``); needs the ``ekfac`` extra.
            - ``"trak"``: TRAK through TRAK's package ``traker``: projected per-sample margin gradients
              with a Gauss-Newton inverse in the projected space (``methods.trak``; ``proj_dim``,
              ``aggregate``; ``seed`` seeds its projector, ``damping`` is its ``lambda_reg``); needs
              the ``trak`` extra.
            - ``"self"``, ``"loss"``, ``"random"``: objective-free baselines, the squared gradient norm,
              the training loss and seeded noise (``methods.baselines``; no options).
        options: the scoring options as one :class:`~robust_infl.options.ScoringOptions` (None: its
            defaults), documented there: ``loss_fn`` (default cross-entropy, or BCE with logits for one
            output), ``damping`` (``lambda`` in ``H = (1/n) sum_i Hessian(l_i) + lambda * I``, Hessian
            methods; for ``"ekfac"`` / ``"kfac"`` ``0`` means Kronfluence's default; for ``"trak"`` TRAK's
            ``lambda_reg``, added to its ``Phi^T Phi``), ``batch_size``,
            ``params`` (the scored parameters), ``seed`` (same seed, same scores), ``train_loss`` /
            ``train_attack`` (training losses at ``train_attack(model, x, y)``), ``device``, ``progress``
            and ``aggregate`` (``False``: the ``(n_train, n_target)`` matrix of harms on each target
            sample's own loss; ``robust_infl.methods.per_target_methods()`` lists the methods that give it).
        **keywords: any field of ``options`` by name, and the method's options (see ``method``);
            a name the method does not take raises ``TypeError``.

    Returns:
        A tensor of shape ``(n_train,)`` (``(n_train, n_target)`` with ``aggregate=False``, or as
        documented by the method option) on ``device``, in the model's floating dtype.
    """
    if not isinstance(method, str):
        raise TypeError(f"method: expected a method name (str), got {type(method).__name__}")
    method_fn = get_method(method)
    options, method_options = scoring_options(options, keywords)
    check_method_options(method, method_options)
    check_aggregate(method, options.aggregate, objective)
    if isinstance(model, Ensemble):
        ensemble_fn = get_ensemble(method)
        with ExitStack() as stack:
            problems = [stack.enter_context(prepared_problem(member, train, target, objective, options)).problem
                        for member in model]
            return ensemble_fn(problems, **method_options).detach()
    with prepared_problem(model, train, target, objective, options) as prepared:
        return method_fn(prepared.problem, **method_options).detach()
