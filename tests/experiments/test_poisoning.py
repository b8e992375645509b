"""Smoke test of experiments/poisoning.py --quick (tiny digits run, one seed)."""


def test_poisoning_quick(tmp_path, run_quick):
    result = run_quick("poisoning", tmp_path, timeout=400)
    entries = {(e["recipe"], e["evidence"]): e for e in result["digits-erm-badnets5"]}
    assert {("none", None), ("remove-poisons", 10), ("remove-poisons", 50), ("remove-poisons-unknown", None),
            ("activation-defence", None), ("spectral-signature", None)} <= set(entries)
    for entry in entries.values():
        assert 0 <= entry["asr_backdoor"]["mean"] <= 1 and 0 <= entry["clean_acc"]["mean"] <= 1
    assert entries[("none", None)]["recall"] is None
    assert entries[("remove-poisons", 50)]["removed_share"]["mean"] <= 0.1 + 1e-9
