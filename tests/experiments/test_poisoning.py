"""Smoke test of experiments/poisoning.py --quick (tiny digits run, one seed, the grid's recipes)."""


def test_poisoning_quick(tmp_path, run_quick):
    result = run_quick("poisoning", tmp_path, timeout=400)
    cells = result["quick"]
    assert {"none", "low-loss", "knn-label", "activation-defence", "spectral-signature", "remove-poisons K=10"} <= set(cells)
    for c in cells.values():
        assert 0 <= c["asr_backdoor"] <= 1 and 0 <= c["clean_acc"] <= 1 and c["seeds"] == [0]
    assert cells["none"]["recall"] is None and cells["none"]["d_asr_backdoor"] is None
    assert cells["remove-poisons K=10"]["removed_share"] <= 0.1 + 1e-9
    assert cells["low-loss"]["cost_vs_base"] > 0
