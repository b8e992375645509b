"""The backdoor scan's calibration script: each scan version's rows judged with its own threshold (each
statistic's where the version has the shift / mislabel statistic), the clean seed sets counted apart, and each
version's rows in its own cache folder."""

from experiments import scan_calibration as sc


def _row(value: float, candidates=(3, 4), shift: float = 0.0, mislabel: float = 0.0) -> dict:
    return {"value": value, "target_class": 0, "candidates": list(candidates), "scan_s": 1.0,
            "statistics": {"excess": value, "shift": shift, "mislabel": mislabel}, "precision": None, "recall": None,
            "auroc": None}


def test_false_positives_are_counted_per_version_and_seed_set_with_its_threshold(monkeypatch):
    monkeypatch.setitem(sc.SCANS, "first", dict(sc.SCANS["first"], threshold=10.0))
    monkeypatch.setitem(sc.SCANS, "knn", dict(sc.SCANS["knn"], threshold=5.0))
    rows = {("first", "clean", "mnist", "clean"): {0: _row(7.0), 1: _row(11.0)},
            ("first", "fresh", "mnist", "clean"): {20: _row(9.9)},
            ("knn", "clean", "mnist", "clean"): {0: _row(7.0), 1: _row(1.0)},
            ("knn", "fresh-3", "fashion-mnist", "clean"): {60: _row(4.0), 61: _row(6.0), 62: _row(2.0)},
            # shift: excess above 10 or shift above 6; the row's value is the deciding statistic's
            ("shift", "fresh-4", "mnist", "clean"): {80: _row(3.0, shift=6.5), 81: _row(10.5, shift=1.0),
                                                     82: _row(9.0, shift=5.9, mislabel=8.0)},
            # current: the same or mislabel above 7 (the shift version ignores it)
            ("current", "fresh-5", "mnist", "clean"): {100: _row(3.0, mislabel=7.5), 101: _row(9.0, mislabel=6.9),
                                                       102: _row(2.0, shift=6.1, mislabel=1.0)}}
    summary, markdown = sc.report(rows)
    counted = summary["false_positives"]
    assert counted["first"]["clean"] == {"false_positives": 1, "seeds": 2, "max": 11.0, "per_data": {"mnist": 1}}
    assert counted["first"]["fresh"] == {"false_positives": 0, "seeds": 1, "max": 9.9, "per_data": {"mnist": 0}}
    assert counted["knn"]["clean"]["false_positives"] == 1  # 7.0 is above the knn threshold 5
    assert counted["knn"]["fresh-3"] == {"false_positives": 1, "seeds": 3, "max": 6.0,
                                         "per_data": {"fashion-mnist": 1}}
    assert "fresh" not in counted["knn"]  # no rows, no line
    assert counted["shift"]["fresh-4"] == {"false_positives": 2, "seeds": 3, "max": 10.5, "max_shift": 6.5,
                                           "per_data": {"mnist": 2}}
    assert counted["current"]["fresh-5"] == {"false_positives": 2, "seeds": 3, "max": 9.0, "max_shift": 6.1,
                                             "max_mislabel": 7.5, "per_data": {"mnist": 2}}
    assert summary["rows"]["first/clean/mnist/clean"]["found"] == 1
    assert summary["rows"]["knn/clean/mnist/clean"]["found"] == 1
    assert "| shift | fresh-4 | mnist | clean | 3 | 2/3 | 3.0 to 10.5 | 1.0 to 6.5 | – |" in markdown
    assert "| current | fresh-5 | mnist | clean | 3 | 2/3 | 2.0 to 9.0 | 0.0 to 6.1 | 1.0 to 7.5 |" in markdown
    assert "| first | clean | mnist | clean | 2 | 1/2 | 7.0 to 11.0 |" in markdown
    assert "fresh seeds 60-79, k-NN cuts and threshold fixed beforehand): 1 of 3 seeds (fashion-mnist 1 of 3)" in markdown
    assert "fresh seeds 80-99, shift threshold fixed beforehand): 2 of 3 seeds (mnist 2 of 3)" in markdown
    assert "fresh seeds 100-119, mislabel threshold fixed beforehand): 2 of 3 seeds (mnist 2 of 3)" in markdown


def test_a_version_keeps_its_own_cache_folder_and_settings(monkeypatch):
    monkeypatch.setitem(sc.SCANS, "knn", {"trusted_epochs": 7, "early_epochs": 3, "tail": 4.5, "threshold": 9.0,
                                          "flag_score": 0.5, "statistic": "excess", "shift": False,
                                          "mislabel": False})
    first = sc._results("clean", "mnist", "clean", "first")
    previous = sc._results("erm", "mnist", "blend-0.01", "previous")
    knn = sc._results("clean", "mnist", "clean", "knn")
    shift = sc._results("clean", "mnist", "clean", "shift")
    current = sc._results("clean", "mnist", "clean", "current")
    assert first.directory == sc.OUT / "clean-mnist-clean" / "seeds"
    assert previous.directory == sc.OUT / "trusted10-early2-tail5" / "erm-mnist-blend-0.01" / "seeds"
    assert knn.directory == sc.OUT / "trusted7-early3-tail4.5-knn-flag0.5" / "clean-mnist-clean" / "seeds"
    assert shift.directory == sc.OUT / "trusted10-early2-tail5-knn-flag0.5-shift6" / "clean-mnist-clean" / "seeds"
    assert current.directory == (sc.OUT / "trusted10-early2-tail5-knn-flag0.5-shift6-mislabel7" / "clean-mnist-clean"
                                 / "seeds")
    assert sc._settings("clean", "mnist", "clean", "shift")["shift_threshold"] == 6.0
    assert "mislabel_threshold" not in sc._settings("clean", "mnist", "clean", "shift")  # its files, as they were
    assert sc._settings("clean", "mnist", "clean", "current")["mislabel_threshold"] == 7.0
    assert "shift_threshold" not in sc._settings("clean", "mnist", "clean", "knn")  # its files, as they were
    assert "flag_score" not in sc._settings("erm", "mnist", "blend-0.01", "previous")  # its files, as they were
    assert sc._settings("clean", "mnist", "clean", "knn")["statistic"] == "excess"
    assert "early_epochs" not in sc._settings("clean", "mnist", "clean", "first")  # the first version's files
    assert sc._settings("clean", "mnist", "clean", "knn")["early_epochs"] == 3
    assert sc.scan_options("knn") == {"trusted_epochs": 7, "early_epochs": 3, "tail": 4.5, "threshold": 9.0,
                                      "flag_score": 0.5, "shift": False, "mislabel": False}
    assert sc.scan_options("current")["shift"] is True and sc.scan_options("current")["shift_threshold"] == 6.0
    assert sc.scan_options("current")["mislabel"] is True and sc.scan_options("shift")["mislabel"] is False
