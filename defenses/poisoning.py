"""Backdoor poisons in the training set: find them, remove them, retrain, and measure the backdoor after.

- :func:`remove_poisons`: the recommended recipe for each defender threat model (numbers: the
  ``poisoning`` section of ``experiments/RESULTS.md``; advice: the README, "Poisoned training data").
  Both detect with :func:`contrast_detection`, the representation contrast of
  :mod:`defenses.poison_detection`, cut at the Otsu split within the target class (at most the
  budget), and retrain from scratch on the kept samples:

  - evidence known (``evidence = (X_triggered, y_true)``): the target class is the one the model
    assigns the evidence to, the evidence's features are the pull, and the evidence is added to the
    retraining set under its true labels (x20 for plain training, x5 for adversarial trainers);
  - trigger unknown (``evidence=None``): the target class and the pull come from the samples whose
    nearest neighbours (in the same features) carry other labels.

- :class:`PoisonSpec` and :func:`run_poisoned`: the loop behind ``defenses.run(..., poison=...)``:
  per seed, poison the training split (BadNets patch or ART's clean-label backdoor), train the base
  model with the trainer, draw K triggered validation inputs of the other classes as evidence, run
  every recipe of :data:`POISON_RECIPES` and report clean accuracy, backdoor ASR (``asr_backdoor``),
  detection precision / recall / AUROC at the budget and the evasion robust accuracy, with paired
  95% intervals against ``none`` and ``random``.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from attacks.plumbing import make_generator
import attacks
import robust_infl
from attacks.inputs import as_data, check_target_class
from attacks.poisoning import check_rate, poison_count
from attacks.validation import check_choice, check_fraction, check_int, check_seed
from robust_infl.io import atomic_write, atomic_write_json, atomic_write_text

from . import poison_detection as detect
from .data import take
from .report import format_interval
from .seed_results import SeedResults, run_seeds
from .selection import budget_size, check_budget, most_harmful
from .stats import mean_std, paired_difference

__all__ = ["remove_poisons", "PoisonSpec", "POISON_RECIPES", "POISON_DEFAULT_RECIPES", "poison_recipe_names",
           "run_poisoned", "POISON_METRICS", "POISON_ATTACKS"]

POISON_ATTACKS = ("badnets", "clean-label")
POISON_METRICS = ("clean_acc", "asr_backdoor", "robust_acc", "precision", "recall", "auroc", "removed_share")


def _evidence_repeats(trainer) -> int:
    """How often the evidence is repeated in the retraining set: x20 for plain training, x5 for trainers
    with an inner maximisation (adversarial training fits the few evidence inputs more readily)."""
    return 5 if hasattr(trainer, "eps") else 20


def _check_budget(budget) -> float:
    return check_fraction(budget, "budget")


def _with_evidence(train: tuple, evidence: Optional[tuple], repeats: int) -> tuple:
    if evidence is None:
        return train
    X, y = train[:2]
    return torch.cat([X] + [evidence[0].to(X)] * repeats), torch.cat([y] + [evidence[1].to(y)] * repeats)


def _contrast_in_class(features: torch.Tensor, y: torch.Tensor, target: int, pull: torch.Tensor, k: int) -> tuple:
    """Contrast scores towards ``pull`` in class ``target``, flagged by the Otsu split (at most ``k``), then once
    more with the flagged samples, mostly poisons and a less noisy pull than a few inputs, as the pull."""
    in_class = y.cpu() == target
    scores = detect.contrast_scores(features, y, target, pull)
    flagged = detect.separated_top(scores, in_class, k)
    if flagged.any():
        scores = detect.contrast_scores(features, y, target, features[flagged])
        flagged = detect.separated_top(scores, in_class, k)
    return scores, flagged


def contrast_detection(model: nn.Module, train: tuple, evidence: Optional[tuple], budget: float,
                       candidates: int = 3) -> tuple:
    """The detector of :func:`remove_poisons`: ``(scores, flagged_mask, target_class)``.

    Evidence known: the target class is the one the model assigns the evidence to, and the evidence's
    features are the pull. Trigger unknown: the ``candidates`` classes most over-represented among the
    budget's samples with the largest k-NN label disagreement are tried, each with the more disagreeing
    half of its samples among those as the pull (pseudo-evidence), and the class whose in-class scores
    split most cleanly in two (:func:`~defenses.poison_detection.otsu_split`) is taken. Scores:
    :func:`~defenses.poison_detection.contrast_scores`; flags: their Otsu split within the target class,
    at most the budget, then once more with the flagged samples as the pull.
    """
    X, y = train[:2]
    k = check_budget(len(y), budget, "budget", "training samples", allow_none=False)
    features = detect.layer_features(model, X)
    if evidence is not None:
        target = detect.evidence_target_class(model, evidence)
        return (*_contrast_in_class(features, y, target, detect.layer_features(model, evidence[0]), k), target)
    disagreement = detect.label_disagreement_scores(features, y)
    top = most_harmful(disagreement, budget)
    best = None
    for target in detect.over_represented_classes(top, y)[:candidates].tolist():
        chosen = torch.nonzero(top & (y.cpu() == target)).flatten()
        if chosen.numel() == 0:
            continue
        ranked = chosen[torch.sort(-disagreement[chosen], stable=True).indices]
        scores, flagged = _contrast_in_class(features, y, target, features[ranked[:max(1, ranked.numel() // 2)]], k)
        separation = detect.otsu_split(scores[y.cpu() == target])[1]
        if best is None or separation > best[0]:
            best = (separation, scores, flagged, target)
    return best[1], best[2], best[3]


def remove_poisons(model: nn.Module, train, evidence, *, trainer, budget: float, seed: int = 0):
    """Find backdoor poisons in ``train``, remove at most ``budget`` of it and retrain with ``trainer``.

    Args:
        model: the model trained on the (possibly poisoned) ``train``.
        train: ``(X, y)`` the model was trained on.
        evidence: ``(X_triggered, y_true)``, triggered inputs with their true labels (threat model
            "evidence known"), or None ("trigger unknown": objective-free detection only).
        trainer: has ``fit(model, data, *, seed)`` (e.g. :class:`defenses.ERM`, :class:`defenses.PGDAT`);
            the returned model is trained by it from scratch.
        budget: the largest share of ``train`` removed, in (0, 1) (about twice the poison rate).
        seed: seed of the retraining.

    Returns:
        ``(retrained_model, removed_index)``: the model retrained from scratch on the kept samples
        (plus the evidence under its true labels, repeated x20 for plain training and x5 for
        adversarial trainers, when given) and the sorted indices of the removed training samples.
        Detection: :func:`contrast_detection`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: must be a torch.nn.Module, got {type(model).__name__}")
    X, y = as_data(train, "train")[:2]
    budget = _check_budget(budget)
    check_budget(len(y), budget, "budget", "training samples", allow_none=False)
    check_seed(seed)
    if not callable(getattr(trainer, "fit", None)):
        raise TypeError(f"trainer: must have a fit() method, got {type(trainer).__name__}")
    if evidence is not None:
        evidence = detect.check_evidence(evidence, tuple(X.shape[1:]), int(y.max()) + 1)
    trainer = trainer.with_retrain("scratch") if callable(getattr(trainer, "with_retrain", None)) else trainer
    _, removed, _ = contrast_detection(model, (X, y), evidence, budget)
    kept = _with_evidence(take((X, y), ~removed), evidence, _evidence_repeats(trainer))
    return trainer.fit(model, kept, seed=seed), torch.nonzero(removed).flatten()


# --------------------------------------------------------------------------- the experiment loop


@dataclass(frozen=True)
class PoisonSpec:
    """The poisoning threat model of ``defenses.run(..., poison=...)``.

    Attributes:
        attack: ``"badnets"`` (patch + relabel, :func:`attacks.poison`) or ``"clean-label"`` (ART's
            ``PoisoningAttackCleanLabelBackdoor``: target-class samples, PGD-perturbed on a proxy
            model trained on the clean split with the same trainer, then patched; labels kept).
        rate: share of the training split poisoned.
        target_class: the class the backdoor maps to.
        evidence: the evidence sizes K run for the evidence-known recipes (triggered validation
            inputs of the other classes, with their true labels; nested: the first K of one draw).
        budget: share removed by every recipe (default ``2 * rate``).
        patch_size: side of the square patch in the bottom-right corner, value 1.
        clean_label_eps, clean_label_steps: ART's PGD budget (linf) and steps for the clean-label attack.
        robust_n: the evasion robust accuracy is measured on the first ``robust_n`` test inputs (None: all);
            clean accuracy and the backdoor ASR always on the whole test split.
    """

    attack: str = "badnets"
    rate: float = 0.05
    target_class: int = 0
    evidence: tuple = (50,)
    budget: Optional[float] = None
    patch_size: int = 3
    clean_label_eps: float = 0.3
    clean_label_steps: int = 20
    robust_n: Optional[int] = 500

    def checked(self, num_classes: int, n_train: Optional[int] = None) -> "PoisonSpec":
        """This spec after validation, with ``budget`` resolved; with ``n_train``, a rate that plants no poison
        and a budget that removes no sample of a training split of that size are refused."""
        check_choice(self.attack, "poison", POISON_ATTACKS)
        rate = check_rate(self.rate)
        check_target_class(self.target_class, num_classes)
        sizes = (self.evidence,) if isinstance(self.evidence, int) else tuple(self.evidence)
        for size in sizes:
            check_int(size, "evidence", minimum=1)
        budget = _check_budget(2 * rate if self.budget is None else self.budget)
        if n_train is not None:
            poison_count(rate, n_train)
            check_budget(n_train, budget, "budget", "training samples", allow_none=False)
        check_int(self.patch_size, "patch_size", minimum=1)
        if self.robust_n is not None:
            check_int(self.robust_n, "robust_n", minimum=1)
        return replace(self, rate=rate, evidence=tuple(sorted(set(sizes))), budget=budget)


def as_poison_spec(poison) -> PoisonSpec:
    """A :class:`PoisonSpec` from itself, a dict of its fields or an attack name."""
    if isinstance(poison, PoisonSpec):
        return poison
    if isinstance(poison, str):
        return PoisonSpec(attack=poison)
    if isinstance(poison, dict):
        unknown = set(poison) - set(PoisonSpec.__dataclass_fields__)
        if unknown:
            raise ValueError(f"poison: unknown fields {sorted(unknown)}; valid are {sorted(PoisonSpec.__dataclass_fields__)}")
        return PoisonSpec(**poison)
    raise TypeError(f"poison: expected a PoisonSpec, a dict of its fields or an attack name, got {type(poison).__name__}")


@dataclass
class PoisonContext:
    """What a poisoning recipe may use (no test data, no knowledge of which samples are poisoned)."""

    model: nn.Module
    train: tuple
    val: tuple
    evidence: Optional[tuple]
    trainer: object
    budget: float
    seed: int
    progress: bool = False
    cache: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return budget_size(len(self.train[1]), self.budget)

    def losses(self) -> torch.Tensor:
        if "losses" not in self.cache:
            self.cache["losses"] = detect.training_losses(self.model, self.train)
        return self.cache["losses"]

    def fit(self, data: tuple) -> nn.Module:
        return self.trainer.fit(self.model, data, seed=self.seed)


@dataclass(frozen=True)
class Outcome:
    """A recipe's result: the model, the removed-sample mask (None: nothing removed) and scores (for AUROC)."""

    model: nn.Module
    removed: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None


def _by_scores(name: str, score_fn: Callable[[PoisonContext], torch.Tensor]) -> Callable[[PoisonContext], Outcome]:
    """Recipe: remove the budget's most suspicious samples by ``score_fn`` (cached per seed), retrain."""

    def recipe(ctx: PoisonContext) -> Outcome:
        key = ("scores", name) if ctx.evidence is None else ("scores", name, len(ctx.evidence[1]))
        if key not in ctx.cache:
            ctx.cache[key] = score_fn(ctx).double().cpu()
        scores = ctx.cache[key]
        removed = most_harmful(scores, ctx.budget)
        return Outcome(ctx.fit(take(ctx.train[:2], ~removed)), removed, scores)

    return recipe


def _self_influence(ctx: PoisonContext) -> torch.Tensor:
    return robust_infl.influence(ctx.model, ctx.train[:2], ctx.val[:2], objective=robust_infl.Utility(),
                                 method="self", seed=ctx.seed, progress=ctx.progress)


def _random(ctx: PoisonContext) -> torch.Tensor:
    return torch.rand(len(ctx.train[1]), generator=make_generator(ctx.seed), dtype=torch.float64)


def _estimated_class_low_loss(ctx: PoisonContext) -> torch.Tensor:
    target = detect.estimate_target_class(ctx.losses(), ctx.train[1], ctx.budget)
    return detect.in_class_low_loss(ctx.losses(), ctx.train[1], target)


def _evidence_class_low_loss(ctx: PoisonContext) -> torch.Tensor:
    target = detect.evidence_target_class(ctx.model, ctx.evidence)
    return detect.in_class_low_loss(ctx.losses(), ctx.train[1], target)


def _evidence_influence(ctx: PoisonContext) -> torch.Tensor:
    """Renormalised IP harm on the loss of the triggered evidence under its true labels (= Robust(trigger))."""
    return robust_infl.influence(ctx.model, ctx.train[:2], ctx.evidence, objective=robust_infl.Utility(),
                                 method="ip", renormalize=True, seed=ctx.seed, progress=ctx.progress)


def _none(ctx: PoisonContext) -> Outcome:
    return Outcome(ctx.model)


def _evidence_retrain(ctx: PoisonContext) -> Outcome:
    """Retrain from scratch on all training samples plus the evidence (true labels, repeated as in the recipe)."""
    return Outcome(ctx.fit(_with_evidence(ctx.train[:2], ctx.evidence, _evidence_repeats(ctx.trainer))))


def _evidence_finetune(ctx: PoisonContext) -> Outcome:
    """Fine-tune the poisoned model on the evidence (true labels) plus the clean validation inputs."""
    data = tuple(torch.cat([a, b]) for a, b in zip(ctx.evidence, ctx.val[:2]))
    return Outcome(ctx.trainer.with_retrain("finetune").fit(ctx.model, data, seed=ctx.seed))


def _remove_poisons(ctx: PoisonContext) -> Outcome:
    model, index = remove_poisons(ctx.model, ctx.train[:2], ctx.evidence, trainer=ctx.trainer, budget=ctx.budget,
                                  seed=ctx.seed)
    removed = torch.zeros(len(ctx.train[1]), dtype=torch.bool)
    removed[index] = True
    scores, _, _ = contrast_detection(ctx.model, ctx.train[:2], ctx.evidence, ctx.budget)
    return Outcome(model, removed, scores)


def _removal_only(ctx: PoisonContext) -> Outcome:
    """The detector of :func:`remove_poisons` with the evidence, retrained on the kept samples only (ablation)."""
    scores, removed, _ = contrast_detection(ctx.model, ctx.train[:2], ctx.evidence, ctx.budget)
    return Outcome(ctx.fit(take(ctx.train[:2], ~removed)), removed, scores)


def _lead_recipe(ctx: PoisonContext) -> Outcome:
    """The earlier lead: the budget's lowest-loss samples of the evidence's class removed, retrained on the
    kept samples plus the evidence (true labels, repeated)."""
    scores = _evidence_class_low_loss(ctx)
    removed = most_harmful(scores, ctx.budget)
    kept = _with_evidence(take(ctx.train[:2], ~removed), ctx.evidence, _evidence_repeats(ctx.trainer))
    return Outcome(ctx.fit(kept), removed, scores)


# name -> (recipe, threat model: "none" (no defence), "unknown" (objective-free) or "evidence")
POISON_RECIPES: dict = {
    "none": (_none, "none"),
    "random": (_by_scores("random", _random), "unknown"),
    "low-loss": (_by_scores("low-loss", lambda ctx: -ctx.losses()), "unknown"),
    "self": (_by_scores("self", _self_influence), "unknown"),
    "activation-defence": (_by_scores("activation-defence",
                                      lambda ctx: detect.activation_defence_scores(ctx.model, ctx.train, seed=ctx.seed)),
                           "unknown"),
    "spectral-signature": (_by_scores("spectral-signature",
                                      lambda ctx: detect.spectral_signature_scores(ctx.model, ctx.train)), "unknown"),
    "class-low-loss": (_by_scores("class-low-loss", _estimated_class_low_loss), "unknown"),
    "knn-label": (_by_scores("knn-label", lambda ctx: detect.label_disagreement_scores(
        detect.layer_features(ctx.model, ctx.train[0]), ctx.train[1])), "unknown"),
    "remove-poisons-unknown": (_remove_poisons, "unknown"),
    "evidence-retrain": (_evidence_retrain, "evidence"),
    "evidence-finetune": (_evidence_finetune, "evidence"),
    "evidence-influence": (_by_scores("evidence-influence", _evidence_influence), "evidence"),
    "evidence-class-low-loss": (_lead_recipe, "evidence"),
    "contrast-removal-only": (_removal_only, "evidence"),
    "remove-poisons": (_remove_poisons, "evidence"),
}
POISON_DEFAULT_RECIPES = tuple(POISON_RECIPES)


def poison_recipe_names() -> tuple:
    """Names of the poisoning recipes (``defenses.run(..., poison=..., recipes=...)``)."""
    return tuple(POISON_RECIPES)


def _draw_evidence(val: tuple, trigger, target_class: int, size: int, seed: int) -> tuple:
    """The first ``size`` of a seeded permutation of the validation inputs of the other classes, triggered,
    with their true labels; and the validation split without them."""
    X, y = val[:2]
    others = torch.nonzero(y != target_class).flatten()
    if size > others.numel():
        raise ValueError(f"evidence: asks for {size} triggered inputs but the validation split holds only "
                         f"{others.numel()} outside the target class")
    chosen = others[torch.randperm(others.numel(), generator=make_generator(seed + 7919))[:size]]
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[chosen] = False
    return (trigger.apply(X[chosen]), y[chosen]), (X[rest], y[rest])


def _poison_train(spec: PoisonSpec, train: tuple, trigger, trainer, model_for: Callable, seed: int):
    if spec.attack == "badnets":
        return attacks.poison(train[:2], trigger, target_class=spec.target_class, rate=spec.rate, seed=seed)
    proxy = trainer.fit(model_for(seed), train[:2], seed=seed)
    art = attacks.ARTPoison("PoisoningAttackCleanLabelBackdoor", eps=spec.clean_label_eps,
                            eps_step=2.5 * spec.clean_label_eps / spec.clean_label_steps,
                            max_iter=spec.clean_label_steps)
    return art.poison(train[:2], trigger, target_class=spec.target_class, rate=spec.rate, seed=seed, proxy=proxy)


def _test_split(test, robust_n: Optional[int]) -> tuple:
    """``(X, y, robust_n)``: the test split and how many of its first inputs the evasion attack runs on."""
    X, y = as_data(test, "test")[:2]
    return X, y, len(y) if robust_n is None else min(robust_n, len(y))


def _test_metrics(model: nn.Module, test: tuple, trigger, target_class: int, attack: Callable,
                  eval_batch_size: int) -> dict:
    """Clean accuracy, backdoor ASR (targeted) on the whole test split, evasion robust accuracy on its first
    ``test[2]`` inputs."""
    X, y, robust_n = test
    backdoor = attacks.evaluate(model, (X, y), {"trigger": trigger}, target_class=target_class,
                                batch_size=eval_batch_size, progress=False)
    evasion = attacks.evaluate(model, (X[:robust_n], y[:robust_n]), {"attack": attack}, batch_size=eval_batch_size,
                               progress=False)
    return {"clean_acc": backdoor["clean_acc"], "asr_backdoor": backdoor["trigger"]["asr"],
            "robust_acc": evasion["attack"]["robust_acc"]}


def poisoned_seed(seed: int, splits, spec: PoisonSpec, recipes: Sequence[str], *, model_for: Callable, trainer,
                  attack: Callable, eval_batch_size: int = 256, progress: bool = False,
                  on_recipe: Optional[Callable[[str], None]] = None) -> dict:
    """One seed of :func:`run_poisoned`: ``{"base": row, "runs": [row, ...], "timing": {...}}``."""
    train, val = as_data(splits.train, "train"), as_data(splits.val, "val")
    trigger = attacks.Trigger.patch(tuple(splits.input_shape), size=spec.patch_size)
    trainer = trainer.with_retrain("scratch")
    X, y, poisoned_index = _poison_train(spec, train, trigger, trainer, lambda s: model_for(s, splits), seed)
    start = time.perf_counter()
    base = trainer.fit(model_for(seed, splits), (X, y), seed=seed)
    train_time = time.perf_counter() - start
    start = time.perf_counter()
    contrast_detection(base, (X, y), None, spec.budget)
    detection_time = time.perf_counter() - start
    test = _test_split(splits.test, spec.robust_n)
    base_row = {"seed": seed, **_test_metrics(base, test, trigger, spec.target_class, attack, eval_batch_size)}
    evidence, rest = _draw_evidence(val, trigger, spec.target_class, max(spec.evidence), seed)
    cache: dict = {}
    runs = []
    for name in recipes:
        fn, threat = POISON_RECIPES[name]
        for size in (spec.evidence if threat == "evidence" else (None,)):
            if on_recipe is not None:
                on_recipe(name if size is None else f"{name} K={size}")
            ctx = PoisonContext(model=base, train=(X, y), val=rest, trainer=trainer, budget=spec.budget, seed=seed,
                                evidence=None if size is None else (evidence[0][:size], evidence[1][:size]),
                                progress=progress, cache=cache)
            outcome = fn(ctx)
            metrics = (dict(base_row) if outcome.model is base else
                       _test_metrics(outcome.model, test, trigger, spec.target_class, attack, eval_batch_size))
            metrics.pop("seed", None)
            removed = outcome.removed if outcome.removed is not None else torch.zeros(len(y), dtype=torch.bool)
            found = detect.detection_metrics(removed, poisoned_index, outcome.scores)
            runs.append({"seed": seed, "recipe": name, "evidence": size, "threat": threat, **metrics,
                         "precision": found["precision"] if outcome.removed is not None else None,
                         "recall": found["recall"] if outcome.removed is not None else None,
                         "auroc": found["auroc"], "removed_share": found["removed"] / len(y)})
    return {"base": base_row, "runs": runs, "n_poisoned": int(poisoned_index.numel()),
            "timing": {"train_s": train_time, "detection_s": detection_time,
                       "detection_over_epoch": detection_time / (train_time / max(1, getattr(trainer, "epochs", 1)))}}


def summarise_poisoned(rows: list, recipes: Sequence[str]) -> list:
    """Per (recipe, evidence): each metric's mean ± std over seeds, paired differences vs ``none`` and ``random``."""
    by_key: dict = {}
    for row in rows:
        by_key.setdefault((row["recipe"], row["evidence"]), {})[row["seed"]] = row
    summary = []
    for (recipe, size), runs in sorted(by_key.items(), key=lambda kv: (list(recipes).index(kv[0][0]), kv[0][1] or 0)):
        seeds = sorted(runs)
        entry = {"recipe": recipe, "evidence": size, "threat": runs[seeds[0]]["threat"], "seeds": seeds}
        for metric in POISON_METRICS:
            values = [runs[s][metric] for s in seeds]
            entry[metric] = None if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values) \
                else mean_std(values)
        for control in ("none", "random"):
            other = by_key.get((control, None))
            if other is None or control == recipe or set(other) != set(runs):
                continue
            entry["vs_" + control] = {
                m: paired_difference([runs[s][m] for s in seeds], [other[s][m] for s in seeds])
                for m in POISON_METRICS
                if all(runs[s][m] is not None and other[s][m] is not None for s in seeds)}
        summary.append(entry)
    return summary


def _fmt(stat: Optional[dict], scale: float = 100.0, digits: int = 1) -> str:
    if stat is None:
        return "–"
    return f"{scale * stat['mean']:.{digits}f} ± {scale * stat['std']:.{digits}f}"


def _fmt_delta(stat: Optional[dict], scale: float = 100.0) -> str:
    if stat is None:
        return "–"
    return f"{scale * stat['mean']:+.1f}" + format_interval(stat, scale)


def render_poisoned(report: dict) -> str:
    """Markdown table of a poisoning report (percentages, mean ± std over seeds; Δ paired with 95% t-interval)."""
    cfg = report["config"]
    spec = cfg["poison"]
    lines = [f"# Poisoning report: {cfg['data']} / {cfg['model']} / trainer {cfg['trainer']}", "",
             f"{spec['attack']} at rate {spec['rate']:g}, target class {spec['target_class']}, patch "
             f"{spec['patch_size']}x{spec['patch_size']}; budget {spec['budget']:g} of the training split; "
             f"evasion attack {cfg['attack']}; seeds {cfg['seeds']}.", "",
             "| recipe | threat | K | clean acc | backdoor ASR | Δ ASR vs none | Δ clean vs none | precision | recall "
             "| AUROC | robust acc | removed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in report["summary"]:
        vs_none = e.get("vs_none", {})
        lines.append(
            f"| {e['recipe']} | {e['threat']} | {e['evidence'] or '–'} | {_fmt(e['clean_acc'])} "
            f"| {_fmt(e['asr_backdoor'])} | {_fmt_delta(vs_none.get('asr_backdoor'))} "
            f"| {_fmt_delta(vs_none.get('clean_acc'))} | {_fmt(e['precision'])} | {_fmt(e['recall'])} "
            f"| {_fmt(e['auroc'], 1.0, 3)} | {_fmt(e['robust_acc'])} | {_fmt(e['removed_share'])} |")
    lines += ["", "Percentages (AUROC as a number), mean ± std over seeds; Δ paired per seed with the 95% t-interval. "
              "Backdoor ASR: triggered test inputs of the other classes classified as the target class. "
              "Precision / recall of the removed samples against the true poisons; robust acc: the evasion "
              "attack re-run on each model."]
    return "\n".join(lines) + "\n"


def _plot_poisoned(report: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = report["summary"]
    labels = [e["recipe"] + ("" if e["evidence"] is None else f" K={e['evidence']}") for e in entries]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(entries) + 1.5))
    ax.barh(labels, [100 * e["asr_backdoor"]["mean"] for e in entries],
            xerr=[100 * e["asr_backdoor"]["std"] for e in entries], color="tab:red", alpha=0.7)
    ax.invert_yaxis()
    ax.axvline(5, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("backdoor attack success rate (%)")
    ax.set_title(f"{report['config']['data']} / {report['config']['poison']['attack']} / {report['config']['trainer']}")
    fig.tight_layout()
    try:
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=110))
    finally:
        plt.close(fig)


def run_poisoned(spec, *, seeds: list, splits_for: Callable, model_for: Callable, attack_for: Callable, trainer,
                 config: dict, recipes: Optional[Sequence[str]], eval_batch_size: int, out, resume: bool,
                 progress: bool) -> dict:
    """The per-seed loop of ``defenses.run(..., poison=spec)``; writes ``report.json``, ``report.md`` and
    ``asr_by_recipe.png`` to ``out`` (and ``seeds/seed_<k>.json`` as each seed completes; ``resume`` reuses them)."""


    first = splits_for(seeds[0])
    spec = as_poison_spec(spec).checked(first.num_classes, len(first.train[1]))
    recipes = list(POISON_DEFAULT_RECIPES if recipes is None else recipes)
    if not recipes or len(set(recipes)) != len(recipes):
        raise ValueError(f"recipes: must be distinct names, got {recipes}")
    for name in recipes:
        if name not in POISON_RECIPES:
            raise ValueError(f"recipes: unknown poisoning recipe {name!r}; valid names are {', '.join(POISON_RECIPES)}")
    config = {**config, "recipes": recipes, "poison": asdict(spec)}
    saved = None if out is None else SeedResults(out, {k: v for k, v in config.items() if k != "seeds"})
    with tqdm(total=len(seeds), desc="poisoning", disable=None if progress else True) as bar:
        def compute(seed, splits):
            results = poisoned_seed(seed, splits, spec, recipes, model_for=model_for, trainer=trainer,
                                    attack=attack_for(seed, splits), eval_batch_size=eval_batch_size,
                                    on_recipe=lambda label: bar.set_postfix_str(f"seed {seed}: {label}"))
            bar.update()
            return results

        per_seed = run_seeds(seeds, lambda seed: first if seed == seeds[0] else splits_for(seed), compute, saved=saved,
                             resume=resume, on_reused=lambda seed: bar.update())
    base_rows = [r["base"] for r in per_seed]
    rows = [row for r in per_seed for row in r["runs"]]
    timings = [r["timing"] for r in per_seed]
    report = {"config": config,
              "base": {m: mean_std(r[m] for r in base_rows) for m in ("clean_acc", "asr_backdoor", "robust_acc")},
              "per_seed": {"base": base_rows, "runs": rows, "timing": timings},
              "summary": summarise_poisoned(rows, recipes)}
    if out is not None:

        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "report.json", report)
        atomic_write_text(folder / "report.md", render_poisoned(report))
        _plot_poisoned(report, folder / "asr_by_recipe.png")
    return report
