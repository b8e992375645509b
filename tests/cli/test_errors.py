"""The command line on user errors: exit status 2, ONE line on stderr, no traceback (unless --debug);
model weights are loaded safely (a file carrying pickled code is refused and never runs)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defenses import cli

from conftest import CLI_TINY, CreatesMarkerWhenUnpickled

ROOT = Path(__file__).resolve().parents[2]
TINY = CLI_TINY


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run the command lines below at once, each in its own process; ``{case: CompletedProcess}``."""
    tmp = tmp_path_factory.mktemp("cli")
    commands = {
        "unknown-data": ["score", "--data", "cifar10", "--out", str(tmp / "s.npy")],
        "fraction": ["defend", *TINY, "--fraction", "1.5", "--out", str(tmp / "d")],
        "eps": ["score", *TINY, "--eps", "-1", "--out", str(tmp / "s.npy")],
        "missing-path": ["attack", *TINY, "--weights", str(tmp / "missing.pt")],
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    started = {case: subprocess.Popen([sys.executable, "-m", "defenses.cli", *argv], cwd=tmp, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for case, argv in commands.items()}
    results = {}
    for case, process in started.items():
        out, err = process.communicate(timeout=300)
        results[case] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return results


@pytest.mark.parametrize("case, message", [
    ("unknown-data", r"robust-infl score: error: argument --data: invalid choice: 'cifar10' "
                     r"\(choose from 'mnist', 'mnist-full', 'fashion-mnist', 'fashion-mnist-full', 'digits', 'adult', "
                     r"'moons'\)"),
    ("fraction", r"robust-infl defend: error: fraction: every fraction must be in \(0, 1\), got 1.5"),
    ("eps", r"robust-infl score: error: eps: must be a finite number > 0, got -1.0"),
    ("missing-path", r"robust-infl attack: error: weights: no such file: '.*missing.pt'"),
])
def test_user_errors_exit_2_with_one_line_on_stderr(runs, case, message):
    result = runs[case]
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert re.match(message, result.stderr), result.stderr


def test_pickled_code_in_a_weights_file_is_refused_and_never_runs(tmp_path, capsys):
    evil, marker = tmp_path / "evil.pt", tmp_path / "MARKER"
    torch.save({"linear.weight": torch.zeros(1, 2), "x": CreatesMarkerWhenUnpickled(marker)}, evil)
    assert cli.main(["attack", *TINY, "--weights", str(evil)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"robust-infl attack: error: weights: refused to load '{evil}': it holds pickled objects")
    assert err.count("\n") == 1 and not marker.exists()


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="^weights: no such file"):
        cli.main(["attack", *TINY, "--weights", str(tmp_path / "missing.pt"), "--debug"])


def test_saved_weights_load_back_and_give_the_same_results(tmp_path, capsys):
    path = tmp_path / "weights" / "logreg.pt"
    assert cli.main(["attack", *TINY, "--attack", "fgsm", "--save-weights", str(path)]) == 0
    trained = capsys.readouterr().out
    assert path.exists() and not [p for p in path.parent.iterdir() if p.name.startswith(".")]
    assert cli.main(["attack", *TINY, "--attack", "fgsm", "--weights", str(path)]) == 0
    assert capsys.readouterr().out == trained
    code = cli.main(["attack", *TINY[:2], "--model", "mlp", *TINY[4:], "--weights", str(path)])
    assert code == 2
    assert capsys.readouterr().err.startswith(f"robust-infl attack: error: weights: '{path}' does not fit model 'mlp'")
