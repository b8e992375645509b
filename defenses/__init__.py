"""Defences driven by influence scores: select (prune / reweight / relabel), retrain, re-attack, report."""

from .trainers import ERM, PGDAT, TRADES, Trainer, per_sample_loss

__all__ = ["Trainer", "ERM", "PGDAT", "TRADES", "per_sample_loss"]
