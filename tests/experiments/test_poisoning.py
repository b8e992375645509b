"""Smoke test of experiments/poisoning.py --quick (tiny digits run, one seed, the grid's recipes)."""

from defenses.seed_results import read_seed_file
from experiments.poisoning import ROWS, drop_rows, recipes_of


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


def test_evidence_rows_only_where_remove_poisons_runs():
    available = tuple(ROWS)
    badnets = recipes_of(("mnist", "erm", "badnets", 0.01), available)
    assert badnets[-3:] == ["evidence-retrain", "evidence-finetune", "remove-poisons"]
    assert recipes_of(("mnist", "pgd-at", "badnets", 0.01), available)[-3:] == badnets[-3:]
    for attack in ("blend", "adaptive-blend", "label-consistent"):
        assert not {"evidence-retrain", "evidence-finetune", "remove-poisons"} & set(
            recipes_of(("mnist", "erm", attack, 0.05), available))
    # a recipe this version does not register is left out
    assert "evidence-retrain" not in recipes_of(("mnist", "erm", "badnets", 0.01), ("none", "remove-poisons"))
