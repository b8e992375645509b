"""robust-infl explain: the files it writes, inputs by test-split index or from a .npz, and bad input refused
with one line naming the flag, exit 2, before any compute."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from defenses import cli
from defenses.attribution import trust_text
from robust_infl.registry import load_splits

from conftest import CLI_TINY

FLIPPED = ["--index", "0", "1", "3"]  # on CLI_TINY (moons, logistic regression, seed 0): 0 is misclassified,
# 1 and 3 are flipped by PGD l2 0.5


def test_writes_the_tables_for_tabular_data_and_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["explain", *CLI_TINY, *FLIPPED, "--top", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "explanation.json").read_text())
    trust = report["trust"]  # from the benchmark's file shipped with the package, which measured ip
    assert trust["measured"] and trust["method"] == "ip" and trust["objective"] == "robust" and trust["models"] == 1
    assert "not images: tables only" in printed and f"How far to trust it:** {trust_text(report['trust'])}" in printed
    assert [e["input"] for e in report["explained"]] == [1, 3]  # the test-split rows
    assert report["dropped"] == [{"input": 0, "label": 1, "clean_prediction": 0, "adversarial_prediction": 0,
                                  "reason": "misclassified before the attack (nothing to flip)"}]
    assert all(len(e["top"]) == 3 for e in report["explained"]) and report["method"] == "ip"
    assert (out / "explanation.md").read_text() in printed
    assert sorted(p.name for p in out.iterdir()) == ["explanation.json", "explanation.md"]


def test_inputs_from_a_npz_give_the_same_explanation_as_their_index(tmp_path, capsys):
    assert cli.main(["explain", *CLI_TINY, *FLIPPED, "--out", str(tmp_path / "a")]) == 0
    by_index = json.loads((tmp_path / "a" / "explanation.json").read_text())
    X, y = load_splits("moons", 0, 40, 20, 20).test[:2]
    rows = [int(i) for i in FLIPPED[1:]]
    np.savez(tmp_path / "inputs.npz", X=X[rows].numpy(), y=y[rows].numpy())
    assert cli.main(["explain", *CLI_TINY, "--inputs", str(tmp_path / "inputs.npz"),
                     "--out", str(tmp_path / "b")]) == 0
    by_file = json.loads((tmp_path / "b" / "explanation.json").read_text())
    for entry in by_index["explained"] + by_index["dropped"]:  # --inputs reports positions in the file
        entry["input"] = rows.index(entry["input"])
    assert by_file == by_index


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the command gets as far as training."""
    def refuse(*args, **kwargs):
        raise AssertionError("trained before checking its input")

    monkeypatch.setattr(cli, "_train", refuse)


def _npz(tmp_path, name, **arrays):
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.parametrize("argv, message", [
    (["--index", "3", "--top", "0"], "top: must be >= 1, got 0"),
    (["--index", "20"], r"index: must lie in \[0, 19\] \(the test split has 20 samples\), got 20"),
    (["--index", "2", "2"], "index: each test input once, got 2 2"),
    (["--index", "2", "--damping", "0.1"], "damping: only used by --method if-exact"),
    (["--index", "2", "--eps", "-1"], "eps: must be a finite number > 0, got -1.0"),
    (["--index", "2", "--params", "nope"], "params: "),
    (["--inputs", "MISSING"], "inputs: no such file: '.*absent.npz'"),
    (["--inputs", "NOY"], r"inputs: '.*noy.npz' holds no array y \(it has X\)"),
    (["--inputs", "SHAPE"], r"inputs: samples of shape \(3,\) do not match the data's \(2,\)"),
    (["--inputs", "LABELS"], r"inputs: labels must lie in \[0, 1\]"),
])
def test_bad_input_names_the_flag_before_any_compute(tmp_path, capsys, no_training, argv, message):
    files = {"MISSING": str(tmp_path / "absent.npz"), "NOY": _npz(tmp_path, "noy", X=np.zeros((2, 2))),
             "SHAPE": _npz(tmp_path, "shape", X=np.zeros((2, 3)), y=np.zeros(2)),
             "LABELS": _npz(tmp_path, "labels", X=np.zeros((2, 2)), y=np.array([0, 4]))}
    argv = [files.get(a, a) for a in argv]
    assert cli.main(["explain", *CLI_TINY, *argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.match(f"robust-infl explain: error: {message}", err), err


@pytest.mark.parametrize("argv, message", [
    ([], "one of the arguments --index --inputs is required"),
    (["--index", "1", "--inputs", "x.npz"], "argument --inputs: not allowed with argument --index"),
    (["--index", "1", "--method", "tracin"], "argument --method: invalid choice: 'tracin'"),
])
def test_usage_errors_exit_2_with_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        cli.main(["explain", *CLI_TINY, *argv])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err


def test_nothing_flipped_names_the_index_flag(tmp_path, capsys):
    assert cli.main(["explain", *CLI_TINY, "--index", "0", "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.startswith("robust-infl explain: error: index: the attack flips none of the 1 ")
