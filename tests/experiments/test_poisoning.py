"""Smoke test of experiments/poisoning.py --quick (tiny digits run, one seed, the grid's recipes); the evidence-influence
rows joined from their own folder."""

import pytest

from defenses.seed_results import SeedResults, read_seed_file
from experiments.poisoning import METHOD_RECIPES, ROWS, drop_rows, load_setting, recipes_of


def test_poisoning_quick(tmp_path, run_quick):
    result = run_quick("poisoning", tmp_path, timeout=400)
    cells = result["quick"]
    assert {"none", "low-loss", "knn-label", "activation-defence", "spectral-signature", "remove-poisons K=10"} <= set(cells)
    for c in cells.values():
        assert 0 <= c["asr_backdoor"] <= 1 and 0 <= c["clean_acc"] <= 1 and c["seeds"] == [0]
    assert cells["none"]["recall"] is None and cells["none"]["d_asr_backdoor"] is None
    assert cells["remove-poisons K=10"]["removed_share"] <= 0.1 + 1e-9
    # the evidence alone, the baselines of remove-poisons: same K, nothing removed
    for name in ("evidence-retrain K=10", "evidence-finetune K=10"):
        assert cells[name]["removed_share"] == 0 and cells[name]["recall"] is None
    assert cells["low-loss"]["cost_vs_base"] > 0
    # --rerun's deletion leaves a seed file that loads (checksum renewed), without the recipe's rows
    folder = tmp_path / "poisoning" / "quick"
    assert drop_rows(folder, "low-loss") == 1 and drop_rows(folder, "low-loss") == 0
    runs = read_seed_file(folder / "seeds" / "seed_0.json")["results"]["runs"]
    assert "low-loss" not in {r["recipe"] for r in runs} and "knn-label" in {r["recipe"] for r in runs}


def _seed_file(folder, seed: int, base_model: str, recipes: tuple) -> None:
    settings = {"data": "mnist", "trainer": "erm", "poison": {"attack": "badnets", "rate": 0.01, "budget": 0.02}}
    base = {"seed": seed, "clean_acc": 0.9, "asr_backdoor": 0.9, "robust_acc_adaptive": 0.5}
    runs = [{"seed": seed, "recipe": r, "evidence": None if r == "none" else 10, "clean_acc": 0.9,
             "asr_backdoor": 0.1} for r in recipes]
    SeedResults(folder, settings).save(seed, "fingerprint", {"base": base, "runs": runs, "base_model": base_model})


def test_method_rows_join_the_grid_seed_by_seed_on_the_same_base_model(tmp_path):
    grid, methods = tmp_path / "poisoning" / "mnist-erm-badnets1", tmp_path / "poisoning_methods" / "mnist-erm-badnets1"
    for seed in (0, 1):
        _seed_file(grid, seed, f"hash{seed}", ("none", "remove-poisons"))
    for seed in (0, 1, 2):  # seed 2: the grid lacks it, left out
        _seed_file(methods, seed, f"hash{seed}", ("none", *METHOD_RECIPES))
    setting = load_setting(grid, methods)
    keys = sorted((r["recipe"], r["seed"]) for r in setting["runs"])
    assert keys == sorted([(r, s) for s in (0, 1) for r in ("none", "remove-poisons", *METHOD_RECIPES)])
    assert load_setting(grid, tmp_path / "nothing")["runs"] == load_setting(grid)["runs"]
    _seed_file(methods, 1, "another", ("none", *METHOD_RECIPES))
    with pytest.raises(ValueError, match="seed_1.json: its base model differs from the grid's of seed 1"):
        load_setting(grid, methods)


def test_evidence_rows_only_in_the_dirty_label_settings():
    available = tuple(ROWS)
    badnets = recipes_of(("mnist", "erm", "badnets", 0.01), available)
    assert badnets[-3:] == ["evidence-retrain", "evidence-finetune", "remove-poisons"]
    assert recipes_of(("mnist", "pgd-at", "badnets", 0.01), available)[-3:] == badnets[-3:]
    for attack in ("blend", "adaptive-blend"):  # dirty-label: the evidence rows too
        assert recipes_of(("mnist", "erm", attack, 0.05), available)[-3:] == badnets[-3:]
    for attack in ("label-consistent", "sig", "wanet"):  # clean-label or warping: none
        assert not {"evidence-retrain", "evidence-finetune", "remove-poisons"} & set(
            recipes_of(("mnist", "erm", attack, 0.05), available))
    assert not set(METHOD_RECIPES) & set(badnets)  # opt-in: only when named in only
    assert recipes_of(("mnist", "erm", "badnets", 0.01), available, only=["evidence-influence-trak"]) == [
        "none", "evidence-influence-trak"]
    # a recipe this version does not register is left out
    assert "evidence-retrain" not in recipes_of(("mnist", "erm", "badnets", 0.01), ("none", "remove-poisons"))
