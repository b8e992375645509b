"""``robust-infl scan``: a tiny poisoned image set is found (the target class, the poisons flagged, the kept
list without them), a clean one gives "nothing found" and keeps every index, the files are well-formed, and
every bad flag is refused with one line naming it before any compute."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import defenses
from defenses import cli
from defenses.scan_report import kept_indices, typical_samples

from test_campaign import _run_cli, no_compute  # noqa: F401 - the fixture that makes any compute fail

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def patch_images(n: int, rate: float, seed: int) -> tuple:
    """``(X, y, poisons)``: 8x8 one-channel images of three classes (a square, a vertical bar, a horizontal
    bar over uniform noise); a ``rate`` share of the classes 1 and 2 carry a white 2x2 patch in the bottom-right
    corner and are labelled 0 (BadNets)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    X = rng.uniform(0, 0.3, (n, 1, 8, 8)).astype(np.float32)
    X[y == 0, 0, 2:6, 2:6] += 0.6
    X[y == 1, 0, :, 3:5] += 0.6
    X[y == 2, 0, 3:5, :] += 0.6
    poisons = np.sort(rng.choice(np.flatnonzero(y != 0), int(rate * n), replace=False))
    X[poisons, 0, 6:, 6:] = 1.0
    y[poisons] = 0
    return X, y, poisons


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The npz files of the tests: a poisoned and a clean training set, a trusted set, and bad files."""
    folder = tmp_path_factory.mktemp("scan-data")
    X, y, poisons = patch_images(600, 0.05, seed=0)
    np.savez(folder / "poisoned.npz", X=X, y=y)
    np.save(folder / "poisons.npy", poisons)
    X, y, _ = patch_images(600, 0.0, seed=1)
    np.savez(folder / "clean.npz", X=X, y=y)
    X, y, _ = patch_images(150, 0.0, seed=2)
    np.savez(folder / "trusted.npz", X=X, y=y)
    np.savez(folder / "no_y.npz", X=X)
    np.savez(folder / "uint8.npz", X=(255 * X).astype(np.uint8), y=y)
    np.savez(folder / "negative.npz", X=X, y=y - 1)
    np.savez(folder / "wide.npz", X=np.zeros((10, 1, 9, 9), np.float32), y=np.arange(10) % 3)
    np.savez(folder / "five.npz", X=X[:10], y=np.arange(10) % 6)
    np.savez(folder / "table.npz", X=np.zeros((20, 4), np.float32), y=np.arange(20) % 2)
    np.save(folder / "plain.npy", X)
    (folder / "notes.txt").write_text("a file")
    torch.save({"weight": torch.zeros(2)}, folder / "other.pt")
    return folder


FILES = ["--train", "{d}/poisoned.npz", "--trusted", "{d}/trusted.npz", "--model", "cnn"]
BAD_ROWS = [
    # (id, argv with {d} (the data folder) and {t} (a fresh folder), message regex after "robust-infl scan: error: ")
    ("train missing", ["--train", "{d}/missing.npz", "--trusted", "{d}/trusted.npz", "--model", "cnn"],
     r"train: no such file: '.*missing.npz'"),
    ("train .npy", ["--train", "{d}/plain.npy", "--trusted", "{d}/trusted.npz", "--model", "cnn"],
     r"train: '.*plain.npy' holds a single array \(.npy\), expected a .npz of X, y"),
    ("train without y", ["--train", "{d}/no_y.npz", "--trusted", "{d}/trusted.npz", "--model", "cnn"],
     r"train: '.*no_y.npz' has no array 'y' \(it holds: X\)"),
    ("train not an archive", ["--train", "{d}/notes.txt", "--trusted", "{d}/trusted.npz", "--model", "cnn"],
     r"train: cannot read '.*notes.txt' as a .npz file"),
    ("train uint8", ["--train", "{d}/uint8.npz", "--trusted", "{d}/trusted.npz", "--model", "cnn"],
     r"train: X must be floating-point \(.*8-bit images: X.float\(\) / 255\)"),
    ("train negative labels", ["--train", "{d}/negative.npz", "--trusted", "{d}/trusted.npz", "--model", "cnn"],
     r"train: y must hold class indices >= 0, got -1"),
    ("train without trusted", ["--train", "{d}/poisoned.npz", "--model", "cnn"], r"trusted: required with --train"),
    ("train without model", ["--train", "{d}/poisoned.npz", "--trusted", "{d}/trusted.npz"],
     r"model: required with --train, one of cnn, mlp, logreg"),
    ("trusted without train", ["--data", "digits", "--trusted", "{d}/trusted.npz"],
     r"trusted: only used with --train \(with --data, the validation split\); drop --trusted"),
    ("trusted other shape", ["--train", "{d}/poisoned.npz", "--trusted", "{d}/wide.npz", "--model", "cnn"],
     r"trusted: X has samples of shape \(1, 9, 9\), the training data \(--train\) \(1, 8, 8\)"),
    ("trusted other classes", ["--train", "{d}/poisoned.npz", "--trusted", "{d}/five.npz", "--model", "cnn"],
     r"trusted: y holds class 5, the training data \(--train\) only classes 0..2"),
    ("data with train", ["--data", "digits", *FILES], r"data: only used without --train; drop --data"),
    ("n-train with train", [*FILES, "--n-train", "100"], r"n-train: only used with --data; drop --n-train"),
    ("eps with erm", [*FILES, "--eps", "0.2"], r"eps: only used by an adversarial --trainer; drop --eps"),
    ("steps", [*FILES, "--steps", "3"], r"steps: only used by attacks; scan runs none; drop --steps"),
    ("budget 1.5", [*FILES, "--budget", "1.5"], r"budget: must be a finite number in \(0, 1\), got 1.5"),
    ("budget 0", [*FILES, "--budget", "0"], r"budget: must be a finite number in \(0, 1\), got 0.0"),
    ("top -1", [*FILES, "--top", "-1"], r"top: must be >= 0, got -1"),
    ("seed -1", [*FILES, "--seed", "-1"], r"argument --seed: must be an integer in \[0, 4294967295\], got -1"),
    ("trainer unknown", [*FILES, "--trainer", "sgd"], r"argument --trainer: invalid choice: 'sgd'"),
    ("out a file", [*FILES, "--out", "{d}/notes.txt"], r"out: '.*notes.txt' is a file, expected a folder"),
    ("remove a folder", [*FILES, "--out", "{t}/out", "--remove", "{d}"], r"remove: '.*' is a folder, expected a file"),
    ("save-weights a folder", [*FILES, "--out", "{t}/out", "--save-weights", "{d}"],
     r"save-weights: '.*' is a folder, expected a file"),
    ("weights missing", [*FILES, "--out", "{t}/out", "--weights", "{d}/missing.pt"],
     r"weights: no such file: '.*missing.pt'"),
    ("weights of another model", [*FILES, "--out", "{t}/out", "--weights", "{d}/other.pt"],
     r"weights: '.*other.pt' does not fit model 'cnn' on this data"),
    ("cnn on features", ["--train", "{d}/table.npz", "--trusted", "{d}/table.npz", "--model", "cnn", "--out", "{t}/o"],
     r"model: 'cnn' needs image data, user has samples of shape \(4,\)"),
]


@pytest.mark.parametrize("case, argv, message", BAD_ROWS, ids=[row[0] for row in BAD_ROWS])
def test_bad_input_is_refused_with_one_line_naming_the_flag_before_any_compute(case, argv, message, data, tmp_path,
                                                                              no_compute, monkeypatch, capsys):
    monkeypatch.setattr(defenses, "scan_backdoor", no_compute_scan, raising=False)
    argv = [a.replace("{d}", str(data)).replace("{t}", str(tmp_path)) for a in argv]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    assert _run_cli(["scan", "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert re.match(r"robust-infl scan: error: " + message, err), err
    assert not list(tmp_path.rglob("scan.*"))


def no_compute_scan(*args, **kwargs):
    raise AssertionError("the scan started before the bad input was refused")


def test_an_earlier_scan_is_kept_unless_overwrite(data, tmp_path, no_compute, monkeypatch, capsys):
    monkeypatch.setattr(defenses, "scan_backdoor", no_compute_scan, raising=False)
    (tmp_path / "scan.json").write_text("{}")
    argv = ["scan", *[a.replace("{d}", str(data)) for a in FILES], "--out", str(tmp_path)]
    assert _run_cli(argv) == 2
    err = capsys.readouterr().err
    assert re.match(r"robust-infl scan: error: out: '.*' holds an earlier scan \(scan.json\); pass --overwrite", err)
    assert (tmp_path / "scan.json").read_text() == "{}"


def test_kept_indices_and_typical_samples_by_brute_force():
    assert kept_indices(6, torch.tensor([4, 1])).tolist() == [0, 2, 3, 5]
    assert kept_indices(3, torch.empty(0, dtype=torch.int64)).tolist() == [0, 1, 2]
    generator = torch.Generator().manual_seed(0)
    scores, y = torch.randn(40, generator=generator), torch.randint(0, 3, (40,), generator=generator)
    shown, exclude = scores.argsort(descending=True)[:7], torch.tensor([int(scores.argmin())])
    typical = typical_samples(scores, y, shown, exclude)
    used = set()
    for position, index in enumerate(shown.tolist()):
        candidates = [i for i in scores.argsort().tolist() if y[i] == y[index] and i not in shown.tolist()
                      and i not in exclude.tolist() and i not in used]
        assert typical[position] == (candidates[0] if candidates else -1)
        used.add(candidates[0]) if candidates else None
