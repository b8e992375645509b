"""The backdoor scan's calibration script: each scan version's rows judged with its own threshold, the clean
seed sets counted apart, and each version's rows in its own cache folder."""

from experiments import scan_calibration as sc


def _row(value: float, candidates=(3, 4)) -> dict:
    return {"value": value, "target_class": 0, "candidates": list(candidates), "statistics": {}, "scan_s": 1.0,
            "precision": None, "recall": None, "auroc": None}


def test_false_positives_are_counted_per_version_and_seed_set_with_its_threshold(monkeypatch):
    monkeypatch.setitem(sc.SCANS, "first", dict(sc.SCANS["first"], threshold=10.0))
    monkeypatch.setitem(sc.SCANS, "current", dict(sc.SCANS["current"], threshold=5.0))
    rows = {("first", "clean", "mnist", "clean"): {0: _row(7.0), 1: _row(11.0)},
            ("first", "fresh", "mnist", "clean"): {20: _row(9.9)},
            ("current", "clean", "mnist", "clean"): {0: _row(7.0), 1: _row(1.0)},
            ("current", "fresh-3", "fashion-mnist", "clean"): {60: _row(4.0), 61: _row(6.0), 62: _row(2.0)}}
    summary, markdown = sc.report(rows)
    counted = summary["false_positives"]
    assert counted["first"]["clean"] == {"false_positives": 1, "seeds": 2, "max": 11.0, "per_data": {"mnist": 1}}
    assert counted["first"]["fresh"] == {"false_positives": 0, "seeds": 1, "max": 9.9, "per_data": {"mnist": 0}}
    assert counted["current"]["clean"]["false_positives"] == 1  # 7.0 is above the current threshold 5
    assert counted["current"]["fresh-3"] == {"false_positives": 1, "seeds": 3, "max": 6.0,
                                             "per_data": {"fashion-mnist": 1}}
    assert "fresh" not in counted["current"]  # no rows, no line
    assert summary["rows"]["first/clean/mnist/clean"]["found"] == 1
    assert summary["rows"]["current/clean/mnist/clean"]["found"] == 1
    assert "| first | clean | mnist | clean | 2 | 1/2 | 7.0 to 11.0 |" in markdown
    assert "fresh seeds 60-79, k-NN cuts and threshold fixed beforehand): 1 of 3 seeds (fashion-mnist 1 of 3)" in markdown


def test_a_version_keeps_its_own_cache_folder_and_settings(monkeypatch):
    monkeypatch.setitem(sc.SCANS, "current", {"trusted_epochs": 7, "early_epochs": 3, "tail": 4.5, "threshold": 9.0,
                                              "flag_score": 0.5, "statistic": "excess"})
    first = sc._results("clean", "mnist", "clean", "first")
    previous = sc._results("erm", "mnist", "blend-0.01", "previous")
    current = sc._results("clean", "mnist", "clean", "current")
    assert first.directory == sc.OUT / "clean-mnist-clean" / "seeds"
    assert previous.directory == sc.OUT / "trusted10-early2-tail5" / "erm-mnist-blend-0.01" / "seeds"
    assert current.directory == sc.OUT / "trusted7-early3-tail4.5-knn-flag0.5" / "clean-mnist-clean" / "seeds"
    assert "flag_score" not in sc._settings("erm", "mnist", "blend-0.01", "previous")  # its files, as they were
    assert sc._settings("clean", "mnist", "clean", "current")["statistic"] == "excess"
    assert "early_epochs" not in sc._settings("clean", "mnist", "clean", "first")  # the first version's files
    assert sc._settings("clean", "mnist", "clean", "current")["early_epochs"] == 3
    assert sc.scan_options("current") == {"trusted_epochs": 7, "early_epochs": 3, "tail": 4.5, "threshold": 9.0,
                                          "flag_score": 0.5}
