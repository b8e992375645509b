"""Registry of influence methods: ``influence(..., method=name)`` looks the name up here.

Contract for a method
---------------------
A method is a function ``fn(problem, **options) -> torch.Tensor`` registered with
``@register_method("name")`` in its own file ``robust_infl/methods/<name>.py``, plus ONE import
line at the bottom of this file. It receives a validated
:class:`~robust_infl.engine.ScoringProblem` (model in eval mode, scored parameters in
``problem.params``, data, objective, loss, damping, seed and progress flag on the problem) and
returns a tensor of shape ``(problem.n_train,)`` in the harm convention: a positive value is the
first-order prediction that REMOVING the training sample DECREASES the objective, proportional to
that predicted decrease. A method registered with ``per_target=True`` returns the
``(n_train, n_target)`` matrix of harms on each target sample's own loss when
``problem.aggregate`` is False (the scoring option ``aggregate``; :func:`check_aggregate` refuses it
for the other methods). Scoring an :class:`~robust_infl.ensembles.Ensemble` of trained models averages the
method's scores over the members (one problem per member, each with the run's options), unless the method
registers its own ensemble (``ensemble=fn(problems, **options)``, e.g. TRAK's, which averages as TRAK does) or
is registered with ``single_model=True`` (a method that scores one model's own checkpoints; refused). Options (e.g. ``renormalize`` for ``"ip"``) are keyword-only parameters
with defaults; ``influence`` passes the keywords that are not scoring options through and rejects
names the function does not declare (unless it takes ``**kwargs``). A method that returns another
shape for some option documents it. Build methods from the operators in :mod:`robust_infl.engine`, which take
the parameter dict explicitly; use ``problem.seed`` for any random choice and
``problem.progress`` for progress bars.
"""

from __future__ import annotations

import inspect
from typing import Callable, Optional, Sequence

import torch

from robust_infl.engine import ScoringProblem, check_per_target
from robust_infl.objectives import Objective

__all__ = ["MethodFn", "EnsembleFn", "register_method", "available_methods", "per_target_methods",
           "get_method", "get_ensemble",
           "check_method_options", "check_aggregate"]

MethodFn = Callable[..., torch.Tensor]
EnsembleFn = Callable[..., torch.Tensor]
"""``fn(problems, **options) -> Tensor``: a method's scores over several trained models (one problem each)."""

_METHODS: dict[str, MethodFn] = {}
_PER_TARGET: set[str] = set()
_ENSEMBLES: dict[str, EnsembleFn] = {}
_SINGLE_MODEL: set[str] = set()


def register_method(name: str, *, per_target: bool = False, ensemble: Optional[EnsembleFn] = None,
                    single_model: bool = False) -> Callable[[MethodFn], MethodFn]:
    """Decorator registering an influence method under ``name`` (names must be unique); ``per_target``:
    the method also returns the train x target matrix (when ``problem.aggregate`` is False); ``ensemble``:
    the method's own scores over an ensemble of models, ``ensemble(problems, **options)`` (None: the mean of
    the members' scores); ``single_model``: the method scores one model only (an ensemble is refused)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name: must be a non-empty string, got {name!r}")
    if ensemble is not None and single_model:
        raise ValueError("ensemble: a single_model method has no ensemble")

    def decorate(fn: MethodFn) -> MethodFn:
        if name in _METHODS and _METHODS[name] is not fn:
            raise ValueError(f"name: method {name!r} is already registered")
        _METHODS[name] = fn
        if per_target:
            _PER_TARGET.add(name)
        if ensemble is not None:
            _ENSEMBLES[name] = ensemble
        if single_model:
            _SINGLE_MODEL.add(name)
        return fn

    return decorate


def available_methods() -> tuple[str, ...]:
    """Names of the registered methods, sorted."""
    return tuple(sorted(_METHODS))


def per_target_methods() -> tuple[str, ...]:
    """Names of the methods that also return the train x target matrix (``aggregate=False``), sorted."""
    return tuple(sorted(_PER_TARGET))


def get_method(name: str) -> MethodFn:
    """The method registered under ``name``; ``ValueError`` listing the valid names otherwise."""
    if name not in _METHODS:
        raise ValueError(f"method: unknown method {name!r}; valid names are {', '.join(available_methods())}")
    return _METHODS[name]


def get_ensemble(name: str) -> EnsembleFn:
    """``fn(problems, **options)``: method ``name``'s scores over several trained models, its own ensemble or
    the mean of the members' scores; ``ValueError`` naming ``model`` for a method that scores one model only."""
    method_fn = get_method(name)
    if name in _SINGLE_MODEL:
        raise ValueError(f"model: method {name!r} scores the checkpoints of one model; pass one nn.Module, "
                         f"not an Ensemble")
    if name in _ENSEMBLES:
        return _ENSEMBLES[name]

    def mean_of_members(problems: Sequence[ScoringProblem], **options) -> torch.Tensor:
        total = method_fn(problems[0], **options).detach()
        for problem in problems[1:]:
            total = total + method_fn(problem, **options).detach()
        return total / len(problems)

    return mean_of_members


def check_method_options(name: str, options: dict) -> None:
    """Raise ``TypeError`` if method ``name`` does not declare every keyword in ``options``."""
    parameters = list(inspect.signature(get_method(name)).parameters.values())[1:]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return
    accepted = [p.name for p in parameters if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"method_options: method {name!r} does not accept {unknown}; "
            f"its options are {accepted if accepted else 'none'}"
        )


def check_aggregate(name: str, aggregate: bool, objective: Objective) -> None:
    """Before any compute: ``aggregate=False`` (a train x target matrix) needs a method registered with
    ``per_target=True`` and an objective with per-target-sample values; ``ValueError`` naming
    ``aggregate`` otherwise."""
    if aggregate:
        return
    if name not in _PER_TARGET:
        raise ValueError(f"aggregate: method {name!r} gives one score per training sample (aggregate=False is "
                         f"offered by {', '.join(sorted(_PER_TARGET))}); use aggregate=True")
    if isinstance(objective, Objective):  # anything else is refused where the objective is checked
        check_per_target(objective)


# One import line per method file (each registers itself on import).
from robust_infl.methods import ip  # noqa: E402,F401
from robust_infl.methods import hessian  # noqa: E402,F401
from robust_infl.methods import ensemble  # noqa: E402,F401
from robust_infl.methods import tracin  # noqa: E402,F401
from robust_infl.methods import iterative  # noqa: E402,F401
from robust_infl.methods import datainf  # noqa: E402,F401
from robust_infl.methods import baselines  # noqa: E402,F401
from robust_infl.methods import ekfac  # noqa: E402,F401
from robust_infl.methods import trak  # noqa: E402,F401
