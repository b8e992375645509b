"""The attack interface: the :class:`Attack` base class, batch / logits / output checks, settings records.

An attack is a callable ``attack(model, x, y) -> x_adv`` with the same shape, dtype and device
as ``x``. :class:`Attack` runs the subclass's ``_perturb`` on ``x`` in the model's dtype and on its device
(:func:`attacks.inputs.to_model`; the result is returned in ``x``'s), with the model switched to eval mode and
its parameters frozen (``requires_grad=False``), then restores each module's train/eval mode,
each parameter's ``requires_grad`` and any ``.grad`` the parameters held before, so an attack
leaves no trace on the model.

Models output either ``C >= 2`` logits (cross-entropy) or ONE logit (binary, BCE with logits,
label 1 = positive logit). Own attacks maximise :func:`attacks.plumbing.per_sample_loss`;
third-party libraries see a one-logit model through :class:`BinaryAsTwoLogits` (logits
``[0, z]``), which makes the same decisions.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import re
from abc import ABC, abstractmethod

import torch
from torch import nn

from .bounds import resolve_bounds
from .inputs import check_inputs, to_model
from .plumbing import frozen_in_eval
from .validation import NORMS, check_model, check_output_shape

__all__ = [
    "Attack",
    "BinaryAsTwoLogits",
    "check_batch",
    "check_logits",
    "check_attack_output",
    "attack_settings",
    "plain_value",
    "predict",
]


def check_batch(x, y) -> None:
    """Check that ``x`` is a finite floating batch ``(n, ...)`` (:func:`attacks.inputs.check_inputs`) and ``y``
    integer labels ``(n,)`` beside it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: must be a floating-point tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x: expected a batch of shape (n, ...), got shape {tuple(x.shape)}")
    check_inputs(x, "x", field=None)
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y: must be a tensor of class labels, got {type(y).__name__}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise TypeError(f"y: must hold integer class labels, got {y.dtype}")
    if tuple(y.shape) != (x.shape[0],):
        raise ValueError(f"y: expected shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
    if y.device != x.device:
        raise ValueError(f"y: is on {y.device} but x is on {x.device}")


def check_logits(logits: torch.Tensor, y: torch.Tensor) -> int:
    """Check the model's outputs ``(n, C)`` (finite) against labels ``y`` and return ``C``."""
    check_output_shape(logits, y.shape[0])
    if not bool(torch.isfinite(logits).all()):
        raise ValueError("model: produced non-finite outputs (NaN or infinity) on the attacked batch")
    num_classes = max(logits.shape[1], 2)
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y: labels must lie in [0, {num_classes}) for a model with "
                         f"{logits.shape[1]} output(s), got range [{int(y.min())}, {int(y.max())}]")
    return logits.shape[1]


def predict(logits: torch.Tensor) -> torch.Tensor:
    """Predicted class of every sample: argmax for ``C >= 2`` logits, ``logit > 0`` for one."""
    check_output_shape(logits, logits.shape[0] if logits.dim() else 0)
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long()
    return logits.argmax(dim=1)


def plain_value(value):
    """``value`` as plain JSON data: numbers, strings, lists, dicts; small tensors as lists, large ones by
    shape and hash; attacks and other callables by :func:`attack_settings`.

    The one fingerprint of settings: what a report records, what a resumed defence run compares
    (:mod:`defenses.seed_results`) and what identifies a scoring store (:mod:`robust_infl.store`) or
    fitted EK-FAC factors; equal settings give equal values in every process."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() <= 64:
            return value.detach().cpu().tolist()
        digest = hashlib.sha256(value.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        return {"shape": list(value.shape), "sha256": digest}
    if isinstance(value, (tuple, list)):
        return [plain_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if callable(value) or hasattr(value, "__dict__"):
        return attack_settings(value)
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(value))  # no memory address: equal in every process


def attack_settings(attack) -> dict:
    """The class of ``attack`` and every public parameter it holds, as plain JSON data.

    What a report records and a resumed run compares: ``{"class": "attacks.pgd.PGD", "eps": 0.1,
    "steps": 5, ...}``. A plain function is identified by its qualified name and a hash of its code
    and constants, the plain values it closes over and its public attributes (``{"class": "function",
    "name": ..., "code": ..., "closure": [...]}``); a ``functools.partial`` by its function and arguments.
    """
    if inspect.isfunction(attack) or inspect.ismethod(attack):
        code = attack.__code__
        digest = hashlib.sha256(code.co_code + repr(code.co_consts).encode()).hexdigest()[:16]
        cells = [cell.cell_contents for cell in (getattr(attack, "__closure__", None) or ())]
        closure = [v if v is None or isinstance(v, (bool, int, float, str)) else type(v).__name__ for v in cells]
        return {"class": "function", "name": attack.__qualname__, "code": digest, "closure": closure,
                **{k: plain_value(v) for k, v in vars(attack).items() if not k.startswith("_")}}
    if isinstance(attack, functools.partial):
        return {"class": "functools.partial", "func": attack_settings(attack.func),
                "args": plain_value(attack.args), "keywords": plain_value(attack.keywords)}
    cls = type(attack)
    public = vars(attack).items() if hasattr(attack, "__dict__") else ()
    params = {k: plain_value(v) for k, v in public if not k.startswith("_")}
    return {"class": f"{cls.__module__}.{cls.__qualname__}", **params}


def check_attack_output(attack, x: torch.Tensor, x_adv: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` starting with ``name`` when ``x_adv`` leaves the budget or bounds ``attack`` declares.

    The declared budget is the attack's ``eps`` in its ``norm`` (``"linf"`` or ``"l2"``), the bounds
    its ``bounds`` (``(low, high)`` numbers or per-feature tensors); undeclared ones are not checked.
    A relative slack of 1e-4 (plus 1e-6) absorbs floating-point rounding.
    """
    eps, norm, bounds = getattr(attack, "eps", None), getattr(attack, "norm", None), getattr(attack, "bounds", None)
    delta = (x_adv.detach() - x.detach()).flatten(1).to(torch.float64)
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and norm in NORMS and delta.numel():
        size = delta.abs().amax(dim=1) if norm == "linf" else delta.norm(dim=1)
        largest = float(size.max())
        if largest > eps * (1 + 1e-4) + 1e-6:
            raise ValueError(f"{name}: returned points outside its {norm} budget eps={eps} "
                             f"(largest perturbation {largest:.6g})")
    if isinstance(bounds, (tuple, list)) and len(bounds) == 2:
        low, high = resolve_bounds(tuple(bounds), x)
        slack = 1e-6
        outside = int(((x_adv < low - slack) | (x_adv > high + slack)).sum())
        if outside:
            raise ValueError(f"{name}: returned {outside} value(s) outside its bounds {plain_value(tuple(bounds))}")


class BinaryAsTwoLogits(nn.Module):
    """Show a one-logit binary model to libraries that expect class logits: ``z -> [0, z]``.

    ``softmax([0, z])[1] = sigmoid(z)``, so decisions and cross-entropy equal the binary ones.
    Models with ``C >= 2`` outputs pass through unchanged.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if logits.dim() == 2 and logits.shape[1] == 1:
            return torch.cat([torch.zeros_like(logits), logits], dim=1)
        return logits


class Attack(ABC):
    """Base class of an attack ``attack(model, x, y) -> x_adv``.

    Subclasses implement ``_perturb(model, x, y)``, which receives validated, detached, finite
    inputs, a model in eval mode with frozen parameters, and gradients enabled. A non-finite result
    (a model producing NaN) raises ``ValueError`` naming ``model``; a result outside the budget or
    bounds the attack declares (``eps`` / ``norm`` / ``bounds``) one naming the attack's class.
    """

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Return adversarial examples for the batch ``(x, y)`` (same shape, dtype, device as ``x``)."""
        check_batch(x, y)
        check_model(model)
        if x.shape[0] == 0:
            return x.detach().clone()
        x_model = to_model(x, model).detach()
        with frozen_in_eval(model), torch.enable_grad():
            x_adv = self._perturb(model, x_model, y.detach().to(x_model.device))
        bad = int((~torch.isfinite(x_adv)).sum())
        if bad:
            raise ValueError(f"model: its outputs or gradients made {bad} adversarial value(s) NaN or infinite")
        x_adv = x_adv.detach().to(device=x_model.device, dtype=x_model.dtype).reshape(x.shape)
        check_attack_output(self, x_model, x_adv, type(self).__name__)
        return x_adv.to(device=x.device, dtype=x.dtype)

    @abstractmethod
    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Compute the adversarial batch; called by ``__call__``."""

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({settings})"
