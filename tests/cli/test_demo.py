"""``robust-infl demo``: its three parts on tiny sizes, and its output folder rules (it never deletes what it did
not write: a folder holding other runs is refused before any compute, its own earlier run is replaced)."""

from __future__ import annotations

import json

import pytest

import defenses.pipeline
import defenses.poisoning
from defenses import cli, demo
from defenses.report import without_timing

import conftest

CLI_TINY = [*conftest.CLI_TINY, "--recipes", "none", "random", "--seeds", "1"]


def snapshot(folder) -> dict:
    """Every file under ``folder`` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def no_compute(*args, **kwargs):
    raise AssertionError("the demo started computing before it checked its output folder")


def refuse_compute(monkeypatch):
    """Either pipeline starting to compute fails the test."""
    monkeypatch.setattr(defenses.pipeline, "execute", no_compute)
    monkeypatch.setattr(defenses.poisoning, "execute_poisoning", no_compute)


@pytest.fixture
def tiny_evasion(monkeypatch):
    """The demo with one tiny evasion part (moons) and no backdoor part: its folder rules in a second."""
    monkeypatch.setattr(demo, "DEMO_RUNS", {"mnist": dict(data="moons", model="logreg", recipes=["none"],
                                                         references=(), seeds=1, epochs=1)})
    monkeypatch.setattr(demo, "DEMO_QUICK", {"mnist": dict(n_train=40, n_val=20, n_test=20)})
    monkeypatch.setattr(demo, "DEMO_BACKDOOR", {})


def test_demo_runs_the_evasion_and_the_backdoor_parts_and_ends_with_the_verdict(tmp_path, capsys, monkeypatch):
    """The demo on its quick settings, shrunk further so the test stays short."""
    monkeypatch.setitem(demo.DEMO_QUICK, "mnist", dict(seeds=1, n_train=150, n_val=50, n_test=50, epochs=1, steps=2))
    monkeypatch.setitem(demo.DEMO_QUICK, "adult", dict(seeds=1, n_train=300, n_val=100, n_test=100, epochs=1))
    monkeypatch.setitem(demo.DEMO_BACKDOOR_QUICK, "mnist-backdoor",
                        dict(seeds=1, n_train=200, n_val=50, n_test=50, epochs=1, steps=2))
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mnist / cnn / pgd" in out and "adult / logreg / pgd" in out
    assert out.index("Which row to pick against evasion") < out.index("# Poisoning report: mnist / cnn / trainer erm")
    assert "badnets at rate 0.05, target class 0" in out
    for row in ("| none | none | – |", "| low-loss | unknown | – |", "| activation-defence | unknown | – |",
                "| knn-label | unknown | – |", "| spectral-signature | unknown | – |", "| abl | unknown | – |",
                "| remove-poisons-unknown | unknown | – |", "| evidence-finetune | evidence | 10 |",
                "| evidence-retrain | evidence | 10 |", "| remove-poisons | evidence | 10 |"):
        assert row in out
    report = json.loads((tmp_path / "mnist-backdoor" / "report.json").read_text())
    verdict = report["recommendation"]
    assert {verdict["unknown"], verdict["evidence"]} <= {"none", "low-loss", "activation-defence", "knn-label",
                                                        "spectral-signature", "abl",
                                                        "remove-poisons-unknown", "evidence-finetune K=10",
                                                        "evidence-retrain K=10", "remove-poisons K=10"}
    lines = out.rstrip().splitlines()
    assert lines[-3].startswith("Which row to pick against the backdoor")
    assert lines[-2] == f"  mnist-backdoor: {verdict['reason']}" and lines[-2].count("trigger unknown: pick") == 1
    assert lines[-1].startswith("demo finished in")
    assert all(entry["cost_vs_base"]["mean"] > 0 for entry in report["summary"])
    for part in ("mnist", "adult", "mnist-backdoor"):
        assert (tmp_path / part / "report.md").exists()
    for part in ("mnist", "adult"):  # each run attacked with the threat model the demo declares for it
        config = json.loads((tmp_path / part / "report.json").read_text())["config"]
        assert (config["eps"], config["norm"]) == (demo.DEMO_RUNS[part]["eps"], demo.DEMO_RUNS[part]["norm"])
        assert config["attack_settings"]["eps"] == config["eps"] and config["attack_settings"]["norm"] == config["norm"]
    assert demo.DEMO_RUNS["mnist"]["eps"] == 0.1 and demo.DEMO_RUNS["mnist"]["norm"] == "linf"
    assert demo.DEMO_RUNS["adult"]["eps"] == 0.5 and demo.DEMO_RUNS["adult"]["norm"] == "l2"
    assert demo.DEMO_BACKDOOR["mnist-backdoor"]["poison"]["rate"] == 0.05


def test_demo_refuses_a_folder_holding_other_runs_before_any_compute(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    assert cli.main(["defend", *CLI_TINY, "--out", str(runs / "mnist")]) == 0
    before = snapshot(runs)
    capsys.readouterr()
    refuse_compute(monkeypatch)
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(runs)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robust-infl demo: error: out: {runs} holds other runs (mnist/report.json")
    assert err.count("\n") == 1
    assert snapshot(runs) == before


@pytest.mark.parametrize("where", ["report.json", "other/report.md", "adult/seeds/seed_0.json"])
def test_demo_refuses_a_run_file_anywhere_it_looks(tmp_path, capsys, monkeypatch, where):
    (tmp_path / where).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / where).write_text("{}")
    refuse_compute(monkeypatch)
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"robust-infl demo: error: out: {tmp_path} holds other runs ({where}); the "
                                       "demo replaces only its own earlier run, pass another folder\n")


def test_demo_replaces_its_own_earlier_run_but_not_a_run_written_over_it(tmp_path, capsys, tiny_evasion):
    argv = ["demo", "--quick", "--no-progress", "--out", str(tmp_path)]
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(argv) == 0
    first = json.loads((tmp_path / "mnist" / "report.json").read_text())
    assert cli.main(argv) == 0  # make demo twice
    again = json.loads((tmp_path / "mnist" / "report.json").read_text())
    assert without_timing(again["summary"]) == without_timing(first["summary"])
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert cli.main(["defend", *CLI_TINY, "--epochs", "2", "--out", str(tmp_path / "mnist"), "--overwrite"]) == 0
    before = snapshot(tmp_path)
    capsys.readouterr()
    assert cli.main(argv) == 2
    assert "holds other runs (mnist/report.json" in capsys.readouterr().err
    assert snapshot(tmp_path) == before


def test_an_interrupted_demo_can_be_run_again(tmp_path, monkeypatch, tiny_evasion):
    def interrupted(*args, **kwargs):
        defenses.pipeline.run(*args, **kwargs)  # the part's files are written, the demo's record not finished
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run", interrupted)
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 130
    assert not json.loads((tmp_path / demo.RECORD).read_text())["parts"]["mnist"]["finished"]
    monkeypatch.setattr(demo, "run", defenses.pipeline.run)
    assert cli.main(["demo", "--quick", "--no-progress", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / demo.RECORD).read_text())["parts"]["mnist"]["finished"]
