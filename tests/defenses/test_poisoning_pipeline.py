"""The poisoning pipeline's own entry point, and the one recipe registry both pipelines draw from."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import attacks
import defenses
from defenses import recipes
from defenses.config import PoisonSpec
from defenses.poison_recipes import Outcome, PoisonContext
from defenses.poisoning import _trigger
from defenses.seed_results import record_checksum

TINY = dict(seeds=1, n_train=300, n_val=150, n_test=100, epochs=5, progress=False)


def test_one_registry_holds_both_pipelines_recipes_apart():
    assert {"remove-poisons", "knn-label", "none", "random"} <= set(defenses.available_recipes("poisoning"))
    assert "remove-poisons" not in defenses.available_recipes() and "influence" in defenses.available_recipes()
    assert recipes.get_recipe("remove-poisons", "poisoning").threat == "evidence"
    assert recipes.get_recipe("none", "poisoning") is not recipes.get_recipe("none")
    with pytest.raises(ValueError, match="recipes: unknown recipe 'remove-poisons'; valid names are none, influence"):
        recipes.get_recipe("remove-poisons")
    with pytest.raises(ValueError, match="pipeline: must be one of"):
        defenses.available_recipes("backdoor")
    with pytest.raises(ValueError, match="threat: must be one of"):
        defenses.register_recipe("mine", lambda ctx: None, pipeline="poisoning")
    with pytest.raises(ValueError, match="threat: only poisoning recipes have one"):
        defenses.register_recipe("mine", lambda ctx: None, threat="unknown")


def test_a_run_naming_no_recipes_leaves_out_those_registered_opt_in(monkeypatch):
    from defenses.plan import _chosen_recipes
    monkeypatch.setattr(recipes, "_RECIPES", dict(recipes._RECIPES))
    defenses.register_recipe("costly", lambda ctx: None, pipeline="poisoning", threat="unknown", by_default=False)
    chosen = [r.name for r in _chosen_recipes(None, "poisoning")]
    assert "costly" not in chosen and "evidence-influence-trak" not in chosen and "remove-poisons" in chosen
    opt_in = ("costly", "evidence-influence-trak")
    assert chosen == [n for n in defenses.available_recipes("poisoning") if n not in opt_in]
    assert [r.name for r in _chosen_recipes(["none", "costly"], "poisoning")] == ["none", "costly"]
    with pytest.raises(TypeError, match="by_default: must be True or False, got int"):
        defenses.register_recipe("other", lambda ctx: None, pipeline="poisoning", threat="unknown", by_default=1)


def test_a_registered_poisoning_recipe_runs_in_run_poisoning(monkeypatch):
    monkeypatch.setattr(recipes, "_RECIPES", dict(recipes._RECIPES))
    seen = []

    def first_samples(ctx: PoisonContext) -> Outcome:
        seen.append(ctx)
        removed = torch.zeros(len(ctx.train[1]), dtype=torch.bool)
        removed[:ctx.k] = True
        return Outcome(ctx.fit((ctx.train[0][~removed], ctx.train[1][~removed])), removed,
                       -torch.arange(len(removed), dtype=torch.float64))

    defenses.register_recipe("first", first_samples, pipeline="poisoning", threat="unknown")
    report = defenses.run_poisoning("digits", poison=dict(evidence=(10,), robust_n=20, patch_size=2),
                                    recipes=["none", "first"], **TINY)
    assert [(e["recipe"], e["evidence"], e["threat"]) for e in report["summary"]] == [("none", None, "none"),
                                                                                      ("first", None, "unknown")]
    assert len(seen) == 1 and not hasattr(seen[0], "test") and seen[0].budget == pytest.approx(0.1)
    row = next(r for r in report["per_seed"]["runs"] if r["recipe"] == "first")
    assert row["removed_share"] == pytest.approx(seen[0].k / 300)
    assert set(report["base"]) == {"clean_acc", "asr_backdoor", "robust_acc_adaptive"}
    assert report["config"]["recipes"] == ["none", "first"] and report["config"]["poison"]["budget"] == 0.1


def test_run_poisoning_checks_its_options_before_any_training():
    with pytest.raises(ValueError, match="recipes: unknown poisoning recipe 'influence'"):
        defenses.run_poisoning("digits", recipes=["none", "influence"], **TINY)
    with pytest.raises(ValueError, match="poison: must be one of"):
        defenses.run_poisoning("digits", poison="sleeper", **TINY)
    with pytest.raises(ValueError, match=r"poison: unknown fields \['rates'\]"):
        defenses.run_poisoning("digits", poison={"rates": 0.1}, **TINY)


@pytest.mark.parametrize("field,value", [("sig_delta", 0.0), ("sig_test_delta", 1.5), ("wanet_s", 0.0),
                                         ("wanet_noise_ratio", -1.0)])
def test_run_poisoning_refuses_bad_trigger_options_naming_them(field, value):
    with pytest.raises(ValueError, match=f"^{field}: must be"):
        defenses.run_poisoning("digits", poison={"attack": "sig", field: value}, **TINY)


def test_the_spec_builds_each_trigger_with_its_options():
    spec = PoisonSpec(sig_delta=0.1, sig_test_delta=0.3, wanet_s=0.7, wanet_noise_ratio=1.0)
    sig = _trigger(replace(spec, attack="sig"), (1, 8, 8), seed=0)
    assert (sig.delta, sig.test_delta) == (0.1, 0.3)
    wanet = _trigger(replace(spec, attack="wanet"), (1, 8, 8), seed=2)
    assert (wanet.s, wanet.noise_ratio, wanet.seed) == (0.7, 1.0, 2)
    blend = _trigger(replace(spec, attack="blend"), (1, 8, 8), seed=3)
    assert torch.equal(blend.pattern, attacks.Trigger.random_blend((1, 8, 8), seed=3).pattern)
    adaptive = _trigger(replace(spec, attack="adaptive-blend"), (1, 8, 8), seed=3)
    assert torch.equal(adaptive.pattern, blend.pattern) and (adaptive.pieces, adaptive.mask_rate) == (16, 0.5)


def test_the_report_records_only_the_options_of_the_attack_run():
    assert "sig_delta" not in PoisonSpec().as_dict() and "wanet_s" not in PoisonSpec().as_dict()
    sig = PoisonSpec(attack="sig", sig_test_delta=0.4).as_dict()
    assert sig["sig_test_delta"] == 0.4 and "wanet_s" not in sig and PoisonSpec.of(sig) == PoisonSpec(attack="sig",
                                                                                                       sig_test_delta=0.4)
    assert {"wanet_s", "wanet_noise_ratio"} <= set(PoisonSpec(attack="wanet").as_dict())


@pytest.mark.parametrize("attack", ["blend", "adaptive-blend", "sig", "wanet", "label-consistent"])
def test_run_poisoning_runs_each_backdoor_attack(attack):
    report = defenses.run_poisoning("digits", poison=dict(attack=attack, evidence=(10,), robust_n=20, patch_size=2),
                                    recipes=["none"], **TINY)
    assert report["config"]["poison"]["attack"] == attack
    base = report["per_seed"]["base"][0]
    assert 0 <= base["asr_backdoor"] <= 1 and base["clean_acc"] > 0.5
    assert report["per_seed"]["runs"][0]["recipe"] == "none"


TIMINGS = ("train_time", "train_cpu_time", "cost_vs_base")


def _without_timings(report: dict) -> dict:
    """The report's measurements: every entry but the clocks (and the recommendation, which weighs cost)."""
    return {"config": report["config"], "base": report["base"], "per_seed_base": report["per_seed"]["base"],
            "runs": [{k: v for k, v in row.items() if k not in TIMINGS} for row in report["per_seed"]["runs"]],
            "summary": [{k: v for k, v in e.items() if k != "cost_vs_base"} for e in report["summary"]]}


def test_a_resumed_seed_runs_only_the_recipes_it_lacks_and_reports_as_one_run(tmp_path, monkeypatch):
    options = dict(TINY, seeds=2, poison=dict(evidence=(10,), robust_n=20, patch_size=2))
    recipes_all = ["none", "low-loss", "remove-poisons"]
    whole = defenses.run_poisoning("digits", recipes=recipes_all, out=tmp_path / "whole", **options)
    defenses.run_poisoning("digits", recipes=["none", "remove-poisons"], out=tmp_path / "parts", **options)
    ran = []
    real = defenses.poisoning.poisoned_seed

    def recording(seed, splits, spec, recipes, **kwargs):
        ran.append((seed, [r.name for r in recipes]))
        return real(seed, splits, spec, recipes, **kwargs)

    monkeypatch.setattr(defenses.poisoning, "poisoned_seed", recording)
    parts = defenses.run_poisoning("digits", recipes=recipes_all, out=tmp_path / "parts", resume=True, **options)
    assert ran == [(0, ["low-loss"]), (1, ["low-loss"])]
    assert _without_timings(parts) == _without_timings(whole)
    # a later run of fewer recipes reuses the files as they are and reports only its own recipes
    ran.clear()
    fewer = defenses.run_poisoning("digits", recipes=["none", "low-loss"], out=tmp_path / "parts", resume=True,
                                   **options)
    assert ran == [] and [e["recipe"] for e in fewer["summary"]] == ["none", "low-loss"]
    assert fewer["summary"][1]["asr_backdoor"] == whole["summary"][1]["asr_backdoor"]


def test_a_resumed_seed_whose_base_model_does_not_reproduce_is_refused(tmp_path):
    options = dict(TINY, poison=dict(evidence=(10,), robust_n=20, patch_size=2))
    defenses.run_poisoning("digits", recipes=["none"], out=tmp_path, **options)
    path = tmp_path / "seeds" / "seed_0.json"
    record = json.loads(path.read_text())
    record["results"]["base_model"] = "0" * 64
    record["sha256"] = record_checksum(record)
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match="resume: seed 0's base model, retrained to add low-loss, differs"):
        defenses.run_poisoning("digits", recipes=["none", "low-loss"], out=tmp_path, resume=True, **options)
