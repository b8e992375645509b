"""A budget that selects no training sample defends nothing: ``defenses.run`` warns with the sample count
(the command line refuses it, see tests/cli/test_files_and_flags.py)."""

from __future__ import annotations

import warnings

import pytest

import defenses
from defenses.plan import EmptyBudgetWarning


def test_a_budget_selecting_no_sample_is_reported_with_the_sample_count():
    with pytest.warns(EmptyBudgetWarning, match=r"^fractions: 0.01 of 40 training samples selects none of them .* "
                                                r"use at least 0.0125$"):
        report = defenses.run("moons", "logreg", "pgd", fractions=[0.01], recipes=["none", "random"], seeds=1,
                              epochs=1, n_train=40, n_val=20, n_test=20, references=(), eval_attacks=(),
                              progress=False)
    assert {row["recipe"] for row in report["per_seed"]["runs"]} >= {"none", "random"}


def test_the_warning_is_also_a_value_error_for_callers_that_refuse_it():
    assert issubclass(EmptyBudgetWarning, ValueError) and issubclass(EmptyBudgetWarning, UserWarning)


def test_no_warning_where_no_recipe_uses_the_budget():
    with warnings.catch_warnings():
        warnings.simplefilter("error", EmptyBudgetWarning)
        defenses.run("moons", "logreg", "pgd", fractions=[0.01], recipes=["none"], seeds=1, epochs=1, n_train=40,
                     n_val=20, n_test=20, references=(), eval_attacks=(), progress=False)
