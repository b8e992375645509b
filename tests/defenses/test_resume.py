"""A crash mid-pipeline leaves the completed seeds reusable: defenses.run(..., out=DIR, resume=True)."""

from __future__ import annotations

import json

import pytest

import defenses
from defenses import recipes
from defenses.report import without_timing
from defenses.seed_results import SEEDS_DIR

SETTINGS = dict(model="logreg", attack="fgsm", epochs=1, n_train=60, n_val=30, n_test=30, fractions=[0.1],
                progress=False)


@pytest.fixture
def flaky_recipe(monkeypatch):
    """A budget-free recipe that records the seeds it ran for and raises for seed 1 while armed."""
    state = {"armed": False, "seeds": []}

    def flaky(ctx):
        state["seeds"].append(ctx.seed)
        if state["armed"] and ctx.seed == 1:
            raise RuntimeError("the machine went down")
        return ctx.model

    monkeypatch.setitem(recipes._RECIPES, ("evasion", "flaky"), recipes.Recipe("flaky", flaky, False, "test"))
    return state


def run(out, seeds, **changes):
    return defenses.run("moons", recipes=["none", "random", "flaky"], seeds=seeds, out=out,
                        **{**SETTINGS, **changes})


def test_a_crash_mid_run_keeps_the_completed_seeds_and_a_resumed_run_reuses_them(tmp_path, flaky_recipe):
    run(tmp_path / "reference", [0, 1])

    flaky_recipe.update(armed=True, seeds=[])
    with pytest.raises(RuntimeError, match="went down"):
        run(tmp_path / "crashed", [0, 1])
    saved = sorted(p.name for p in (tmp_path / "crashed" / SEEDS_DIR).iterdir())
    assert saved == ["seed_0.json"] and not (tmp_path / "crashed" / "report.json").exists()

    flaky_recipe.update(armed=False, seeds=[])
    run(tmp_path / "crashed", [0, 1], resume=True)
    assert flaky_recipe["seeds"] == [1]  # seed 0 was not recomputed
    reference = json.loads((tmp_path / "reference" / "report.json").read_text())
    assert without_timing(json.loads((tmp_path / "crashed" / "report.json").read_text())) == without_timing(reference)

    flaky_recipe["seeds"] = []
    extended = run(tmp_path / "crashed", [0, 1, 2], resume=True)
    assert flaky_recipe["seeds"] == [2] and extended["config"]["seeds"] == [0, 1, 2]


def test_resume_refuses_results_written_with_other_settings(tmp_path, flaky_recipe):
    run(tmp_path, [0])
    with pytest.raises(ValueError, match=r"^resume: .*seed_0.json was written by a run with other settings "
                                         r"\(differs in epochs\)"):
        run(tmp_path, [0], resume=True, epochs=2)
    with pytest.raises(ValueError, match=r"^resume: needs out"):
        run(None, [0], resume=True)


def test_without_resume_a_run_recomputes_every_seed(tmp_path, flaky_recipe):
    run(tmp_path, [0])
    first = json.loads((tmp_path / SEEDS_DIR / "seed_0.json").read_text())
    flaky_recipe["seeds"] = []
    run(tmp_path, [0], overwrite=True)  # without overwrite (or resume) the used folder is refused
    assert flaky_recipe["seeds"] == [0]
    second = json.loads((tmp_path / SEEDS_DIR / "seed_0.json").read_text())
    assert second.pop("sha256") != first.pop("sha256")  # the checksum covers the wall times too
    assert without_timing(second) == without_timing(first)
