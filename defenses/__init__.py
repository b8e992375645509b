"""Defences driven by influence scores: select (prune / reweight / relabel), retrain, re-attack, report.

- :func:`prune`, :func:`reweight`, :func:`relabel`: scores -> keep-mask / weights / repaired labels.
- :class:`ERM`, :class:`FastAT`, :class:`PGDAT`, :class:`TRADES` (subclasses of :class:`Trainer`) and
  :class:`ARTTrainer`: (re)training with per-sample weights and a seed, from scratch or fine-tuning;
  :func:`make_trainer`: a trainer by its name (:data:`TRAINER_NAMES`; the command line's ``--trainer``).
- :class:`LookaheadReweighting`: online one-step-lookahead reweighting against the adversarial
  validation loss (recipe ``lookahead``); :class:`LookaheadWeights`: the same weights as a per-batch
  hook for your own training loop; :class:`SelectionWeights`: a selection recipe's keep-mask or
  weights for your own loop.
- :func:`run`: the evasion pipeline, the closed loop with baselines and adversarial-training references
  (:mod:`defenses.references`), each row's measured cost, and an evaluation suite
  (:mod:`defenses.eval_suite`) over several seeds, writing ``report.json``, ``report.md``,
  ``robust_vs_cost.png`` and ``robust_vs_fraction.png`` atomically, and each seed's results as it
  completes (``resume=True`` reuses them after a crash); its options are the fields of :class:`RunConfig`.
- :func:`run_demo`: the command line's demo (evasion on MNIST and Adult, a backdoor on MNIST), in
  :mod:`defenses.demo`.
- :func:`scan_backdoor`: scan a training set for a backdoor, trigger unknown, with a small trusted clean set,
  and a calibrated verdict (:class:`ScanResult`; :mod:`defenses.backdoor_scan`); :func:`write_scan_report`
  writes its report (JSON, Markdown, a grid of the most suspicious images; the command line's ``scan``).
- :func:`remove_poisons`: find backdoor poisons (with or without triggered evidence), remove them and
  retrain (:mod:`defenses.poison_removal`); :func:`run_poisoning`, the poisoning pipeline, measures it
  against the poisoning baselines (:mod:`defenses.poisoning`, recipes in :mod:`defenses.poison_recipes`,
  detectors in :mod:`defenses.poison_detection`); its options are the fields of :class:`PoisoningConfig`,
  the backdoor threat model a :class:`PoisonSpec`. :func:`anti_backdoor_learning`: the field's reference
  training-time defence (Anti-Backdoor Learning, :mod:`defenses.abl`); :func:`spectre_scores`: SPECTRE's
  robust-statistics detector (:mod:`defenses.spectre`); :func:`asset_scores`: ASSET's offset detector
  with a trusted clean set (:mod:`defenses.asset`).
- :func:`explain`: the training samples most responsible for a model's adversarial failures on given
  inputs, with the measured LDS of the method used (:func:`lds_reference`); :func:`write_explanation`
  writes its JSON, Markdown and PNG (:mod:`defenses.attribution`).
- :func:`train_ensemble`: train the members of an ensemble of models (random subsets, seeded), to score as a
  :class:`robust_infl.Ensemble` (:mod:`defenses.ensembles`).
- Recipes of both pipelines live in one registry (:func:`register_recipe`, :func:`available_recipes`).
"""

from .abl import anti_backdoor_learning
from .art_trainer import ARTTrainer
from .backdoor_scan import ScanResult, scan_backdoor
from .asset import asset_scores
from .lookahead import LookaheadReweighting, LookaheadWeights
from .config import PoisoningConfig, PoisonSpec, RunConfig
from .demo import run_demo
from .attribution import Explanation, explain, lds_reference, write_explanation
from .ensembles import TrainedEnsemble, train_ensemble
from .pipeline import evaluate_on_test, run, seeded_split
from .poison_removal import remove_poisons
from .poisoning import run_poisoning
from .recipes import DefenceContext, available_recipes, register_recipe
from .scan_report import write_scan_report
from .registry import TRAINER_NAMES, make_trainer
from .selection import prune, relabel, reweight
from .selection_hook import SelectionWeights
from .spectre import spectre_scores
from .trainers import ERM, PGDAT, TRADES, CheckpointingERM, FastAT, Trainer, per_sample_loss

__all__ = [
    "prune",
    "reweight",
    "relabel",
    "Trainer",
    "ERM",
    "CheckpointingERM",
    "PGDAT",
    "FastAT",
    "TRADES",
    "ARTTrainer",
    "LookaheadReweighting",
    "LookaheadWeights",
    "SelectionWeights",
    "per_sample_loss",
    "run",
    "RunConfig",
    "run_poisoning",
    "run_demo",
    "PoisoningConfig",
    "evaluate_on_test",
    "seeded_split",
    "DefenceContext",
    "register_recipe",
    "available_recipes",
    "remove_poisons",
    "anti_backdoor_learning",
    "scan_backdoor",
    "ScanResult",
    "spectre_scores",
    "write_scan_report",
    "asset_scores",
    "PoisonSpec",
    "TRAINER_NAMES",
    "make_trainer",
    "explain",
    "Explanation",
    "lds_reference",
    "write_explanation",
    "train_ensemble",
    "TrainedEnsemble",
]
