"""Third-party attacks behind the ``attack(model, x, y) -> x_adv`` interface.

* :class:`TorchAttacks` runs any attack of torchattacks [https://github.com/Harry24k/adversarial-attacks-pytorch]
  by class name.
* :class:`AutoAttack` runs AutoAttack from its authors' own code (Croce & Hein, the PyPI package
  ``pyautoattack``; ``backend="autoattack"``, the default) or torchattacks' re-implementation
  (``backend="torchattacks"``), with the class count read off the model; ``components`` picks single
  attacks of the ensemble (e.g. ``("apgd-ce",)`` or ``("apgd-t",)``, targeted APGD-DLR).
* :class:`ART` runs any evasion attack of the Adversarial Robustness Toolbox
  [https://github.com/Trusted-AI/adversarial-robustness-toolbox] by class name, on the model wrapped
  in ART's ``PyTorchClassifier``.

Both libraries expect class logits: a one-logit binary model is shown to them as ``[0, z]``
(:class:`~attacks.base.BinaryAsTwoLogits`). Each call runs under a fixed ``seed`` (torch and numpy
global generators forked and restored), so the same seed gives the same output. The libraries are
imported when an adapter is built, not when ``attacks`` is imported.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from typing import Callable, Dict, Tuple

import numpy as np
import torch
from torch import nn

from .base import Attack, BinaryAsTwoLogits, check_logits
from .bounds import BoundsLike, check_bounds, check_within_bounds, resolve_bounds
from .plumbing import seeded
from .validation import check_choice, check_eps, check_norm, check_seed

__all__ = ["TorchAttacks", "AutoAttack", "ART", "torchattacks_names", "art_evasion_names"]

AUTOATTACK_VERSIONS = ("standard", "plus", "rand")
AUTOATTACK_BACKENDS = ("autoattack", "torchattacks")
AUTOATTACK_COMPONENTS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab", "fab-t", "square")
# Classes each component needs: the DLR loss reads the third-largest logit, its targeted form the fourth.
_COMPONENT_CLASSES = {"apgd-dlr": 3, "apgd-t": 4}


def torchattacks_names() -> Tuple[str, ...]:
    """Names of the attack classes torchattacks exports (wrappers such as MultiAttack excluded)."""
    import torchattacks

    return tuple(sorted(n for n in torchattacks.__all__ if n not in torchattacks.__wrapper__))


def art_evasion_names() -> Tuple[str, ...]:
    """Names of the evasion attack classes in ``art.attacks.evasion``."""
    import art.attacks.evasion as evasion
    from art.attacks.attack import EvasionAttack

    return tuple(sorted(name for name, obj in vars(evasion).items()
                        if inspect.isclass(obj) and issubclass(obj, EvasionAttack)))


def _lookup(module, name, valid: Tuple[str, ...], library: str):
    """Return ``module.<name>`` after checking ``name`` is one of ``valid``."""
    if not isinstance(name, str):
        raise TypeError(f"name: must be a string, got {type(name).__name__}")
    if name not in valid:
        raise ValueError(f"name: unknown {library} attack {name!r}; valid names are: {', '.join(valid)}")
    return getattr(module, name)


def _check_kwargs(cls, kwargs: Dict) -> None:
    """Raise ``TypeError`` when ``cls(model, **kwargs)`` would not accept ``kwargs``."""
    try:
        inspect.signature(cls.__init__).bind(None, None, **kwargs)
    except TypeError as error:
        raise TypeError(f"kwargs: {cls.__name__} does not accept {sorted(kwargs)}: {error}") from None


def _accepts(cls, parameter: str) -> bool:
    """Whether ``cls.__init__`` has a parameter called ``parameter``."""
    return parameter in inspect.signature(cls.__init__).parameters


def _class_count(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Number of classes the model separates (2 for a one-logit model), checking ``y`` against it."""
    with torch.no_grad():
        return max(check_logits(model(x), y), 2)


class _FlatImageView(nn.Module):
    """Show a model on samples of any shape as a model on ``(n, 1, 1, d)`` images.

    torchattacks' APGD, APGDT, FAB and Square (hence AutoAttack) and the authors' Square and FAB
    assume 4-D image batches.
    """

    def __init__(self, model: nn.Module, sample_shape: Tuple[int, ...]):
        super().__init__()
        self.model = model
        self.sample_shape = sample_shape

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images.reshape(images.shape[0], *self.sample_shape))


def _run_torchattacks(build: Callable[[nn.Module], object], seed: int, model: nn.Module, x: torch.Tensor,
                      y: torch.Tensor) -> torch.Tensor:
    """Build a torchattacks attack on the (wrapped) model with ``build`` and run it on ``(x, y)``
    under ``seed``."""
    if bool((x < 0).any() or (x > 1).any()):
        raise ValueError("x: torchattacks attacks clip to [0, 1], but x has values outside [0, 1]")
    wrapped: nn.Module = BinaryAsTwoLogits(model)
    images = x
    if x.dim() != 4:
        wrapped = _FlatImageView(wrapped, tuple(x.shape[1:]))
        images = x.reshape(x.shape[0], 1, 1, -1)
    wrapped.eval()
    with seeded(seed, x.device):
        attack = build(wrapped)
        return attack(images, y).reshape(x.shape)


class TorchAttacks(Attack):
    """Any torchattacks attack by class name, e.g. ``TorchAttacks("PGD", eps=0.1, steps=20)``.

    ``kwargs`` go to the torchattacks class after the model (its defaults are for CIFAR-10 images
    in [0, 1]: pass ``eps`` explicitly). ``seed`` is also passed to attacks that take one and seeds
    the global generators during the call. torchattacks clips to [0, 1], so inputs must lie in
    [0, 1]; non-image inputs are shown to it as ``(n, 1, 1, d)`` images.

    Arguments:
        name: class name in ``torchattacks`` (see :func:`torchattacks_names`).
        seed: seed of the attack's randomness.
        **kwargs: arguments of that class.
    """

    def __init__(self, name: str, seed: int = 0, **kwargs):
        import torchattacks

        self._cls = _lookup(torchattacks, name, torchattacks_names(), "torchattacks")
        self.name = name
        self.seed = check_seed(seed)
        if _accepts(self._cls, "seed"):
            kwargs.setdefault("seed", self.seed)
        if _accepts(self._cls, "verbose"):
            kwargs.setdefault("verbose", False)
        _check_kwargs(self._cls, kwargs)
        self.kwargs = kwargs

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        kwargs = dict(self.kwargs)
        num_classes = _class_count(model, x, y)
        if _accepts(self._cls, "n_classes"):
            kwargs.setdefault("n_classes", num_classes)
        return _run_torchattacks(lambda m: self._cls(m, **kwargs), self.seed, model, x, y)


class AutoAttack(Attack):
    r"""AutoAttack in the paper 'Reliable evaluation of adversarial robustness with an ensemble
    of diverse parameter-free attacks' [https://arxiv.org/abs/2003.01690].

    ``version="standard"`` runs APGD-CE, targeted APGD-DLR, targeted FAB and Square on the points
    not yet broken. ``backend="autoattack"`` (default) is the authors' own code (PyPI ``pyautoattack``);
    ``backend="torchattacks"`` is torchattacks' re-implementation (slower, and it can leave a few
    more points unbroken). ``components`` (authors' backend only) runs just those attacks of the
    ensemble, in the given order, with the settings of ``version`` (``"apgd-ce"``, ``"apgd-dlr"``,
    ``"apgd-t"``: targeted APGD-DLR, ``"fab"``, ``"fab-t"``, ``"square"``). The class count is read off
    the model; inputs must lie in [0, 1]. The DLR loss needs at least 3 classes (its targeted form
    4), so for models with fewer classes (e.g. binary ones) the components built on it are left out
    and the others run as usual; targeted attacks take at most ``classes - 1`` target classes.

    Arguments:
        eps: perturbation budget (> 0).
        norm: ``"linf"`` or ``"l2"``.
        version: ``"standard"``, ``"plus"`` or ``"rand"``.
        seed: seed of every component attack.
        backend: ``"autoattack"`` or ``"torchattacks"``.
        components: None (the whole ensemble of ``version``) or a tuple of component names.
    """

    def __init__(self, eps: float, norm: str = "linf", version: str = "standard", seed: int = 0,
                 backend: str = "autoattack", components=None):
        self.eps = check_eps(eps)
        self.norm = check_norm(norm)
        self.version = check_choice(version, "version", AUTOATTACK_VERSIONS)
        self.seed = check_seed(seed)
        self.backend = check_choice(backend, "backend", AUTOATTACK_BACKENDS)
        if components is not None:
            if isinstance(components, str) or not isinstance(components, (tuple, list)) or not components:
                raise ValueError(f"components: must be None or a non-empty tuple of names, got {components!r}")
            unknown = [c for c in components if c not in AUTOATTACK_COMPONENTS]
            if unknown:
                raise ValueError(f"components: unknown {unknown}; valid names are {', '.join(AUTOATTACK_COMPONENTS)}")
            if backend != "autoattack":
                raise ValueError("components: single components run with backend='autoattack' only")
            components = tuple(dict.fromkeys(components))
        self.components = components

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.backend == "torchattacks":
            return self._perturb_torchattacks(model, x, y)
        return self._perturb_authors(model, x, y)

    def _perturb_authors(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The authors' ``pyautoattack.AutoAttack`` on the points, with the components the class count allows."""
        import logging

        import pyautoattack

        if bool((x < 0).any() or (x > 1).any()):
            raise ValueError("x: AutoAttack clips to [0, 1], but x has values outside [0, 1]")
        num_classes = _class_count(model, x, y)
        wrapped: nn.Module = BinaryAsTwoLogits(model)
        images = x.detach()
        if x.dim() != 4:  # Square and FAB assume image batches
            wrapped = _FlatImageView(wrapped, tuple(x.shape[1:]))
            images = images.reshape(x.shape[0], 1, 1, -1)
        wrapped.eval()
        with seeded(self.seed, x.device):
            attack = pyautoattack.AutoAttack(wrapped, eps=self.eps, norm={"linf": "Linf", "l2": "L2"}[self.norm],
                                             version=self.version, seed=self.seed, device=x.device)
            attack.verbose = False
            attack.logger.setLevel(logging.ERROR)  # its range / class-count checks only log warnings
            chosen = self.components or tuple(attack.attacks_to_run)
            attack.attacks_to_run = [c for c in chosen if _COMPONENT_CLASSES.get(c, 2) <= num_classes]
            attack.apgd_targeted.n_target_classes = min(attack.apgd_targeted.n_target_classes, num_classes - 1)
            attack.fab.n_target_classes = min(attack.fab.n_target_classes, num_classes - 1)
            if not attack.attacks_to_run:
                return x.detach().clone()
            x_adv, _ = attack.run_standard_evaluation(images, y, batch_size=x.shape[0])
        return x_adv.reshape(x.shape)

    def _perturb_torchattacks(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """torchattacks' AutoAttack, without the DLR components the class count does not allow."""
        import torchattacks

        num_classes = _class_count(model, x, y)

        def build(wrapped: nn.Module):
            attack = torchattacks.AutoAttack(wrapped, norm={"linf": "Linf", "l2": "L2"}[self.norm],
                                             eps=self.eps, version=self.version, n_classes=num_classes,
                                             seed=self.seed, verbose=False)
            ensemble = attack._autoattack  # torchattacks' MultiAttack of the components
            ensemble.attacks = [a for a in ensemble.attacks if _dlr_classes_needed(a) <= num_classes]
            return attack

        return _run_torchattacks(build, self.seed, model, x, y)


def _dlr_classes_needed(component) -> int:
    """Classes an AutoAttack component needs: 4 for targeted APGD-DLR, 3 for APGD-DLR, else 2."""
    import torchattacks

    if isinstance(component, torchattacks.APGDT):
        return 4
    if isinstance(component, torchattacks.APGD) and component.loss == "dlr":
        return 3
    return 2


class ART(Attack):
    """Any evasion attack of the Adversarial Robustness Toolbox by class name, e.g.
    ``ART("ProjectedGradientDescent", eps=0.1, eps_step=0.01, max_iter=20)``.

    At call time the model is wrapped in ``art.estimators.classification.PyTorchClassifier``
    (cross-entropy loss, ``input_shape=x.shape[1:]``, the model's class count, ``clip_values``
    from ``bounds``) and the attack is built on it. ``verbose`` defaults to False and
    ``batch_size`` to the whole batch where the attack takes them. Arrays cross to numpy as
    float32 and come back with ``x``'s dtype and device.

    Arguments:
        name: class name in ``art.attacks.evasion`` (see :func:`art_evasion_names`).
        bounds: ``None``, ``(low, high)`` numbers, or per-feature tensors (ART's ``clip_values``).
        seed: seeds torch's and numpy's global generators during the call.
        **kwargs: arguments of that class.
    """

    def __init__(self, name: str, bounds: BoundsLike = (0.0, 1.0), seed: int = 0, **kwargs):
        import art.attacks.evasion

        self._cls = _lookup(art.attacks.evasion, name, art_evasion_names(), "ART evasion")
        self.name = name
        self.bounds = check_bounds(bounds)
        self.seed = check_seed(seed)
        if _accepts(self._cls, "verbose"):
            kwargs.setdefault("verbose", False)
        _check_kwargs(self._cls, kwargs)
        self.kwargs = kwargs

    def _perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from art.estimators.classification import PyTorchClassifier

        if any(p.dtype != torch.float32 for p in model.parameters()):
            raise TypeError("model: ART computes in float32, but the model has parameters of another dtype")
        x = x.float()
        bounds = resolve_bounds(self.bounds, x)
        check_within_bounds(x, bounds)
        kwargs = dict(self.kwargs)
        if _accepts(self._cls, "batch_size"):
            kwargs.setdefault("batch_size", x.shape[0])
        on_gpu = x.device.type == "cuda"
        with seeded(self.seed, x.device), (torch.cuda.device(x.device) if on_gpu else nullcontext()):
            classifier = PyTorchClassifier(
                model=BinaryAsTwoLogits(model), loss=nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                nb_classes=_class_count(model, x, y), clip_values=_clip_values(bounds, x),
                device_type="gpu" if on_gpu else "cpu")
            attack = self._cls(classifier, **kwargs)
            x_adv = attack.generate(x=x.cpu().numpy(), y=y.cpu().numpy())
        return torch.from_numpy(np.asarray(x_adv))


def _clip_values(bounds, x: torch.Tensor):
    """ART ``clip_values`` for resolved bounds: a pair of floats, or of float32 arrays of one sample's shape."""
    if bounds is None:
        return None
    if not isinstance(bounds[0], torch.Tensor):
        return (float(bounds[0]), float(bounds[1]))
    shape = tuple(x.shape[1:])
    return tuple(b.expand(shape).cpu().numpy().astype(np.float32) for b in bounds)
