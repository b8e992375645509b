"""The options of the two defence pipelines, each one typed and documented once (the command line's
``defend`` flags are checked against these fields by a test).

- :class:`RunConfig`: :func:`defenses.run`, the evasion pipeline (prune / reweight by influence,
  retrain, re-attack, beside adversarial-training references).
- :class:`PoisoningConfig`: :func:`defenses.run_poisoning`, the backdoor-poisoning pipeline, with its
  threat model :class:`PoisonSpec`.

Both share the fields of :class:`~defenses.config.SharedConfig` (data, model, threat model, training schedule, seeds,
output). Every field carries its help text in ``metadata["help"]`` (see :func:`help_texts`). The
values are checked when a run is planned (:func:`defenses.plan.plan_run`), with errors that name the
field.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Optional

from attacks.inputs import check_target_class
from attacks.poisoning import check_rate, poison_count
from attacks.validation import check_choice, check_fraction, check_int, check_number, check_positive

from .recipes import DEFAULT_RECIPES
from .selection import check_budget

__all__ = ["SharedConfig", "RunConfig", "PoisoningConfig", "PoisonSpec", "POISON_ATTACKS", "help_texts",
           "config_from_options"]

_OWN_OPTIONS = (("sig", "sig_"), ("wanet", "wanet_"))  # the PoisonSpec fields only one attack reads, by prefix
POISON_ATTACKS = ("badnets", "blend", "adaptive-blend", "clean-label", "sig", "wanet", "label-consistent")


def _option(default: Any, help: str, *, factory: bool = False):
    """A field with its help text (``metadata["help"]``); ``factory``: ``default`` is a zero-argument factory."""
    if factory:
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SharedConfig:
    """The options both pipelines take: data, model, threat model, training schedule, seeds and output."""

    data: Any = _option("mnist", "a data set name (mnist, mnist-full, fashion-mnist, fashion-mnist-full, digits, adult, moons; split per seed), a "
                                 "robust_infl.datasets.Splits, (train, val, test) splits, one (X, y[, s]) data set "
                                 "(split per seed: 65% / 15% / 20%), or a callable seed -> Splits")
    model: Any = _option(None, "a reference model name (cnn, mlp, logreg; default per data set), your own nn.Module "
                               "(copied, then trained from scratch: every submodule needs reset_parameters) or a "
                               "factory seed -> nn.Module")
    attack: Any = _option("pgd", "the evasion attack: a name (fgsm, pgd, linear, autoattack, ...; built per seed from "
                                 "eps, norm, steps, bounds) or your own callable attack(model, x, y) -> x_adv")
    eps: Optional[float] = _option(None, "attack budget (default per data set: images 0.1, tabular 0.5)")
    norm: Optional[str] = _option(None, "attack norm, linf or l2 (default per data set: images linf, tabular l2)")
    steps: Optional[int] = _option(None, "attack steps of pgd (default 10)")
    bounds: Any = _option("auto", "input range (low, high) of named attacks and adversarial trainers, or None; "
                                  "'auto': the bounds of an attack object that declares them, else the data set's "
                                  "(images (0, 1), tabular None), and for your own (X, y) tensors (0, 1) when every "
                                  "value of X lies in it, else None")
    trainer: Any = _option("erm", "erm, fast-at, pgd-at, trades, art-pgd-at, art-trades, or a trainer object "
                                  "(Trainer / ARTTrainer); the base model is trained by it from scratch")
    seeds: Any = _option(3, "a count N (seeds 0..N-1) or a list of seeds")
    epochs: Optional[int] = _option(None, "training epochs (default per data set)")
    lr: Optional[float] = _option(None, "learning rate (default per data set)")
    batch_size: Optional[int] = _option(None, "training batch size (default per data set)")
    train_steps: int = _option(5, "PGD steps inside adversarial trainers")
    n_train: Optional[int] = _option(None, "training split size of a named data set (default per data set)")
    n_val: Optional[int] = _option(None, "validation split size of a named data set (default per data set)")
    n_test: Optional[int] = _option(None, "test split size of a named data set (default per data set)")
    eval_batch_size: int = _option(256, "samples per attack call at evaluation")
    out: Any = _option(None, "output folder for the report files (None: write nothing); each seed's results are "
                             "saved there as it completes (seeds/seed_<k>.json), every file atomically")
    resume: bool = _option(False, "reuse the per-seed results already in out (after a crash, or to add seeds); a "
                                  "seed file written with other settings is refused")
    overwrite: bool = _option(False, "replace an earlier run in out; without it (or resume) a folder holding one is "
                                     "refused before any compute")
    progress: bool = _option(True, "show one progress bar (on a terminal only) over the seeds and recipes")


@dataclass(frozen=True)
class RunConfig(SharedConfig):
    """The options of :func:`defenses.run` (the evasion pipeline): :class:`~defenses.config.SharedConfig` plus the scoring,
    selection, retraining, recipes, references and evaluation suite."""

    method: str = _option("ip", "influence method (robust_infl.available_methods(); not tracin)")
    method_options: Optional[dict] = _option(None, "options of the influence method (e.g. params, damping); "
                                                   "ensemble=n scores with n models trained on random halves of the "
                                                   "training split instead of the base model (their training counted "
                                                   "in the cost)")
    fractions: Any = _option((0.05,), "budgets: shares of the training set pruned / down-weighted; several give a "
                                      "plot")
    mode: str = _option("prune", "prune (train on the kept samples) or reweight")
    scheme: str = _option("smooth", "reweighting scheme of mode reweight: smooth or hard")
    temperature: float = _option(1.0, "temperature of the smooth scheme")
    retrain: str = _option("scratch", "defended models: retrained from scratch or finetune (from the base model)")
    recipes: Any = _option(DEFAULT_RECIPES, "recipe names from defenses.available_recipes(); none and random give "
                                            "the paired differences")
    references: Any = _option("auto", "adversarial-training reference rows (fast-at, pgd-at, trades) trained on the "
                                      "same data and schedule: 'auto' all three with plain training (an adversarial "
                                      "trainer is its own reference), a list picks some, () none")
    eval_attacks: Any = _option("auto", "evaluation suite besides the threat-model attack: 'auto' adds APGD-CE and "
                                        "targeted APGD-DLR where the data allows (images in [0, 1]), a list of attack "
                                        "names, () none")
    eval_subset: int = _option(200, "the suite runs on the first that many test points of each seed")


@dataclass(frozen=True)
class PoisonSpec:
    """The backdoor threat model of :func:`defenses.run_poisoning` (each field's help in ``metadata["help"]``).

    ``badnets`` patches a corner of ``rate`` of the training split and relabels it to ``target_class``
    (:func:`attacks.poison`); ``blend`` does the same with a seeded uniform noise pattern blended over the
    whole image at alpha 0.2, at training and test time (:meth:`attacks.Trigger.random_blend`, drawn per
    seed); ``adaptive-blend`` is Qi et al.'s Adap-Blend (:class:`attacks.AdaptiveBlendTrigger`, its code's
    defaults): the same pattern cut into a 4 x 4 grid, each poison (relabelled) blended on a random half of the
    cells, as many other samples on a random half under their true labels, the full pattern at test time;
    ``clean-label`` is ART's ``PoisoningAttackCleanLabelBackdoor``: target-class
    samples, PGD-perturbed on a proxy model trained on the clean split with the same trainer, then patched,
    labels kept; ``label-consistent`` is the same attack done by :func:`attacks.label_consistent_poison`
    with the patch in all four corners (Turner et al. 2019's trigger; strong enough to backdoor). ``sig``
    adds :class:`attacks.SIGTrigger`'s sinusoid (6 periods, amplitude ``sig_delta`` on the poisons and
    ``sig_test_delta`` at test time) to target-class samples, labels kept (``rate`` is a share of the whole
    split, as in BackdoorBench: the target class holds about a tenth of it); ``wanet`` warps ``rate`` of the
    split by :class:`attacks.WaNetTrigger` (k 4, strength ``wanet_s``, seeded per seed), relabelled, and
    ``wanet_noise_ratio`` times as many others by a noisy warp under their true labels. The evidence sizes are nested: the first K of one draw of triggered validation inputs of
    the other classes. Clean accuracy and the backdoor ASR are measured on the whole test split.
    """

    attack: str = _option("badnets", "the backdoor: badnets (corner patch, relabelled to the target class), "
                                     "blend (a seeded noise pattern blended at alpha 0.2, relabelled), "
                                     "adaptive-blend (Adap-Blend: random halves of the pattern's 4 x 4 cells on the "
                                     "poisons and on as many cover samples under true labels), clean-label (ART's "
                                     "label-consistent backdoor), sig (sinusoidal signal on target-class samples, "
                                     "labels kept), wanet (warping, with its noise mode) or label-consistent "
                                     "(PGD-hardened target-class samples, four-corner patch)")
    rate: float = _option(0.05, "share of the training split poisoned")
    target_class: int = _option(0, "the backdoor's target class")
    evidence: tuple = _option((50,), "evidence sizes K: triggered validation inputs with their true labels")
    budget: Optional[float] = _option(None, "share removed by every recipe (default: twice the rate)")
    patch_size: int = _option(3, "side of the square trigger patch in the bottom-right corner (label-consistent: "
                                 "in each corner)")
    clean_label_eps: float = _option(0.3, "PGD budget (linf) of the clean-label and label-consistent attacks on "
                                          "their proxy model")
    clean_label_steps: int = _option(20, "PGD steps of the clean-label and label-consistent attacks")
    sig_delta: float = _option(40 / 255, "SIG's signal amplitude on the poisons, in (0, 1] (BackdoorBench's 40/255)")
    sig_test_delta: float = _option(0.5, "SIG's signal amplitude at test time, in (0, 1] (the paper tests with a "
                                         "stronger signal than it trains with)")
    wanet_s: float = _option(1.0, "WaNet's warping strength s, > 0 (twice the paper's default 0.5)")
    wanet_noise_ratio: float = _option(2.0, "WaNet's noise-mode samples per poison, >= 0 (the paper's cross ratio "
                                            "2; 0: no noise mode)")
    robust_n: Optional[int] = _option(500, "evasion robust accuracy on the first N test inputs (None: all)")

    def checked(self, num_classes: int, n_train: Optional[int] = None) -> "PoisonSpec":
        """This spec after validation, with ``budget`` resolved; with ``n_train``, a rate that plants no poison
        and a budget that removes no sample of a training split of that size are refused."""
        check_choice(self.attack, "poison", POISON_ATTACKS)
        rate = check_rate(self.rate)
        check_target_class(self.target_class, num_classes)
        sizes = (self.evidence,) if isinstance(self.evidence, int) else tuple(self.evidence)
        for size in sizes:
            check_int(size, "evidence", minimum=1)
        budget = check_fraction(2 * rate if self.budget is None else self.budget, "budget")
        if n_train is not None:
            poison_count(rate, n_train)
            check_budget(n_train, budget, "budget", "training samples", allow_none=False)
        check_int(self.patch_size, "patch_size", minimum=1)
        for name in ("sig_delta", "sig_test_delta"):
            check_number(getattr(self, name), name, minimum=0, maximum=1, include_minimum=False)
        check_positive(self.wanet_s, "wanet_s")
        check_positive(self.wanet_noise_ratio, "wanet_noise_ratio", allow_zero=True)
        if self.robust_n is not None:
            check_int(self.robust_n, "robust_n", minimum=1)
        return replace(self, rate=rate, evidence=tuple(sorted(set(sizes))), budget=budget)

    @classmethod
    def of(cls, poison) -> "PoisonSpec":
        """A :class:`PoisonSpec` from itself, a dict of its fields or an attack name."""
        if isinstance(poison, cls):
            return poison
        if isinstance(poison, str):
            return cls(attack=poison)
        if isinstance(poison, dict):
            valid = [f.name for f in fields(cls)]
            unknown = set(poison) - set(valid)
            if unknown:
                raise ValueError(f"poison: unknown fields {sorted(unknown)}; valid are {sorted(valid)}")
            return cls(**poison)
        raise TypeError(f"poison: expected a PoisonSpec, a dict of its fields or an attack name, "
                        f"got {type(poison).__name__}")

    def as_dict(self) -> dict:
        """The fields as a plain dict (the report's ``config["poison"]``, part of the settings a per-seed cache is
        checked against), without the options of the attacks not run (``sig_*`` but for ``sig``, ``wanet_*`` but
        for ``wanet``): those do not change the run, so they do not invalidate its cache."""
        return {name: value for name, value in asdict(self).items()
                if not any(name.startswith(prefix) and self.attack != attack for attack, prefix in _OWN_OPTIONS)}


@dataclass(frozen=True)
class PoisoningConfig(SharedConfig):
    """The options of :func:`defenses.run_poisoning` (the backdoor-poisoning pipeline): :class:`~defenses.config.SharedConfig`
    plus the backdoor threat model and the poisoning recipes."""

    poison: Any = _option("badnets", "the backdoor threat model: a PoisonSpec, a dict of its fields, or an attack "
                                     "name (badnets, blend, adaptive-blend, clean-label, sig, wanet, label-consistent) with the other "
                                     "fields at their defaults")
    recipes: Any = _option(None, "poisoning recipe names from defenses.available_recipes('poisoning') (None: all "
                                 "of them but the expensive evidence-influence-trak)")


def help_texts(config_class) -> dict:
    """``{field name: help text}`` of a configuration class, in field order."""
    return {f.name: f.metadata["help"] for f in fields(config_class)}


def config_from_options(config_class, options: dict, entry: str):
    """``config_class(**options)``, refusing an unknown option with a ``TypeError`` that names it, the valid
    ones, and for ``poison`` given to :func:`defenses.run` the poisoning pipeline's entry point."""
    valid = [f.name for f in fields(config_class)]
    unknown = [name for name in options if name not in valid]
    if unknown:
        hint = ("; the poisoning pipeline is defenses.run_poisoning(..., poison=...)"
                if "poison" in unknown else "")
        raise TypeError(f"{unknown[0]}: not an option of {entry}{hint}; valid are {', '.join(valid)}")
    return config_class(**options)
