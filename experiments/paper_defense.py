"""Adversarial defence by removing harmful training samples: the honest protocol and
the paper's own protocol side by side.

Honest protocol (per setting and seed, paired): seeded train / validation / test split; train the
model (:class:`defenses.CheckpointingERM`, which keeps TracIn's checkpoints); for
every attack (the threat model), score every training sample against ``Robust(attack)`` on the
VALIDATION split with ip, ip-ensemble, tracin, if (if-exact for logistic regression, if-cg on the
last layer otherwise) and datainf (``defenses.recipes.influence_scores``), or by the random and
training-loss baselines; remove the top 1 / 2.5 / 5 / 10 % (weight 0, see :data:`REMOVAL`) and retrain
from the same initialisation, seed and data order (``defenses.recipes.select_and_retrain``); on the
held-out TEST split report clean
accuracy, adaptive robust accuracy (the attack re-run on the defended model) and transfer robust
accuracy (the undefended model's adversarial test points), with paired differences against no
defence and against random removal (95 % t-intervals). On digits AutoAttack (torchattacks,
standard version, linf) re-attacks the base model and the models defended against PGD-linf at one
budget on a fixed test subset; torchattacks clips to [0, 1], so AutoAttack runs on images only.

Attacks: the paper's closed-form move across a linear boundary (``attacks.LinearClosedForm`` with
``labels="predicted"``, the paper's variant: every point is moved off its PREDICTED class, so its
"robust accuracy" counts the points misclassified to begin with; logistic regression only: it is
exact only for linear models, and budget-free), FGSM, PGD linf and
PGD l2 (10 steps; Adult's standardised features are unbounded, digits' pixels lie in [0, 1]).

Paper's protocol (logistic regression; as in the code of arXiv 2405.17490): the closed-form attack
is applied to a random 5-25 % of the TEST points (the share drawn per seed); that attacked test set
is the scoring target (``Utility``, mean loss); the models are judged by their accuracy on those
FIXED attacked points (no re-attack). The "leak-free" variant changes one thing: the same share of
VALIDATION points is attacked and scored against, the evaluation stays on the fixed attacked test
points. paper minus leak-free is what scoring on the evaluation points adds; the honest protocol
(validation scoring, adaptive re-attack, held-out test) is reported beside both.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.paper_defense [--quick]

A full run stores each finished (setting, seed) under ``experiments/out/paper_defense/<setting>/seeds/``
(``defenses.seed_results.SeedResults``) and reuses it when rerun with the same configuration.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

import attacks
import robust_infl as ri
from attacks.plumbing import eval_mode, make_generator
from attacks.registry import make_attack
from defenses import CheckpointingERM, DefenceContext, evaluate_on_test
from defenses.recipes import influence_scores, random_scores, select_and_retrain, training_loss_scores
from defenses.seed_results import SeedResults
from experiments._results import (cached, ensemble_options, experiment_arguments, mean_std, paired_ci, save_figure,
                                  write_json, write_section)
from robust_infl.datasets import load_dataset
from robust_infl.models import build_model

__all__ = ["ThreatModel", "Setting", "Config", "FULL", "QUICK", "BASELINES", "build_attack", "method_options",
           "paper_targets", "majority_rate", "run_seed", "summarise_honest", "summarise_paper", "plot",
           "main"]

EXPERIMENTS = Path(__file__).resolve().parent
BASELINES = ("random", "loss")
"""Objective-free selections: scored once per seed, shared by every attack."""


@dataclass(frozen=True)
class ThreatModel:
    """The attacks of one data set: FGSM / PGD budgets and the input bounds (None = unbounded)."""

    linf_eps: float
    l2_eps: float
    bounds: Optional[tuple]
    pgd_steps: int = 10


THREATS = {"adult": ThreatModel(linf_eps=0.1, l2_eps=0.5, bounds=None),
           "digits": ThreatModel(linf_eps=0.1, l2_eps=0.5, bounds=(0.0, 1.0))}
REMOVAL = {"mode": "reweight", "scheme": "hard"}
"""Removal as weight 0 (``defenses.reweight(..., "hard")``): the retraining keeps the undefended model's data
order and number of steps, so a difference to it is the removal's. Dropping the rows instead changes both, and
with them the accuracy (a retraining on 95% of the rows takes 5% fewer steps)."""
MAIN_ATTACK = {"adult": "pgd-l2", "digits": "pgd-linf"}
"""The threat model each data set is plotted for (the project's defaults: tabular l2, images linf)."""


@dataclass(frozen=True)
class Setting:
    """One data set and model, the attacks and methods run on it, and its training schedule."""

    data: str
    model: str
    attacks: tuple
    methods: tuple
    fractions: tuple
    seeds: tuple
    sizes: tuple
    epochs: int
    lr: float
    batch_size: int
    autoattack: bool = False
    paper: bool = False

    @property
    def name(self) -> str:
        """``"<data>-<model>"``."""
        return f"{self.data}-{self.model}"


FULL_FRACTIONS = (0.01, 0.025, 0.05, 0.10)
LINEAR_METHODS = ("ip", "ip-ensemble", "tracin", "if-exact", "datainf")
DEEP_METHODS = ("ip", "ip-ensemble", "tracin", "if-cg", "datainf")
ADULT_SIZES, DIGITS_SIZES = (4000, 1000, 2000), (1000, 300, 497)


@dataclass(frozen=True)
class Config:
    """Everything that defines one run of the experiment."""

    settings: tuple = (
        Setting("adult", "logreg", ("linear", "fgsm", "pgd-linf", "pgd-l2"), LINEAR_METHODS, FULL_FRACTIONS,
                (0, 1, 2, 3, 4), ADULT_SIZES, epochs=100, lr=0.05, batch_size=4000, paper=True),
        Setting("adult", "mlp", ("fgsm", "pgd-linf", "pgd-l2"), DEEP_METHODS, FULL_FRACTIONS, (0, 1, 2, 3, 4),
                ADULT_SIZES, epochs=8, lr=1e-3, batch_size=128),
        Setting("digits", "logreg", ("linear", "fgsm", "pgd-linf", "pgd-l2"), LINEAR_METHODS, FULL_FRACTIONS,
                (0, 1, 2, 3, 4), DIGITS_SIZES, epochs=150, lr=0.05, batch_size=1000, paper=True),
        Setting("digits", "mlp", ("fgsm", "pgd-linf", "pgd-l2"), DEEP_METHODS, FULL_FRACTIONS, (0, 1, 2, 3, 4),
                DIGITS_SIZES, epochs=20, lr=2e-3, batch_size=64, autoattack=True),
        Setting("digits", "cnn", ("pgd-linf",), ("ip", "ip-ensemble", "tracin"), (0.05, 0.10), (0, 1, 2, 3, 4),
                DIGITS_SIZES, epochs=20, lr=2e-3, batch_size=64, autoattack=True),
    )
    weight_decay: float = 1e-4
    ensemble_members: int = 6
    tracin_checkpoints: int = 3
    if_damping: float = 0.01
    autoattack_points: int = 100
    autoattack_fraction: float = 0.05
    autoattack_methods: tuple = ("ip", "ip-ensemble", "random")
    autoattack_eps: float = THREATS["digits"].linf_eps
    paper_share: tuple = (0.05, 0.25)


FULL = Config()
QUICK = Config(
    settings=(
        Setting("adult", "logreg", ("linear", "pgd-l2"), ("ip", "if-exact"), (0.05,), (0, 1), (800, 300, 400),
                epochs=60, lr=0.05, batch_size=800, paper=True),
        Setting("digits", "mlp", ("pgd-linf",), ("ip", "tracin", "if-cg"), (0.05,), (0, 1), (400, 150, 200),
                epochs=8, lr=3e-3, batch_size=64, autoattack=True),
    ),
    ensemble_members=3, autoattack_points=20, autoattack_methods=("ip", "random"),
    autoattack_eps=0.3,  # so large that APGD breaks every point and the slow Square stage has nothing to do
)


def build_attack(name: str, data: str, seed: int):
    """Attack ``name`` (``linear``, ``fgsm``, ``pgd-linf``, ``pgd-l2``) in the threat model of ``data``, seeded."""
    if data not in THREATS:
        raise ValueError(f"data: must be one of {', '.join(THREATS)}, got {data!r}")
    threat = THREATS[data]
    if name == "linear":  # the paper's variant, as the committed results were computed
        return attacks.LinearClosedForm(labels="predicted")
    if name == "fgsm":
        return make_attack("fgsm", eps=threat.linf_eps, norm="linf", bounds=threat.bounds)
    if name in ("pgd-linf", "pgd-l2"):
        norm = name.split("-")[1]
        eps = threat.linf_eps if norm == "linf" else threat.l2_eps
        return make_attack("pgd", eps=eps, norm=norm, steps=threat.pgd_steps, bounds=threat.bounds, seed=seed)
    raise ValueError(f"name: unknown attack {name!r}; valid names are linear, fgsm, pgd-linf, pgd-l2")


def method_options(method: str, setting: Setting, model: nn.Module, checkpoints: list, config: Config) -> dict:
    """The options each influence method runs with (the paper's ensembles, TracIn's checkpoints, IF damping)."""
    if method == "ip-ensemble":
        return ensemble_options(setting.model, config.ensemble_members)
    if method == "tracin":
        return {"checkpoints": checkpoints, "lrs": setting.lr}
    if method == "if-exact":
        return {"damping": config.if_damping}
    if method == "if-cg":  # the full Hessian of a ReLU network is indefinite: its last layer's is not
        return {"damping": config.if_damping, "params": [name for name, _ in model.named_parameters()][-2:]}
    return {}


def paper_targets(model: nn.Module, split: tuple, share: float, seed: int) -> tuple:
    """The paper's attacked set: ``split`` with a random ``share`` of its points moved by the closed form.

    Returns ``(X_attacked, y, attacked_index)``; the attack is run on ``model`` (the undefended one).
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"share: must be in (0, 1), got {share}")
    X, y = split[:2]
    count = max(1, round(share * X.shape[0]))
    index = torch.randperm(X.shape[0], generator=make_generator(seed))[:count]
    attacked = X.clone()
    attacked[index] = attacks.LinearClosedForm(labels="predicted")(model, X[index], y[index]).detach()
    return attacked, y, index


def _autoattack_accuracy(model: nn.Module, test: tuple, config: Config, seed: int) -> float:
    """Robust accuracy under AutoAttack (standard, linf, ``config.autoattack_eps``) on the first test points."""
    X, y = test[0][:config.autoattack_points], test[1][:config.autoattack_points]
    attack = attacks.AutoAttack(config.autoattack_eps, norm="linf", seed=seed)
    return attacks.evaluate(model, (X, y), {"aa": attack}, progress=False)["aa"]["robust_acc"]


def majority_rate(model: nn.Module, X: torch.Tensor, majority: int) -> float:
    """Share of the inputs ``X`` that ``model`` assigns to class ``majority`` (clean predictions)."""
    if X.shape[0] == 0:
        raise ValueError("X: is empty")
    with eval_mode(model), torch.no_grad():
        rate = float((attacks.predict(model(X)) == majority).double().mean())
    return rate


def run_seed(setting: Setting, seed: int, config: Config, progress: bool = False) -> dict:
    """Both protocols for one setting and seed.

    Result keys: ``base[attack]`` and ``honest[attack][method][fraction]`` (``clean_acc``,
    ``robust_acc_adaptive``, ``robust_acc_transfer``, ``majority_rate`` = share of clean test points predicted as
    the training majority class; ``autoattack_acc`` where run, with ``base["autoattack"]``);
    ``majority_share``: the share of the majority class among the test labels;
    ``paper`` (paper's protocol only): ``share``, ``none`` and ``targets[target][method][fraction]``,
    the accuracy on the fixed attacked test points for ``target`` in ``paper`` / ``leak-free``.
    Fractions are strings.
    """
    data = load_dataset(setting.data, seed=seed, n_train=setting.sizes[0], n_val=setting.sizes[1],
                        n_test=setting.sizes[2])
    train, val, test = data.train[:2], data.val[:2], data.test[:2]
    trainer = CheckpointingERM(n_checkpoints=config.tracin_checkpoints, epochs=setting.epochs, lr=setting.lr,
                               batch_size=setting.batch_size, weight_decay=config.weight_decay, progress=False)
    base = trainer.fit(build_model(setting.model, data.input_shape, data.num_classes, seed=seed), train, seed=seed)
    checkpoints = list(trainer.checkpoints)
    attack_fns = {name: build_attack(name, setting.data, seed) for name in setting.attacks}
    majority = int(torch.bincount(train[1]).argmax())
    result: dict = {"base": {}, "honest": {name: {} for name in setting.attacks},
                    "majority_share": float((test[1] == majority).double().mean())}
    base_adversarial = {}
    for name, attack in attack_fns.items():
        result["base"][name], base_adversarial[name] = evaluate_on_test(base, test, attack, progress=False)
        result["base"][name]["majority_rate"] = majority_rate(base, test[0], majority)
    aa_attack = "pgd-linf" if setting.autoattack and "pgd-linf" in setting.attacks else None
    if aa_attack:
        result["base"]["autoattack"] = _autoattack_accuracy(base, test, config, seed)

    def context(attack: str, method: str, fraction: Optional[float] = None) -> DefenceContext:
        options = method_options(method, setting, base, checkpoints, config)
        return DefenceContext(model=base, train=train, val=val, trainer=trainer, attack=attack_fns[attack],
                              seed=seed, fraction=fraction, method=method, method_options=options, progress=False,
                              **REMOVAL)

    def evaluate(model: nn.Module, attack: str, method: str, fraction: float) -> dict:
        metrics, _ = evaluate_on_test(model, test, attack_fns[attack], base_adversarial[attack], progress=False)
        metrics["majority_rate"] = majority_rate(model, test[0], majority)
        if attack == aa_attack and fraction == config.autoattack_fraction and method in config.autoattack_methods:
            metrics["autoattack_acc"] = _autoattack_accuracy(model, test, config, seed)
        return metrics

    retrained: dict = {}  # (method, fraction) -> model of the objective-free baselines, for the paper's protocol
    first = setting.attacks[0]
    tasks = [(None, m) for m in BASELINES] + [(a, m) for a in setting.attacks for m in setting.methods]
    for attack, method in tqdm(tasks, desc=f"{setting.name} seed {seed}", disable=not progress, leave=False):
        if attack is None:  # a baseline: one retraining per budget, evaluated under every attack
            scores = (random_scores if method == "random" else training_loss_scores)(context(first, method))
            for fraction in setting.fractions:
                model = select_and_retrain(context(first, method, fraction), scores)
                retrained[method, fraction] = model
                for name in setting.attacks:
                    result["honest"][name].setdefault(method, {})[str(fraction)] = evaluate(model, name, method,
                                                                                            fraction)
            continue
        scores = influence_scores(context(attack, method))
        result["honest"][attack][method] = {
            str(f): evaluate(select_and_retrain(context(attack, method, f), scores), attack, method, f)
            for f in setting.fractions}

    if setting.paper:
        result["paper"] = _paper_protocol(setting, seed, config, base, checkpoints, trainer, data, retrained)
    return result


def _paper_protocol(setting: Setting, seed: int, config: Config, base: nn.Module, checkpoints: list,
                    trainer: CheckpointingERM, data, retrained: dict) -> dict:
    """The paper's protocol and its leak-free variant; accuracy on the fixed attacked test points."""
    low, high = config.paper_share
    share = low + (high - low) * float(torch.rand((), generator=make_generator(seed)))
    X_attacked, y_test, index = paper_targets(base, data.test, share, seed)
    fixed = (X_attacked[index], y_test[index])
    targets = {"paper": (X_attacked, y_test), "leak-free": paper_targets(base, data.val, share, seed + 1)[:2]}
    out = {"share": share, "n_attacked": int(index.numel()), "none": attacks.accuracy(base, *fixed),
           "targets": {name: {} for name in targets}}
    for name, target in targets.items():
        for method in setting.methods:
            scores = ri.influence(base, data.train[:2], target, objective=ri.Utility(), method=method, seed=seed,
                                  progress=False, **method_options(method, setting, base, checkpoints, config))
            context = DefenceContext(model=base, train=data.train[:2], val=data.val[:2], trainer=trainer,
                                     attack=attacks.LinearClosedForm(labels="predicted"), seed=seed,
                                     progress=False, **REMOVAL)
            out["targets"][name][method] = {}
            for fraction in setting.fractions:
                context.fraction = fraction
                out["targets"][name][method][str(fraction)] = attacks.accuracy(
                    select_and_retrain(context, scores), *fixed)
        for method in BASELINES:  # objective-free: the same retrained models under both targets
            out["targets"][name][method] = {str(f): attacks.accuracy(retrained[method, f], *fixed)
                                            for f in setting.fractions}
    return out


# --------------------------------------------------------------------------- statistics and tables
def _fraction_label(fraction: str) -> str:
    return f"{100 * float(fraction):g}%"


def _honest(runs: list, attack: str, method: str, fraction: str, metric: str) -> list:
    """Per-seed values of ``metric`` for one honest cell; ``method="none"`` reads the base model."""
    if method == "none" and metric == "autoattack_acc":
        return [run["base"]["autoattack"] for run in runs]
    if method == "none":
        return [run["base"][attack][metric] for run in runs]
    return [run["honest"][attack][method][fraction][metric] for run in runs]


def summarise_honest(runs: list, setting: Setting) -> dict:
    """``summary[attack][method][fraction]``: mean ± std of each metric and paired differences (95% CI)."""
    out: dict = {}
    for attack in setting.attacks:
        for method in (*BASELINES, *setting.methods):
            for fraction in map(str, setting.fractions):
                cell: dict = {}
                for metric in ("clean_acc", "robust_acc_adaptive", "robust_acc_transfer", "majority_rate"):
                    values = _honest(runs, attack, method, fraction, metric)
                    cell[metric] = mean_std(values)
                    cell[f"{metric}_vs_none"] = paired_ci(values, _honest(runs, attack, "none", fraction, metric))
                    cell[f"{metric}_vs_random"] = paired_ci(values, _honest(runs, attack, "random", fraction, metric))
                if "autoattack_acc" in runs[0]["honest"][attack][method][fraction]:
                    values = _honest(runs, attack, method, fraction, "autoattack_acc")
                    cell["autoattack_acc"] = mean_std(values)
                    cell["autoattack_acc_vs_none"] = paired_ci(values, _honest(runs, attack, "none", fraction,
                                                                               "autoattack_acc"))
                    cell["autoattack_acc_vs_random"] = paired_ci(
                        values, _honest(runs, attack, "random", fraction, "autoattack_acc"))
                out.setdefault(attack, {}).setdefault(method, {})[fraction] = cell
    return out


def summarise_paper(runs: list, setting: Setting) -> dict:
    """``summary[method][fraction]``: accuracy on the fixed attacked points under both targets, gains and the leak.

    ``leak`` is the paired difference paper minus leak-free (what scoring on the evaluation points adds);
    ``honest_linear`` and ``honest_main`` are the honest protocol's adaptive robust-accuracy gains
    under the closed-form attack and under the data set's main PGD attack.
    """
    none = [run["paper"]["none"] for run in runs]
    chance = {f: [run["paper"]["targets"]["paper"]["random"][f] for run in runs] for f in map(str, setting.fractions)}
    out: dict = {"share": mean_std([run["paper"]["share"] for run in runs]), "none": mean_std(none)}
    main = MAIN_ATTACK[setting.data]
    for method in (*setting.methods, *BASELINES):
        for fraction in map(str, setting.fractions):
            paper = [run["paper"]["targets"]["paper"][method][fraction] for run in runs]
            free = [run["paper"]["targets"]["leak-free"][method][fraction] for run in runs]
            cell = {"paper_acc": mean_std(paper), "leak_free_acc": mean_std(free),
                    "paper_vs_none": paired_ci(paper, none), "leak_free_vs_none": paired_ci(free, none),
                    "paper_vs_random": paired_ci(paper, chance[fraction]), "leak": paired_ci(paper, free)}
            for key, attack in (("honest_linear", "linear"), ("honest_main", main)):
                if attack in setting.attacks:
                    cell[key] = paired_ci(_honest(runs, attack, method, fraction, "robust_acc_adaptive"),
                                          _honest(runs, attack, "none", fraction, "robust_acc_adaptive"))
            out.setdefault(method, {})[fraction] = cell
    return out


def _ci(stat, scale: float = 100.0) -> str:
    """``"+d [lo, hi]"`` of a ``(mean, (lo, hi))`` paired statistic, in points."""
    mean, (lo, hi) = stat
    if not math.isfinite(lo):
        return f"{scale * mean:+.2f}"
    return f"{scale * mean:+.2f} [{scale * lo:+.2f}, {scale * hi:+.2f}]"


def _ms(stat, scale: float = 100.0) -> str:
    return f"{scale * stat[0]:.2f} ± {scale * stat[1]:.2f}"


def tables(per_setting: dict, summary: dict, config: Config) -> dict:
    """Markdown tables: base models, honest adaptive / transfer / clean differences, AutoAttack, paper vs honest."""
    fractions = sorted({str(f) for s in config.settings for f in s.fractions}, key=float)
    base = ["| setting | attack | seeds | clean acc | adaptive robust acc | AutoAttack acc (subset) |",
            "|---|---|---|---|---|---|"]
    adaptive = ["| setting | attack | method | " + " | ".join(f"Δ vs none {_fraction_label(f)}" for f in fractions)
                + " | " + " | ".join(f"Δ vs random {_fraction_label(f)}" for f in fractions) + " |",
                "|" + "---|" * (3 + 2 * len(fractions))]
    late = [f for f in fractions if float(f) >= 0.05]
    transfer = ["| setting | attack | method | " + " | ".join(f"transfer Δ vs none {_fraction_label(f)}" for f in late)
                + " | " + " | ".join(f"clean Δ vs none {_fraction_label(f)}" for f in late)
                + " | " + " | ".join(f"majority-class predictions Δ vs none {_fraction_label(f)}" for f in late)
                + " |",
                "|" + "---|" * (3 + 3 * len(late))]
    autoattack = ["| setting | method | AutoAttack acc | Δ vs none | Δ vs random |", "|---|---|---|---|---|"]
    paper = ["| setting | method | removed | paper: acc on fixed attacked points | paper Δ vs none | paper Δ vs random "
             "| leak-free Δ vs none | leak (paper − leak-free) | honest Δ vs none, closed-form re-attack "
             "| honest Δ vs none, PGD re-attack |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for setting in config.settings:
        runs, honest = per_setting[setting.name], summary[setting.name]["honest"]
        for attack in setting.attacks:
            anyf = str(setting.fractions[0])
            clean = mean_std(_honest(runs, attack, "none", anyf, "clean_acc"))
            robust = mean_std(_honest(runs, attack, "none", anyf, "robust_acc_adaptive"))
            aa = (_ms(mean_std([run["base"]["autoattack"] for run in runs]))
                  if attack == "pgd-linf" and "autoattack" in runs[0]["base"] else "—")
            base.append(f"| {setting.name} | {attack} | {len(runs)} | {_ms(clean)} | {_ms(robust)} | {aa} |")
            for method in (*setting.methods, *BASELINES):
                cells = honest[attack][method]
                vs_none = [_ci(cells[f]["robust_acc_adaptive_vs_none"]) if f in cells else "—" for f in fractions]
                vs_random = [_ci(cells[f]["robust_acc_adaptive_vs_random"]) if f in cells and method != "random"
                             else "—" for f in fractions]
                adaptive.append(f"| {setting.name} | {attack} | {method} | " + " | ".join(vs_none + vs_random) + " |")
                moved = [_ci(cells[f]["robust_acc_transfer_vs_none"]) if f in cells else "—" for f in late]
                clean_moved = [_ci(cells[f]["clean_acc_vs_none"]) if f in cells else "—" for f in late]
                shifted = [_ci(cells[f]["majority_rate_vs_none"]) if f in cells else "—" for f in late]
                transfer.append(f"| {setting.name} | {attack} | {method} | "
                                + " | ".join(moved + clean_moved + shifted) + " |")
                cell = cells.get(str(config.autoattack_fraction), {})
                if "autoattack_acc" in cell:
                    autoattack.append(f"| {setting.name} | {method} | {_ms(cell['autoattack_acc'])} | "
                                      f"{_ci(cell['autoattack_acc_vs_none'])} | "
                                      + (_ci(cell["autoattack_acc_vs_random"]) if method != "random" else "—") + " |")
        if setting.paper:
            by_method = summary[setting.name]["paper"]
            for method in (*setting.methods, *BASELINES):
                for f in map(str, setting.fractions):
                    cell = by_method[method][f]
                    paper.append(
                        f"| {setting.name} | {method} | {_fraction_label(f)} | {_ms(cell['paper_acc'])} | "
                        f"{_ci(cell['paper_vs_none'])} | "
                        + (_ci(cell["paper_vs_random"]) if method != "random" else "—")
                        + f" | {_ci(cell['leak_free_vs_none'])} | {_ci(cell['leak'])} | "
                        f"{_ci(cell['honest_linear']) if 'honest_linear' in cell else '—'} | "
                        f"{_ci(cell['honest_main']) if 'honest_main' in cell else '—'} |")
    return {"base": base, "adaptive": adaptive, "transfer": transfer, "autoattack": autoattack, "paper": paper}


def _significant(stat) -> int:
    """+1 / -1 if the 95% interval lies above / below 0, else 0."""
    _, (lo, hi) = stat
    return 1 if lo > 0 else -1 if hi < 0 else 0


def reading(per_setting: dict, summary: dict, config: Config) -> list:
    """Sentences generated from the confidence intervals."""
    lines = []
    for setting in config.settings:
        honest = summary[setting.name]["honest"]
        budgeted = [a for a in setting.attacks if a != "linear"]
        cells = [(a, m, f, honest[a][m][f]) for a in budgeted for m in setting.methods
                 for f in map(str, setting.fractions)]
        if "linear" in setting.attacks:
            runs = per_setting[setting.name]
            undefended = _ms(mean_std(_honest(runs, 'linear', 'none', '', 'robust_acc_adaptive')))
            lines.append(f"{setting.name}: the budget-free closed-form attack leaves an adaptive robust accuracy of "
                         f"{undefended}% on the undefended "
                         "model and moves every point across the boundary of a linear model, so re-attacked it "
                         "only measures the points misclassified to begin with; the counts below leave it out.")
        for reference in ("none", "random"):
            signs = [_significant(c[f"robust_acc_adaptive_vs_{reference}"]) for *_, c in cells]
            better = [f"{m} {a} {_fraction_label(f)}" for (a, m, f, c), s in zip(cells, signs) if s > 0]
            lines.append(
                f"{setting.name} ({len(per_setting[setting.name])} seeds), honest protocol: adaptive robust accuracy "
                f"of the influence-pruned models is above {'no defence' if reference == 'none' else 'random removal'} "
                f"(95% CI > 0) in {signs.count(1)} of {len(cells)} (budgeted attack, method, budget) cells"
                + (f" ({', '.join(better[:8])}{', ...' if len(better) > 8 else ''})" if better else "")
                + f", below it in {signs.count(-1)}.")
        a, m, f, c = max(cells, key=lambda cell: cell[3]["robust_acc_adaptive_vs_none"][0])
        lines.append(f"{setting.name}: the largest mean adaptive gain over no defence is {m} against {a} at "
                     f"{_fraction_label(f)}: {_ci(c['robust_acc_adaptive_vs_none'])} points (vs random "
                     f"{_ci(c['robust_acc_adaptive_vs_random'])}); clean accuracy {_ci(c['clean_acc_vs_none'])}.")
        top = str(max(setting.fractions))
        at_top = [c for a, m, f, c in cells if f == top]
        runs = per_setting[setting.name]
        shift = 100 * sum(c["majority_rate_vs_none"][0] for c in at_top) / len(at_top)
        gain = 100 * sum(c["robust_acc_adaptive_vs_none"][0] for c in at_top) / len(at_top)
        share = 100 * mean_std([run["majority_share"] for run in runs])[0]
        before = 100 * mean_std(_honest(runs, budgeted[0], "none", top, "majority_rate"))[0]
        if share > 50:  # a skewed (binary) task: predicting the majority class is "robust" on its whole share
            lines.append(
                f"{setting.name}: at {_fraction_label(top)} removed, the influence-pruned models predict the training "
                f"majority class for {before + shift:.1f}% of the clean test points on average, the undefended model "
                f"for {before:.1f}% (true share {share:.1f}%), with a mean adaptive gain of {gain:+.2f} points"
                + (". A constant majority prediction is robust on that whole share, so part of such a gain can be a "
                   "shift toward the majority class rather than robustness." if shift > 0 else "."))
        stale = 100 * sum(c["robust_acc_transfer"][0] - c["robust_acc_adaptive"][0] for *_, c in cells) / len(cells)
        lines.append(f"{setting.name}: averaged over these cells, transfer robust accuracy (the undefended model's "
                     f"adversarial points) is {abs(stale):.2f} points {'above' if stale >= 0 else 'below'} the "
                     "adaptive one" + (": stale perturbations flatter a defence." if stale > 0 else "."))
        if "autoattack" in per_setting[setting.name][0]["base"]:
            fraction = str(config.autoattack_fraction)
            aa = {m: honest["pgd-linf"][m][fraction] for m in setting.methods
                  if "autoattack_acc" in honest["pgd-linf"][m].get(fraction, {})}
            if aa:
                signs = [_significant(c["autoattack_acc_vs_random"]) for c in aa.values()]
                lines.append(f"{setting.name}: under AutoAttack ({config.autoattack_points} test points, models "
                             f"defended against PGD-linf at {_fraction_label(fraction)}), {signs.count(1)} of "
                             f"{len(aa)} influence methods ({', '.join(aa)}) beat random removal (95% CI > 0), "
                             f"{signs.count(-1)} are below it.")
        if setting.paper:
            paper = summary[setting.name]["paper"]
            top = str(max(setting.fractions))
            for method in ("ip", "ip-ensemble"):
                if method not in paper:
                    continue
                c = paper[method][top]
                lines.append(
                    f"{setting.name}, {method}, {_fraction_label(top)} removed: the paper's protocol reports "
                    f"{_ci(c['paper_vs_none'])} points of accuracy on the fixed attacked test points; scored on "
                    f"attacked validation points instead (leak-free) {_ci(c['leak_free_vs_none'])}; the leak "
                    f"(paper − leak-free) is {_ci(c['leak'])}. The honest protocol gives "
                    + (f"{_ci(c['honest_linear'])} under an adaptive closed-form re-attack and " if 'honest_linear' in c
                       else "") + f"{_ci(c['honest_main'])} under {MAIN_ATTACK[setting.data]}.")
            leaks = [paper[m][f]["leak"][0] for m in setting.methods for f in map(str, setting.fractions)]
            gains = [paper[m][f]["paper_vs_none"][0] for m in setting.methods for f in map(str, setting.fractions)]
            lines.append(f"{setting.name}: averaged over the {len(leaks)} (method, budget) cells, the paper's protocol "
                         f"reports {100 * sum(gains) / len(gains):+.2f} points over no defence, of which "
                         f"{100 * sum(leaks) / len(leaks):+.2f} come from scoring on the evaluation points (leak).")
    return lines


def plot(summary: dict, config: Config, path: Path) -> None:
    """Top row: the paper's protocol vs leak-free vs honest gains for ip (linear settings). Other panels:
    honest adaptive robust accuracy minus random removal against the budget, per method, main attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paper_settings = [s for s in config.settings if s.paper]
    panels = len(paper_settings) + len(config.settings)
    columns = min(4, panels)
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.6 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]

    def errorbar(ax, xs, stats, **style):
        means = [100 * m for m, _ in stats]
        errors = [100 * (hi - m) if math.isfinite(hi) else 0.0 for m, (_, hi) in stats]
        ax.errorbar(xs, means, yerr=errors, capsize=3, **style)

    for ax, setting in zip(flat, paper_settings):
        paper = summary[setting.name]["paper"]
        xs = [100 * f for f in setting.fractions]
        fs = [str(f) for f in setting.fractions]
        for key, label, marker in (("paper_vs_none", "paper's protocol", "o"), ("leak_free_vs_none", "leak-free", "s"),
                                   ("honest_linear", "honest, closed-form re-attack", "^"),
                                   ("honest_main", f"honest, {MAIN_ATTACK[setting.data]} re-attack", "v")):
            if key in paper["ip"][fs[0]]:
                errorbar(ax, xs, [paper["ip"][f][key] for f in fs], marker=marker, label=label)
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set(title=f"{setting.name}: ip, gain over no defence", xlabel="training samples removed (%)",
               ylabel="accuracy gain (points, 95% CI)")
        ax.legend(fontsize=7)
    for ax, setting in zip(flat[len(paper_settings):], config.settings):
        attack = MAIN_ATTACK[setting.data] if MAIN_ATTACK[setting.data] in setting.attacks else setting.attacks[0]
        honest = summary[setting.name]["honest"][attack]
        xs = [100 * f for f in setting.fractions]
        for method in (*setting.methods, "loss"):
            errorbar(ax, xs, [honest[method][str(f)]["robust_acc_adaptive_vs_random"] for f in setting.fractions],
                     marker="o", label=method, ls="--" if method == "loss" else "-")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set(title=f"{setting.name}, {attack}: honest", xlabel="training samples removed (%)",
               ylabel="adaptive robust acc − random (points)")
        ax.legend(fontsize=7)
    for ax in flat[panels:]:
        ax.axis("off")
    save_figure(fig, path)


def section(table: dict, lines: list, config: Config, command: str, plot_name: str, minutes: float) -> str:
    """The RESULTS.md section: configuration, command, tables, plot link and the reading."""
    settings = "; ".join(
        f"`{s.name}` ({s.sizes[0]} / {s.sizes[1]} / {s.sizes[2]} train / validation / test, Adam lr {s.lr}, "
        f"{s.epochs} epochs, batch {s.batch_size}, seeds {list(s.seeds)}; attacks {', '.join(s.attacks)}; methods "
        f"{', '.join(s.methods)} + {', '.join(BASELINES)}; budgets {', '.join(f'{100 * f:g}%' for f in s.fractions)})"
        for s in config.settings)
    threats = "; ".join(f"{data}: FGSM and PGD-linf eps {t.linf_eps}, PGD-l2 eps {t.l2_eps} ({t.pgd_steps} steps), "
                        f"bounds {t.bounds}" for data, t in THREATS.items())
    return "\n".join([
        "## Adversarial defence: honest protocol and the paper's protocol (experiments/paper_defense.py)",
        "",
        f"Regenerate: `{command}` ({minutes:.0f} min wall-clock on the shared 2-core machine)",
        "",
        f"Configuration: {settings}. Threat models: {threats}; the closed-form attack (`attacks.LinearClosedForm`, "
        "overshoot 0.3, `labels=\"predicted\"` as in the paper's code: every point moved off its predicted class; no "
        "budget) only for logistic regression, where it is exact. Training: "
        f"`CheckpointingERM` (ERM, weight decay {config.weight_decay}, {config.tracin_checkpoints} TracIn "
        f"checkpoints); logistic regression full-batch. Methods: ip-ensemble with {config.ensemble_members} members "
        "(N(0, 0.01) weight noise for logistic regression, dropout U(0, 0.01) otherwise, as in the paper); tracin over "
        f"the checkpoints with Adam's lr; if-exact (damping {config.if_damping}) for logistic regression, if-cg "
        f"(damping {config.if_damping}) on the LAST LAYER for the MLP and CNN (the full Hessian of a ReLU network is "
        "indefinite; CG needs a positive-definite one); datainf with its default per-layer damping. The CNN runs a "
        "reduced grid (see its attacks, methods and budgets above) to fit 2 CPU cores. AutoAttack: torchattacks "
        f"standard (APGD-CE, APGD-T, FAB-T, Square), linf eps {config.autoattack_eps}, on the first "
        f"{config.autoattack_points} test points, for the base model and the models defended against PGD-linf at "
        f"{100 * config.autoattack_fraction:g}% by {', '.join(config.autoattack_methods)} (Square's 5,000 queries "
        "cost seconds per model), on the digits MLP and CNN: images only, because torchattacks clips to [0, 1] and "
        "Adult's standardised features are unbounded; not for logistic regression, whose linf worst case is the "
        "sign step FGSM and PGD already take. All Δ are paired differences over seeds in accuracy points, mean "
        "[95% t-interval]; 'none' is the undefended model. Removed samples get weight 0 (`defenses.reweight`, "
        "scheme 'hard'), so every retraining keeps the undefended model's initialisation, data order and number of "
        "steps; dropping the rows instead would also shorten training by the removed share.",
        "",
        "Paper's protocol: closed-form attack on a random share of the test points (share ~ "
        f"U({config.paper_share[0]}, {config.paper_share[1]}) per seed); scores of the logistic regression against the "
        "mean loss on that attacked test set; accuracy of the retrained model on the same fixed attacked points. "
        "Leak-free: the same share of VALIDATION points attacked and scored against; same evaluation. Honest: "
        "validation scoring against Robust(attack), attack re-run on the defended model, held-out test split.",
        "",
        "Undefended models (test split):",
        "",
        *table["base"],
        "",
        "Honest protocol, adaptive robust accuracy (attack re-run on each defended model):",
        "",
        *table["adaptive"],
        "",
        "Honest protocol, transfer robust accuracy (the undefended model's adversarial test points), clean accuracy "
        "and the share of clean test points predicted as the training majority class:",
        "",
        *table["transfer"],
        "",
        f"AutoAttack on the defended models (PGD-linf threat model, {100 * config.autoattack_fraction:g}% removed):",
        "",
        *table["autoattack"],
        "",
        "The paper's protocol beside the honest one (logistic regression):",
        "",
        *table["paper"],
        "",
        f"![paper vs honest gains, and honest gains over random removal](plots/{plot_name})",
        "",
        "Reading (generated from the confidence intervals above):",
        "",
        *[f"- {line}" for line in lines],
    ])


def main(argv: Optional[list] = None) -> dict:
    """Run the experiment, write the JSON, the plot and (full runs only) the RESULTS.md section."""
    args = experiment_arguments(__doc__, "paper_defense", argv)
    config = QUICK if args.quick else FULL
    folder = None if args.quick else EXPERIMENTS / "out" / args.name
    runs = [(setting, seed) for setting in config.settings for seed in setting.seeds]
    per_setting: dict = {setting.name: [] for setting in config.settings}
    seconds = 0.0
    for setting, seed in tqdm(runs, desc="paper_defense", disable=args.no_progress):
        shared = {k: v for k, v in dataclasses.asdict(config).items() if k != "settings"}
        key = json.loads(json.dumps({**dataclasses.asdict(setting), "config": shared}))
        result, took = cached(None if folder is None else SeedResults(folder / setting.name, key), seed,
                              lambda: run_seed(setting, seed, config, progress=not args.no_progress))
        per_setting[setting.name].append(result)
        seconds += took
    summary = {s.name: {"honest": summarise_honest(per_setting[s.name], s),
                        **({"paper": summarise_paper(per_setting[s.name], s)} if s.paper else {})}
               for s in config.settings}
    table = tables(per_setting, summary, config)
    lines = reading(per_setting, summary, config)
    plot_name = f"{args.name}.png"
    plot(summary, config, args.plots / plot_name)
    result = {"config": dataclasses.asdict(config), "minutes": seconds / 60, "per_seed": per_setting,
              "summary": summary}
    write_json(args.out, result)
    if not args.quick:
        command = "OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python -m experiments.paper_defense"
        write_section("paper_defense", section(table, lines, config, command, plot_name, seconds / 60))
    print("\n".join([*table["base"], "", *table["adaptive"], "", *table["paper"], "", *lines]))
    return result


if __name__ == "__main__":
    main()
