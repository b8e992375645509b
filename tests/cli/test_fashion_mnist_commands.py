"""Fashion-MNIST on the command line: every command accepts it; without the data each command stops with ONE
line that says where it looked and how to get it (exit 2, before training or writing a file); one real
run where the data are installed."""

from __future__ import annotations

import re

import pytest

from defenses import cli
from robust_infl import datasets

from conftest import fashion_mnist_installed

TINY = ["--data", "fashion-mnist", "--n-train", "200", "--n-val", "50", "--n-test", "100", "--epochs", "1",
        "--steps", "2", "--no-progress"]


@pytest.mark.parametrize("command", ["defend", "score", "attack"])
def test_missing_data_is_one_line_exit_2_before_any_output(command, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(datasets.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets, "_DEBIAN_FASHION_MNIST", tmp_path / "debian")
    out = {"defend": ["--out", str(tmp_path / "d")], "score": ["--out", str(tmp_path / "s.npy")], "attack": []}
    assert cli.main([command, *TINY, *out[command]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert re.match(rf"robust-infl {command}: error: data: Fashion-MNIST not found \(looked for its four IDX "
                    rf"files in {re.escape(str(tmp_path / 'cache'))}.*\); get it with `make setup`", err), err
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing written (defend: its empty --out folder)


@pytest.mark.skipif(not fashion_mnist_installed(), reason="Fashion-MNIST is not installed here (make setup fills the cache)")
def test_attack_on_the_real_data_trains_above_chance(capsys):
    assert cli.main(["attack", *TINY, "--n-train", "1000", "--n-test", "200", "--steps", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fashion-mnist / cnn / trainer erm; test n=200")
    clean = float(re.search(r"\| \(clean\) \| ([\d.]+) \|", out).group(1))
    robust = float(re.search(r"\| pgd \| ([\d.]+) \|", out).group(1))
    assert 20.0 < clean <= 100.0 and robust <= clean  # 10 classes: chance is 10%
