"""Adversarial attacks with one interface, ``attack(model, x, y) -> x_adv``, and their evaluation.

Own attacks: :class:`FGSM`, :class:`PGD` (linf / l2, restarts), :class:`LinearClosedForm` (the
paper's closed-form boundary crossing). Third-party attacks: :class:`TorchAttacks`,
:class:`AutoAttack` (torchattacks) and :class:`ART` (Adversarial Robustness Toolbox). Composites:
:class:`Cascade` (members in turn on the points still correct) and :class:`UnitBoxView` (an attack
that clips to [0, 1] run on unbounded data through an exact affine change of variables).
:func:`evaluate` reports clean accuracy, robust accuracy and attack success rate (targeted with
``target_class``). Backdoor poisoning: the triggers (:class:`BackdoorTrigger`, also attack callables)
:class:`Trigger` (patch / blend), :class:`SIGTrigger` (sinusoidal signal), :class:`WaNetTrigger`
(warping, with its noise mode) and :class:`AdaptiveBlendTrigger` (Adap-Blend); :func:`poison` (BadNets, blend,
clean-label, SIG, WaNet, Adap-Blend),
:func:`label_consistent_poison` (PGD-hardened target-class samples) and :class:`ARTPoison` (ART's
backdoor poisoning attacks).
:func:`as_data` / :func:`to_model`: the one normaliser of the data given to the API (forms, dtype, device,
labels). :func:`make_attack`: an attack by its name (:data:`ATTACK_NAMES`; the command line's ``--attack``).
"""

from .adapters import ART, AutoAttack, TorchAttacks, art_evasion_names, torchattacks_names
from .base import Attack, BinaryAsTwoLogits, attack_settings, plain_value, predict
from .closed_form import LinearClosedForm
from .composite import Cascade, UnitBoxView
from .evaluate import accuracy, evaluate
from .fgsm import FGSM
from .inputs import as_data, to_model
from .pgd import PGD
from .plumbing import per_sample_loss
from .poisoning import (AdaptiveBlendTrigger, ARTPoison, BackdoorTrigger, SIGTrigger, Trigger, WaNetTrigger,
                        label_consistent_poison, poison)
from .registry import ATTACK_NAMES, make_attack

__all__ = [
    "Attack",
    "FGSM",
    "PGD",
    "LinearClosedForm",
    "TorchAttacks",
    "AutoAttack",
    "ART",
    "Cascade",
    "UnitBoxView",
    "evaluate",
    "accuracy",
    "as_data",
    "to_model",
    "per_sample_loss",
    "predict",
    "BinaryAsTwoLogits",
    "attack_settings",
    "plain_value",
    "torchattacks_names",
    "art_evasion_names",
    "BackdoorTrigger",
    "Trigger",
    "SIGTrigger",
    "WaNetTrigger",
    "AdaptiveBlendTrigger",
    "poison",
    "label_consistent_poison",
    "ARTPoison",
    "ATTACK_NAMES",
    "make_attack",
]
