"""Defences driven by influence scores: select (prune / reweight / relabel), retrain, re-attack, report."""

from .selection import prune, relabel, reweight
from .trainers import ERM, PGDAT, TRADES, Trainer, per_sample_loss

__all__ = ["prune", "reweight", "relabel", "Trainer", "ERM", "PGDAT", "TRADES", "per_sample_loss"]
