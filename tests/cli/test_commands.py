"""The robust-infl command line: help for every flag, the commands on tiny settings, one-line errors."""

import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import defenses.recipes
from defenses import cli

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--data", "moons", "--model", "logreg", "--epochs", "2", "--no-progress"]
SMALL = ["--n-train", "100", "--n-val", "40", "--n-test", "40"]  # for runs whose checks do not need more data


def _help(*argv) -> str:
    """What ``robust-infl *argv --help`` prints."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        cli.build_parser().parse_args([*argv, "--help"])
    assert exit_info.value.code == 0
    return out.getvalue()


def _documented_options(text: str) -> dict:
    """Each flag of a --help text mapped to its help (``""`` when it has none), from argparse's entries.

    An entry starts two spaces in with its flags; its help follows on the same line after two or more
    spaces, or on the next line, indented further.
    """
    lines = text.splitlines() + [""]
    options = {}
    for line, following in zip(lines, lines[1:]):
        entry = re.match(r"^  (-\S.*?)(?:\s{2,}(\S.*))?$", line)
        if entry:
            text_of_help = entry[2] or (following.strip() if re.match(r"^ {3,}\S", following) else "")
            options.update({part.split()[0]: text_of_help for part in entry[1].split(", ")})
    return options


def test_help_documents_every_flag_of_every_command():
    commands = re.findall(r"^    (\w+)  ", _help(), flags=re.M)
    assert set(commands) == {"defend", "score", "attack", "explain", "scan", "demo"}
    flags = {}
    for name in commands:
        text = _help(name)
        flags[name] = _documented_options(text)
        for flag, text_of_help in flags[name].items():
            assert text_of_help, f"{name} {flag} has no help"
        usage = text.split("\n\n")[0]  # every flag of the usage has its documented entry
        assert set(re.findall(r"(?<=[\[\s|])(--?[a-zA-Z][\w-]*)", usage)) <= set(flags[name])
    assert {"--data", "--model", "--attack", "--eps", "--method", "--fraction", "--mode", "--retrain", "--trainer",
            "--seeds", "--out"} <= set(flags["defend"])
    assert {"--objective", "--attack", "--eps", "--method", "--out"} <= set(flags["score"])


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "defenses.cli", "defend", "--help"], cwd=ROOT,
                            capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "--fraction F [F ...]" in result.stdout and "robust_vs_fraction.png" in result.stdout


def test_defend_writes_the_report_and_prints_the_table(tmp_path, capsys):
    code = cli.main(["defend", *TINY, *SMALL, "--seeds", "2", "--fraction", "0.05", "0.1", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "| influence | 0.05 |" in out and "| random | 0.1 |" in out
    assert {p.name for p in tmp_path.iterdir()} == {"report.json", "report.md", "robust_vs_fraction.png",
                                                    "robust_vs_cost.png", "seeds"}
    config = json.loads((tmp_path / "report.json").read_text())["config"]
    assert config["data"] == "moons" and config["seeds"] == [0, 1] and config["norm"] == "l2"


def test_defend_picks_references_and_the_evaluation_suite(tmp_path, capsys):
    args = ["defend", *TINY, *SMALL, "--seeds", "1", "--recipes", "none", "--out", str(tmp_path)]
    assert cli.main([*args, "--references", "fast-at", "--eval-attacks", "fgsm"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["references"] == ["fast-at"] and report["config"]["eval_attacks"] == ["pgd", "fgsm"]
    assert [e["recipe"] for e in report["summary"]] == ["none", "fast-at"]
    assert set(report["summary"][0]["attacks"]) == {"pgd", "fgsm"}
    assert "**Recommendation:** pick " in capsys.readouterr().out
    assert cli.main([*args, "--overwrite", "--references", "--eval-attacks"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["config"]["references"] == [] and report["config"]["eval_attacks"] == ["pgd"]


def test_defend_ensemble_reaches_the_influence_recipe(tmp_path, monkeypatch):
    calls = []
    original = defenses.recipes.train_ensemble
    monkeypatch.setattr(defenses.recipes, "train_ensemble",
                        lambda *args, **kwargs: calls.append((args[3], kwargs)) or original(*args, **kwargs))
    assert cli.main(["defend", *TINY, *SMALL, "--seeds", "1", "--recipes", "influence", "--references",
                     "--eval-attacks", "--ensemble", "3", "--out", str(tmp_path)]) == 0
    assert calls == [(3, {"subset": 0.5, "seed": 0})]
    assert json.loads((tmp_path / "report.json").read_text())["config"]["method_options"] == {"ensemble": "3"}


def test_score_saves_one_harm_per_training_sample_and_prints_the_ranking(tmp_path, capsys):
    path = tmp_path / "scores.npy"
    assert cli.main(["score", *TINY, "--objective", "dp", "--top", "3", "--out", str(path)]) == 0
    out = capsys.readouterr().out
    scores = np.load(path)
    assert scores.shape == (400,) and np.isfinite(scores).all()
    best = int(np.argmax(scores))
    lines = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert len(lines) == 3 and int(lines[0][1]) == best


def test_attack_prints_clean_and_robust_accuracy(capsys):
    assert cli.main(["attack", *TINY, "--attack", "fgsm", "pgd", "linear"]) == 0
    out = capsys.readouterr().out
    assert "| (clean) |" in out and "| fgsm |" in out and "| linear |" in out and "| worst case |" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["defend", *TINY, "--fraction", "1.5"], "robust-infl defend: error: fraction: every fraction must be in"),
        (["score", *TINY, "--objective", "dp", "--data", "digits", "--out", "x.npy"],
         "robust-infl score: error: objective: dp needs a sensitive attribute"),
        (["score", *TINY, "--out", "scores.txt"], "robust-infl score: error: out: must end in .npy"),
        (["attack", *TINY, "--attack", "cw"], "robust-infl attack: error: argument --attack"),
        (["defend", "--seeds"], "robust-infl defend: error: argument --seeds: expected one argument"),
    ],
)
def test_user_errors_are_one_line_without_traceback(argv, message, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as stop:  # argparse's own usage errors
        code = stop.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


def test_debug_shows_the_traceback():
    with pytest.raises(ValueError, match="fractions"):
        cli.main(["--debug", "defend", *TINY, "--fraction", "1.5"])
    with pytest.raises(ValueError, match="fractions"):
        cli.main(["defend", *TINY, "--fraction", "1.5", "--debug"])

