"""The recipes of the poisoning pipeline (:func:`defenses.run_poisoning`), registered in the one recipe
registry (:func:`defenses.register_recipe` with ``pipeline="poisoning"``).

A poisoning recipe receives a :class:`PoisonContext` (the model trained on the poisoned training split,
that split, the clean validation split without the evidence, the evidence of its threat model, the trainer,
the budget and the seed; no test data and no knowledge of which samples are poisoned) and returns an
:class:`Outcome`: the defended model, the removed samples and the scores they were chosen by. Its
``threat`` says what it knows of the backdoor: ``"none"`` (no defence), ``"unknown"`` (trigger unknown,
objective-free) or ``"evidence"`` (K triggered validation inputs with their true labels; run once per K).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

import robust_infl

from . import poison_detection as detect
from .abl import anti_backdoor_learning
from .asset import asset_scores
from .spectre import spectre_scores
from .data import take
from .ensembles import train_ensemble
from .backdoor_scan import ScanResult, scan_backdoor
from .poison_removal import contrast_detection, detect_and_retrain, evidence_repeats, scan_and_retrain, with_evidence
from .recipes import register_recipe
from .selection import budget_size, most_harmful, uniform_scores

__all__ = ["PoisonContext", "Outcome", "by_scores"]

EVIDENCE_HALF_MODELS = 10
"""Models trained on random halves that ``evidence-influence-trak`` averages TRAK over (TRAK's recipe; the best
per-example LDS on the SmallCNN: ``experiments/RESULTS.md``, section lds-per-example)."""
EVIDENCE_PROJ_DIM = 512
"""TRAK's projection dimension in ``evidence-influence-trak`` (the LDS table's), at most the number of training
samples and of model parameters (TRAK's ``Phi^T Phi`` is then invertible without damping)."""


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
        """The budget as a sample count."""
        return budget_size(len(self.train[1]), self.budget)

    def losses(self) -> torch.Tensor:
        """Per-sample training losses of the model (cached per seed)."""
        if "losses" not in self.cache:
            self.cache["losses"] = detect.training_losses(self.model, self.train)
        return self.cache["losses"]

    def scan(self) -> ScanResult:
        """The trigger-unknown backdoor scan of the training split, the validation split as trusted data
        (:func:`~defenses.backdoor_scan.scan_backdoor`; cached per seed)."""
        if "scan" not in self.cache:
            self.cache["scan"] = scan_backdoor(self.model, self.train[:2], self.val[:2], budget=self.budget,
                                               trainer=self.trainer, seed=self.seed, progress=self.progress)
        return self.cache["scan"]

    def fit(self, data: tuple) -> nn.Module:
        """``data`` trained on by the trainer (from scratch, the seed's seed)."""
        return self.trainer.fit(self.model, data, seed=self.seed)


@dataclass(frozen=True)
class Outcome:
    """A recipe's result: the model, the removed-sample mask (None: nothing removed) and scores (for AUROC)."""

    model: nn.Module
    removed: Optional[torch.Tensor] = None
    scores: Optional[torch.Tensor] = None


def by_scores(name: str, score_fn: Callable[[PoisonContext], torch.Tensor]) -> Callable[[PoisonContext], Outcome]:
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
    return uniform_scores(len(ctx.train[1]), ctx.seed)


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


def _evidence_trak(ctx: PoisonContext) -> torch.Tensor:
    """TRAK harm (projection dimension :data:`EVIDENCE_PROJ_DIM`, or fewer, see there) on the loss of the triggered evidence under its
    true labels, averaged over :data:`EVIDENCE_HALF_MODELS` models trained on random halves of the training split
    by the run's trainer (:func:`defenses.ensembles.train_ensemble`, the context's seed); their training is part
    of the recipe's cost."""
    members = train_ensemble(ctx.model, ctx.train[:2], ctx.trainer, EVIDENCE_HALF_MODELS, subset=0.5, seed=ctx.seed)
    proj_dim = min(EVIDENCE_PROJ_DIM, len(ctx.train[1]), sum(p.numel() for p in ctx.model.parameters()))
    return robust_infl.influence(members.ensemble, ctx.train[:2], ctx.evidence, objective=robust_infl.Utility(),
                                 method="trak", proj_dim=proj_dim, seed=ctx.seed, progress=ctx.progress)


def _none(ctx: PoisonContext) -> Outcome:
    return Outcome(ctx.model)


def _evidence_retrain(ctx: PoisonContext) -> Outcome:
    """Retrain from scratch on all training samples plus the evidence (true labels, repeated as in the recipe)."""
    return Outcome(ctx.fit(with_evidence(ctx.train[:2], ctx.evidence, evidence_repeats(ctx.trainer))))


def _evidence_finetune(ctx: PoisonContext) -> Outcome:
    """Fine-tune the poisoned model on the evidence (true labels) plus the clean validation inputs."""
    data = tuple(torch.cat([a, b]) for a, b in zip(ctx.evidence, ctx.val[:2]))
    return Outcome(ctx.trainer.with_retrain("finetune").fit(ctx.model, data, seed=ctx.seed))


def _remove_poisons(ctx: PoisonContext) -> Outcome:
    """:func:`remove_poisons` with the context's evidence; without any, the validation split is its trusted data."""
    if ctx.evidence is None:
        return _backdoor_scan(ctx)
    return Outcome(*detect_and_retrain(ctx.model, ctx.train[:2], ctx.evidence, ctx.trainer, ctx.budget, ctx.seed))


def _backdoor_scan(ctx: PoisonContext) -> Outcome:
    """The trigger-unknown scan with the validation split as trusted data; retrained without the flagged samples
    when it finds a backdoor, the model unchanged when it finds none."""
    scan = ctx.scan()
    model, removed, _ = scan_and_retrain(ctx.model, ctx.train[:2], ctx.val[:2], ctx.trainer, ctx.budget, ctx.seed,
                                         scan=scan)
    return Outcome(model, removed, scan.scores)


def _removal_only(ctx: PoisonContext) -> Outcome:
    """The detector of :func:`remove_poisons` with the evidence, retrained on the kept samples only (ablation)."""
    scores, removed, _ = contrast_detection(ctx.model, ctx.train[:2], ctx.evidence, ctx.budget)
    return Outcome(ctx.fit(take(ctx.train[:2], ~removed)), removed, scores)


def _lead_recipe(ctx: PoisonContext) -> Outcome:
    """The earlier lead: the budget's lowest-loss samples of the evidence's class removed, retrained on the
    kept samples plus the evidence (true labels, repeated)."""
    scores = _evidence_class_low_loss(ctx)
    removed = most_harmful(scores, ctx.budget)
    kept = with_evidence(take(ctx.train[:2], ~removed), ctx.evidence, evidence_repeats(ctx.trainer))
    return Outcome(ctx.fit(kept), removed, scores)


def _abl(ctx: PoisonContext) -> Outcome:
    """Anti-Backdoor Learning with its published defaults (isolation ratio 1%, not the budget)."""
    model, isolated, scores = anti_backdoor_learning(ctx.model, ctx.train[:2], trainer=ctx.trainer, seed=ctx.seed)
    return Outcome(model, isolated, scores)


def _register(name: str, fn: Callable, threat: str, description: str, by_default: bool = True) -> None:
    register_recipe(name, fn, uses_budget=threat != "none", description=description, pipeline="poisoning",
                    threat=threat, by_default=by_default)


_register("none", _none, "none", "no defence: the model trained on the poisoned split")
_register("random", by_scores("random", _random), "unknown", "the budget removed at random (seeded)")
_register("low-loss", by_scores("low-loss", lambda ctx: -ctx.losses()), "unknown",
          "the budget's lowest training losses removed")
_register("self", by_scores("self", _self_influence), "unknown", "the budget's largest self-influence removed")
_register("activation-defence", by_scores(
    "activation-defence", lambda ctx: detect.activation_defence_scores(ctx.model, ctx.train, seed=ctx.seed)),
    "unknown", "ART's activation clustering (Chen et al. 2018)")
_register("spectral-signature", by_scores(
    "spectral-signature", lambda ctx: detect.spectral_signature_scores(ctx.model, ctx.train)),
    "unknown", "ART's spectral signatures (Tran et al. 2018)")
_register("class-low-loss", by_scores("class-low-loss", _estimated_class_low_loss), "unknown",
          "lowest losses within the estimated target class")
_register("knn-label", by_scores("knn-label", lambda ctx: detect.label_disagreement_scores(
    detect.layer_features(ctx.model, ctx.train[0]), ctx.train[1])), "unknown",
    "largest k-NN label disagreement in the model's features")
_register("abl", _abl, "unknown", "Anti-Backdoor Learning (Li et al. 2021): LGA isolation of the lowest-loss 1%, "
          "continued training without them, unlearning them by gradient ascent")
_register("spectre", by_scores("spectre", lambda ctx: spectre_scores(ctx.model, ctx.train, budget=ctx.budget)),
          "unknown", "SPECTRE (Hayase et al. 2021): robust whitening and QUE scores of the penultimate features, "
          "in the class with the largest QUE statistic")
_register("asset", by_scores("asset", lambda ctx: asset_scores(ctx.model, ctx.train[:2], ctx.val[:2], seed=ctx.seed,
                                                            batch_size=ctx.trainer.batch_size)),
          "unknown", "ASSET (Pan et al. 2023): loss under a model offset between the clean validation split "
          "and the training set")
_register("backdoor-scan", _backdoor_scan, "unknown",
          "trigger-unknown scan (trusted: the validation split) with a verdict; removes nothing when nothing is found")
_register("remove-poisons-unknown", _remove_poisons, "unknown",
          "defenses.remove_poisons without evidence (the backdoor scan, the validation split as trusted data)")
_register("evidence-retrain", _evidence_retrain, "evidence", "retrained on all samples plus the evidence")
_register("evidence-finetune", _evidence_finetune, "evidence",
          "fine-tuned on the evidence plus the clean validation inputs")
_register("evidence-influence", by_scores("evidence-influence", _evidence_influence), "evidence",
          "renormalised ip harm on the evidence's loss under its true labels")
_register("evidence-influence-trak", by_scores("evidence-influence-trak", _evidence_trak), "evidence",
          f"TRAK harm on the evidence's loss under its true labels, averaged over {EVIDENCE_HALF_MODELS} models "
          "trained on random halves (their training counted in the cost; about 20 trainings, so run only when "
          "named)", by_default=False)
_register("evidence-class-low-loss", _lead_recipe, "evidence",
          "lowest losses within the evidence's class removed, retrained with the evidence")
_register("contrast-removal-only", _removal_only, "evidence",
          "the detector of remove_poisons, retrained without the evidence (ablation)")
_register("remove-poisons", _remove_poisons, "evidence", "defenses.remove_poisons with the evidence")
