"""Per-seed result files are tamper-evident: each carries the SHA-256 of its content, checked on load with
its values (accuracies in [0, 1], numbers finite); a changed file is refused with one line naming it.
The committed per-seed files of the experiments pass the same checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from defenses.seed_results import SeedResults, prepare_out_folder, read_seed_file, record_checksum

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = sorted((ROOT / "experiments" / "out").glob("**/seeds/seed_*.json"))
RESULTS = {"base": {"clean_acc": 0.9, "robust_acc": 0.2},
           "runs": [{"recipe": "none", "clean_acc": 0.9, "robust_acc_adaptive": 0.12},
                    {"recipe": "random", "clean_acc": 0.88, "robust_acc_adaptive": 0.15}]}


def saved(tmp_path) -> tuple[SeedResults, Path]:
    results = SeedResults(tmp_path, {"eps": 0.1})
    return results, results.save(1, "data", RESULTS)


def edit(path: Path, change) -> None:
    record = json.loads(path.read_text())
    change(record["results"])
    path.write_text(json.dumps(record, indent=2))


def test_a_saved_seed_reads_back_and_carries_its_checksum(tmp_path):
    results, path = saved(tmp_path)
    record = json.loads(path.read_text())
    assert record["sha256"] == record_checksum(record)
    assert results.load(1, "data") == RESULTS


@pytest.mark.parametrize("change, message", [
    (lambda r: r["runs"][0].update(robust_acc_adaptive=0.99), r"was changed after it was written"),
    (lambda r: r["runs"].pop(), r"was changed after it was written .*rows deleted"),
    (lambda r: r["runs"][0].update(clean_acc="high"), r"holds clean_acc = 'high', expected a number in \[0, 1\]"),
    (lambda r: r["base"].update(robust_acc=1.5), r"holds robust_acc = 1.5, expected a number in \[0, 1\]"),
    (lambda r: r["base"].update(robust_acc=True), r"holds robust_acc = True, expected a number in \[0, 1\]"),
], ids=["forged number", "row deleted", "string accuracy", "accuracy above 1", "boolean accuracy"])
def test_a_hand_edited_seed_file_is_refused_naming_it(tmp_path, change, message):
    results, path = saved(tmp_path)
    edit(path, change)
    with pytest.raises(ValueError, match=rf"^resume: {path}.*{message}") as info:
        results.load(1, "data")
    assert "\n" not in str(info.value)


def test_a_non_finite_number_and_a_missing_checksum_are_refused(tmp_path):
    results, path = saved(tmp_path)
    path.write_text(path.read_text().replace('"robust_acc": 0.2', '"robust_acc": NaN'))
    with pytest.raises(ValueError, match=rf"^resume: {path} holds robust_acc = nan, not a finite number"):
        results.load(1, "data")
    results, path = saved(tmp_path)
    record = json.loads(path.read_text())
    del record["sha256"]
    path.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=rf"^resume: {path} carries no checksum"):
        results.load(1, "data")


@pytest.mark.parametrize("path", COMMITTED, ids=[str(p.relative_to(ROOT / "experiments" / "out")) for p in COMMITTED])
def test_the_committed_seed_files_pass_the_checks(path):
    assert read_seed_file(path)["sha256"]


def test_the_experiments_commit_their_seed_files():
    assert len(COMMITTED) >= 100


def test_temporary_files_of_a_killed_write_are_removed_on_resume(tmp_path):
    results, _ = saved(tmp_path)
    strays = [tmp_path / ".robust_vs_cost.png.abc123.tmp", tmp_path / ".report.json.x.tmp",
              tmp_path / "seeds" / ".seed_1.json.y.tmp"]
    for stray in strays:
        stray.write_text("half")
    (tmp_path / "mine.tmp").write_text("not ours")
    prepare_out_folder(tmp_path, resume=True, overwrite=False)
    assert not any(p.exists() for p in strays)
    assert (tmp_path / "mine.tmp").exists() and results.load(1, "data") == RESULTS
