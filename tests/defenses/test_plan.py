"""defenses.run plans, then executes: the plan holds what the run executes and the report records it."""

import ast
import inspect

import pytest

import defenses
from defenses import pipeline
from defenses.plan import RunPlan
from defenses.seed_results import SeedResults, run_seeds
from defenses.trainers import ERM, PGDAT

TINY = dict(model="logreg", seeds=[1, 2], epochs=1, fractions=[0.1, 0.2], eval_attacks=(), progress=False)


def _plan(monkeypatch, *args, **kwargs) -> RunPlan:
    monkeypatch.setattr(pipeline, "execute", lambda plan: plan)
    return defenses.run(*args, **kwargs)


def test_the_plan_resolves_every_input_before_any_training(monkeypatch):
    plan = _plan(monkeypatch, "moons", recipes=["none", "influence", "random"], references=("fast-at",), **TINY)
    assert isinstance(plan, RunPlan)
    assert plan.seeds == [1, 2] and plan.fractions == [0.1, 0.2]
    assert isinstance(plan.trainer, ERM) and plan.base_trainer.retrain == "scratch"
    assert list(plan.references) == ["fast-at"] and plan.suite_names == []
    assert [(r.name, f) for r, f in plan.tasks()] == [("none", None), ("influence", 0.1), ("random", 0.1),
                                                       ("influence", 0.2), ("random", 0.2)]
    assert plan.splits(1) is plan.first and plan.splits(2).train[0].shape == plan.first.train[0].shape
    assert plan.config()["seeds"] == [1, 2] and plan.config()["references"] == ["fast-at"]
    adversarial = _plan(monkeypatch, "moons", trainer="pgd-at", recipes=["none"], **TINY)
    assert isinstance(adversarial.trainer, PGDAT)
    assert adversarial.trainer.training_attack(3).seed == 3  # the attack every recipe scores at


def test_the_report_records_the_plan_that_was_executed(monkeypatch):
    options = dict(recipes=["none", "random"], references=(), **TINY)
    plans = []
    real_execute = pipeline.execute

    def recording(plan):
        plans.append(plan)
        return real_execute(plan)

    monkeypatch.setattr(pipeline, "execute", recording)
    report = defenses.run("moons", **options)
    (plan,) = plans
    assert report["config"] == plan.config()
    rows = report["per_seed"]["runs"]
    assert [(r["seed"], r["recipe"], r["fraction"]) for r in rows] == \
        [(seed, r.name, f) for seed in plan.seeds for r, f in plan.tasks()]


def test_planning_refuses_bad_arguments_before_anything_is_built(monkeypatch):
    monkeypatch.setattr(pipeline, "execute", lambda plan: pytest.fail("executed a bad plan"))
    with pytest.raises(ValueError, match="^mode: "):
        defenses.run("moons", mode="drop", **TINY)
    with pytest.raises(TypeError, match="^trainer: expected a name or a trainer with fit"):
        defenses.run("moons", trainer=object(), **TINY)


def test_run_body_is_short():
    tree = ast.parse(inspect.getsource(pipeline.run)).body[0]
    assert tree.body[-1].end_lineno - tree.body[0].lineno + 1 <= 80  # docstring included


def test_run_seeds_computes_saves_and_reuses(tmp_path):
    from robust_infl.datasets import load_dataset

    splits = {seed: load_dataset("moons", seed=seed) for seed in (0, 1)}
    computed, reused = [], []
    saved = SeedResults(tmp_path, {"setting": 1})

    def compute(seed, s):
        computed.append(seed)
        return {"seed": seed}

    first = run_seeds([0, 1], splits.get, compute, saved=saved, resume=False, on_reused=reused.append)
    again = run_seeds([0, 1], splits.get, compute, saved=saved, resume=True, on_reused=reused.append)
    assert first == again == [{"seed": 0}, {"seed": 1}]
    assert computed == [0, 1] and reused == [0, 1]
