"""Experiment and benchmark scripts; run them as ``python -m experiments.NAME`` from the repo root."""
